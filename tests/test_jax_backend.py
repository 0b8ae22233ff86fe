"""The same library on the JAX backend (CPU), each check in a fresh ``KERAS_BACKEND=jax`` process.

Skipped when jax is not installed (the ``test`` extra installs its CPU build, so CI runs it).
"""

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from tests.helpers import ROOT, assert_same_weights, finish, saved_weights, script_env, start_python
from xsight_keras.data import write_demo_dataset

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def _start_jax(*args, devices=1, **env) -> subprocess.Popen:
    env = script_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
    return start_python(*args, env=env)


def _run_jax(*args, timeout=600, devices=1, **env):
    return finish(_start_jax(*args, devices=devices, **env), timeout)


def test_models_losses_metrics_schedules_and_saving_on_jax(tmp_path):
    assert "JAX OK" in _run_jax(str(ROOT / "tests/jax_backend_check.py"), str(tmp_path / "pgu.keras"))


def test_demo_training_data_parallel_on_two_jax_devices_with_ema_swa_and_resume(tmp_path):
    """keras.distribution.DataParallel over two (host) devices: 2 epochs in one go vs 1 epoch
    then ``--resume --epochs 2`` end with the same weights (final, best with EMA, SWA) and
    metrics. A constant learning rate (a one-cycle schedule over 1 epoch differs from one over
    2); swa_start_epoch 0, so that "averaged 2 epochs" needs the SWA state of the first run.
    The resumed run reuses the compiled XLA programs of the first two (a persistent cache)."""
    write_demo_dataset(tmp_path / "data", {"train": 16, "valid": 4}, seed=0, tile_size=64)
    small = tmp_path / "small.yaml"
    small.write_text("input_size: 64\nval_size: 64\ndecoder_filters: [16, 8, 8, 8, 8]\n"
                     "lr_schedule: constant\nuse_ema: true\nuse_swa: true\nswa_start_epoch: 0\n"
                     "early_stopping_patience: 4\ntensorboard_images: 0\n")
    common = ["--preset", "demo", "--config", str(small), "--data_root", str(tmp_path / "data"),
              "--output_dir", str(tmp_path / "runs"), "--batch_size", "4"]
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # the two first runs side by side: start-up and XLA compilation are mostly single-threaded
    runs = [_start_jax("scripts/train.py", *common, "--experiment_name", name, "--epochs", epochs,
                       devices=2, **cache) for name, epochs in (("whole", "2"), ("split", "1"))]
    try:
        out = [finish(proc) for proc in runs][0]
    finally:
        for proc in runs:
            proc.kill()
    assert "data parallel on 2 JAX devices" in out
    assert "SWA: averaged 2 epochs" in out
    whole, split = tmp_path / "runs" / "whole", tmp_path / "runs" / "split"
    assert json.loads((whole / "config.json").read_text())["keras_backend"] == "jax"
    out = _run_jax("scripts/train.py", "--resume", str(split), "--epochs", "2", devices=2, **cache)
    assert "SWA: averaged 2 epochs" in out  # epoch 1 from the saved state

    rows = [(run / "history.csv").read_text().strip().splitlines() for run in (whole, split)]
    assert len(rows[0]) == len(rows[1]) == 3  # header, 2 epochs
    assert rows[0][0] == rows[1][0]
    for a, b in zip(rows[0][1:], rows[1][1:]):
        np.testing.assert_allclose(np.array(a.split(","), float), np.array(b.split(","), float),
                                   rtol=1e-4, atol=1e-5)
    # the tolerance only absorbs float rounding: a lost optimizer moment, EMA or SWA average
    # moves weights by ~1e-3
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(whole / name), saved_weights(split / name),
                            rtol=1e-4, atol=1e-5, what=name)
