"""Every nucleus of a whole slide, in memory that does not grow with the slide.

The slide is cut into blocks (:func:`~xsight_keras.slides.nuclei.block_grid`) at the model's
microns per pixel; blocks without tissue are never read. Background threads read and
preprocess the next blocks while the model predicts the current one, and another thread turns
the previous block's maps into nuclei, so the model is not kept waiting. Each finished block's
nuclei are saved in ``<out>/<slide>/.partial/``: a killed run picks up at the first unfinished
block and writes the same outputs as an uninterrupted one.

Outputs per slide, in ``<out>/<slide name>/``, all written atomically::

    <name>.geojson[.gz]       detections for QuPath (File > Import objects, or drag and drop)
    <name>_nuclei.parquet     one row per nucleus (xsight_keras.slides.outputs)
    <name>_overlay.png        low-resolution slide with every nucleus outlined in its class colour
    <name>_tissue.png         the tissue mask at TISSUE_MPP µm per pixel (white: tissue)
    summary.json              nuclei per class, density per mm² of tissue, time taken; last
                              written, so its presence means the slide is done
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np

from xsight_keras.files import atomic_write_text
from xsight_keras.inference.instances import PostprocessConfig
from xsight_keras.inference.predictor import Predictor
from xsight_keras.labels import label_names
from xsight_keras.slides.nuclei import NUCLEUS_FIELDS, Block, block_grid, block_nuclei
from xsight_keras.slides.outputs import (
    GeoJSONWriter,
    Overlay,
    nuclei_table,
    read_table,
    readable_table,
    write_table,
)
from xsight_keras.slides.reader import SlideError, SlideReader
from xsight_keras.slides.tissue import TISSUE_MPP, mask_region, tissue_mask

SUMMARY_FILE = "summary.json"
PARTIAL_DIR = ".partial"


@dataclass(frozen=True)
class SlideSettings:
    """How a slide is read and cut (model pixels unless said otherwise).

    ``block``: the core of one block (its nuclei are the block's); ``margin``: context read
    around each core, at least the largest nucleus' diameter so that a nucleus whose centroid
    is in the core is whole; ``slide_mpp``: the slides' µm per pixel when their metadata has
    none; ``tissue_mpp``: the scale tissue is found at; ``overlay_px``: the overlay's longest
    side; ``overlay_fill``: opacity of the class colour inside each nucleus on the overlay (0:
    outlines only); ``gzip``: write ``.geojson.gz``; ``workers``: reading threads.
    """

    block: int = 2048
    margin: int = 96
    slide_mpp: float | None = None
    tissue_mpp: float = TISSUE_MPP
    overlay_px: int = 4096
    overlay_fill: float = 0.0
    gzip: bool = False
    workers: int = 2

    def __post_init__(self):
        if self.block < 64 or self.margin < 0 or self.margin > self.block:
            raise ValueError(f"block must be at least 64 and margin in [0, block], got block "
                             f"{self.block}, margin {self.margin}")


def slide_preprocess(predictor: Predictor, shape: tuple[int, int], clahe_cell: float):
    """The predictor's preprocessing for a region of ``shape``, with a CLAHE grid that keeps
    its cells ``clahe_cell`` pixels wide: the size they had on the images the model was
    validated on (a fixed 8×8 grid would make them twice as large on a 2,000-px block as on a
    1,000-px MoNuSeg image, 8 times as large as on a 256-px PanNuke tile)."""
    pre = predictor.preprocess
    grid = tuple(max(1, int(round(s / clahe_cell))) for s in shape)
    return dataclasses.replace(pre, clahe_grid=(grid[1], grid[0]))  # OpenCV: (columns, rows)


def weights_digest(model) -> str:
    """A hash of every weight of ``model``: two models predict alike only if it is equal."""
    digest = hashlib.blake2b(digest_size=16)
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def _run_fingerprint(predictor: Predictor, settings: SlideSettings, model_mpp: float,
                     postprocess: PostprocessConfig, clahe_cell: float) -> dict:
    """What a slide's outputs depend on: a resume with anything else starts over, and a
    finished slide is only skipped when it was predicted with the same. The model counts by
    its weights, not its path, so a moved or copied run still resumes and skips."""
    return {"weights": weights_digest(predictor.model), "model_mpp": model_mpp,
            "tile_size": predictor.tile_size, "overlap": predictor.overlap, "tta": list(predictor.transforms),
            "preprocess": predictor.preprocess.to_dict(), "clahe_cell": clahe_cell,
            "postprocess": postprocess.to_dict(), "block": settings.block,
            "margin": settings.margin, "tissue_mpp": settings.tissue_mpp}


def _json_ready(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def predict_slide(slide, predictor: Predictor, out_dir, model_mpp: float,
                  postprocess: PostprocessConfig = PostprocessConfig(), class_names=None,
                  settings: SlideSettings = SlideSettings(), clahe_cell: float | None = None,
                  model_id: str = "", progress: bool = True) -> dict:
    """Segment every nucleus of one slide; returns its summary (also ``summary.json``).

    ``slide``: a path OpenSlide reads; ``predictor``: a :class:`Predictor` (its tile size,
    overlap, batch size and TTA are used as they are); ``out_dir``: the slide's outputs go to
    ``out_dir/<slide name>/``; ``model_mpp``: the µm per pixel the model was trained at
    (a run's ``mpp``); ``clahe_cell``: pixels per CLAHE cell of the images the model was
    validated on (default the tile size over the grid); ``model_id``: where the model came
    from, recorded in the summary. A slide whose ``summary.json`` was written with the same
    model weights and settings is not predicted again; one written with others raises
    ``ValueError`` (delete the folder to redo it). Raises :class:`SlideError` for a slide that
    cannot be read.
    """
    started = time.perf_counter()
    slide = Path(slide)
    out = Path(out_dir) / slide.stem
    done = out / SUMMARY_FILE
    check_predictor(predictor)
    class_names = label_names(class_names or predictor.class_names or ["nucleus"])
    grid = predictor.preprocess.clahe_grid
    clahe_cell = float(clahe_cell or predictor.tile_size / max(grid))
    fingerprint = _json_ready(_run_fingerprint(predictor, settings, model_mpp, postprocess,
                                               clahe_cell))
    if done.is_file():
        summary = json.loads(done.read_text())
        before = {k: v for k, v in summary.get("settings", {}).items() if k != "slide"}
        if before != fingerprint:
            raise ValueError(f"{out} holds this slide predicted with another model or other "
                             "settings: delete that folder or predict into another --out")
        return summary
    with SlideReader(slide, model_mpp, settings.slide_mpp) as reader:
        partial = out / PARTIAL_DIR
        stat = slide.stat()
        fingerprint["slide"] = {"path": str(slide.resolve()), "bytes": stat.st_size,
                                "modified_ns": stat.st_mtime_ns, **reader.describe()}
        _open_partial(partial, fingerprint)

        thumb = reader.thumbnail(settings.tissue_mpp)
        mask = tissue_mask(thumb)
        cv2.imwrite(str(partial / "tissue.png"), mask.astype(np.uint8) * 255)
        factor = reader.size[1] / mask.shape[1]  # model pixels per thumbnail pixel
        blocks, tiles = _blocks_with_tissue(reader.size, settings, mask, factor, predictor)
        finished = {int(p.stem) for p in (partial / "blocks").glob("*.parquet")
                    if readable_table(p)}  # a damaged file is predicted again
        todo = [b for b in blocks if b.index not in finished]
        t_tissue = time.perf_counter() - started

        stats = _predict_blocks(reader, predictor, todo, mask, factor, settings, postprocess,
                                clahe_cell, partial, class_names, slide.stem,
                                total_tiles=sum(tiles.values()),
                                done_tiles=sum(tiles[b.index] for b in blocks if b.index in finished),
                                progress=progress)
        t_predict = time.perf_counter() - started - t_tissue
        summary = _write_outputs(reader, out, partial, blocks, mask, settings, class_names, slide)
    tissue_mm2 = float(mask.sum()) * (factor * model_mpp / 1000) ** 2
    counts = summary.pop("counts")
    total = int(sum(counts.values()))
    summary.update({
        "nuclei": total, "nuclei_per_class": counts, "tissue_mm2": round(tissue_mm2, 6),
        "nuclei_per_mm2": round(total / tissue_mm2, 2) if tissue_mm2 > 0 else None,
        "blocks": len(blocks), "blocks_resumed": len(blocks) - len(todo),
        "tiles_predicted": stats["tiles"], "nuclei_cut_by_margin": stats["cut"],
        "seconds": {"tissue": round(t_tissue, 2), "predict": round(t_predict, 2),
                    "total": round(time.perf_counter() - started, 2)},
        "model": model_id, "settings": fingerprint,
    })
    if stats["cut"]:
        summary["warning"] = (f"{stats['cut']} nuclei touched the edge of their block's margin and "
                              "may be cut: raise --margin above the largest nucleus' diameter")
    atomic_write_text(done, json.dumps(_json_ready(summary), indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def check_predictor(predictor: Predictor) -> None:
    """Refuse a model that cannot run over a slide's tiles (before any slide is read)."""
    if predictor.resize_to is not None:
        raise ValueError("this model was trained on whole images resized to one size "
                         "(resize_mode: resize); it cannot be run over a slide's tiles")


def _open_partial(partial: Path, fingerprint: dict) -> None:
    """Create the resume folder, or keep it when it was written with the same settings."""
    settings_file = partial / "settings.json"
    if partial.is_dir():
        try:
            same = json.loads(settings_file.read_text()) == fingerprint
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"note: {partial} was written with other settings; starting the slide over")
            shutil.rmtree(partial)
    (partial / "blocks").mkdir(parents=True, exist_ok=True)
    if not settings_file.is_file():
        atomic_write_text(settings_file, json.dumps(fingerprint, indent=2))


def _blocks_with_tissue(size, settings: SlideSettings, mask, factor, predictor):
    """The blocks whose core holds tissue, and how many tiles each will predict."""
    kept, tiles = [], {}
    for block in block_grid(size, settings.block, settings.margin):
        y0, x0, y1, x1 = block.core
        if not mask_region(mask, factor, y0, x0, y1 - y0, x1 - x0).any():
            continue
        tissue = _region_tissue(mask, factor, block)
        kept.append(block)
        tiles[block.index] = len(predictor.region_tiles(tissue.shape, tissue)[1])
    return kept, tiles


def _region_tissue(mask, factor, block: Block) -> np.ndarray:
    y0, x0, y1, x1 = block.region
    return mask_region(mask, factor, y0, x0, y1 - y0, x1 - x0)


def _predict_blocks(reader, predictor, blocks, mask, factor, settings, postprocess, clahe_cell,
                    partial, class_names, name, total_tiles, done_tiles, progress) -> dict:
    """Predict ``blocks`` in order with reading ahead and nuclei extraction behind; each
    finished block's nuclei go to ``partial/blocks/<index>.parquet``."""
    from tqdm import tqdm

    def prepare(block: Block):
        y0, x0, y1, x1 = block.region
        image = reader.read(y0, x0, y1 - y0, x1 - x0)
        if predictor.in_channels == 1:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
        tissue = _region_tissue(mask, factor, block)
        pre = slide_preprocess(predictor, tissue.shape, clahe_cell)
        return predictor.prepare_region(image, tissue, pre)

    def extract(block: Block, maps) -> tuple[int, int]:
        columns, outlines, cut = block_nuclei(maps, block, postprocess, reader.size)
        table = nuclei_table(columns, outlines, reader.scale, reader.target_mpp, class_names)
        write_table(table, partial / "blocks" / f"{block.index:06d}.parquet")
        return len(outlines), cut

    bar = tqdm(total=total_tiles, initial=done_tiles, unit="tile", desc=name, disable=not progress,
               dynamic_ncols=True)
    stats = {"tiles": 0, "cut": 0, "nuclei": 0}
    readers = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="slide-read",
                                 initializer=_yield_to_the_model)
    writer = ThreadPoolExecutor(1, thread_name_prefix="slide-nuclei", initializer=_yield_to_the_model)
    reads: deque[Future] = deque()
    extracting: deque[Future] = deque()
    queue = iter(blocks)

    def collect(future: Future) -> None:
        found, cut = future.result()
        stats["nuclei"] += found
        stats["cut"] += cut
        bar.set_postfix(nuclei=stats["nuclei"], refresh=False)

    try:
        for block in queue:  # keep workers + 1 blocks reading ahead
            reads.append((block, readers.submit(prepare, block)))
            if len(reads) > settings.workers:
                break
        while reads:
            block, future = reads.popleft()
            region = future.result()
            nxt = next(queue, None)
            if nxt is not None:
                reads.append((nxt, readers.submit(prepare, nxt)))
            before = predictor.tiles_predicted
            maps = predictor.predict_region(region)
            del region
            stats["tiles"] += predictor.tiles_predicted - before
            bar.update(predictor.tiles_predicted - before)
            extracting.append(writer.submit(extract, block, maps))
            del maps
            while len(extracting) > 1:  # at most two blocks' maps held at once
                collect(extracting.popleft())
        while extracting:
            collect(extracting.popleft())
    finally:
        for _, future in reads:
            future.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
        bar.close()
    return stats


