"""xsight-keras: nucleus segmentation for histopathology with Keras 3 (PyTorch backend first).

Importing this package selects the PyTorch backend when the user has not chosen one (see
``xsight_keras._backend``) and registers every custom Keras object, so saved ``.keras`` files
load with ``keras.models.load_model`` after ``import xsight_keras``.
"""

from xsight_keras._backend import ensure_default_backend

ensure_default_backend()

from xsight_keras.models import (  # noqa: E402
    SpatialSizeCheck,
    attention_unet,
    grow,
    inference_view,
    progressive_unet,
    resnet_encoder,
    transfer_weights,
)

__version__ = "0.1.0"

__all__ = [
    "SpatialSizeCheck",
    "__version__",
    "attention_unet",
    "grow",
    "inference_view",
    "progressive_unet",
    "resnet_encoder",
    "transfer_weights",
]
