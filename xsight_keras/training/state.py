"""Training-state checkpoints: everything needed to continue a run after it was killed.

At every epoch end ``<run>/state/`` is rewritten atomically (a new folder, then a rename) with
``arrays.npz`` (every model variable, every optimizer variable (moments and the step counter
that drives the learning-rate schedule), the EMA shadow weights, the SWA running mean and the
early-stopping best weights) and ``state.json`` (epoch, PGU-Net stage, history so far, EMA
update count, SWA count, best-checkpoint and early-stopping counters). Random choices of the
data pipeline are functions of ``(seed, epoch, index)`` and Keras' generators are reseeded from
``(seed, epoch)`` at every epoch start, so a resumed run draws what an uninterrupted one draws.

A mid-epoch resume point (written on a stop signal or every ``checkpoint_every_minutes``, see
:mod:`.preemption`) adds ``partial`` to ``state.json``: the epoch in progress, the steps done in
it and every rank's metric sums so far (``metrics<rank>_<i>`` arrays); the resumed run skips
those steps of the epoch's batch order and puts the sums back, so the epoch ends as it would have.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import ops

from xsight_keras.compat import early_stopping_state
from xsight_keras.files import write_failure
from xsight_keras.rundir import STATE_DIR
from xsight_keras.training.preemption import TrainingStopped


def _numpy(values) -> list[np.ndarray]:
    return [np.array(ops.convert_to_numpy(v)) for v in values]


class EpochSeeder(keras.callbacks.Callback):
    """Reseed Keras' (and numpy's / the backend's) generators from ``(seed, epoch)`` each epoch."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def on_epoch_begin(self, epoch, logs=None):
        keras.utils.set_random_seed(self.seed * 10_007 + epoch)


class SyncLoaderEpoch(keras.callbacks.Callback):
    """Tell a :func:`~xsight_keras.data.make_loader` loader which epoch Keras is starting.

    The loader's sampler counts its passes, but ``fit`` takes one extra batch before the first
    epoch (to build the model), which would shift every epoch-keyed schedule (size,
    augmentation level, shuffling) by one. Setting the epoch at ``on_epoch_begin`` keeps them at
    exactly Keras' epoch numbers, also after a resume.

    It also refuses, before the first step, a ``fit(steps_per_epoch=...)`` that asks for more
    batches than the loader has in an epoch (Keras would stop each epoch early with a warning,
    training fewer steps than asked): give the dataset ``samples_per_epoch`` instead.
    """

    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def on_train_begin(self, logs=None):
        steps, available = (self.params or {}).get("steps"), len(self.loader)
        if steps is not None and steps > available:
            raise ValueError(
                f"fit asks for {steps} steps per epoch but the loader has {available} batches "
                f"per epoch; training would stop each epoch early. Set the dataset's "
                f"samples_per_epoch to {steps} × the batch size (or leave steps_per_epoch out)")

    def on_epoch_begin(self, epoch, logs=None):
        self.loader.batch_sampler.set_epoch(epoch)


