"""Building blocks shared by the model families.

Every block is a function on Keras tensors that creates layers with stable names derived from
``name``, so weights can be matched by name between models (PGU-Net growth, checkpoint import).
All blocks follow ``keras.config.image_data_format()``.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from xsight_keras.models.fused_layers import FusedBatchNormalization, TorchOrderConv2D


def channel_axis() -> int:
    """Axis of channels for the current image data format: -1 (NHWC) or 1 (NCHW)."""
    return -1 if keras.config.image_data_format() == "channels_last" else 1


def spatial_axes() -> tuple[int, int]:
    """Axes of (height, width) for the current image data format, batch axis included."""
    return (1, 2) if keras.config.image_data_format() == "channels_last" else (2, 3)


def image_input(input_channels: int, input_size: tuple[int, int] | None = None, name="image"):
    """A ``keras.Input`` for images in the current data format; ``input_size`` (H, W) or any size."""
    h, w = input_size if input_size is not None else (None, None)
    if keras.config.image_data_format() == "channels_first":
        return keras.Input(shape=(input_channels, h, w), name=name)
    return keras.Input(shape=(h, w, input_channels), name=name)


def batch_norm(name: str) -> FusedBatchNormalization:
    """BatchNorm on the channel axis with PyTorch's defaults (momentum 0.1, eps 1e-5).

    The defaults match torchvision so that imported ImageNet statistics behave as they did there.
    The layer runs PyTorch's fused kernel on the torch backend (:mod:`.fused_layers`).
    """
    return FusedBatchNormalization(axis=channel_axis(), momentum=0.9, epsilon=1e-5, name=name)


def conv_bn_relu(x, filters: int, name: str, kernel_size: int = 3):
    """3×3 (or ``kernel_size``) convolution without bias, BatchNorm, ReLU; stride 1, same padding.

    Layers: ``{name}_conv``, ``{name}_bn``, ``{name}_relu``. Spatial size is unchanged.
    """
    x = TorchOrderConv2D(filters, kernel_size, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = batch_norm(f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def attention_gate(skip, gating, inter_channels: int, name: str):
    """Additive attention gate (Oktay et al., "Attention U-Net", MIDL 2018).

    ``skip`` (B, H, W, Cs) is the encoder feature map, ``gating`` (B, H, W, Cg) the decoder
    feature map already brought to the same resolution. Returns ``skip`` scaled by a per-pixel
    coefficient in (0, 1): ``skip * sigmoid(psi(relu(Wx·skip + Wg·gating)))``, shape of ``skip``.
    """
    theta = TorchOrderConv2D(inter_channels, 1, use_bias=False, name=f"{name}_theta")(skip)
    theta = batch_norm(f"{name}_theta_bn")(theta)
    phi = TorchOrderConv2D(inter_channels, 1, use_bias=True, name=f"{name}_phi")(gating)
    phi = batch_norm(f"{name}_phi_bn")(phi)
    act = layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta, phi]))
    psi = TorchOrderConv2D(1, 1, use_bias=True, name=f"{name}_psi")(act)
    psi = batch_norm(f"{name}_psi_bn")(psi)
    alpha = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi)
    return layers.Multiply(name=f"{name}_scale")([skip, alpha])


def output_activation(activation: str, name: str) -> layers.Layer:
    """Final ``softmax`` (over the channel axis) or ``sigmoid`` layer, computed in float32.

    Running the last activation in float32 keeps probabilities and losses stable under
    ``mixed_float16`` / ``mixed_bfloat16`` policies.
    """
    if activation == "softmax":
        return layers.Softmax(axis=channel_axis(), dtype="float32", name=name)
    if activation == "sigmoid":
        return layers.Activation("sigmoid", dtype="float32", name=name)
    if activation in (None, "linear"):
        return layers.Activation("linear", dtype="float32", name=name)
    raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")


@keras.saving.register_keras_serializable(package="xsight_keras")
class SpatialSizeCheck(layers.Layer):
    """Identity layer that rejects images whose height or width is not a multiple of ``multiple``.

    Encoder–decoder networks halve the resolution several times and concatenate skips; an input
    that does not divide evenly would fail deep inside the network with an obscure shape error.
    This layer raises a ``ValueError`` that names the size and the requirement instead. It checks
    at build time when the input shape is fixed, and on every call when the backend gives concrete
    shapes (PyTorch eager, JAX).
    """

    def __init__(self, multiple: int, data_format: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.multiple = int(multiple)
        self.data_format = data_format or keras.config.image_data_format()

    def _check(self, shape) -> None:
        h_axis, w_axis = (1, 2) if self.data_format == "channels_last" else (2, 3)
        size = (shape[h_axis], shape[w_axis])
        for dim in size:
            if isinstance(dim, int) and dim % self.multiple:
                raise ValueError(
                    f"{self.name}: input height and width must be multiples of {self.multiple}, "
                    f"got {size[0]}×{size[1]}. Pad or crop the image (the sliding-window "
                    f"predictor does this for whole images)."
                )

    def build(self, input_shape):
        self._check(tuple(input_shape))

    def call(self, inputs):
        self._check(tuple(ops.shape(inputs)))
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "multiple": self.multiple,
            "data_format": self.data_format,
        }
