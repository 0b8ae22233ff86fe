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

from xsight_keras.data import write_demo_dataset
from xsight_keras.training.callbacks import NonFiniteLossError, StopOnNonFiniteLoss

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


def final_weights(run_dir):
    import xsight_keras  # noqa: F401

    model = keras.models.load_model(run_dir / "final.keras")
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def start_and_kill(command, run_dir, condition, delay=0.0):
    """Start a training, SIGKILL it once its saved state satisfies ``condition`` (then
    ``delay`` seconds later); return the last saved state."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "state" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if condition(json.loads(state.read_text())):
                break
        except (OSError, ValueError):  # not written yet, or between the two renames
            pass
        time.sleep(0.02)
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
    rows = lambda run: (run / "history.csv").read_text().strip().splitlines()
    assert len(rows(killed)) == len(rows(whole)) == 5  # header + 4 epochs, no duplicate row
    for a, b in zip(final_weights(whole), final_weights(killed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(rows(whole)[1:], rows(killed)[1:]):
        np.testing.assert_allclose(np.array(a.split(","), float), np.array(b.split(","), float),
                                   rtol=1e-3, atol=1e-4)
    assert (killed / "swa.keras").is_file() and (killed / "best.keras").is_file()


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
    for a, b in zip(final_weights(whole), final_weights(killed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
