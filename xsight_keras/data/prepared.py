"""The prepared on-disk format that every dataset is converted to, and its memory-mapped reader.

A prepared split is a folder holding

* ``images.npy``    uint8 (N, H, W, C), C = 3 (RGB) or 1 (grayscale)
* ``classes.npy``   uint8 (N, H, W): 0 = background, 1..K-1 = nucleus classes
* ``instances.npy`` int32 (N, H, W): 0 = background, ids 1.. unique within each image
* ``meta.json``     class names, per-class pixel and instance counts, sample names, source
* ``tissues.npy``   optional (N,) unicode tissue names (PanNuke)

When images differ in size (image/mask folders), the three arrays are flat (one axis: all pixels
of all images one after the other) and ``shapes.npy`` (N, 3) and ``offsets.npy`` (N + 1,) say
where each image lies. Either way the arrays open with ``np.load(..., mmap_mode="r")``: opening a
split costs almost no memory whatever its size, and a sample is read when it is indexed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xsight_keras.labels import count_classes

ARRAYS = ("images", "classes", "instances")
DTYPES = {"images": np.uint8, "classes": np.uint8, "instances": np.int32}
FORMAT_VERSION = 1


@dataclass
class Sample:
    """One prepared sample: ``image`` uint8 (H, W, C), ``classes`` uint8 (H, W), ``instances`` int32 (H, W)."""

    image: np.ndarray
    classes: np.ndarray
    instances: np.ndarray
    name: str = ""


class PreparedWriter:
    """Write a prepared split chunk by chunk, then move it into place atomically.

    ``shapes``: a list of (H, W, C) per sample (ragged layout when they differ). Arrays are
    written through memory maps in a temporary folder beside ``out_dir``; :meth:`close` writes
    ``meta.json`` and renames the folder to ``out_dir``, so a crash never leaves a half-written
    split where a good one is expected. Use as a context manager.
    """

    def __init__(self, out_dir, shapes, class_names, source: str = "", extra_meta=None):
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        self.source = source
        self.extra_meta = dict(extra_meta or {})
        self.names: list[str] = [""] * len(self.shapes)
        self.ragged = len(np.unique(self.shapes, axis=0)) > 1
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        n = len(self.shapes)
        self.pixels = np.zeros(len(self.class_names), np.int64)
        self.nuclei = np.zeros(len(self.class_names), np.int64)
        self._written = np.zeros(n, bool)
        if self.ragged:
            hw = self.shapes[:, 0] * self.shapes[:, 1]
            self.offsets = np.concatenate([[0], np.cumsum(hw)])
            channels = int(self.shapes[0, 2])
            if np.any(self.shapes[:, 2] != channels):
                raise ValueError(f"{out_dir}: images mix channel counts {sorted(set(self.shapes[:, 2]))}")
            total = int(self.offsets[-1])
            array_shapes = {"images": (total, channels), "classes": (total,), "instances": (total,)}
        else:
            h, w, c = (int(v) for v in self.shapes[0]) if n else (0, 0, 3)
            array_shapes = {"images": (n, h, w, c), "classes": (n, h, w), "instances": (n, h, w)}
        for key in ARRAYS:  # create each file at its full size, then map it only while writing
            np.lib.format.open_memmap(self.tmp / f"{key}.npy", mode="w+", dtype=DTYPES[key],
                                      shape=array_shapes[key])

    def _map(self, key):
        # A short-lived mapping per write keeps resident memory at one sample: pages of a
        # long-lived mapping count against the process until it is closed.
        return np.load(self.tmp / f"{key}.npy", mmap_mode="r+")

    def write(self, index: int, image, classes, instances, name: str = "") -> None:
        """Store sample ``index``: ``image`` uint8 (H, W, C), ``classes`` uint8 (H, W), ``instances`` int (H, W)."""
        expected = tuple(int(v) for v in self.shapes[index])
        if image.shape != expected or classes.shape != expected[:2] or instances.shape != expected[:2]:
            raise ValueError(
                f"{self.out_dir}: sample {index} ({name}): image {image.shape}, classes {classes.shape}, "
                f"instances {instances.shape} do not match the declared shape {expected}"
            )
        if classes.size and int(classes.max()) >= len(self.class_names):
            raise ValueError(f"{self.out_dir}: sample {index} ({name}): class {int(classes.max())} out of range "
                             f"for {len(self.class_names)} classes")
        values = {"images": image, "classes": classes, "instances": instances}
        for key, value in values.items():
            target = self._map(key)
            if self.ragged:
                a, b = self.offsets[index], self.offsets[index + 1]
                target[a:b] = value.reshape(b - a, -1) if key == "images" else value.ravel()
            else:
                target[index] = value
            target.flush()
            del target
        pixels, nuclei = count_classes(classes[None], instances[None], len(self.class_names))
        self.pixels += pixels
        self.nuclei += nuclei
        self.names[index] = name
        self._written[index] = True

    def close(self) -> Path:
        """Flush, write ``meta.json`` (and ``shapes``/``offsets`` when ragged), move into place."""
        if not self._written.all():
            missing = np.flatnonzero(~self._written)[:5].tolist()
            raise RuntimeError(f"{self.out_dir}: samples {missing} were never written")
        if self.ragged:
            np.save(self.tmp / "shapes.npy", self.shapes)
            np.save(self.tmp / "offsets.npy", self.offsets)
        tissues = self.extra_meta.pop("tissues", None)
        if tissues is not None:
            np.save(self.tmp / "tissues.npy", np.asarray(tissues, dtype=str))
        meta = {
            "format_version": FORMAT_VERSION,
            "num_samples": len(self.shapes),
            "class_names": self.class_names,
            "pixel_counts": self.pixels.tolist(),
            "instance_counts": self.nuclei.tolist(),
            "names": self.names,
            "source": self.source,
            **self.extra_meta,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class PreparedDataset:
    """Read-only, memory-mapped access to a prepared split.

    ``ds[i]`` returns a :class:`Sample`; ``len(ds)`` the number of samples. Attributes:
    ``class_names``, ``pixel_counts`` / ``instance_counts`` (int64 per class), ``names``,
    ``tissues`` (array of str or ``None``), ``channels``. Raises ``FileNotFoundError`` or
    ``ValueError`` naming the file when the folder is not a complete prepared split.
    """

    def __init__(self, root):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a prepared dataset split (no meta.json); "
                f"create one with scripts/prepare_data.py"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        self.arrays = {key: self._open(key) for key in ARRAYS}
        self.ragged = (self.root / "shapes.npy").is_file()
        n = int(self.meta["num_samples"])
        if self.ragged:
            self.shapes = np.load(self.root / "shapes.npy")
            self.offsets = np.load(self.root / "offsets.npy")
            lengths = {key: len(a) for key, a in self.arrays.items()}
            if len(self.shapes) != n or any(v != self.offsets[-1] for v in lengths.values()):
                raise ValueError(f"{self.root}: arrays do not match shapes.npy/offsets.npy")
        else:
            for key, array in self.arrays.items():
                if len(array) != n or array.shape[1:3] != self.arrays["images"].shape[1:3]:
                    raise ValueError(
                        f"{self.root / (key + '.npy')}: shape {array.shape} does not match "
                        f"{n} samples of {self.arrays['images'].shape[1:3]}"
                    )
        tissues = self.root / "tissues.npy"
        self.tissues = np.load(tissues) if tissues.is_file() else None

    def _open(self, key):
        path = self.root / f"{key}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the prepared split {self.root}")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: cannot be read as a .npy array ({exc}); truncated?") from exc
        if array.dtype != DTYPES[key]:
            raise ValueError(f"{path}: dtype {array.dtype}, expected {np.dtype(DTYPES[key])}")
        return array

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def pixel_counts(self) -> np.ndarray:
        return np.asarray(self.meta["pixel_counts"], np.int64)

    @property
    def instance_counts(self) -> np.ndarray:
        return np.asarray(self.meta["instance_counts"], np.int64)

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    @property
    def channels(self) -> int:
        return int(self.arrays["images"].shape[-1])

    def shape(self, index: int) -> tuple[int, int, int]:
        """(H, W, C) of sample ``index`` without reading its pixels."""
        if self.ragged:
            return tuple(int(v) for v in self.shapes[index])
        return tuple(int(v) for v in self.arrays["images"].shape[1:])

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def window(self, index: int, y: int, x: int, height: int, width: int) -> Sample:
        """Rows ``y:y+height`` and columns ``x:x+width`` of sample ``index``: only that window is
        read from the memory-mapped arrays (a 256² crop of a 1000² image reads 7 % of it).
        The window must lie inside the image."""
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples in {self.root}")
        h, w, c = self.shape(index)
        if y < 0 or x < 0 or y + height > h or x + width > w:
            raise ValueError(f"{self.root}: window ({y}, {x}, {height}, {width}) outside sample "
                             f"{index} of {h}×{w}")
        rows, cols = slice(y, y + height), slice(x, x + width)
        if self.ragged:
            a, b = self.offsets[index], self.offsets[index + 1]
            image = np.array(self.arrays["images"][a:b].reshape(h, w, c)[rows, cols])
            classes, instances = (np.array(self.arrays[k][a:b].reshape(h, w)[rows, cols])
                                  for k in ("classes", "instances"))
        else:
            image, classes, instances = (np.array(self.arrays[k][index, rows, cols]) for k in ARRAYS)
        return Sample(image, classes, instances, self.meta["names"][index])

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples in {self.root}")
        index %= n
        if self.ragged:
            a, b = self.offsets[index], self.offsets[index + 1]
            h, w, c = self.shape(index)
            image = np.array(self.arrays["images"][a:b]).reshape(h, w, c)
            classes = np.array(self.arrays["classes"][a:b]).reshape(h, w)
            instances = np.array(self.arrays["instances"][a:b]).reshape(h, w)
        else:
            image, classes, instances = (np.array(self.arrays[k][index]) for k in ARRAYS)
        return Sample(image, classes, instances, self.meta["names"][index])