def _yield_to_the_model() -> None:
    """Lower this thread's CPU priority to nice 19 (Linux: nice is per thread). Reading and
    nuclei extraction then mostly run on the cores the model leaves idle instead of pre-empting
    the model's own threads, which wait for one another at every layer when one of them is
    held up (measured on 2 CPU cores: the pipeline at 0.79 of the model alone's tiles/s at
    normal priority, 0.93 at nice 19). Unlike SCHED_IDLE, nice 19 never starves them on a
    node that other jobs keep busy."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def _write_outputs(reader: SlideReader, out: Path, partial: Path, blocks, mask, settings,
                   class_names, slide: Path) -> dict:
    """Stream the block files into the slide's outputs; returns {"counts": per class, ...}."""
    import pyarrow.parquet as pq

    name = slide.stem
    w0 = reader.size[1] * reader.scale
    h0 = reader.size[0] * reader.scale
    overlay_mpp = max(max(h0, w0) / settings.overlay_px * reader.slide_mpp, reader.target_mpp)
    overlay = Overlay(reader.thumbnail(overlay_mpp), overlay_mpp / reader.slide_mpp,
                      settings.overlay_fill)
    geojson_path = out / f"{name}.geojson{'.gz' if settings.gzip else ''}"
    table_path = out / f"{name}_nuclei.parquet"
    geojson = GeoJSONWriter(geojson_path, name, class_names)
    tmp_table = table_path.with_name(f".{table_path.name}.tmp")
    counts = {n: 0 for n in class_names[1:]}
    writer = None
    next_id = 1
    try:
        for block in blocks:
            table = read_table(partial / "blocks" / f"{block.index:06d}.parquet")
            ids = np.arange(next_id, next_id + table.num_rows, dtype=np.int64)
            next_id += table.num_rows
            table = table.add_column(0, "id", _int64_array(ids))
            if writer is None:
                writer = pq.ParquetWriter(tmp_table, table.schema)
            if table.num_rows:
                writer.write_table(table)
            geojson.write(table)
            overlay.draw(table)
            for cls, count in zip(*np.unique(table.column("class").to_numpy(zero_copy_only=False),
                                             return_counts=True)):
                counts[str(cls)] = counts.get(str(cls), 0) + int(count)
        if writer is None:  # no block with tissue: an empty table with the full schema
            empty = nuclei_table({k: np.zeros(0) for k in NUCLEUS_FIELDS}, [], reader.scale,
                                 reader.target_mpp, class_names)
            empty = empty.add_column(0, "id", _int64_array(np.zeros(0, np.int64)))
            writer = pq.ParquetWriter(tmp_table, empty.schema)
        writer.close()
        writer = None
        tmp_table.replace(table_path)
        geojson.close()
    except BaseException:
        if writer is not None:
            writer.close()
        tmp_table.unlink(missing_ok=True)
        geojson.abort()
        raise
    overlay.save(out / f"{name}_overlay.png")
    tissue_png = out / f"{name}_tissue.png"
    (partial / "tissue.png").replace(tissue_png)
    return {"slide": str(slide), "outputs": {
        "geojson": geojson_path.name, "table": table_path.name,
        "overlay": f"{name}_overlay.png", "tissue": tissue_png.name},
        "overlay_mpp": round(overlay_mpp, 4), "reader": reader.describe(), "counts": counts}


