"""Training engine: losses, metrics, schedules, callbacks and one run end to end (``run.train``)."""

from xsight_keras.training.callbacks import (
    BestCheckpoint,
    ExponentialMovingAverage,
    ScheduleLogger,
    StochasticWeightAveraging,
    TensorBoardLogger,
    plot_history,
    save_model_atomically,
    update_batch_norm,
)
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
from xsight_keras.training.schedules import OneCycle, WarmupCosine

__all__ = [
    "BCEDiceLoss", "BestCheckpoint", "BoundaryLoss", "ExponentialMovingAverage", "FocalLoss",
    "HybridLoss", "InstanceLoss", "OneCycle", "ScheduleLogger", "SegmentationScore", "SoftDiceLoss",
    "StochasticWeightAveraging", "TensorBoardLogger", "WarmupCosine", "class_weights_from_counts",
    "multiscale_losses", "plot_history", "save_model_atomically", "segmentation_metrics",
    "update_batch_norm",
]
