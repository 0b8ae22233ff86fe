"""Dynamic loss scaling for mixed_float16 decided on the device, without a host read per step.

Keras' ``LossScaleOptimizer`` checks the scaled gradients for inf/NaN and then branches with
``ops.cond`` twice a step (apply or halve; grow the scale or count): on the torch backend each
``cond`` reads a boolean back from the GPU, so the host waits for the backward pass to finish
before it can queue the next step. That stall is one reason mixed_float16 ran slower than
float32 on the H200 (README, Performance).

:class:`DeviceLossScaleOptimizer` is the same optimizer (same arguments, variables, config and
saved form; a drop-in for ``keras.optimizers.LossScaleOptimizer``) that, on the torch backend
with the engine's fused Adam/AdamW as inner optimizer, keeps the decision on the device:

* the finite check writes a device flag ``found_inf`` (PyTorch's AMP check, the one
  ``torch.amp.GradScaler`` uses), and the gradients are divided by the scale as Keras does;
* the inner optimizer runs its fused kernel with ``found_inf``: a step with inf/NaN gradients
  leaves weights and moments untouched, and ``iterations`` is advanced by ``1 - found_inf``,
  so only applied steps count, as in Keras;
* the scale and its counter are updated with ``torch.where``: halved on overflow, doubled
  after ``dynamic_growth_steps`` finite steps in a row, as Keras does.

The one quantity the host needs, the step number that places Adam's epsilon (see
:class:`~xsight_keras.training.optimizers.FusedAdamW`), is counted on the host and corrected by
each step's ``found_inf`` once its copy to host memory has arrived (an asynchronous copy,
read only when complete, never waited for). It is exact whenever the previous step has finished
on the GPU by the time the next one is applied, and always on CPUs; otherwise epsilon is placed
as if the last, still unknown, skipped steps had been applied — a relative change of epsilon
below 0.1 % after the first few hundred steps.

Everything else — other inner optimizers, gradient accumulation, Keras' optimizer EMA,
variables overwritten by their gradient or with a constraint, other backends — runs Keras' own
code.
"""

from __future__ import annotations

import collections

import keras

from xsight_keras.compat import LossScaleApplyOverride, variable_version
from xsight_keras.training.optimizers import _FusedAdamUpdate


@keras.saving.register_keras_serializable(package="xsight_keras")
class DeviceLossScaleOptimizer(LossScaleApplyOverride, keras.optimizers.LossScaleOptimizer):
    """``keras.optimizers.LossScaleOptimizer`` whose finite check, skip and scale update stay
    on the device (see the module docstring). Arguments: Keras' (``inner_optimizer``,
    ``initial_scale``, ``dynamic_growth_steps``)."""

    def _device_path(self, grads, trainable_variables) -> bool:
        inner = self.inner_optimizer
        if keras.backend.backend() != "torch" or not isinstance(inner, _FusedAdamUpdate):
            return False
        if not inner.replaces_update_step() or inner.use_ema or inner.gradient_accumulation_steps:
            return False
        if trainable_variables is None or len(trainable_variables) != len(grads) or not grads:
            return False
        # a constraint is applied after every inner update, so also after a skipped one here
        # (Keras does not run the inner optimizer on a skipped step): Keras' path for those
        return all(g is not None for g in grads) and not any(
            getattr(v, "overwrite_with_gradient", False) or v.constraint is not None
            for v in trainable_variables)

    def _host_iterations(self) -> float:
        """``inner.iterations`` as the host best knows it: read from the device once (and again
        whenever something other than this optimizer changed it), then counted here."""
        inner = self.inner_optimizer
        pending = getattr(self, "_pending", None)
        if pending is None:
            pending = self._pending = collections.deque()
        if getattr(self, "_counted_key", None) != variable_version(inner.iterations):
            pending.clear()
            self._counted = float(keras.ops.convert_to_numpy(inner.iterations.value))
        # fold in the skips whose flags have reached host memory
        while pending and (pending[0][1] is None or pending[0][1].query()):
            flag, _ = pending.popleft()
            self._counted -= float(flag[0])
        return self._counted

    def apply_scaled(self, grads, trainable_variables) -> bool:
        if not self._device_path(grads, trainable_variables):
            return False
        import torch

        inner = self.inner_optimizer
        grads = list(grads)
        scale = self.dynamic_scale.value
        device = scale.device
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        one = torch.ones(1, dtype=torch.float32, device=device)
        by_kind: dict = {}
        for g in grads:
            by_kind.setdefault((g.device, g.dtype), []).append(g)
        for (grad_device, _), group in by_kind.items():
            flag = found_inf if grad_device == device else torch.zeros_like(found_inf, device=grad_device)
            # multiplies by one in place (no change) and sets flag on any inf/NaN
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one.to(grad_device))
            if flag is not found_inf:
                found_inf += flag.to(device)
        found_inf = torch.clamp(found_inf, max=1.0)
        unscaled = [torch.divide(g, scale.to(g.device)) for g in grads]  # Keras: ops.divide

        step = self._host_iterations() + 1.0
        inner._found_inf, inner._step_hint = found_inf, step
        try:
            inner.apply(unscaled, trainable_variables=trainable_variables)  # iterations += 1
        finally:
            inner._found_inf = inner._step_hint = None
        inner.iterations.assign_sub(found_inf.to(torch.int64).reshape(()))  # a skip counts none

        overflow = found_inf.reshape(()) > 0
        grow = torch.logical_and(~overflow, self.step_counter.value == self.dynamic_growth_steps - 1)
        new_scale = torch.where(overflow, scale * 0.5, torch.where(grow, scale * 2.0, scale))
        counter = self.step_counter.value
        new_counter = torch.where(torch.logical_or(overflow, grow), torch.zeros_like(counter),
                                  counter + 1)
        self.dynamic_scale.assign(new_scale)
        self.step_counter.assign(new_counter)

        # the host count: this step added one; its skip is folded in when its flag arrives
        self._counted = step
        self._counted_key = variable_version(inner.iterations)
        if device.type == "cuda":
            host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            host.copy_(found_inf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:
            self._pending.append((found_inf.detach().clone(), None))
        return True


__all__ = ["DeviceLossScaleOptimizer"]
