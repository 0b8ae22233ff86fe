"""Batches for ``model.fit``: a torch ``DataLoader`` over a prepared split.

Every sample is addressed by ``(epoch, index)``: the batch sampler, which runs in the main
process, stamps the epoch into each index. Whatever a schedule says for that epoch (training
size, augmentation level) therefore takes effect at exactly that epoch in every worker process,
persistent or not, and every random choice (crop, augmentation, MixUp) is a pure function of
``(seed, epoch, index)``: the same seed gives the same batches with 0 or N workers.

Pipeline per sample: read (memory-mapped) → random crop / resize to the epoch's size →
augmentation at the epoch's level (uint8, joint with the masks) → CLAHE + z-score →
targets (one-hot, sparse or binary; per-scale for PGU-Net). Colour augmentation acts on the raw
RGB image, as it expects; the network always sees the same normalisation as at inference.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xsight_keras._backend import resolve_data_format
from xsight_keras.data.augment import augment_sample, build_augmentation, mixup
from xsight_keras.data.images import resize_image
from xsight_keras.data.prepared import PreparedDataset
from xsight_keras.data.preprocess import PreprocessConfig, preprocess_image
from xsight_keras.heads import (
    FUSED,
    SEMANTIC,
    ClassMapHead,
    extra_heads,
    get_head,
    primary_class_map,
    scale_of,
    scale_output,
)

TARGET_KINDS = ("onehot", "sparse", "binary")


def parse_schedule(spec) -> dict[int, int]:
    """Normalise a per-epoch schedule to ``{first_epoch: value}``.

    Accepts an int (constant), a dict, or a string ``"0:128,10:256"`` (epoch:value pairs, epochs
    counted from 0). The first entry must start at epoch 0.
    """
    if spec is None:
        return {}
    if isinstance(spec, (int, np.integer)):
        return {0: int(spec)}
    if isinstance(spec, str):
        try:
            spec = dict(tuple(int(v) for v in item.split(":")) for item in spec.split(",") if item)
        except ValueError as exc:
            raise ValueError(f"schedule {spec!r}: expected 'epoch:value,epoch:value'") from exc
    schedule = {int(k): int(v) for k, v in dict(spec).items()}
    if schedule and min(schedule) != 0:
        raise ValueError(f"schedule {schedule} must start at epoch 0")
    return dict(sorted(schedule.items()))


def value_at(schedule: dict[int, int], epoch: int, default=None):
    """The value of ``schedule`` in force at ``epoch`` (the last entry whose epoch ≤ ``epoch``)."""
    value = default
    for start, v in schedule.items():
        if start <= epoch:
            value = v
    return value


def _crop_window(shape_hw, size: int, rng, random_crop: bool) -> tuple[int, int, int, int]:
    """``(y, x, height, width)`` of the ``size``×``size`` crop of an image of ``shape_hw``
    (random or central) inside the image; a side shorter than ``size`` is taken whole (it is
    reflect-padded afterwards, :func:`_pad_to`). The random draws are the ones
    :func:`_fit_to_size` makes, so a windowed read gives the same crop as a whole one."""
    h, w = shape_hw
    hp, wp = max(h, size), max(w, size)
    if random_crop:
        y, x = int(rng.integers(0, hp - size + 1)), int(rng.integers(0, wp - size + 1))
    else:
        y, x = (hp - size) // 2, (wp - size) // 2
    return y, x, min(size, h), min(size, w)


def _pad_to(image, masks, size: int):
    """Reflect-pad image and masks (centred) to at least ``size`` on each side."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image, masks
    ph, pw = max(size - h, 0), max(size - w, 0)
    pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    return (np.pad(image, pads + ((0, 0),), mode="reflect"),
            [np.pad(m, pads, mode="reflect") for m in masks])


def _fit_to_size(arrays, size: int, rng, random_crop: bool, resize: bool):
    """Crop (random or central) or resize image + masks to ``size``×``size``; reflect-pad if small."""
    image, masks = arrays
    h, w = image.shape[:2]
    if resize and (h, w) != (size, size):
        image = resize_image(image, size, size)
        masks = [cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in masks]
        return image, masks
    image, masks = _pad_to(image, masks, size)
    y, x, _, _ = _crop_window(image.shape[:2], size, rng, random_crop)
    return image[y:y + size, x:x + size], [m[y:y + size, x:x + size] for m in masks]


