"""ResNet encoders (He et al. 2016) in the torchvision layout, with ImageNet weight import.

Layer names mirror torchvision's module paths with ``.`` replaced by ``_`` and a prefix
(``enc_``): ``layer2.0.downsample.1`` is the Keras layer ``enc_layer2_0_downsample_1``. That
makes importing a torchvision ``state_dict`` a lookup by name, and any decoder can take the
five skip features by stride.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

from xsight_keras.models.fused_layers import TorchOrderConv2D
from xsight_keras.models.layers import batch_norm, channel_axis, image_input

ENCODER_PREFIX = "enc_"

# name -> (block type, blocks per stage)
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_EXPANSION = {"basic": 1, "bottleneck": 4}
# Known torchvision ImageNet checkpoints (file names in the torch hub cache).
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def encoder_channels(encoder: str) -> tuple[int, int, int, int, int]:
    """Channels of the five skip features (strides 2, 4, 8, 16, 32) of ``encoder``."""
    block, _ = _spec(encoder)
    e = _EXPANSION[block]
    return (64,) + tuple(w * e for w in _STAGE_WIDTHS)


def _spec(encoder: str):
    if encoder not in RESNET_SPECS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(RESNET_SPECS)}")
    return RESNET_SPECS[encoder]


def _conv(x, filters, kernel_size, strides, name):
    """Convolution padded like PyTorch's (symmetric ``kernel_size // 2``), no bias."""
    pad = kernel_size // 2
    if strides == 1:
        return TorchOrderConv2D(filters, kernel_size, padding="same", use_bias=False, name=name)(x)
    if pad:
        # Keras "same" pads asymmetrically for stride 2; torchvision pads both sides.
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return TorchOrderConv2D(filters, kernel_size, strides=strides, use_bias=False, name=name)(x)


def _residual_out(x, residual, out_channels, strides, name):
    """Add the (projected when the shape changes) input to the residual branch, then ReLU."""
    shortcut = x
    if strides != 1 or x.shape[channel_axis()] != out_channels:
        shortcut = _conv(x, out_channels, 1, strides, f"{name}_downsample_0")
        shortcut = batch_norm(f"{name}_downsample_1")(shortcut)
    out = layers.Add(name=f"{name}_add")([residual, shortcut])
    return layers.ReLU(name=f"{name}_out")(out)


def _basic_block(x, width, strides, name):
    out = _conv(x, width, 3, strides, f"{name}_conv1")
    out = layers.ReLU(name=f"{name}_relu1")(batch_norm(f"{name}_bn1")(out))
    out = _conv(out, width, 3, 1, f"{name}_conv2")
    return _residual_out(x, batch_norm(f"{name}_bn2")(out), width, strides, name)


def _bottleneck_block(x, width, strides, name):
    out_channels = width * _EXPANSION["bottleneck"]
    out = _conv(x, width, 1, 1, f"{name}_conv1")
    out = layers.ReLU(name=f"{name}_relu1")(batch_norm(f"{name}_bn1")(out))
    out = _conv(out, width, 3, strides, f"{name}_conv2")  # stride on the 3×3 (ResNet v1.5)
    out = layers.ReLU(name=f"{name}_relu2")(batch_norm(f"{name}_bn2")(out))
    out = _conv(out, out_channels, 1, 1, f"{name}_conv3")
    return _residual_out(x, batch_norm(f"{name}_bn3")(out), out_channels, strides, name)


