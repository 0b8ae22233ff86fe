"""The options of a run configuration that name an object, each a :class:`Registry` that both
validates the setting (:func:`xsight_keras.config.validate_config`) and builds the object
(:mod:`xsight_keras.training.run`). Adding a model, loss, optimizer or schedule is one
registered constructor here.

Constructors take the :class:`~xsight_keras.config.RunConfig` (and what the engine knows only
at run time) and return the object:

- ``MODELS[name](config, stage)`` → ``keras.Model`` (``stage``: PGU-Net stage, else ignored)
- ``LOSSES[name](config, class_weights)`` → segmentation loss (``class_weights`` or ``None``)
- ``SCHEDULES[name](config, peak_lr, total_steps, steps_per_epoch)`` → learning rate
- ``OPTIMIZERS[name](config, learning_rate)`` → optimizer
- ``HEAD_LOSSES[name](data_format)`` → the loss a head declares (:attr:`xsight_keras.heads.Head.loss`)
"""

from __future__ import annotations

import keras

from xsight_keras.models import attention_unet, progressive_unet
from xsight_keras.registry import Registry
from xsight_keras.training.losses import (
    BCEDiceLoss,
    FocalLoss,
    HoverLoss,
    HybridLoss,
    InstanceLoss,
    SoftDiceLoss,
)
from xsight_keras.training.optimizers import FusedAdam, FusedAdamW
from xsight_keras.training.schedules import OneCycle, WarmupCosine

MODELS = Registry("model")
LOSSES = Registry("loss")
SCHEDULES = Registry("lr_schedule")
OPTIMIZERS = Registry("optimizer")
HEAD_LOSSES = Registry("head loss")


@MODELS.register("attention_unet")
def _attention_unet(config, stage=None):
    activation = "sigmoid" if config.num_classes == 1 else "softmax"
    return attention_unet(config.num_classes, config.encoder, config.encoder_weights,
                          config.decoder_filters, config.dropout, activation, config.in_channels,
                          instance_head=config.instance_head, heads=config.heads,
                          head_branch_stages=config.head_branch_stages,
                          data_format=config.data_format)


@MODELS.register("progressive_unet")
def _progressive_unet(config, stage=None, fade_in=False):
    return progressive_unet(stage or config.stages[0], config.in_channels, config.num_classes,
                            base_filters=config.base_filters, dropout=config.dropout,
                            instance_head=config.instance_head, heads=config.heads,
                            data_format=config.data_format, fade_in=fade_in)


def _axis(config) -> int:
    return -1 if config.data_format == "channels_last" else 1


LOSSES.register("hybrid", lambda c, w: HybridLoss(
    c.dice_weight, c.focal_weight, c.boundary_weight, w, c.focal_gamma, c.focal_alpha,
    data_format=c.data_format))
LOSSES.register("dice", lambda c, w: SoftDiceLoss(data_format=c.data_format))
LOSSES.register("fw_dice", lambda c, w: SoftDiceLoss(w, data_format=c.data_format, name="fw_dice"))
LOSSES.register("focal", lambda c, w: FocalLoss(c.focal_gamma, c.focal_alpha,
                                                data_format=c.data_format))
LOSSES.register("ce", lambda c, w: keras.losses.CategoricalCrossentropy(axis=_axis(c)))
LOSSES.register("bce_dice", lambda c, w: BCEDiceLoss(data_format=c.data_format))

HEAD_LOSSES.register("distance_contour", lambda data_format: InstanceLoss(data_format=data_format))
HEAD_LOSSES.register("hover", lambda data_format: HoverLoss(data_format=data_format))

SCHEDULES.register("onecycle", lambda c, peak, total, steps: OneCycle(peak, total))
SCHEDULES.register("warmup_cosine", lambda c, peak, total, steps: WarmupCosine(
    peak, total, c.warmup_epochs * steps, c.min_lr_factor))
SCHEDULES.register("constant", lambda c, peak, total, steps: peak)


@OPTIMIZERS.register("adamw")
def _adamw(config, learning_rate):
    opt = FusedAdamW(learning_rate=learning_rate, weight_decay=config.weight_decay,
                     global_clipnorm=config.grad_clip_val or None)
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])  # no decay on BN/bias
    return opt


@OPTIMIZERS.register("adam")
def _adam(config, learning_rate):
    return FusedAdam(learning_rate=learning_rate, global_clipnorm=config.grad_clip_val or None)


def head_loss(head, data_format: str | None = None):
    """The loss object a head declares (:attr:`xsight_keras.heads.Head.loss`)."""
    return HEAD_LOSSES.build(head.loss, data_format)


__all__ = ["HEAD_LOSSES", "LOSSES", "MODELS", "OPTIMIZERS", "SCHEDULES", "head_loss"]
