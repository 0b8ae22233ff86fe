"""Multi-process data-parallel training with ``torchrun`` on the torch backend.

``keras.distribution`` has no torch implementation (Keras 3.15), so data parallelism is done
here, around Keras' own ``fit``:

- every process (rank) builds the same model from the same seed, then takes rank 0's weights;
- each rank reads its own shard of every epoch (:class:`~xsight_keras.data.loader.EpochBatchSampler`
  with ``rank`` / ``world_size``), so one step consumes ``batch_size × world_size`` samples;
- after ``backward`` and before the optimizer applies them, the gradients of all ranks are
  averaged with a bucketed all-reduce (NCCL on GPUs, Gloo on CPUs), together with the
  BatchNorm moving statistics, so every rank applies the same update and holds the same model;
- epoch metrics (the accumulated sums and counts behind them) are summed over ranks before they
  are logged, so callbacks (early stopping, checkpoints) decide the same on every rank;
- only rank 0 writes files.

The optimizer hook (:class:`GradientAllReduce`) relies on Keras' torch trainer calling
``optimizer.apply(gradients, variables)`` once per step, and the metric hook on its end-of-epoch
metric read-out: both are Keras internals, used through :mod:`xsight_keras.compat`
(``wrap_optimizer_apply``, ``wrap_epoch_metrics``) and checked by ``tests/test_compat.py`` and
``tests/training/test_distributed.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import numpy as np

from xsight_keras.compat import wrap_epoch_metrics, wrap_optimizer_apply
from xsight_keras.models.fused_layers import in_memory_order

#: All-reduce bucket size (bytes), as PyTorch DDP's default ``bucket_cap_mb``.
BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel job (``world_size`` 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the one process that prints summaries and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
        if not self.is_distributed:
            return bool(flag)
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)


    def max_of(self, *values: float) -> tuple[float, ...]:
        """The largest of each value over the ranks (one collective for all of them; every rank
        must call it)."""
        if not self.is_distributed:
            return tuple(float(v) for v in values)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(float(v) for v in t.cpu().tolist())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a picklable object; a collective)."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


_CONTEXT = DistributedContext()


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def current_context() -> DistributedContext:
    """The context set by :func:`init_distributed` (a single process until then)."""
    return _CONTEXT


def init_distributed() -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Without those variables (or with ``WORLD_SIZE=1``) this is a single process and nothing is
    initialised. On CUDA each rank uses GPU ``LOCAL_RANK`` and NCCL; on CPUs, Gloo. Raises
    ``RuntimeError`` on a backend other than torch (use ``keras.distribution`` on JAX).
    """
    global _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _CONTEXT = DistributedContext()
        return _CONTEXT
    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"torchrun data parallelism needs KERAS_BACKEND=torch, not {keras.backend.backend()!r}; "
            f"on JAX use keras.distribution.DataParallel (see the README)")
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"rank {rank} wants GPU {local_rank} but this machine has "
                                   f"{torch.cuda.device_count()}; lower --nproc_per_node")
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    _CONTEXT = DistributedContext(rank, world_size, local_rank)
    return _CONTEXT


def shutdown_distributed() -> None:
    """Leave the process group (no-op for a single process)."""
    global _CONTEXT
    if _CONTEXT.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CONTEXT = DistributedContext()


