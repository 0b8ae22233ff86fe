"""A Functional model's layers run without Keras' per-call bookkeeping, on the torch backend.

Keras runs a Functional model by calling every layer through ``Layer.__call__``: about 210 calls
per Attention U-Net forward pass, each converting and checking its arguments, resolving the
training flag and masks, opening name and autocast scopes and re-reading the call signature,
then ``keras.ops`` checking every argument for symbolic tensors before the PyTorch kernel runs.
With small tensors (and on a GPU, where kernels are queued asynchronously) that Python is the
step: at 32×32 px and batch 2 a training-mode forward pass on the CPU took 2.7–3.1× the same
network in plain PyTorch (README, Performance).

:class:`LeanGraph` is the same computation with that bookkeeping done once, when the graph is
planned: the order of the calls, which tensor goes where and when it is no longer needed, which
layers take ``training``, which inputs are cast to which dtype and which autocast scope each
layer runs in. At run time each layer costs one of three things, chosen per layer when planning:

* a direct PyTorch kernel, for the layers that dominate the count (2-D convolutions in
  ``channels_first``, plain ReLU, ``Add``, ``Concatenate``, ``ZeroPadding2D``): the exact
  sequence of PyTorch calls Keras' torch backend makes for them, so results are bit-identical;
* the layer's own ``call`` (its ``keras.ops`` code), for the Keras and package layers whose
  ``call`` needs nothing of ``__call__`` beyond casting, autocasting and ``training`` (listed
  in ``_PLAIN_CALL``, exact classes: a user's subclass may add losses or masks);
* the full ``layer(...)`` for every other layer, for quantized layers and for layers with an
  activity regulariser.

Only eager calls on real torch tensors of the input's rank take this path, without masks and
outside stateless scopes; symbolic calls, shape inference, ``stateless_call``, other backends and
graphs it does not take (several inputs, bare ``keras.ops`` calls, tensors in keyword arguments)
run Keras' own code. A plan is made again when a layer's dtype policy, quantization or LoRA
changes (:meth:`LeanGraph.is_current`). The model, its weights, config and saved files are
those of Keras; only how a call is executed changes. Intermediate tensors are dropped as soon as no later layer reads them (Keras
keeps every one until the pass ends), which lowers the peak memory of inference.

Bottom layer: imports Keras, PyTorch (lazily) and :mod:`xsight_keras.compat`.
"""

from __future__ import annotations

import inspect
import os

import keras
from keras import layers

from xsight_keras import compat


def _plain_call_classes() -> frozenset:
    """Layer classes (exact types) whose ``call`` may be run without ``Layer.__call__``."""
    from xsight_keras.models.encoders.convnext import ChannelLayerNormalization, LayerScale
    from xsight_keras.models.fade_in import FadeIn, FadeInMean
    from xsight_keras.models.fused_layers import (
        FusedBatchNormalization,
        FusedUpSampling2D,
        TorchOrderConv2D,
    )
    from xsight_keras.models.layers import SpatialSizeCheck

    return frozenset({
        layers.Activation, layers.Add, layers.Average, layers.AveragePooling2D,
        layers.BatchNormalization, layers.Concatenate, layers.Conv2D, layers.Cropping2D,
        layers.Dense, layers.DepthwiseConv2D, layers.Dropout, layers.Identity,
        layers.LayerNormalization, layers.MaxPooling2D, layers.Maximum, layers.Multiply,
        layers.ReLU, layers.Softmax, layers.SpatialDropout2D, layers.Subtract,
        layers.UpSampling2D, layers.ZeroPadding2D,
        ChannelLayerNormalization, FadeIn, FadeInMean, FusedBatchNormalization,
        FusedUpSampling2D, LayerScale, SpatialSizeCheck, TorchOrderConv2D,
    })


_KEEP = object()  # run in the autocast scope in force