class TrainingState(keras.callbacks.Callback):
    """Write the training state at every epoch end (put it last among the callbacks), and a
    mid-epoch resume point when ``stop`` (a :class:`~.preemption.StopSignals`) asks for one.

    ``history``: the history of the run before this ``fit`` (resumed epochs, earlier stages).
    ``write=False`` keeps the history without writing (data-parallel ranks other than 0).
    ``partial``: the ``{"epoch", "steps", "metrics"}`` of a mid-epoch resume point this ``fit``
    continues (its loader skips those steps; the epoch's metric sums are put back here, so the
    epoch logs what an uninterrupted one logs). After each step the stop request is decided once
    for all ranks (``context``); on a signal the resume point is written and
    :class:`~.preemption.TrainingStopped` raised.
    """

    def __init__(self, run_dir, stage=None, ema=None, swa=None, checkpoint=None, early_stopping=None,
                 history=None, stage_history=None, write=True, stop=None, context=None,
                 partial=None):
        super().__init__()
        self.write = write
        self.run_dir = Path(run_dir)
        self.stage, self.ema, self.swa = stage, ema, swa
        self.checkpoint, self.early_stopping = checkpoint, early_stopping
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.stage_history = {k: list(v) for k, v in (stage_history or {}).items()}
        self.stop, self.context, self.partial = stop, context, partial
        self._epoch, self._skipped = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._skipped = epoch, 0
        if self.partial is not None and epoch == self.partial["epoch"]:
            rank = self.context.rank if self.context is not None else 0
            saved, variables = self.partial["metrics"][rank], self.model.metrics_variables
            if len(saved) != len(variables):
                raise ValueError(f"{self.run_dir / STATE_DIR}: the resume point holds {len(saved)} "
                                 f"metric variables, the model {len(variables)}: the "
                                 f"configuration changed since the run stopped")
            for v, value in zip(variables, saved):
                v.assign(value)
            self._skipped = self.partial["steps"]

    def on_train_batch_end(self, batch, logs=None):
        if self.stop is None:
            return
        signum, due = self.stop.poll()
        if self.context is not None and self.context.is_distributed:
            signum, due = self.context.max_of(signum, due)  # every rank stops at this step
        if not (signum or due):
            return
        steps = self._skipped + batch + 1
        metrics = _numpy(self.model.metrics_variables)
        if self.context is not None:
            metrics = self.context.gather(metrics)
        else:
            metrics = [metrics]
        if self.write:
            save_state(self.run_dir, self.model, self._epoch - 1, self.stage, self.history,
                       self.stage_history, self.ema, self.swa, self.checkpoint, self.early_stopping,
                       partial={"epoch": self._epoch, "steps": steps, "metrics": metrics})
        self.stop.written()
        if signum:
            raise TrainingStopped(
                int(signum), f"stopped by {signal.Signals(int(signum)).name} at epoch {self._epoch + 1}, step "
                f"{steps}; the resume point is in {self.run_dir / STATE_DIR} (continue with "
                f"--resume {self.run_dir})")

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if np.isscalar(value):
                self.history.setdefault(key, []).append(float(value))
                self.stage_history.setdefault(key, []).append(float(value))
        if self.write:
            save_state(self.run_dir, self.model, epoch, self.stage, self.history, self.stage_history,
                       self.ema, self.swa, self.checkpoint, self.early_stopping)


def save_state(run_dir, model, epoch, stage, history, stage_history, ema=None, swa=None,
               checkpoint=None, early_stopping=None, partial=None) -> Path:
    """Atomically replace ``run_dir/state`` with the current training state.

    ``epoch``: the last complete epoch (-1: none yet). ``partial``: a mid-epoch resume point,
    ``{"epoch", "steps", "metrics"}`` (steps done in that epoch; the metric variables of every
    rank). A write the disk refuses raises :class:`~xsight_keras.files.WriteFailedError` and
    leaves the previous state as it was.
    """
    run_dir = Path(run_dir)
    final = run_dir / STATE_DIR
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".state.", dir=run_dir))
    except OSError as exc:
        raise write_failure(final, exc) from exc
    try:
        _write_state(tmp, model, epoch, stage, history, stage_history, ema, swa, checkpoint,
                     early_stopping, partial)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failure(final, exc) from exc
        raise
    old = run_dir / ".state.old"
    if final.exists():  # else a write killed between the renames left the last state in old
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(folder, model, epoch, stage, history, stage_history, ema, swa, checkpoint,
                 early_stopping, partial) -> None:
    arrays = {f"model_{i}": a for i, a in enumerate(_numpy(model.variables))}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        arrays.update({f"optimizer_{i}": a for i, a in enumerate(_numpy(optimizer.variables))})
    meta = {"epoch": int(epoch), "stage": stage, "history": history, "stage_history": stage_history,
            "num_model": len(model.variables),
            "num_optimizer": len(optimizer.variables) if optimizer is not None and optimizer.built else 0}
    if ema is not None and ema.shadow is not None:
        arrays.update({f"ema_{i}": a for i, a in enumerate(_numpy(ema.shadow))})
        meta["ema"] = {"updates": ema.updates, "count": len(ema.shadow), "swapped": ema._swapped}
    if swa is not None and swa.average is not None:
        arrays.update({f"swa_{i}": a for i, a in enumerate(swa.average)})
        meta["swa"] = {"count": swa.count, "size": len(swa.average)}
    if checkpoint is not None:
        meta["checkpoint"] = {"best": checkpoint.best, "best_epoch": checkpoint.best_epoch}
    if early_stopping is not None:
        es = early_stopping_state(early_stopping)
        weights = es.pop("best_weights")
        meta["early_stopping"] = es
        if weights is not None:
            arrays.update({f"es_{i}": a for i, a in enumerate(weights)})
            meta["early_stopping"]["weights"] = len(weights)
    if partial is not None:
        ranks = partial["metrics"]
        meta["partial"] = {"epoch": int(partial["epoch"]), "steps": int(partial["steps"]),
                           "ranks": len(ranks), "metrics": len(ranks[0])}
        for r, values in enumerate(ranks):
            arrays.update({f"metrics{r}_{i}": a for i, a in enumerate(values)})
    np.savez(folder / "arrays.npz", **arrays)
    (folder / "state.json").write_text(json.dumps(meta, default=float))


