"""Training callbacks: weight averaging (EMA, SWA), safe checkpoints, schedule and curve logging."""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

import keras
import numpy as np
from keras import ops

from xsight_keras.compat import all_layers, set_early_stopping_state
from xsight_keras.files import write_failure
from xsight_keras.inference.predictor import Predictor, class_probabilities
from xsight_keras.inference.scoring import score_split
from xsight_keras.labels import colourise
from xsight_keras.models.base import clone_architecture


def _is_finite(model: keras.Model) -> bool:
    return all(np.isfinite(np.asarray(ops.convert_to_numpy(v))).all() for v in model.weights)


def save_model_atomically(model: keras.Model, path) -> Path:
    """Save ``model`` to ``path`` (``.keras``) through a temporary file and an atomic rename.

    Refuses (``ValueError``) to save non-finite weights, so a NaN never replaces a good file.
    A crash during the write leaves the previous file intact; a write the disk refuses (full,
    over quota) raises :class:`~xsight_keras.files.WriteFailedError` naming the file.
    """
    path = Path(path)
    if not _is_finite(model):
        raise ValueError(f"not saving {path}: the model has NaN or infinite weights")
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException as exc:  # interrupted or failed: the previous file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc  # a full disk: a message, not a traceback
        raise
    return path


class ExponentialMovingAverage(keras.callbacks.Callback):
    """Keep an exponential moving average of the trainable weights; validate with it.

    After each training batch: ``ema = d·ema + (1 − d)·w`` with ``d = min(decay, (1+n)/(10+n))``
    (a short warm-up so early averages are not dominated by the initialisation). During
    validation the model holds the EMA weights; afterwards the raw weights come back and training
    continues on them. :meth:`applied` swaps the EMA weights in for any other use (checkpoints).

    Unlike ``optimizer(use_ema=True)``, which makes every ``fit()`` end by overwriting the raw
    weights with the averages (so a second ``fit``, e.g. the next progressive stage, would restart
    from the EMA weights), this callback never changes the raw weights behind the user's back.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = float(decay)
        self.shadow = None
        self.updates = 0
        self._swapped = False

    def on_train_begin(self, logs=None):
        if self.shadow is None or len(self.shadow) != len(self.model.trainable_weights):
            self.shadow = [ops.copy(v.value) for v in self.model.trainable_weights]
            self.updates = 0

    def on_train_batch_end(self, batch, logs=None):
        n = self.updates
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        self.shadow = [d * s + (1.0 - d) * ops.cast(v.value, s.dtype)
                       for s, v in zip(self.shadow, self.model.trainable_weights)]
        self.updates += 1

    def _swap(self):
        for i, v in enumerate(self.model.trainable_weights):
            raw = ops.copy(v.value)
            v.assign(self.shadow[i])
            self.shadow[i] = raw
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def applied(self):
        """Context in which the model holds the EMA weights (no-op before any update)."""
        active = self.shadow is not None and not self._swapped
        if active:
            self._swap()
        try:
            yield
        finally:
            if active:
                self._swap()

    def ema_weights(self) -> list[np.ndarray]:
        """The current averages as numpy arrays, in ``model.trainable_weights`` order."""
        with self.applied():
            return [np.array(ops.convert_to_numpy(v)) for v in self.model.trainable_weights]

    def on_test_begin(self, logs=None):
        if self.shadow is not None and not self._swapped and self.updates:
            self._swap()

    def on_test_end(self, logs=None):
        if self._swapped:
            self._swap()


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Average the weights at the end of every epoch from ``start_epoch`` (Izmailov et al. 2018).

    The running mean covers all weights (BatchNorm statistics are re-estimated afterwards with
    :func:`update_batch_norm`). :meth:`averaged_model` returns a copy of the model holding the
    average; the model being trained is left as it is.
    """

    def __init__(self, start_epoch: int = 10):
        super().__init__()
        self.start_epoch = int(start_epoch)
        self.average = None
        self.count = 0

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start_epoch:
            return
        weights = self.model.get_weights()
        if self.average is None:
            self.average = [w.astype(np.float64) for w in weights]
        else:
            self.average = [a + (w - a) / (self.count + 1) for a, w in zip(self.average, weights)]
        self.count += 1

    def averaged_model(self) -> keras.Model | None:
        """A clone of the model with the averaged weights, or ``None`` before ``start_epoch``."""
        if self.average is None:
            return None
        clone = clone_architecture(self.model)
        clone.set_weights([a.astype(w.dtype) for a, w in zip(self.average, self.model.get_weights())])
        return clone


