"""Data-parallel training on CPUs: two Gloo processes, as torchrun starts them."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tests.helpers import (
    ROOT,
    assert_same_weights,
    finish,
    saved_weights,
    script_env,
    start_python,
)
from xsight_keras.data import PreparedDataset, write_demo_dataset
from xsight_keras.data.demo import demo_tile
from xsight_keras.data.loader import EpochBatchSampler
from xsight_keras.data.preprocess import preprocess_image
from xsight_keras.rundir import RunDir
from xsight_keras.training.distributed import scaled_learning_rate
from xsight_keras.training.preemption import child_processes
from xsight_keras.training.state import load_state

WORKER = ROOT / "tests" / "training" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _gloo_ranks(*args, timeout=600):
    """Start ``ddp_worker.py args`` as ranks 0 and 1 of one Gloo group (the environment torchrun
    gives them); returns each rank's ``(exit status, stdout, stderr)``. Both are killed if they
    are not done within ``timeout`` seconds (a hang fails the test instead of stalling it)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args)],
                              env=script_env(OMP_NUM_THREADS=1, RANK=r, LOCAL_RANK=r, WORLD_SIZE=2,
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {timeout} s: "
                    + "\n".join(p.communicate()[1][-2000:] for p in procs))
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


def test_two_gloo_ranks_train_one_model(tmp_path):
    write_demo_dataset(tmp_path / "data", {"train": 32}, seed=0, tile_size=64)
    ranks = _gloo_ranks(tmp_path / "data", tmp_path)
    assert [r[0] for r in ranks] == [0, 0], "\n".join(r[2][-3000:] for r in ranks)

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


