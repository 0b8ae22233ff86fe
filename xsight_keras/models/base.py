"""Models that know their configuration.

A :class:`SegmentationModel` is a Functional Keras model whose constructor is its builder
(KerasHub's pattern): ``get_config()`` returns the constructor's arguments, so a saved ``.keras``
file is rebuilt by the same code and can say what it is (``family``, encoder, stage, heads,
data format) without anyone parsing layer names; :func:`describe_model` reads it.

Builders take ``data_format`` explicitly. ``None`` picks the fast layout for the backend:
``channels_first`` on torch (cuDNN and oneDNN kernels are NCHW; measured in the README's
Performance section), Keras' configured image data format elsewhere. The layers of a model are
created under its data format and dtype policy; Keras' global settings are restored afterwards.
"""

from __future__ import annotations

import contextlib

import keras

from xsight_keras._backend import default_data_format, resolve_data_format
from xsight_keras.models.lean_graph import LeanGraph, lean_by_default, lean_call_applies


@contextlib.contextmanager
def building(data_format: str, dtype_policy: str | None = None):
    """Create layers under ``data_format`` (and ``dtype_policy`` if given), then restore Keras'
    global image data format and dtype policy, whatever happens."""
    previous_format, previous_policy = keras.config.image_data_format(), keras.config.dtype_policy()
    keras.config.set_image_data_format(data_format)
    if dtype_policy is not None:
        keras.config.set_dtype_policy(dtype_policy)
    try:
        yield
    finally:
        keras.config.set_image_data_format(previous_format)
        keras.config.set_dtype_policy(previous_policy)


class SegmentationModel(keras.Model):
    """Base of the model families: a Functional model built by its constructor.

    Subclasses implement ``_graph(**arguments) -> (inputs, outputs)`` and list their
    constructor arguments in ``ARGUMENTS`` (name → default); ``family`` names the family.
    """

    family = ""
    ARGUMENTS: dict = {}

    def __init__(self, *, name=None, data_format=None, dtype_policy=None, trainable=True,
                 **arguments):
        unknown = set(arguments) - set(self.ARGUMENTS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        arguments = {**self.ARGUMENTS, **arguments}
        data_format = resolve_data_format(data_format)
        with building(data_format, dtype_policy):
            inputs, outputs = self._graph(**arguments)
            policy = keras.config.dtype_policy().name
        super().__init__(inputs, outputs, name=name or self._default_name(**arguments),
                         trainable=trainable)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}
        object.__setattr__(self, "_arguments", {**config, "data_format": data_format,
                                                 "dtype_policy": policy})
        object.__setattr__(self, "_lean", None)  # the LeanGraph, planned at the first call
        object.__setattr__(self, "lean_execution", lean_by_default())

    def call(self, inputs, training=None, mask=None):
        """Keras' Functional call; on the torch backend, eager calls on a tensor run through a
        :class:`~xsight_keras.models.lean_graph.LeanGraph` (same results, without Keras'
        per-layer bookkeeping) unless ``model.lean_execution`` is False (its default comes
        from :func:`~xsight_keras.models.lean_graph.lean_by_default`)."""
        if self.lean_execution and lean_call_applies(inputs, mask):
            if self._lean is None or (self._lean and not self._lean.is_current()):
                object.__setattr__(self, "_lean", LeanGraph.plan(self) or False)
            if self._lean and self._lean.takes(inputs):
                return self._lean.run(inputs, training)
        return super().call(inputs, training=training, mask=mask)

    def _graph(self, **arguments):
        raise NotImplementedError

    def _default_name(self, **arguments) -> str:
        return self.family

    @property
    def arguments(self) -> dict:
        """The constructor arguments this model was built with (a copy)."""
        return dict(self._arguments)

    @property
    def data_format(self) -> str:
        return self._arguments["data_format"]

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, **self.arguments}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def clone_architecture(model: keras.Model) -> keras.Model:
    """A new model with ``model``'s architecture and fresh weights: rebuilt from its
    configuration (same class, data format, dtype policy) for a :class:`SegmentationModel`,
    ``keras.models.clone_model`` otherwise."""
    if isinstance(model, SegmentationModel):
        return type(model).from_config(model.get_config())
    return keras.models.clone_model(model)


def model_data_format(model: keras.Model) -> str:
    """The image data format a model was built with: its recorded one for a
    :class:`SegmentationModel`, else that of its first layer that has one."""
    if isinstance(model, SegmentationModel):
        return model.data_format
    from xsight_keras.compat import all_layers

    for layer in all_layers(model, include_self=False):
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_first", "channels_last"):
            return fmt
    return keras.config.image_data_format()


def describe_model(model: keras.Model) -> dict:
    """What a model is: ``{"family", "data_format", "heads", ...its builder arguments}``.

    Models built by this package carry this in their configuration; for ``.keras`` files saved
    before models kept it, the PGU-Net's arguments are recovered from its layers and other
    models report only ``family`` (``"unknown"``), data format and outputs.
    """
    from xsight_keras.heads import output_names

    if isinstance(model, SegmentationModel):
        return {"family": model.family, **model.arguments, "outputs": output_names(model)}
    from xsight_keras.models.progressive_unet import progressive_unet_spec

    try:
        return {"family": "progressive_unet", **progressive_unet_spec(model),
                "outputs": output_names(model)}
    except ValueError:
        pass
    return {"family": "unknown", "data_format": model_data_format(model),
            "outputs": output_names(model)}


__all__ = ["SegmentationModel", "building", "clone_architecture", "model_data_format", "default_data_format", "describe_model",
           "resolve_data_format"]