def _no_gradients():
    """A context in which forward passes record no autograd graph (torch); nothing elsewhere."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def update_batch_norm(model: keras.Model, batches, max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's moving mean and variance as plain averages over ``batches``.

    ``batches`` yields images or ``(images, targets)``. Used after SWA, whose averaged weights do
    not match any statistics seen in training, and before validation (:class:`PreciseBatchNorm`).
    Only the statistics change (forward passes in training mode, no gradients). Returns the
    number of batches used.
    """
    bns = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    statistics = {id(v) for bn in bns for v in (bn.moving_mean, bn.moving_variance)}
    # other state that training-mode calls advance (the PGU-Net's fade-in step counters)
    others = [(v, ops.convert_to_numpy(v)) for v in model.non_trainable_variables
              if id(v) not in statistics]
    for bn in bns:
        bn.moving_mean.assign(ops.zeros(bn.moving_mean.shape, bn.moving_mean.dtype))
        bn.moving_variance.assign(ops.ones(bn.moving_variance.shape, bn.moving_variance.dtype))
    used = 0
    try:
        with _no_gradients():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                for bn in bns:  # new = old·(k-1)/k + batch/k : the running mean of batch statistics
                    bn.momentum = used / (used + 1.0)
                model(x, training=True)
                used += 1
                if max_batches is not None and used >= max_batches:
                    break
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        for v, value in others:
            v.assign(value)
    return used


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before every validation pass of ``fit``, re-estimate each BatchNorm's moving mean and
    variance over ``batches`` training batches with the weights as they are (precise BN; Wu &
    Johnson, "Rethinking 'Batch' in BatchNorm", 2021), so validation, checkpoints and the final
    model predict in inference mode as the network computes in training mode.

    Why: the moving statistics are an exponential average (PyTorch's momentum 0.1) that starts
    at mean 0 / variance 1 and trails the weights by about ten steps. Early in a run, and after
    each PGU-Net growth (fresh layers whose true variance is ~0.05), they describe a network
    that no longer exists: measured on the Pap-smear set after stage 1's first 10 steps, Dice
    0.44 in inference mode against 0.76 in training mode, 0.75 after re-estimation.

    ``dataset``: the training :class:`~xsight_keras.data.SegmentationDataset`; the batches are
    its samples of the current epoch (with the epoch's augmentation) at indices drawn by
    ``(seed, epoch)``, the same on every data-parallel rank, so every rank ends up with the
    same statistics. ``batch_size``: images per forward pass (the training batch). Costs
    ``batches`` forward passes per epoch; ``batches=0`` disables it.
    """

    def __init__(self, dataset, batch_size: int, batches: int = 8, seed: int = 0):
        super().__init__()
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.batches, self.seed = int(batches), seed
        self._epoch, self._fitting = 0, False

    def on_train_begin(self, logs=None):
        self._fitting = True

    def on_train_end(self, logs=None):
        self._fitting = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _batches(self):
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self._epoch, 0x62_6E]).permutation(n)
        for b in range(self.batches):
            index = [int(order[(b * self.batch_size + j) % n]) for j in range(self.batch_size)]
            yield np.stack([self.dataset.sample(self._epoch, i)[0] for i in index])

    def on_test_begin(self, logs=None):
        if self._fitting and self.batches:  # a validation pass inside fit, not a user's evaluate
            update_batch_norm(self.model, self._batches())


def _save_epoch_model(model, path: Path, ema, epoch: int, refused: str) -> bool:
    """Save ``model`` (with EMA weights when ``ema`` is given) atomically after 0-based
    ``epoch``; non-finite weights are not saved: a warning ``… {refused} {path}``, ``False``."""
    context = ema.applied() if ema is not None else contextlib.nullcontext()
    with context:
        try:
            save_model_atomically(model, path)
        except ValueError as exc:
            print(f"warning: epoch {epoch + 1}: {exc}; {refused} {path}")
            return False
    return True


class BestCheckpoint(keras.callbacks.Callback):
    """Save the model when ``monitor`` improves, with EMA weights when an EMA callback is given.

    Writes atomically and never saves non-finite weights (it warns and keeps the previous file).
    """

    def __init__(self, path, monitor="val_mean_fg_dice", mode="max", ema=None, verbose=True):
        super().__init__()
        self.path = Path(path)
        self.monitor, self.mode, self.ema, self.verbose = monitor, mode, ema, verbose
        self.best = -np.inf if mode == "max" else np.inf
        self.best_epoch = None

    def _better(self, value):
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value) or not self._better(value):
            return
        if not _save_epoch_model(self.model, self.path, self.ema, epoch, "keeping"):
            return
        self.best, self.best_epoch = float(value), epoch
        if self.verbose:
            print(f"epoch {epoch + 1}: {self.monitor} improved to {value:.4f}, saved {self.path}")


class EpochCheckpoint(keras.callbacks.Callback):
    """Keep the model of every ``every``-th epoch as ``path_for(epoch)`` (1-based epoch), with
    EMA weights when an EMA callback is given (the weights validation scored), written
    atomically; non-finite weights are not saved (a warning). For curves of a metric against
    training steps computed afterwards on whole images."""

    def __init__(self, path_for, every: int = 1, ema=None):
        super().__init__()
        self.path_for, self.every, self.ema = path_for, int(every), ema

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        _save_epoch_model(self.model, Path(self.path_for(epoch + 1)), self.ema, epoch, "not saved to")


class ScheduleLogger(keras.callbacks.Callback):
    """Add the learning rate, training size and augmentation level of each epoch to the logs."""

    def __init__(self, train_dataset=None):
        super().__init__()
        self.train_dataset = train_dataset

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        lr = self.model.optimizer.learning_rate
        logs["lr"] = float(ops.convert_to_numpy(lr))
        if self.train_dataset is not None:
            size = self.train_dataset.size_at(epoch)
            logs["train_size"] = float(size) if size else float("nan")
            logs["aug_level"] = float(self.train_dataset.level_at(epoch))


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard event files without TensorFlow (tensorboardX): every logged scalar per epoch
    and, for a few validation images, ground truth | prediction colour maps side by side."""

    def __init__(self, log_dir, images=None, labels=None):
        super().__init__()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.images, self.labels = images, labels

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if np.isscalar(value) and np.isfinite(value):
                self.writer.add_scalar(key if key.startswith("val_") else f"train/{key}", value, epoch)
        if self.images is not None and len(self.images):
            probs = class_probabilities(self.model, self.images)
            pred = [Predictor.to_labels(p) for p in probs]
            for i, (truth, p) in enumerate(zip(self.labels, pred)):
                panel = np.concatenate([colourise(truth), colourise(p)], axis=1)
                self.writer.add_image(f"prediction/{i}", panel, epoch, dataformats="HWC")
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()


def plot_history(history_csv, out_png) -> Path:
    """Plot every column of ``history.csv`` (losses, metrics, lr) against the epoch into a PNG.

    The figure is drawn without ``pyplot``: the user's matplotlib backend stays as it is."""
    from matplotlib.figure import Figure

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{history_csv} has no epochs to plot")
    keys = [k for k in rows[0] if k != "epoch" and not k.startswith("val_")]
    epochs = [int(r["epoch"]) + 1 for r in rows]
    panels = [k for k in keys if k in ("loss", "lr", "mean_fg_dice", "mean_iou") or k.startswith("dice_")]
    cols = 3
    n_rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, key in zip(axes.ravel(), panels):
        ax.plot(epochs, [float(r[key]) for r in rows], label="train")
        if f"val_{key}" in rows[0]:
            ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    return Path(out_png)


class TTAValidation(keras.callbacks.Callback):
    """At each epoch end, score the validation images whole with test-time augmentation.

    Adds ``val_tta_mean_fg_dice``, ``val_tta_mean_dice`` and ``val_tta_dice_<class>`` to the logs
    (place it before checkpoints and loggers). ``dataset``: a prepared split; ``preprocess``: the
    run's :class:`PreprocessConfig`; ``transforms``: TTA spec (default all 8); ``resize_to``:
    the size training resized whole images to (:class:`Predictor`'s), ``None`` for crops.
    """

    def __init__(self, dataset, preprocess, transforms="all", tile_size=256, limit=None, ema=None,
                 resize_to=None):
        super().__init__()
        self.dataset, self.preprocess, self.transforms = dataset, preprocess, transforms
        self.tile_size, self.limit, self.ema = tile_size, limit, ema
        self.resize_to = resize_to

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        context = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with context:
            predictor = Predictor(self.model, self.preprocess, tile_size=self.tile_size,
                                  tta=self.transforms, resize_to=self.resize_to)
            scores = score_split(predictor, self.dataset, progress=False, limit=self.limit)["scores"]
        logs["val_tta_mean_fg_dice"] = scores["mean_fg_dice"]
        logs["val_tta_mean_dice"] = scores["mean_dice"]
        for name, value in scores["dice"].items():
            logs[f"val_tta_dice_{name}"] = value


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch and step."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop training at the first step whose loss is NaN or infinite, naming epoch and step.

    Raises :class:`NonFiniteLossError`; checkpoints already written stay as they are (and the
    checkpoint writers refuse non-finite weights anyway). With a data-parallel ``context`` the
    check is global (one tiny all-reduce a step), so every rank stops at the same step instead of
    the others waiting for a rank that has stopped.
    """

    def __init__(self, context=None):
        super().__init__()
        self.context = context
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        local = loss is not None and not np.isfinite(float(loss))
        bad = local
        if self.context is not None and self.context.is_distributed:
            bad = self.context.any(local)
        if bad:
            what = f"became {float(loss)}" if local else "became non-finite on another process"
            raise NonFiniteLossError(
                f"the training loss {what} at epoch {self._epoch + 1}, step {batch + 1}; "
                f"training stopped and no checkpoint was written from it. Lower --lr, set "
                f"--grad_clip_val, or check the data of that epoch")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` whose counters and best weights survive a resume (see ``training.state``).

    ``_resume``: the saved ``wait``, ``best``, ``best_epoch`` and (optional) ``best_weights``,
    put back at ``on_train_begin`` (Keras' own resets them there, best weights included).
    """

    _resume = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._resume:
            set_early_stopping_state(self, self._resume)
            self._resume = None
