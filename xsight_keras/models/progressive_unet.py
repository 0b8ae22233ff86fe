"""Progressive Growing U-Net (PGU-Net; Zhao et al., MICCAI 2019 workshops) with multi-scale outputs.

Stage k (1–4) works natively at 32·2^(k-1) px (32, 64, 128, 256) and has k encoder/decoder
levels. Levels are numbered from the innermost: level 1, next to the bottleneck, exists in every
stage; stage k adds level k on the high-resolution side, like PGGAN adds layers on the image side.
Each level keeps its layer names and shapes across stages, so :func:`grow` copies every trained
level into the next stage and only the new outer level (and its 1×1 image stem) start fresh.

Layout of stage k on an input of H×W (H, W multiples of 2^k):

    image ─ stem{k} (1×1) ─ enc{k} ─ pool ─ … ─ enc1 ─ pool ─ bottleneck (H/2^k)
                               │                   │             │
    scale_1 ◀ head ◀ dec{k} ◀──┘ … scale_{2^(k-1)} ◀ head ◀ dec1 ◀┘ (upsample + concat skip)
    fused = activation(mean of every level's logits upsampled to H×W)

Level j has ``base_filters · 2^(4-j)`` filters (256, 128, 64, 32 for base 32), the bottleneck
``16 · base_filters``. The fusion has no weights, so every weight of stage k lives on in stage k+1.
"""

from __future__ import annotations

import keras
from keras import layers

from xsight_keras.heads import FUSED, INSTANCE, extra_heads, scale_output
from xsight_keras.models.base import SegmentationModel
from xsight_keras.models.fade_in import FadeIn, FadeInMean, fade_alpha, set_fade
from xsight_keras.models.fused_layers import FusedUpSampling2D, TorchOrderConv2D
from xsight_keras.models.layers import (
    SpatialSizeCheck,
    channel_axis,
    conv_bn_relu,
    image_input,
    output_activation,
)
from xsight_keras.models.transfer import transfer_weights

STAGE_RESOLUTIONS = {1: 32, 2: 64, 3: 128, 4: 256}
MAX_STAGE = 4


def level_filters(level: int, base_filters: int) -> int:
    """Filters of level ``level`` (1 = innermost); level 5 is the width a stage-4 stem emits."""
    return max(int(base_filters * 2.0 ** (MAX_STAGE - level)), 1)


def _default_activation(num_classes: int) -> str:
    return "sigmoid" if num_classes == 1 else "softmax"


def progressive_unet(
    stage: int,
    in_channels: int = 3,
    num_classes: int = 1,
    base_filters: int = 32,
    dropout: float = 0.0,
    activation: str | None = "auto",
    input_size: tuple[int, int] | None = None,
    instance_head: bool = False,
    heads: tuple[str, ...] = (),
    data_format: str | None = None,
    fade_in: int = 0,
) -> ProgressiveUNet:
    """Build PGU-Net stage ``stage`` (1–4).

    Input: float images (B, H, W, ``in_channels``) with ``in_channels`` 1 (grayscale) or 3 (RGB);
    H and W multiples of 2^stage (native size ``STAGE_RESOLUTIONS[stage]``).
    Output: a dict of float32 maps with ``num_classes`` channels: ``fused`` at H×W and
    ``scale_{s}`` at H/s×W/s for s = 1, 2, …, 2^(stage-1) (one per decoder level), so
    ``compile(loss={...}, loss_weights={...})`` can supervise every scale. ``activation="auto"``
    is sigmoid for one class (binary masks) and softmax otherwise. Use :func:`inference_view`
    for a model that returns only the fused map. ``instance_head=True`` adds the instance head
    (H×W, 2 channels: normalised distance, contour; :mod:`xsight_keras.heads`) from the finest decoder level; its weights
    are new at each stage (its input width changes), everything else transfers; ``heads``
    adds further declared heads by name. ``data_format``: ``None`` is the backend's fast layout
    (:func:`xsight_keras.models.base.default_data_format`). ``fade_in=N`` (stage ≥ 2) adds
    the previous stage's image stem on the 2×-downsampled image and blends the new outer level
    in over the first N training steps (:mod:`xsight_keras.models.fade_in`); 0: no fade-in
    branch. The model is a
    :class:`ProgressiveUNet` and keeps these arguments (``model.arguments``), which
    :func:`grow` reads.
    """
    return ProgressiveUNet(stage=stage, in_channels=in_channels, num_classes=num_classes,
                           base_filters=base_filters, dropout=dropout, activation=activation,
                           input_size=input_size, instance_head=instance_head, heads=heads,
                           data_format=data_format, fade_in=fade_in)


