"""Whole-image prediction: the run's preprocessing, overlapping tiles in batches, smooth blending,
optional test-time augmentation. Memory is bounded by one batch of tiles plus the output map."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from xsight_keras.compat import torch_tensor
from xsight_keras.data.images import resize_image
from xsight_keras.data.loader import parse_schedule
from xsight_keras.data.preprocess import PreprocessConfig, preprocess_image
from xsight_keras.heads import (
    INSTANCE,
    SEMANTIC,
    as_output_dict,
    get_head,
    is_class_map,
    output_names,
    primary_class_map,
)
from xsight_keras.inference.tta import apply_transform, invert_transform, parse_transforms
from xsight_keras.models.base import model_data_format
from xsight_keras.models.progressive_unet import STAGE_RESOLUTIONS
from xsight_keras.rundir import RunDir, load_model_file


def predict_batch(model: keras.Model, x: np.ndarray):
    """``model.predict_on_batch(x)`` for any batch size, also under a Keras distribution.

    Keras' ``DataParallel`` (JAX) splits a batch evenly over its devices and refuses a batch that
    does not divide; this pads the batch with copies of its last image up to a multiple of the
    device count and drops the padded outputs. Returns what the model returns (array or dict).
    """
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    devices = len(distribution.device_mesh.devices.flatten()) if distribution is not None else 1
    n = len(x)
    if n % devices:
        x = np.concatenate([x, np.repeat(x[-1:], devices - n % devices, axis=0)])
    y = model.predict_on_batch(x)
    return keras.tree.map_structure(lambda v: v[:n], y) if len(x) != n else y


def _by_role(model: keras.Model, y) -> dict:
    """The model's outputs ``y`` keyed by role: the class probabilities under
    :data:`~xsight_keras.heads.SEMANTIC` (a PGU-Net's ``fused`` map) and every other head's
    maps under its name; PGU-Net's deep-supervision ``scale_{s}`` outputs are left out."""
    y = as_output_dict(model, y)
    maps = {SEMANTIC: y[primary_class_map(y)]}
    maps.update((name, v) for name, v in y.items() if not is_class_map(name))
    return maps


def predict_maps(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Model outputs for a batch ``x`` (in the model's layout), as float32 channels-last arrays
    (N, H, W, C) keyed by role (see ``_by_role``)."""
    channels_first = model_data_format(model) == "channels_first"
    out = {}
    for name, v in _by_role(model, predict_batch(model, x)).items():
        v = np.asarray(keras.ops.convert_to_numpy(v), np.float32)
        out[name] = np.moveaxis(v, 1, -1) if channels_first else v
    return out


def _torch_device(model: keras.Model):
    """The torch device of the model's weights on the torch backend, else None. The predictor
    keeps outputs there until the blended map is complete: one transfer per image instead of
    one per batch, and the blending runs on the GPU."""
    if keras.backend.backend() != "torch" or not model.weights:
        return None
    value = torch_tensor(model.weights[0])
    return None if value is None else value.device


def class_probabilities(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """float32 (N, H, W, K) class probabilities of a batch ``x`` in the model's layout."""
    return predict_maps(model, x)[SEMANTIC]


def _restore_channels(head, maps: np.ndarray, k: int) -> np.ndarray:
    """``maps`` (…, C) of ``head``, already moved back from TTA symmetry ``k``, with their
    channels restored (:meth:`~xsight_keras.heads.Head.channel_transform`)."""
    change = head.channel_transform(k)
    if change is None:
        return maps
    index, sign = change
    if isinstance(maps, np.ndarray):
        return maps[..., list(index)] * np.asarray(sign, maps.dtype)
    return maps[..., list(index)] * maps.new_tensor(sign)


def blending_window(size: int, ramp: int, sides=(True, True, True, True)) -> np.ndarray:
    """(size, size) float32 weights for one tile: 1 inside, rising as sin² over ``ramp`` pixels
    from each side in ``sides`` (top, bottom, left, right) that a neighbouring tile overlaps.

    Tile borders see less context (the convolutions' zero padding), so where tiles overlap each
    one counts least at its own border (not at all in the outer quarter of the overlap); sides on
    the image border keep weight 1, since no other tile covers them.
    """
    def profile(first: bool, last: bool) -> np.ndarray:
        w = np.ones(size, np.float64)
        if ramp > 0:
            # the outer quarter of the overlap gets weight 0 (the neighbour covers it fully),
            # then sin² up to 1
            margin = ramp // 4
            steps = np.clip(np.arange(ramp) - margin + 0.5, 0, None) / max(ramp - margin, 1)
            rise = np.where(np.arange(ramp) < margin, 0.0, np.sin(0.5 * np.pi * steps) ** 2)
            if first:
                w[:ramp] = rise
            if last:
                w[size - ramp:] = rise[::-1]
        return w

    top, bottom, left, right = sides
    return np.outer(profile(top, bottom), profile(left, right)).astype(np.float32)


def _positions(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)  # last tile flush with the end: no padding beyond it
    return starts


def training_resize(settings: dict, model: keras.Model) -> int | None:
    """The size a run resized whole images to in training (``resize_mode: resize``), which
    prediction must resize to as well: a PGU-Net stage's resolution (32·2^(stage-1)), else the
    run's last training size (``size_schedule`` when it grew, ``input_size``). ``None`` when the
    run trained on crops at the images' own scale (``resize_mode: crop``, the default)."""
    if settings.get("resize_mode", "crop") != "resize":
        return None
    stage = getattr(model, "arguments", {}).get("stage")
    if stage is not None:
        return STAGE_RESOLUTIONS[stage]
    schedule = settings.get("size_schedule")
    if schedule and settings.get("progressive"):
        return int(max(parse_schedule(schedule).items())[1])  # the size of the last epochs
    return int(settings.get("input_size", 256))


@dataclass
class PreparedRegion:
    """An image ready for the model (:meth:`Predictor.prepare_region`): ``pixels`` float32
    (H', W', C) preprocessed (mirror-padded to one tile when smaller), ``tiles`` the (row,
    column) corners of the tiles to predict, ``crop`` (top, left, height, width) of the image
    within ``pixels``."""

    pixels: np.ndarray
    tiles: list[tuple[int, int]]
    crop: tuple[int, int, int, int]


class Predictor:
    """Predict class probabilities for images of any size with a segmentation model.

    Arguments: ``model`` (its class map and every other head's maps are predicted; see
    :func:`predict_maps`),
    ``preprocess`` (the run's :class:`PreprocessConfig`, applied once to the whole image),
    ``tile_size`` (a multiple of the model's size multiple, 32 for the Attention U-Net),
    ``overlap`` (pixels shared by neighbouring tiles, default a quarter tile), ``batch_size`` (tiles per forward pass),
    ``tta`` (see :func:`parse_transforms`),
    ``resize_to`` (for a model trained on whole images resized to one size, ``resize_mode:
    resize``: each image is resized to ``resize_to``×``resize_to`` as in training, predicted as
    one tile, and its maps resized back to the image's size; :meth:`from_run` sets it).
    """

    def __init__(self, model: keras.Model, preprocess: PreprocessConfig = PreprocessConfig(),
                 tile_size: int = 256, overlap: int | None = None, batch_size: int = 8, tta=None,
                 class_names=None, resize_to: int | None = None):
        if resize_to is not None:
            tile_size, overlap = int(resize_to), 0
        self.resize_to = resize_to
        overlap = tile_size // 4 if overlap is None else overlap
        if not 0 <= overlap <= tile_size // 2:
            raise ValueError(f"overlap must be in [0, tile_size / 2], got {overlap} for {tile_size}")
        self.model = model
        self.preprocess = preprocess
        self.tile_size, self.overlap, self.batch_size = tile_size, overlap, batch_size
        self.transforms = parse_transforms(tta)
        self.channels_first = model_data_format(model) == "channels_first"
        self.in_channels = model.inputs[0].shape[1 if self.channels_first else -1]
        self.class_names = class_names
        self.tiles_predicted = 0  # tiles through the model so far (for progress reports)
        self._windows: dict = {}
        self._output_channels = None
        self._device = _torch_device(model)  # None: outputs and blending in numpy

    @classmethod
    def from_run(cls, run_dir, model_path=None, **kwargs) -> Predictor:
        """A predictor with a run's best checkpoint (or ``model_path``) and its preprocessing."""
        run = RunDir.open(run_dir)
        model = load_model_file(model_path) if model_path else run.load_model("best")
        preprocess = run.preprocess
        kwargs.setdefault("class_names", run.class_names)
        kwargs.setdefault("resize_to", training_resize(run.settings, model))
        return cls(model, preprocess, **kwargs)

    def _model_outputs(self, x: np.ndarray) -> dict:
        """(N, T, T, C) float32 → {role: (N, T, T, K) float32} (:func:`predict_maps`): numpy
        arrays, or on the torch backend tensors on the model's device (channels-last views)."""
        if self.channels_first:
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        if self._device is None:
            return predict_maps(self.model, x)
        import torch

        with torch.no_grad():  # what predict_on_batch does, without the copy back to the host
            y = self.model(torch.from_numpy(x).to(self._device), training=False)
        maps = _by_role(self.model, y)
        return {name: v.float().movedim(1, -1) if self.channels_first else v.float()
                for name, v in maps.items()}

    def _zeros(self, shape):
        if self._device is None:
            return np.zeros(shape, np.float32)
        import torch

        return torch.zeros(shape, dtype=torch.float32, device=self._device)

    def _window(self, sides):
        """The (T, T, 1) blending window of a tile with neighbours on ``sides``, cached."""
        if sides not in self._windows:
            window = blending_window(self.tile_size, self.overlap, sides)[..., None]
            if self._device is not None:
                import torch

                window = torch.from_numpy(window).to(self._device)
            self._windows[sides] = window
        return self._windows[sides]

    def _forward(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """(B, T, T, C) float32 → {output: (B, T, T, K) float32}, TTA averaged.

        The transformed copies of all tiles go through the model together, ``batch_size`` at a
        time (one forward pass for 8-fold TTA of one tile instead of eight: each pass has a
        fixed cost, large on a GPU). Every map is moved back in space the same way; a head whose
        channels change under the symmetry (a direction field, such as the hv head's) then has
        them restored as its :meth:`~xsight_keras.heads.Head.channel_transform` says."""
        n = len(tiles)
        views = np.concatenate([apply_transform(tiles, k) for k in self.transforms])
        parts = [self._model_outputs(views[i:i + self.batch_size])
                 for i in range(0, len(views), self.batch_size)]
        result = {}
        for name in parts[0]:
            head = get_head(name)
            outputs = [p[name] for p in parts]
            if self._device is None:
                outputs = np.concatenate(outputs)
            else:
                import torch

                outputs = torch.cat(outputs)
            total = sum(_restore_channels(head, invert_transform(outputs[j * n:(j + 1) * n], k), k)
                        for j, k in enumerate(self.transforms))
            result[name] = total / len(self.transforms)
        return result

    @property
    def has_instance_head(self) -> bool:
        return INSTANCE in output_names(self.model)

    def predict_maps(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 image (H, W, C) → {output: float32 (H, W, K)}: the class probabilities under
        :data:`~xsight_keras.heads.SEMANTIC` and every other head's maps under its name."""
        return self._predict_all(image)

    def predict_outputs(self, image: np.ndarray):
        """uint8 image (H, W, C) → (probabilities float32 (H, W, K), instance maps float32
        (H, W, 2) or ``None`` when the model has no instance head)."""
        maps = self._predict_all(image)
        return maps[SEMANTIC], maps.get(INSTANCE)

    def predict_probabilities(self, image: np.ndarray) -> np.ndarray:
        """uint8 image (H, W, C) → float32 probabilities (H, W, K), any H and W."""
        return self._predict_all(image)[SEMANTIC]

    def _predict_all(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        if image.shape[-1] != self.in_channels:
            if self.in_channels == 1 and image.shape[-1] == 3:
                import cv2

                image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
            else:
                raise ValueError(f"the model takes {self.in_channels}-channel images, got {image.shape}")
        h, w = image.shape[:2]
        if self.resize_to is None:
            return self._predict_tiled(image)
        # the scale the model was trained at: the whole image resized to one tile, and back
        maps = self._predict_tiled(resize_image(image, self.resize_to, self.resize_to))
        return {name: resize_image(v, h, w) for name, v in maps.items()}

    def _predict_tiled(self, image: np.ndarray, tissue: np.ndarray | None = None,
                       preprocess: PreprocessConfig | None = None) -> dict[str, np.ndarray]:
        """uint8 (H, W, C) in the model's channels → {output: float32 (H, W, K)}: overlapping
        tiles, blended (:meth:`prepare_region`, then :meth:`predict_region`)."""
        return self.predict_region(self.prepare_region(image, tissue, preprocess))

    def prepare_region(self, image: np.ndarray, tissue: np.ndarray | None = None,
                       preprocess: PreprocessConfig | None = None) -> PreparedRegion:
        """The model-free half of :meth:`predict_maps` for a uint8 (H, W, C) image in the
        model's channels: its preprocessed pixels and the tiles to predict (safe to run in a
        background thread while the model predicts another region).

        ``tissue`` (bool (H, W), optional; a slide region's tissue mask): tiles without tissue
        are left out (their pixels get 0 in every map: background), and the z-score statistics
        are the tissue's. ``preprocess`` replaces the predictor's for this image."""
        h, w = image.shape[:2]
        x = preprocess_image(image, preprocess or self.preprocess, tissue)
        (top, bottom, left, right), coords = self.region_tiles((h, w), tissue)
        if top or bottom or left or right:  # smaller than one tile: mirror-pad, predict, crop
            x = np.pad(x, ((top, bottom), (left, right), (0, 0)), mode="reflect")
        return PreparedRegion(x, coords, (top, left, h, w))

    def region_tiles(self, shape: tuple[int, int], tissue: np.ndarray | None = None):
        """How an image of ``shape`` (H, W) is tiled: ((top, bottom, left, right) mirror
        padding up to one tile, [(row, column) corners of the tiles in the padded image]),
        leaving out tiles without ``tissue`` (bool (H, W)) when it is given."""
        h, w = shape
        t = self.tile_size
        ph, pw = max(t - h, 0), max(t - w, 0)
        pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        if tissue is not None and (ph or pw):
            tissue = np.pad(tissue, (pad[:2], pad[2:]), mode="reflect")
        stride = t - self.overlap
        coords = [(r, c) for r in _positions(h + ph, t, stride) for c in _positions(w + pw, t, stride)]
        if tissue is not None:
            coords = [(r, c) for r, c in coords if tissue[r:r + t, c:c + t].any()]
        return pad, coords

    def predict_region(self, region: PreparedRegion) -> dict[str, np.ndarray]:
        """{output: float32 (H, W, K)} of a :meth:`prepare_region` result: its tiles through the
        model ``batch_size`` at a time, blended where they overlap."""
        x, coords = region.pixels, region.tiles
        t = self.tile_size
        hp, wp = x.shape[:2]
        out, weight = {}, self._zeros((hp, wp, 1))
        for i in range(0, len(coords), self.batch_size):
            batch = coords[i:i + self.batch_size]
            maps = self._forward(np.stack([x[r:r + t, c:c + t] for r, c in batch]))
            self.tiles_predicted += len(batch)
            for name, values in maps.items():
                if name not in out:
                    out[name] = self._zeros((hp, wp, values.shape[-1]))
            for j, (r, c) in enumerate(batch):
                window = self._window((r > 0, r + t < hp, c > 0, c + t < wp))  # neighbours
                for name, values in maps.items():
                    out[name][r:r + t, c:c + t] += values[j] * window
                weight[r:r + t, c:c + t] += window
        if not out:  # nothing to predict (no tissue): every map is 0, with the model's channels
            out = {name: self._zeros((hp, wp, shape[-1]))
                   for name, shape in self.output_channels().items()}
        top, left, h, w = region.crop
        if self._device is None:
            for v in out.values():
                np.divide(v, weight, out=v, where=weight > 0)
            return {name: v[top:top + h, left:left + w] for name, v in out.items()}
        # where no tile counts (weight 0) the sums are 0: dividing by a tiny number keeps them
        # 0; every positive weight (a product of two sin² profile values) is far above it
        weight = weight.clamp_(min=1e-30)
        return {name: v.div_(weight)[top:top + h, left:left + w].cpu().numpy()
                for name, v in out.items()}

    def output_channels(self) -> dict[str, tuple[int, ...]]:
        """{output: shape of one tile's map (T, T, K)}, the keys of :meth:`predict_maps`."""
        if self._output_channels is None:
            c = self.in_channels
            probe = np.zeros((1, self.tile_size, self.tile_size, c), np.float32)
            self._output_channels = {k: tuple(v.shape[1:])
                                     for k, v in self._model_outputs(probe).items()}
        return self._output_channels

    @staticmethod
    def to_labels(probabilities: np.ndarray) -> np.ndarray:
        """(H, W, K) probabilities → uint8 (H, W) labels (argmax; threshold 0.5 when K = 1)."""
        if probabilities.shape[-1] == 1:
            return (probabilities[..., 0] >= 0.5).astype(np.uint8)
        return np.argmax(probabilities, axis=-1).astype(np.uint8)

    def predict_labels(self, image: np.ndarray) -> np.ndarray:
        """uint8 image (H, W, C) → uint8 class labels (H, W); see :meth:`to_labels`."""
        return self.to_labels(self.predict_probabilities(image))
