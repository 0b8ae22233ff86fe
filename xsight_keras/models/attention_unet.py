"""Attention U-Net (Oktay et al. 2018) on any registered encoder, as a Functional Keras model."""

from __future__ import annotations

import os

import keras
from keras import layers

from xsight_keras.heads import SEMANTIC, extra_heads
from xsight_keras.models.base import SegmentationModel
from xsight_keras.models.encoders import get_encoder
from xsight_keras.models.fused_layers import FusedUpSampling2D, TorchOrderConv2D
from xsight_keras.models.layers import (
    SpatialSizeCheck,
    attention_gate,
    channel_axis,
    conv_bn_relu,
    image_input,
    output_activation,
)

#: Every input height and width must be a multiple of this (five 2× downsamplings).
SIZE_MULTIPLE = 32


def attention_unet(
    num_classes: int,
    encoder: str = "resnet34",
    encoder_weights: str | os.PathLike | None = None,
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16),
    dropout: float = 0.0,
    activation: str | None = "softmax",
    input_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    name: str | None = None,
    instance_head: bool = False,
    heads: tuple[str, ...] = (),
    head_branch_stages: int = 0,
    data_format: str | None = None,
) -> AttentionUNet:
    """Build an Attention U-Net on the encoder ``encoder`` (any name in ``available_encoders()``).

    Input: float images (B, H, W, ``input_channels``), or (B, ``input_channels``, H, W) in
    ``channels_first`` (the default on torch),
    typically CLAHE + z-score normalised; H and W multiples of 32, checked with a clear error.
    Output: (B, H, W, ``num_classes``) float32 probabilities (``softmax`` over classes or
    per-channel ``sigmoid``; ``None`` gives logits), whatever the mixed-precision policy.

    The five decoder stages each upsample 2× (nearest), gate the encoder skip of that stride with
    an additive attention gate driven by the upsampled decoder features, concatenate, and apply
    two 3×3 conv+BN+ReLU (``dec{i}_block1``, ``dec{i}_block2``) with ``decoder_filters[i-1]``
    filters, then optional dropout. The last stage (stride 1) has no skip, nor has a stage whose
    stride the encoder does not provide (e.g. stride 2 for ConvNeXt).
    ``encoder_weights``: ``None``, ``"imagenet"`` or a torchvision ``.pth``/``.safetensors`` file.
    ``instance_head=True`` adds the instance head and makes the outputs a dict keyed by head
    name (:mod:`xsight_keras.heads`): the class map above and the instance head's (B, H, W, 2)
    float32 maps in [0, 1] (normalised distance, contour) that separate touching nuclei;
    ``heads`` adds further declared heads by name.
    ``head_branch_stages`` (0–5): how many of the last decoder stages each extra head gets a copy
    of (layers prefixed ``{head}_``, e.g. ``hv_dec5_block1``), as HoVer-Net gives each output its
    own decoder branch; 0 shares the whole decoder (the heads read the last stage's features).
    ``data_format``: ``channels_first``/``channels_last``; ``None`` is the backend's fast layout
    (:func:`xsight_keras.models.base.default_data_format`). The model is an
    :class:`AttentionUNet` and keeps these arguments (``model.arguments``, ``get_config()``).
    """
    model = AttentionUNet(num_classes=num_classes, encoder=encoder, decoder_filters=decoder_filters,
                          dropout=dropout, activation=activation, input_channels=input_channels,
                          input_size=input_size, instance_head=instance_head, heads=heads,
                          head_branch_stages=head_branch_stages, data_format=data_format,
                          name=name)
    if encoder_weights is not None:
        get_encoder(encoder).load_weights(model, encoder_weights)
    return model


@keras.saving.register_keras_serializable(package="xsight_keras")
class AttentionUNet(SegmentationModel):
    """The Attention U-Net built by :func:`attention_unet` (which also imports encoder weights);
    its configuration is the builder's arguments."""

    family = "attention_unet"
    ARGUMENTS = {"num_classes": 6, "encoder": "resnet34",
                 "decoder_filters": (256, 128, 64, 32, 16), "dropout": 0.0,
                 "activation": "softmax", "input_channels": 3, "input_size": None,
                 "instance_head": False, "heads": (), "head_branch_stages": 0}

    def _default_name(self, encoder, **arguments) -> str:
        return f"attention_unet_{encoder}"

    def _graph(self, num_classes, encoder, decoder_filters, dropout, activation, input_channels,
               input_size, instance_head, heads, head_branch_stages):
        if len(decoder_filters) != 5:
            raise ValueError(f"decoder_filters needs 5 entries (one per stride), got {decoder_filters}")
        if input_channels not in (1, 3):
            raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= head_branch_stages <= 5:
            raise ValueError(f"head_branch_stages must be in [0, 5], got {head_branch_stages}")
        inputs = image_input(input_channels, input_size)
        x = SpatialSizeCheck(SIZE_MULTIPLE, name="size_check")(inputs)
        backbone = get_encoder(encoder)
        features = backbone.features(x)  # {stride: tensor}, always stride 32
        skips = [features.get(s) for s in (16, 8, 4, 2)] + [None]  # none at full resolution
        skip_channels = [backbone.channels.get(s) for s in (16, 8, 4, 2)] + [None]
        stages = list(enumerate(zip(decoder_filters, skips, skip_channels), 1))
        shared = 5 - head_branch_stages

        def decode(d, selected, prefix=""):
            for i, (filters, skip, channels) in selected:
                d = FusedUpSampling2D(2, interpolation="nearest", name=f"{prefix}dec{i}_up")(d)
                if skip is not None:
                    gated = attention_gate(skip, d, max(channels // 2, 8), name=f"{prefix}dec{i}_att")
                    d = layers.Concatenate(axis=channel_axis(), name=f"{prefix}dec{i}_concat")([d, gated])
                d = conv_bn_relu(d, filters, f"{prefix}dec{i}_block1")
                d = conv_bn_relu(d, filters, f"{prefix}dec{i}_block2")
                if dropout:
                    d = layers.Dropout(dropout, name=f"{prefix}dec{i}_dropout")(d)
            return d

        trunk = decode(features[32], stages[:shared])
        d = decode(trunk, stages[shared:])
        logits = TorchOrderConv2D(num_classes, 1, name="head_conv")(d)
        outputs = output_activation(activation, name="probabilities")(logits)
        extra = extra_heads(instance_head, heads)
        if extra:
            branches = {h.name: decode(trunk, stages[shared:], f"{h.name}_") if head_branch_stages
                        else d for h in extra}
            outputs = {SEMANTIC: outputs,
                       **{h.name: h.build(branches[h.name], decoder_filters[-1]) for h in extra}}
        return inputs, outputs
