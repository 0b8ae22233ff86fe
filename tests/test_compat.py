"""The Keras behaviours that ``xsight_keras.compat`` relies on, one test each.

Each test fails with a message naming the Keras behaviour that changed; the fix then goes into
``xsight_keras/compat.py`` alone. The last test keeps every other module of the package off
``keras.src`` and private Keras attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from xsight_keras import compat

PACKAGE = Path(__file__).resolve().parent.parent / "xsight_keras"
torch_only = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch backend internals")


def _model(optimizer="sgd", metrics=None):
    inputs = keras.Input((4,))
    x = layers.Dense(3, name="hidden")(inputs)
    outputs = layers.Dense(1, name="out")(layers.BatchNormalization(name="bn")(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=optimizer, loss="mse", metrics=metrics)
    return model


def _data(n=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


# layers and variables -----------------------------------------------------------------------


class _ScopeProbe(layers.Layer):
    def call(self, x):
        self.seen = compat.in_stateless_scope()
        return x


def test_in_stateless_scope():
    assert compat._in_stateless_scope is not None, (
        "keras.src.backend.common.stateless_scope.in_stateless_scope is gone: the fused layers "
        "now always take Keras' own (slow) path")
    probe = _ScopeProbe()
    probe(np.ones((1, 2), "float32"))
    assert probe.seen is False, "in_stateless_scope() is True outside any StatelessScope"
    with keras.StatelessScope():
        probe(np.ones((1, 2), "float32"))
    assert probe.seen is True, "in_stateless_scope() is False inside keras.StatelessScope"
    probe.compute_output_spec(keras.KerasTensor((1, 2)))
    if keras.backend.backend() == "torch":
        assert probe.seen is True, (
            "Keras' torch shape inference (compute_output_spec) no longer runs layers in a "
            "StatelessScope: the fused layers would run their torch kernels on 'meta' tensors")


def test_all_layers_flattens_nested_models():
    inner = keras.Sequential([layers.Dense(2, name="inner_dense"),
                              layers.BatchNormalization(name="inner_bn")], name="inner")
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, layers.Dense(1, name="head")(inner(inputs)), name="outer")
    names = [layer.name for layer in compat.all_layers(outer)]
    assert names[0] == "outer" and sorted(names) == sorted(set(names)), (
        f"Layer._flatten_layers() no longer lists the model first and each layer once: {names}")
    assert {"inner", "inner_dense", "inner_bn", "head"} <= set(names), (
        f"Layer._flatten_layers() no longer recurses into nested models: {names}")
    assert "outer" not in [layer.name for layer in compat.all_layers(outer, include_self=False)], (
        "Layer._flatten_layers(include_self=False) lists the model itself")


def test_conv_kernel_is_the_kernel_variable():
    conv = layers.Conv2D(4, 3)
    conv.build((None, 8, 8, 2))
    kernel = compat.conv_kernel(conv)
    assert isinstance(kernel, keras.Variable) and tuple(kernel.shape) == (3, 3, 2, 4), (
        "keras.layers.Conv2D no longer keeps its kernel variable as _kernel after build")
    assert any(kernel is v for v in conv.trainable_variables), (
        "Conv2D._kernel is no longer the trainable kernel variable of the layer")


@torch_only
def test_torch_tensor_replacement_keeps_its_layout():
    import torch

    values = np.arange(2 * 3 * 4 * 5, dtype="float32").reshape(2, 3, 4, 5)
    variable = keras.Variable(values)
    tensor = compat.torch_tensor(variable)
    assert isinstance(tensor, torch.nn.Parameter), (
        "keras.Variable (torch backend) no longer keeps a torch.nn.Parameter as _value")
    strided = tensor.detach().permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0)
    compat.replace_torch_tensor(variable, strided)
    assert variable.value.stride() == strided.stride(), (
        "keras.Variable.value (torch) no longer returns the tensor stored in _value")
    assert variable.trainable and variable.value.requires_grad
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), values)
    before = compat.variable_version(variable)
    variable.assign(values + 1)
    after = compat.variable_version(variable)
    assert variable.value.stride() == strided.stride() and after == (before[0], before[1] + 1), (
        "keras.Variable.assign (torch) no longer writes in place into _value (copy_): replaced "
        "tensors lose their layout and FusedAdamW's host step counter re-reads every step")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), values + 1)


@torch_only
def test_variable_version_counts_assign_add():
    counter = keras.Variable(0, dtype="int64", trainable=False)
    before = compat.variable_version(counter)
    counter.assign_add(1)
    assert compat.variable_version(counter) == (before[0], before[1] + 1), (
        "keras.Variable.assign_add (torch) is no longer one in-place write into _value")


# optimizers ---------------------------------------------------------------------------------


def test_optimizer_slot_names_start_with_the_variable_path():
    dense = layers.Dense(2, name="dense_probe")
    dense.build((None, 3))
    optimizer = keras.optimizers.AdamW()
    optimizer.build(dense.trainable_variables)
    for variable in dense.trainable_variables:
        prefix = compat.optimizer_slot_prefix(variable)
        slots = [s for s in optimizer.variables if s.name.startswith(prefix)
                 and tuple(s.shape) == tuple(variable.shape)]
        assert len(slots) == 2, (
            f"Keras no longer names optimizer slots '{{variable.path with / as _}}_{{slot}}': no "
            f"two AdamW slots start with {prefix!r} in {[s.name for s in optimizer.variables]}")


@pytest.mark.parametrize("optimizer_class", [keras.optimizers.Adam, keras.optimizers.AdamW])
def test_adam_slots_are_the_moments(optimizer_class):
    variable = keras.Variable(np.zeros(3, "float32"))
    optimizer = optimizer_class(beta_1=0.9, beta_2=0.99)
    grad = np.array([1.0, -2.0, 3.0], "float32")
    optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
    m, v = (keras.ops.convert_to_numpy(s) for s in compat.adam_slots(optimizer, variable))
    np.testing.assert_allclose(m, 0.1 * grad, rtol=1e-5, err_msg=(
        f"{optimizer_class.__name__}._momentums[_get_variable_index(v)] is no longer the first moment"))
    np.testing.assert_allclose(v, 0.01 * grad**2, rtol=1e-5, err_msg=(
        f"{optimizer_class.__name__}._velocities[_get_variable_index(v)] is no longer the second moment"))


def test_uses_weight_decay_follows_the_exclusions():
    dense = layers.Dense(2)
    dense.build((None, 3))
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.build(dense.trainable_variables)
    assert compat.uses_weight_decay(optimizer, dense.kernel), (
        "Optimizer._use_weight_decay(kernel) is False without an exclusion")
    assert not compat.uses_weight_decay(optimizer, dense.bias), (
        "Optimizer._use_weight_decay no longer honours exclude_from_weight_decay(var_names)")


class _Probe(compat.UpdateStepOverride, keras.optimizers.AdamW):
    replace = True
    calls = None

    def replaces_update_step(self):
        return self.replace

    def update_all_variables(self, grads, variables, learning_rate):
        self.calls = (self.calls or []) + [(list(grads), list(variables), learning_rate)]


@pytest.mark.parametrize("replace", [True, False])
def test_update_step_override(replace):
    variable = keras.Variable(np.ones(2, "float32"))
    probe = _Probe(learning_rate=0.1, weight_decay=0.5, global_clipnorm=1.0)
    probe.replace = replace
    reference = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, global_clipnorm=1.0)
    twin = keras.Variable(np.ones(2, "float32"))
    grad = keras.ops.convert_to_tensor(np.array([30.0, 40.0], "float32"))  # norm 50: clipped
    probe.apply([grad], [variable])
    reference.apply([grad], [twin])
    assert int(keras.ops.convert_to_numpy(probe.iterations)) == 1
    if not replace:
        assert probe.calls is None
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable),
                                   keras.ops.convert_to_numpy(twin), rtol=1e-6)
        return
    assert probe.calls is not None and len(probe.calls) == 1, (
        "Optimizer.apply no longer calls _backend_update_step(grads, variables, lr) once a step")
    grads, variables, _ = probe.calls[0]
    assert variables[0] is variable
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grads[0]), [0.6, 0.8], rtol=1e-5,
                               err_msg="_backend_update_step no longer receives clipped gradients")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), [1.0, 1.0], err_msg=(
        "Optimizer.apply decayed the weights although _apply_weight_decay is overridden"))


def test_wrap_optimizer_apply_sees_every_step():
    model = _model()
    calls = []

    def counting(apply):
        def wrapped(grads, variables=None):
            calls.append(len(grads))
            return apply(grads, variables)

        return wrapped

    compat.wrap_optimizer_apply(model.optimizer, counting)
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert calls == [len(model.trainable_variables)] * 3, (
        f"Keras' trainer no longer calls optimizer.apply(grads, variables) once per step through "
        f"the instance attribute (calls: {calls}); data-parallel gradients would not be averaged")


def test_wrap_epoch_metrics_feeds_the_logs():
    model = _model(metrics=["mae"])
    seen = []

    def marked(original):
        def wrapped(logs):
            seen.append(sorted(logs))
            return {**original(logs), "probe": 7.0}

        return wrapped

    compat.wrap_epoch_metrics(model, marked)
    x, y = _data()
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert history.history.get("probe") == [7.0, 7.0], (
        "Keras' fit no longer logs what Model._get_metrics_result_or_logs(logs) returns at each "
        f"epoch end (history: {sorted(history.history)}); data-parallel metrics would be per rank")
    assert seen and "loss" in seen[0] and "mae" in seen[0]


def test_early_stopping_state_round_trip():
    model = _model()
    callback = keras.callbacks.EarlyStopping(monitor="loss", patience=2)
    callback.set_model(model)
    callback.on_train_begin()
    state = compat.early_stopping_state(callback)
    assert state["wait"] == 0 and state["best_weights"] is None, (
        f"EarlyStopping.on_train_begin no longer resets wait/best_weights: {state}")
    compat.set_early_stopping_state(callback, {"wait": 1, "best": 0.5, "best_epoch": 3})
    callback.on_epoch_end(4, {"loss": 0.9})  # no improvement on 0.5: the second epoch waited
    assert model.stop_training, (
        "EarlyStopping no longer acts on its wait/best attributes: a restored state is ignored")
    assert compat.early_stopping_state(callback)["best"] == 0.5
    assert compat.early_stopping_state(callback)["best_epoch"] == 3


# graphs, autocasting, loss scaling ------------------------------------------------------------


def test_graph_nodes_lists_every_call_after_its_inputs():
    inputs = keras.Input((3,))
    a = layers.Dense(4, name="a")(inputs)
    b = layers.Dense(4, name="b")(inputs)
    outputs = layers.Add(name="sum")([layers.ReLU(name="r")(a), b])
    model = keras.Model(inputs, outputs)
    nodes = compat.graph_nodes(model)
    names = [op.name for op, *_ in nodes]
    assert sorted(names) == ["a", "b", "r", "sum"], (
        f"Functional._nodes_by_depth no longer holds one node per call (input nodes left "
        f"out): {names}")
    made = {id(inputs)}
    for op, args, kwargs, outs in nodes:
        used = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        assert used and all(id(t) in made for t in used), (
            f"Functional._nodes_by_depth, read deepest first, no longer runs {op.name} after "
            "the calls that make its inputs (or Node.arguments lost its tensors)")
        made |= {id(t) for t in outs}
    assert id(model.outputs[0]) in made, "Node.outputs no longer holds the node's KerasTensors"


class _AutocastProbe(layers.Layer):
    def build(self, shape):
        self.w = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        scope = compat.current_autocast_scope()
        self.seen = None if scope is None else scope.dtype
        self.read = keras.backend.standardize_dtype(keras.ops.convert_to_tensor(self.w).dtype)
        with compat.autocast_scope(None):
            self.read_off = keras.backend.standardize_dtype(
                keras.ops.convert_to_tensor(self.w).dtype)
        return x


def test_autocast_scope_is_what_layer_call_opens():
    probe = _AutocastProbe(dtype="mixed_float16")
    probe(np.ones((1, 2), "float32"))
    assert probe.seen == "float16" and probe.read == "float16", (
        "Layer.__call__ no longer opens an AutocastScope(compute dtype) seen by "
        f"get_autocast_scope(), or variables no longer read as it says: {probe.seen}, {probe.read}")
    assert probe.read_off == "float32", "AutocastScope(None) no longer switches casting off"
    plain = _AutocastProbe()
    plain(np.ones((1, 2), "float32"))
    assert plain.seen is None, "a float32 layer's call runs inside an autocast scope"


@torch_only
def test_loss_scale_apply_override_replaces_common_apply():
    class Probe(compat.LossScaleApplyOverride, keras.optimizers.LossScaleOptimizer):
        calls = 0

        def apply_scaled(self, grads, trainable_variables):
            Probe.calls += 1
            return True

    model = _model(optimizer=Probe(keras.optimizers.SGD()))
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.train_on_batch(*_data(4))
    assert Probe.calls == 1, (
        "LossScaleOptimizer.apply no longer calls self._common_apply(grads, variables) once "
        "per step on this backend")
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables)), (
        "LossScaleOptimizer.apply changed the weights itself besides _common_apply")


# the package uses Keras internals through compat only ---------------------------------------

#: private Keras names the package relies on (found on instances below too, most of them)
KNOWN_PRIVATE = {
    "_value", "_kernel", "_flatten_layers", "_get_metrics_result_or_logs", "_backend_update_step",
    "_apply_weight_decay", "_get_variable_index", "_momentums", "_velocities", "_use_weight_decay",
    "_direct_assign", "_iterations", "_trainable_variables", "_layers", "_nodes_by_depth",
    "_common_apply",
}


def _keras_private_names() -> set[str]:
    """Private attribute names of typical Keras objects (a trained model, its layers,
    optimizers, variables, callbacks, metrics, losses), plus :data:`KNOWN_PRIVATE`."""
    model = _model(optimizer=keras.optimizers.AdamW(), metrics=["mae"])
    conv = layers.Conv2D(2, 3)
    conv.build((None, 8, 8, 3))
    model.train_on_batch(*_data(4))
    objects = [model, conv, model.optimizer, model.optimizer.variables[0], *compat.all_layers(model),
               keras.callbacks.EarlyStopping(), keras.callbacks.Callback(), keras.metrics.Mean(),
               keras.losses.MeanSquaredError(), keras.optimizers.Adam(),
               keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW())]
    names = {n for obj in objects for n in dir(obj) if n.startswith("_") and not n.startswith("__")}
    return names | KNOWN_PRIVATE


def _violations(code: str, where: str, private: set[str]) -> list[str]:
    """Uses of ``keras.src`` and of the ``private`` names in the module source ``code``."""
    found = []
    for node in ast.walk(ast.parse(code, where)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{where}:{line} imports {a.name}" for a in node.names
                      if a.name.startswith("keras.src")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src"):
            found.append(f"{where}:{line} imports from {node.module}")
        elif isinstance(node, ast.Attribute):
            if node.attr in private:
                found.append(f"{where}:{line} uses .{node.attr}")
            if node.attr == "src" and isinstance(node.value, ast.Name) and node.value.id == "keras":
                found.append(f"{where}:{line} uses keras.src")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
            found.append(f"{where}:{line} overrides {node.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in private or node.value.startswith("keras.src")):
            found.append(f"{where}:{line} names {node.value!r}")
        elif isinstance(node, ast.Assign):  # replacing a method on an instance (monkeypatching)
            found += [f"{where}:{line} assigns .{t.attr}" for t in node.targets
                      if isinstance(t, ast.Attribute) and t.attr in ("apply", "call", "fit",
                                                                     "train_step", "update_step")]
    return found


def test_no_keras_internals_outside_compat():
    private = _keras_private_names()
    found = [v for path in sorted(PACKAGE.rglob("*.py")) if path.name != "compat.py"
             for v in _violations(path.read_text(), str(path.relative_to(PACKAGE.parent)), private)]
    assert not found, ("Keras internals used outside xsight_keras/compat.py (add a named function "
                       "there, with a test here):\n" + "\n".join(found))


def test_the_internals_check_finds_what_it_should():
    code = ("from keras.src.backend import x\nimport keras.src.ops\n"
            "def f(model, v):\n    model._flatten_layers()\n    getattr(v, '_value')\n"
            "    model.optimizer.apply = None\n    keras.src.backend\n"
            "class O:\n    def _backend_update_step(self): pass\n")
    found = _violations(code, "probe.py", KNOWN_PRIVATE)
    assert len(found) == 7, found
