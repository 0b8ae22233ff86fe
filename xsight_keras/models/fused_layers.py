"""Keras layers with a fast path on the torch backend: BatchNorm, 2× upsampling, convolution.

Each class here is a drop-in subclass of the Keras layer (same weights, same config, registered
serializable). On the torch backend, for eager tensors, it calls the one fused PyTorch kernel
(or, for convolutions, keeps its kernel in the memory order PyTorch's kernels read); everywhere
else (JAX, TensorFlow, shape inference, stateless calls) it runs Keras' own code.

Keras' ``BatchNormalization`` builds the normalisation from separate element-wise ops (moments,
subtract, rsqrt, multiply, add, two variable assignments), each with its own backward. On the
torch backend that cost 0.43 s of a 1.9 s Attention U-Net training step on the CPU, where
``torch.nn.functional.batch_norm`` does the same work in one fused kernel (and uses cuDNN on
GPUs). Keras' nearest ``UpSampling2D`` transposes channels-first tensors to channels-last,
repeats twice and transposes back, leaving a strided tensor that the next convolution copies
again; ``torch.nn.functional.interpolate`` writes the result once. Keras stores a convolution
kernel as (kh, kw, in, out) and its torch backend permutes it to PyTorch's (out, in, kh, kw) on
every call; oneDNN and cuDNN then copy the strided view into a contiguous one, and the kernel's
gradient is copied back the other way: 120 ms of a 1.6 s training step on the CPU.
"""

from __future__ import annotations

import keras
from keras import layers

from xsight_keras.compat import (
    conv_kernel,
    in_stateless_scope,
    optimizer_slot_prefix,
    replace_torch_tensor,
    torch_tensor,
)


def _torch_fast_path(inputs) -> bool:
    """Whether a call on ``inputs`` can take a PyTorch fast path: torch backend, real tensors
    (not Keras' shape inference on "meta" tensors, which runs in a stateless scope)."""
    return keras.backend.backend() == "torch" and not in_stateless_scope()


