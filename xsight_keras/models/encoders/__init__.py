"""Encoders by name: the interface (:mod:`.base`), the registry (:mod:`.registry`) and the families.

``get_encoder("resnet34").features(x)`` gives ``{stride: feature map}``; every model builder
takes any name in ``available_encoders()``. Adding an encoder family is one module here that
registers its encoders, plus its name on the import line below.
"""

# The encoder families: importing a module registers its encoders.
from xsight_keras.models.encoders import convnext, resnet  # noqa: F401
from xsight_keras.models.encoders.base import (
    ALLOWED_STRIDES,
    ENCODER_PREFIX,
    Checkpoint,
    Encoder,
    read_state_dict,
    torch_hub_checkpoint_dir,
)
from xsight_keras.models.encoders.download import CorruptDownloadError, WeightsDownloadError
from xsight_keras.models.encoders.registry import (
    available_encoders,
    build_encoder,
    encoder_channels,
    find_imagenet_checkpoint,
    get_encoder,
    load_encoder_weights,
    register_encoder,
)
from xsight_keras.models.encoders.resnet import (  # kept for user code written before the registry
    RESNET_SPECS,
    TORCHVISION_URLS,
    ResNet,
    resnet_encoder,
    resnet_features,
)

__all__ = [
    "ALLOWED_STRIDES",
    "ENCODER_PREFIX",
    "RESNET_SPECS",
    "TORCHVISION_URLS",
    "Checkpoint",
    "CorruptDownloadError",
    "Encoder",
    "ResNet",
    "WeightsDownloadError",
    "available_encoders",
    "build_encoder",
    "encoder_channels",
    "find_imagenet_checkpoint",
    "get_encoder",
    "load_encoder_weights",
    "read_state_dict",
    "register_encoder",
    "resnet_encoder",
    "resnet_features",
    "torch_hub_checkpoint_dir",
]
