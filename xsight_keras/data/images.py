"""Reading image files with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path, channels: int = 3) -> np.ndarray:
    """Read an image file as uint8 (H, W, ``channels``): RGB for 3, grayscale for 1.

    Handles 8-bit and 16-bit files (16-bit is scaled to 8-bit) and LZW TIFFs. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for one that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    flag = cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        raise ValueError(f"{path}: cannot be decoded as an image (corrupt or unsupported format)")
    if image.dtype == np.uint16:
        image = (image / 257).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        image = image[..., :3]  # drop alpha
    if image.shape[-1] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 1 and image.shape[-1] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    elif channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return np.ascontiguousarray(image)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an image (H, W) or (H, W, C), any dtype OpenCV resizes, to ``height``×``width``
    keeping its number of dimensions: area averaging when it shrinks (no aliasing), bilinear
    when it grows. Training (``resize_mode: resize``) and prediction resize through this one
    function, so a model sees images at the same scale in both."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    shrinks = height < h and width < w
    resized = cv2.resize(image, (width, height),
                         interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)
    return resized[..., None] if image.ndim == 3 and resized.ndim == 2 else resized
