"""Segmentation losses as serializable Keras losses (``keras.ops`` only: any backend).

All take ``y_true`` as one-hot (or MixUp-soft) targets and ``y_pred`` as probabilities of the same
shape, (B, H, W, K) or (B, K, H, W) per ``data_format``; K = 1 means a binary sigmoid output.
Every loss returns one scalar per batch (reduction happens inside), computed in float32.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from xsight_keras._backend import resolve_data_format
from xsight_keras.heads import HV, INSTANCE, scale_of

_EPS = 1e-6


def _axes(data_format: str):
    """(class axis, reduction axes without the class axis) for 4-D tensors."""
    return (-1, (0, 1, 2)) if data_format == "channels_last" else (1, (0, 2, 3))


def class_weights_from_counts(pixel_counts, power: float = 0.5, include_background: bool = True):
    """Class weights ∝ (1 / frequency)^power, normalised to mean 1.

    ``pixel_counts``: pixels per class (e.g. ``PreparedDataset.pixel_counts``). Classes never seen
    get the largest weight among the seen ones. ``power=0.5`` (inverse square root) keeps a rare
    class such as PanNuke's Dead (1.5 % of nuclei) from dominating while still lifting it.
    Returns a float list of length K.
    """
    counts = np.asarray(pixel_counts, np.float64)
    freq = counts / max(counts.sum(), 1.0)
    weights = np.zeros_like(freq)
    seen = freq > 0
    weights[seen] = freq[seen] ** -power
    weights[~seen] = weights[seen].max() if seen.any() else 1.0
    if not include_background:
        weights[0] = 0.0
    return (weights / weights[weights > 0].mean()).tolist()


class _SegmentationLoss(keras.losses.Loss):
    def __init__(self, data_format: str | None = None, name=None, **kwargs):
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
        self.data_format = resolve_data_format(data_format)  # None: the backend's fast layout

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        return {**config, "data_format": self.data_format}

    def _prepare(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        return y_true, y_pred


@keras.saving.register_keras_serializable(package="xsight_keras")
class SoftDiceLoss(_SegmentationLoss):
    """1 − weighted mean over classes of the soft Dice, ``2 Σ y·p / (Σ y + Σ p)`` over the batch.

    ``class_weights``: optional length-K weights (e.g. :func:`class_weights_from_counts`, which
    makes this the frequency-weighted Dice); ``None`` weighs classes equally. A class absent from
    both target and prediction scores Dice 1 (the smoothing term), so it neither helps nor hurts.
    """

    def __init__(self, class_weights=None, smooth: float = 1.0, data_format=None,
                 name="soft_dice", **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.smooth = float(smooth)

    def dice_per_class(self, y_true, y_pred):
        _, axes = _axes(self.data_format)
        inter = ops.sum(y_true * y_pred, axis=axes)
        denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        return (2.0 * inter + self.smooth) / (denom + self.smooth)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        dice = self.dice_per_class(y_true, y_pred)
        if self.class_weights is None:
            return 1.0 - ops.mean(dice)
        w = ops.convert_to_tensor(np.asarray(self.class_weights, np.float32))
        return 1.0 - ops.sum(dice * w) / ops.sum(w)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="xsight_keras")
class FocalLoss(_SegmentationLoss):
    """Focal loss (Lin et al. 2017): mean over pixels of ``−α (1 − p_t)^γ log p_t``.

    Softmax outputs (K > 1) sum the term over classes weighted by the one-hot target; a sigmoid
    output (K = 1) uses the binary form with α for positives and 1 − α for negatives.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, data_format=None,
                 name="focal", **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        axis, _ = _axes(self.data_format)
        p = ops.clip(y_pred, _EPS, 1.0 - _EPS)
        if y_pred.shape[axis] == 1:
            pt = y_true * p + (1 - y_true) * (1 - p)
            alpha = y_true * self.alpha + (1 - y_true) * (1 - self.alpha)
            return ops.mean(-alpha * (1 - pt) ** self.gamma * ops.log(pt))
        term = -self.alpha * y_true * (1 - p) ** self.gamma * ops.log(p)
        return ops.mean(ops.sum(term, axis=axis))

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


def _boundaries(mask, size: int, data_format: str):
    """Inner boundary of a soft mask: ``maxpool(1 − m) − (1 − m)``, in [0, 1]."""
    inverted = 1.0 - mask
    pooled = ops.max_pool(inverted, pool_size=size, strides=1, padding="same", data_format=data_format)
    return pooled - inverted


