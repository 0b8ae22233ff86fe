"""ResNet encoders (He et al. 2016) in the torchvision layout: ``resnet18``, ``resnet34``, ``resnet50``.

Layer names mirror torchvision's module paths with ``.`` replaced by ``_`` and the prefix
``enc_``: ``layer2.0.downsample.1`` is the Keras layer ``enc_layer2_0_downsample_1``, so importing
a torchvision ``state_dict`` is a lookup by name. Features at strides 2 (the stem after ReLU), 4,
8, 16 and 32 (the outputs of ``layer1`` … ``layer4``).
"""

from __future__ import annotations

import os

import keras
from keras import layers

from xsight_keras.models.encoders.base import ENCODER_PREFIX, Checkpoint, Encoder
from xsight_keras.models.encoders.registry import get_encoder, register_encoder
from xsight_keras.models.fused_layers import TorchOrderConv2D
from xsight_keras.models.layers import batch_norm, channel_axis

# name -> (block type, blocks per stage)
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_EXPANSION = {"basic": 1, "bottleneck": 4}
# Known torchvision ImageNet checkpoints (file names in the torch hub cache).
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
_SHA256_PREFIXES = {"resnet18": "f37072fd", "resnet34": "b627a593", "resnet50": "0676ba61"}


def _conv(x, filters, kernel_size, strides, name):
    """Convolution padded like PyTorch's (symmetric ``kernel_size // 2``), no bias."""
    pad = kernel_size // 2
    if strides == 1:
        return TorchOrderConv2D(filters, kernel_size, padding="same", use_bias=False, name=name)(x)
    if pad:
        # Keras "same" pads asymmetrically for stride 2; torchvision pads both sides.
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return TorchOrderConv2D(filters, kernel_size, strides=strides, use_bias=False, name=name)(x)


def _residual_out(x, residual, out_channels, strides, name):
    """Add the (projected when the shape changes) input to the residual branch, then ReLU."""
    shortcut = x
    if strides != 1 or x.shape[channel_axis()] != out_channels:
        shortcut = _conv(x, out_channels, 1, strides, f"{name}_downsample_0")
        shortcut = batch_norm(f"{name}_downsample_1")(shortcut)
    out = layers.Add(name=f"{name}_add")([residual, shortcut])
    return layers.ReLU(name=f"{name}_out")(out)


def _basic_block(x, width, strides, name):
    out = _conv(x, width, 3, strides, f"{name}_conv1")
    out = layers.ReLU(name=f"{name}_relu1")(batch_norm(f"{name}_bn1")(out))
    out = _conv(out, width, 3, 1, f"{name}_conv2")
    return _residual_out(x, batch_norm(f"{name}_bn2")(out), width, strides, name)


def _bottleneck_block(x, width, strides, name):
    out_channels = width * _EXPANSION["bottleneck"]
    out = _conv(x, width, 1, 1, f"{name}_conv1")
    out = layers.ReLU(name=f"{name}_relu1")(batch_norm(f"{name}_bn1")(out))
    out = _conv(out, width, 3, strides, f"{name}_conv2")  # stride on the 3×3 (ResNet v1.5)
    out = layers.ReLU(name=f"{name}_relu2")(batch_norm(f"{name}_bn2")(out))
    out = _conv(out, out_channels, 1, 1, f"{name}_conv3")
    return _residual_out(x, batch_norm(f"{name}_bn3")(out), out_channels, strides, name)


class ResNet(Encoder):
    """A torchvision ResNet with basic or bottleneck blocks; features at strides 2–32."""

    stem_module = "conv1"
    ignored_prefixes = ("fc.",)

    def __init__(self, name: str, block: str, repeats: tuple[int, int, int, int],
                 imagenet: Checkpoint | None = None):
        e = _EXPANSION[block]
        channels = dict(zip((2, 4, 8, 16, 32), (64,) + tuple(w * e for w in _STAGE_WIDTHS)))
        super().__init__(name, channels, imagenet)
        self.block = block
        self.repeats = tuple(repeats)

    def features(self, x, prefix: str = ENCODER_PREFIX) -> dict:
        """Stride 2: the stem (``conv1``, ``bn1``, ReLU); strides 4–32: ``layer1`` … ``layer4``."""
        block = _basic_block if self.block == "basic" else _bottleneck_block
        x = _conv(x, 64, 7, 2, f"{prefix}conv1")
        x = layers.ReLU(name=f"{prefix}relu")(batch_norm(f"{prefix}bn1")(x))
        features = {2: x}
        # Zero padding equals PyTorch's -inf padding here because the input is post-ReLU (>= 0).
        x = layers.ZeroPadding2D(1, name=f"{prefix}maxpool_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name=f"{prefix}maxpool")(x)
        for stage, (width, n) in enumerate(zip(_STAGE_WIDTHS, self.repeats), start=1):
            for i in range(n):
                strides = 2 if (i == 0 and stage > 1) else 1
                x = block(x, width, strides, f"{prefix}layer{stage}_{i}")
            features[2 ** (stage + 1)] = x
        return features


for _name, (_block, _repeats) in RESNET_SPECS.items():
    register_encoder(ResNet(_name, _block, _repeats,
                            Checkpoint(TORCHVISION_URLS[_name], _SHA256_PREFIXES[_name])))


def _resnet(encoder: str) -> ResNet:
    if encoder not in RESNET_SPECS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(RESNET_SPECS)}")
    return get_encoder(encoder)


def resnet_features(x, encoder: str = "resnet34", prefix: str = ENCODER_PREFIX) -> list:
    """Apply a ResNet to the image tensor ``x`` and return its five skip features.

    ``x``: (B, H, W, C) (or (B, C, H, W) under channels_first), H and W multiples of 32.
    Returns feature maps at strides 2, 4, 8, 16, 32 with ``encoder_channels(encoder)`` channels:
    the stem after ReLU, then the outputs of ``layer1`` … ``layer4``. Kept for user code; the
    builders call ``get_encoder(encoder).features(x)``, which gives them by stride.
    """
    return list(_resnet(encoder).features(x, prefix).values())


def resnet_encoder(
    encoder: str = "resnet34",
    input_channels: int = 3,
    weights: str | os.PathLike | None = None,
) -> keras.Model:
    """Build a ResNet encoder as a Functional model on (None, None, C) images.

    Returns a ``keras.Model`` whose outputs are the five skip features at strides 2, 4, 8, 16,
    32 (see :func:`resnet_features`). ``weights``: ``None`` (random init), ``"imagenet"`` (a
    torchvision checkpoint in the torch hub cache) or a path to a ``.pth`` / ``.safetensors`` file.
    """
    return _resnet(encoder).build(input_channels, weights)
