"""Writing test slides: tiled, pyramidal TIFFs (OpenSlide opens them as generic TIFF) whose
every nucleus is known, so a test or benchmark can check what prediction found.

The writer never holds a whole level in memory: it asks a ``render(y, x, h, w)`` function for
level-0 pixels one tile (times the level's downsample) at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

GLASS = 242  # the grey of an empty slide


def write_pyramid_tiff(path, shape: tuple[int, int], render: Callable[[int, int, int, int], np.ndarray],
                       mpp: float | None = 0.25, tile: int = 256, levels: int = 3) -> Path:
    """Write a slide of ``shape`` (height, width) level-0 pixels to ``path``.

    ``render(y, x, h, w)`` returns uint8 RGB (h, w, 3) level-0 pixels of that region (the
    writer clips regions to the slide). Levels 1… are 2×, 4× … smaller. ``mpp`` goes into
    the TIFF resolution tags (OpenSlide reports it as ``openslide.mpp-x``/``-y``); ``None``
    writes none, as some scanners' exports do.
    """
    import tifffile

    path = Path(path)
    h0, w0 = shape

    def tiles(d: int):
        lh, lw = -(-h0 // d), -(-w0 // d)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                y, x = ty * d, tx * d
                h, w = min(tile * d, h0 - y), min(tile * d, w0 - x)
                region = render(y, x, h, w)
                if d > 1:
                    region = cv2.resize(region, (max(1, w // d), max(1, h // d)),
                                        interpolation=cv2.INTER_AREA)
                out = np.full((tile, tile, 3), GLASS, np.uint8)
                out[:region.shape[0], :region.shape[1]] = region
                yield out

    with tifffile.TiffWriter(path, bigtiff=h0 * w0 * 3 > 2**31) as tw:
        for level in range(levels):
            d = 2 ** level
            options = dict(shape=(-(-h0 // d), -(-w0 // d), 3), dtype=np.uint8, tile=(tile, tile),
                           photometric="rgb", compression="zlib",
                           subfiletype=1 if level else 0)
            if mpp:
                options.update(resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                               resolutionunit="CENTIMETER")
            tw.write(tiles(d), **options)
    return path


class Mosaic:
    """A slide made of source tiles laid side by side inside a tissue area, glass elsewhere.

    ``images`` uint8 (N, T, T, 3) and ``instances`` int (N, T, T) (nucleus ids per tile, 0
    background); tile (i, j) of the grid shows source ``(i * 7 + j * 3) % N``. ``tissue(y, x)``
    (level-0 pixel coordinate arrays → bool) says where tissue is; the default is everywhere.
    :meth:`render` draws any region; :meth:`truth` gives its instance map, ids unique over the
    slide (``source-tile index in the grid * 10000 + id``).
    """

    def __init__(self, images: np.ndarray, instances: np.ndarray,
                 tissue: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        self.images, self.instances = images, instances
        self.t = images.shape[1]
        self.tissue = tissue

    def _grid(self, y, x, h, w, pick):
        t = self.t
        ys, xs = np.arange(y, y + h), np.arange(x, x + w)
        gy, gx = ys // t, xs // t
        src = (gy[:, None] * 7 + gx[None, :] * 3) % len(self.images)
        values = pick(src, ys[:, None] % t, xs[None, :] % t)
        inside = (np.ones((h, w), bool) if self.tissue is None
                  else self.tissue(ys[:, None], xs[None, :]))
        return values, inside, gy[:, None] * 100000 + gx[None, :]

    def render(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        values, inside, _ = self._grid(y, x, h, w, lambda s, r, c: self.images[s, r, c])
        values[~inside] = GLASS
        return values

    def truth(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """int64 (h, w) nucleus ids of the region (0 background and glass)."""
        ids, inside, cell = self._grid(y, x, h, w, lambda s, r, c: self.instances[s, r, c])
        ids = np.where((ids > 0) & inside, cell.astype(np.int64) * 10000 + ids, 0)
        return ids
