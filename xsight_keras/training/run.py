"""One training run end to end: data, model, loss, metrics, optimiser, callbacks, fit, reports."""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from xsight_keras.config import RunConfig, parse_batch_sizes
from xsight_keras.data import PreparedDataset, SegmentationDataset, make_loader
from xsight_keras.data.demo import write_demo_dataset
from xsight_keras.data.loader import close_loader
from xsight_keras.heads import get_head, is_class_map, output_names, primary_class_map
from xsight_keras.labels import label_names
from xsight_keras.models import get_encoder, grow
from xsight_keras.models.progressive_unet import STAGE_RESOLUTIONS, settle
from xsight_keras.rundir import RunDir
from xsight_keras.training.callbacks import (
    BestCheckpoint,
    EpochCheckpoint,
    ExponentialMovingAverage,
    PreciseBatchNorm,
    ResumableEarlyStopping,
    ScheduleLogger,
    StochasticWeightAveraging,
    StopOnNonFiniteLoss,
    TensorBoardLogger,
    TTAValidation,
    plot_history,
    save_model_atomically,
    update_batch_norm,
)
from xsight_keras.training.distributed import (
    current_context,
    init_distributed,
    install_data_parallel,
    scaled_learning_rate,
)
from xsight_keras.training.host_memory import keep_freed_memory_in_process
from xsight_keras.training.loss_scale import DeviceLossScaleOptimizer
from xsight_keras.training.losses import class_weights_from_counts, multiscale_losses
from xsight_keras.training.metrics import segmentation_metrics
from xsight_keras.training.preemption import StopSignals
from xsight_keras.training.registries import LOSSES, MODELS, OPTIMIZERS, SCHEDULES, head_loss
from xsight_keras.training.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock
from xsight_keras.training.state import (
    EpochSeeder,
    SyncLoaderEpoch,
    TrainingState,
    load_state,
    restore_state,
    rewrite_history_csv,
)

DOWNLOAD_HINTS = {
    "pannuke": "Download the three PanNuke folds from https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke, "
               "then run: python scripts/prepare_data.py pannuke --src <download folder> --out {root}",
    "monuseg": "Download MoNuSeg 2018 from https://monuseg.grand-challenge.org/Data/, then run: "
               "python scripts/prepare_data.py monuseg --src '<MoNuSeg 2018 Training Data>' --out {root} "
               "--val_fraction 0.2 (and --src <MoNuSegTestData> --out {root}/test)",
    "folders": "Arrange images as <src>/{{train,valid,test}}/{{images,masks}}/ and run: "
               "python scripts/prepare_data.py folders --src <src> --out {root}",
}


class DataNotFoundError(FileNotFoundError):
    """The prepared data a run needs is missing; the message says how to prepare it."""


@dataclass
class RunResult:
    run_dir: Path
    history: dict = field(default_factory=dict)
    best_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def select_precision(config: RunConfig) -> str:
    """The dtype policy for this run: float32, or with ``use_mixed_precision`` mixed_float16 on
    CUDA (torch; mixed_bfloat16 with ``mixed_precision_dtype: bfloat16``), mixed_bfloat16 on a
    JAX GPU/TPU or on a CPU that computes bfloat16 natively (:func:`cpu_has_native_bfloat16`);
    elsewhere float32, with a note on stderr."""
    if not config.use_mixed_precision:
        return "float32"
    if _cuda_available():
        if config.mixed_precision_dtype == "bfloat16":
            import torch

            if not torch.cuda.is_bf16_supported():
                raise ValueError("mixed_precision_dtype bfloat16: this GPU does not compute "
                                 "bfloat16 (Ampere or later does); use float16")
            return "mixed_bfloat16"
        return "mixed_float16"
    if _jax_accelerator():
        return "mixed_bfloat16"
    if keras.backend.backend() not in ("torch", "jax"):
        print("note: no bfloat16 support on this backend; training in float32", file=sys.stderr)
        return "float32"
    if not cpu_has_native_bfloat16():
        # measured on an AVX2-only EPYC: a ResNet18 U-Net step in mixed_bfloat16 took minutes
        # against 2.8 s in float32
        print("note: use_mixed_precision: this CPU has no native bfloat16 (avx512_bf16, amx_bf16 "
              "or Arm bf16), where bfloat16 is emulated and many times slower; training in "
              "float32", file=sys.stderr)
        return "float32"
    return "mixed_bfloat16"


