"""Every output a model can have, declared once: its name, channels, activation, the loss it is
trained with, its training target and its part in post-processing.

Model builders, the data loader, the training engine, the predictor, post-processing, evaluation
and callbacks read these declarations; no other module spells an output name. Adding a head
means a :class:`Head` subclass here (or in a module that registers one with :func:`register_head`)
and, if its loss is new, a loss in :mod:`xsight_keras.training.losses`' registry.

Outputs of the two model families:

- Attention U-Net: ``semantic`` alone (a tensor, not a dict, so ``model.fit(x, y)`` works as in
  plain Keras), or ``{"semantic", "instance"}`` with an instance head (and ``hv``, or any other
  declared head, when asked for by name).
- PGU-Net stage k: ``fused`` (the semantic map: the mean of every level's logits) and
  ``scale_{s}`` for s = 1, 2, …, 2^(k-1) (deep supervision at 1/s resolution), plus ``instance``
  (and the named heads).

``semantic``, ``fused`` and ``scale_{s}`` are all class maps (:class:`ClassMapHead`); the predictor
reports the model's primary class map (``fused`` or ``semantic``) under :data:`SEMANTIC`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SEMANTIC = "semantic"
FUSED = "fused"
INSTANCE = "instance"
HV = "hv"
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
    #: The post-processing settings (:class:`~xsight_keras.inference.instances.PostprocessConfig`
    #: fields) that :meth:`markers` reads, with the values tuning tries; empty for a head that
    #: takes no part in separating nuclei.
    tuning_grid: dict[str, tuple] = {}

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

    def channel_transform(self, k: int):
        """How test-time augmentation's symmetry ``k`` (0–7, as in
        :func:`xsight_keras.inference.tta.apply_transform`: ``k // 4`` mirrors left–right, then
        ``k % 4`` quarter turns) acts on this head's channels, to be undone after the maps are
        moved back in space (:func:`~xsight_keras.inference.tta.invert_transform`).

        ``None`` (the default): the channels are scalars per pixel (probabilities, distances,
        contours) that only move with their pixels. Otherwise ``(index, sign)``, two sequences of
        length ``channels``: channel ``c`` of the restored map is ``sign[c] * maps[..., index[c]]``
        (direction fields such as :class:`HoverHead`'s change sign and swap under the symmetry)."""
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
    tuning_grid = {"dist_threshold": (0.3, 0.4, 0.5, 0.6, 0.7), "contour_threshold": (0.3, 0.5, 0.7)}

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
        return _conv_head(features, filters, self.name, self.channels, "sigmoid")

    def markers(self, foreground, maps, config):
        distance = maps[..., 0]
        cores = foreground & (distance > config.dist_threshold) & (maps[..., 1] < config.contour_threshold)
        return cores, -distance


def _conv_head(features, filters: int, name: str, channels: int, activation: str):
    """conv+BN+ReLU (``{name}_block``), a 1×1 conv to ``channels`` (``{name}_head``) and a
    float32 ``activation`` layer named ``name``: the output layer of a head."""
    from keras import layers

    from xsight_keras.models.fused_layers import TorchOrderConv2D
    from xsight_keras.models.layers import conv_bn_relu

    x = conv_bn_relu(features, filters, f"{name}_block")
    x = TorchOrderConv2D(channels, 1, name=f"{name}_head")(x)
    return layers.Activation(activation, dtype="float32", name=name)(x)


def hover_maps(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net's horizontal and vertical maps (Graham et al. 2019) of an instance map.

    ``instances`` int (H, W), 0 = background, any positive ids (not necessarily contiguous);
    pieces of one id that do not touch (8-connectivity, also through other nuclei) count as
    separate nuclei.
    Returns float32 (H, W, 2): channel 0 the horizontal offset (x, to the right) of every
    nucleus pixel from its nucleus' centre of mass, channel 1 the vertical one (y, downwards);
    in each nucleus and each direction, negative offsets are divided by the largest negative
    magnitude and positive ones by the largest positive, so each channel spans [−1, 1] and
    reaches −1 and 1 (unless the nucleus is one pixel wide in that direction); 0 outside nuclei.
    The centre of mass is not rounded: a nucleus symmetric about its centre gets antisymmetric
    maps, and at most one pixel of it (its exact centre) is 0 in both channels.

    Cost: a few passes over the nucleus pixels for all nuclei together (their extents come from
    :func:`scipy.ndimage.find_objects`), about 2 ms for a 256×256 crop with 60 nuclei.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"expected an (H, W) instance map, got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        inst = inst.astype(np.int64)
    out = np.zeros(inst.shape + (2,), np.float32)
    ys, xs = np.nonzero(inst)
    if ys.size == 0:
        return out
    # each connected piece of an id is a nucleus of its own: augmentation that fills borders by
    # reflection (the loader's affine transform) gives a nucleus near the border a detached
    # mirror copy with the same id, and one centre for both would be wrong for each
    blobs, _ = ndimage.label(inst > 0, structure=np.ones((3, 3), bool))
    key = inst[ys, xs].astype(np.int64) * (int(blobs.max()) + 1) + blobs[ys, xs]
    ids = np.unique(key, return_inverse=True)[1].reshape(-1).astype(np.intp) + 1
    inst = np.zeros(inst.shape, np.intp)
    inst[ys, xs] = ids
    boxes = ndimage.find_objects(inst)
    top = len(boxes)
    # per id (index 0 unused): first and last row/column; ids without pixels keep zeros
    extent = np.zeros((top + 1, 4))
    extent[1:] = [(b[0].start, b[0].stop - 1, b[1].start, b[1].stop - 1) if b is not None
                  else (0, 0, 0, 0) for b in boxes]
    counts = np.maximum(np.bincount(ids, minlength=top + 1), 1)
    for channel, (coords, first, last) in enumerate(((xs, 2, 3), (ys, 0, 1))):
        centre = np.bincount(ids, weights=coords, minlength=top + 1) / counts
        # tight boxes: the largest offsets of a nucleus are its extent's ends minus its centre
        below, above = centre - extent[:, first], extent[:, last] - centre
        offset = coords - centre[ids]
        scale = np.where(offset > 0, above[ids], below[ids])
        out[ys, xs, channel] = np.divide(offset, scale, out=np.zeros_like(offset), where=scale > 0)
    return out


def _minmax_complement(values: np.ndarray) -> np.ndarray:
    """``(max − v) / (max − min)`` over the whole array: 1 where ``v`` is lowest, 0 where it is
    highest; zeros when ``values`` is constant."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (hi - values) / (hi - lo)


class HoverHead(Head):
    """HoVer-Net's horizontal and vertical distance maps (Graham et al., "HoVer-Net", Medical
    Image Analysis 2019): two linear float32 channels, 0 = horizontal, 1 = vertical offset of
    each nucleus pixel from its centre of mass, scaled to [−1, 1] per nucleus
    (:func:`hover_maps`). Linear like HoVer-Net's rather than tanh: the targets reach ±1 at
    every nucleus' rim, which a tanh would approach only with vanishing gradients.

    Loss: :class:`~xsight_keras.training.losses.HoverLoss` (``hover``: MSE of the maps plus MSE
    of their Sobel gradients on nucleus pixels), weighted by ``hover_loss_weight``.
    Post-processing (:meth:`markers`): where two nuclei touch, the horizontal map falls from +1
    to −1 along x (or the vertical one along y), so the Sobel derivative is most negative there.
    """

    name = HV
    channels = 2
    loss = "hover"
    loss_weight_setting = "hover_loss_weight"
    tuning_grid = {"contour_threshold": (0.3, 0.35, 0.4, 0.45, 0.5, 0.6)}  # the energy only
    sobel_size = 21  # HoVer-Net's Sobel kernel for the energy: a binomial smoothing, σ ≈ 2.2 px

    def activation(self, num_classes: int) -> str:
        return "linear"

    def target(self, instances: np.ndarray) -> np.ndarray:
        """float32 (H, W, 2), see :func:`hover_maps`."""
        return hover_maps(instances)

    def build(self, features, filters: int):
        """conv+BN+ReLU (``hv_block``), a 1×1 conv (``hv_head``) and a float32 linear output
        named ``hv``."""
        return _conv_head(features, filters, self.name, self.channels, "linear")

    def energy(self, maps: np.ndarray, sobel_size: int | None = None) -> np.ndarray:
        """float32 (H, W) in [0, 1], high where nuclei meet, from predicted maps (H, W, 2).

        The horizontal map's derivative along x and the vertical map's along y (Sobel,
        ``sobel_size`` × ``sobel_size``, odd, at most 31; default :attr:`sobel_size`, whose
        smoothing is below a nucleus' radius at 40×) are each rescaled over the image so that
        the most negative derivative (a fall from +1 to −1 between two nuclei) gives 1 and the
        most positive (a nucleus' inside) 0; the energy is the larger of the two."""
        import cv2

        sobel_size = self.sobel_size if sobel_size is None else int(sobel_size)
        if sobel_size % 2 != 1 or not 1 <= sobel_size <= 31:
            raise ValueError(f"sobel_size must be odd and in [1, 31], got {sobel_size}")
        h = np.ascontiguousarray(maps[..., 0], np.float32)
        v = np.ascontiguousarray(maps[..., 1], np.float32)
        dx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=sobel_size)
        dy = cv2.Sobel(v, cv2.CV_32F, 0, 1, ksize=sobel_size)
        return np.maximum(_minmax_complement(dx), _minmax_complement(dy))

    def markers(self, foreground, maps, config):
        """HoVer-Net's markers: the foreground where the energy (:meth:`energy`) is below
        ``config.contour_threshold`` (the threshold on boundary evidence that the instance head
        applies to its contour probability; HoVer-Net used 0.4), holes filled and opened with a
        disc of radius 2 (thin bridges between nuclei cut). The flooding surface is the energy
        inside the foreground (1 outside), lightly smoothed: basins at nucleus centres, ridges
        where nuclei meet."""
        energy = self.energy(maps)
        cores = foreground & (energy < config.contour_threshold)
        cores = ndimage.binary_fill_holes(cores) & foreground
        disc = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
        cores = ndimage.binary_opening(cores, structure=disc)
        surface = ndimage.gaussian_filter(np.where(foreground, energy, 1.0).astype(np.float32), 1.0)
        return cores, surface

    def channel_transform(self, k: int):
        """The maps are a direction field (x, y): a left–right mirror negates x and a quarter
        turn maps (x, y) to (y, −x); restoring applies the inverse (the transpose) of
        ``turn^(k % 4) · mirror^(k // 4)``."""
        mirror = np.array([[-1, 0], [0, 1]])
        turn = np.array([[0, 1], [-1, 0]])
        forward = np.linalg.matrix_power(turn, k % 4) @ np.linalg.matrix_power(mirror, k // 4)
        back = forward.T
        index = np.abs(back).argmax(axis=1)
        return tuple(int(i) for i in index), tuple(int(back[c, i]) for c, i in enumerate(index))


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
register_head(HoverHead())


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


def separating_head(names) -> Head | None:
    """The head among output ``names`` whose markers separate nuclei (the first with a
    :attr:`Head.tuning_grid`, as post-processing takes the first that gives markers); ``None``."""
    for name in names:
        if not is_class_map(name) and get_head(name).tuning_grid:
            return get_head(name)
    return None


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


__all__ = ["FUSED", "HEADS", "HV", "INSTANCE", "SEMANTIC", "ClassMapHead", "Head", "HoverHead",
           "InstanceHead", "as_output_dict", "extra_heads", "get_head", "hover_maps",
           "is_class_map", "output_names", "primary_class_map", "register_head", "scale_of",
           "scale_output", "separating_head"]
