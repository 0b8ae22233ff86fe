"""Every output a model can have, declared once: its name, channels, activation, the loss it is
trained with, its training target and its part in post-processing.

Model builders, the data loader, the training engine, the predictor, post-processing, evaluation
and callbacks read these declarations; no other module spells an output name. Adding a head
means a :class:`Head` subclass here (or in a module that registers one with :func:`register_head`)
and, if its loss is new, a loss in :mod:`xsight_keras.training.losses`' registry.

Outputs of the two model families:

- Attention U-Net: ``semantic`` alone (a tensor, not a dict, so ``model.fit(x, y)`` works as in
  plain Keras), or ``{"semantic", "instance"}`` with an instance head.
- PGU-Net stage k: ``fused`` (the semantic map: the mean of every level's logits) and
  ``scale_{s}`` for s = 1, 2, …, 2^(k-1) (deep supervision at 1/s resolution), plus ``instance``.

``semantic``, ``fused`` and ``scale_{s}`` are all class maps (:class:`ClassMapHead`); the predictor
reports the model's primary class map (``fused`` or ``semantic``) under :data:`SEMANTIC`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SEMANTIC = "semantic"
FUSED = "fused"
INSTANCE = "instance"
_SCALE_PREFIX = "scale_"


def scale_output(scale: int) -> str:
    """Name of PGU-Net's deep-supervision output at 1/``scale`` resolution (``scale_2``)."""
    return f"{_SCALE_PREFIX}{int(scale)}"


def scale_of(name: str) -> int | None:
    """The scale of a ``scale_{s}`` output name, ``None`` for any other name."""
    if name.startswith(_SCALE_PREFIX) and name[len(_SCALE_PREFIX):].isdigit():
        return int(name[len(_SCALE_PREFIX):])
    return None


class Head:
    """One kind of model output.

    ``name``: the output name (also the name of the layer that produces it). ``channels``: the
    number of channels, ``None`` for one per class. ``loss``: the key of the loss in
    :data:`xsight_keras.training.losses.LOSSES` (``None``: the run's configured segmentation loss).
    ``loss_weight_setting``: the :class:`~xsight_keras.config.RunConfig` field with its weight.
    """

    name: str = ""
    channels: int | None = None
    loss: str | None = None
    loss_weight_setting: str | None = None
    needs_instances = True  # whether its target is computed from the instance map

    def activation(self, num_classes: int) -> str:
        return "sigmoid"

    def target(self, instances: np.ndarray) -> np.ndarray:
        """float32 (H, W, channels) training target from an int instance map (H, W)."""
        raise NotImplementedError(f"head {self.name!r} has no target from instance maps")

    def build(self, features, filters: int):
        """The head's layers on decoder features (a Keras tensor); returns its float32 output."""
        raise NotImplementedError(f"head {self.name!r} is built by the model family")

    def markers(self, foreground: np.ndarray, maps: np.ndarray, config):
        """Post-processing: (nucleus cores bool (H, W), flooding surface float (H, W), low where a
        nucleus' centre is) from this head's predicted maps (H, W, channels); ``None`` when the
        head takes no part in separating nuclei."""
        return None


class ClassMapHead(Head):
    """Class probabilities: softmax over classes, or one sigmoid channel for binary masks.
    Target: one-hot (or binary) class maps, made by the loader from the class map."""

    channels = None
    needs_instances = False

    def __init__(self, name: str):
        self.name = name

    def activation(self, num_classes: int) -> str:
        return "sigmoid" if num_classes == 1 else "softmax"


