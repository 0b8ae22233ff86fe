"""Whole-slide prediction on pyramidal TIFF slides written here, whose every nucleus is known.

Most tests use a "stain oracle": a Keras model whose one 1×1 convolution calls a pixel nucleus
when it is bluer than it is red, on slides whose nuclei are blue discs on pink tissue. It
segments every disc exactly, so what these tests check is the slide machinery: reading at the
model's scale, tissue, blocks and margins, merging across borders, resume and the outputs.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("openslide")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
shapely = pytest.importorskip("shapely")

import keras  # noqa: E402

from xsight_keras.data.preprocess import PreprocessConfig  # noqa: E402
from xsight_keras.inference import Predictor  # noqa: E402
from xsight_keras.slides import (  # noqa: E402
    SlideError,
    SlideReader,
    SlideSettings,
    predict_cohort,
    predict_slide,
)
from xsight_keras.slides.synthetic import GLASS, write_pyramid_tiff  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PINK, BLUE = (232, 160, 205), (60, 40, 170)
BLOCK, MARGIN, TILE, OVERLAP = 512, 48, 128, 32
SETTINGS = SlideSettings(block=BLOCK, margin=MARGIN, workers=2)


def oracle_model() -> keras.Model:
    """Two-class probabilities (background, nucleus) from colour alone: nucleus where the
    pixel's blue exceeds its red (inputs scaled to 0–1, channels last)."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(2, 1, activation="softmax", data_format="channels_last")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.array([[[[0, -25], [0, 0], [0, 25]]]], np.float32).reshape(1, 1, 3, 2),
                      np.array([0, -3], np.float32)])
    return model


def oracle_predictor(**kwargs) -> Predictor:
    return Predictor(oracle_model(), PreprocessConfig(clahe_clip_limit=0, zscore="none"),
                     tile_size=TILE, overlap=OVERLAP, batch_size=8, class_names=["nucleus"], **kwargs)


class DiscSlide:
    """Blue discs on pink tissue inside ``tissue`` boxes, glass elsewhere; every disc known."""

    def __init__(self, shape, discs, tissue_boxes, seed=0):
        self.shape, self.discs, self.boxes = shape, discs, tissue_boxes
        self.rng = np.random.default_rng(seed)

    def render(self, y, x, h, w):
        out = np.full((h, w, 3), GLASS, np.uint8)
        for y0, x0, y1, x1 in self.boxes:
            a, b = max(y0 - y, 0), max(x0 - x, 0)
            c, d = min(y1 - y, h), min(x1 - x, w)
            if c > a and d > b:
                out[a:c, b:d] = PINK
        for cy, cx, r in self.discs:
            cv2.circle(out, (int(cx - x), int(cy - y)), int(r), BLUE, -1)
        return out

    def truth_mask(self, i, scale=1.0):
        """bool level-0 mask of disc ``i`` (of its bounding box: (mask, y0, x0))."""
        cy, cx, r = self.discs[i]
        y0, x0 = int(cy - r - 2), int(cx - r - 2)
        m = np.zeros((int(2 * r + 5), int(2 * r + 5)), np.uint8)
        cv2.circle(m, (int(cx - x0), int(cy - y0)), int(r), 1, -1)
        return m.astype(bool), y0, x0


