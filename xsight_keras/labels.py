"""Small operations on label maps shared by data preparation, post-processing and metrics."""

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
