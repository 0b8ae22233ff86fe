"""A slide's outputs: the nucleus table (Parquet), GeoJSON detections for QuPath, the overlay.

Each finished block's nuclei are kept as a small Parquet file (the resume point); when the last
block is done they are streamed, one block at a time, into the outputs, so memory never holds
more than one block's nuclei.

The nucleus table has one row per nucleus: ``id`` (1…n in reading order), ``class``,
``class_id``, ``probability`` (mean probability of its class over its pixels),
``centroid_x``/``centroid_y`` (level-0 slide pixels, QuPath's coordinates),
``centroid_x_um``/``centroid_y_um``, ``area_um2``, ``bbox_x0``/``bbox_y0``/``bbox_x1``/
``bbox_y1`` (level-0 pixels, end exclusive) and ``polygon`` (the outline as WKB in level-0
pixels: ``shapely.from_wkb``, GeoPandas and DuckDB's spatial extension read it).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from pathlib import Path

import cv2
import numpy as np

from xsight_keras.files import write_failure
from xsight_keras.inference.instances import detection_feature
from xsight_keras.labels import CLASS_COLOURS

#: the namespace of the nuclei's GeoJSON ids: uuid5(namespace, "<slide name>/<id>"), stable
#: across runs (QuPath reads a feature's id as a UUID)
ID_NAMESPACE = uuid.UUID("5d2f3c9e-8f0a-4a57-9d3e-2c4b8e7a1f60")


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import shapely
    except ImportError as exc:
        raise ImportError("slide outputs need pyarrow and shapely: pip install "
                          "'xsight-keras[slides]'") from exc
    return pa, pq, shapely


def nuclei_table(columns: dict[str, np.ndarray], outlines: list[np.ndarray], scale: float,
                 model_mpp: float, class_names: list[str]):
    """A ``pyarrow.Table`` of one block's nuclei (every column of the nucleus table but
    ``id``) from :func:`~xsight_keras.slides.nuclei.block_nuclei`'s model-pixel columns
    (:data:`~xsight_keras.slides.nuclei.NUCLEUS_FIELDS`);
    ``scale`` level-0 pixels per model pixel."""
    pa, _, shapely = _arrow()
    n = len(outlines)
    cls = np.asarray(columns["class_id"], np.int16).reshape(n)
    name = [class_names[c] if c < len(class_names) else f"class_{c}" for c in cls]
    cy, cx = (np.asarray(columns[k], np.float64).reshape(n) for k in ("centroid_y", "centroid_x"))
    # µm from model-pixel centres; level-0 pixel centres through to_level0
    polygons = []
    if n:
        index = np.repeat(np.arange(n), [len(o) for o in outlines])
        points = to_level0(np.concatenate(outlines), scale)
        polygons = valid_outlines(shapely.polygons(shapely.linearrings(points, indices=index)))
    bbox = {k: np.floor(np.asarray(columns[k], np.float64).reshape(n) * scale).astype(np.int64)
            for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")}
    return pa.table({
        "class": pa.array(name, pa.string()),
        "class_id": pa.array(cls, pa.int16()),
        "probability": pa.array(np.asarray(columns["probability"], np.float32).reshape(n)),
        "centroid_x": pa.array(to_level0(cx, scale)), "centroid_y": pa.array(to_level0(cy, scale)),
        "centroid_x_um": pa.array(cx * model_mpp), "centroid_y_um": pa.array(cy * model_mpp),
        "area_um2": pa.array((np.asarray(columns["area_px"], np.float64).reshape(n)
                              * model_mpp ** 2).astype(np.float32)),
        "bbox_x0": pa.array(bbox["bbox_x0"]), "bbox_y0": pa.array(bbox["bbox_y0"]),
        "bbox_x1": pa.array(bbox["bbox_x1"]), "bbox_y1": pa.array(bbox["bbox_y1"]),
        "polygon": pa.array(shapely.to_wkb(polygons) if n else [], pa.binary()),
    })


def to_level0(values: np.ndarray, scale: float) -> np.ndarray:
    """Model-pixel coordinates (pixel centres at integers) → level-0 pixel coordinates, ``scale``
    level-0 pixels per model pixel: the centre of model pixel v covers level-0 pixels
    [v·s, (v+1)·s), whose centre is (v + 0.5)·s − 0.5."""
    return (np.asarray(values, np.float64) + 0.5) * scale - 0.5


def valid_outlines(polygons):
    """Polygons traced around pixel masks, made valid: such outlines touch themselves where a
    nucleus is one pixel thin (invalid for GEOS, GeoPandas and DuckDB). ``buffer(0)`` resolves
    that; where it splits a polygon, the largest part is kept; holes are dropped (the GeoJSON
    outline is the exterior ring too)."""
    _, _, shapely = _arrow()
    fixed = shapely.buffer(polygons, 0)
    for i in np.flatnonzero(shapely.get_type_id(fixed) != shapely.GeometryType.POLYGON):
        parts = shapely.get_parts(fixed[i])
        fixed[i] = parts[np.argmax(shapely.area(parts))] if len(parts) else polygons[i]
    return shapely.polygons(shapely.get_exterior_ring(fixed))


def write_table(table, path: Path) -> None:
    """``table`` to ``path`` as Parquet, atomically (a temporary file, flushed to disk, renamed
    over it): a crash never leaves a truncated block file that looks finished."""
    _, pq, _ = _arrow()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc) from exc


def read_table(path: Path):
    """The ``pyarrow.Table`` of a block file written by :func:`write_table`."""
    _, pq, _ = _arrow()
    return pq.read_table(path)


def readable_table(path: Path) -> bool:
    """Whether ``path`` is a complete Parquet file (its footer reads)."""
    _, pq, _ = _arrow()
    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError):
        return False


class Overlay:
    """A low-resolution picture of the slide with every nucleus outlined in its class colour.

    ``base`` uint8 RGB (H, W, 3), the slide at ``factor`` level-0 pixels per overlay pixel;
    ``fill_alpha``: opacity of the class colour inside each nucleus (0: outlines only). Nuclei
    smaller than a few overlay pixels become dots of their class colour."""

    def __init__(self, base: np.ndarray, factor: float, fill_alpha: float = 0.0):
        self.image = np.ascontiguousarray(base.copy())
        self.factor = factor
        self.fill_alpha = fill_alpha

    def draw(self, table) -> None:
        _, _, shapely = _arrow()
        if table.num_rows == 0:
            return
        classes = table.column("class_id").to_numpy()
        rings = shapely.get_coordinates(shapely.get_exterior_ring(
            shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))),
            return_index=True)
        points, index = rings
        points = np.round(points / self.factor).astype(np.int32)
        starts = np.searchsorted(index, np.arange(table.num_rows + 1))
        for i, cls in enumerate(classes):
            ring = points[starts[i]:starts[i + 1]]
            colour = tuple(int(v) for v in CLASS_COLOURS[int(cls) % len(CLASS_COLOURS)])
            extent = np.ptp(ring, axis=0).max() if len(ring) else 0
            if extent < 3:
                centre = tuple(int(v) for v in ring.mean(axis=0))
                cv2.circle(self.image, centre, 1, colour, -1)
                continue
            if self.fill_alpha > 0:
                x0, y0 = np.maximum(ring.min(axis=0), 0)
                x1, y1 = ring.max(axis=0) + 1
                patch = self.image[y0:y1, x0:x1]
                if patch.size:
                    filled = patch.copy()
                    cv2.fillPoly(filled, [ring - (x0, y0)], colour)
                    cv2.addWeighted(filled, self.fill_alpha, patch, 1 - self.fill_alpha, 0, dst=patch)
            cv2.polylines(self.image, [ring], True, colour, 1, cv2.LINE_AA)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp.png")
        if not cv2.imwrite(str(tmp), cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)


class GeoJSONWriter:
    """Streams detections into a GeoJSON ``FeatureCollection`` (gzip-compressed when the path
    ends in ``.gz``), written to a temporary file and renamed into place by :meth:`close`."""

    def __init__(self, path: Path, slide_name: str, class_names: list[str]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        opener = gzip.open if self.path.suffix == ".gz" else open
        self._file = opener(self.tmp, "wt", encoding="utf-8")
        self._file.write('{"type": "FeatureCollection", "features": [\n')
        self._first = True
        self.slide_name, self.class_names = slide_name, class_names

    def write(self, table) -> None:
        _, _, shapely = _arrow()
        if table.num_rows == 0:
            return
        geoms = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
        cols = {k: table.column(k).to_numpy() for k in ("id", "class_id", "probability", "area_um2")}
        for i, geom in enumerate(geoms):
            ring = np.round(shapely.get_coordinates(shapely.get_exterior_ring(geom)), 2).tolist()
            nid = int(cols["id"][i])
            feature = detection_feature(
                ring, int(cols["class_id"][i]), self.class_names,
                str(uuid.uuid5(ID_NAMESPACE, f"{self.slide_name}/{nid}")),
                {"Nucleus id": nid, "Area µm^2": round(float(cols["area_um2"][i]), 3),
                 "Probability": round(float(cols["probability"][i]), 4)})
            self._file.write(("" if self._first else ",\n") + json.dumps(feature, ensure_ascii=False))
            self._first = False

    def close(self) -> None:
        self._file.write("\n]}\n")
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)
