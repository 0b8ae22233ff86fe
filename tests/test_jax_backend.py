"""The same library on the JAX backend (CPU), each check in a fresh ``KERAS_BACKEND=jax`` process.

Skipped when jax is not installed (the ``test`` extra installs its CPU build, so CI runs it).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xsight_keras.data import write_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def _run_jax(*args, timeout=600, devices=1):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_models_losses_metrics_schedules_and_saving_on_jax(tmp_path):
    assert "JAX OK" in _run_jax(str(ROOT / "tests/jax_backend_check.py"), str(tmp_path / "pgu.keras"))


def test_demo_training_data_parallel_on_two_jax_devices_with_ema_swa_and_resume(tmp_path):
    """keras.distribution.DataParallel over two (host) devices: the run splits each batch."""
    write_demo_dataset(tmp_path / "data", {"train": 16, "valid": 4}, seed=0, tile_size=64)
    small = tmp_path / "small.yaml"
    small.write_text("input_size: 64\nval_size: 64\ndecoder_filters: [32, 16, 16, 8, 8]\n"
                     "use_ema: true\nuse_swa: true\nswa_start_epoch: 1\nearly_stopping_patience: 4\n")
    common = ["--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs")]
    out = _run_jax("scripts/train.py", "--preset", "demo", "--config", str(small), *common,
                   "--epochs", "1", "--batch_size", "4", devices=2)
    assert "data parallel on 2 JAX devices" in out
    run = tmp_path / "runs" / "demo"
    assert json.loads((run / "config.json").read_text())["keras_backend"] == "jax"
    out = _run_jax("scripts/train.py", "--resume", str(run), "--epochs", "2", devices=2)
    assert "SWA: averaged 1 epochs" in out
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3  # header, 2 epochs
    for name in ("best.keras", "final.keras", "swa.keras"):
        assert (run / name).is_file()