@keras.saving.register_keras_serializable(package="xsight_keras")
class ProgressiveUNet(SegmentationModel):
    """PGU-Net stage ``stage`` as built by :func:`progressive_unet`; its configuration is the
    builder's arguments (``activation`` resolved: ``"auto"`` is stored as what it chose)."""

    family = "progressive_unet"
    ARGUMENTS = {"stage": 1, "in_channels": 3, "num_classes": 1, "base_filters": 32,
                 "dropout": 0.0, "activation": "auto", "input_size": None,
                 "instance_head": False, "heads": (), "fade_in": 0}

    def __init__(self, **arguments):
        if arguments.get("activation", "auto") == "auto":
            arguments["activation"] = _default_activation(arguments.get("num_classes", 1))
        super().__init__(**arguments)

    def _default_name(self, stage, **arguments) -> str:
        return f"progressive_unet_stage{stage}"

    def _graph(self, stage, in_channels, num_classes, base_filters, dropout, activation,
               input_size, instance_head, heads, fade_in):
        if stage not in STAGE_RESOLUTIONS:
            raise ValueError(f"stage must be one of 1, 2, 3, 4, got {stage}")
        if fade_in and stage == 1:
            raise ValueError("fade_in blends a new level into the previous stage: stage 1 has none")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if activation == "auto":
            activation = _default_activation(num_classes)
        axis = channel_axis()
        inputs = image_input(in_channels, input_size)
        image = SpatialSizeCheck(2**stage, name="size_check")(inputs)
        x = conv_bn_relu(image, level_filters(stage + 1, base_filters), f"stem{stage}", kernel_size=1)
        skips = {}
        for level in range(stage, 0, -1):
            x = conv_bn_relu(x, level_filters(level, base_filters), f"enc{level}_block1")
            x = conv_bn_relu(x, level_filters(level, base_filters), f"enc{level}_block2")
            skips[level] = x
            x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
            if fade_in and level == stage:  # what stage-1 fed this level: its stem on the image/2
                old = layers.AveragePooling2D(2, name="fade_pool")(image)
                old = conv_bn_relu(old, level_filters(stage, base_filters), f"stem{stage - 1}",
                                   kernel_size=1)
                x = FadeIn(fade_in, name="fade_in_input")([old, x])
        x = conv_bn_relu(x, 16 * base_filters, "bottleneck_block1")
        x = conv_bn_relu(x, 16 * base_filters, "bottleneck_block2")
        if dropout:
            x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
        outputs, fused_inputs = {}, []
        for level in range(1, stage + 1):
            x = FusedUpSampling2D(2, interpolation="nearest", name=f"dec{level}_up")(x)
            x = layers.Concatenate(axis=axis, name=f"dec{level}_concat")([x, skips[level]])
            x = conv_bn_relu(x, level_filters(level, base_filters), f"dec{level}_block1")
            x = conv_bn_relu(x, level_filters(level, base_filters), f"dec{level}_block2")
            logits = TorchOrderConv2D(num_classes, 1, name=f"dec{level}_head")(x)
            scale = 2 ** (stage - level)
            outputs[scale_output(scale)] = output_activation(activation, name=scale_output(scale))(logits)
            if scale > 1:
                logits = FusedUpSampling2D(
                    scale, interpolation="bilinear", name=f"fuse_up{scale}"
                )(logits)
            fused_inputs.append(logits)
        if stage == 1:
            fused = fused_inputs[0]
        elif fade_in:  # the new (finest) level's logits come last
            fused = FadeInMean(fade_in, name="fade_in_output")(fused_inputs)
        else:
            fused = layers.Average(name="fuse_mean")(fused_inputs)
        outputs = {FUSED: output_activation(activation, name=FUSED)(fused), **outputs}
        for head in extra_heads(instance_head, heads):
            outputs[head.name] = head.build(x, level_filters(stage, base_filters))
        return inputs, outputs


