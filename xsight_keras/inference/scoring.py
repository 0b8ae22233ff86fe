"""Pixel scores of whole-image predictions: confusion matrices, Dice and IoU per class.

:func:`score_split` is the one loop that predicts every image of a prepared split whole and
scores it; evaluation (:func:`xsight_keras.evaluation.evaluate_split`, which adds instance
scores per image) and TTA validation during training
(:class:`xsight_keras.training.callbacks.TTAValidation`) both run it.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from xsight_keras.heads import SEMANTIC
from xsight_keras.inference.predictor import Predictor
from xsight_keras.labels import label_names


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class, for integer label maps."""
    if truth.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: {truth.shape} vs {pred.shape}")
    idx = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray, class_names) -> dict:
    """Dice and IoU per class and their means (all classes, foreground = classes 1..K-1).

    A class absent from both truth and prediction scores NaN and is left out of the means.
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return {
        "dice": {n: float(d) for n, d in zip(class_names, dice)},
        "iou": {n: float(i) for n, i in zip(class_names, iou)},
        "mean_dice": float(np.nanmean(dice)),
        "mean_fg_dice": float(np.nanmean(dice[1:])) if len(dice) > 1 else float(dice[0]),
        "mean_iou": float(np.nanmean(iou)),
        "mean_fg_iou": float(np.nanmean(iou[1:])) if len(iou) > 1 else float(iou[0]),
        "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1)),
    }


def predict_sample(predictor: Predictor, sample, num_classes: int):
    """Predict one prepared sample whole and align its ground truth with the model's classes.

    Returns ``(probabilities (H, W, K), head maps, truth labels (H, W), k)`` where the head
    maps are a dict of every other head's maps (:meth:`Predictor.predict_maps`; ``None`` when
    the model has no other head, the post-processing's input), and k = K, or 2 for a binary
    model (then every nucleus class of the truth counts as 1).
    """
    maps = predictor.predict_maps(sample.image)
    probs = maps.pop(SEMANTIC)
    instance_maps = maps or None
    binary = probs.shape[-1] == 1
    truth = (sample.classes > 0).astype(np.uint8) if binary else sample.classes
    k = 2 if binary else probs.shape[-1]
    if not binary and k != num_classes:
        raise ValueError(f"the model predicts {k} classes, the data has {num_classes}")
    return probs, instance_maps, truth, k


def score_split(predictor: Predictor, dataset, progress: bool = True, limit: int | None = None,
                per_image=None) -> dict:
    """Predict the first ``limit`` (default all) images of ``dataset`` whole and score their pixels.

    ``dataset``: a :class:`~xsight_keras.data.PreparedDataset`. ``per_image``: optional
    ``f(sample, probabilities, instance_maps, truth, labels, k)`` called for each image (see
    :func:`predict_sample`; ``labels`` uint8 (H, W) from :meth:`Predictor.to_labels`). Returns
    ``{"scores": scores_from_confusion(...), "confusion": (K, K) list, "class_names": [...],
    "images": n}`` where K = the dataset's classes, or 2 (background, nucleus) for a binary model.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    names = dataset.class_names
    confusion = None
    for i in tqdm(range(n), desc="evaluating", disable=not progress):
        sample = dataset[i]
        probs, instance_maps, truth, k = predict_sample(predictor, sample, dataset.num_classes)
        labels = Predictor.to_labels(probs)
        cm = confusion_matrix(truth, labels, k)
        confusion = cm if confusion is None else confusion + cm
        if per_image is not None:
            per_image(sample, probs, instance_maps, truth, labels, k)
    if confusion.shape[0] == 2 and len(names) != 2:  # a binary model on a multi-class split
        names = label_names(["nucleus"])
    return {"scores": scores_from_confusion(confusion, names), "confusion": confusion.tolist(),
            "class_names": list(names), "images": n}