def _int64_array(values):
    import pyarrow as pa

    return pa.array(values, pa.int64())


def shard(items: list, spec: str | None) -> list:
    """The part ``I/N`` (``I`` from 0 to N-1) of ``items``: every N-th item from the I-th, so
    shards get a similar mix of slides; ``None`` keeps them all."""
    if not spec:
        return list(items)
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as exc:
        raise ValueError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4), got {spec!r}") from exc
    if not 0 <= i < n:
        raise ValueError(f"--shard takes I/N with 0 <= I < N (e.g. 0/4), got {spec!r}")
    return list(items)[i::n]


def predict_cohort(slides, predictor: Predictor, out_dir, model_mpp: float, shard_spec=None,
                   **kwargs) -> dict:
    """:func:`predict_slide` over a list of slides (a shard of it with ``shard_spec`` "I/N").

    Slides already done are skipped; a slide that fails (unreadable, truncated, no resolution)
    is reported and the others still run. Returns the cohort summary, also written to
    ``out_dir/cohort_summary.json`` (``cohort_summary_<I>of<N>.json`` for a shard):
    ``done``, ``skipped`` (finished earlier) and ``failed`` ({slide, error}) lists.
    """
    check_predictor(predictor)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = [Path(s) for s in slides]
    stems: dict[str, Path] = {}
    for s in slides:  # the whole list, so that two shards never share a folder
        if s.stem in stems:
            raise ValueError(f"two slides would write to {out_dir / s.stem}: {stems[s.stem]} and "
                             f"{s}; rename one or predict them into different --out folders")
        stems[s.stem] = s
    slides = shard(slides, shard_spec)
    result = {"done": [], "skipped": [], "failed": [], "shard": shard_spec}
    started = time.perf_counter()
    for s in slides:
        finished = (out_dir / s.stem / SUMMARY_FILE).is_file()
        try:
            summary = predict_slide(s, predictor, out_dir, model_mpp, **kwargs)
        except (SlideError, OSError, ValueError) as exc:
            result["failed"].append({"slide": str(s), "error": f"{type(exc).__name__}: {exc}"})
            print(f"error: {s}: {exc}")
            continue
        if finished:
            result["skipped"].append(str(s))
            continue
        result["done"].append({"slide": str(s), "nuclei": summary["nuclei"],
                               "seconds": summary["seconds"]["total"]})
    result["seconds"] = round(time.perf_counter() - started, 2)
    suffix = "" if not shard_spec else "_{}of{}".format(*shard_spec.split("/"))
    atomic_write_text(out_dir / f"cohort_summary{suffix}.json", json.dumps(result, indent=2))
    return result
