"""Data-parallel training on CPUs: two Gloo processes, as torchrun starts them."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest

from xsight_keras.data import write_demo_dataset
from xsight_keras.data.loader import EpochBatchSampler
from xsight_keras.training.distributed import scaled_learning_rate

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_training_shards_cover_each_epoch_once_and_agree_on_steps():
    for epoch in range(3):
        shards = [EpochBatchSampler(40, 4, seed=7, start_epoch=epoch, rank=r, world_size=3) for r in range(3)]
        batches = [list(s) for s in shards]
        assert len({len(b) for b in batches}) == 1 == len({len(s) for s in shards})
        keys = [k for b in batches for batch in b for k in batch]
        assert len(keys) == 3 * 4 * (40 // 12) and len(set(keys)) == len(keys)  # no repeats
        assert {e for e, _ in keys} == {epoch}


def test_validation_shards_cover_the_split_exactly_once():
    shards = [EpochBatchSampler(11, 4, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    indices = sorted(i for s in shards for batch in s for _, i in batch)
    assert indices == list(range(11))


def test_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="4 × 2 processes is larger than the dataset"):
        EpochBatchSampler(7, 4, rank=0, world_size=2)


def test_learning_rate_scaling_rules():
    assert scaled_learning_rate(1e-3, 4, "none") == 1e-3
    assert scaled_learning_rate(1e-3, 4, "linear") == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, 4, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_learning_rate(1e-3, 4, "cubic")


def test_two_gloo_ranks_train_one_model(tmp_path):
    write_demo_dataset(tmp_path / "data", {"train": 32}, seed=0, tile_size=64)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/training/ddp_worker.py"),
                               str(tmp_path / "data"), str(tmp_path)],
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    w0, w1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert w0.files == w1.files
    for name in w0.files:  # weights and BatchNorm statistics: the same bytes on both ranks
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)

    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0]["history"] == logs[1]["history"]  # epoch metrics are global, not per rank
    loss = logs[0]["history"]["loss"]
    assert loss[-1] < loss[0], loss
    for epoch in range(4):  # 32 samples, 2 ranks × batch 4: every sample once per epoch
        seen = Counter(i for log in logs for e, i in log["seen"] if e == epoch)
        assert sorted(seen) == list(range(32)) and set(seen.values()) == {1}
    assert {e for e, _ in logs[1]["seen"]} == {0, 1, 2, 3}

    model = keras.models.load_model(tmp_path / "model.keras")
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype("float32")
    probs = keras.ops.convert_to_numpy(model.predict_on_batch(x))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def _torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts/train.py"), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)


def test_torchrun_trains_and_resumes_with_rank0_writing(tmp_path):
    write_demo_dataset(tmp_path / "data", {"train": 16, "valid": 4}, seed=0, tile_size=64)
    small = tmp_path / "small.yaml"
    small.write_text("input_size: 64\nval_size: 64\ndecoder_filters: [32, 16, 16, 8, 8]\n")
    common = ["--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs")]
    first = _torchrun("--preset", "demo", "--config", str(small), *common, "--epochs", "1",
                      "--batch_size", "4", "--lr_scaling", "sqrt")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 processes × batch 4 = global batch 8" in first.stdout
    assert "peak lr 0.00424264 (lr_scaling sqrt)" in first.stdout  # the demo's 0.003 × √2
    run = tmp_path / "runs" / "demo"
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    second = _torchrun("--resume", str(run), "--epochs", "2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = (run / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, written once (rank 0)
    model = keras.models.load_model(run / "best.keras")
    assert model.output_shape == (None, 6, None, None)
