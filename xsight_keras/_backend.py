"""Choose the Keras backend before Keras is imported.

Keras 3 defaults to TensorFlow, which this project does not install, and writes
``"backend": "tensorflow"`` into ``~/.keras/keras.json`` on its first import. When
``KERAS_BACKEND`` is unset and ``keras.json`` names no backend, or names TensorFlow while
TensorFlow is not installed, the PyTorch backend is selected. Any other choice the user made
is kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

DEFAULT_BACKEND = "torch"


def _keras_json_backend() -> str | None:
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home is None:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_home = os.path.join(base, ".keras")
    path = Path(keras_home) / "keras.json"
    try:
        return json.loads(path.read_text()).get("backend")
    except (OSError, ValueError):
        return None


def ensure_default_backend() -> str:
    """Set ``KERAS_BACKEND=torch`` unless the user chose a backend; return the backend in force.

    Has no effect once ``keras`` is imported (the backend is fixed at import).
    """
    if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ:
        chosen = _keras_json_backend()
        tensorflow_missing = importlib.util.find_spec("tensorflow") is None
        if chosen is None or (chosen == "tensorflow" and tensorflow_missing):
            os.environ["KERAS_BACKEND"] = DEFAULT_BACKEND
    import keras

    return keras.backend.backend()


def default_data_format() -> str:
    """The image layout the package uses when a caller gives none: ``channels_first`` on the
    torch backend (PyTorch's convolution kernels are NCHW; measured faster in the README's
    Performance section), Keras' configured ``image_data_format()`` on other backends."""
    import keras

    if keras.backend.backend() == "torch":
        return "channels_first"
    return keras.config.image_data_format()


def resolve_data_format(data_format: str | None) -> str:
    """``data_format``, or :func:`default_data_format` when ``None``; anything else than
    ``channels_first``/``channels_last`` is a ``ValueError``."""
    data_format = data_format or default_data_format()
    if data_format not in ("channels_first", "channels_last"):
        raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
    return data_format
