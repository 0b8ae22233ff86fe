"""A deterministic synthetic H&E-like dataset in the prepared PanNuke format.

Tiles show pink, fibrous stroma with purple nuclei of the five PanNuke classes, which differ the
way real ones do (so a model has something to learn):

============  ===========  =======================  ===================================
class         size (px)    shape                    colour and texture
============  ===========  =======================  ===================================
neoplastic    radius 9–13  large, irregular outline dark violet, coarse chromatin speckle
inflammatory  radius 4–6   small, round             almost black-blue, uniform
connective    10–15 × 3–4  elongated spindle        mid purple, smooth
dead          radius 3–5   small, fragmented blobs  very dark, with a bright eosinophilic halo
epithelial    radius 7–9   round-oval               light purple, vesicular with a nucleolus
============  ===========  =======================  ===================================

Nuclei may touch (centres are only kept apart by about the sum of their radii, minus a pixel or
two), so instance separation is not trivial. Tile ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from xsight_keras.data.pannuke import CLASS_NAMES
from xsight_keras.data.prepared import PreparedWriter
from xsight_keras.labels import relabel_sequential

DEMO_TISSUES = ("Breast", "Colon", "Kidney", "Lung")
# class id -> mean RGB of the nucleus
_COLOURS = {
    1: (92, 40, 120),   # neoplastic
    2: (38, 28, 92),    # inflammatory
    3: (128, 76, 150),  # connective
    4: (30, 16, 40),    # dead
    5: (150, 110, 180), # epithelial
}
# per tissue: relative frequency of classes 1..5
_TISSUE_MIX = {
    "Breast": (0.45, 0.2, 0.15, 0.05, 0.15),
    "Colon": (0.25, 0.25, 0.15, 0.05, 0.30),
    "Kidney": (0.15, 0.2, 0.3, 0.05, 0.30),
    "Lung": (0.3, 0.35, 0.2, 0.1, 0.05),
}


def _outline(rng, cx, cy, rx, ry, angle, irregularity, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = 1 + irregularity * sum(
        rng.uniform(-1, 1) * np.sin(k * t + rng.uniform(0, 2 * np.pi)) / k for k in (2, 3, 5)
    )
    x, y = rx * wobble * np.cos(t), ry * wobble * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _nucleus_polygons(rng, cls, cx, cy):
    """Polygons (list of (V, 2) float arrays) and a nominal radius for one nucleus of class ``cls``."""
    angle = rng.uniform(0, np.pi)
    if cls == 1:
        r = rng.uniform(9, 13)
        return [_outline(rng, cx, cy, r, r * rng.uniform(0.75, 1.0), angle, 0.25)], r
    if cls == 2:
        r = rng.uniform(4, 6)
        return [_outline(rng, cx, cy, r, r, angle, 0.05)], r
    if cls == 3:
        rx, ry = rng.uniform(10, 15), rng.uniform(3, 4)
        return [_outline(rng, cx, cy, rx, ry, angle, 0.08)], rx
    if cls == 4:
        r = rng.uniform(3, 5)
        parts = [_outline(rng, cx, cy, r, r * 0.8, angle, 0.2)]
        for _ in range(rng.integers(1, 3)):
            dx, dy = rng.normal(0, r, size=2)
            parts.append(_outline(rng, cx + dx, cy + dy, r * 0.5, r * 0.4, angle, 0.2, n=12))
        return parts, r * 1.6
    r = rng.uniform(7, 9)
    return [_outline(rng, cx, cy, r, r * rng.uniform(0.8, 1.0), angle, 0.1)], r


def _stroma(rng, size):
    """Pink eosinophilic background with fibre texture, uint8 (size, size, 3)."""
    base = np.array([236, 190, 214], np.float32) + rng.normal(0, 6, 3)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 3)
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0),
                              sigmaX=8, sigmaY=1)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(0, 180), 1.0)
    fibres = cv2.warpAffine(fibres, m, (size, size), borderMode=cv2.BORDER_REFLECT)
    shade = 18 * noise + 40 * fibres
    tint = np.array([-0.5, -1.0, -0.6], np.float32)  # fibres are deeper pink
    return np.clip(base + shade[..., None] * tint, 0, 255)


def demo_tile(seed: int, index: int, size: int = 256):
    """Generate tile ``index``: image uint8 (size, size, 3), classes uint8, instances int32, tissue."""
    rng = np.random.default_rng([seed, index])
    tissue = DEMO_TISSUES[rng.integers(len(DEMO_TISSUES))]
    image = _stroma(rng, size)
    classes = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    n_target = int(rng.integers(10, 40)) if rng.random() > 0.03 else 0  # a few empty tiles
    placed: list[tuple[float, float, float]] = []
    mix = np.asarray(_TISSUE_MIX[tissue])
    attempts = 0
    white = rng.normal(0, 1, (3, size, size)).astype(np.float32)
    textures = (  # coarse chromatin (neoplastic), vesicular (epithelial), fine (others)
        cv2.GaussianBlur(white[0], (0, 0), 1.2) * 40,
        cv2.GaussianBlur(white[1], (0, 0), 2) * 15,
        cv2.GaussianBlur(white[2], (0, 0), 1) * 8,
    )
    while len(placed) < n_target and attempts < 400:
        attempts += 1
        cls = int(rng.choice(5, p=mix)) + 1
        cx, cy = rng.uniform(4, size - 4, size=2)
        polygons, radius = _nucleus_polygons(rng, cls, cx, cy)
        # touching allowed: centres may come 1–2 px closer than the sum of radii
        if any(np.hypot(cx - x, cy - y) < radius + r - rng.uniform(0, 2.5) for x, y, r in placed):
            continue
        placed.append((cx, cy, radius))
        iid = len(placed)
        pts = [np.rint(p).astype(np.int32) for p in polygons]
        allpts = np.concatenate(pts)
        x0, y0 = np.clip(allpts.min(0) - 3, 0, size)
        x1, y1 = np.clip(allpts.max(0) + 4, 0, size)
        if x1 <= x0 or y1 <= y0:
            continue
        win = np.s_[y0:y1, x0:x1]  # work on the nucleus' bounding box only
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [p - (x0, y0) for p in pts], 1)
        free = instances[win] == 0
        region = mask.astype(bool) & free
        patch = image[win]
        if cls == 4:  # bright eosinophilic halo around dead cells
            ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool) & ~mask.astype(bool)
            ring &= free
            patch[ring] = patch[ring] * 0.4 + np.array([250, 170, 200], np.float32) * 0.6
        colour = np.array(_COLOURS[cls], np.float32) + rng.normal(0, 8, 3)
        texture = textures[{1: 0, 5: 1}.get(cls, 2)][win][region]
        patch[region] = colour + texture[:, None] * np.array([0.6, 0.5, 0.6], np.float32)
        if cls == 5:  # a dark nucleolus
            dot = cv2.circle(np.zeros_like(mask), (int(cx) - x0, int(cy) - y0), 2, 1, -1)
            patch[dot.astype(bool) & region] = (70, 30, 90)
        classes[win][region] = cls
        instances[win][region] = iid
    image = cv2.GaussianBlur(image, (3, 3), 0.7) + rng.normal(0, 3, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, classes, relabel_sequential(instances)[0], tissue


DEMO_SPLITS = {"train": 0, "valid": 1, "test": 2}


def write_demo_dataset(out, sizes=None, seed: int = 0, tile_size: int = 256) -> dict[str, Path]:
    """Write the demo set as prepared splits ``out/{train,valid,test}`` (PanNuke format).

    ``sizes``: tiles per split, default ``{"train": 192, "valid": 48, "test": 48}``. Splits use
    disjoint random streams, so the same ``seed`` always gives the same tiles. Returns the paths.
    """
    sizes = dict(sizes or {"train": 192, "valid": 48, "test": 48})
    written = {}
    for split, n in sizes.items():
        stream = seed * 10 + DEMO_SPLITS.get(split, len(DEMO_SPLITS))
        tiles = [demo_tile(stream, i, tile_size) for i in range(n)]
        with PreparedWriter(Path(out) / split, [(tile_size, tile_size, 3)] * n, CLASS_NAMES,
                            source=f"xsight_keras demo generator, seed {seed}",
                            extra_meta={"dataset": "demo", "tissues": [t[3] for t in tiles]}) as w:
            for i, (image, classes, instances, _) in enumerate(tiles):
                w.write(i, image, classes, instances, name=f"{split}_{i}")
        written[split] = Path(out) / split
    return written
