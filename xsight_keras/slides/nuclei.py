"""Nuclei of one block of a slide: found on the block with its margin, kept by the block whose
core holds their centroid, so a nucleus on a block border is reported exactly once and whole."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xsight_keras.heads import SEMANTIC
from xsight_keras.inference.instances import (
    PostprocessConfig,
    nucleus_outline,
    separate_instances,
)


@dataclass(frozen=True)
class Block:
    """One unit of work, in model pixels of the whole slide: the ``core`` (y0, x0, y1, x1) whose
    nuclei this block reports, and the ``region`` (y0, x0, y1, x1) it reads and predicts: the
    core grown by the margin on every side, clipped to the slide."""

    index: int
    core: tuple[int, int, int, int]
    region: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.region
        return y1 - y0, x1 - x0


def block_grid(size: tuple[int, int], core: int, margin: int) -> list[Block]:
    """Blocks covering a slide of ``size`` (height, width) model pixels, row by row: cores of
    ``core`` pixels (smaller at the right and bottom edges), regions ``margin`` wider."""
    h, w = size
    blocks = []
    for y in range(0, h, core):
        for x in range(0, w, core):
            c = (y, x, min(y + core, h), min(x + core, w))
            r = (max(y - margin, 0), max(x - margin, 0), min(c[2] + margin, h), min(c[3] + margin, w))
            blocks.append(Block(len(blocks), c, r))
    return blocks


#: columns of a block's nuclei (model pixels of the slide; the pipeline converts them)
NUCLEUS_FIELDS = ("class_id", "probability", "centroid_y", "centroid_x", "area_px",
                  "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")


def block_nuclei(maps: dict[str, np.ndarray], block: Block, postprocess: PostprocessConfig,
                 slide_size: tuple[int, int]) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
    """Nuclei whose centroid lies in ``block``'s core.

    ``maps``: the predictor's maps of the block's region (float32 (h, w, K) class
    probabilities under :data:`SEMANTIC`, other heads' maps under their names). Returns
    (columns, outlines, cut): columns as in :data:`NUCLEUS_FIELDS` (float64 / int arrays of
    equal length, slide model pixels; ``probability`` is the mean probability of the nucleus'
    class over its pixels), outlines (float64 (P, 2) x, y rings per nucleus, not closed), and
    how many kept nuclei touch the region's edge inside the slide (cut by a margin too small
    for them; 0 is expected).
    """
    probabilities = maps[SEMANTIC]
    instances, types = separate_instances(probabilities, maps, postprocess)
    n = int(instances.max())
    columns = {k: [] for k in NUCLEUS_FIELDS}
    outlines, cut = [], 0
    if n == 0:
        return {k: np.zeros(0) for k in NUCLEUS_FIELDS}, outlines, cut
    oy, ox = block.region[:2]
    h, w = instances.shape
    ids = np.arange(1, n + 1)
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(instances), instances, ids))
    areas = np.bincount(instances.ravel(), minlength=n + 1)[1:]
    cy0, cx0, cy1, cx1 = block.core
    inner_edges = (oy > 0, ox > 0, oy + h < slide_size[0], ox + w < slide_size[1])
    for iid, window in zip(ids, ndimage.find_objects(instances)):
        if window is None:
            continue
        y, x = centroids[iid - 1] + (oy, ox)
        if not (cy0 <= y < cy1 and cx0 <= x < cx1):
            continue  # another block's core holds it
        mask = instances[window] == iid
        outline = nucleus_outline(mask)
        if outline is None:
            continue  # a line of pixels is not an area a polygon can hold
        ys, xs = window
        if ((ys.start == 0 and inner_edges[0]) or (xs.start == 0 and inner_edges[1])
                or (ys.stop == h and inner_edges[2]) or (xs.stop == w and inner_edges[3])):
            cut += 1
        cls = int(types[iid]) if iid < len(types) else 1
        channel = 0 if probabilities.shape[-1] == 1 else cls
        probability = float(probabilities[window][..., channel][mask].mean())
        outlines.append(outline.astype(np.float64) + (xs.start + ox, ys.start + oy))
        for key, value in zip(NUCLEUS_FIELDS, (cls, probability, y, x, int(areas[iid - 1]),
                                               ys.start + oy, xs.start + ox, ys.stop + oy,
                                               xs.stop + ox)):
            columns[key].append(value)
    return {k: np.asarray(v) for k, v in columns.items()}, outlines, cut
