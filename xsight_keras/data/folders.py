"""Image/mask folders (the PGU-Net layout): ``{train,valid,test}/{images,masks}/``.

Images and masks carry identical file names (or identical stems, e.g. ``a.jpg`` / ``a.png``),
``.jpg/.jpeg/.png/.tif``, any size, grayscale or RGB; masks are binary 0/255 and thresholded at
128 (JPEG masks have compression noise). Pre-augmented copies named ``flipped_*``, ``mirrored_*``
or ``rotated_<angle>_*`` are used only with ``use_augmented=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from xsight_keras.data.images import IMAGE_SUFFIXES, read_image
from xsight_keras.data.prepared import PreparedWriter

CLASS_NAMES = ("background", "nucleus")
SPLITS = ("train", "valid", "test")
# JPEG mask edges: grey pixels within EDGE_BAND px of the 0/255 border are compression noise
# (real Pap-smear masks: at most 9.6 % grey pixels, at most 0.6 % of pixels grey farther away)
EDGE_BAND = 3
MAX_GREY_FRACTION = 0.25
MAX_STRAY_GREY_FRACTION = 0.02
AUGMENTED_PREFIX = re.compile(r"^(flipped_|mirrored_|rotated_-?\d+(\.\d+)?_)")


def is_augmented_copy(name: str) -> bool:
    """True for the pre-augmented copies' names (``flipped_``, ``mirrored_``, ``rotated_<angle>_``)."""
    return AUGMENTED_PREFIX.match(name) is not None


def count_augmented_copies(split_dir) -> int:
    """How many images of ``split_dir/images`` are pre-augmented copies (:func:`is_augmented_copy`)."""
    folder = Path(split_dir) / "images"
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir()
               if p.suffix.lower() in IMAGE_SUFFIXES and is_augmented_copy(p.name))


def find_folder_pairs(split_dir, use_augmented: bool = False) -> list[tuple[Path, Path]]:
    """(image, mask) path pairs of one split folder holding ``images/`` and ``masks/``.

    Pairs by identical name, else by identical stem. Raises ``FileNotFoundError`` when a folder is
    missing or empty, and ``ValueError`` listing images without a mask and masks without an image.
    """
    split_dir = Path(split_dir)
    found = {}
    for sub in ("images", "masks"):
        folder = split_dir / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist (expected {split_dir}/images and /masks)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not use_augmented:
            files = [p for p in files if not is_augmented_copy(p.name)]
        found[sub] = files
    if not found["images"]:
        raise FileNotFoundError(f"{split_dir / 'images'} holds no .png/.jpg/.tif image")
    masks_by_name = {p.name: p for p in found["masks"]}
    masks_by_stem = {p.stem: p for p in found["masks"]}
    pairs, unmatched = [], []
    for image in found["images"]:
        mask = masks_by_name.get(image.name) or masks_by_stem.get(image.stem)
        if mask is None:
            unmatched.append(image.name)
        else:
            pairs.append((image, mask))
    used = {m for _, m in pairs}
    orphans = [m.name for m in found["masks"] if m not in used]
    if unmatched or orphans:
        raise ValueError(
            f"{split_dir}: images and masks do not pair up by name; images without a mask: "
            f"{unmatched[:5]}; masks without an image: {orphans[:5]}"
        )
    return pairs


