"""Test-time augmentation over the 8 symmetries of the square (the dihedral group D4).

Transform ``k`` (0–7): ``k // 4`` says whether the image is first mirrored left–right, ``k % 4``
how many quarter turns follow. :func:`invert_transform` undoes it exactly, so predictions made on
transformed images can be mapped back and averaged as probabilities.
"""

from __future__ import annotations

import numpy as np

ALL_TRANSFORMS = tuple(range(8))
TRANSFORM_NAMES = ("identity", "rot90", "rot180", "rot270",
                   "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def parse_transforms(spec) -> tuple[int, ...]:
    """``None``/``False`` → identity only; ``True``/``"all"`` → all 8; a list of ids or names."""
    if spec in (None, False, "none", ""):
        return (0,)
    if spec in (True, "all"):
        return ALL_TRANSFORMS
    if isinstance(spec, str):
        spec = spec.split(",")
    ids = []
    for item in spec:
        item = item.strip() if isinstance(item, str) else item
        ids.append(TRANSFORM_NAMES.index(item) if isinstance(item, str) and not item.isdigit() else int(item))
    if any(not 0 <= k < 8 for k in ids):
        raise ValueError(f"TTA transforms must be 0..7 or names {TRANSFORM_NAMES}, got {spec}")
    return tuple(ids)


def _flip(x, axis: int):
    return np.flip(x, axis=axis) if isinstance(x, np.ndarray) else x.flip(axis)


def _rot90(x, k: int, axes):
    return np.rot90(x, k, axes=axes) if isinstance(x, np.ndarray) else x.rot90(k, axes)


def apply_transform(x, k: int, axes=(1, 2)):
    """Apply symmetry ``k`` to the spatial ``axes`` (height, width) of ``x`` (a numpy array,
    or a torch tensor: the predictor keeps model outputs on the device). Returns a view."""
    if k >= 4:
        x = _flip(x, axes[1])
    return _rot90(x, k % 4, axes)


def invert_transform(x, k: int, axes=(1, 2)):
    """Undo :func:`apply_transform` with the same ``k`` (numpy array or torch tensor)."""
    x = _rot90(x, -(k % 4), axes)
    if k >= 4:
        x = _flip(x, axes[1])
    return x
