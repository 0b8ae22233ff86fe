"""The encoder interface: features by stride, channels by stride, and the weight import it owns.

An encoder is a backbone that turns an image tensor into feature maps at some of the strides
2, 4, 8, 16 and 32 (like KerasHub's ``pyramid_outputs``). Decoders ask for features by stride,
so every decoder takes every encoder; an encoder without a stride simply gives that decoder
stage no skip. Every encoder also owns the import of its pretrained weights: its Keras layers
are named after the torchvision module paths (``layer2.0.downsample.1`` is the Keras layer
``enc_layer2_0_downsample_1``), so importing a torchvision ``state_dict`` is a lookup by name.

A new encoder family is one module with an :class:`Encoder` subclass that calls
:func:`~xsight_keras.models.encoders.registry.register_encoder`, plus one import line in
``xsight_keras/models/encoders/__init__.py``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from xsight_keras.models.encoders.download import checkpoint_url, download_checkpoint
from xsight_keras.models.encoders.registry import ENCODER_PREFIX
from xsight_keras.models.layers import image_input

#: Strides a decoder may ask for; the deepest feature must be at stride 32.
ALLOWED_STRIDES = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint: its URL and the SHA-256 prefix that torchvision's file names carry
    (``resnet18-f37072fd.pth``: the first hex digits of the file's SHA-256)."""

    url: str
    sha256_prefix: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def torch_hub_checkpoint_dir() -> Path:
    """The folder where ``torch.hub`` keeps downloaded checkpoints, by torch's rule:
    ``$TORCH_HOME/hub/checkpoints``, else ``$XDG_CACHE_HOME/torch/hub/checkpoints``, else
    ``~/.cache/torch/hub/checkpoints``."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
        torch_home = os.path.join(cache, "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` (``.pth``/``.pt``) or a ``.safetensors`` file as numpy arrays.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and ``module.`` prefixes left
    by DataParallel. Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            state = load_file(str(path))
        else:
            import torch  # reading a .pth needs torch whatever the Keras backend is

            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"cannot read encoder weights from {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    arrays = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        arrays[key] = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
    return arrays


class Encoder:
    """Base class of every encoder; one instance per registered name (``resnet34``).

    Subclasses set the class attributes or pass them to ``__init__`` and implement
    :meth:`features`; weight import works unchanged for encoders built from Conv2D,
    DepthwiseConv2D, Dense, BatchNormalization and LayerNormalization layers, and
    :meth:`import_values` is the one method to extend for other weighted layers.

    Attributes:
        name: the registry name, e.g. ``"resnet34"``.
        channels: ``{stride: channels}`` of the features, strides a subset of 2, 4, 8, 16, 32
            that includes 32.
        imagenet: the torchvision ImageNet :class:`Checkpoint`, or ``None``.
        stem_module: torchvision path of the first convolution (a 1-channel model receives its
            RGB kernel summed over the input channels).
        ignored_prefixes: checkpoint keys that have no place in an encoder (the classifier).
    """

    stem_module: str = ""
    ignored_prefixes: tuple[str, ...] = ()

    def __init__(self, name: str, channels: dict[int, int], imagenet: Checkpoint | None = None):
        strides = sorted(channels)
        if not strides or not set(strides) <= set(ALLOWED_STRIDES) or strides[-1] != 32:
            raise ValueError(
                f"encoder {name!r}: strides must be a subset of {ALLOWED_STRIDES} that includes 32, "
                f"got {strides}"
            )
        self.name = name
        self.channels = {s: int(channels[s]) for s in strides}
        self.imagenet = imagenet

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, channels={self.channels})"

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides this encoder provides, ascending (e.g. ``(4, 8, 16, 32)``)."""
        return tuple(self.channels)

    # -- building ------------------------------------------------------------------------------
    def features(self, x, prefix: str = ENCODER_PREFIX) -> dict:
        """Apply the encoder to the image tensor ``x`` and return ``{stride: feature map}``.

        ``x``: (B, H, W, C) (or (B, C, H, W) under channels_first), H and W multiples of 32.
        Feature ``s`` has spatial size (H/s, W/s) and ``self.channels[s]`` channels. Layer names
        start with ``prefix`` and mirror torchvision's module paths.
        """
        raise NotImplementedError

    def build(
        self,
        input_channels: int = 3,
        weights: str | os.PathLike | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> keras.Model:
        """The encoder alone as a Functional model on (None, None, C) images.

        Outputs: the feature maps in order of :attr:`strides` (a list). ``weights``: ``None``
        (random init), ``"imagenet"`` (downloaded once into the torch hub cache) or a
        torchvision ``.pth`` / ``.safetensors`` file.
        """
        if input_channels not in (1, 3):
            raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")
        inputs = image_input(input_channels, input_size)
        feats = self.features(inputs)
        model = keras.Model(inputs, [feats[s] for s in self.strides], name=f"{self.name}_encoder")
        if weights is not None:
            self.load_weights(model, weights)
        return model

    # -- weights -------------------------------------------------------------------------------
    def find_imagenet_checkpoint(self, download: bool = False) -> Path:
        """Locate this encoder's torchvision ImageNet checkpoint in the torch hub cache,
        ``$TORCH_HOME/hub/checkpoints`` (:func:`torch_hub_checkpoint_dir`).

        Takes the published file name (``resnet18-f37072fd.pth``) first, else any
        ``{name}-*.pth`` or ``{name}*.safetensors`` placed there. When there is none:
        ``download=True`` fetches the published file into that folder once (streamed, SHA-256
        checked, renamed into place: :func:`.download.download_checkpoint`;
        ``$XSIGHT_WEIGHTS_URL_PREFIX`` points at a mirror), ``download=False`` raises
        ``FileNotFoundError`` naming the folder searched and the URL. A failed download raises
        ``WeightsDownloadError`` (a ``FileNotFoundError``) naming the URL and the path to place
        the file at, or ``CorruptDownloadError`` (a ``ValueError``) for a wrong hash.
        """
        folder = torch_hub_checkpoint_dir()
        if self.imagenet is not None and (folder / self.imagenet.file_name).is_file():
            return folder / self.imagenet.file_name
        hits = sorted(glob.glob(str(folder / f"{self.name}-*.pth")))
        hits += sorted(glob.glob(str(folder / f"{self.name}*.safetensors")))
        if hits:
            return Path(hits[0])
        if download and self.imagenet is not None:
            return download_checkpoint(
                checkpoint_url(self.imagenet.url), folder / self.imagenet.file_name,
                self.imagenet.sha256_prefix,
                what=f"{self.name} ImageNet checkpoint (encoder_weights='imagenet')",
            )
        how = (f"encoder_weights='imagenet' downloads {self.imagenet.url} into that folder "
               f"(set TORCH_HOME to use another); or"
               if self.imagenet else "No ImageNet checkpoint is known for it:")
        raise FileNotFoundError(
            f"no {self.name} ImageNet checkpoint found in {folder} "
            f"(looked for {self.name}-*.pth and {self.name}*.safetensors). {how} "
            f"pass encoder_weights='/path/to/file.pth'."
        )

    def module_path(self, layer_name: str, prefix: str = ENCODER_PREFIX) -> str:
        """torchvision module path of the Keras layer ``layer_name``
        (``enc_layer1_0_downsample_1`` → ``layer1.0.downsample.1``)."""
        return layer_name[len(prefix):].replace("_", ".")

    def import_values(self, layer, module: str, take: Callable[[str], np.ndarray]) -> list:
        """The Keras weight values of ``layer`` from torch tensors; ``take("weight")`` returns the
        tensor ``{module}.weight`` as float32 numpy.

        Conv kernels go from (out, in, kh, kw) to (kh, kw, in, out) (a Linear's (out, in) to a
        1×1 kernel), depthwise kernels from (C, 1, kh, kw) to (kh, kw, C, 1), Dense kernels from
        (out, in) to (in, out); BatchNorm takes weight, bias, running mean and variance,
        LayerNorm weight and bias. A 1-channel stem receives the RGB kernel summed over inputs.
        """
        if isinstance(layer, layers.DepthwiseConv2D):
            values = [take("weight").transpose(2, 3, 0, 1)]
        elif isinstance(layer, layers.Conv2D):
            weight = take("weight")
            if weight.ndim == 2:  # a Linear applied as a 1×1 convolution
                weight = weight[:, :, None, None]
            kernel = weight.transpose(2, 3, 1, 0)
            if kernel.shape[2] == 3 and layer.kernel.shape[2] == 1 and module == self.stem_module:
                kernel = kernel.sum(axis=2, keepdims=True)
            values = [kernel]
        elif isinstance(layer, layers.Dense):
            values = [take("weight").T]
        elif isinstance(layer, layers.BatchNormalization):
            return [take("weight"), take("bias"), take("running_mean"), take("running_var")]
        elif isinstance(layer, layers.LayerNormalization):
            return [take("weight"), take("bias")]
        else:
            raise ValueError(f"unexpected weighted layer {layer.name!r} in the {self.name} encoder")
        if layer.use_bias:
            values.append(take("bias"))
        return values

    def weights_file(self, weights: str | os.PathLike) -> Path:
        """The checkpoint file ``weights`` names: ``"imagenet"`` is found in (or downloaded once
        into) the torch hub cache (:meth:`find_imagenet_checkpoint`), anything else is a path
        that must exist (``FileNotFoundError`` naming it)."""
        if str(weights) == "imagenet":
            return self.find_imagenet_checkpoint(download=True)
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path}")
        return path

    def load_weights(
        self,
        model: keras.Model,
        weights: str | os.PathLike,
        prefix: str = ENCODER_PREFIX,
    ) -> list[str]:
        """Copy torchvision weights into the encoder layers of ``model`` (matched by name).

        ``weights``: ``"imagenet"`` (from the torch hub cache, downloaded there once if absent:
        :meth:`find_imagenet_checkpoint`) or a checkpoint path. Every weighted layer whose name
        starts with ``prefix`` is filled (see :meth:`import_values`); keys under
        :attr:`ignored_prefixes` (the classifier) and ``num_batches_tracked`` are ignored.
        Returns the names of the layers filled; raises ``ValueError`` naming the file when a
        tensor is missing, extra or of the wrong shape.
        """
        path = self.weights_file(weights)
        state = read_state_dict(path)
        used: set[str] = set()
        filled = []
        for layer in model.layers:
            if not layer.name.startswith(prefix) or not layer.weights:
                continue
            module = self.module_path(layer.name, prefix)

            def take(param: str, module=module, layer=layer) -> np.ndarray:
                key = f"{module}.{param}"
                if key not in state:
                    raise ValueError(
                        f"{path}: missing tensor {key!r} for layer {layer.name!r} ({self.name})"
                    )
                used.add(key)
                return np.asarray(state[key], dtype=np.float32)

            values = self.import_values(layer, module, take)
            for value, variable in zip(values, layer.weights):
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"{path}: tensor for layer {layer.name!r} has shape {value.shape}, "
                        f"the model expects {tuple(variable.shape)}; is this a {self.name} checkpoint?"
                    )
            layer.set_weights(values)
            filled.append(layer.name)
        extra = sorted(
            k for k in state
            if k not in used and not k.startswith(self.ignored_prefixes)
            and not k.endswith("num_batches_tracked")
        )
        if extra:
            raise ValueError(
                f"{path}: {len(extra)} tensors have no place in a {self.name} encoder "
                f"(e.g. {extra[:3]}); is this a {self.name} checkpoint?"
            )
        if not filled:
            raise ValueError(f"model has no layers named {prefix}* to receive {self.name} weights")
        return filled
