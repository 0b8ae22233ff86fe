"""Model families: Attention U-Net on any registered encoder, and the Progressive Growing U-Net."""

from xsight_keras.models.attention_unet import SIZE_MULTIPLE, AttentionUNet, attention_unet
from xsight_keras.models.base import SegmentationModel, default_data_format, describe_model
from xsight_keras.models.encoders import (
    RESNET_SPECS,
    Encoder,
    available_encoders,
    build_encoder,
    encoder_channels,
    find_imagenet_checkpoint,
    get_encoder,
    load_encoder_weights,
    read_state_dict,
    register_encoder,
    resnet_encoder,
    resnet_features,
)
from xsight_keras.models.fade_in import FadeIn, FadeInMean, fade_alpha, set_fade
from xsight_keras.models.fused_layers import (
    FusedBatchNormalization,
    FusedUpSampling2D,
    TorchOrderConv2D,
    match_optimizer_layout,
    store_kernel_in_torch_order,
)
from xsight_keras.models.layers import SpatialSizeCheck, attention_gate, conv_bn_relu
from xsight_keras.models.progressive_unet import (
    STAGE_RESOLUTIONS,
    ProgressiveUNet,
    grow,
    inference_view,
    progressive_unet,
    progressive_unet_spec,
    settle,
)
from xsight_keras.models.transfer import transfer_weights

__all__ = [
    "AttentionUNet",
    "FadeIn",
    "FadeInMean",
    "ProgressiveUNet",
    "SegmentationModel",
    "default_data_format",
    "describe_model",
    "RESNET_SPECS",
    "SIZE_MULTIPLE",
    "STAGE_RESOLUTIONS",
    "Encoder",
    "FusedBatchNormalization",
    "FusedUpSampling2D",
    "SpatialSizeCheck",
    "TorchOrderConv2D",
    "attention_gate",
    "attention_unet",
    "available_encoders",
    "build_encoder",
    "conv_bn_relu",
    "encoder_channels",
    "fade_alpha",
    "find_imagenet_checkpoint",
    "get_encoder",
    "grow",
    "inference_view",
    "load_encoder_weights",
    "match_optimizer_layout",
    "progressive_unet",
    "progressive_unet_spec",
    "read_state_dict",
    "register_encoder",
    "resnet_encoder",
    "resnet_features",
    "set_fade",
    "settle",
    "store_kernel_in_torch_order",
    "transfer_weights",
]
