"""MoNuSeg 2018 (Kumar et al.): Aperio ImageScope XML annotations to instance maps.

Layouts accepted under ``--src``: the training release (``Tissue Images/*.tif`` and
``Annotations/*.xml``), the test release (images and XML side by side), or any tree where each
image has an XML file of the same stem. Each ``<Region>`` is one nucleus whose ``<Vertex X= Y=>``
polygon (float pixel coordinates, sometimes slightly outside the image) is clipped to the image
and filled with its own instance id.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from xsight_keras.data.images import read_image
from xsight_keras.data.prepared import PreparedWriter
from xsight_keras.labels import relabel_sequential

CLASS_NAMES = ("background", "nucleus")
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def read_aperio_polygons(path) -> list[np.ndarray]:
    """Read the nucleus polygons of an Aperio ImageScope XML file.

    Returns one float64 (V, 2) array of (x, y) vertices per ``<Region>``, in file order. Raises
    ``ValueError`` naming the file for malformed XML or a vertex without numeric X/Y. A region
    with fewer than 3 vertices encloses no area: it is left out with a warning naming the file
    and the region ids (the released MoNuSeg 2018 training set has two, in
    TCGA-50-5931-01Z-00-DX1 and TCGA-E2-A1B5-01Z-00-DX1, each with 2 vertices).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from exc
    except OSError as exc:
        raise FileNotFoundError(f"annotation file cannot be read: {path} ({exc})") from exc
    regions = root.findall(".//Region")
    polygons, degenerate = [], []
    for region in regions:
        rid = region.get("Id", "?")
        vertices = region.findall("./Vertices/Vertex")
        if len(vertices) < 3:
            degenerate.append(f"Id={rid} ({len(vertices)} vertices)")
            continue
        try:
            coords = [(float(v.get("X")), float(v.get("Y"))) for v in vertices]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: region Id={rid} has a vertex without numeric X/Y") from exc
        polygons.append(np.asarray(coords, dtype=np.float64))
    if degenerate:
        warnings.warn(f"{path}: left out {len(degenerate)} region(s) with fewer than 3 vertices, "
                      f"which enclose no area: {', '.join(degenerate)}", stacklevel=2)
    return polygons


def rasterize_polygons(polygons, height: int, width: int) -> np.ndarray:
    """Fill each polygon with its id (1-based, list order) into an int32 (H, W) instance map.

    Vertices are clipped to the image and rounded to the nearest pixel centre. Where polygons
    overlap, the later one wins (deterministic: the file order decides).
    """
    instances = np.zeros((height, width), np.int32)
    for iid, poly in enumerate(polygons, start=1):
        pts = np.empty_like(poly)
        pts[:, 0] = np.clip(poly[:, 0], 0, width - 1)
        pts[:, 1] = np.clip(poly[:, 1], 0, height - 1)
        cv2.fillPoly(instances, [np.rint(pts).astype(np.int32)], int(iid))
    return instances


def find_monuseg_pairs(src) -> list[tuple[Path, Path]]:
    """Pair every image under ``src`` with the XML annotation of the same stem.

    Returns (image, xml) pairs sorted by name. Raises ``FileNotFoundError`` when ``src`` has no
    image, or naming each image that has no annotation.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"MoNuSeg folder {src} does not exist")
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    xmls = {p.stem: p for p in src.rglob("*.xml")}
    if not images:
        raise FileNotFoundError(f"no .tif/.png images under {src}")
    missing = [p.name for p in images if p.stem not in xmls]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} MoNuSeg image(s) under {src} have no XML annotation of the same "
            f"name: {', '.join(missing[:5])}"
        )
    return [(p, xmls[p.stem]) for p in images]


def read_monuseg_sample(image_path, xml_path) -> tuple[np.ndarray, np.ndarray]:
    """Read one MoNuSeg image (uint8 RGB (H, W, 3)) and its int32 (H, W) instance map."""
    image = read_image(image_path, channels=3)
    polygons = read_aperio_polygons(xml_path)
    # ids of polygons entirely covered by later ones disappear without leaving gaps
    instances, _ = relabel_sequential(rasterize_polygons(polygons, *image.shape[:2]))
    return image, instances


def prepare_monuseg(src, out_dir, progress: bool = True, val_fraction: float = 0.0,
                    seed: int = 0, val_ids=None) -> list[Path]:
    """Prepare every image/XML pair under ``src`` (full size).

    Without ``val_fraction`` or ``val_ids`` one split is written to ``out_dir``. With either,
    ``out_dir`` is the dataset root and the images go to ``out_dir/valid`` and ``out_dir/train``
    (MoNuSeg has no official validation set): ``val_ids`` names the validation images by file
    stem (each must exist: a ``ValueError`` names the missing ones); ``val_fraction`` (0 < f < 1)
    holds out a seeded random ``f`` of the images (at least one). Returns the split folders.
    """
    pairs = find_monuseg_pairs(src)
    if val_ids:
        wanted = set(val_ids)
        missing = sorted(wanted - {p.stem for p, _ in pairs})
        if missing:
            raise ValueError(f"validation image(s) {missing} are not under {src}")
        if len(wanted) == len(pairs):
            raise ValueError(f"val_ids name all {len(pairs)} images under {src}: none left to train")
        valid = [pair for pair in pairs if pair[0].stem in wanted]
        train = [pair for pair in pairs if pair[0].stem not in wanted]
        return [_write_monuseg(train, Path(out_dir) / "train", src, progress),
                _write_monuseg(valid, Path(out_dir) / "valid", src, progress)]
    if not val_fraction:
        return [_write_monuseg(pairs, Path(out_dir), src, progress)]
    if not 0 < val_fraction < 1 or len(pairs) < 2:
        raise ValueError(f"val_fraction must be in (0, 1) with at least 2 images, got {val_fraction} "
                         f"for {len(pairs)} image(s) under {src}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, int(round(val_fraction * len(pairs))))
    valid = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    return [_write_monuseg(train, Path(out_dir) / "train", src, progress),
            _write_monuseg(valid, Path(out_dir) / "valid", src, progress)]


def _write_monuseg(pairs, out_dir: Path, src, progress: bool) -> Path:
    # A first pass learns the sizes (and rejects unreadable files before anything is written).
    shapes = [read_image(p, 3).shape for p, _ in pairs]
    with PreparedWriter(out_dir, shapes, CLASS_NAMES, source=str(src),
                        extra_meta={"dataset": "monuseg"}) as writer:
        for i, (image_path, xml_path) in enumerate(tqdm(pairs, desc=f"MoNuSeg → {out_dir}",
                                                        disable=not progress)):
            image, instances = read_monuseg_sample(image_path, xml_path)
            writer.write(i, image, (instances > 0).astype(np.uint8), instances, name=image_path.stem)
    return out_dir