def _jax_accelerator() -> bool:
    """Whether JAX computes on a GPU or TPU (bfloat16 in hardware)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() != "cpu"


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 in hardware: an ``avx512_bf16`` or ``amx_bf16`` flag
    (x86) or ``bf16`` feature (Arm) in ``/proc/cpuinfo`` (or the text ``cpuinfo``); ``False``
    when it cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _cuda_available() -> bool:
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.cuda.is_available()


def resolve_splits(config: RunConfig) -> tuple[PreparedDataset, PreparedDataset]:
    """Open the prepared training and validation splits; create the demo set when asked for it."""
    root = Path(config.data_root)
    train_dir, val_dir = root / config.train_split, root / config.val_split
    if config.dataset == "demo" and not ((train_dir / "meta.json").is_file() and (val_dir / "meta.json").is_file()):
        print(f"creating the synthetic demo set in {root} ...")
        write_demo_dataset(root, seed=0)
    for split in (train_dir, val_dir):
        if not (split / "meta.json").is_file():
            hint = DOWNLOAD_HINTS.get(config.dataset, "").format(root=root)
            raise DataNotFoundError(f"no prepared {config.dataset} split at {split}. {hint}")
    return PreparedDataset(train_dir), PreparedDataset(val_dir)


def _fetch_encoder_weights(config: RunConfig) -> None:
    """Make sure the encoder weights a run starts from are there (``imagenet``: found in or
    downloaded into the torch hub cache; a path: the file exists), so that a missing file stops
    the run before its folder is created."""
    if config.model == "attention_unet" and config.encoder_weights is not None:
        get_encoder(config.encoder).weights_file(config.encoder_weights)


def build_model(config: RunConfig, stage: int | None = None, **kwargs) -> keras.Model:
    """The model the configuration describes (PGU-Net at ``stage``, default the first;
    ``kwargs`` go to the model's builder, e.g. the PGU-Net's ``fade_in``)."""
    return MODELS.build(config.model, config, stage, **kwargs)


def build_loss(config: RunConfig, pixel_counts=None):
    """The loss the configuration names, with frequency weights from ``pixel_counts`` if enabled."""
    weights = None
    if config.frequency_weighting and pixel_counts is not None and config.num_classes > 1:
        weights = class_weights_from_counts(pixel_counts)
    return LOSSES.build(config.loss, config, weights)


def build_optimizer(config: RunConfig, steps_per_epoch: int, epochs: int, world_size: int = 1,
                    lr_factor: float = 1.0):
    """The configured optimizer (AdamW/Adam: Keras' arithmetic, PyTorch's fused kernel on the
    torch backend, see :mod:`.optimizers`) with the configured schedule and global-norm gradient
    clipping; the peak learning rate is ``config.lr × lr_factor``, scaled for ``world_size``
    processes by ``config.lr_scaling``."""
    total = max(steps_per_epoch * epochs, 1)
    peak = scaled_learning_rate(config.lr * lr_factor, world_size, config.lr_scaling)
    lr = SCHEDULES.build(config.lr_schedule, config, peak, total, steps_per_epoch)
    return OPTIMIZERS.build(config.optimizer, config, lr)


def _prepare_run_dir(config: RunConfig) -> Path:
    run_dir = config.run_dir
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.exists() else []
    if entries:
        if not config.overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists; choose another "
                                  f"--experiment_name or pass --overwrite")
        for entry in entries:  # all but the lock this run holds
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").write_text("ok")
        (run_dir / ".write_test").unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to the output directory {run_dir}: {exc}") from exc
    return run_dir


def samples_per_epoch(config: RunConfig, num_images: int, batch_size: int,
                      world_size: int = 1) -> int | None:
    """Training samples per epoch: ``steps_per_epoch × batch × processes`` when steps are set,
    else ``samples_per_epoch``, else ``ceil(crops_per_image × images)``; ``None``: one sample
    per image. Raises ``ValueError`` when ``steps_per_epoch`` and ``samples_per_epoch`` are both
    set and disagree; ``crops_per_image`` (a preset's density) yields to ``steps_per_epoch``."""
    if config.steps_per_epoch:
        wanted = config.steps_per_epoch * batch_size * world_size
        if config.samples_per_epoch is not None and config.samples_per_epoch != wanted:
            raise ValueError(f"steps_per_epoch {config.steps_per_epoch} × batch {batch_size} × "
                             f"{world_size} process(es) = {wanted} samples per epoch, but "
                             f"samples_per_epoch is {config.samples_per_epoch}: set one of them")
        return wanted
    if config.samples_per_epoch is not None:
        return config.samples_per_epoch
    if config.crops_per_image:
        return math.ceil(config.crops_per_image * num_images)
    return None


def _datasets(config, train_split, val_split, model, size=None, batch_size=None, world_size=1):
    """Training and validation datasets with one target per output of ``model``; the training
    epoch has :func:`samples_per_epoch` samples."""
    pre = config.preprocess
    target = "binary" if config.num_classes == 1 else "onehot"
    train_size = size or (config.size_schedule if config.grows else config.input_size)
    outputs = output_names(model) if isinstance(model.output, dict) else None
    common = dict(preprocess=pre, target=target, outputs=outputs, data_format=config.data_format,
                  seed=config.seed,
                  num_classes=max(config.num_classes, 2) if target == "onehot" else None)
    samples = samples_per_epoch(config, len(train_split), batch_size or config.batch_size,
                                world_size)
    train = SegmentationDataset(train_split, size=train_size, level=config.aug_schedule,
                                resize_mode=config.resize_mode, train=True,
                                samples_per_epoch=samples, **common)
    # validation sees images as training does: resized whole (to the last training size unless
    # val_size says otherwise) when training resizes them
    val_size = size or config.val_size
    if val_size is None and config.resize_mode == "resize" and train.size_schedule:
        val_size = train.size_at(max(train.size_schedule))
    val = SegmentationDataset(val_split, size=val_size, train=False,
                              resize_mode=config.resize_mode, **common)
    return train, val


def pgunet_stages(config: RunConfig) -> tuple[int, ...]:
    """The PGU-Net stages a run trains: every stage of ``config.stages`` when it grows
    (``config.grows``), else only the last one (standard mode: the whole network at its
    resolution from the start)."""
    return tuple(config.stages) if config.grows else tuple(config.stages[-1:])


def epoch_steps(config: RunConfig, num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: ``steps_per_epoch``, else the epoch's samples per global batch."""
    return config.steps_per_epoch or num_samples // (batch_size * world_size)


def _batch_sizes(config: RunConfig) -> list[int]:
    """Every (per-process) batch size the run uses: one, or one per PGU-Net stage."""
    if config.model == "progressive_unet":
        sizes = parse_batch_sizes(config.batch_sizes)
        return [sizes.get(STAGE_RESOLUTIONS[s], config.batch_size) for s in pgunet_stages(config)]
    return [config.batch_size]


def _check_batch_sizes(config: RunConfig, num_images: int, world_size: int = 1) -> None:
    """Every batch size the run will use must fit an epoch of training samples, and the epoch
    settings must agree (checked before any write)."""
    for batch in _batch_sizes(config):
        num_samples = samples_per_epoch(config, num_images, batch, world_size) or num_images
        if batch * world_size > num_samples:
            processes = f" × {world_size} processes" if world_size > 1 else ""
            raise ValueError(f"batch size {batch}{processes} is larger than an epoch of the training "
                             f"split ({num_samples} samples from {config.data_root}/"
                             f"{config.train_split}; more with samples_per_epoch)")


def _class_names(config, train_split):
    if config.num_classes == 1:
        return ["nucleus"]
    names = train_split.class_names
    if len(names) != config.num_classes:
        raise ValueError(f"the data has {len(names)} classes ({names}) but num_classes is "
                         f"{config.num_classes}")
    return names


def _fit(model, config, train, val, batch_size, epochs, run_dir, class_names, ema, swa, tag="",
         stage=None, state=None, history_before=None, lr_factor=1.0, stop=None, at_start=None):
    """Compile and fit one model (one PGU-Net stage, its peak learning rate ``lr × lr_factor``);
    resume from ``state`` when given (a mid-epoch resume point: from its step). ``stop``: the
    run's :class:`~.preemption.StopSignals`, polled after every step. ``at_start``: a dict that
    receives ``{stage: monitored validation score before the first step}`` (a grown PGU-Net
    stage: what the previous stage's weights give at the new resolution; not on a resume).

    Under ``torchrun`` every rank runs this with its shard of the data; only rank 0 writes.
    """
    ctx = current_context()
    steps = epoch_steps(config, len(train), batch_size, ctx.world_size)
    if steps < 1:
        raise ValueError(f"batch size {batch_size} × {ctx.world_size} process(es) is larger than "
                         f"the training split ({len(train)} samples)")
    loss = build_loss(config, train.dataset.pixel_counts)
    metrics = segmentation_metrics(class_names, config.data_format)
    scales = getattr(train, "scales", None)
    if isinstance(model.output, dict):  # PGU-Net scales and/or extra heads
        names = output_names(model)
        primary = primary_class_map(names)
        losses, loss_weights = multiscale_losses(loss, [n for n in names if is_class_map(n)],
                                                 config.scale_loss_weights)
        for name in names:
            head = get_head(name)
            if not is_class_map(name):
                losses[name] = head_loss(head, config.data_format)
                loss_weights[name] = (float(getattr(config, head.loss_weight_setting))
                                      if head.loss_weight_setting else 1.0)
        compile_kwargs = {"loss": losses, "loss_weights": loss_weights, "metrics": {primary: metrics}}
        monitor = f"val_{primary}_mean_fg_dice"
    else:
        compile_kwargs = {"loss": loss, "metrics": metrics}
        monitor = "val_mean_fg_dice"
    # jit_compile False → Keras' "auto": XLA on JAX (eager JAX is slow and deadlocks under
    # DataParallel), eager on torch, where torch.compile did not pay off (README, Performance)
    optimizer = build_optimizer(config, steps, epochs, ctx.world_size, lr_factor)
    if model.dtype_policy.name == "mixed_float16":  # else Keras wraps its own, which syncs
        optimizer = DeviceLossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=True if config.jit_compile else "auto",
                  **compile_kwargs)
    partial = state.get("partial") if state else None
    initial_epoch = partial["epoch"] if partial else state["epoch"] + 1 if state else 0
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    train_loader = make_loader(train, batch_size, num_workers=config.num_workers,
                               mixup_alpha=config.mixup_alpha, start_epoch=initial_epoch, **shard)
    val_loader = make_loader(val, batch_size, num_workers=0, **shard)
    if len(train_loader) != steps:  # the schedule was built for `steps`: never train fewer
        raise RuntimeError(f"the training loader has {len(train_loader)} batches per epoch, the "
                           f"learning-rate schedule was built for {steps}")
    if partial:
        if partial["ranks"] != ctx.world_size:
            raise ValueError(f"the resume point was written by {partial['ranks']} process(es) in "
                             f"the middle of epoch {partial['epoch'] + 1}; resume it with as many")
        train_loader.batch_sampler.resume_at(partial["epoch"], partial["steps"])
        print(f"resuming epoch {partial['epoch'] + 1} after its step {partial['steps']}")
    run = RunDir(run_dir)
    best_path, csv_path = run.checkpoint("best", stage), run.history_csv(stage)
    callbacks = [EpochSeeder(config.seed), SyncLoaderEpoch(train_loader), StopOnNonFiniteLoss(ctx),
                 ScheduleLogger(train)]
    if ema is not None:
        callbacks.append(ema)
    if config.precise_bn_batches:
        callbacks.append(PreciseBatchNorm(train, batch_size, config.precise_bn_batches, config.seed))
    if config.tta_val:
        # PGU-Net stage k works at 32·2^(k-1) px; the Attention U-Net needs multiples of 32
        tile = 32 * max(scales) if scales else -(-(config.val_size or 256) // 32) * 32
        resize_to = val.size_at(0) if config.resize_mode == "resize" else None  # as validated
        callbacks.append(TTAValidation(val.dataset, train.preprocess, tile_size=tile, ema=ema,
                                       resize_to=resize_to))
    if swa is not None:
        callbacks.append(swa)
    checkpoint = BestCheckpoint(best_path, monitor=monitor, mode="max", ema=ema)
    if ctx.is_primary:  # the writers; the other ranks hold the same model and metrics
        callbacks += [checkpoint, keras.callbacks.CSVLogger(str(csv_path), append=state is not None)]
        if config.save_every_epochs:
            callbacks.append(EpochCheckpoint(lambda n: run.epoch_checkpoint(n, stage),
                                             config.save_every_epochs, ema))
    shown = min(config.tensorboard_images, len(val)) if ctx.is_primary else 0
    sample = [val.sample(0, i) for i in range(shown)]
    if sample:
        images = np.stack([s[0] for s in sample])
        first = [s[1][train.class_map_output] if isinstance(s[1], dict) else s[1] for s in sample]
        axis = -1 if config.data_format == "channels_last" else 0
        labels = [np.argmax(t, axis=axis) if t.shape[axis] > 1 else np.take(t, 0, axis=axis) > 0.5
                  for t in first]
        callbacks.append(TensorBoardLogger(run_dir / "logs" / (tag.strip("_") or "train"), images, labels))
    early_stopping = None
    if config.early_stopping_patience:
        early_stopping = ResumableEarlyStopping(monitor=monitor, mode="max",
                                                patience=config.early_stopping_patience,
                                                restore_best_weights=True)
        callbacks.append(early_stopping)
    stage_history = state["stage_history"] if state else {}
    if state:
        restore_state(state, model, ema, swa, checkpoint, early_stopping)
        if ctx.is_primary:
            rewrite_history_csv(csv_path, stage_history)  # drop a row of an epoch never completed
    install_data_parallel(model, ctx)  # after restoring: every rank starts from rank 0's state
    recorder = TrainingState(run_dir, stage, ema, swa, checkpoint, early_stopping,
                             history=history_before or {}, stage_history=stage_history,
                             write=ctx.is_primary, stop=stop, context=ctx, partial=partial)
    callbacks.append(recorder)  # last: it saves what the callbacks before it have done
    if at_start is not None and state is None:
        scores = model.evaluate(val_loader, return_dict=True, verbose=0)
        at_start[stage] = float(scores[monitor.removeprefix("val_")])
        if ctx.is_primary:
            print(f"stage {stage} before training: {monitor} {at_start[stage]:.4f}")
    try:
        with warnings.catch_warnings():
            # a resumed epoch is short by the steps trained before its resume point; Keras warns
            # that the loader "ran out of data" and goes on with the next epoch at full length
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(train_loader, validation_data=val_loader, epochs=epochs,
                      initial_epoch=initial_epoch, callbacks=callbacks,
                      verbose=2 if ctx.is_primary else 0)
    except BaseException:
        close_loader(train_loader)  # no worker process outlives a stopped or failed run
        raise
    if ctx.is_primary and csv_path.is_file() and csv_path.stat().st_size:
        plot_history(csv_path, run_dir / f"curves{tag}.png")
    return recorder.history, best_path, monitor, val_loader, train_loader


def print_class_table(metrics: dict, class_names, prefix="val_") -> str:
    """Format per-class Dice of a metrics dict as a table (also printed)."""
    names = label_names(class_names)
    lines = [f"{'class':16s} {'Dice':>7s}"]
    for name in names:
        key = f"{prefix}dice_{name.lower().replace(' ', '_')}"
        if key in metrics:
            lines.append(f"{name:16s} {metrics[key]:7.4f}")
    for key in ("mean_dice", "mean_fg_dice", "mean_iou"):
        if f"{prefix}{key}" in metrics:
            lines.append(f"{key:16s} {metrics[prefix + key]:7.4f}")
    table = "\n".join(lines)
    print(table)
    return table


def train(config: RunConfig, resume: bool = False) -> RunResult:
    """Run the training the configuration describes; write everything to ``config.run_dir``.

    Raises ``DataNotFoundError`` (prepared data missing, with instructions), ``FileExistsError``
    (run directory in use), ``PermissionError`` (output not writable) or ``ValueError`` (settings)
    before any training starts. Keras' global image data format and dtype policy are set for the
    run and restored afterwards. ``resume=True`` continues the run in ``config.run_dir`` from its
    last complete epoch (see :mod:`xsight_keras.training.state`).
    """
    data_format, policy = keras.config.image_data_format(), keras.config.dtype_policy()
    distribution = keras.distribution.distribution()
    try:
        return _train(config, resume)
    finally:
        keras.config.set_image_data_format(data_format)
        keras.config.set_dtype_policy(policy)
        keras.distribution.set_distribution(distribution)


def _use_jax_devices(config: RunConfig) -> None:
    """On JAX with several devices, train data-parallel with ``keras.distribution.DataParallel``:
    Keras splits every batch over the devices (``batch_size`` is the global batch there)."""
    if keras.backend.backend() != "jax":
        return
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return
    for batch in _batch_sizes(config):
        if batch % len(devices):
            raise ValueError(f"batch size {batch} does not split over the {len(devices)} JAX devices")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    print(f"data parallel on {len(devices)} JAX devices (keras.distribution.DataParallel)")


def _train(config: RunConfig, resume: bool = False) -> RunResult:
    start = time.time()
    if config.cpu_malloc_tuning and keras.backend.backend() == "torch" and (
            config.device == "cpu" or not _cuda_available()):
        keep_freed_memory_in_process()  # CPU activations: no page faults every step (host_memory)
    if config.device == "cuda" and not _cuda_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available here")
    ctx = init_distributed()  # a single process unless started by torchrun
    if ctx.is_primary:  # rank 0 creates the demo set (if asked for) while the others wait
        splits = resolve_splits(config)
        if not resume:  # download or find them before the run folder exists
            _fetch_encoder_weights(config)
    ctx.barrier()
    train_split, val_split = splits if ctx.is_primary else resolve_splits(config)
    class_names = _class_names(config, train_split)
    _check_batch_sizes(config, len(train_split), ctx.world_size)
    lock = RunLock(config.run_dir)
    refused = None
    if ctx.is_primary:  # one holder per job: rank 0 (the one that writes)
        try:
            lock.acquire(create=not resume)
        except (RunDirectoryInUse, OSError) as exc:
            refused = exc
    if ctx.any(refused is not None):  # every rank stops, not only the one that saw why
        raise refused or RunDirectoryInUse(f"rank 0 could not lock {config.run_dir} (see its "
                                           f"message)")
    try:
        with StopSignals(config.checkpoint_every_minutes) as stop:
            return _train_locked(config, resume, ctx, start, train_split, val_split, class_names,
                                 stop)
    finally:
        lock.release()


def _train_locked(config, resume, ctx, start, train_split, val_split, class_names, stop):
    state = load_state(config.run_dir) if resume else None
    run_dir = config.run_dir
    if not resume and ctx.is_primary:
        _prepare_run_dir(config)
    ctx.barrier()
    if ctx.is_distributed and ctx.is_primary:
        print(f"data parallel: {ctx.world_size} processes × batch {config.batch_size} = global batch "
              f"{config.batch_size * ctx.world_size}; peak lr "
              f"{scaled_learning_rate(config.lr, ctx.world_size, config.lr_scaling):g} "
              f"(lr_scaling {config.lr_scaling})")
    _use_jax_devices(config)  # before the first variable (the seed generator's) is made
    keras.utils.set_random_seed(config.seed)
    keras.config.set_image_data_format(config.data_format)
    policy = select_precision(config)
    keras.config.set_dtype_policy(policy)
    config_dict = config.to_dict() | {"dtype_policy": policy, "class_names": class_names,
                                      "keras_backend": keras.backend.backend(),
                                      "processes": ctx.world_size}
    if ctx.is_primary:
        RunDir(run_dir).write_settings(config_dict)
    ema = ExponentialMovingAverage(config.ema_decay) if config.use_ema else None
    swa = StochasticWeightAveraging(config.swa_start_epoch) if config.use_swa else None
    if config.model == "progressive_unet":
        history, best_path, monitor, model, train_loader, at_growth = _train_progressive(
            config, train_split, val_split, run_dir, class_names, ema, swa, state, stop)
    else:
        model = build_model(config)
        train, val = _datasets(config, train_split, val_split, model,
                               world_size=current_context().world_size)
        history, best_path, monitor, _, train_loader = _fit(
            model, config, train, val, config.batch_size, config.epochs, run_dir, class_names, ema,
            swa, state=state, stop=stop)
    if not ctx.is_primary:  # rank 0 writes the final files and the summary
        close_loader(train_loader)
        return RunResult(run_dir, history, seconds=time.time() - start)
    try:
        save_model_atomically(model, RunDir(run_dir).checkpoint("final"))
        result = RunResult(run_dir, history)
        if swa is not None and swa.average is not None:
            averaged = swa.averaged_model()
            used = update_batch_norm(averaged, train_loader, max_batches=50)
            save_model_atomically(averaged, RunDir(run_dir).checkpoint("swa"))
            print(f"SWA: averaged {swa.count} epochs, BatchNorm re-estimated on {used} batches")
    finally:
        close_loader(train_loader)  # its workers end with the run, not at garbage collection
    if best_path.exists():
        last_val = {k: v[-1] for k, v in history.items() if k.startswith("val_")}
        result.best_metrics = {k: float(max(v)) for k, v in history.items()
                               if k.startswith("val_") and "loss" not in k}
        prefix = monitor.removesuffix("mean_fg_dice")
        print(f"best checkpoint {best_path} ({monitor} = {max(history.get(monitor, [np.nan])):.4f})")
        print_class_table(last_val, class_names, prefix)
    result.seconds = time.time() - start
    summary = {"seconds": result.seconds, "best": result.best_metrics,
               "final": {k: float(v[-1]) for k, v in history.items()}}
    if config.model == "progressive_unet":
        summary["stages"] = stage_report(run_dir, pgunet_stages(config), monitor, at_growth)
    RunDir(run_dir).write_summary(summary)
    return result


def stage_report(run_dir, stages, monitor: str, at_growth: dict | None = None) -> dict:
    """Per PGU-Net stage, from its ``history_stage_<k>.csv``: resolution, epochs, the validation
    score (``monitor``) after the stage's first epoch and its best; with ``at_growth`` (stage →
    score of the freshly grown model before its first step, i.e. the previous stage at this
    stage's resolution) also that. Printed as a table and returned as ``{stage: {...}}`` (for
    ``summary.json``)."""
    import csv

    report = {}
    for stage in stages:
        path = RunDir(run_dir).history_csv(stage)
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            scores = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)]
        if scores:
            report[str(stage)] = {"resolution": STAGE_RESOLUTIONS[stage], "epochs": len(scores),
                                  "first_epoch": scores[0], "best": max(scores)}
            if (at_growth or {}).get(stage) is not None:
                report[str(stage)]["at_growth"] = at_growth[stage]
    print(f"{'stage':>5s} {'size':>5s} {'epochs':>6s} {'at growth':>9s} {'first epoch':>11s} "
          f"{'best':>7s}  ({monitor})")
    for stage, r in report.items():
        grown = f"{r['at_growth']:.4f}" if "at_growth" in r else "-"
        print(f"{stage:>5s} {r['resolution']:>5d} {r['epochs']:>6d} {grown:>9s} "
              f"{r['first_epoch']:>11.4f} {r['best']:>7.4f}")
    return report


