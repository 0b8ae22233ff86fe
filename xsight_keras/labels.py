"""Small operations on label maps shared by data preparation, post-processing, metrics and
figures, and the colour of each class."""

from __future__ import annotations

import numpy as np


def label_names(class_names) -> list[str]:
    """Names of the label values 0..K-1 for a model's output channel names: a binary model's
    single channel (``["nucleus"]``) means labels background (0) and that class (1)."""
    names = list(class_names)
    return ["background", names[0]] if len(names) == 1 else names


def relabel_sequential(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber an int instance map (any shape) to ids 1..n in increasing id order, 0 staying 0.

    Returns ``(int32 map of the same shape, n)``. Ids that no pixel carries leave no gap.
    """
    flat = np.asarray(instances).ravel().astype(np.int64)
    if flat.size == 0 or flat.max() <= 0:
        return np.zeros(np.shape(instances), np.int32), 0
    present = np.flatnonzero(np.bincount(flat))
    present = present[present > 0]
    lut = np.zeros(flat.max() + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[flat].reshape(np.shape(instances)), len(present)


def instance_classes(instances: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """The class of each instance id 0..max by majority vote of its pixels' classes.

    ``instances`` int and ``classes`` int (same shape, classes < ``num_classes``). Returns an int
    array of length max id + 1; index 0 and ids no pixel carries are 0. Background-class pixels
    inside an instance do not vote.
    """
    ids = np.asarray(instances).ravel().astype(np.int64)
    top = int(ids.max()) if ids.size else 0
    votes = np.bincount(ids * num_classes + np.asarray(classes).ravel().astype(np.int64),
                        minlength=(top + 1) * num_classes).reshape(top + 1, num_classes)
    votes[:, 0] = 0
    return np.argmax(votes, axis=1)


def count_classes(classes: np.ndarray, instances: np.ndarray, num_classes: int):
    """Pixel and nucleus counts per class of one or more label maps.

    ``classes`` uint8 and ``instances`` int of the same shape, (H, W) or (N, H, W) with ids unique
    within each image. Returns two int64 arrays of length ``num_classes``: pixels per class, and
    nuclei per class (each nucleus counted once, for the majority class of its pixels).
    """
    pixels = np.bincount(classes.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
    nuclei = np.zeros(num_classes, np.int64)
    for cls, inst in zip(classes.reshape(-1, *classes.shape[-2:]), instances.reshape(-1, *instances.shape[-2:])):
        present = np.bincount(inst.ravel().astype(np.int64)) > 0
        present[0] = False
        kinds = instance_classes(inst, cls, num_classes)[present]
        nuclei += np.bincount(kinds, minlength=num_classes)[:num_classes]
    return pixels, nuclei


#: RGB uint8 colour of each class id (0, the background, black); ids beyond 7 wrap around.
#: Used by the figures (``xsight_keras.viz``), TensorBoard images and GeoJSON exports alike.
CLASS_COLOURS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 40], [40, 90, 230], [240, 220, 40],
                          [40, 220, 220], [200, 80, 200], [255, 140, 0]], np.uint8)


def colourise(labels: np.ndarray) -> np.ndarray:
    """Label map (H, W) int → RGB uint8 (H, W, 3), one fixed colour per class (0 black)."""
    return CLASS_COLOURS[np.asarray(labels) % len(CLASS_COLOURS)]