_TORCH_KERNEL_ORDER = (3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
_KERAS_KERNEL_ORDER = (2, 3, 1, 0)  # and back


def in_memory_order(tensor):
    """A view of the torch ``tensor`` with its dimensions sorted by stride, largest first: a
    contiguous tensor for any dense layout (a kernel stored in PyTorch's order included), so it
    can be flattened, sent through a collective or walked by a fused kernel without a copy.
    Same elements, no data moved; ``tensor`` itself when it is already contiguous."""
    if tensor.is_contiguous():
        return tensor
    return tensor.permute(*sorted(range(tensor.ndim), key=lambda d: -tensor.stride(d)))


def store_kernel_in_torch_order(variable) -> bool:
    """Lay a 4-D Keras kernel variable out in memory in PyTorch's (out, in, kh, kw) order.

    ``variable``: a ``keras.Variable`` of shape (kh, kw, in, out). Its shape, values, saved form
    and every Keras API stay those of Keras; only the strides of the torch tensor behind it
    change, so that ``permute(3, 2, 0, 1)`` (what the torch backend's convolution does) is a
    contiguous tensor and the convolution reads it without a copy. Gradients, optimizer slots
    (see :func:`match_optimizer_layout`), ``assign`` and EMA copies keep those strides. Returns
    whether the layout changed (False on other backends, for symbolic or already laid-out
    variables). Call it before the variable is tracked by its layer (in ``build``).
    """
    if keras.backend.backend() != "torch" or len(variable.shape) != 4:
        return False
    value = torch_tensor(variable)
    if value is None or value.device.type == "meta":
        return False
    torch_order = value.detach().permute(*_TORCH_KERNEL_ORDER)
    if torch_order.is_contiguous():
        return False
    replace_torch_tensor(variable, torch_order.contiguous().permute(*_KERAS_KERNEL_ORDER))
    return True


def match_optimizer_layout(optimizer, variables) -> int:
    """Give each optimizer slot (Adam's moments, SGD's momentum, …) the memory layout of the
    model variable it belongs to; returns how many slots were re-laid.

    Keras creates slots as contiguous tensors. When a kernel is stored in PyTorch's order
    (:func:`store_kernel_in_torch_order`), every element-wise update between the contiguous slot
    and the strided gradient then walks memory out of order (about 100 ms a step for a ResNet34
    U-Net on the CPU); with matching layouts those updates are plain contiguous loops. Values are
    unchanged. ``optimizer`` must be built; a no-op on backends other than torch. The engine's
    optimizers (:class:`~xsight_keras.training.optimizers.FusedAdamW`) call it when they are
    built; call it yourself after ``optimizer.build(model.trainable_variables)`` for Keras' own
    optimizers. Slots are matched to variables by Keras' slot naming (``{variable.path}_{slot}``
    with ``/`` as ``_``) and shape.
    """
    if keras.backend.backend() != "torch" or not optimizer.built:
        return 0
    import torch

    strided = {}
    for v in variables:
        value = torch_tensor(v)
        if value is not None and len(v.shape) == 4 and not value.is_contiguous():
            strided[optimizer_slot_prefix(v)] = value
    changed = 0
    for slot in optimizer.variables:
        value = torch_tensor(slot)
        if value is None or len(slot.shape) != 4:
            continue
        owners = [p for p in strided if slot.name.startswith(p)
                  and strided[p].shape == value.shape]
        if not owners:
            continue
        target = strided[max(owners, key=len)]
        if value.stride() == target.stride():
            continue
        laid_out = torch.empty_like(target, dtype=value.dtype)  # same strides as the variable
        replace_torch_tensor(slot, laid_out.copy_(value.detach()))
        changed += 1
    return changed


@keras.saving.register_keras_serializable(package="xsight_keras")
class TorchOrderConv2D(layers.Conv2D):
    """``keras.layers.Conv2D`` whose kernel, on the torch backend, lies in memory in PyTorch's
    (out, in, kh, kw) order (:func:`store_kernel_in_torch_order`); Keras' own layer elsewhere.

    Same arguments, config, weights and outputs as ``keras.layers.Conv2D``: ``kernel.shape`` is
    (kh, kw, in, out) and ``get_weights`` / saved files hold that order on every backend. Only
    the convolution no longer copies its kernel on every call, nor its gradient on every step.
    """

    def build(self, input_shape):
        super().build(input_shape)
        store_kernel_in_torch_order(conv_kernel(self))


@keras.saving.register_keras_serializable(package="xsight_keras")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` with a fused fast path on the torch backend.

    The fast path is taken on the torch backend for eager tensors without a mask, renorm or
    synchronisation; everywhere else (JAX, TensorFlow, shape inference, stateless calls) the
    layer is exactly Keras' own. One documented difference on the fast path: the moving variance
    is updated with the unbiased batch variance (n / (n − 1) times the biased one), as PyTorch
    and torchvision do; Keras uses the biased one. With n = batch × height × width pixels per
    channel the two differ by less than 0.01 % at 128² tiles.

    Input and output: any float tensor with channels on ``axis``; under mixed precision the
    output has the layer's compute dtype and statistics stay float32.
    """

    def call(self, inputs, training=None, mask=None):
        if not _torch_fast_path(inputs) or mask is not None or self.renorm or self.synchronized:
            return super().call(inputs, training=training, mask=mask)
        return self._fused_call(inputs, bool(training and self.trainable))

    def _fused_call(self, inputs, training: bool):
        import torch
        from torch.nn import functional as F

        axis = self.axis % inputs.ndim
        x = inputs if axis == 1 else torch.movedim(inputs, axis, 1)
        outputs = F.batch_norm(
            x,
            self.moving_mean.value,
            self.moving_variance.value,
            self.gamma.value if self.scale else None,
            self.beta.value if self.center else None,
            training=training,
            momentum=1.0 - self.momentum,  # PyTorch weighs the new batch, Keras the old average
            eps=self.epsilon,
        )
        if axis != 1:
            outputs = torch.movedim(outputs, 1, axis)
        return outputs.to(inputs.dtype)


@keras.saving.register_keras_serializable(package="xsight_keras")
class FusedUpSampling2D(layers.UpSampling2D):
    """``keras.layers.UpSampling2D`` whose nearest / bilinear upsampling runs as one
    ``torch.nn.functional.interpolate`` on the torch backend (Keras' own code elsewhere).

    Input (B, H, W, C) or (B, C, H, W) per ``data_format``; output (B, H·sh, W·sw, C) or
    (B, C, H·sh, W·sw), same dtype; values identical to Keras' layer.
    """

    def call(self, inputs):
        if not _torch_fast_path(inputs) or self.interpolation not in ("nearest", "bilinear"):
            return super().call(inputs)
        from torch.nn import functional as F

        channels_last = self.data_format == "channels_last"
        x = inputs.permute(0, 3, 1, 2) if channels_last else inputs
        if self.interpolation == "nearest":
            x = F.interpolate(x, scale_factor=self.size, mode="nearest")
        else:  # Keras (and TF) resize with half-pixel centres, i.e. align_corners=False
            x = F.interpolate(x, scale_factor=self.size, mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1) if channels_last else x
