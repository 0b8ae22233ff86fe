"""Training engine: losses, metrics, schedules, callbacks and one run end to end (``run.train``)."""

from xsight_keras.training.callbacks import (
    BestCheckpoint,
    ExponentialMovingAverage,
    PreciseBatchNorm,
    ScheduleLogger,
    StochasticWeightAveraging,
    TensorBoardLogger,
    plot_history,
    save_model_atomically,
    update_batch_norm,
)
from xsight_keras.training.distributed import (
    DistributedContext,
    init_distributed,
    install_data_parallel,
    shutdown_distributed,
)
from xsight_keras.training.loss_scale import DeviceLossScaleOptimizer
from xsight_keras.training.losses import (
    BCEDiceLoss,
    BoundaryLoss,
    FocalLoss,
    HybridLoss,
    InstanceLoss,
    SoftDiceLoss,
    class_weights_from_counts,
    multiscale_losses,
)
from xsight_keras.training.metrics import SegmentationScore, segmentation_metrics
from xsight_keras.training.optimizers import FusedAdam, FusedAdamW
from xsight_keras.training.schedules import OneCycle, WarmupCosine
from xsight_keras.training.state import SyncLoaderEpoch

__all__ = [
    "BCEDiceLoss", "BestCheckpoint", "BoundaryLoss", "DeviceLossScaleOptimizer", "DistributedContext",
    "ExponentialMovingAverage", "FocalLoss", "FusedAdam", "FusedAdamW", "HybridLoss",
    "InstanceLoss", "OneCycle", "PreciseBatchNorm",
    "ScheduleLogger", "SegmentationScore", "SoftDiceLoss", "StochasticWeightAveraging",
    "SyncLoaderEpoch", "TensorBoardLogger", "WarmupCosine", "class_weights_from_counts",
    "init_distributed", "install_data_parallel", "multiscale_losses", "plot_history",
    "save_model_atomically", "segmentation_metrics", "shutdown_distributed", "update_batch_norm",
]
