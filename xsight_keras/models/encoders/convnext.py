"""ConvNeXt encoders (Liu et al. 2022) in the torchvision layout: ``convnext_tiny``.

torchvision's ``features`` is a Sequential: ``features.0`` the stem (4×4 convolution, stride 4,
then LayerNorm over channels), ``features.1/3/5/7`` the four stages of CNBlocks and
``features.2/4/6`` the downsampling layers between them (LayerNorm, 2×2 convolution, stride 2).
A CNBlock is ``x + layer_scale · block(x)`` with ``block`` = 7×7 depthwise convolution
(``block.0``), LayerNorm (``block.2``), Linear to 4× the channels (``block.3``), exact (erf) GELU
(``block.4``), Linear back (``block.5``). Keras layer names are these module paths with ``.``
replaced by ``_`` and the prefix ``enc_`` (``features.1.0.block.3`` → ``enc_features_1_0_block_3``,
the parameter ``features.1.0.layer_scale`` → the layer ``enc_features_1_0_layer_scale``), so weight
import is a lookup. Features: the outputs of the four stages, at strides 4, 8, 16 and 32; there is
no stride-2 feature. The Linear layers are ``Dense`` layers under channels_last and 1×1
convolutions under channels_first; every LayerNorm computes in float32 under mixed precision.
Stochastic depth (torchvision trains with 0.1) is not applied: it is the identity at inference.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from xsight_keras.models.encoders.base import ENCODER_PREFIX, Checkpoint, Encoder
from xsight_keras.models.encoders.registry import register_encoder
from xsight_keras.models.fused_layers import TorchOrderConv2D
from xsight_keras.models.layers import channel_axis

_FEATURE_STRIDES = (4, 8, 16, 32)
_LAYER_SCALE = "_layer_scale"


@keras.saving.register_keras_serializable(package="xsight_keras")
class ChannelLayerNormalization(layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the channel axis alone, in either data format:
    torchvision's ``LayerNorm2d`` and the LayerNorm inside a CNBlock.

    Keras' torch backend passes a single axis that is not the last one to
    ``torch.nn.functional.layer_norm``, which normalises the *last* axis (an error, or wrong
    values when width equals channels). This layer moves channels last, normalises there and
    moves them back. Input and output: (B, H, W, C) or (B, C, H, W) per ``axis``; statistics are
    computed in float32 (Keras' layer norm does), the output has the layer's compute dtype.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-6, **kwargs):
        if isinstance(axis, (list, tuple)):  # get_config gives the built layer's [axis]
            if len(axis) != 1:
                raise ValueError(f"ChannelLayerNormalization takes one axis, got {axis}")
            axis = axis[0]
        super().__init__(axis=int(axis), epsilon=epsilon, **kwargs)

    def call(self, inputs):
        rank = len(inputs.shape)
        axis = self.axis[0] % rank
        if axis == rank - 1:
            return super().call(inputs)
        x = ops.moveaxis(inputs, axis, -1)
        x = ops.layer_normalization(x, self.gamma, self.beta, axis=-1, epsilon=self.epsilon)
        return ops.cast(ops.moveaxis(x, -1, axis), self.compute_dtype)


@keras.saving.register_keras_serializable(package="xsight_keras")
class LayerScale(layers.Layer):
    """Multiply every channel by its own learned factor (``gamma``, shape (C,), initialised to
    ``init_value``): ConvNeXt's ``layer_scale``. Channels on ``axis``; output shape and dtype of
    the input."""

    def __init__(self, init_value: float = 1e-6, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)
        self.axis = int(axis)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[self.axis],),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, inputs):
        shape = [1] * len(inputs.shape)
        shape[self.axis] = -1
        return inputs * ops.reshape(ops.cast(self.gamma, inputs.dtype), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value, "axis": self.axis}


def _layer_norm(name: str) -> ChannelLayerNormalization:
    return ChannelLayerNormalization(axis=channel_axis(), epsilon=1e-6, name=name)


def _pointwise(x, units: int, name: str):
    """torch ``nn.Linear`` over the channels: Dense (channels_last) or 1×1 convolution."""
    if channel_axis() == -1:
        return layers.Dense(units, name=name)(x)
    return TorchOrderConv2D(units, 1, name=name)(x)


def _cn_block(x, dim: int, name: str):
    out = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_block_0")(x)
    out = _layer_norm(f"{name}_block_2")(out)
    out = _pointwise(out, 4 * dim, f"{name}_block_3")
    out = layers.Activation("gelu", name=f"{name}_block_4")(out)  # exact (erf), as torch
    out = _pointwise(out, dim, f"{name}_block_5")
    out = LayerScale(axis=channel_axis(), name=f"{name}{_LAYER_SCALE}")(out)
    return layers.Add(name=f"{name}_add")([x, out])


class ConvNeXt(Encoder):
    """A torchvision ConvNeXt; features at strides 4, 8, 16, 32 with ``dims`` channels."""

    stem_module = "features.0.0"
    ignored_prefixes = ("classifier.",)

    def __init__(self, name: str, depths: tuple[int, ...], dims: tuple[int, ...],
                 imagenet: Checkpoint | None = None):
        super().__init__(name, dict(zip(_FEATURE_STRIDES, dims)), imagenet)
        self.depths = tuple(depths)
        self.dims = tuple(dims)

    def features(self, x, prefix: str = ENCODER_PREFIX) -> dict:
        """Strides 4, 8, 16, 32: the outputs of ``features.1``, ``.3``, ``.5``, ``.7``."""
        p = f"{prefix}features"
        x = TorchOrderConv2D(self.dims[0], 4, strides=4, name=f"{p}_0_0")(x)
        x = _layer_norm(f"{p}_0_1")(x)
        feats = {}
        for i, (stride, dim, depth) in enumerate(zip(_FEATURE_STRIDES, self.dims, self.depths)):
            stage = 2 * i + 1
            if i:
                x = _layer_norm(f"{p}_{stage - 1}_0")(x)
                x = TorchOrderConv2D(dim, 2, strides=2, name=f"{p}_{stage - 1}_1")(x)
            for j in range(depth):
                x = _cn_block(x, dim, f"{p}_{stage}_{j}")
            feats[stride] = x
        return feats

    def module_path(self, layer_name: str, prefix: str = ENCODER_PREFIX) -> str:
        """As for every encoder, except that a LayerScale layer maps to its block, which holds
        the ``layer_scale`` parameter (``enc_features_1_0_layer_scale`` → ``features.1.0``)."""
        return super().module_path(layer_name.removesuffix(_LAYER_SCALE), prefix)

    def import_values(self, layer, module, take):
        if isinstance(layer, LayerScale):
            return [take("layer_scale").reshape(-1)]  # torch keeps it as (C, 1, 1)
        return super().import_values(layer, module, take)


register_encoder(ConvNeXt(
    "convnext_tiny", depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
    imagenet=Checkpoint("https://download.pytorch.org/models/convnext_tiny-983f1562.pth", "983f1562"),
))
