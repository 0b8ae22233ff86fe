"""Training stopped the way clusters stop jobs: signals mid-epoch, a second signal, two runs in
one folder, a disk that refuses a write. Real subprocesses of ``scripts/train.py``."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tests.helpers import assert_same_weights, saved_weights, script_env, script_main
from xsight_keras.data import write_demo_dataset
from xsight_keras.training.preemption import child_processes
from xsight_keras.training.run_lock import RunDirectoryInUse, RunLock
from xsight_keras.training.state import load_state

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny demo run (3 epochs of 8 steps, 2 loader workers, EMA, SWA, MixUp, an augmentation
    schedule) and its uninterrupted outcome, run once for the module."""
    root = tmp_path_factory.mktemp("preempt")
    write_demo_dataset(root / "data", {"train": 32, "valid": 4}, seed=0, tile_size=64)
    settings = {
        "data_root": str(root / "data"), "output_dir": str(root / "outputs"), "epochs": 3,
        "batch_size": 4, "input_size": 64, "val_size": 64, "decoder_filters": [8, 8, 8, 8, 8],
        "encoder": "resnet18", "use_ema": True, "use_swa": True, "swa_start_epoch": 1,
        "mixup_alpha": 0.2, "aug_schedule": "0:1,2:2", "seed": 5, "tensorboard_images": 0,
        "num_workers": 2, "cpu_malloc_tuning": False,
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    base = [sys.executable, TRAIN, "--preset", "demo", "--config", str(config)]
    whole = subprocess.Popen(base + ["--experiment_name", "whole"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=script_env())
    children = wait_for(lambda: workers_up(whole.pid), whole, "the loader's workers")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    time.sleep(1)
    assert not alive(children), f"worker processes outlived a normal end: {alive(children)}"
    return root, base


def workers_up(pid: int) -> set[int] | None:
    """The processes below ``pid`` once its 2 loader workers run (forkserver and workers)."""
    found = child_processes(pid)
    return found if len(found) >= 3 else None


def alive(pids) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; its parent has not reaped it yet
            living.add(pid)
    return living


def wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{what} never happened (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")


def epochs_done(run_dir) -> int:
    try:
        return json.loads((run_dir / "state" / "state.json").read_text())["epoch"] + 1
    except (OSError, ValueError, KeyError):
        return 0


def history_rows(run_dir):
    lines = (run_dir / "history.csv").read_text().strip().splitlines()
    return [np.array(line.split(","), float) for line in lines[1:]]


def test_sigterm_mid_epoch_writes_a_resume_point_leaves_no_process_and_resumes_to_the_same_end(setup):
    root, base = setup
    run = root / "outputs" / "stopped"
    proc = subprocess.Popen(base + ["--experiment_name", "stopped"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env())
    wait_for(lambda: epochs_done(run) >= 1, proc, "the first epoch")
    children = wait_for(lambda: workers_up(proc.pid), proc, "the loader's workers")
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: stopping after the current step" in err
    assert f"continue with --resume {run}" in err
    deadline = time.time() + 10
    while alive(children) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(children), f"worker processes outlived the trainer: {alive(children)}"
    state = load_state(run)
    partial = state["partial"]
    assert partial["epoch"] in (1, 2) and partial["steps"] >= 1 and partial["ranks"] == 1
    assert state["epoch"] == partial["epoch"] - 1
    assert not (run / "final.keras").exists()
    lock = json.loads((run / "run.lock").read_text() or "{}")
    assert lock == {}  # released on the way out: nothing stale for the next run to report

    resumed = subprocess.run([sys.executable, TRAIN, "--resume", str(run)], capture_output=True,
                             text=True, env=script_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming epoch {partial['epoch'] + 1} after its step {partial['steps']}" in resumed.stdout
    assert "ran out of data" not in resumed.stderr
    whole = root / "outputs" / "whole"
    assert len(history_rows(run)) == len(history_rows(whole)) == 3
    assert_same_weights(history_rows(whole), history_rows(run), rtol=1e-4, atol=1e-5,
                        what="history rows")  # the interrupted epoch's training metrics too
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(whole / name), saved_weights(run / name),
                            rtol=1e-4, atol=1e-5, what=name)


def test_a_second_sigint_exits_at_once_without_a_resume_point(setup):
    """Steps slowed to 2 s (so the second signal surely lands inside the step the first one
    lets finish): the second SIGINT ends the process at once, without a resume point."""
    root, base = setup
    run = root / "outputs" / "twice"
    slow = ("import sys, time, keras; step = keras.Model.train_step; "
            "keras.Model.train_step = lambda m, d: (time.sleep(2), step(m, d))[1]; "
            "sys.path.insert(0, sys.argv[1]); from train import main; sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow, str(ROOT / "scripts"), *base[2:],
                             "--experiment_name", "twice", "--num_workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=script_env())
    children = wait_for(lambda: child_processes(proc.pid), proc, "the loader's worker")
    proc.send_signal(signal.SIGINT)
    seen = ""
    while "SIGINT: stopping after the current step" not in seen:
        line = proc.stderr.readline()
        assert line, f"the trainer ended before acknowledging the signal: {seen[-3000:]}"
        seen += line
    started = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + err)[-3000:]
    assert time.time() - started < 1.5  # not after the 2 s step
    assert "SIGINT again: stopping now, without a resume point" in err
    time.sleep(1)
    assert not alive(children), f"worker processes outlived the trainer: {alive(children)}"
    assert not (run / "state").exists()  # killed in its first step: no resume point at all


def _hold_lock(run_dir) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (as a live training would)."""
    code = ("import sys, time; from xsight_keras.training.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=script_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_live_run_directory_is_refused_and_a_stale_lock_taken_over(
        setup, tmp_path, capsys):
    root, _ = setup
    run = tmp_path / "busy"
    holder = _hold_lock(run)
    (run / "config.json").write_bytes((root / "outputs" / "whole" / "config.json").read_bytes())
    try:
        with pytest.raises(RunDirectoryInUse, match=rf"PID {holder.pid} on host "):
            RunLock(run).acquire()
        args = ["--preset", "demo", "--config", str(root / "tiny.yaml"), "--output_dir",
                str(tmp_path), "--experiment_name", "busy", "--overwrite"]
        assert script_main("train")(args) == 2
        assert f"is in use by another training run (PID {holder.pid}" in capsys.readouterr().err
        assert script_main("train")(["--resume", str(run)]) == 2
        assert f"(PID {holder.pid}" in capsys.readouterr().err
        # --overwrite deleted nothing
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "run.lock"]
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run).acquire()  # the holder died holding it
    try:
        assert lock.stale["pid"] == holder.pid
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        lock.release()
    assert RunLock(run).acquire().stale is None  # released cleanly: nothing to report


def test_a_full_disk_keeps_the_previous_checkpoint_and_state_and_the_run_resumes(
        setup, tmp_path, monkeypatch, capsys):
    """Writes that meet ENOSPC (np.savez of the state at the second epoch end; Model.save of
    any checkpoint after the first) stop the run with exit 4 and a message naming the path
    and the free space; the first epoch's best.keras and state stay loadable, byte for byte."""
    root, _ = setup
    args = ["--preset", "demo", "--config", str(root / "tiny.yaml"), "--output_dir",
            str(tmp_path), "--epochs", "2", "--use_swa", "false", "--num_workers", "0"]
    real_savez, real_save = np.savez, keras.Model.save
    calls = {"savez": 0, "save": 0}
    digests = {}

    def full_savez(file, *a, **k):
        calls["savez"] += 1
        if calls["savez"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(file, *a, **k)

    def full_save(model, path, *a, **k):
        calls["save"] += 1
        if calls["save"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(model, path, *a, **k)
        digests["best"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    for name, patch, message in (("state", ("savez", full_savez), "state"),
                                 ("checkpoint", ("save", full_save), None)):
        calls.update(savez=0, save=0)
        target = np if patch[0] == "savez" else keras.Model
        with monkeypatch.context() as m:
            m.setattr(target, patch[0], patch[1])
            status = script_main("train")(args + ["--experiment_name", name])
        err = capsys.readouterr().err
        run = tmp_path / name
        assert status == 4, err[-3000:]
        assert "No space left on device" in err and "MiB free on its filesystem" in err
        assert f"continue with --resume {run}" in err
        assert "Traceback" not in err
        if message:
            assert f"could not write {run / 'state'}" in err
        state = load_state(run)  # the first epoch's, readable
        assert state["epoch"] == 0 or name == "checkpoint"
        keras.models.load_model(run / "best.keras")
        if name == "checkpoint":
            assert hashlib.sha256((run / "best.keras").read_bytes()).hexdigest() == digests["best"]
        assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporaries
        # space freed: the run continues and ends
        assert script_main("train")(["--resume", str(run)]) == 0, capsys.readouterr().err[-3000:]
        assert (run / "final.keras").is_file()


def test_checkpoint_every_minutes_writes_mid_epoch_resume_points(setup, tmp_path, monkeypatch):
    """A job killed without warning loses at most N minutes: with the interval shorter than a
    step, every step writes a resume point holding that step; the run still ends normally."""
    from xsight_keras.config import load_config
    from xsight_keras.training import state as state_module
    from xsight_keras.training.run import train

    root, _ = setup
    written = []
    real = state_module.save_state

    def recording(*args, partial=None, **kwargs):
        written.append(None if partial is None else (partial["epoch"], partial["steps"]))
        return real(*args, partial=partial, **kwargs)

    monkeypatch.setattr(state_module, "save_state", recording)
    config = load_config("demo", str(root / "tiny.yaml"), overrides={
        "output_dir": str(tmp_path), "epochs": 1, "num_workers": 0, "use_swa": False,
        "checkpoint_every_minutes": 1e-6})
    train(config)
    assert written == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), None]
    assert "partial" not in load_state(tmp_path / "demo")  # the epoch-end state replaced them
    with pytest.raises(ValueError, match="checkpoint_every_minutes must be positive"):
        load_config("demo", overrides={"checkpoint_every_minutes": 0})


def test_pgunet_stopped_mid_stage_while_fading_in_resumes_to_the_same_end(demo_data, tmp_path,
                                                                          monkeypatch):
    """In-process: a stop request (as a signal makes it) in stage 2's first epoch, while the new
    level fades in (its counter is state too); the resumed run ends as an uninterrupted one."""
    from xsight_keras.config import load_config
    from xsight_keras.training.preemption import StopSignals, TrainingStopped
    from xsight_keras.training.run import train

    def config(name):
        return load_config("papsmear", overrides={
            "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": name,
            "stages": [1, 2], "epochs_per_stage": 2, "base_filters": 4,
            "batch_sizes": "32:2,64:2", "tensorboard_images": 0, "precise_bn_batches": 2})

    train(config("whole"))
    polls = {"n": 0}

    def poll(self):  # stage 1: 2 epochs × 4 steps; then stage 2's third step
        polls["n"] += 1
        return (signal.SIGTERM if polls["n"] == 11 else 0), False

    with monkeypatch.context() as m:
        m.setattr(StopSignals, "poll", poll)
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM at epoch 1, step 3"):
            train(config("stopped"))
    state = load_state(tmp_path / "stopped")
    assert (state["stage"], state["partial"]["epoch"], state["partial"]["steps"]) == (2, 0, 3)
    train(config("stopped"), resume=True)
    for name in ("history_stage_1.csv", "history_stage_2.csv"):
        assert ((tmp_path / "whole" / name).read_text().splitlines()[0]
                == (tmp_path / "stopped" / name).read_text().splitlines()[0])
        whole, stopped = (np.loadtxt(tmp_path / run / name, delimiter=",", skiprows=1)
                          for run in ("whole", "stopped"))
        np.testing.assert_allclose(whole, stopped, rtol=1e-4, atol=1e-5, err_msg=name)
    for name in ("final.keras", "best.keras"):
        assert_same_weights(saved_weights(tmp_path / "whole" / name),
                            saved_weights(tmp_path / "stopped" / name), rtol=1e-4, atol=1e-5,
                            what=name)