def resnet_features(x, encoder: str = "resnet34", prefix: str = ENCODER_PREFIX) -> list:
    """Apply a ResNet to the image tensor ``x`` and return its five skip features.

    ``x``: (B, H, W, C) (or (B, C, H, W) under channels_first), H and W multiples of 32.
    Returns feature maps at strides 2, 4, 8, 16, 32 with ``encoder_channels(encoder)`` channels:
    the stem after ReLU, then the outputs of ``layer1`` … ``layer4``.
    """
    block_type, repeats = _spec(encoder)
    block = _basic_block if block_type == "basic" else _bottleneck_block
    x = _conv(x, 64, 7, 2, f"{prefix}conv1")
    x = layers.ReLU(name=f"{prefix}relu")(batch_norm(f"{prefix}bn1")(x))
    features = [x]
    # Zero padding equals PyTorch's -inf padding here because the input is post-ReLU (>= 0).
    x = layers.ZeroPadding2D(1, name=f"{prefix}maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name=f"{prefix}maxpool")(x)
    for stage, (width, n) in enumerate(zip(_STAGE_WIDTHS, repeats), start=1):
        for i in range(n):
            strides = 2 if (i == 0 and stage > 1) else 1
            x = block(x, width, strides, f"{prefix}layer{stage}_{i}")
        features.append(x)
    return features


def resnet_encoder(
    encoder: str = "resnet34",
    input_channels: int = 3,
    weights: str | os.PathLike | None = None,
) -> keras.Model:
    """Build a ResNet encoder as a Functional model on (None, None, C) images.

    Returns a ``keras.Model`` whose outputs are the five skip features at strides 2, 4, 8, 16,
    32 (see :func:`resnet_features`). ``weights``: ``None`` (random init), ``"imagenet"`` (a
    torchvision checkpoint in the torch hub cache) or a path to a ``.pth`` / ``.safetensors`` file.
    """
    if input_channels not in (1, 3):
        raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")
    inputs = image_input(input_channels)
    model = keras.Model(inputs, resnet_features(inputs, encoder), name=f"{encoder}_encoder")
    if weights is not None:
        load_encoder_weights(model, weights, encoder)
    return model


def torch_hub_checkpoint_dir() -> Path:
    """The folder where ``torch.hub`` keeps downloaded checkpoints (``$TORCH_HOME/hub/checkpoints``)."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        torch_home = os.path.join(cache, "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def find_imagenet_checkpoint(encoder: str) -> Path:
    """Locate a torchvision ImageNet checkpoint for ``encoder`` in the torch hub cache.

    Looks for ``{encoder}-*.pth`` and ``{encoder}*.safetensors``. Raises ``FileNotFoundError``
    that names the folder searched and how to obtain the file.
    """
    _spec(encoder)
    folder = torch_hub_checkpoint_dir()
    hits = sorted(glob.glob(str(folder / f"{encoder}-*.pth")))
    hits += sorted(glob.glob(str(folder / f"{encoder}*.safetensors")))
    if not hits:
        url = TORCHVISION_URLS[encoder]
        raise FileNotFoundError(
            f"encoder_weights='imagenet': no {encoder} checkpoint found in {folder} "
            f"(looked for {encoder}-*.pth and {encoder}*.safetensors). Download {url} into that "
            f"folder (set TORCH_HOME to use another), or pass encoder_weights='/path/to/file.pth'."
        )
    return Path(hits[0])


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


def _torch_module_path(layer_name: str, prefix: str) -> str:
    # enc_layer1_0_downsample_1 -> layer1.0.downsample.1 ; enc_conv1 -> conv1
    return layer_name[len(prefix) :].replace("_", ".")


def load_encoder_weights(
    model: keras.Model,
    weights: str | os.PathLike,
    encoder: str = "resnet34",
    prefix: str = ENCODER_PREFIX,
) -> list[str]:
    """Copy torchvision ResNet weights into the encoder layers of ``model`` (matched by name).

    ``weights``: ``"imagenet"`` or a checkpoint path. Conv kernels are transposed from
    (out, in, kh, kw) to Keras' (kh, kw, in, out); BatchNorm takes weight, bias, running mean
    and variance. A 1-channel first convolution receives the RGB kernel summed over its input
    channels. The classifier (``fc``) is ignored. Returns the names of the layers filled; raises
    ``ValueError`` naming the file when a tensor is missing, extra or of the wrong shape.
    """
    path = find_imagenet_checkpoint(encoder) if str(weights) == "imagenet" else Path(weights)
    state = read_state_dict(path)
    used: set[str] = set()
    filled = []
    for layer in model.layers:
        if not layer.name.startswith(prefix) or not layer.weights:
            continue
        module = _torch_module_path(layer.name, prefix)

        def take(param: str) -> np.ndarray:
            key = f"{module}.{param}"
            if key not in state:
                raise ValueError(f"{path}: missing tensor {key!r} for layer {layer.name!r} ({encoder})")
            used.add(key)
            return np.asarray(state[key], dtype=np.float32)

        if isinstance(layer, layers.Conv2D):
            kernel = take("weight").transpose(2, 3, 1, 0)
            expected = tuple(layer.kernel.shape)
            if kernel.shape[2] == 3 and expected[2] == 1 and module == "conv1":
                kernel = kernel.sum(axis=2, keepdims=True)
            values = [kernel]
        elif isinstance(layer, layers.BatchNormalization):
            values = [take("weight"), take("bias"), take("running_mean"), take("running_var")]
        else:
            raise ValueError(f"unexpected weighted layer {layer.name!r} in the encoder")
        for value, variable in zip(values, layer.weights):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{path}: tensor for layer {layer.name!r} has shape {value.shape}, "
                    f"the model expects {tuple(variable.shape)}; is this a {encoder} checkpoint?"
                )
        layer.set_weights(values)
        filled.append(layer.name)
    extra = sorted(
        k for k in state
        if k not in used and not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )
    if extra:
        raise ValueError(
            f"{path}: {len(extra)} tensors have no place in a {encoder} encoder "
            f"(e.g. {extra[:3]}); is this a {encoder} checkpoint?"
        )
    if not filled:
        raise ValueError(f"model has no layers named {prefix}* to receive {encoder} weights")
    return filled
