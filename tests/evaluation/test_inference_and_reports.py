import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from tests.helpers import run_script
from xsight_keras.data import PreparedDataset, PreprocessConfig
from xsight_keras.evaluation import (
    confusion_matrix,
    evaluate_run,
    evaluate_split,
    scores_from_confusion,
)
from xsight_keras.inference import Predictor, apply_transform, invert_transform, parse_transforms
from xsight_keras.inference.instances import PostprocessConfig
from xsight_keras.rundir import RunDir
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


def test_tta_averages_the_eight_flips_and_rotations_mapped_back():
    keras.utils.set_random_seed(0)
    model = local_model()  # 3×3 convolutions with random kernels: not symmetric
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # one tile
    x = image.astype(np.float32) / 255

    def mapped_back(mirror: bool, turns: int) -> np.ndarray:
        view = np.rot90(x[:, ::-1] if mirror else x, turns)
        out = np.rot90(model.predict(np.ascontiguousarray(view)[None], verbose=0)[0], -turns)
        return out[:, ::-1] if mirror else out

    views = {(m, t): mapped_back(m, t) for m in (False, True) for t in range(4)}
    expected = np.mean(list(views.values()), axis=0)
    plain = Predictor(model, RAW, tile_size=64).predict_probabilities(image)
    tta = Predictor(model, RAW, tile_size=64, tta="all").predict_probabilities(image)
    np.testing.assert_allclose(plain, views[False, 0], atol=1e-5)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-2  # TTA really changes this model's output
    pair = Predictor(model, RAW, tile_size=64, tta="identity,flip").predict_probabilities(image)
    np.testing.assert_allclose(pair, (views[False, 0] + views[True, 0]) / 2, atol=1e-5)


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


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="blending on the torch device")
def test_blending_on_the_device_equals_blending_in_numpy():
    """On torch the predictor keeps outputs on the model's device, undoes TTA there (a direction
    field's channels included) and blends there: the same maps as the numpy path (other
    backends; same float32 operations in the same order, compared to float32 rounding), with
    tissue-skipped tiles, a mirror-padded small image and 8-fold TTA."""
    from xsight_keras.models import attention_unet

    keras.utils.set_random_seed(5)
    model = attention_unet(3, "resnet18", decoder_filters=(8, 8, 8, 8, 8), heads=("hv",),
                           data_format="channels_first")
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)
    tissue = np.zeros((150, 170), bool)
    tissue[:60, :70] = True
    small = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    for tta in (None, "all"):
        on_device = Predictor(model, RAW, tile_size=64, overlap=16, batch_size=5, tta=tta)
        in_numpy = Predictor(model, RAW, tile_size=64, overlap=16, batch_size=5, tta=tta)
        assert on_device._device is not None
        in_numpy._device = None
        for img, mask in ((image, None), (image, tissue), (small, None)):
            a = on_device.predict_region(on_device.prepare_region(img, mask))
            b = in_numpy.predict_region(in_numpy.prepare_region(img, mask))
            assert a.keys() == b.keys() == {"semantic", "hv"}
            for name in a:
                assert isinstance(a[name], np.ndarray) and a[name].dtype == np.float32
                np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)
            if mask is not None:  # tiles without tissue are skipped: 0 there
                assert not a["semantic"][100:, 120:].any()


def test_an_image_smaller_than_a_tile_is_mirror_padded():
    keras.utils.set_random_seed(3)
    model = local_model()  # each output pixel sees its 5×5 neighbourhood: the padding shows
    image = np.random.default_rng(4).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    x = image.astype(np.float32) / 255
    padded = np.pad(x, ((12, 12), (7, 7), (0, 0)), mode="reflect")  # to 64×64, evenly on both sides
    expected = model.predict(padded[None], verbose=0)[0, 12:52, 7:57]
    got = Predictor(model, RAW, tile_size=64).predict_probabilities(image)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    zero_padded = model.predict(np.pad(x, ((12, 12), (7, 7), (0, 0)))[None], verbose=0)[0, 12:52, 7:57]
    assert np.abs(zero_padded - expected)[0].max() > 1e-3  # the first row does see the padding