def load_state(run_dir) -> dict:
    """Read ``run_dir/state``; raises ``FileNotFoundError``/``ValueError`` naming the folder."""
    folder = Path(run_dir) / STATE_DIR
    if not (folder / "state.json").is_file():
        old = Path(run_dir) / ".state.old"  # killed between the two renames
        if (old / "state.json").is_file():
            folder = old
        else:
            raise FileNotFoundError(f"{run_dir} has no training state to resume from "
                                    f"(no {STATE_DIR}/state.json; was it trained before resume existed?)")
    try:
        meta = json.loads((folder / "state.json").read_text())
        with np.load(folder / "arrays.npz") as data:
            meta["arrays"] = {k: data[k] for k in data.files}
        if "partial" in meta:  # the metric sums of every rank at the mid-epoch resume point
            part = meta["partial"]
            part["metrics"] = [[meta["arrays"][f"metrics{r}_{i}"] for i in range(part["metrics"])]
                               for r in range(part["ranks"])]
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"{folder}: training state is unreadable ({exc})") from exc
    return meta


def restore_state(state: dict, model, ema=None, swa=None, checkpoint=None, early_stopping=None) -> None:
    """Put a loaded state back into the model, its (compiled) optimizer and the callbacks."""
    arrays = state["arrays"]
    if len(model.variables) != state["num_model"]:
        raise ValueError(f"the saved state has {state['num_model']} model variables, the model "
                         f"{len(model.variables)}: the configuration changed since the run started")
    for i, v in enumerate(model.variables):
        v.assign(arrays[f"model_{i}"])
    if state["num_optimizer"]:
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        for i, v in enumerate(optimizer.variables):
            v.assign(arrays[f"optimizer_{i}"])
    if ema is not None and "ema" in state:
        ema.shadow = [ops.convert_to_tensor(arrays[f"ema_{i}"]) for i in range(state["ema"]["count"])]
        ema.updates = state["ema"]["updates"]
        ema._swapped = False
    if swa is not None and "swa" in state:
        swa.average = [arrays[f"swa_{i}"] for i in range(state["swa"]["size"])]
        swa.count = state["swa"]["count"]
    if checkpoint is not None and "checkpoint" in state:
        checkpoint.best = state["checkpoint"]["best"]
        checkpoint.best_epoch = state["checkpoint"]["best_epoch"]
    if early_stopping is not None and "early_stopping" in state:
        es = dict(state["early_stopping"])
        if "weights" in es:
            es["best_weights"] = [arrays[f"es_{i}"] for i in range(es["weights"])]
        early_stopping._resume = es  # applied in on_train_begin, which resets these (and the weights)


def rewrite_history_csv(path, history: dict) -> None:
    """Rewrite a history CSV with exactly the epochs recorded in ``history`` (drops a row
    written for an epoch whose state was never saved)."""
    keys = sorted(history)
    n = max((len(v) for v in history.values()), default=0)
    if not keys:  # stopped inside its first epoch: an empty file, so CSVLogger writes the header
        Path(path).write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch"] + keys)
        for i in range(n):
            writer.writerow([i] + [history[k][i] if i < len(history[k]) else "" for k in keys])
