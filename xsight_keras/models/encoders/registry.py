"""The encoder registry: encoders by name, and the by-name helpers the model builders use.

``register_encoder(encoder)`` adds an :class:`~xsight_keras.models.encoders.base.Encoder`;
``get_encoder("resnet34")`` returns it; ``available_encoders()`` lists the names. This module
imports neither Keras nor any encoder family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from xsight_keras.models.encoders.base import Encoder

#: Prefix of every encoder layer name inside a model (``enc_conv1``, ``enc_features_0_0``).
ENCODER_PREFIX = "enc_"

_ENCODERS: dict[str, Encoder] = {}


def register_encoder(encoder: Encoder, *, replace: bool = False) -> Encoder:
    """Make ``encoder`` available under ``encoder.name`` to every model builder; returns it.

    Registering a name twice is a ``ValueError`` unless ``replace=True``.
    """
    if encoder.name in _ENCODERS and not replace:
        raise ValueError(f"an encoder named {encoder.name!r} is already registered")
    _ENCODERS[encoder.name] = encoder
    return encoder


def available_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return sorted(_ENCODERS)


def get_encoder(name: str) -> Encoder:
    """The registered encoder ``name``; ``ValueError`` listing the available names otherwise."""
    try:
        return _ENCODERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown encoder {name!r}; choose one of {available_encoders()} "
            f"(or register one with xsight_keras.models.encoders.register_encoder)"
        ) from None


def build_encoder(
    name: str,
    input_channels: int = 3,
    weights: str | os.PathLike | None = None,
    input_size: tuple[int, int] | None = None,
):
    """Encoder ``name`` alone as a Functional Keras model; outputs the features in order of
    ascending stride (see :meth:`Encoder.build <xsight_keras.models.encoders.base.Encoder.build>`)."""
    return get_encoder(name).build(input_channels, weights, input_size)


def encoder_channels(encoder: str) -> tuple[int, ...]:
    """Channels of the features of ``encoder`` in order of ascending stride
    (for a ResNet the five skips at strides 2, 4, 8, 16, 32)."""
    return tuple(get_encoder(encoder).channels.values())


def find_imagenet_checkpoint(encoder: str, download: bool = False) -> Path:
    """Locate the torchvision ImageNet checkpoint of ``encoder`` in the torch hub cache;
    ``download=True`` fetches it there once when absent (:meth:`Encoder.find_imagenet_checkpoint <xsight_keras.models.encoders.base.Encoder.find_imagenet_checkpoint>`)."""
    return get_encoder(encoder).find_imagenet_checkpoint(download)


def load_encoder_weights(model, weights: str | os.PathLike, encoder: str = "resnet34",
                         prefix: str = ENCODER_PREFIX) -> list[str]:
    """Copy torchvision weights of ``encoder`` into the encoder layers of ``model`` (matched by
    name); ``weights`` is ``"imagenet"`` or a checkpoint path. Returns the layers filled
    (:meth:`Encoder.load_weights <xsight_keras.models.encoders.base.Encoder.load_weights>`)."""
    return get_encoder(encoder).load_weights(model, weights, prefix)
