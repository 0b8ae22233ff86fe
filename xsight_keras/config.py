"""One typed configuration for a run: defaults ← preset YAML ← ``--config`` file ← CLI flags.

The resolved configuration is written to ``config.json`` in the run directory and is enough to
rebuild the model and its preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from xsight_keras.data.preprocess import PreprocessConfig
from xsight_keras.heads import extra_heads
from xsight_keras.models.encoders.registry import available_encoders
from xsight_keras.rundir import LEGACY_PREPROCESS_KEYS, RunDir, preprocess_from_settings
from xsight_keras.training.registries import HEAD_LOSSES, LOSSES, MODELS, OPTIMIZERS, SCHEDULES

# The presets are package data (``xsight_keras/configs/<name>.yaml``), read through
# importlib.resources so that they are found in an installed wheel as in a clone (where the
# top-level ``configs`` is a link to this folder).
CONFIG_DIR = resources.files(__package__) / "configs"


@dataclass
class RunConfig:
    """Every setting of a training run. Field comments give units and accepted values."""

    # experiment
    experiment_name: str = "run"
    output_dir: str = "outputs"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    overwrite: bool = False
    # data
    dataset: str = "demo"  # demo | pannuke | monuseg | folders
    data_root: str = "data/demo"  # folder holding the prepared splits
    train_split: str = "train"
    val_split: str = "valid"
    test_split: str = "test"
    num_classes: int = 6
    in_channels: int = 3
    # microns per pixel of the training images: whole-slide prediction reads slides at this
    # resolution (PanNuke and MoNuSeg are 40x, about 0.25); None for images that are not slides
    mpp: float | None = None
    input_size: int = 256  # training crop/resize size when not progressive
    val_size: int | None = None  # central crop for validation; None keeps the stored size
    # grow during training: the PGU-Net through its stages, the Attention U-Net through
    # size_schedule; None is the model's own default (PGU-Net grows, the Attention U-Net does not)
    progressive: bool | None = None
    size_schedule: str | None = None  # e.g. "0:128,10:256" (epoch:size), used when progressive
    aug_schedule: str = "0:1"  # epoch:level, levels 0-4
    resize_mode: str = "crop"  # crop | resize
    use_augmented: bool = False  # folders: include flipped_/mirrored_/rotated_ copies
    num_workers: int = 0
    # CLAHE + z-score (xsight_keras.data.preprocess); in YAML a "preprocess:" mapping, or the
    # keys clahe_clip_limit, clahe_grid, zscore (image | none | dataset with mean and std)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    mixup_alpha: float = 0.0
    # model (choices: the registries in xsight_keras.training.registries)
    model: str = "attention_unet"  # attention_unet | progressive_unet
    encoder: str = "resnet34"  # any name in xsight_keras.models.available_encoders()
    encoder_weights: str | None = None  # None | imagenet | path
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    base_filters: int = 32  # progressive_unet
    dropout: float = 0.0
    data_format: str = "channels_first"  # faster on the torch backend
    instance_head: bool = False  # second output (distance + contour) to separate touching nuclei
    heads: tuple[str, ...] = ()  # further outputs by declared head name (xsight_keras.heads)
    instance_loss_weight: float = 1.0
    hover_loss_weight: float = 1.0  # weight of the hv head's loss (HoverLoss), with heads: hv
    head_branch_stages: int = 0  # attention_unet: last decoder stages copied per extra head (0-5)
    # optimisation
    epochs: int = 50
    batch_size: int = 8  # per process under torchrun: the global batch is batch_size × processes
    lr_scaling: str = "none"  # none | linear | sqrt: how lr grows with the number of processes
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip_val: float | None = 1.0
    lr_schedule: str = "onecycle"  # onecycle | warmup_cosine | constant
    warmup_epochs: int = 2
    min_lr_factor: float = 0.01
    steps_per_epoch: int | None = None  # sets samples per epoch = steps × batch × processes
    samples_per_epoch: int | None = None  # crops per epoch drawn across images by area (None: 1 per image)
    crops_per_image: float | None = None  # or: samples per epoch = ceil(this × number of images)
    # loss
    loss: str = "hybrid"  # hybrid | dice | fw_dice | focal | ce | bce_dice
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    boundary_weight: float = 0.5
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    frequency_weighting: bool = True  # Dice class weights from the training split's pixel counts
    # regularisation and averaging
    use_mixed_precision: bool = False
    # 16-bit type of mixed precision on CUDA: float16 (loss scaling on the device) or bfloat16
    # (Ampere and later; no loss scaling). CPUs and JAX accelerators always use bfloat16
    mixed_precision_dtype: str = "float16"
    jit_compile: bool = False
    cpu_malloc_tuning: bool = False  # torch CPU training: glibc keeps freed memory (host_memory)
    use_ema: bool = False
    ema_decay: float = 0.999
    use_swa: bool = False
    swa_start_epoch: int = 10
    early_stopping_patience: int | None = None
    tta_val: bool = False  # also score validation images whole with the 8 flips/rotations
    # BatchNorm statistics re-estimated over this many training batches before each validation
    # (PreciseBatchNorm: inference then computes what training does); 0 keeps the moving averages
    precise_bn_batches: int = 8
    # PGU-Net
    stages: tuple[int, ...] = (1, 2, 3, 4)
    epochs_per_stage: int = 10
    batch_sizes: str = "32:64,64:32,128:16,256:8"  # resolution:batch size
    fade_in_epochs: float = 1.0  # each new level blends in over this many epochs (0: at once)
    # peak learning rate of every stage after the first, as a fraction of lr: the transferred
    # levels are trained already, and a full warm-up to lr undoes part of what they learnt
    grown_lr_factor: float = 1.0
    scale_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)  # fused, then coarser scales
    # logging
    tensorboard_images: int = 3
    save_every_epochs: int | None = None  # also keep epoch_NNN.keras every N epochs (EMA weights)
    # also write a mid-epoch resume point every N minutes (jobs killed without a warning signal)
    checkpoint_every_minutes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @property
    def grows(self) -> bool:
        """Whether the run grows: ``progressive``, or when it is ``None`` the model's default
        (the PGU-Net grows through ``stages``; the Attention U-Net keeps ``input_size``)."""
        if self.progressive is None:
            return self.model == "progressive_unet"
        return self.progressive

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment_name


FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}


def _coerce(name: str, value):
    """Convert YAML/CLI values to the field's type (tuples from lists or comma strings).

    For a field that may be ``None`` (``encoder_weights``, ``size_schedule``, ``val_size`` …)
    the words ``none`` and ``null`` in any case are ``None`` too: ``--encoder_weights none`` is
    random initialisation, not a file called ``none``. For a list setting (``heads`` …) they
    are the empty list: ``--heads none`` takes off the heads a preset declares.
    """
    if name == "preprocess":
        if not isinstance(value, (dict, PreprocessConfig)):
            raise ValueError(f"expected a mapping of preprocessing settings, got {value!r}")
        return preprocess_from_settings({"preprocess": value})
    default = getattr(RunConfig(), name)
    kind = FIELD_TYPES[name]
    if isinstance(value, str) and "None" in str(kind) and value.strip().lower() in ("none", "null"):
        return None
    if value is None:
        return () if isinstance(default, tuple) and "None" not in str(kind) else None
    if isinstance(default, tuple) or "tuple" in str(kind):
        if isinstance(value, str):
            if value.strip().lower() in ("none", "null"):
                return ()
            value = [v for v in value.replace(" ", "").split(",") if v]
        item = float if "float" in str(kind) else str if "str" in str(kind) else int
        return tuple(item(v) for v in value)
    if isinstance(default, bool) or "bool" in str(kind):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return bool(value)
    if (isinstance(default, int) or str(kind) == "int | None") and "float" not in str(kind):
        return int(value)  # also the optional ones (val_size "128" was left a string)
    if isinstance(default, float) or "float" in str(kind):
        return float(value)
    return value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _preset_files() -> dict:
    """Preset name → its YAML file (a ``Traversable``: ``is_file``, ``read_text``)."""
    return {entry.name.removesuffix(".yaml"): entry for entry in CONFIG_DIR.iterdir()
            if entry.name.endswith(".yaml") and entry.is_file()}


def available_presets() -> list[str]:
    """The names ``load_config(preset=...)`` accepts, sorted."""
    return sorted(_preset_files())


def load_config(preset: str | None = None, config_file=None, overrides: dict | None = None) -> RunConfig:
    """Resolve a :class:`RunConfig` from a preset name, a YAML file and explicit overrides.

    Later sources win. Unknown keys are an error that names the source and the key.
    """
    values: dict[str, Any] = {}
    sources = []
    if preset:
        path = _preset_files().get(preset)
        if path is None:
            raise FileNotFoundError(f"unknown preset {preset!r}; available: {available_presets()}")
        sources.append((str(path), _read_yaml(path)))
    if config_file:
        sources.append((str(config_file), _read_yaml(Path(config_file))))
    if overrides:
        sources.append(("command line", overrides))
    preprocess: dict[str, Any] = {}
    for source, data in sources:
        for key, value in data.items():
            if key in LEGACY_PREPROCESS_KEYS:  # a flat preprocessing key: part of "preprocess"
                preprocess[key] = value
                key, value = "preprocess", preprocess
            elif key == "preprocess" and isinstance(value, dict):
                preprocess.update(value)
                value = preprocess
            if key not in FIELD_TYPES:
                raise ValueError(f"{source}: unknown setting {key!r}")
            try:
                values[key] = _coerce(key, value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: bad value for {key!r}: {exc}") from exc
    config = RunConfig(**values)
    validate_config(config)
    return config


def load_run_config(run_dir, overrides: dict | None = None) -> RunConfig:
    """The configuration a run was started with (its ``config.json``), with optional overrides
    (e.g. more ``epochs`` when resuming). The run is where ``run_dir`` is now: ``output_dir`` and
    ``experiment_name`` point there, whatever they were when it started (the folder may have
    been moved or copied, or ``output_dir`` be relative to another working directory)."""
    run = RunDir.open(run_dir)
    saved = run.settings
    values = {k: _coerce(k, v) for k, v in saved.items() if k in FIELD_TYPES}
    values["preprocess"] = run.preprocess  # nested, or the flat keys of older runs
    where = Path(run_dir).resolve()
    values.update(output_dir=str(where.parent), experiment_name=where.name)
    values.update({k: _coerce(k, v) for k, v in (overrides or {}).items()})
    config = RunConfig(**values)
    validate_config(config)
    return config


def validate_config(config: RunConfig) -> None:
    """Raise ``ValueError`` for settings that cannot work together."""
    for registry in (MODELS, LOSSES, OPTIMIZERS, SCHEDULES):  # settings that name an object
        registry.check(getattr(config, registry.kind))
    choices = {
        "dataset": ("demo", "pannuke", "monuseg", "folders"),
        "lr_scaling": ("none", "linear", "sqrt"),
        "data_format": ("channels_last", "channels_first"),
        "device": ("auto", "cpu", "cuda"),
        "resize_mode": ("crop", "resize"),
    }
    choices["encoder"] = tuple(available_encoders())
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {getattr(config, key)!r}")
    for head in extra_heads(config.instance_head, config.heads):  # declared, not class maps
        HEAD_LOSSES.check(head.loss)
    pre = config.preprocess
    if pre.zscore == "dataset" and len(pre.mean) != config.in_channels:
        raise ValueError(f"preprocess: zscore 'dataset' has {len(pre.mean)} channel means for "
                         f"in_channels {config.in_channels}")
    for key in ("steps_per_epoch", "samples_per_epoch", "crops_per_image", "save_every_epochs",
                "checkpoint_every_minutes", "mpp"):
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ValueError(f"{key} must be positive (or unset), got {value}")
    if not 0 <= config.fade_in_epochs <= config.epochs_per_stage:
        raise ValueError(f"fade_in_epochs must be between 0 (off) and epochs_per_stage "
                         f"({config.epochs_per_stage}): a new level fades in within its stage, "
                         f"got {config.fade_in_epochs}")
    if not 0 < config.grown_lr_factor <= 1:
        raise ValueError(f"grown_lr_factor must be in (0, 1] (the grown stages' peak learning "
                         f"rate as a fraction of lr), got {config.grown_lr_factor}")
    if config.mixed_precision_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"mixed_precision_dtype must be float16 or bfloat16, got "
                         f"{config.mixed_precision_dtype!r}")
    if config.precise_bn_batches < 0:
        raise ValueError(f"precise_bn_batches must be 0 (off) or a number of batches, got "
                         f"{config.precise_bn_batches}")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    if config.lr <= 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    heads = [h.name for h in extra_heads(config.instance_head, config.heads)]
    if config.head_branch_stages:
        if not 0 < config.head_branch_stages <= 5:
            raise ValueError(f"head_branch_stages must be in [0, 5], got {config.head_branch_stages}")
        if config.model != "attention_unet":
            raise ValueError("head_branch_stages is an attention_unet setting (the PGU-Net's heads "
                             f"read its finest level), got model {config.model!r}")
        if not heads:
            raise ValueError("head_branch_stages gives extra heads their own decoder stages, but "
                             "the model has none (set heads or instance_head)")
    if config.mixup_alpha > 0 and heads:
        raise ValueError(f"mixup_alpha {config.mixup_alpha} would blend the per-nucleus targets of "
                         f"the head(s) {heads} of two images into maps that describe neither: "
                         "MixUp is for class maps only (set mixup_alpha 0, or heads none and "
                         "instance_head false)")
    if config.grows and not config.size_schedule and config.model != "progressive_unet":
        raise ValueError("progressive=True needs size_schedule (e.g. '0:128,10:256')")
    if config.loss == "bce_dice" and config.num_classes != 1:
        raise ValueError("loss 'bce_dice' is for binary masks: set num_classes: 1")


def parse_batch_sizes(spec: str) -> dict[int, int]:
    """``"32:64,64:32"`` → ``{32: 64, 64: 32}`` (resolution → batch size)."""
    try:
        return {int(a): int(b) for a, b in (item.split(":") for item in spec.split(",") if item)}
    except ValueError as exc:
        raise ValueError(f"batch_sizes {spec!r}: expected 'resolution:batch,...'") from exc


__all__ = ["RunConfig", "available_presets", "load_config", "load_run_config", "parse_batch_sizes",
           "validate_config"]