def straddling_discs(shape, step, spacing=40, seed=0):
    """Discs centred on every horizontal and vertical line ``k * step`` (block and tile
    borders), ``spacing`` apart, radius 5–10 px, none touching."""
    rng = np.random.default_rng(seed)
    h, w = shape
    discs = []
    for k in range(1, h // step + 1):
        for x in range(20, w - 20, spacing):
            discs.append((k * step + rng.integers(-2, 3), x + rng.integers(-3, 4), rng.integers(5, 11)))
    for k in range(1, w // step + 1):
        for y in range(20, h - 20, spacing):
            discs.append((y + 20 + rng.integers(-3, 4), k * step + rng.integers(-2, 3), rng.integers(5, 11)))
    kept = []
    for d in discs:  # drop any that would touch one already placed
        if d[0] + d[2] + 2 < h and d[1] + d[2] + 2 < w and all(
                np.hypot(d[0] - e[0], d[1] - e[1]) > d[2] + e[2] + 4 for e in kept):
            kept.append(d)
    return kept


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    shape = (1300, 1100)
    # block borders at 512 and 1024, tile borders every 96 px inside a block: both lines
    discs = straddling_discs(shape, 96) + straddling_discs(shape, BLOCK, spacing=23, seed=1)
    kept = []
    for d in discs:
        if all(np.hypot(d[0] - e[0], d[1] - e[1]) > d[2] + e[2] + 4 for e in kept):
            kept.append(d)
    full = DiscSlide(shape, kept, [(0, 0, *shape)])
    write_pyramid_tiff(root / "borders.tif", shape, full.render, mpp=0.25, levels=3)
    # tissue in one corner: most blocks are glass
    corner = [d for d in kept if d[0] < 380 and d[1] < 380]
    sparse = DiscSlide(shape, corner, [(0, 0, 400, 400)])
    write_pyramid_tiff(root / "sparse.tif", shape, sparse.render, mpp=0.25, levels=3)
    write_pyramid_tiff(root / "nompp.tif", shape, sparse.render, mpp=None, levels=2)
    # scanned at twice the model's resolution (0.125 µm/px): read from level 1
    fine = DiscSlide((2 * shape[0], 2 * shape[1]), [(2 * a, 2 * b, 2 * r) for a, b, r in kept],
                     [(0, 0, 2 * shape[0], 2 * shape[1])])
    write_pyramid_tiff(root / "fine.tif", fine.shape, fine.render, mpp=0.125, levels=3)
    truncated = root / "truncated.tif"
    data = (root / "borders.tif").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return {"root": root, "full": full, "sparse": sparse, "fine": fine}


def read_nuclei(out: Path, name: str):
    return pq.read_table(out / name / f"{name}_nuclei.parquet")


def match_truth(table, slide: DiscSlide, scale=1.0):
    """For every true disc, the IoU of the one found nucleus whose centroid lies in it (0 when
    none), and how many found nuclei each disc got."""
    polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
    cx, cy = table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()
    ious, hits = [], []
    for i, (dy, dx, r) in enumerate(slide.discs):
        inside = np.flatnonzero(np.hypot(cy - dy, cx - dx) < r)
        hits.append(len(inside))
        if len(inside) != 1:
            ious.append(0.0)
            continue
        truth, y0, x0 = slide.truth_mask(i)
        ring = shapely.get_coordinates(shapely.get_exterior_ring(polygons[inside[0]]))
        found = np.zeros_like(truth, np.uint8)
        cv2.fillPoly(found, [np.round(ring - (x0, y0)).astype(np.int32)], 1)
        found = found.astype(bool)
        ious.append((found & truth).sum() / (found | truth).sum())
    return np.asarray(ious), np.asarray(hits)


def test_every_nucleus_on_a_block_or_tile_border_is_found_once_and_whole(slides, tmp_path):
    summary = predict_slide(slides["root"] / "borders.tif", oracle_predictor(), tmp_path, 0.25,
                            settings=SETTINGS, progress=False)
    full = slides["full"]
    table = read_nuclei(tmp_path, "borders")
    ious, hits = match_truth(table, full)
    on_block_border = [i for i, (y, x, r) in enumerate(full.discs)
                       if abs(y % BLOCK) <= r or abs(y % BLOCK - BLOCK) <= r
                       or abs(x % BLOCK) <= r or abs(x % BLOCK - BLOCK) <= r]
    assert len(on_block_border) > 30
    assert (hits == 1).all(), f"discs found {hits[hits != 1]} times at {np.flatnonzero(hits != 1)}"
    assert ious.min() > 0.9, ious.min()
    assert table.num_rows == len(full.discs) == summary["nuclei"]
    polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
    assert shapely.is_valid(polygons).all()  # GeoPandas and DuckDB refuse invalid rings
    assert summary["nuclei_cut_by_margin"] == 0
    assert table.column("id").to_pylist() == list(range(1, table.num_rows + 1))
    # µm columns: model pixels × 0.25; area of a disc of radius r ≈ π r² px × 0.0625 µm²
    assert np.allclose(table.column("centroid_x_um").to_numpy(), table.column("centroid_x").to_numpy() * 0.25)
    r = np.array([d[2] for d in full.discs])
    assert np.median(table.column("area_um2").to_numpy()) == pytest.approx(
        np.median(np.pi * r**2 * 0.0625), rel=0.2)


def test_a_slide_scanned_finer_than_the_model_is_read_from_a_coarser_level(slides, tmp_path):
    summary = predict_slide(slides["root"] / "fine.tif", oracle_predictor(), tmp_path, 0.25,
                            settings=SETTINGS, progress=False)
    assert summary["reader"]["level_read"] == 1 and summary["reader"]["slide_mpp"] == 0.125
    ious, hits = match_truth(read_nuclei(tmp_path, "fine"), slides["fine"])
    assert (hits == 1).all() and np.median(ious) > 0.85  # polygons come back in level-0 pixels


def test_tissue_detection_skips_glass_and_densities_use_the_tissue_area(slides, tmp_path):
    predictor = oracle_predictor()
    summary = predict_slide(slides["root"] / "sparse.tif", predictor, tmp_path, 0.25,
                            settings=SETTINGS, progress=False)
    # tissue is 400×400 of 1300×1100 px: one block of nine, and only its tiles near the tissue
    # (the mask is dilated by one 64-px thumbnail pixel): 36, where the whole slide has 208
    assert summary["blocks"] == 1
    assert predictor.tiles_predicted == summary["tiles_predicted"] <= 36
    assert summary["tissue_mm2"] == pytest.approx(0.1 * 0.1, rel=0.35)
    assert summary["nuclei"] == len(slides["sparse"].discs)
    tissue = cv2.imread(str(tmp_path / "sparse" / "sparse_tissue.png"), cv2.IMREAD_GRAYSCALE)
    assert tissue is not None and set(np.unique(tissue)) == {0, 255}
    assert summary["nuclei_per_mm2"] == pytest.approx(summary["nuclei"] / summary["tissue_mm2"], rel=1e-3)


def test_geojson_is_what_qupath_imports_and_the_parquet_table_round_trips(slides, tmp_path):
    settings = SlideSettings(block=BLOCK, margin=MARGIN, gzip=True)
    predict_slide(slides["root"] / "sparse.tif", oracle_predictor(), tmp_path, 0.25,
                  settings=settings, progress=False)
    folder = tmp_path / "sparse"
    with gzip.open(folder / "sparse.geojson.gz", "rt") as f:
        collection = json.load(f)
    table = pq.read_table(folder / "sparse_nuclei.parquet")
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == table.num_rows > 0
    ids = set()
    for feature in features:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]  # closed
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "nucleus"
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"Nucleus id", "Area µm^2", "Probability"}
        ids.add(feature["id"])
    assert len(ids) == len(features)
    # the table: the columns a pandas / DuckDB user reads, polygons as WKB
    assert table.column_names == ["id", "class", "class_id", "probability", "centroid_x",
                                  "centroid_y", "centroid_x_um", "centroid_y_um", "area_um2",
                                  "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "polygon"]
    again = pa.Table.from_pylist(table.to_pylist(), schema=table.schema)
    assert again.equals(table)
    polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
    centroids = shapely.get_coordinates(shapely.centroid(polygons))
    assert np.abs(centroids[:, 0] - table.column("centroid_x").to_numpy()).max() < 1.5
    bounds = shapely.bounds(polygons)
    assert (bounds[:, 0] >= table.column("bbox_x0").to_numpy() - 1).all()
    first = features[0]["geometry"]["coordinates"][0]
    assert np.allclose(shapely.get_coordinates(polygons[0]), first)
    overlay = cv2.imread(str(folder / "sparse_overlay.png"))
    assert overlay is not None and overlay.shape[:2] == (1300, 1100)


def test_a_slide_without_resolution_needs_mpp_and_a_truncated_slide_fails_alone(slides, tmp_path):
    root = slides["root"]
    with pytest.raises(SlideError, match="nompp.tif.*--mpp"):
        SlideReader(root / "nompp.tif", 0.25)
    cohort = [root / "truncated.tif", root / "nompp.tif", root / "sparse.tif"]
    result = predict_cohort(cohort, oracle_predictor(), tmp_path, 0.25, settings=SETTINGS,
                            progress=False)
    failed = {Path(f["slide"]).name: f["error"] for f in result["failed"]}
    assert set(failed) == {"truncated.tif", "nompp.tif"}
    assert "truncated.tif" in failed["truncated.tif"] and "--mpp" in failed["nompp.tif"]
    assert [Path(d["slide"]).name for d in result["done"]] == ["sparse.tif"]
    assert json.loads((tmp_path / "cohort_summary.json").read_text())["failed"] == result["failed"]
    # --mpp for the one without metadata; the finished slide is skipped
    settings = SlideSettings(block=BLOCK, margin=MARGIN, slide_mpp=0.25)
    again = predict_cohort(cohort[1:], oracle_predictor(), tmp_path, 0.25, settings=settings,
                           progress=False)
    assert [Path(d["slide"]).name for d in again["done"]] == ["nompp.tif"]
    assert again["skipped"] == [str(root / "sparse.tif")]
    # a finished slide predicted again with another model is refused, not silently reused
    other = oracle_predictor()
    other.model.layers[-1].set_weights([w * 1.5 for w in other.model.layers[-1].get_weights()])
    refused = predict_cohort([root / "sparse.tif"], other, tmp_path, 0.25, settings=settings,
                             progress=False)
    assert "another model or other settings" in refused["failed"][0]["error"]
    # two slides that would share an output folder are refused before any shard starts
    twin = tmp_path / "elsewhere" / "sparse.tif"
    twin.parent.mkdir()
    twin.write_bytes((root / "sparse.tif").read_bytes())
    with pytest.raises(ValueError, match="two slides would write to"):
        predict_cohort([root / "sparse.tif", twin], oracle_predictor(), tmp_path / "t", 0.25,
                       shard_spec="1/2", settings=settings, progress=False)
    # shards split the list without overlap
    parts = [predict_cohort(cohort, oracle_predictor(), tmp_path / "s", 0.25, shard_spec=f"{i}/2",
                            settings=settings, progress=False) for i in range(2)]
    names = [Path(x["slide"]).name for p in parts for x in p["done"] + p["failed"]]
    assert sorted(names) == sorted(p.name for p in cohort)
    assert (tmp_path / "s" / "cohort_summary_0of2.json").is_file()


SLOW_RUN = r"""
import sys, time
sys.path.insert(0, {tests!r})
from test_wsi import oracle_predictor, SETTINGS
from xsight_keras.slides import predict_slide
p = oracle_predictor()
forward = p._forward
def slow(tiles):
    time.sleep(0.15)
    return forward(tiles)
p._forward = slow
predict_slide({slide!r}, p, {out!r}, 0.25, settings=SETTINGS, progress=False)
"""


def test_a_run_killed_mid_slide_resumes_to_the_same_outputs(slides, tmp_path):
    slide = str(slides["root"] / "borders.tif")
    whole = tmp_path / "whole"
    predict_slide(slide, oracle_predictor(), whole, 0.25, settings=SETTINGS, progress=False)
    killed = tmp_path / "killed"
    code = SLOW_RUN.format(tests=str(Path(__file__).parent), slide=slide, out=str(killed))
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": keras.backend.backend()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    blocks = killed / "borders" / ".partial" / "blocks"
    deadline = time.time() + 240
    while len(list(blocks.glob("*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(blocks.glob("*.parquet")))
    assert 2 <= done_before < 6, "the kill should land mid-slide"
    sorted(blocks.glob("*.parquet"))[-1].write_bytes(b"PAR1")  # a block file cut short
    summary = predict_slide(slide, oracle_predictor(), killed, 0.25, settings=SETTINGS, progress=False)
    assert summary["blocks_resumed"] == done_before - 1  # the damaged one is predicted again
    a, b = read_nuclei(whole, "borders"), read_nuclei(killed, "borders")
    assert a.equals(b)
    ga = (whole / "borders" / "borders.geojson").read_bytes()
    assert ga == (killed / "borders" / "borders.geojson").read_bytes()
    assert not (killed / "borders" / ".partial").exists()


def test_the_command_predicts_a_slide_with_a_trained_run_and_refuses_a_model_without_mpp(
        trained_run, tmp_path, capsys):
    from xsight_keras.cli.predict_wsi import main
    from xsight_keras.data.demo import demo_tile
    from xsight_keras.slides.synthetic import Mosaic

    tiles = [demo_tile(3, i, 128) for i in range(6)]
    mosaic = Mosaic(np.stack([t[0] for t in tiles]), np.stack([t[2] for t in tiles]),
                    tissue=lambda y, x: (x < 700) & (y < 600))
    slide = write_pyramid_tiff(tmp_path / "demo slide.tif", (900, 1000), mosaic.render, mpp=0.25)
    out = tmp_path / "out"
    assert main([str(slide), "--run", str(trained_run), "--out", str(out), "--block", "512",
                 "--tile_size", "128", "--no_progress"]) == 0
    folder = out / "demo slide"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["reader"]["model_mpp"] == 0.25  # the run's mpp (demo preset)
    assert summary["blocks"] == 4 and summary["tiles_predicted"] > 0
    assert set(summary["nuclei_per_class"]) == {"neoplastic", "inflammatory", "connective",
                                                "dead", "epithelial"}
    for name in ("demo slide.geojson", "demo slide_nuclei.parquet", "demo slide_overlay.png",
                 "demo slide_tissue.png"):
        assert (folder / name).is_file(), name
    assert "1 slide(s) predicted, 0 already done, 0 failed" in capsys.readouterr().out
    same = [str(slide), "--run", str(trained_run), "--out", str(out), "--block", "512",
            "--tile_size", "128", "--no_progress"]
    assert main(same) == 0
    assert "0 slide(s) predicted, 1 already done" in capsys.readouterr().out
    assert main(same[:-5] + ["--no_progress"]) == 1  # other block and tile sizes: not reused
    assert "predicted with another model or other settings" in capsys.readouterr().err
    # a bare .keras file has no mpp: refused before any slide is read
    assert main([str(slide), "--model", str(trained_run / "best.keras"), "--out",
                 str(tmp_path / "o2"), "--no_progress"]) == 2
    assert "--model_mpp" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.svs"), "--model", str(trained_run / "best.keras"),
                 "--model_mpp", "0.25", "--out", str(tmp_path / "o3"), "--no_progress"]) == 1
    assert "missing.svs: no such file" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "monuseg-train").is_dir(),
                    reason="shared MoNuSeg images not present")
