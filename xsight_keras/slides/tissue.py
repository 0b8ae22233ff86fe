"""Finding tissue on a slide's thumbnail, so that glass is never read at full resolution."""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

#: the thumbnail scale tissue is found at (µm per pixel): 16 µm keeps a 100,000-px 40x slide's
#: thumbnail about 1,600 px wide, and is still finer than any tissue fragment worth reading
TISSUE_MPP = 16.0


def tissue_mask(thumbnail: np.ndarray, min_saturation: int = 15, max_saturation: int = 40,
                min_area_px: int = 16, closing_px: int = 3) -> np.ndarray:
    """bool (H, W): tissue on a uint8 RGB (H, W, 3) thumbnail.

    Stained tissue is saturated and glass is not: Otsu's threshold on the HSV saturation,
    clipped to [``min_saturation``, ``max_saturation``] (glass stays under the first, so an
    empty slide finds nothing; any stained tissue is over the second, so a slide that is all
    tissue, where Otsu splits the tissue itself, is kept whole), then a closing of
    ``closing_px`` pixels, holes inside tissue filled, fragments under ``min_area_px`` pixels
    dropped. Pen marks and dust are left to the model.
    """
    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[..., 1]
    level, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = saturation > np.clip(level, min_saturation, max_saturation)
    if closing_px:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * closing_px + 1,) * 2)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_area_px
        keep[0] = False
        mask = keep[labels]
    return mask


def mask_region(mask: np.ndarray, factor: float, y: int, x: int, h: int, w: int) -> np.ndarray:
    """bool (h, w): the part of a thumbnail ``mask`` under the region (y, x, h, w) given in
    pixels ``factor`` times finer than the thumbnail's (nearest neighbour, dilated by one
    thumbnail pixel so tissue edges are never cut)."""
    y0, x0 = int(np.floor(y / factor)) - 1, int(np.floor(x / factor)) - 1
    y1, x1 = int(np.ceil((y + h) / factor)) + 1, int(np.ceil((x + w) / factor)) + 1
    H, W = mask.shape
    patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    if sy1 > sy0 and sx1 > sx0:
        patch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    patch = cv2.dilate(patch, np.ones((3, 3), np.uint8))
    rows = np.clip(((np.arange(h) + y) / factor - y0).astype(int), 0, patch.shape[0] - 1)
    cols = np.clip(((np.arange(w) + x) / factor - x0).astype(int), 0, patch.shape[1] - 1)
    return patch[np.ix_(rows, cols)] > 0
