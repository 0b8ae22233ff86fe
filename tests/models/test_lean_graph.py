"""The lean graph executor (``models/lean_graph.py``) computes what Keras' Functional call does.

Every comparison runs the same model twice from the same weights, once through the executor
and once through Keras' own call (``model.lean_execution = False``), and requires identical
results: outputs, gradients, BatchNorm statistics and fade-in counters after the call. The
engine-level comparisons (training runs, EMA, SWA, clipping, growth, saved files) are in
``tests/training/test_lean_training.py``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from tests.helpers import same_computation_tolerance
from xsight_keras.models import attention_unet, progressive_unet
from xsight_keras.models.lean_graph import ENV_SWITCH, LeanGraph, lean_by_default

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="the executor serves the torch backend")


def _images(shape, seed=0):
    import torch

    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def _call_both(model, x, training):
    """{lean: (outputs, gradients, every variable after the call)} for lean True and False,
    each from the same starting variables."""
    import torch

    start = [v.numpy().copy() for v in model.weights]
    results = {}
    for lean in (True, False):
        model.lean_execution = lean
        outputs = model(x, training=training)
        if isinstance(outputs, dict):  # same names in the same order as Keras' call
            results.setdefault("names", []).append(list(outputs))
        outputs = keras.tree.flatten(outputs)
        loss = sum((o.float() * torch.linspace(0, 1, o.numel(), device=o.device)
                    .reshape(o.shape)).sum() for o in outputs)
        for v in model.trainable_weights:
            v.value.grad = None
        grads = None
        if training:
            loss.backward()
            grads = [v.value.grad.cpu().numpy().copy() for v in model.trainable_weights]
        results[lean] = ([o.detach().float().cpu().numpy() for o in outputs], grads,
                         [v.numpy().copy() for v in model.weights])
        for v, value in zip(model.weights, start):
            v.assign(value)
    model.lean_execution = True
    return results


def _assert_identical(results):
    names = results.get("names")
    assert names is None or names[0] == names[1]
    (out_a, grad_a, var_a), (out_b, grad_b, var_b) = results[True], results[False]
    assert len(out_a) == len(out_b)
    for a, b in zip(out_a, out_b):
        np.testing.assert_allclose(a, b, **same_computation_tolerance())
    if grad_a is not None:
        for a, b in zip(grad_a, grad_b):
            np.testing.assert_allclose(a, b, **same_computation_tolerance())
    for a, b in zip(var_a, var_b):
        np.testing.assert_allclose(a, b, **same_computation_tolerance())


@pytest.mark.parametrize("build", [
    pytest.param(lambda: attention_unet(4, "resnet18", decoder_filters=(32, 16, 16, 8, 8),
                                        instance_head=True, heads=("hv",),
                                        head_branch_stages=2, dropout=0.0,
                                        data_format="channels_first"), id="aunet-heads-cf"),
    pytest.param(lambda: attention_unet(3, "resnet18", decoder_filters=(32, 16, 16, 8, 8),
                                        data_format="channels_last"), id="aunet-cl"),
    pytest.param(lambda: attention_unet(3, "convnext_tiny", decoder_filters=(32, 16, 16, 8, 8),
                                        data_format="channels_first"), id="aunet-convnext"),
    pytest.param(lambda: progressive_unet(3, 3, 2, base_filters=4, fade_in=5,
                                          instance_head=True, data_format="channels_first"),
                 id="pgunet-fading"),
])
def test_lean_call_is_identical_to_keras_call(build):
    model = build()
    channels_last = model.data_format == "channels_last"
    x = _images((2, 64, 64, 3) if channels_last else (2, 3, 64, 64))
    for training in (True, False, None):
        _assert_identical(_call_both(model, x, training))
    kinds = model._lean.kinds()
    assert kinds["full"] == 0 and kinds["call"] > 0
    if not channels_last:  # convolutions, ReLU, Add, Concatenate run as direct kernels
        assert kinds["direct"] > 0
    # the training calls did train-mode updates (BatchNorm statistics moved), others not
    start = [v.numpy() for v in model.non_trainable_weights]
    model(x, training=False)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(start, model.non_trainable_weights))
    model(x, training=True)
    assert any(not np.array_equal(a, v.numpy())
               for a, v in zip(start, model.non_trainable_weights))


def test_fade_in_counters_advance_the_same(tmp_path):
    from xsight_keras.models import fade_alpha

    model = progressive_unet(2, 3, 2, base_filters=4, fade_in=4, data_format="channels_first")
    x = _images((2, 3, 64, 64))
    for lean in (True, False):
        model.lean_execution = lean
        for _ in range(2):
            model(x, training=True)
        model(x, training=False)
    assert fade_alpha(model) == pytest.approx(1.0)  # 4 training calls of 4 steps


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_casts_and_scopes_as_keras(policy):
    """Autocast scopes as ``Layer.__call__`` opens them: float16/bfloat16 convolutions
    (kernels cast inside the scope), BatchNorm statistics in float32, float32 outputs."""
    import torch

    from xsight_keras.models.base import building

    with building("channels_first", policy):
        model = attention_unet(3, "resnet18", decoder_filters=(16, 16, 8, 8, 8),
                               data_format="channels_first")
    x = _images((2, 3, 32, 32))
    results = _call_both(model, x, training=True)
    _assert_identical(results)
    assert results[True][0][0].dtype == np.float32
    model.lean_execution = True
    assert model(x, training=False).dtype == torch.float32


def test_symbolic_stateless_and_other_calls_take_keras_path():
    """Shape inference, ``stateless_call`` and a model rebuilt from its config all work; the
    executor is planned only by an eager call on a tensor."""
    model = attention_unet(3, "resnet18", decoder_filters=(16, 16, 8, 8, 8),
                           data_format="channels_first")
    spec = model.compute_output_spec(keras.KerasTensor((2, 3, 64, 64)))
    assert tuple(spec.shape) == (2, 3, 64, 64) and model._lean is None
    x = _images((1, 3, 32, 32))
    eager = model(x, training=False)
    assert model._lean
    values = [v.value for v in model.trainable_variables]
    nontrainable = [v.value for v in model.non_trainable_variables]
    out, _ = model.stateless_call(values, nontrainable, x, training=False)
    eager = eager.detach().cpu().numpy()
    np.testing.assert_allclose(out.detach().cpu().numpy(), eager, rtol=1e-6, atol=1e-7)
    numpy_in = model.predict(x.numpy(), verbose=0)  # numpy through Keras' predict loop
    np.testing.assert_allclose(numpy_in, eager, rtol=1e-6, atol=1e-7)


def test_saved_model_runs_lean_and_saves_nothing_of_it(tmp_path):
    model = progressive_unet(2, 3, 2, base_filters=4, data_format="channels_first")
    x = _images((1, 3, 64, 64))
    before = keras.tree.map_structure(lambda t: t.detach().cpu().numpy(), model(x))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.lean_execution and loaded.get_config() == model.get_config()
    after = keras.tree.map_structure(lambda t: t.detach().cpu().numpy(), loaded(x))
    assert loaded._lean
    keras.tree.map_structure(np.testing.assert_array_equal, before, after)


def test_unlisted_layers_and_regularised_layers_run_through_keras_call():
    """A user's layer (it may add losses) and a layer with an activity regulariser take the
    full ``layer(...)``: their losses are recorded as in Keras' call."""

    class Penalised(layers.Layer):
        def call(self, x):
            self.add_loss(keras.ops.mean(x) * 0.0 + 1.5)
            return x * 2.0

    inputs = keras.Input((3, 8, 8))
    x = layers.Conv2D(4, 3, padding="same", data_format="channels_first",
                      activity_regularizer="l2")(inputs)
    x = Penalised()(x)
    outputs = layers.ReLU()(x)
    model = keras.Model(inputs, outputs)
    graph = LeanGraph.plan(model)
    assert graph.kinds() == {"direct": 1, "call": 0, "full": 2}
    x = _images((2, 3, 8, 8))
    expected = model(x)
    expected_losses = [float(v.detach()) for v in model.losses]
    got = graph.run(x)
    np.testing.assert_array_equal(got.detach().cpu().numpy(), expected.detach().cpu().numpy())
    assert [float(v.detach()) for v in model.losses] == pytest.approx(expected_losses)
    assert len(expected_losses) == 2