class InstanceHead(Head):
    """Two sigmoid channels that separate touching nuclei: 0 = distance to the nucleus border
    normalised to 1 at its centre, 1 = contour probability. Loss: :class:`InstanceLoss`
    (``distance_contour``), weighted by ``instance_loss_weight``. Post-processing: markers are the
    confident cores (distance > ``dist_threshold`` and contour < ``contour_threshold``)."""

    name = INSTANCE
    channels = 2
    loss = "distance_contour"
    loss_weight_setting = "instance_loss_weight"

    def target(self, instances: np.ndarray) -> np.ndarray:
        """float32 (H, W, 2) from an instance map (H, W): the normalised distance (touching
        nuclei are kept apart by cutting their shared border first) and the inner boundary
        (pixels with a 4-neighbour of another id); 0 outside nuclei."""
        inst = instances.astype(np.int32)
        padded = np.pad(inst, 1, mode="edge")
        differs = np.zeros(inst.shape, bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            differs |= padded[dy:dy + inst.shape[0], dx:dx + inst.shape[1]] != inst
        contour = differs & (inst > 0)
        distance = ndimage.distance_transform_edt((inst > 0) & ~contour)
        top = int(inst.max())
        if top:
            peaks = ndimage.maximum(distance, inst, index=np.arange(top + 1))
            peaks = np.where(np.asarray(peaks) > 0, peaks, 1.0)
            distance = distance / peaks[inst]
        out = np.stack([distance, contour], axis=-1).astype(np.float32)
        out[inst == 0] = 0.0
        return out

    def build(self, features, filters: int):
        """conv+BN+ReLU (``instance_block``), a 1×1 conv (``instance_head``) and a float32
        sigmoid named ``instance``."""
        from keras import layers

        from xsight_keras.models.fused_layers import TorchOrderConv2D
        from xsight_keras.models.layers import conv_bn_relu

        x = conv_bn_relu(features, filters, "instance_block")
        x = TorchOrderConv2D(self.channels, 1, name="instance_head")(x)
        return layers.Activation("sigmoid", dtype="float32", name=self.name)(x)

    def markers(self, foreground, maps, config):
        distance = maps[..., 0]
        cores = foreground & (distance > config.dist_threshold) & (maps[..., 1] < config.contour_threshold)
        return cores, -distance


HEADS: dict[str, Head] = {}


def register_head(head: Head) -> Head:
    """Declare a head (its ``name`` must be new); returns it."""
    if head.name in HEADS:
        raise ValueError(f"a head named {head.name!r} is already declared")
    HEADS[head.name] = head
    return head


register_head(ClassMapHead(SEMANTIC))
register_head(ClassMapHead(FUSED))
register_head(InstanceHead())


def get_head(name: str) -> Head:
    """The declaration of output ``name`` (``scale_{s}`` outputs are class maps)."""
    if name in HEADS:
        return HEADS[name]
    if scale_of(name) is not None:
        return ClassMapHead(name)
    raise ValueError(f"unknown model output {name!r}; declared heads: {sorted(HEADS)}")


def is_class_map(name: str) -> bool:
    """Whether output ``name`` holds class probabilities (``semantic``, ``fused``, ``scale_s``)."""
    return isinstance(get_head(name), ClassMapHead)


def extra_heads(instance_head: bool = False, names=()) -> list[Head]:
    """The heads a model gets besides its class maps: the instance head when ``instance_head``,
    and the declared heads ``names`` (in that order, each once)."""
    wanted = ([INSTANCE] if instance_head else []) + list(names or ())
    heads = []
    for name in dict.fromkeys(wanted):
        head = get_head(name)
        if isinstance(head, ClassMapHead):
            raise ValueError(f"{name!r} is a class map, not an extra head")
        heads.append(head)
    return heads


def output_names(model_or_outputs) -> list[str]:
    """Output names of a Keras model (or of a model's ``output`` structure): a single tensor
    output is the ``semantic`` class map."""
    outputs = getattr(model_or_outputs, "output", model_or_outputs)
    if isinstance(outputs, dict):
        return list(outputs)
    return [SEMANTIC]


def primary_class_map(names) -> str:
    """The output that is the model's class map: ``fused`` (PGU-Net) or ``semantic``."""
    names = list(names)
    for name in (FUSED, SEMANTIC):
        if name in names:
            return name
    raise ValueError(f"the model has no class-map output ({FUSED!r} or {SEMANTIC!r}): {names}")


def as_output_dict(model_or_outputs, values) -> dict:
    """A model's prediction (a tensor, or a dict) as a dict keyed by output name."""
    if isinstance(values, dict):
        return dict(values)
    return {output_names(model_or_outputs)[0]: values}


__all__ = ["FUSED", "HEADS", "INSTANCE", "SEMANTIC", "ClassMapHead", "Head", "InstanceHead",
           "as_output_dict", "extra_heads", "get_head", "is_class_map", "output_names",
           "primary_class_map", "register_head", "scale_of", "scale_output"]
