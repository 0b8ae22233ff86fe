"""Image normalisation used identically in training and inference: CLAHE, then z-score."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw uint8 images become network inputs. Saved with every run (``asdict``).

    ``clahe_clip_limit`` / ``clahe_grid``: OpenCV CLAHE on the L channel of CIE-Lab (on the only
    channel of grayscale images); ``clahe_clip_limit=0`` disables CLAHE. ``zscore``: ``"image"``
    (each image by its own per-channel mean and std), ``"dataset"`` (fixed ``mean`` / ``std`` per
    channel, on the 0–255 scale), or ``"none"`` (scale to 0–1).
    """

    clahe_clip_limit: float = 2.0
    clahe_grid: tuple[int, int] = (8, 8)
    zscore: str = "image"
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.zscore not in ("image", "dataset", "none"):
            raise ValueError(f"zscore must be 'image', 'dataset' or 'none', got {self.zscore!r}")
        if self.zscore == "dataset" and (not self.mean or len(self.mean) != len(self.std)):
            raise ValueError("zscore='dataset' needs per-channel mean and std")
        object.__setattr__(self, "clahe_grid", tuple(int(v) for v in self.clahe_grid))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=8)
def _clahe(clip_limit: float, grid: tuple[int, int]):
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=grid)


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, grid=(8, 8)) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of uint8 (H, W, 3 or 1) → same shape, uint8.

    RGB images are equalised on the lightness channel only, so hues are kept.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"CLAHE expects a uint8 image, got {image.dtype}")
    clahe = _clahe(float(clip_limit), tuple(grid))
    if image.shape[-1] == 1:
        return clahe.apply(np.ascontiguousarray(image[..., 0]))[..., None]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def preprocess_image(image: np.ndarray, config: PreprocessConfig = PreprocessConfig(),
                     stats_mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise a uint8 (H, W, C) image to float32 (H, W, C) network input.

    CLAHE (unless ``clip_limit`` is 0), then z-score per ``config.zscore``: per-image results have
    mean ≈ 0 and std ≈ 1 per channel (a flat channel stays 0). ``stats_mask`` (bool (H, W),
    ``zscore: image`` only): the mean and std are those of these pixels (a slide region's
    tissue, so that glass does not shift them); all pixels when it is ``None`` or empty.
    """
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W, 1|3), got {image.shape}")
    if config.clahe_clip_limit > 0:
        image = apply_clahe(image, config.clahe_clip_limit, config.clahe_grid)
    channels = image.shape[-1]
    if config.zscore == "image":
        mask = None
        if stats_mask is not None and stats_mask.any():
            mask = np.ascontiguousarray(stats_mask, dtype=np.uint8)
        mean, std = cv2.meanStdDev(image, mask=mask)  # float64 (C, 1); faster than numpy
        mean, std = mean.ravel(), np.maximum(std.ravel(), 1e-3)
    elif config.zscore == "dataset":
        mean, std = np.asarray(config.mean), np.asarray(config.std)
        if len(mean) != channels:
            raise ValueError(f"dataset mean/std have {len(mean)} channels, the image {channels}")
    else:
        mean, std = np.zeros(channels), np.full(channels, 255.0)
    # One affine map per channel through OpenCV: several times faster than numpy arithmetic.
    matrix = np.zeros((channels, channels + 1), np.float32)
    matrix[np.arange(channels), np.arange(channels)] = 1.0 / std
    matrix[:, -1] = -mean / std
    out = cv2.transform(image.astype(np.float32), matrix)
    return out.reshape(image.shape)
