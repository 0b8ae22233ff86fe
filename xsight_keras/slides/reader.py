"""Reading whole-slide images at the resolution a model was trained at, one region at a time.

OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel, which carries the C library)
reads Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX ``.mrxs``, generic tiled TIFF and more. A
level is never decoded whole: :meth:`SlideReader.read` reads one region of the pyramid level
closest to (and not coarser than) the model's microns per pixel and resamples it to exactly
that scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

#: a level whose microns per pixel is within this fraction of the target is read as it is
MPP_TOLERANCE = 0.05
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".dcm")


class SlideError(ValueError):
    """A slide that cannot be read or lacks what prediction needs; the message names the file."""


def _openslide():
    try:
        import openslide
    except ImportError as exc:  # the slides extra is not installed
        raise ImportError("whole-slide reading needs OpenSlide: pip install 'xsight-keras[slides]' "
                          "(openslide-python and the openslide-bin library wheel)") from exc
    return openslide


class SlideReader:
    """One slide opened for reading at ``target_mpp`` microns per pixel (the model's scale).

    ``mpp`` is the slide's resolution when its metadata (``openslide.mpp-x``/``-y``) has none;
    the metadata wins where it exists. Coordinates in :meth:`read` and
    :attr:`size` are pixels at the target scale ("model pixels"); :attr:`scale` converts them
    to level-0 pixels (slide pixels, QuPath's coordinates).
    """

    def __init__(self, path, target_mpp: float, mpp: float | None = None):
        openslide = _openslide()
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file")
        if target_mpp is None or target_mpp <= 0:
            raise SlideError(f"{self.path}: the model's microns per pixel is unknown (the run's "
                             "config.json has no mpp): pass --model_mpp")
        if mpp is not None and not mpp > 0:
            raise SlideError(f"{self.path}: --mpp must be a positive number of µm per pixel, got {mpp}")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({exc or type(exc).__name__})") from exc
        try:
            self.slide_mpp = self._metadata_mpp(fallback=mpp)
        except SlideError:
            self._slide.close()
            raise
        self.target_mpp = float(target_mpp)
        self.scale = self.target_mpp / self.slide_mpp  # level-0 pixels per model pixel
        w0, h0 = self._slide.dimensions
        self.size = (int(h0 / self.scale), int(w0 / self.scale))  # (height, width), model pixels
        self.level = self._choose_level()
        self.level_downsample = float(self._slide.level_downsamples[self.level])

    def _metadata_mpp(self, fallback: float | None = None) -> float:
        props = self._slide.properties
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                values.append(float(props[key]))
            except (KeyError, ValueError):
                pass
        if not values or not all(v > 0 and math.isfinite(v) for v in values):
            if fallback:
                return float(fallback)
            raise SlideError(f"{self.path}: the slide has no resolution in its metadata "
                             "(openslide.mpp-x/-y): pass --mpp with its microns per pixel "
                             "(about 0.25 at 40x, 0.5 at 20x)")
        return float(np.mean(values))

    def _choose_level(self) -> int:
        """The coarsest level that is at least as fine as the target (within the tolerance)."""
        best = 0
        for level, downsample in enumerate(self._slide.level_downsamples):
            if downsample <= self.scale * (1 + MPP_TOLERANCE):
                best = level
        return best

    @property
    def properties(self):
        return self._slide.properties

    def describe(self) -> dict:
        """What was read and how: for the slide's summary."""
        w0, h0 = self._slide.dimensions
        return {"slide": str(self.path), "vendor": self._slide.properties.get("openslide.vendor"),
                "level0_size": [h0, w0], "slide_mpp": self.slide_mpp,
                "model_mpp": self.target_mpp, "level_read": self.level,
                "level_downsample": self.level_downsample, "size_at_model_mpp": list(self.size)}

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of the region at model pixels (y, x) of size (h, w); outside the
        slide and transparent areas are white (glass). Raises :class:`SlideError` on a read the
        file cannot serve (a truncated or corrupt slide)."""
        openslide = _openslide()
        s = self.scale
        x0, y0 = int(round(x * s)), int(round(y * s))  # level-0 origin
        d = self.level_downsample
        lw, lh = max(1, int(math.ceil(w * s / d))), max(1, int(math.ceil(h * s / d)))
        try:
            rgba = np.asarray(self._slide.read_region((x0, y0), self.level, (lw, lh)))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: reading the region at ({x0}, {y0}) failed: {exc}") from exc
        rgb = _on_white(rgba)
        if (lh, lw) != (h, w):
            interpolation = cv2.INTER_AREA if lw > w else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (w, h), interpolation=interpolation)
        return rgb

    def thumbnail(self, mpp: float) -> np.ndarray:
        """uint8 RGB image of the whole slide at about ``mpp`` microns per pixel, read from the
        coarsest level that is fine enough in strips of rows (never a whole level at once)."""
        openslide = _openslide()
        factor = mpp / self.slide_mpp  # level-0 pixels per thumbnail pixel
        level = 0
        for i, downsample in enumerate(self._slide.level_downsamples):
            if downsample <= factor:
                level = i
        d = float(self._slide.level_downsamples[level])
        lw, lh = self._slide.level_dimensions[level]
        w0, h0 = self._slide.dimensions
        out_w, out_h = max(1, int(round(w0 / factor))), max(1, int(round(h0 / factor)))
        strip = max(1, int(2**24 // max(lw, 1)))  # about 64 MB of RGBA per read
        rows = []
        for top in range(0, lh, strip):
            rh = min(strip, lh - top)
            try:
                rgba = np.asarray(self._slide.read_region((0, int(top * d)), level, (lw, rh)))
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{self.path}: reading level {level} failed: {exc}") from exc
            th = max(1, int(round((top + rh) * d / factor)) - int(round(top * d / factor)))
            rows.append(cv2.resize(_on_white(rgba), (out_w, th), interpolation=cv2.INTER_AREA))
        image = np.concatenate(rows)
        return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA) \
            if image.shape[0] != out_h else image

    def close(self) -> None:
        self._slide.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (H, W, 4; transparent outside the scanned area) → RGB (H, W, 3) over
    white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def collect_slides(inputs) -> list[Path]:
    """Slide files from files, folders (their slide files, sorted) and ``.txt`` lists (one path
    per line, ``#`` comments)."""
    slides = []
    for item in map(Path, inputs):
        if item.is_dir():
            slides += sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        elif item.suffix.lower() == ".txt":
            lines = (line.split("#", 1)[0].strip() for line in item.read_text().splitlines())
            slides += [Path(line) if Path(line).is_absolute() else item.parent / line
                       for line in lines if line]
        else:
            slides.append(item)
    return slides