def _is_float(dtype) -> bool:
    return keras.backend.is_float_dtype(dtype)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) zero padding of Keras' torch backend for ``padding="same"``."""
    effective = (kernel - 1) * dilation + 1
    if stride == 1:
        total = effective - 1
    else:
        out = (size + stride - 1) // stride
        total = max(0, (out - 1) * stride + effective - size)
    return total // 2, total - total // 2


def _conv2d_kernel(layer):
    """PyTorch calls of Keras' torch ``Conv2D.call`` (channels_first, one group, no activation,
    no LoRA): permute the (kh, kw, in, out) kernel, pad as Keras does, ``conv2d``, add the bias
    reshaped to (1, C, 1, 1). ``None`` when the layer is not such a convolution."""
    if (layer.data_format != "channels_first" or layer.rank != 2 or layer.groups != 1
            or layer.lora_enabled or layer.activation is not keras.activations.linear):
        return None
    import torch
    from torch.nn import functional as F

    kernel, bias = compat.conv_kernel(layer), layer.bias if layer.use_bias else None
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    size = tuple(kernel.shape[:2])
    pads = {}

    def padding(shape):
        if layer.padding != "same":
            return None, 0
        if shape not in pads:
            pad = [_same_padding(n, k, s, d) for n, k, s, d in zip(shape, size, strides, dilation)]
            if all(a == b for a, b in pad):
                pads[shape] = None, [a for a, _ in pad]
            else:  # F.pad takes the last dimension first
                pads[shape] = (pad[1][0], pad[1][1], pad[0][0], pad[0][1]), 0
        return pads[shape]

    def run(x, training):
        explicit, pad = padding(tuple(x.shape[2:]))
        if explicit is not None:
            x = F.pad(x, explicit, mode="constant")
        y = F.conv2d(x, kernel.value.permute(3, 2, 0, 1), None, strides, pad, dilation)
        if bias is not None:
            y = torch.add(y, torch.reshape(bias.value, (1, -1, 1, 1)))
        return y

    return run


def _relu_kernel(layer):
    if layer.max_value is not None or layer.negative_slope != 0 or layer.threshold != 0:
        return None
    import torch

    return lambda x, training: torch.relu(x)


def _add_kernel(layer):
    import torch

    def run(inputs, training):
        out = inputs[0]
        for x in inputs[1:]:
            out = torch.add(out, x)
        return out

    return run


def _concatenate_kernel(layer):
    import torch

    axis = layer.axis
    return lambda inputs, training: torch.cat(inputs, dim=axis)


def _zero_padding_kernel(layer):
    """``F.pad`` with Keras' ``ops.pad`` order (last dimension first, zeros). Also keeps
    ``ops.pad`` out of the step: it creates and names a ``Pad`` operation on every call, and the
    global name counter that changes with each call made ``torch.compile`` recompile every step."""
    from torch.nn import functional as F

    (top, bottom), (left, right) = layer.padding
    if layer.data_format == "channels_first":
        pad = (left, right, top, bottom)
    else:
        pad = (0, 0, left, right, top, bottom)
    return lambda x, training: F.pad(x, pad, mode="constant")


def _direct_kernel(layer, arg):
    """A direct PyTorch function ``(inputs, training) -> outputs`` for ``layer`` called on the
    KerasTensor(s) ``arg``, or None."""
    from xsight_keras.models.fused_layers import TorchOrderConv2D

    kind = type(layer)
    if kind in (layers.Add, layers.Concatenate) and len({len(t.shape) for t in arg}) != 1:
        return None  # Merge layers expand the lower-rank inputs first: Keras' own call
    if kind in (layers.Conv2D, TorchOrderConv2D):
        return _conv2d_kernel(layer)
    if kind is layers.ReLU:
        return _relu_kernel(layer)
    if kind is layers.Add:
        return _add_kernel(layer)
    if kind is layers.Concatenate:
        return _concatenate_kernel(layer)
    if kind is layers.ZeroPadding2D:
        return _zero_padding_kernel(layer)
    return None


