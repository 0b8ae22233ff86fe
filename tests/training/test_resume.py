"""A run killed with SIGKILL mid-training and resumed ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tests.helpers import assert_same_weights, numpy_weights, saved_weights
from xsight_keras.config import load_config
from xsight_keras.data import write_demo_dataset
from xsight_keras.training import run as run_module
from xsight_keras.training.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from xsight_keras.training.run import train

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_demo_dataset(root / "data", {"train": 48, "valid": 4}, seed=0)
    settings = {
        "data_root": str(root / "data"), "output_dir": str(root / "outputs"), "epochs": 4,
        "batch_size": 4, "input_size": 64, "val_size": 64, "decoder_filters": [8, 8, 8, 8, 8],
        "encoder": "resnet18", "use_ema": True, "use_swa": True, "swa_start_epoch": 1,
        "early_stopping_patience": 10, "mixup_alpha": 0.2, "aug_schedule": "0:1,2:2", "seed": 3,
        "tensorboard_images": 0,
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    return root, config


def history_rows(run_dir, name="history.csv"):
    """The rows of a history CSV as float arrays (header dropped; the epoch column included)."""
    lines = (run_dir / name).read_text().strip().splitlines()
    return [np.array(line.split(","), float) for line in lines[1:]]


def start_and_kill(command, run_dir, condition, delay=0.0):
    """Start a training, SIGKILL it once its saved state satisfies ``condition`` (then
    ``delay`` seconds later); return the last saved state."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "state" / "state.json"
    deadline = time.time() + 600
    reached = False
    while not reached and time.time() < deadline and proc.poll() is None:
        try:
            reached = condition(json.loads(state.read_text()))
        except (OSError, ValueError):  # not written yet, or between the two renames
            pass
        time.sleep(0.02)
    if not reached:
        proc.kill()
        proc.wait()
        pytest.fail(f"the training's state never reached the kill point (exit {proc.returncode})")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    return json.loads(state.read_text())


