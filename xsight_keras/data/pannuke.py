"""PanNuke (Gamper et al. 2019/2020): find the folds and convert them to the prepared format.

Source per fold: ``images.npy`` (N, 256, 256, 3) float 0–255, ``masks.npy`` (N, 256, 256, 6)
with instance ids of Neoplastic, Inflammatory, Connective, Dead, Epithelial in channels 0–4
(ids unique only within a channel) and background in channel 5, ``types.npy`` (N,) tissue names.
Folders are spelled differently between copies (``Fold 1/images/fold1``, ``Fold1``, ``fold_1``):
files are found by name under the given root.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xsight_keras.data.prepared import PreparedWriter

CLASS_NAMES = ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
TISSUES = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck",
    "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis",
    "Thyroid", "Uterus",
)
SOURCE_FILES = ("images.npy", "masks.npy", "types.npy")
# Standard three-fold protocol: (train, val, test) folds.
ROTATIONS = ((1, 2, 3), (2, 1, 3), (3, 2, 1))


def _fold_number(path: Path, root: Path) -> int | None:
    for part in reversed(path.relative_to(root).parts[:-1]):
        match = re.fullmatch(r"fold[\s_-]*(\d+)", part.strip().lower())
        if match:
            return int(match.group(1))
    return None


def find_pannuke_folds(root) -> dict[int, dict[str, Path]]:
    """Locate ``images.npy``, ``masks.npy`` and ``types.npy`` of each fold under ``root``.

    Returns ``{fold: {"images": path, "masks": path, "types": path}}``. The fold number is read
    from the nearest folder named like ``fold1``, ``Fold 1`` or ``fold_1``. Raises
    ``FileNotFoundError`` when no fold or one of a fold's files is missing, naming what was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PanNuke root {root} does not exist")
    folds: dict[int, dict[str, Path]] = {}
    for name in SOURCE_FILES:
        for path in sorted(root.rglob(name)):
            fold = _fold_number(path, root)
            if fold is None:
                continue
            key = name.removesuffix(".npy")
            if key in folds.setdefault(fold, {}):
                raise ValueError(f"fold {fold} has two {name}: {folds[fold][key]} and {path}")
            folds[fold][key] = path
    if not folds:
        raise FileNotFoundError(
            f"no PanNuke fold found under {root}: expected images.npy, masks.npy and types.npy "
            f"inside folders named like 'Fold 1/images/fold1'. Download the three folds from "
            f"https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke and unzip them there."
        )
    for fold, files in sorted(folds.items()):
        missing = [n for n in SOURCE_FILES if n.removesuffix(".npy") not in files]
        if missing:
            raise FileNotFoundError(
                f"PanNuke fold {fold} under {root} lacks {', '.join(missing)} "
                f"(found {', '.join(str(p) for p in files.values())})"
            )
    return dict(sorted(folds.items()))


def masks_to_maps(masks: np.ndarray, source: str = "masks.npy") -> tuple[np.ndarray, np.ndarray]:
    """Convert PanNuke 6-channel masks to a class map and a merged instance map.

    ``masks``: (B, H, W, 6) numeric, channels 0–4 instance ids per class, channel 5 background.
    Returns ``classes`` uint8 (B, H, W) with 0 = background and 1–5 the classes in channel order,
    and ``instances`` int32 (B, H, W) with ids 1..n unique per image, numbered channel by channel
    in increasing source id. Where two channels claim a pixel (rare annotation overlaps) the later
    channel wins, for classes and instances alike.
    """
    if masks.ndim != 4 or masks.shape[-1] != 6:
        raise ValueError(f"{source}: expected masks of shape (N, H, W, 6), got {masks.shape}")
    ids = np.asarray(masks[..., :5])
    if np.any(ids < 0) or np.any(ids != np.floor(ids)):
        raise ValueError(f"{source}: instance ids must be non-negative integers")
    ids = ids.astype(np.int64)
    b = len(ids)
    classes = np.zeros(ids.shape[:3], np.uint8)
    instances = np.zeros(ids.shape[:3], np.int32)
    for i in range(b):
        offset = 0
        for c in range(5):
            channel = ids[i, ..., c]
            fg = channel > 0
            if not fg.any():
                continue
            unique, inverse = np.unique(channel[fg], return_inverse=True)
            classes[i][fg] = c + 1
            instances[i][fg] = inverse.astype(np.int32) + offset + 1
            offset += len(unique)
    return classes, instances


def prepare_pannuke_fold(files: dict[str, Path], out_dir, chunk_size: int = 16,
                         progress: bool = True) -> Path:
    """Convert one PanNuke fold to a prepared split in ``out_dir``.

    Sources are memory-mapped and converted ``chunk_size`` tiles at a time, so peak memory is a
    few chunks (well under 2 GB) whatever the fold size. Images are clipped to 0–255 and rounded
    to uint8. Writes images, classes, instances, tissue types and per-class counts.
    """
    images = _load(files["images"])
    masks = _load(files["masks"])
    types = np.load(files["types"], allow_pickle=False)
    n = len(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{files['images']}: expected (N, H, W, 3) images, got {images.shape}")
    if masks.shape[:3] != images.shape[:3]:
        raise ValueError(
            f"{files['masks']}: shape {masks.shape} does not match {files['images']} {images.shape}"
        )
    if types.shape != (n,):
        raise ValueError(f"{files['types']}: expected {n} tissue names, got shape {types.shape}")
    types = types.astype(str)
    unknown = sorted(set(types) - set(TISSUES))
    if unknown:
        raise ValueError(f"{files['types']}: unknown tissue types {unknown[:5]}")
    h, w = images.shape[1:3]
    del images, masks
    with PreparedWriter(out_dir, [(h, w, 3)] * n, CLASS_NAMES, source=str(files["images"].parent),
                        extra_meta={"tissues": types, "dataset": "pannuke"}) as writer:
        for start in tqdm(range(0, n, chunk_size), desc=f"PanNuke → {out_dir}", unit="chunk",
                          disable=not progress):
            stop = min(start + chunk_size, n)
            # Re-map per chunk: a mapping held for the whole fold would keep every page read so
            # far resident (about 12 GB for a fold of float64 images and masks).
            chunk = np.asarray(_load(files["images"])[start:stop], dtype=np.float32)
            mask_chunk = np.array(_load(files["masks"])[start:stop])
            if not np.isfinite(chunk).all() or chunk.min() < 0 or chunk.max() > 255.5:
                raise ValueError(f"{files['images']}: tiles {start}–{stop - 1} have values "
                                 f"outside 0–255 (or non-finite)")
            classes, instances = masks_to_maps(mask_chunk, str(files["masks"]))
            image_u8 = np.clip(np.rint(chunk), 0, 255).astype(np.uint8)
            for i in range(stop - start):
                writer.write(start + i, image_u8[i], classes[i], instances[i], name=f"{start + i}")
    return Path(out_dir)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: cannot be read as a .npy array ({exc}); truncated?") from exc


def prepare_pannuke(src, out, folds=None, chunk_size: int = 16, progress: bool = True) -> list[Path]:
    """Prepare every fold found under ``src`` (or only ``folds``) into ``out/fold{k}``."""
    found = find_pannuke_folds(src)
    wanted = sorted(found) if folds is None else list(folds)
    missing = [f for f in wanted if f not in found]
    if missing:
        raise FileNotFoundError(f"PanNuke fold(s) {missing} not found under {src} (found {sorted(found)})")
    return [prepare_pannuke_fold(found[f], Path(out) / f"fold{f}", chunk_size, progress) for f in wanted]
