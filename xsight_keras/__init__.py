"""xsight-keras: nucleus segmentation for histopathology with Keras 3 (PyTorch backend first).

Importing this package selects the PyTorch backend when the user has not chosen one (see
``xsight_keras._backend``) and registers every custom Keras object, so saved ``.keras`` files
load with ``keras.models.load_model`` after ``import xsight_keras``.
"""

from xsight_keras._backend import ensure_default_backend

ensure_default_backend()

from xsight_keras.data import (
    PreparedDataset,
    PreprocessConfig,
    SegmentationDataset,
    make_loader,
    preprocess_image,
)
from xsight_keras.models import (
    SpatialSizeCheck,
    attention_unet,
    grow,
    inference_view,
    progressive_unet,
    resnet_encoder,
    settle,
    transfer_weights,
)
from xsight_keras.training import (
    BCEDiceLoss,
    BestCheckpoint,
    BoundaryLoss,
    ExponentialMovingAverage,
    FocalLoss,
    FusedAdam,
    FusedAdamW,
    HybridLoss,
    OneCycle,
    PreciseBatchNorm,
    SegmentationScore,
    SoftDiceLoss,
    StochasticWeightAveraging,
    SyncLoaderEpoch,
    WarmupCosine,
    class_weights_from_counts,
    init_distributed,
    install_data_parallel,
    multiscale_losses,
    segmentation_metrics,
    update_batch_norm,
)

__version__ = "0.1.0"

__all__ = [
    "BCEDiceLoss",
    "BestCheckpoint",
    "BoundaryLoss",
    "ExponentialMovingAverage",
    "FocalLoss",
    "FusedAdam",
    "FusedAdamW",
    "HybridLoss",
    "OneCycle",
    "PreciseBatchNorm",
    "PreparedDataset",
    "PreprocessConfig",
    "SegmentationDataset",
    "SegmentationScore",
    "SoftDiceLoss",
    "SpatialSizeCheck",
    "StochasticWeightAveraging",
    "SyncLoaderEpoch",
    "WarmupCosine",
    "__version__",
    "attention_unet",
    "class_weights_from_counts",
    "grow",
    "inference_view",
    "init_distributed",
    "install_data_parallel",
    "make_loader",
    "multiscale_losses",
    "preprocess_image",
    "progressive_unet",
    "resnet_encoder",
    "segmentation_metrics",
    "settle",
    "transfer_weights",
    "update_batch_norm",
]