def _train_progressive(config, train_split, val_split, run_dir, class_names, ema, swa, state=None,
                       stop=None):
    """PGU-Net: train each stage at its resolution and batch size (its own learning-rate
    schedule), then grow with weight transfer and fade the new level in. Without
    ``config.grows`` (standard mode) only the last stage, built whole, for ``epochs_per_stage``
    epochs."""
    batch_sizes = parse_batch_sizes(config.batch_sizes)
    stages = pgunet_stages(config)
    world_size = current_context().world_size
    batches = {s: batch_sizes.get(STAGE_RESOLUTIONS[s], config.batch_size) for s in stages}
    steps = {s: epoch_steps(config, samples_per_epoch(config, len(train_split), batches[s],
                                                      world_size) or len(train_split),
                            batches[s], world_size) for s in stages}
    model, merged, at_growth = None, {}, {}
    for stage in stages:
        resolution, batch = STAGE_RESOLUTIONS[stage], batches[stage]
        stage_state = None
        fade = 0  # training steps over which a grown stage fades its new level in
        if stage != stages[0] and config.fade_in_epochs:
            fade = max(round(config.fade_in_epochs * steps[stage]), 1)
        if state is not None:
            if stage < state["stage"]:
                continue  # finished before the interruption; its weights live on in the state
            if stage == state["stage"]:
                stage_state = state
                merged = state["history"]
        if model is None:  # the first stage, or the stage a resumed run was in (its state)
            model = build_model(config, stage, fade_in=fade)
        else:
            model = grow(model, fade_in=fade)
        train, val = _datasets(config, train_split, val_split, model, size=resolution,
                               batch_size=batch, world_size=current_context().world_size)
        lr_factor = 1.0 if stage == stages[0] else config.grown_lr_factor
        print(f"PGU-Net stage {stage}: {resolution}×{resolution}, batch {batch}, "
              f"{config.epochs_per_stage} epochs, peak lr {config.lr * lr_factor:g}, "
              f"{model.count_params():,} parameters")
        history, best_path, monitor, _, train_loader = _fit(
            model, config, train, val, batch, config.epochs_per_stage, run_dir, class_names,
            ema, swa, tag=f"_stage_{stage}", stage=stage, state=stage_state, history_before=merged,
            lr_factor=lr_factor, stop=stop, at_start=at_growth if stage != stages[0] else None)
        if stage != stages[-1]:
            close_loader(train_loader)
        model = settle(model)  # the faded-in level is the plain stage now: drop the old stem
        merged = history
        if ema is not None:
            ema.shadow = None  # the next stage has new weights: restart the average
    final_best = RunDir(run_dir).checkpoint("best")
    if current_context().is_primary:
        shutil.copyfile(best_path, final_best)
    return merged, final_best, monitor, model, train_loader, at_growth