class SegmentationDataset(Dataset):
    """Training/validation samples from a :class:`PreparedDataset`, indexed by ``(epoch, index)``.

    Arguments:
        dataset: a prepared split (or its folder).
        size: training size, an int or a schedule (``"0:128,10:256"``); ``None`` keeps the stored
            size (all samples must then share one size to be batched).
        level: augmentation level 0–4, an int or a schedule; forced to 0 when ``train=False``.
        resize_mode: ``"crop"`` (random crop for training, central for validation) or ``"resize"``.
        target: ``"onehot"`` float32 (H, W, K), ``"sparse"`` int32 (H, W), or ``"binary"`` float32
            (H, W, 1) = any nucleus.
        outputs: the model's output names (:func:`xsight_keras.heads.output_names`); targets
            are then a dict with one entry per output: class maps (``scale_{s}`` ones
            nearest-downsampled by s) and each other head's target from the instance map
            (:meth:`xsight_keras.heads.Head.target`). ``None``: the class map alone, not a dict.
        scales, instance_targets: the older way to name the outputs: PGU-Net scales (``fused``
            plus ``scale_{s}``) and/or the instance head.
        samples_per_epoch: training epochs of this many samples (crops) instead of one per image:
            sample ``i`` of an epoch comes from the image at position ``(i + u) / n`` of the
            images laid end to end by area (``u`` one random offset per epoch), so each image
            gives a share of the crops proportional to its area, a pure function of
            ``(seed, epoch, index)``; ``None`` (and always for validation): one per image.
        data_format: layout of images and one-hot targets, ``"channels_last"`` or
            ``"channels_first"``; ``None``: the backend's fast layout, as the model builders
            choose it (:func:`xsight_keras._backend.default_data_format`).

    Item: ``(image float32 (H, W, C), targets, (epoch, index))``.
    """

    def __init__(self, dataset, *, size=None, level=0, resize_mode="crop", train=True,
                 preprocess: PreprocessConfig = PreprocessConfig(), target="onehot",
                 num_classes: int | None = None, scales: Iterable[int] | None = None,
                 data_format: str | None = None, seed: int = 0, instance_targets: bool = False,
                 outputs: Iterable[str] | None = None, samples_per_epoch: int | None = None):
        self.dataset = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(dataset)
        if target not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {target!r}")
        if resize_mode not in ("crop", "resize"):
            raise ValueError(f"resize_mode must be 'crop' or 'resize', got {resize_mode!r}")
        self.size_schedule = parse_schedule(size)
        self.level_schedule = parse_schedule(level) if train else {0: 0}
        self.resize_mode = resize_mode
        self.train = train
        self.preprocess = preprocess
        self.target = target
        self.num_classes = num_classes or self.dataset.num_classes
        self.scales = tuple(scales) if scales else None
        self.data_format = resolve_data_format(data_format)
        self.seed = seed
        if samples_per_epoch is not None and int(samples_per_epoch) < 1:
            raise ValueError(f"samples_per_epoch must be a positive number of samples, got "
                             f"{samples_per_epoch}")
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch and train else None
        if self.samples_per_epoch:
            areas = np.array([h * w for h, w, _ in map(self.dataset.shape, range(len(self.dataset)))],
                             np.float64)
            self._area_edges = np.cumsum(areas) / areas.sum()
        if outputs is None and (self.scales or instance_targets):
            outputs = ([FUSED] + [scale_output(s) for s in self.scales] if self.scales
                       else [SEMANTIC]) + [h.name for h in extra_heads(instance_targets)]
        self.outputs = tuple(outputs) if outputs is not None else None
        if self.outputs is not None:
            self.scales = tuple(sorted(s for s in map(scale_of, self.outputs) if s)) or None
        self.heads = [get_head(name) for name in self.outputs or ()]
        self.needs_instances = any(h.needs_instances for h in self.heads)
        self._augmentations: dict[int, object] = {}
        self._eye = np.eye(self.num_classes, dtype=np.float32)

    def __len__(self) -> int:
        """Samples per epoch: ``samples_per_epoch``, or the number of images."""
        return self.samples_per_epoch or len(self.dataset)

    def image_of(self, epoch: int, index: int) -> int:
        """The image that sample ``index`` of ``epoch`` is cut from (see ``samples_per_epoch``)."""
        if not self.samples_per_epoch:
            return index
        offset = np.random.default_rng([self.seed, epoch, 2**31 - 1]).random()
        position = (index + offset) / self.samples_per_epoch
        return min(int(np.searchsorted(self._area_edges, position, side="right")),
                   len(self.dataset) - 1)

    def size_at(self, epoch: int) -> int | None:
        return value_at(self.size_schedule, epoch)

    def level_at(self, epoch: int) -> int:
        return value_at(self.level_schedule, epoch, 0)

    def _augmentation(self, level: int):
        if level not in self._augmentations:  # built lazily, once per level and process
            self._augmentations[level] = build_augmentation(level)
        return self._augmentations[level]

    def _targets(self, classes: np.ndarray):
        if self.target == "sparse":
            return classes.astype(np.int32)
        if self.target == "binary":
            t = (classes > 0).astype(np.float32)[..., None]
        else:
            if classes.max(initial=0) >= self.num_classes:
                raise ValueError(f"{self.dataset.root}: class {int(classes.max())} ≥ num_classes "
                                 f"{self.num_classes}")
            t = np.take(self._eye, classes, axis=0)  # one-hot by row lookup, the fastest numpy way
        return t if self.data_format == "channels_last" else np.ascontiguousarray(t.transpose(2, 0, 1))

    def sample(self, epoch: int, index: int):
        """Image and targets of sample ``index`` as seen at ``epoch`` (see class docstring)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        image_index = self.image_of(epoch, index)
        size = self.size_at(epoch)
        if size is not None and self.resize_mode == "crop":  # read only the crop's window
            y, x, h, w = _crop_window(self.dataset.shape(image_index)[:2], size, rng, self.train)
            item = self.dataset.window(image_index, y, x, h, w)
        else:
            item = self.dataset[image_index]
        image, masks = item.image, [item.classes]
        if self.needs_instances:
            masks.append(item.instances)
        if size is not None:
            if self.resize_mode == "crop":
                image, masks = _pad_to(image, masks, size)
            else:
                image, masks = _fit_to_size((image, masks), size, rng, self.train, True)
        level = self.level_at(epoch)
        if level:
            image, masks = augment_sample(self._augmentation(level), np.ascontiguousarray(image),
                                          [np.ascontiguousarray(m) for m in masks],
                                          seed=rng.integers(2**31))
        x = preprocess_image(np.ascontiguousarray(image), self.preprocess)
        if self.data_format == "channels_first":
            x = np.ascontiguousarray(x.transpose(2, 0, 1))
        classes = masks[0]
        if self.outputs is None:
            return x, self._targets(classes)
        targets = {}
        for head in self.heads:
            if isinstance(head, ClassMapHead):
                s = scale_of(head.name) or 1
                targets[head.name] = self._targets(classes[::s, ::s] if s > 1 else classes)
            else:
                t = head.target(masks[1])
                targets[head.name] = (t if self.data_format == "channels_last"
                                      else np.ascontiguousarray(t.transpose(2, 0, 1)))
        return x, targets

    @property
    def class_map_output(self) -> str | None:
        """The output whose target is the full-resolution class map (``None``: not a dict)."""
        return primary_class_map(self.outputs) if self.outputs is not None else None

    def __getitem__(self, key):
        epoch, index = key
        x, y = self.sample(epoch, index)
        return x, y, (epoch, index)


class EpochBatchSampler(Sampler):
    """Yields batches of ``(epoch, index)`` keys; each pass over it is the next epoch.

    Shuffling is seeded by ``(seed, epoch)``. ``set_epoch`` (e.g. when resuming) sets the epoch of
    the next pass. With ``drop_last`` the last incomplete batch is dropped (training).

    Data parallel (``world_size`` > 1, this process ``rank``): every rank draws the same epoch
    order. With ``drop_last`` (training) step ``s`` takes the ``batch_size × world_size``
    samples at ``s·batch_size·world_size`` of that order and rank ``r`` the ``r``-th slice of
    ``batch_size``: every rank runs the same number of steps and, within an epoch, no sample is
    seen twice; the global batch is ``batch_size × world_size``. Without ``drop_last``
    (validation) rank ``r`` takes every ``world_size``-th sample from ``r``, so the shards cover
    the split exactly once (their lengths may differ by one).
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle=True, drop_last=True, seed=0,
                 start_epoch: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if drop_last and batch_size * world_size > num_samples:
            raise ValueError(f"batch size {batch_size}"
                             + (f" × {world_size} processes" if world_size > 1 else "")
                             + f" is larger than the dataset ({num_samples} samples): no complete batch")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = start_epoch
        self.skip = {}  # epoch → steps already trained before a mid-epoch resume point

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, steps: int) -> None:
        """Passes over ``epoch`` start after its first ``steps`` batches (those a run trained
        before its mid-epoch resume point); the batches after them are the same as ever."""
        self.skip[int(epoch)] = int(steps)

    def _shard_length(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.world_size)
        return -(-self._shard_length() // self.batch_size)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        order = np.arange(self.num_samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        if self.drop_last:
            step = self.batch_size * self.world_size
            starts = (b * step + self.rank * self.batch_size for b in range(len(self)))
            batches = (order[s:s + self.batch_size] for s in starts)
        else:
            shard = order[self.rank::self.world_size]
            batches = (shard[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self)))
        for b, batch in enumerate(batches):
            if b >= self.skip.get(epoch, 0):
                yield [(epoch, int(i)) for i in batch]


