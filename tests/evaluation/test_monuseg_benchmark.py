"""The real-data benchmark end to end on MoNuSeg-format files (images + Aperio XML): prepared
with the fixed split by image id, trained, tuned, scored whole, and Dice/AJI/PQ per epoch."""

from __future__ import annotations

import json

import keras
import numpy as np

from tests.helpers import region, write_pair
from xsight_keras.evaluation.monuseg_benchmark import METRICS, VAL_IDS, run_monuseg_benchmark
from xsight_keras.heads import HV


def squares(n, size, side=9):
    """``n`` square nuclei on a diagonal of an image ``size`` px wide."""
    step = size // (n + 1)
    return [region(i, [(x, x), (x + side, x), (x + side, x + side), (x, x + side)])
            for i, x in enumerate(range(step, step * (n + 1), step), 1)]


def test_benchmark_trains_tunes_scores_and_draws_the_curve(tmp_path):
    src = tmp_path / "monuseg"
    for stem in (*VAL_IDS, "TCGA-TRAIN-1", "TCGA-TRAIN-2"):
        write_pair(src, stem, squares(4, 80), size=(80, 80))  # 64² crops and validation crops
    overrides = {"encoder": "resnet18", "decoder_filters": "8,8,8,8,8", "input_size": 64,
                 "val_size": 64, "batch_size": 2, "use_mixed_precision": False,
                 "num_workers": 0}  # the preset's hv head
    report = run_monuseg_benchmark(src, tmp_path / "out", steps=2, epochs=2,
                                   overrides=overrides, progress=False, curve=1)
    assert sorted(report["images"]) == sorted(VAL_IDS)  # the fixed split: these validate
    assert report["optimizer_steps"] == 2 and report["train_seconds"] > 0
    for scores in [*report["images"].values(), report["mean"]]:
        assert set(scores) == set(METRICS)
        assert all(0.0 <= scores[k] <= 1.0 or np.isnan(scores[k]) for k in ("dice", "aji", "pq"))
    assert report["mean"]["true_nuclei"] == 4
    assert [c["optimizer_steps"] for c in report["curve"]] == [1, 2]
    assert set(report["curve"][0]) >= {"epoch", "dice", "aji", "pq"}
    saved = json.loads((tmp_path / "out" / "monuseg_benchmark.json").read_text())
    assert saved["curve"] == json.loads(json.dumps(report["curve"], default=float))
    epoch_2 = keras.models.load_model(tmp_path / "out" / "runs" / "monuseg_benchmark" / "epoch_002.keras")
    assert list(epoch_2.arguments["heads"]) == [HV]


def test_benchmark_settings_that_would_change_its_step_count_are_refused(tmp_path):
    import pytest

    from tests.helpers import run_script

    with pytest.raises(ValueError, match=r"\['epochs'\] follow from the benchmark's steps"):
        run_monuseg_benchmark(tmp_path, tmp_path / "out", overrides={"epochs": 3})
    proc = run_script("benchmark", "monuseg", "--src", tmp_path, "--steps", 4, "--epochs", 2,
                      "--curve", 3)
    assert proc.returncode == 2 and "curve in [0, epochs]" in proc.stderr
