"""Segmentation metrics accumulated over an epoch (hard predictions, argmax over classes).

Dice and IoU are computed from true positives, false positives and false negatives summed over
every pixel seen in the epoch (not averaged per batch), so a validation figure does not depend
on the batch size. A class with no pixel in target or prediction scores 1 (nothing to get wrong).
"""

from __future__ import annotations

import keras
from keras import ops

from xsight_keras._backend import resolve_data_format
from xsight_keras.labels import label_names

# Every SegmentationScore of a model sees the same (y_true, y_pred) tensors in a step; the
# confusion counts are computed once and shared (holding the tensors makes the identity test safe).
_last_counts: dict = {"key": None, "counts": None}


def confusion_counts(y_true, y_pred, num_classes: int, data_format: str):
    """Per-class (tp, fp, fn) float32 vectors of length max(K, 2) for hard predictions.

    One argmax per tensor and one count of ``true·K + pred`` (``segment_sum`` with a static
    number of segments: JAX cannot trace ``bincount``); cached for the identical pair of tensors,
    so a dozen metrics cost one computation per step.
    """
    key = (y_true, y_pred, num_classes, data_format)
    cached = _last_counts["key"]
    if cached is not None and cached[0] is y_true and cached[1] is y_pred and cached[2:] == key[2:]:
        return _last_counts["counts"]
    axis = -1 if data_format == "channels_last" else 1
    k = max(num_classes, 2)
    if num_classes == 1:
        t = ops.cast(ops.squeeze(ops.cast(y_true, "float32") >= 0.5, axis), "int32")
        p = ops.cast(ops.squeeze(ops.cast(y_pred, "float32") >= 0.5, axis), "int32")
    else:
        t = ops.cast(ops.argmax(y_true, axis=axis), "int32")
        p = ops.cast(ops.argmax(y_pred, axis=axis), "int32")
    pairs = ops.reshape(t * k + p, (-1,))
    confusion = ops.segment_sum(ops.ones_like(pairs, "float32"), pairs, num_segments=k * k)
    confusion = ops.reshape(confusion, (k, k))  # rows: true class
    tp = ops.diagonal(confusion)
    counts = (tp, ops.sum(confusion, axis=0) - tp, ops.sum(confusion, axis=1) - tp)
    _last_counts.update(key=key, counts=counts)
    return counts


@keras.saving.register_keras_serializable(package="xsight_keras")
class SegmentationScore(keras.metrics.Metric):
    """Dice or IoU of one class, or the mean over several.

    ``num_classes``: K of the model output (1 = binary sigmoid, thresholded at 0.5).
    ``class_ids``: classes averaged (one id gives that class' score). ``kind``: ``"dice"`` or
    ``"iou"``. ``y_true`` one-hot (B, H, W, K) or (B, K, H, W); ``y_pred`` probabilities.
    """

    def __init__(self, num_classes: int, class_ids, kind: str = "dice",
                 data_format: str | None = None, name=None, **kwargs):
        super().__init__(name=name or f"{kind}", **kwargs)
        if kind not in ("dice", "iou"):
            raise ValueError(f"kind must be 'dice' or 'iou', got {kind!r}")
        self.num_classes = int(num_classes)
        self.class_ids = [int(c) for c in class_ids]
        self.kind = kind
        self.data_format = resolve_data_format(data_format)
        k = max(self.num_classes, 2)
        self.tp = self.add_variable(shape=(k,), initializer="zeros", name="tp")
        self.fp = self.add_variable(shape=(k,), initializer="zeros", name="fp")
        self.fn = self.add_variable(shape=(k,), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        tp, fp, fn = confusion_counts(y_true, y_pred, self.num_classes, self.data_format)
        self.tp.assign_add(tp)
        self.fp.assign_add(fp)
        self.fn.assign_add(fn)

    def per_class(self):
        tp, fp, fn = self.tp, self.fp, self.fn
        if self.kind == "dice":
            num, den = 2 * tp, 2 * tp + fp + fn
        else:
            num, den = tp, tp + fp + fn
        return ops.where(den > 0, num / ops.maximum(den, 1e-9), ops.ones_like(den))

    def result(self):
        scores = self.per_class()
        return ops.mean(ops.take(scores, ops.convert_to_tensor(self.class_ids, "int32")))

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(ops.zeros(v.shape, v.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "class_ids": self.class_ids, "kind": self.kind, "data_format": self.data_format}


def segmentation_metrics(class_names, data_format: str | None = None) -> list:
    """The standard metric set: ``dice_<class>`` per class, ``mean_dice`` (all classes),
    ``mean_fg_dice`` (classes 1..K-1) and ``mean_iou`` (all classes).

    ``class_names``: names of the K output channels (index 0 = background for K > 1). For a binary
    model (K = 1) pass ``["nucleus"]``: scores then cover background (0) and nucleus (1).
    """
    k = len(class_names)
    names = [n.lower().replace(" ", "_") for n in label_names(class_names)]
    ids = range(len(names))
    metrics = [SegmentationScore(k, [c], "dice", data_format, name=f"dice_{names[c]}") for c in ids]
    metrics += [
        SegmentationScore(k, list(ids), "dice", data_format, name="mean_dice"),
        SegmentationScore(k, list(ids)[1:], "dice", data_format, name="mean_fg_dice"),
        SegmentationScore(k, list(ids), "iou", data_format, name="mean_iou"),
    ]
    return metrics
