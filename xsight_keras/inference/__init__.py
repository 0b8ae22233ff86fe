"""Inference: whole-image sliding-window prediction and test-time augmentation."""

from xsight_keras.inference.predictor import (
    Predictor,
    blending_window,
    load_model_file,
    model_data_format,
)
from xsight_keras.inference.tta import apply_transform, invert_transform, parse_transforms

__all__ = ["Predictor", "apply_transform", "blending_window", "invert_transform",
           "load_model_file", "model_data_format", "parse_transforms"]
