"""Learning-rate schedules that save with the optimizer (``LearningRateSchedule`` subclasses)."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="xsight_keras")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle policy (Smith & Topin 2019), cosine in both phases, as in PyTorch's OneCycleLR.

    From ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start`` of ``total_steps``,
    then down to ``max_lr / (div_factor · final_div_factor)`` at ``total_steps`` (and after).
    """

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        up = max(self.pct_start * self.total_steps - 1, 1.0)
        down = max(self.total_steps - 1 - up, 1.0)

        def cosine(start, end, frac):
            frac = ops.clip(frac, 0.0, 1.0)
            return end + (start - end) * 0.5 * (1 + ops.cos(math.pi * frac))

        return ops.where(step <= up, cosine(initial, self.max_lr, step / up),
                         cosine(self.max_lr, final, (step - up) / down))

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


@keras.saving.register_keras_serializable(package="xsight_keras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr_factor · lr`` at ``total_steps`` (constant after)."""

    def __init__(self, lr, total_steps, warmup_steps=0, min_lr_factor=0.01):
        self.lr = float(lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_factor = float(min_lr_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = max(self.warmup_steps, 1)
        warmup = self.lr * (step + 1) / warm
        span = max(self.total_steps - self.warmup_steps, 1)
        frac = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        floor = self.lr * self.min_lr_factor
        decay = floor + (self.lr - floor) * 0.5 * (1 + ops.cos(math.pi * frac))
        return ops.where(step < self.warmup_steps, warmup, decay)

    def get_config(self):
        return {"lr": self.lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr_factor": self.min_lr_factor}