class _Step:
    """One layer call of the plan."""

    __slots__ = ("layer", "kind", "run", "source", "listed", "target", "drop", "cast",
                 "autocast", "compute", "mixed")

    def __init__(self, layer, kind, run, source, listed, target, cast):
        self.layer, self.kind, self.run = layer, kind, run
        self.source, self.listed, self.target = source, listed, target
        self.cast, self.drop = cast, ()
        self.autocast = layer.autocast
        self.compute = layer.compute_dtype
        self.mixed = layer.compute_dtype != layer.variable_dtype

    def scope(self, current):
        """The autocast dtype this layer's ``__call__`` would open inside scope ``current``
        (``_KEEP``: none, the current one stays), as ``Layer.__call__`` decides."""
        if current is not None:
            if not self.autocast or not _is_float(self.compute):
                return None
            return self.compute if current.dtype != self.compute else _KEEP
        return self.compute if self.mixed else _KEEP


def _plain_call(layer, training_arg: bool):
    call = layer.call
    if training_arg:
        return lambda x, training: call(x) if training is None else call(x, training=training)
    return lambda x, training: call(x)


def _full_call(layer, training_arg: bool):
    if training_arg:
        return lambda x, training: layer(x) if training is None else layer(x, training=training)
    return lambda x, training: layer(x)