def test_asymmetric_same_padding_and_strides_match_keras():
    """``padding="same"`` with stride 2 on odd and even sizes (Keras pads after, not before),
    dilation, and a bias: the direct convolution kernel against Keras' own Conv2D."""
    for size, kernel, stride, dilation in ((9, 3, 2, 1), (10, 3, 2, 1), (11, 4, 3, 1),
                                           (12, 3, 1, 2), (8, 7, 2, 1)):
        inputs = keras.Input((3, None, None))
        conv = layers.Conv2D(5, kernel, strides=stride, dilation_rate=dilation, padding="same",
                             data_format="channels_first", use_bias=True,
                             bias_initializer="random_normal")
        model = keras.Model(inputs, conv(inputs))
        graph = LeanGraph.plan(model)
        assert graph.kinds()["direct"] == 1
        x = _images((2, 3, size, size + 1), seed=size)
        np.testing.assert_array_equal(graph.run(x).detach().cpu().numpy(),
                                      model(x).detach().cpu().numpy())


def test_environment_switch_turns_the_executor_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not lean_by_default()
    model = progressive_unet(1, 3, 2, base_filters=4, data_format="channels_first")
    assert model.lean_execution is False
    model(_images((1, 3, 32, 32)))
    assert model._lean is None
    monkeypatch.delenv(ENV_SWITCH)
    assert lean_by_default()