def test_a_model_trained_on_resized_images_predicts_at_the_scale_it_learned():
    """resize_mode 'resize' (the PGU-Net on Pap-smear cells): prediction resizes the whole image
    to the training size, predicts it as one tile and resizes the maps back."""
    from xsight_keras.data.images import resize_image
    from xsight_keras.inference.predictor import training_resize
    from xsight_keras.models import progressive_unet

    keras.utils.set_random_seed(5)
    model = local_model()
    seen = []
    original_call = model.call

    def recording_call(inputs, *args, **kwargs):
        seen.append(tuple(inputs.shape))
        return original_call(inputs, *args, **kwargs)

    model.call = recording_call
    image = np.random.default_rng(5).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    got = Predictor(model, RAW, tile_size=64, resize_to=32).predict_probabilities(image)
    assert seen == [(1, 32, 32, 3)]  # one tile: the whole image at 32×32, not 64 px windows
    small = resize_image(image, 32, 32).astype(np.float32) / 255
    expected = resize_image(model.predict(small[None], verbose=0)[0], 128, 96)
    assert got.shape == (128, 96, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the size comes from the run: a PGU-Net stage's resolution, else the training size
    stage2 = progressive_unet(2, base_filters=4)
    assert training_resize({"resize_mode": "resize"}, stage2) == 64
    assert training_resize({"resize_mode": "crop"}, stage2) is None
    assert training_resize({"resize_mode": "resize", "input_size": 96}, model) == 96
    assert training_resize({"resize_mode": "resize", "progressive": True, "input_size": 96,
                            "size_schedule": "0:64,3:128"}, model) == 128


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
    # class c in neither map: NaN, left out of the means; class d only predicted: Dice 0, counted
    truth = np.array([[0, 1, 1, 2, 2]])
    pred = np.array([[0, 1, 2, 2, 4]])
    scores = scores_from_confusion(confusion_matrix(truth, pred, 5), ["bg", "a", "b", "c", "d"])
    assert np.isnan(scores["dice"]["c"]) and np.isnan(scores["iou"]["c"]) and scores["dice"]["d"] == 0
    assert scores["dice"]["a"] == pytest.approx(2 / 3) and scores["dice"]["b"] == pytest.approx(0.5)
    assert scores["mean_dice"] == pytest.approx((1 + 2 / 3 + 1 / 2 + 0) / 4)
    assert scores["mean_fg_dice"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert scores["mean_iou"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert scores["mean_fg_iou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_training_with_tta_validation_logs_tta_scores(trained_run):
    """``--tta_val`` logs the scores of the whole validation images predicted with all 8
    transforms: those of the 1-epoch run's best.keras (no EMA) under 8-fold TTA, not plain."""
    import csv

    with open(trained_run / "history.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    assert "val_tta_mean_fg_dice" in logged and "val_tta_dice_dead" in logged
    config = json.loads((trained_run / "config.json").read_text())
    assert not config["use_ema"] and config["epochs"] == 1
    model = keras.models.load_model(trained_run / "best.keras")
    dataset = PreparedDataset(Path(config["data_root"]) / "valid")
    preprocess = RunDir.open(trained_run).preprocess
    scores = {tta: evaluate_split(Predictor(model, preprocess, tile_size=64, tta=tta), dataset,
                                  progress=False, instances=False)["scores"]
              for tta in (None, "all")}
    for name in ("mean_fg_dice", "mean_dice"):
        assert float(logged[f"val_tta_{name}"]) == pytest.approx(scores["all"][name], abs=1e-6)
        assert abs(scores["all"][name] - scores[None][name]) > 1e-4  # TTA changes the scores


def colour_model(kernel, bias) -> keras.Model:
    """A 1×1-convolution classifier with the given (3, K) kernel and (K,) bias, then softmax."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(len(bias), 1)
    model = keras.Model(inputs, keras.layers.Softmax()(conv(inputs)))
    conv.set_weights([np.asarray(kernel, np.float32).reshape(1, 1, 3, -1),
                      np.asarray(bias, np.float32)])
    return model


def test_evaluate_script_writes_reports_with_and_without_tta(run_copy, tmp_path):
    trained_run = run_copy
    proc = run_script("evaluate", "--run", trained_run, "--split", "test", "--tta")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "evaluation_test.json").read_text())
    assert set(report["results"]) == {"plain", "tta"} and report["images"] == 3
    assert report["model"] == str(trained_run / "best.keras")
    assert set(report["results"]["plain"]["dice"]) == {"background", "neoplastic", "inflammatory",
                                                       "connective", "dead", "epithelial"}
    plain, tta = np.asarray(report["confusion"]["plain"]), np.asarray(report["confusion"]["tta"])
    assert plain.sum() == tta.sum() == 3 * 256 * 256
    assert not np.array_equal(plain, tta)  # the tta column really comes from TTA predictions
    assert report["results"]["plain"] != report["results"]["tta"]
    markdown = (trained_run / "evaluation_test.md").read_text()
    assert "| dead |" in markdown and "mean (foreground)" in markdown and "Dice tta" in markdown
    nuclei = report["results"]["plain"]["instances"]
    assert {"bpq", "mpq", "aji", "detection_f1", "pq_per_class", "f1_per_class"} <= set(nuclei)
    assert "| bpq |" in markdown and "| PQ dead |" in markdown
    png = cv2.imread(str(trained_run / "confusion_test.png"))
    assert png is not None and png.shape[0] > 300 and png.shape[1] > 300
    # --model FILE: that file is evaluated, not best.keras (this one calls every pixel "dead")
    dead = tmp_path / "all_dead.keras"
    colour_model(np.zeros((3, 6)), [0, 0, 0, 0, 5, 0]).save(dead)
    proc = run_script("evaluate", "--run", trained_run, "--split", "test", "--model", dead,
                      "--limit", 1)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "evaluation_test.json").read_text())
    assert report["model"] == str(dead) and report["images"] == 1
    confusion = np.asarray(report["confusion"]["plain"])
    assert confusion[:, 4].sum() == confusion.sum() == 256 * 256
    assert report["results"]["plain"]["iou"]["dead"] == pytest.approx(confusion[4, 4] / 256 ** 2)


def test_predict_script_writes_maps_and_lists_unreadable_files(run_copy, tmp_path):
    # a model that calls red pixels neoplastic, green inflammatory, blue connective, white
    # epithelial and black background, so the image below holds four known nuclei
    colour_model(4 * np.array([[0, 1, -1, -1, 0, 1], [0, -1, 1, -1, 0, 1], [0, -1, -1, 1, 0, 1]]),
                 [4, 0, 0, 0, -40, -20]).save(run_copy / "best.keras")
    image = np.zeros((100, 130, 3), np.uint8)  # smaller than a tile: mirror-padded
    yy, xx = np.mgrid[:100, :130]
    centres = {(25, 25): "neoplastic", (25, 100): "inflammatory", (70, 30): "connective",
               (75, 95): "epithelial"}
    for (cy, cx), colour in zip(centres, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = colour
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "good.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    proc = run_script("predict", inputs, "--run", run_copy, "--out", out, "--save_probs",
                      "--instances")
    assert proc.returncode == 1 and "broken.png" in proc.stderr
    assert not (out / "broken_labels.png").exists()
    labels = cv2.imread(str(out / "good_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (100, 130) and labels.dtype == np.uint8
    probs = np.load(out / "good_probs.npy")
    assert probs.shape == (100, 130, 6) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1, atol=1e-2)
    top2 = np.sort(probs.astype(np.float32), axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2  # float16 rounding cannot swap these
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], np.argmax(probs, -1)[clear])
    assert [labels[c] for c in centres] == [1, 2, 3, 5] and labels[50, 60] == 0
    assert cv2.imread(str(out / "good_overlay.png")).shape == (100, 130, 3)
    nuclei = cv2.imread(str(out / "good_instances.png"), cv2.IMREAD_UNCHANGED)
    assert nuclei.shape == (100, 130) and nuclei.dtype == np.uint16
    ids = sorted(set(np.unique(nuclei).tolist()) - {0})
    assert len(ids) == 4 and sorted(nuclei[c] for c in centres) == ids
    features = json.loads((out / "good.geojson").read_text())
    assert features["type"] == "FeatureCollection"
    by_id = {int(f["id"]): f for f in features["features"]}
    assert sorted(by_id) == ids and len(features["features"]) == 4  # one polygon per nucleus
    names = json.loads((run_copy / "config.json").read_text())["class_names"]
    for centre, name in centres.items():
        feature = by_id[int(nuclei[centre])]
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) > 8
        assert all(nuclei[y, x] == nuclei[centre] for x, y in ring)  # the nucleus' own border
        majority = np.bincount(labels[nuclei == nuclei[centre]], minlength=6).argmax()
        assert feature["properties"]["classification"]["name"] == name == names[majority]


def test_tuning_chooses_the_best_trial_and_evaluation_uses_it(run_copy):
    trained_run = run_copy
    proc = run_script("tune_postprocessing", "--run", trained_run, "--limit", 2)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((trained_run / "postprocess.json").read_text())
    assert set(settings) == {"dist_threshold", "contour_threshold", "min_marker_size", "min_size"}
    search = json.loads((trained_run / "postprocess_search.json").read_text())
    assert len(search["trials"]) == 5 * 3  # no instance head: the contour threshold is not searched
    metric = search["metric"]
    assert metric == "mpq"  # several nucleus classes
    scores = [t[metric] for t in search["trials"]]
    finite = [v for v in scores if not np.isnan(v)]
    assert len(set(finite)) > 1, f"every trial scored the same, nothing to choose: {scores}"
    chosen = [t for t in search["trials"] if all(t[k] == v for k, v in settings.items())]
    assert len(chosen) == 1 and chosen[0][metric] == max(finite)  # the best (ties: any of them)
    assert search["best"] == settings and search["score"] == max(finite)
    # evaluation on the same images reads postprocess.json: it reproduces the chosen trial's
    # score; if the defaults score the same, a worse trial written in its place shows the file
    # is read (an evaluation that ignored it would give the defaults' score)
    default = PostprocessConfig().to_dict()
    defaults = [t for t in search["trials"] if all(t[k] == v for k, v in default.items())]
    trials = [chosen[0]]
    if not defaults or defaults[0][metric] == pytest.approx(chosen[0][metric]):
        trials.append(min((t for t in search["trials"] if not np.isnan(t[metric])),
                          key=lambda t: t[metric]))
    for trial in trials:
        (trained_run / "postprocess.json").write_text(json.dumps({k: trial[k] for k in settings}))
        report = evaluate_run(trained_run, "valid", limit=2, progress=False)
        assert report["results"]["plain"]["instances"][metric] == pytest.approx(trial[metric])


def test_plots_are_written_with_the_expected_size(run_copy, tmp_path):
    trained_run = run_copy
    proc = run_script("visualize_predictions", "--output_dir", trained_run.parent, "--n", 2)
    assert proc.returncode == 0, proc.stderr
    grid = cv2.imread(str(trained_run / "predictions_test.png"))
    assert grid is not None and grid.shape[1] == 960 and grid.shape[0] > 400  # 4 panels, 2 rows
    data = PreparedDataset(Path(json.loads((trained_run / "config.json").read_text())["data_root"]) / "train")
    stats, samples = plot_dataset_statistics(data, tmp_path / "dist.png", tmp_path / "samples.png", 4)
    assert cv2.imread(str(stats)).shape[1] > 1000  # three panels: pixels, nuclei, per tissue
    assert cv2.imread(str(samples)).shape[1] == 960
    comparison = plot_run_comparison([trained_run, trained_run], tmp_path / "cmp.png")
    assert cv2.imread(str(comparison)).shape[1] > 1200 and comparison.stat().st_size > 10_000