@keras.saving.register_keras_serializable(package="xsight_keras")
class BoundaryLoss(_SegmentationLoss):
    """Boundary loss of Bokhovkin & Burnaev (ISNN 2019, "Boundary Loss for Remote Sensing Imagery
    Semantic Segmentation"): 1 − mean over classes of the boundary F1 between predicted and true
    class boundaries, with a tolerance of ``theta`` pixels.

    Boundaries come from max-pooling (``theta0`` px wide) and are extended by ``theta`` px for the
    tolerant precision/recall, all inside the loss: no distance maps are needed in the pipeline.
    """

    def __init__(self, theta0: int = 3, theta: int = 5, data_format=None,
                 name="boundary", **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.theta0 = int(theta0)
        self.theta = int(theta)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        _, axes = _axes(self.data_format)
        df = self.data_format
        gt_b = _boundaries(y_true, self.theta0, df)
        pred_b = _boundaries(y_pred, self.theta0, df)
        gt_ext = ops.max_pool(gt_b, pool_size=self.theta, strides=1, padding="same", data_format=df)
        pred_ext = ops.max_pool(pred_b, pool_size=self.theta, strides=1, padding="same", data_format=df)
        precision = ops.sum(pred_b * gt_ext, axis=axes) / (ops.sum(pred_b, axis=axes) + _EPS)
        recall = ops.sum(pred_ext * gt_b, axis=axes) / (ops.sum(gt_b, axis=axes) + _EPS)
        bf1 = 2 * precision * recall / (precision + recall + _EPS)
        return 1.0 - ops.mean(bf1)

    def get_config(self):
        return {**super().get_config(), "theta0": self.theta0, "theta": self.theta}


@keras.saving.register_keras_serializable(package="xsight_keras")
class HybridLoss(_SegmentationLoss):
    """``dice_weight · Dice + focal_weight · Focal + boundary_weight · Boundary``.

    ``class_weights`` go to the Dice term (frequency-weighted Dice when taken from class counts).
    """

    def __init__(self, dice_weight=1.0, focal_weight=1.0, boundary_weight=0.5, class_weights=None,
                 gamma=2.0, alpha=0.25, data_format=None, name="hybrid", **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.dice_weight, self.focal_weight = float(dice_weight), float(focal_weight)
        self.boundary_weight = float(boundary_weight)
        self.dice = SoftDiceLoss(class_weights, data_format=data_format)
        self.focal = FocalLoss(gamma, alpha, data_format=data_format)
        self.boundary = BoundaryLoss(data_format=data_format)

    def call(self, y_true, y_pred):
        total = self.dice_weight * self.dice.call(y_true, y_pred)
        total = total + self.focal_weight * self.focal.call(y_true, y_pred)
        if self.boundary_weight:
            total = total + self.boundary_weight * self.boundary.call(y_true, y_pred)
        return total

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight,
                "focal_weight": self.focal_weight, "boundary_weight": self.boundary_weight,
                "class_weights": self.dice.class_weights, "gamma": self.focal.gamma,
                "alpha": self.focal.alpha}


@keras.saving.register_keras_serializable(package="xsight_keras")
class BCEDiceLoss(_SegmentationLoss):
    """Binary cross-entropy + soft Dice for one-channel sigmoid outputs (binary nucleus masks)."""

    def __init__(self, bce_weight=1.0, dice_weight=1.0, data_format=None,
                 name="bce_dice", **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.dice = SoftDiceLoss(data_format=data_format)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        p = ops.clip(y_pred, _EPS, 1.0 - _EPS)
        bce = -ops.mean(y_true * ops.log(p) + (1 - y_true) * ops.log(1 - p))
        return self.bce_weight * bce + self.dice_weight * self.dice.call(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "bce_weight": self.bce_weight, "dice_weight": self.dice_weight}


def multiscale_losses(loss, output_names, weights=(1.0, 0.5, 0.25, 0.125, 0.0625)):
    """Loss and loss-weight dicts for PGU-Net's class-map outputs (``fused``, ``scale_1``, …).

    The main output (``fused``, or the first name that is not a ``scale_{s}`` output) gets
    ``weights[0]``; ``scale_{s}`` gets the weight of its position after it (finest first).
    Returns ``(losses, loss_weights)`` for ``model.compile``.
    """
    main = [n for n in output_names if scale_of(n) is None]
    names = main[:1] + sorted((n for n in output_names if scale_of(n) is not None), key=scale_of)
    losses = {n: loss for n in names}
    loss_weights = {n: float(weights[min(i, len(weights) - 1)]) for i, n in enumerate(names)}
    return losses, loss_weights


@keras.saving.register_keras_serializable(package="xsight_keras")
class InstanceLoss(_SegmentationLoss):
    """Loss of the instance head: MSE on the normalised distance map (channel 0) plus BCE and
    soft Dice on the contour map (channel 1). ``y_true``/``y_pred`` (B, H, W, 2) in [0, 1]."""

    def __init__(self, distance_weight=1.0, contour_weight=1.0, data_format=None,
                 name=INSTANCE, **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.distance_weight, self.contour_weight = float(distance_weight), float(contour_weight)
        self.dice = SoftDiceLoss(data_format=data_format)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        axis, _ = _axes(self.data_format)
        dist_t, cont_t = ops.split(y_true, 2, axis=axis)
        dist_p, cont_p = ops.split(y_pred, 2, axis=axis)
        mse = ops.mean(ops.square(dist_t - dist_p))
        p = ops.clip(cont_p, _EPS, 1.0 - _EPS)
        bce = -ops.mean(cont_t * ops.log(p) + (1 - cont_t) * ops.log(1 - p))
        return self.distance_weight * mse + self.contour_weight * (bce + self.dice.call(cont_t, cont_p))

    def get_config(self):
        return {**super().get_config(), "distance_weight": self.distance_weight,
                "contour_weight": self.contour_weight}


# Sobel derivative along x (width) of a 3×3 window, cross-correlation as in keras.ops.conv; the
# derivative along y is its transpose. A ramp of slope 1 per pixel gives 8.
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


@keras.saving.register_keras_serializable(package="xsight_keras")
class HoverLoss(_SegmentationLoss):
    """Loss of HoVer-Net's horizontal/vertical maps (:class:`xsight_keras.heads.HoverHead`):
    ``mse_weight`` · MSE of the maps over all pixels + ``gradient_weight`` · MSE of their Sobel
    derivatives (3×3; the horizontal map along x, the vertical one along y) on nucleus pixels.

    ``y_true``/``y_pred``: (B, H, W, 2) or (B, 2, H, W) per ``data_format``, channel 0
    horizontal, 1 vertical, targets in [−1, 1] and 0 outside nuclei. Nucleus pixels are those
    where the target is non-zero in either channel: every nucleus pixel except at most one at a
    nucleus' exact centre of mass (:func:`xsight_keras.heads.hover_maps`), so no mask has to
    travel beside the target. The gradient term is what makes the maps fall sharply between
    touching nuclei, where post-processing looks for the boundaries.
    """

    def __init__(self, mse_weight=1.0, gradient_weight=1.0, data_format=None, name=HV, **kwargs):
        super().__init__(data_format=data_format, name=name, **kwargs)
        self.mse_weight, self.gradient_weight = float(mse_weight), float(gradient_weight)

    def call(self, y_true, y_pred):
        y_true, y_pred = self._prepare(y_true, y_pred)
        axis, _ = _axes(self.data_format)
        error = y_pred - y_true
        mse = ops.mean(ops.square(error))
        # the derivatives are linear: Sobel(pred) − Sobel(true) = Sobel(pred − true)
        kernel = ops.convert_to_tensor(np.stack([_SOBEL_X, _SOBEL_X.T], -1)[..., None])
        gradient_error = ops.depthwise_conv(error, kernel, strides=1, padding="same",
                                            data_format=self.data_format)
        nucleus = ops.cast(ops.any(ops.not_equal(y_true, 0.0), axis=axis, keepdims=True), "float32")
        channels = ops.cast(ops.shape(y_true)[axis], "float32")
        msge = ops.sum(nucleus * ops.square(gradient_error)) / (channels * ops.sum(nucleus) + _EPS)
        return self.mse_weight * mse + self.gradient_weight * msge

    def get_config(self):
        return {**super().get_config(), "mse_weight": self.mse_weight,
                "gradient_weight": self.gradient_weight}
