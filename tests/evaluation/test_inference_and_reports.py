import json
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from tests.helpers import ROOT
from xsight_keras.data import PreparedDataset, PreprocessConfig
from xsight_keras.evaluation import confusion_matrix, scores_from_confusion
from xsight_keras.inference import Predictor, apply_transform, invert_transform, parse_transforms
from xsight_keras.viz import plot_dataset_statistics, plot_run_comparison

RAW = PreprocessConfig(clahe_clip_limit=0, zscore="none")


@pytest.mark.parametrize("k", range(8))
def test_every_tta_transform_is_inverted_exactly(k):
    x = np.random.default_rng(k).normal(size=(2, 6, 6, 3))
    y = apply_transform(x, k)
    np.testing.assert_array_equal(invert_transform(y, k), x)
    if k:
        assert not np.array_equal(y, x)
    assert parse_transforms("all") == tuple(range(8)) and parse_transforms("identity,flip") == (0, 4)


def pointwise_model(channels=3, classes=4, data_format="channels_last"):
    shape = (None, None, channels) if data_format == "channels_last" else (channels, None, None)
    inputs = keras.Input(shape)
    axis = -1 if data_format == "channels_last" else 1
    x = keras.layers.Conv2D(classes, 1, data_format=data_format)(inputs)
    return keras.Model(inputs, keras.layers.Softmax(axis=axis)(x))


def local_model(classes=3):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(classes, 3, padding="same")(x)
    return keras.Model(inputs, keras.layers.Softmax()(x))


def test_tta_on_a_symmetric_model_changes_nothing():
    keras.utils.set_random_seed(0)
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    model = pointwise_model()  # 1×1 convolution: commutes with every flip and rotation
    plain = Predictor(model, RAW, tile_size=64, overlap=16).predict_probabilities(image)
    tta = Predictor(model, RAW, tile_size=64, overlap=16, tta="all").predict_probabilities(image)
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_tiled_prediction_equals_untiled_away_from_borders_at_any_size():
    keras.utils.set_random_seed(1)
    model = local_model()
    image = np.random.default_rng(1).integers(0, 255, (150, 170, 3), dtype=np.uint8)
    x = image.astype(np.float32) / 255
    whole = model.predict(x[None], verbose=0)[0]
    tiled = Predictor(model, RAW, tile_size=64, overlap=24, batch_size=3).predict_probabilities(image)
    assert tiled.shape == (150, 170, 3)
    np.testing.assert_allclose(tiled[4:-4, 4:-4], whole[4:-4, 4:-4], atol=1e-4)
    small = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)  # < one tile
    assert Predictor(model, RAW, tile_size=64).predict_probabilities(small).shape == (40, 50, 3)


def test_channels_first_model_gives_the_same_probabilities():
    keras.utils.set_random_seed(2)
    last = pointwise_model()
    first = pointwise_model(data_format="channels_first")
    first.set_weights(last.get_weights())
    image = np.random.default_rng(3).integers(0, 255, (70, 80, 3), dtype=np.uint8)
    a = Predictor(last, RAW, tile_size=64).predict_probabilities(image)
    b = Predictor(first, RAW, tile_size=64).predict_probabilities(image)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_scores_from_confusion_by_hand():
    truth = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    scores = scores_from_confusion(confusion_matrix(truth, pred, 3), ["bg", "a", "b"])
    assert scores["dice"] == {"bg": 1.0, "a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}
    assert scores["mean_fg_dice"] == pytest.approx(2 / 3)
    assert scores["iou"]["a"] == pytest.approx(0.5) and scores["pixel_accuracy"] == 0.75


def test_training_with_tta_validation_logs_tta_scores(trained_run):
    header = (trained_run / "history.csv").read_text().splitlines()[0]
    assert "val_tta_mean_fg_dice" in header and "val_tta_dice_dead" in header


def test_evaluate_script_writes_reports_with_and_without_tta(run_copy):
    trained_run = run_copy
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--run",
                           str(trained_run), "--split", "test", "--tta"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "evaluation_test.json").read_text())
    assert set(report["results"]) == {"plain", "tta"} and report["images"] == 3
    assert set(report["results"]["plain"]["dice"]) == {"background", "neoplastic", "inflammatory",
                                                       "connective", "dead", "epithelial"}
    assert np.asarray(report["confusion"]["plain"]).sum() == 3 * 256 * 256
    markdown = (trained_run / "evaluation_test.md").read_text()
    assert "| dead |" in markdown and "mean (foreground)" in markdown and "Dice tta" in markdown
    nuclei = report["results"]["plain"]["instances"]
    assert {"bpq", "mpq", "aji", "detection_f1", "pq_per_class", "f1_per_class"} <= set(nuclei)
    assert "| bpq |" in markdown and "| PQ dead |" in markdown
    png = cv2.imread(str(trained_run / "confusion_test.png"))
    assert png is not None and png.shape[0] > 300 and png.shape[1] > 300


def test_predict_script_writes_maps_and_lists_unreadable_files(trained_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (100, 130, 3), dtype=np.uint8)
    cv2.imwrite(str(inputs / "good.png"), image)
    (inputs / "broken.png").write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), str(inputs),
                           "--run", str(trained_run), "--out", str(tmp_path / "out"), "--save_probs",
                           "--instances"], capture_output=True, text=True)
    assert proc.returncode == 1 and "broken.png" in proc.stderr
    labels = cv2.imread(str(tmp_path / "out" / "good_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (100, 130) and labels.max() < 6
    assert np.load(tmp_path / "out" / "good_probs.npy").shape == (100, 130, 6)
    assert cv2.imread(str(tmp_path / "out" / "good_overlay.png")).shape == (100, 130, 3)
    assert not (tmp_path / "out" / "broken_labels.png").exists()
    nuclei = cv2.imread(str(tmp_path / "out" / "good_instances.png"), cv2.IMREAD_UNCHANGED)
    assert nuclei.shape == (100, 130) and nuclei.dtype == np.uint16
    geojson = json.loads((tmp_path / "out" / "good.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) == len(np.unique(nuclei)) - 1 or len(geojson["features"]) <= nuclei.max()


def test_tuning_writes_postprocess_settings_used_by_evaluation(run_copy):
    trained_run = run_copy
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_postprocessing.py"), "--run",
                           str(trained_run), "--limit", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((trained_run / "postprocess.json").read_text())
    assert set(settings) == {"dist_threshold", "contour_threshold", "min_marker_size", "min_size"}
    search = json.loads((trained_run / "postprocess_search.json").read_text())
    assert len(search["trials"]) == 5 * 3  # no instance head: the contour threshold is not searched


def test_plots_are_written_with_the_expected_size(run_copy, tmp_path):
    trained_run = run_copy
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "visualize_predictions.py"),
                           "--output_dir", str(trained_run.parent), "--n", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    grid = cv2.imread(str(trained_run / "predictions_test.png"))
    assert grid is not None and grid.shape[1] == 960 and grid.shape[0] > 400  # 4 panels, 2 rows
    data = PreparedDataset(Path(json.loads((trained_run / "config.json").read_text())["data_root"]) / "train")
    stats, samples = plot_dataset_statistics(data, tmp_path / "dist.png", tmp_path / "samples.png", 4)
    assert cv2.imread(str(stats)).shape[1] > 1000  # three panels: pixels, nuclei, per tissue
    assert cv2.imread(str(samples)).shape[1] == 960
    comparison = plot_run_comparison([trained_run, trained_run], tmp_path / "cmp.png")
    assert cv2.imread(str(comparison)).shape[1] > 1200 and comparison.stat().st_size > 10_000