def _start_torchrun(*args) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2`` of ``scripts/train.py`` through the watching
    worker (``ddp_worker.py train``: the script's own ``main``, with each rank's variables and
    history dumped around ``fit``), started in the background."""
    return start_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        WORKER, "train", *args, env=script_env(OMP_NUM_THREADS=1))


def _torchrun(*args, timeout=600):
    return finish(_start_torchrun(*args), timeout)


def _arrays(path, prefix=None) -> list[np.ndarray]:
    """The arrays of a worker dump (``{i}_{path}``) or those of a training state's ``arrays.npz``
    called ``{prefix}_{i}``, in the order of ``i``."""
    with np.load(path) as data:
        if prefix is None:
            index = {int(k.split("_")[0]): k for k in data.files}
        else:
            index = {int(k[len(prefix) + 1:]): k for k in data.files if k.startswith(prefix + "_")}
        return [data[index[i]] for i in sorted(index)]


def _assert_ranks_agree(dump):
    """Both ranks hold the same bytes (weights and BatchNorm statistics) when ``fit`` starts and
    ends, and logged the same (global) history."""
    for phase in ("start", "end"):
        rank0, rank1 = (_arrays(dump / f"{phase}_rank{r}.npz") for r in range(2))
        assert_same_weights(rank0, rank1, what=f"{dump.name}: rank 1 vs rank 0 at {phase} of fit")
    histories = [json.loads((dump / f"end_rank{r}.json").read_text()) for r in range(2)]
    assert histories[0] == histories[1]


def _history(run) -> list[dict]:
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _validate_whole_split(run, data_root):
    """The validation metrics of ``best.keras`` over the whole split, in this single process,
    computed here with numpy: focal loss (mean over all pixels) and Dice per class from one
    confusion matrix (a class absent from truth and prediction scores 1)."""
    split = PreparedDataset(data_root / "valid")
    pre = RunDir.open(run).preprocess
    samples = [split[i] for i in range(len(split))]
    x = np.stack([preprocess_image(s.image, pre).transpose(2, 0, 1) for s in samples])
    classes = np.stack([s.classes for s in samples])
    y = np.eye(6, dtype="float32")[classes].transpose(0, 3, 1, 2)
    model = keras.models.load_model(run / "best.keras")
    probs = keras.ops.convert_to_numpy(model.predict_on_batch(x))
    p = np.clip(probs.astype(np.float64), 1e-6, 1 - 1e-6)
    focal = -0.25 * y * (1 - p) ** 2 * np.log(p)
    found = {"val_loss": focal.sum(axis=1).mean()}
    confusion = np.zeros((6, 6), np.int64)
    np.add.at(confusion, (classes.ravel(), probs.argmax(axis=1).ravel()), 1)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    names = [n.lower().replace(" ", "_") for n in split.class_names]
    found |= {f"val_dice_{n}": d for n, d in zip(names, dice)}
    found |= {"val_mean_dice": dice.mean(), "val_mean_fg_dice": dice[1:].mean()}
    return found


SMALL = {"input_size": 64, "val_size": 64, "decoder_filters": [16, 8, 8, 8, 8], "loss": "focal",
         "lr_schedule": "constant", "use_ema": True, "use_swa": True, "swa_start_epoch": 0,
         "early_stopping_patience": 4, "tensorboard_images": 0, "num_workers": 0, "batch_size": 2}


def test_torchrun_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    """2 epochs under torchrun vs 1 epoch then ``--resume --epochs 2`` (both 2 Gloo ranks).

    Also: the resumed ranks start from the saved state, bit-identical; validation (5 images:
    shards of 3 and 2) logs the metrics of the whole split, not rank 0's shard nor a mean of
    the two shards' scores. A constant learning rate, since the one-cycle schedule would differ
    between a 1-epoch and a 2-epoch run; swa_start_epoch 0 so that the SWA count (2) needs the
    resumed state (1 without it).
    """
    data = tmp_path / "data"
    write_demo_dataset(data, {"train": 16, "valid": 5}, seed=0, tile_size=64)
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(SMALL))
    runs = tmp_path / "runs"
    common = ["--preset", "demo", "--config", small, "--data_root", data, "--output_dir", runs]
    dumps = {name: tmp_path / name for name in ("whole", "first", "resumed")}
    for d in dumps.values():
        d.mkdir()

    # the uninterrupted run and the first part of the split one side by side (start-up is
    # mostly waiting on imports and the rendezvous)
    first = _start_torchrun(dumps["first"], "-", *common, "--experiment_name", "split",
                            "--epochs", 1, "--lr_scaling", "sqrt")
    try:
        out = _torchrun(dumps["whole"], "-", *common, "--experiment_name", "whole", "--epochs", 2,
                        "--lr_scaling", "sqrt")
        finish(first)
    finally:
        first.kill()
    assert "2 processes × batch 2 = global batch 4" in out
    assert "peak lr 0.00424264 (lr_scaling sqrt)" in out  # the demo's 0.003 × √2
    assert "SWA: averaged 2 epochs" in out
    whole = runs / "whole"
    assert json.loads((whole / "config.json").read_text())["processes"] == 2
    # global validation metrics: best.keras holds the (EMA) weights validated at its epoch
    logged = _history(whole)
    best_epoch = int(np.argmax([row["val_mean_fg_dice"] for row in logged]))
    found = _validate_whole_split(whole, data)
    np.testing.assert_allclose([logged[best_epoch][k] for k in found], list(found.values()),
                               rtol=1e-4, atol=1e-6, err_msg=f"{list(found)}")

    split = runs / "split"
    saved = _arrays(split / "state" / "arrays.npz", "model")
    out = _torchrun(dumps["resumed"], "-", "--resume", split, "--epochs", 2)
    assert "SWA: averaged 2 epochs" in out  # epoch 1 from the saved state, epoch 2 after resuming

    for dump in dumps.values():
        _assert_ranks_agree(dump)
    # every rank starts the resumed fit from the saved state, not from a fresh initialisation
    assert_same_weights(_arrays(dumps["resumed"] / "start_rank1.npz"), saved, what="resumed rank 1")

    # same end as the uninterrupted run: one row per epoch (written once, by rank 0), same
    # metrics and the same final, best and SWA weights. The tolerance only absorbs float
    # rounding (a lost optimizer moment, EMA or SWA average moves weights by ~1e-3).
    rows = [_history(run) for run in (whole, split)]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-4, atol=1e-5)
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(whole / name), saved_weights(split / name),
                            rtol=1e-4, atol=1e-5, what=name)

    # SIGTERM to rank 1 alone, early in the first epoch: both ranks stop after the same step
    # and write one mid-epoch resume point (every rank's metric sums); resumed under torchrun,
    # the run ends as the uninterrupted one
    stopped, dump = runs / "stopped", tmp_path / "stopped"
    dump.mkdir()
    proc = _start_torchrun(dump, "-", *common, "--experiment_name", "stopped", "--epochs", 2,
                           "--lr_scaling", "sqrt")
    try:
        deadline = time.time() + 300
        while not (dump / "start_rank1.npz").exists() and time.time() < deadline:
            time.sleep(0.02)
        rank1 = [pid for pid in child_processes(proc.pid)
                 if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(rank1) == 1, "rank 1's process not found"
        os.kill(rank1[0], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    steps = re.findall(r"stopped by SIGTERM at epoch 1, step (\d+)", out + err)
    assert len(steps) == 2 and steps[0] == steps[1], (out + err)[-4000:]  # one message per rank
    assert "exitcode  : 143" in out + err or "exit code 143" in out + err, (out + err)[-4000:]
    partial = load_state(stopped)["partial"]
    assert partial["ranks"] == 2 and partial["steps"] == int(steps[0])
    dump = tmp_path / "stopped_resumed"
    dump.mkdir()
    _torchrun(dump, "-", "--resume", stopped)
    _assert_ranks_agree(dump)
    rows = [_history(run) for run in (whole, stopped)]
    assert len(rows[1]) == 2
    for a, b in zip(*rows):
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-4, atol=1e-5)
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(whole / name), saved_weights(stopped / name),
                            rtol=1e-4, atol=1e-5, what=name)


def test_non_finite_loss_on_one_rank_stops_both_and_rank0_creates_the_demo_set(tmp_path):
    """``--preset demo`` with no data yet: rank 0 writes the demo set once while rank 1 waits,
    both train; a NaN batch on rank 1 only, at step 2, then stops both ranks at that step with
    exit status 3 (no hang, no checkpoint)."""
    data = tmp_path / "demo"  # does not exist yet
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**SMALL, "decoder_filters": [8, 8, 8, 8, 8]}))
    ranks = _gloo_ranks("train", tmp_path, "1:2", "--preset", "demo", "--config", small,
                        "--data_root", data, "--output_dir", tmp_path / "runs", "--epochs", 1)
    everything = "\n".join(r[1][-2000:] + r[2][-2000:] for r in ranks)
    assert [r[0] for r in ranks] == [3, 3], everything
    assert ("the training loss became non-finite on another process at epoch 1, step 2"
            in ranks[0][2]), everything
    assert "the training loss became nan at epoch 1, step 2" in ranks[1][2], everything
    run = tmp_path / "runs" / "demo"
    assert not any((run / name).exists() for name in ("best.keras", "final.keras", "state"))

    # the demo set, written once by rank 0 (only it announces it), complete and intact
    assert sum(r[1].count("creating the synthetic demo set") for r in ranks) == 1, everything
    assert sorted(p.name for p in data.iterdir()) == ["test", "train", "valid"]  # no leftovers
    for split, n, stream in (("train", 192, 0), ("valid", 48, 1), ("test", 48, 2)):
        prepared = PreparedDataset(data / split)
        assert len(prepared) == n
        for i in (0, n - 1):
            image, classes, _, _ = demo_tile(stream, i, 256)
            assert np.array_equal(prepared[i].image, image), (split, i)
            assert np.array_equal(prepared[i].classes, classes), (split, i)