def test_killed_run_resumes_to_the_same_end(setup):
    root, config = setup
    base = [sys.executable, TRAIN, "--preset", "demo", "--config", str(config)]
    subprocess.run(base + ["--experiment_name", "whole"], check=True, capture_output=True)
    killed = root / "outputs" / "killed"
    saved = start_and_kill(base + ["--experiment_name", "killed"], killed,
                           lambda s: s["epoch"] >= 1, delay=0.4)  # 0.4 s into the next epoch
    assert not (killed / "final.keras").exists()  # it really died before the end
    done_before = saved["epoch"] + 1
    assert 2 <= done_before < 4
    resumed = subprocess.run([sys.executable, TRAIN, "--resume", str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = root / "outputs" / "whole"
    assert len(history_rows(killed)) == len(history_rows(whole)) == 4  # no duplicate row
    assert_same_weights(history_rows(whole), history_rows(killed), rtol=1e-3, atol=1e-4,
                        what="history rows")
    # the final weights, the best (EMA) checkpoint and the SWA average with its BatchNorm pass
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(whole / name), saved_weights(killed / name),
                            rtol=1e-4, atol=1e-5, what=name)


def test_resume_without_state_is_a_clear_error(setup, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 1}))
    proc = subprocess.run([sys.executable, TRAIN, "--resume", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no training state" in proc.stderr


def test_non_finite_loss_stops_at_its_step():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((16, 4), "float32")
    y = np.ones((16, 1), "float32")
    y[9] = np.nan  # batch 3 of 4 samples (steps counted from 1)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 3"):
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[StopOnNonFiniteLoss()], verbose=0)


def test_progressive_unet_killed_in_stage_2_resumes_to_the_same_end(setup, tmp_path):
    root, _ = setup
    config = tmp_path / "pgu.yaml"
    config.write_text(yaml.safe_dump({
        "data_root": str(root / "data"), "output_dir": str(tmp_path / "out"), "epochs_per_stage": 3,
        "base_filters": 4, "batch_sizes": "32:4,64:4,128:4,256:4", "stages": [1, 2, 3],
        "use_ema": True, "seed": 5, "tensorboard_images": 0}))
    base = [sys.executable, TRAIN, "--preset", "papsmear", "--config", str(config)]
    subprocess.run(base + ["--experiment_name", "whole"], check=True, capture_output=True)
    killed = tmp_path / "out" / "killed"
    saved = start_and_kill(base + ["--experiment_name", "killed"], killed, lambda s: s["stage"] == 2)
    assert saved["stage"] == 2 and not (killed / "final.keras").exists()
    resumed = subprocess.run([sys.executable, TRAIN, "--resume", str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = tmp_path / "out" / "whole"
    for stage in (1, 2, 3):
        lines = lambda run: (run / f"history_stage_{stage}.csv").read_text().strip().splitlines()
        assert len(lines(killed)) == len(lines(whole)) == 4
    assert_same_weights(saved_weights(whole / "final.keras"), saved_weights(killed / "final.keras"),
                        rtol=1e-4, atol=1e-5, what="final.keras")


class Killed(Exception):
    """Stands in for a kill in the middle of an epoch (the in-process runs below)."""


def test_early_stopping_fires_after_a_resume_as_in_an_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    """Early stopping whose best epoch lies before an interruption and whose stop comes after
    it: the resumed run stops at the same epoch and ends on the same best weights.

    The monitored score is scripted per epoch (so the stop is known by hand, whatever the model
    learns): best at epoch 0, then no improvement; patience 3 stops after epoch 3, and the
    interruption in epoch 2 comes with one epoch of patience already used. A one-stage
    PGU-Net with 4 base filters keeps the three in-process runs cheap (the resume path is the
    one every model takes)."""
    scores = [0.5, 0.2, 0.2, 0.2, 0.2, 0.2]
    phase = {"name": "whole", "kill_in": None}
    raw_at_epoch_end = {"whole": {}, "killed": {}, "resumed": {}}

    class ScriptedScore(run_module.ScheduleLogger):  # runs before the checkpoint and early stopping
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == phase["kill_in"]:
                raise Killed  # one step into the epoch: its row and state were never written

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            logs["val_fused_mean_fg_dice"] = scores[epoch]  # the monitor of a PGU-Net run
            raw_at_epoch_end[phase["name"]][epoch] = numpy_weights(self.model)

    monkeypatch.setattr(run_module, "ScheduleLogger", ScriptedScore)
    settings = {"data_root": str(demo_data), "output_dir": str(tmp_path), "model": "progressive_unet",
                "stages": [1], "base_filters": 4, "epochs_per_stage": 6, "batch_sizes": "32:4",
                "use_ema": True, "use_swa": True, "swa_start_epoch": 1, "early_stopping_patience": 3,
                "tensorboard_images": 0, "num_workers": 0, "seed": 4}
    whole = train(load_config("demo", overrides=settings | {"experiment_name": "whole"})).run_dir
    config = load_config("demo", overrides=settings | {"experiment_name": "killed"})
    phase.update(name="killed", kill_in=2)
    with pytest.raises(Killed):
        train(config)
    killed = config.run_dir
    assert json.loads((killed / "state" / "state.json").read_text())["epoch"] == 1
    phase.update(name="resumed", kill_in=None)
    train(config, resume=True)
    # both stopped after epoch 3 (4 of 6 epochs), the resumed one without a duplicate row
    assert sorted(raw_at_epoch_end["whole"]) == [0, 1, 2, 3]
    assert sorted(raw_at_epoch_end["resumed"]) == [2, 3]
    csv = "history_stage_1.csv"
    assert [row[0] for row in history_rows(whole, csv)] == [0, 1, 2, 3]
    assert [row[0] for row in history_rows(killed, csv)] == [0, 1, 2, 3]
    # and both ended on the raw weights of epoch 0, the best one
    best_raw = raw_at_epoch_end["whole"][0]
    assert not np.allclose(best_raw[0], raw_at_epoch_end["whole"][3][0])  # training moved them
    assert_same_weights(saved_weights(whole / "final.keras"), best_raw, what="whole final.keras")
    assert_same_weights(saved_weights(killed / "final.keras"), best_raw, rtol=1e-5, atol=1e-6,
                        what="resumed final.keras")
    for name in ("best.keras", "swa.keras"):  # EMA weights of epoch 0; SWA mean of epochs 1–3
        assert_same_weights(saved_weights(whole / name), saved_weights(killed / name),
                            rtol=1e-5, atol=1e-6, what=name)
    assert_same_weights(history_rows(whole, csv), history_rows(killed, csv), rtol=1e-4,
                        atol=1e-5, what="history rows")