def _buckets(tensors, limit=BUCKET_BYTES):
    """Consecutive groups of same-dtype tensors of at most ``limit`` bytes (one if larger)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_(tensors, world_size: int, mean: bool = True) -> None:
    """Sum (``mean``: average) ``tensors`` in place over all ranks, flattened into buckets of
    ``BUCKET_BYTES`` (few large messages instead of one per tensor). Every rank gets the same
    bytes back. Tensors are flattened in memory order (:func:`in_memory_order`: no element-wise
    copies for kernels stored in PyTorch's order); all ranks hold the same layouts."""
    import torch
    import torch.distributed as dist

    pending = []
    tensors = [in_memory_order(t) for t in tensors]
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        if mean:
            flat.div_(world_size)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_variables(model: keras.Model, context: DistributedContext | None = None) -> None:
    """Give every rank rank 0's values of all the model's variables (weights and statistics)."""
    context = context or current_context()
    if not context.is_distributed:
        return
    import torch.distributed as dist

    for v in model.variables:  # collectives need contiguous tensors: memory-order views are
        dist.broadcast(in_memory_order(v.value.data), src=0)


def _synced_statistics(model: keras.Model):
    """Float non-trainable variables updated in the forward pass (BatchNorm moving statistics)."""
    return [v.value.data for v in model.non_trainable_variables
            if "float" in str(v.dtype) and ("moving_" in v.path or "moving_" in v.name)]


class GradientAllReduce:
    """Wraps ``optimizer.apply`` (``inner``, default the model's) so that it first averages
    gradients (and BatchNorm statistics) over all ranks. Installed by
    :func:`install_data_parallel`; under mixed_float16 it wraps the ``LossScaleOptimizer``, so a
    non-finite gradient on one rank reaches all of them and every rank skips the same step."""

    def __init__(self, model: keras.Model, context: DistributedContext, inner=None):
        self.model, self.context = model, context
        self.inner = inner or model.optimizer.apply

    def __call__(self, grads, trainable_variables=None):
        import torch

        grads = [torch.zeros_like(v.value) if g is None else g
                 for g, v in zip(grads, trainable_variables or self.model.trainable_variables)]
        all_reduce_(list(grads) + _synced_statistics(self.model), self.context.world_size)
        return self.inner(grads, trainable_variables)


def _reduce_metric_results(model: keras.Model, context: DistributedContext):
    """Wrap the model's end-of-epoch metric read-out so that it reports sums over all ranks.

    Keras metrics here accumulate sums and counts (Mean: total / count; the segmentation scores:
    a confusion matrix), so summing their variables over ranks gives the metric of the whole
    epoch. The local values are put back afterwards, so calling it twice does not double count.
    """
    def summed_over_ranks(original):
        def reduced(logs):
            values = [v.value.data for m in model.metrics for v in m.variables]
            local = [t.clone() for t in values]
            all_reduce_(values, context.world_size, mean=False)
            try:
                return original(logs)
            finally:
                for t, saved in zip(values, local):
                    t.copy_(saved)

        return reduced

    wrap_epoch_metrics(model, summed_over_ranks)


def install_data_parallel(model: keras.Model, context: DistributedContext | None = None) -> None:
    """Make a compiled model train data-parallel across the ranks of ``context``.

    Call after ``model.compile`` (and after restoring a checkpoint): it broadcasts rank 0's
    variables, wraps the optimizer's ``apply`` with :class:`GradientAllReduce` and makes the
    epoch metrics global. A no-op for a single process.
    """
    context = context or current_context()
    if not context.is_distributed:
        return
    if keras.backend.backend() != "torch":
        raise RuntimeError("install_data_parallel works on the torch backend only")
    if model.optimizer is None:
        raise ValueError("compile the model before install_data_parallel")
    broadcast_variables(model, context)
    wrap_optimizer_apply(model.optimizer, lambda apply: GradientAllReduce(model, context, apply))
    _reduce_metric_results(model, context)


def scaled_learning_rate(lr: float, world_size: int, rule: str) -> float:
    """The learning rate for a global batch ``world_size`` times the per-rank one: ``"none"``
    keeps it, ``"linear"`` multiplies by ``world_size`` (Goyal et al. 2017), ``"sqrt"`` by its
    square root (the usual choice for Adam-type optimizers)."""
    factors = {"none": 1.0, "linear": float(world_size), "sqrt": float(np.sqrt(world_size))}
    if rule not in factors:
        raise ValueError(f"lr_scaling must be one of {sorted(factors)}, got {rule!r}")
    return lr * factors[rule]