def test_real_images_come_back_at_the_model_scale_from_the_level_that_matches(tmp_path):
    """Two MoNuSeg images (40x, 0.25 µm/px) and their annotations on a slide: read at 0.25
    from a 0.25 scan they are the source pixels exactly; from a scan at 0.125 µm/px (the
    same images 2× larger) they are read from level 1 and match up to resampling."""
    from xsight_keras.data.monuseg import find_monuseg_pairs, read_monuseg_sample
    from xsight_keras.slides.synthetic import Mosaic

    pairs = find_monuseg_pairs(REPO.parent / "shared" / "data" / "monuseg-train")[:2]
    samples = [read_monuseg_sample(*p) for p in pairs]
    images = np.stack([s[0][:512, :512] for s in samples])
    instances = np.stack([s[1][:512, :512] for s in samples])
    mosaic = Mosaic(images, instances)
    native = write_pyramid_tiff(tmp_path / "native.tif", (1024, 1536), mosaic.render, mpp=0.25)

    def doubled(y, x, h, w):
        region = mosaic.render(y // 2, x // 2, -(-h // 2) + 1, -(-w // 2) + 1)
        return cv2.resize(region, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)[:h, :w]

    fine = write_pyramid_tiff(tmp_path / "fine.tif", (2048, 3072), doubled, mpp=0.125)
    region = (300, 700, 400, 600)
    with SlideReader(native, 0.25) as reader:
        assert reader.level == 0 and reader.size == (1024, 1536)
        assert np.array_equal(reader.read(*region), mosaic.render(*region))
        truth = mosaic.truth(*region)
        assert len(np.unique(truth)) > 20  # real nuclei under the region, ids unique per tile
    with SlideReader(fine, 0.25) as reader:
        assert reader.level == 1 and reader.scale == 2.0 and reader.size == (1024, 1536)
        got = reader.read(*region).astype(int)
        assert np.abs(got - mosaic.render(*region)).mean() < 2.0