def test_changed_layers_are_planned_again():
    """LoRA switched on after the first call (and a layer given another dtype policy): the next
    call plans again and computes what Keras' call does."""
    from xsight_keras.models import TorchOrderConv2D

    model = progressive_unet(1, 3, 2, base_filters=4, data_format="channels_first")
    x = _images((1, 3, 32, 32))
    model(x)
    first = model._lean
    conv = next(layer for layer in model.layers if isinstance(layer, TorchOrderConv2D))
    conv.enable_lora(2)
    conv.lora_kernel_b.assign(np.ones(conv.lora_kernel_b.shape, "float32"))
    _assert_identical(_call_both(model, x, training=False))
    assert model._lean is not first and model._lean.is_current()


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_quantized_layers_run_through_keras_call():
    inputs = keras.Input((6,))
    x = layers.Dense(8, name="d1")(inputs)
    outputs = layers.Dense(3, name="d2")(layers.ReLU()(x))
    model = keras.Model(inputs, outputs)
    model.quantize("int8")
    graph = LeanGraph.plan(model)
    assert graph.kinds()["full"] == 2
    x = _images((4, 6))
    np.testing.assert_array_equal(graph.run(x).detach().cpu().numpy(),
                                  model(x).detach().cpu().numpy())


def test_graphs_it_cannot_run_exactly_are_left_to_keras():
    """An ``Add`` of inputs of different ranks (Keras expands the smaller one at axis 1) runs
    Keras' own merge; a bare ``keras.ops`` call in the graph, several inputs or an input of
    another rank make the whole call Keras'."""
    inputs = keras.Input((4, 4, 4))
    pooled = layers.GlobalAveragePooling2D(data_format="channels_first")(inputs)
    summed = layers.Add()([inputs, pooled])
    model = keras.Model(inputs, summed)
    graph = LeanGraph.plan(model)
    assert graph is not None and graph.kinds()["direct"] == 0
    x = _images((4, 4, 4, 4))
    np.testing.assert_array_equal(graph.run(x).detach().cpu().numpy(),
                                  model(x).detach().cpu().numpy())

    inputs = keras.Input((3,))
    assert LeanGraph.plan(keras.Model(inputs, keras.ops.sigmoid(layers.Dense(2)(inputs)))) is None
    a, b = keras.Input((3,)), keras.Input((3,))
    assert LeanGraph.plan(keras.Model([a, b], layers.Add()([a, b]))) is None
    graph = LeanGraph.plan(keras.Model(inputs, layers.Dense(2)(inputs)))
    assert graph.takes(_images((2, 3))) and not graph.takes(_images((2, 3, 1)))
