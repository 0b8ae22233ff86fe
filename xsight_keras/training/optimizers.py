"""Keras' Adam and AdamW, updated by PyTorch's fused Adam kernel on the torch backend.

Keras' torch Adam runs its update as about a dozen ``torch._foreach_*`` passes over all
parameters, gradients and moments, with temporaries in between; weight decay is one more pass.
PyTorch's fused kernel (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` calls)
reads each parameter, gradient and moment once and does decay, moments and step together: on the
development CPU the optimizer's share of an Attention U-Net ResNet34 training step falls from
about 54 ms to 34 ms. The arithmetic is Keras' (see :class:`FusedAdamW`); on other backends, and
for ``amsgrad``, these classes are exactly Keras' own.
"""

from __future__ import annotations

import math

import keras

from xsight_keras.compat import UpdateStepOverride, adam_slots, uses_weight_decay, variable_version
from xsight_keras.models.fused_layers import in_memory_order, match_optimizer_layout


def _fused_kernel():
    """``torch._fused_adamw_`` when the torch backend is active and the kernel exists (CPU
    support arrived in torch 2.4), else None."""
    if keras.backend.backend() != "torch":
        return None
    import torch

    return getattr(torch, "_fused_adamw_", None)


def _same_dense_layout(tensors) -> bool:
    """Whether all ``tensors`` have one shape and one set of strides, and that layout is dense
    (a permutation of a contiguous tensor). The fused kernels walk every tensor of a parameter
    in raw memory order: a gradient or moment laid out differently from its parameter would be
    updated element-against-wrong-element, silently."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors[1:]):
        return False
    return in_memory_order(first).is_contiguous()


def _learning_rate_for(learning_rate, device):
    """The learning rate as the fused kernel takes it: a float on CPUs (free to read there), a
    float32 tensor on the parameters' device elsewhere (no host read, no stall)."""
    import torch

    value = getattr(learning_rate, "value", learning_rate)  # a keras.Variable or a tensor
    if device.type == "cpu" or not isinstance(value, torch.Tensor):
        return float(keras.ops.convert_to_numpy(value))
    return value.to(device=device, dtype=torch.float32)


class _FusedAdamUpdate(UpdateStepOverride):
    """The torch fast path shared by :class:`FusedAdam` and :class:`FusedAdamW`: the whole
    step (decay and update of every variable) replaces Keras' (see :mod:`xsight_keras.compat`)."""

    def _fused(self):
        return None if self.amsgrad else _fused_kernel()

    def replaces_update_step(self) -> bool:
        return self._fused() is not None

    def build(self, variables):
        super().build(variables)
        # moments in each parameter's memory layout (kernels stored in PyTorch's order)
        match_optimizer_layout(self, variables)

    def _host_step(self) -> float:
        """``iterations + 1`` as a Python number without a device read on every step: the value
        is read once, then counted on the host while ``iterations`` changes only by the base
        optimizer's one increment per ``apply`` (torch's in-place version counter tells); any
        other change (a restored checkpoint, an ``assign``, gradient accumulation) reads it
        again. A device read would stall the host until the GPU has finished the backward pass."""
        key = variable_version(self.iterations)
        cached = getattr(self, "_step_cache", None)
        if cached is not None and key == (cached[0], cached[1] + 1):
            step = cached[2] + 1.0
        else:
            step = float(keras.ops.convert_to_numpy(self.iterations.value)) + 1.0
        self._step_cache = (key[0], key[1], step)
        return step

    def update_all_variables(self, grads, trainable_variables, learning_rate):
        """One fused step: decay (the kernel decays each parameter before its Adam step, as
        Keras does) and update of every variable, grouped by device, dtype and decay."""
        kernel = self._fused()
        import torch

        # under DeviceLossScaleOptimizer: the step is skipped on the device when found_inf is
        # set, the step count is the device's, and eps is placed with the host's best count
        found_inf = getattr(self, "_found_inf", None)
        step = self._host_step() if found_inf is None else self._step_hint  # iterations + 1
        # Keras divides by (sqrt(v) + eps) after folding sqrt(1 - beta_2^t) into the step size;
        # PyTorch by (sqrt(v) / sqrt(1 - beta_2^t) + eps): the same update with this eps.
        eps = self.epsilon / math.sqrt(1.0 - self.beta_2 ** step)
        decay = self.weight_decay or 0.0
        groups: dict = {}
        write_back = []  # (original, contiguous copy) for tensors laid out unlike their parameter
        for grad, variable in zip(grads, trainable_variables):
            momentum, velocity = adam_slots(self, variable)
            tensors = (variable.value, grad, momentum.value, velocity.value)
            if not _same_dense_layout(tensors):  # correct, slower: contiguous copies
                copies = tuple(t.contiguous() for t in tensors)
                write_back += [(t, c) for i, (t, c) in enumerate(zip(tensors, copies))
                               if c is not t and i != 1]  # not the gradient
                tensors = copies
            use_decay = bool(decay) and uses_weight_decay(self, variable)
            key = (tensors[0].device, tensors[0].dtype, use_decay)
            for items, item in zip(groups.setdefault(key, ([], [], [], [])), tensors):
                items.append(item)
        with torch.no_grad():
            for (device, _, use_decay), (params, grad_list, m, v) in groups.items():
                if found_inf is None:
                    steps = [torch.full((), step, dtype=torch.float32, device=device)]
                    skip = None
                else:
                    steps = [self.iterations.value.to(device, torch.float32) + 1.0]
                    skip = found_inf.to(device).reshape(1)
                lr = _learning_rate_for(learning_rate, device)
                kernel(params, grad_list, m, v, [], steps * len(params), lr=lr,
                       beta1=self.beta_1, beta2=self.beta_2,
                       weight_decay=decay if use_decay else 0.0, eps=eps, amsgrad=False,
                       maximize=False, found_inf=skip)
            for original, copy in write_back:
                original.copy_(copy)


@keras.saving.register_keras_serializable(package="xsight_keras")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` (same arguments, config and results) whose update runs as
    PyTorch's fused Adam kernel on the torch backend; Keras' own update elsewhere."""


@keras.saving.register_keras_serializable(package="xsight_keras")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` (same arguments, config, weight-decay exclusions and results)
    whose update runs as PyTorch's fused AdamW kernel on the torch backend.

    Per parameter and step, as Keras: ``w ← w·(1 − lr·wd)`` (unless excluded), ``m ← β1·m +
    (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²``, ``w ← w − lr·√(1 − β2ᵗ)/(1 − β1ᵗ) · m / (√v + ε)``,
    with t = ``iterations + 1``. Gradient clipping, accumulation, loss scaling and Keras' EMA
    option are the base optimizer's and unchanged. No device-to-host read per step (see
    ``_host_step``). ``amsgrad=True`` and backends other than torch use Keras' own code.
    """