def progressive_unet_spec(model: keras.Model) -> dict:
    """The :func:`progressive_unet` arguments of a PGU-Net model: ``model.arguments`` for a
    :class:`ProgressiveUNet`; recovered from the layers of a plain Functional PGU-Net (a
    ``.keras`` file saved before models kept their configuration)."""
    if isinstance(model, ProgressiveUNet):
        return model.arguments
    names = {layer.name: layer for layer in model.layers}
    stage = sum(1 for n in names if n.startswith("dec") and n.endswith("_head"))
    if stage not in STAGE_RESOLUTIONS or FUSED not in names:
        raise ValueError(f"model {model.name!r} is not a progressive_unet (no dec*_head/fused layers)")
    fused = names[FUSED]
    if isinstance(fused, layers.Softmax):
        activation = "softmax"
    else:
        activation = keras.activations.serialize(fused.activation)
        activation = None if activation == "linear" else activation
    dropout = names["bottleneck_dropout"].rate if "bottleneck_dropout" in names else 0.0
    conv = names["enc1_block1_conv"]
    axis = -1 if conv.data_format == "channels_last" else 1
    return {
        "stage": stage,
        "in_channels": int(model.inputs[0].shape[axis]),
        "num_classes": int(names["dec1_head"].filters),
        "base_filters": int(conv.filters) // 2 ** (MAX_STAGE - 1),
        "dropout": float(dropout),
        "activation": activation,
        "data_format": conv.data_format,
        "instance_head": INSTANCE in names,
    }


def grow(model: keras.Model, **overrides) -> keras.Model:
    """Return PGU-Net stage k+1 built like ``model`` (stage k) with every shared weight copied.

    Layers present in both stages (matched by name and shape: all levels 1…k and the bottleneck)
    receive ``model``'s weights; the new outer level ``k+1`` and its stem start from a fresh
    initialisation. ``overrides`` change builder arguments (e.g. ``dropout``); with
    ``fade_in=N`` stage k's stem keeps its weights on the downsampled image and the new level
    fades in over the first N training steps (:mod:`xsight_keras.models.fade_in`).
    """
    if isinstance(model, ProgressiveUNet):
        spec = model.arguments  # stage, widths, heads, data format and dtype policy as built
    else:  # a model saved before models kept their configuration: read it from the layers
        spec = progressive_unet_spec(model)
    if spec["stage"] >= MAX_STAGE:
        raise ValueError(f"model is already stage {MAX_STAGE}, the last PGU-Net stage")
    spec.update({"fade_in": 0, **overrides}, stage=spec["stage"] + 1)
    grown = ProgressiveUNet(**spec)
    transfer_weights(model, grown)
    set_fade(grown, 0.0)
    return grown


def settle(model: keras.Model) -> keras.Model:
    """The plain PGU-Net stage of a model that has faded its new level in (``fade_in``, now at
    ``alpha`` 1): the same weights without the fade-in branch, the same outputs. A model that
    is not fading is returned as it is. Raises ``ValueError`` while ``alpha`` < 1."""
    alpha = fade_alpha(model)
    if alpha is None or not isinstance(model, ProgressiveUNet):
        return model
    if alpha < 1.0:
        raise ValueError(f"{model.name} is still fading its new level in (alpha {alpha:g})")
    plain = ProgressiveUNet(**{**model.arguments, "fade_in": 0})
    transfer_weights(model, plain)
    return plain


def inference_view(model: keras.Model) -> keras.Model:
    """A model sharing ``model``'s weights that returns only the ``fused`` map (a tensor)."""
    return keras.Model(model.inputs, model.get_layer(FUSED).output, name=f"{model.name}_fused")