def read_binary_mask(path, stats: dict | None = None) -> np.ndarray:
    """Read a 0/255 mask file as uint8 (H, W) with values 0/1 (threshold at 128).

    ``stats``, when given, is a dict whose ``grey_pixels`` and ``pixels`` counts (and
    ``masks_with_grey``) are increased by this mask's ambiguous (mid-grey, 33–223) and total
    pixels, so a caller can report how much thresholding decided.

    JPEG masks have soft, ringing edges: mid-grey pixels next to the border between the two
    levels are expected (up to ~10 % of a small mask's pixels in real sets) and thresholded.
    Raises ``ValueError`` naming the file when the values are not a binary 0/255 mask: class
    indices (all values below 128, e.g. 0/1), or mid-grey pixels away from any such border, or
    too many of them (a grey-level picture rather than a mask).
    """
    mask = read_image(path, channels=1)[..., 0]
    top = int(mask.max())
    if 0 < top < 128:
        raise ValueError(f"{path}: mask values are 0..{top}, expected 0/255 (a label-index mask "
                         f"would come out empty after thresholding at 128)")
    binary = mask >= 128
    grey = (mask > 32) & (mask < 224)
    edges = (ndimage.binary_dilation(binary, iterations=EDGE_BAND)
             & ~ndimage.binary_erosion(binary, iterations=EDGE_BAND, border_value=1))
    stray = np.count_nonzero(grey & ~edges)
    if grey.mean() > MAX_GREY_FRACTION or stray > MAX_STRAY_GREY_FRACTION * mask.size:
        raise ValueError(f"{path}: {100 * grey.mean():.0f}% of pixels are neither near 0 nor "
                         f"near 255 ({100 * stray / mask.size:.1f}% away from the mask's edges); "
                         f"expected a binary 0/255 mask")
    if stats is not None:
        count = int(np.count_nonzero(grey))
        stats["grey_pixels"] = stats.get("grey_pixels", 0) + count
        stats["pixels"] = stats.get("pixels", 0) + mask.size
        stats["masks_with_grey"] = stats.get("masks_with_grey", 0) + (count > 0)
    return binary.astype(np.uint8)


def read_folder_sample(image_path, mask_path, channels: int = 3, stats: dict | None = None):
    """Read an image (uint8 (H, W, channels)) and its mask as (classes uint8, instances int32).

    Instances are the 8-connected components of the mask. Raises ``ValueError`` naming both files
    when their sizes differ. ``stats``: see :func:`read_binary_mask`.
    """
    image = read_image(image_path, channels)
    classes = read_binary_mask(mask_path, stats)
    if classes.shape != image.shape[:2]:
        raise ValueError(f"{image_path} is {image.shape[1]}×{image.shape[0]} but its mask "
                         f"{mask_path} is {classes.shape[1]}×{classes.shape[0]}")
    instances, _ = ndimage.label(classes, structure=np.ones((3, 3), int))
    return image, classes, instances.astype(np.int32)


def prepare_folders(src, out, use_augmented: bool = False, channels: int = 3,
                    progress: bool = True) -> list[Path]:
    """Prepare each split folder (``train``, ``valid``, ``test``) found under ``src`` into ``out/<split>``.

    Each split's ``meta.json`` records ``augmented_copies``: how many pre-augmented copies
    (``flipped_``/``mirrored_``/``rotated_<angle>_``) its ``images/`` holds (``found``) and how
    many were prepared (``used``: all with ``use_augmented``, else none), and ``mask_grey``:
    how many mask pixels were mid-grey and decided by the threshold at 128 (soft JPEG edges;
    ``grey_pixels``, ``pixels``, ``masks_with_grey``, ``masks``)."""
    src = Path(src)
    splits = [s for s in SPLITS if (src / s).is_dir()]
    if not splits:
        raise FileNotFoundError(f"{src} has none of the split folders {SPLITS}")
    written = []
    for split in splits:
        pairs = find_folder_pairs(src / split, use_augmented)
        copies = count_augmented_copies(src / split)
        shapes = [read_image(i, channels).shape for i, _ in pairs]  # masks are read once, below
        grey = {"grey_pixels": 0, "pixels": 0, "masks_with_grey": 0, "masks": len(pairs)}
        meta = {"dataset": "folders", "use_augmented": use_augmented,
                "augmented_copies": {"found": copies, "used": copies if use_augmented else 0},
                "mask_grey": grey}  # filled in while the masks are read, written at close
        with PreparedWriter(Path(out) / split, shapes, CLASS_NAMES, source=str(src / split),
                            extra_meta=meta) as w:
            for k, (image_path, mask_path) in enumerate(
                tqdm(pairs, desc=f"{split} → {out}", disable=not progress)
            ):
                image, classes, instances = read_folder_sample(image_path, mask_path, channels,
                                                               grey)
                w.write(k, image, classes, instances, name=image_path.stem)
        written.append(Path(out) / split)
    return written
