"""Fading a new PGU-Net level in (PGGAN's fade-in, Karras et al., ICLR 2018).

When PGU-Net grows from stage k to k+1, a fresh outer level (1×1 stem, encoder and decoder
blocks, head) wraps the trained network. Switched on at once, its random features replace what
the trained encoder was fed and its random logits enter the fused map, and the validation score
falls (measured on the Pap-smear set; README, "Real data (Pap-smear)"). These layers blend the
new level in with a weight ``alpha`` that rises linearly from 0 to 1 over the first ``steps``
training steps: at ``alpha = 0`` stage k+1 computes what stage k computed (on the image
downsampled 2×), at ``alpha = 1`` it is the plain stage k+1.

Each layer counts its own training-mode calls in a non-trainable weight (``progress``), as
BatchNorm keeps its statistics, so the fade follows the optimizer steps on every backend (inside
JAX's compiled step too), resumes with the weights, and a checkpoint saved while fading predicts
as the network was at that step. :func:`~xsight_keras.training.callbacks.update_batch_norm`
restores the counters after its extra training-mode passes.
"""

from __future__ import annotations

import keras
from keras import layers, ops


class _Fade(layers.Layer):
    """Holds ``progress`` (float32 scalar, training steps seen) and fades over ``steps`` steps."""

    def __init__(self, steps: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.steps = max(int(steps), 1)

    def build(self, input_shape):
        self.progress = self.add_weight(name="progress", shape=(), initializer="zeros",
                                        trainable=False, dtype="float32")

    def _alpha(self, like, training):
        progress = ops.convert_to_tensor(self.progress)
        if training:
            progress = progress + 1.0
            self.progress.assign(progress)
        return ops.cast(ops.clip(progress / self.steps, 0.0, 1.0), like.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


@keras.saving.register_keras_serializable(package="xsight_keras")
class FadeIn(_Fade):
    """``[old, new]`` → ``(1 - alpha) · old + alpha · new`` (same shapes and dtype)."""

    def call(self, inputs, training=None):
        old, new = inputs
        return old + self._alpha(new, training) * (new - old)


@keras.saving.register_keras_serializable(package="xsight_keras")
class FadeInMean(_Fade):
    """``[x_1, …, x_n]`` (same shapes; ``x_n`` the new level's) → their weighted mean with
    weight ``alpha / n`` on ``x_n`` and the rest shared equally by the others: the mean of the
    old ones at ``alpha = 0``, the plain mean of all at ``alpha = 1``."""

    def call(self, inputs, training=None):
        *old, new = inputs
        old_mean = old[0] if len(old) == 1 else ops.mean(ops.stack(old), axis=0)
        return old_mean + (self._alpha(new, training) / len(inputs)) * (new - old_mean)


def fade_layers(model: keras.Model) -> list[_Fade]:
    """The fade-in layers of ``model`` (none for a model that is not fading a level in)."""
    return [layer for layer in model.layers if isinstance(layer, _Fade)]


def fade_alpha(model: keras.Model) -> float | None:
    """The current ``alpha`` of ``model``'s fade-in (``None``: it has no fade-in layers)."""
    layers_ = fade_layers(model)
    if not layers_:
        return None
    return min(min(float(ops.convert_to_numpy(layer.progress)) / layer.steps, 1.0)
               for layer in layers_)


def set_fade(model: keras.Model, alpha: float) -> None:
    """Set every fade-in layer of ``model`` to ``alpha`` (clipped to [0, 1]); training then
    continues the fade from there."""
    value = min(max(float(alpha), 0.0), 1.0)
    for layer in fade_layers(model):
        layer.progress.assign(value * layer.steps)