class LeanGraph:
    """The call plan of a built Functional model with one input (see the module docstring).

    Build with :meth:`plan` (None when the graph has a shape this executor does not take:
    several inputs, tensors in keyword arguments, nested structures); run with :meth:`run`.
    """

    def __init__(self, model: keras.Model, steps: list[_Step], slots: int, model_input,
                 outputs):
        self.model, self.steps, self.slots = model, steps, slots
        self.input_dtype, self.input_rank = model_input.dtype, len(model_input.shape)
        self.outputs = outputs
        self._scopes: dict = {}
        # what the plan was made under: each layer's dtype policy object (``model.quantize`` and
        # a new policy replace it) and, for layers that have LoRA, whether it is on (looked up
        # once: a missing attribute costs a raised exception on a torch Module, every call)
        self._policies = [(step.layer, step.layer.dtype_policy) for step in steps]
        self._lora = [(step.layer, step.layer.lora_enabled) for step in steps
                      if hasattr(step.layer, "lora_enabled")]

    def is_current(self) -> bool:
        """False once a layer got another dtype policy (``model.quantize`` included) or had LoRA
        switched on or off since planning: the model then plans again."""
        return (all(layer.dtype_policy is policy for layer, policy in self._policies)
                and all(layer.lora_enabled == on for layer, on in self._lora))

    def takes(self, inputs) -> bool:
        """Whether ``inputs`` (a torch tensor) has the model input's rank (Keras' call adds or
        drops a trailing size-1 axis otherwise: that is left to it)."""
        return inputs.ndim == self.input_rank

    def kinds(self) -> dict:
        """How each layer is run: ``{"direct": n, "call": n, "full": n}``."""
        counts = {"direct": 0, "call": 0, "full": 0}
        for step in self.steps:
            counts[step.kind] += 1
        return counts

    @classmethod
    def plan(cls, model: keras.Model) -> LeanGraph | None:
        if len(model.inputs) != 1:
            return None
        import torch

        slot_of = {id(model.inputs[0]): 0}
        plain = _plain_call_classes()
        steps = []
        for layer, args, kwargs, outputs in compat.graph_nodes(model):
            if any(value is not None for value in kwargs.values()) or len(args) != 1:
                return None
            arg = args[0]
            if isinstance(arg, (list, tuple)):
                if not all(isinstance(t, keras.KerasTensor) and id(t) in slot_of for t in arg):
                    return None
                source, listed = [slot_of[id(t)] for t in arg], True
            elif isinstance(arg, keras.KerasTensor) and id(arg) in slot_of:
                source, listed = slot_of[id(arg)], False
            else:
                return None
            if len(outputs) != 1:
                return None
            slot_of[id(outputs[0])] = target = len(slot_of)
            training_arg = "training" in inspect.signature(layer.call).parameters
            if not isinstance(layer, keras.layers.Layer):
                return None  # a keras.ops call in the graph: Keras' own call
            if (type(layer) in plain and layer.activity_regularizer is None
                    and layer.quantization_mode is None and _is_float(layer.input_dtype)):
                run, kind = _direct_kernel(layer, arg), "direct"
                if run is None:
                    run, kind = _plain_call(layer, training_arg), "call"
                cast = getattr(torch, keras.backend.standardize_dtype(layer.input_dtype))
                cast = cast if layer.autocast else None
            else:  # __call__ converts its inputs itself
                run, kind, cast = _full_call(layer, training_arg), "full", None
            steps.append(_Step(layer, kind, run, source, listed, target, cast))
        if any(id(t) not in slot_of for t in model.outputs):
            return None
        # drop each intermediate tensor after the last step that reads it
        last_read = {}
        for i, step in enumerate(steps):
            for slot in (step.source if step.listed else [step.source]):
                last_read[slot] = i
        kept = {slot_of[id(t)] for t in model.outputs}
        for i, step in enumerate(steps):
            step.drop = tuple(s for s, last in last_read.items() if last == i and s not in kept)
        outputs = [slot_of[id(t)] for t in model.outputs]
        return cls(model, steps, len(slot_of), model.inputs[0], outputs)

    def run(self, inputs, training=None):
        """``model(inputs, training=training)`` computed by the plan: same outputs (same
        structure, dtypes and values) and the same variable updates (BatchNorm statistics,
        fade-in counters). ``inputs``: one torch tensor of the model's input rank."""
        values = [None] * self.slots
        values[0] = keras.ops.convert_to_tensor(inputs, dtype=self.input_dtype)
        current = compat.current_autocast_scope()
        key = (current is None, None if current is None else current.dtype)
        scopes = self._scopes.get(key)
        if scopes is None:
            scopes = self._scopes[key] = [step.scope(current) for step in self.steps]
        for step, scope in zip(self.steps, scopes):
            if step.listed:
                x = [values[s] for s in step.source]
                if step.cast is not None:
                    x = [v.to(step.cast) if v.dtype != step.cast and v.is_floating_point() else v
                         for v in x]
            else:
                x = values[step.source]
                if step.cast is not None and x.dtype != step.cast and x.is_floating_point():
                    x = x.to(step.cast)
            if scope is _KEEP:
                values[step.target] = step.run(x, training)
            else:
                with compat.autocast_scope(scope):
                    values[step.target] = step.run(x, training)
            for slot in step.drop:
                values[slot] = None
        # packed as Functional.call packs them (dict keys in Keras' order)
        outputs = keras.tree.pack_sequence_as(self.model.output, [values[s] for s in self.outputs])
        if isinstance(outputs, list) and len(outputs) == 1:
            return outputs[0]
        return outputs


ENV_SWITCH = "XSIGHT_KERAS_LEAN_GRAPH"


def lean_by_default() -> bool:
    """Whether new models run through a :class:`LeanGraph`: yes, unless the environment sets
    ``XSIGHT_KERAS_LEAN_GRAPH=0`` (Keras' own Functional call, to rule the executor out when
    something looks wrong)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def lean_call_applies(inputs, mask=None) -> bool:
    """Whether a model call on ``inputs`` can run through a :class:`LeanGraph`: torch backend,
    one real torch tensor, no mask, outside any stateless scope (shape inference included)."""
    if keras.backend.backend() != "torch" or mask is not None or compat.in_stateless_scope():
        return False
    import torch

    return isinstance(inputs, torch.Tensor) and inputs.device.type != "meta"


__all__ = ["ENV_SWITCH", "LeanGraph", "lean_by_default", "lean_call_applies"]