class BatchCollator:
    """Stack samples into torch tensors and apply MixUp (seeded by the batch's first key)."""

    def __init__(self, mixup_alpha: float = 0.0, seed: int = 0):
        self.mixup_alpha = mixup_alpha
        self.seed = seed

    def __call__(self, items):
        images = np.stack([it[0] for it in items])
        if isinstance(items[0][1], dict):
            targets = {k: np.stack([it[1][k] for it in items]) for k in items[0][1]}
        else:
            targets = np.stack([it[1] for it in items])
        if self.mixup_alpha > 0:
            epoch, index = items[0][2]
            rng = np.random.default_rng([self.seed, epoch, index, 7])
            images, targets = mixup(images, targets, self.mixup_alpha, rng)
        to_tensor = torch.from_numpy
        if isinstance(targets, dict):
            return to_tensor(images), {k: to_tensor(v) for k, v in targets.items()}
        return to_tensor(images), to_tensor(targets)


def _worker_init(_):
    cv2.setNumThreads(1)  # workers are the parallelism; nested OpenCV threads only contend
    torch.set_num_threads(1)


def make_loader(dataset: SegmentationDataset, batch_size: int, *, shuffle: bool | None = None,
                num_workers: int = 0, mixup_alpha: float = 0.0, drop_last: bool | None = None,
                start_epoch: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A ``DataLoader`` that feeds ``model.fit`` / ``model.evaluate`` directly.

    Yields ``(images, targets)`` torch tensors: images float32 (B, H, W, C) (channels first if
    the dataset says so), targets as the dataset builds them (a dict for PGU-Net scales).
    Training datasets shuffle and drop the last incomplete batch by default; MixUp needs one-hot
    or binary targets. Workers are persistent: the epoch travels with every index.
    ``rank`` / ``world_size``: this process' shard in data-parallel training (see
    :class:`EpochBatchSampler`); ``batch_size`` is then the per-process batch.
    """
    train = dataset.train
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if mixup_alpha > 0 and dataset.target == "sparse":
        raise ValueError("MixUp needs one-hot or binary targets, not sparse ones")
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, drop_last, dataset.seed, start_epoch,
                                rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=BatchCollator(mixup_alpha if train else 0.0, dataset.seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # fork after OpenCV has started its thread pool can deadlock the child; forkserver
        # children start from a clean process
        multiprocessing_context="forkserver" if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def close_loader(loader: DataLoader) -> None:
    """Shut down the worker processes of ``loader`` now (persistent workers otherwise live until
    the loader is garbage-collected, or past a crashed trainer)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
