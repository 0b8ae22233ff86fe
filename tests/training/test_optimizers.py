"""FusedAdam / FusedAdamW update exactly as Keras' Adam / AdamW do."""

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights, same_computation_tolerance
from xsight_keras.models import TorchOrderConv2D
from xsight_keras.training import FusedAdam, FusedAdamW, OneCycle


def _variables(rng):
    shapes = {"conv/kernel": (3, 3, 4, 5), "conv/bias": (5,), "bn/gamma": (5,), "dense/kernel": (5, 2)}
    return {name: rng.normal(size=shape).astype("float32") for name, shape in shapes.items()}


def _run(optimizer, start, grads_per_step, layout=None, jump=None):
    """Apply ``grads_per_step`` with ``optimizer`` to fresh variables holding ``start``; return
    the final values. ``layout(variable)`` may re-lay a variable's memory before the optimizer
    is built; ``jump=(i, n)`` sets the iteration count to n before step i (as a resume does)."""
    variables = [keras.Variable(value, name=name.split("/")[1]) for name, value in start.items()]
    for v, name in zip(variables, start):
        v._path = name  # Keras names slots after variable paths: give them the real layers'
    if layout is not None:
        for v in variables:
            layout(v)
    optimizer.build(variables)
    for i, grads in enumerate(grads_per_step):
        if jump is not None and i == jump[0]:
            optimizer.iterations.assign(jump[1])
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _grads(rng, start, steps=6):
    return [[rng.normal(size=v.shape).astype("float32") * 10 ** rng.uniform(-4, 1) for v in start.values()]
            for _ in range(steps)]


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_fused_update_equals_keras_update(kind):
    rng = np.random.default_rng(0)
    start = _variables(rng)
    grads = _grads(rng, start)
    def make(fused):
        kwargs = {"learning_rate": OneCycle(1e-2, total_steps=100), "global_clipnorm": 1.0}
        if kind == "adamw":
            opt = (FusedAdamW if fused else keras.optimizers.AdamW)(weight_decay=0.05, **kwargs)
            opt.exclude_from_weight_decay(var_names=["bias", "gamma"])
        else:
            opt = (FusedAdam if fused else keras.optimizers.Adam)(**kwargs)
        return opt
    # the bias corrections depend on the step count: a jump (a resumed run) must be seen
    expected = _run(make(False), start, grads, jump=(3, 40))
    got = _run(make(True), start, grads, jump=(3, 40))
    assert len(got) == len(start)
    assert_same_weights(got, expected, rtol=1e-6, atol=1e-6, what=f"{kind} {list(start)}")
    # (atol: 1e-4 of the step size, float32 rounding in a different order of operations)
    # and it did move every variable (the comparison is not between two no-ops)
    assert all(not np.allclose(a, s) for a, s in zip(got, start.values()))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch memory layouts")
def test_fused_update_is_right_when_layouts_differ():
    """A kernel stored in PyTorch's order with a gradient laid out differently: the fused
    kernel walks raw memory, so this must take the copying path, not update wrong elements."""
    import torch

    from xsight_keras.models import store_kernel_in_torch_order

    rng = np.random.default_rng(1)
    start = _variables(rng)
    grads = _grads(rng, start, steps=3)
    expected = _run(keras.optimizers.AdamW(1e-2, weight_decay=0.05), start, grads)

    optimizer = FusedAdamW(1e-2, weight_decay=0.05)
    got = _run(optimizer, start, grads, layout=store_kernel_in_torch_order)
    kernel_slots = [v for v in optimizer.variables if v.name.startswith("conv_kernel_")]
    assert len(kernel_slots) == 2  # built in the kernel's layout (by FusedAdamW.build)
    assert all(not s.value.is_contiguous() for s in kernel_slots)
    assert_same_weights(got, expected, rtol=1e-6, atol=1e-6, what="variables")
    # the contiguous gradients above were laid out unlike the kernel; now a matching one
    conv = keras.Variable(start["conv/kernel"])
    store_kernel_in_torch_order(conv)
    g = torch.from_numpy(grads[0][0]).to(conv.value.device)
    g = g.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0)
    optimizer = FusedAdamW(1e-2, weight_decay=0.05)
    optimizer.build([conv])
    optimizer.apply([g], [conv])
    reference = keras.Variable(start["conv/kernel"])
    keras.optimizers.AdamW(1e-2, weight_decay=0.05).apply([keras.ops.convert_to_tensor(grads[0][0])], [reference])
    np.testing.assert_allclose(conv.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)


def test_fused_optimizer_round_trips_with_the_model(tmp_path):
    keras.config.set_image_data_format("channels_last")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, TorchOrderConv2D(2, 3, padding="same", name="conv")(inputs))
    optimizer = FusedAdamW(learning_rate=3e-3, weight_decay=0.02, global_clipnorm=1.0)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 8, 8, 3)).astype("float32"), rng.normal(size=(4, 8, 8, 2)).astype("float32")
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is FusedAdamW
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert_same_weights([keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables],
                        [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables],
                        what="optimizer variables")
    # both continue identically
    model.fit(x, y, epochs=1, verbose=0)
    loaded.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(loaded.get_weights()[0], model.get_weights()[0], rtol=1e-6, atol=1e-7)


# DeviceLossScaleOptimizer ----------------------------------------------------------------------

torch_only = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch fast path")


def _loss_scaled_run(wrapper, inner, policy="float32", steps=12, overflow=(2, 3, 7)):
    """Train a small model with ``wrapper(inner)``; the listed steps overflow the scaled loss.
    Returns (weights, optimizer variables, its iterations, scale, counter, tensor→bool reads)."""
    import torch

    from xsight_keras.models.base import building

    keras.utils.set_random_seed(0)
    with building("channels_first", policy):
        inputs = keras.Input((2, 8, 8))
        x = TorchOrderConv2D(4, 3, padding="same", data_format="channels_first")(inputs)
        x = keras.layers.ReLU()(x)
        outputs = keras.layers.Conv2D(3, 1, data_format="channels_first", dtype="float32")(x)
        model = keras.Model(inputs, outputs)
    optimizer = wrapper(inner, initial_scale=2.0**15, dynamic_growth_steps=3)
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    reads = []
    original = torch.Tensor.__bool__

    def counting(self):
        reads.append(1)
        return original(self)

    for i in range(steps):
        x = rng.normal(size=(4, 2, 8, 8)).astype("float32")
        y = rng.normal(size=(4, 3, 8, 8)).astype("float32")
        if i in overflow:
            y[0, 0, 0, 0] = 3e38  # the scaled loss's gradient overflows (in float32 too)
        torch.Tensor.__bool__ = counting
        try:
            model.train_on_batch(x, y)
        finally:
            torch.Tensor.__bool__ = original
    return ([v.numpy() for v in model.weights], [v.numpy() for v in optimizer.variables],
            int(optimizer.iterations.numpy()), float(optimizer.dynamic_scale.numpy()),
            int(optimizer.step_counter.numpy()), len(reads))


@torch_only
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_device_loss_scaling_equals_keras_and_reads_nothing_back(policy):
    """Skipped overflow steps, scale halving and growth, clipping and weight decay: the same
    weights, moments, step count, scale and counter as Keras' LossScaleOptimizer, without the
    two device→host boolean reads per step Keras' ``ops.cond`` makes."""
    from xsight_keras.training import DeviceLossScaleOptimizer

    def inner():
        opt = FusedAdamW(1e-2, weight_decay=0.01, global_clipnorm=0.5)
        opt.exclude_from_weight_decay(var_names=["bias"])
        return opt

    keras_run = _loss_scaled_run(keras.optimizers.LossScaleOptimizer, inner(), policy)
    device_run = _loss_scaled_run(DeviceLossScaleOptimizer, inner(), policy)
    tol = same_computation_tolerance()
    assert_same_weights(device_run[0], keras_run[0], what="weights", **tol)
    assert_same_weights(device_run[1], keras_run[1], what="optimizer variables", **tol)
    assert device_run[2:5] == keras_run[2:5]
    assert keras_run[2] == 9  # 12 steps, 3 skipped
    assert keras_run[3] != 2.0**15  # the scale moved
    assert keras_run[5] >= 12 and device_run[5] == 0


@torch_only
def test_device_loss_scaling_falls_back_to_keras_for_other_optimizers():
    from xsight_keras.training import DeviceLossScaleOptimizer

    keras_run = _loss_scaled_run(keras.optimizers.LossScaleOptimizer, keras.optimizers.AdamW(1e-2))
    device_run = _loss_scaled_run(DeviceLossScaleOptimizer, keras.optimizers.AdamW(1e-2))
    assert_same_weights(device_run[0], keras_run[0])
    assert device_run[2:5] == keras_run[2:5] and device_run[5] > 0  # Keras' code ran


def test_device_loss_scale_optimizer_round_trips_with_the_model(tmp_path):
    from xsight_keras.training import DeviceLossScaleOptimizer

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=DeviceLossScaleOptimizer(FusedAdamW(1e-3), dynamic_growth_steps=7),
                  loss="mse")
    model.train_on_batch(np.ones((2, 3), "float32"), np.zeros((2, 2), "float32"))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is DeviceLossScaleOptimizer
    assert type(loaded.optimizer.inner_optimizer) is FusedAdamW
    assert loaded.optimizer.dynamic_growth_steps == 7
    assert_same_weights([v.numpy() for v in loaded.optimizer.variables],
                        [v.numpy() for v in model.optimizer.variables])


@torch_only
def test_device_loss_scaling_leaves_constrained_variables_to_keras():
    """Keras applies constraints after each inner update and skips the inner optimizer on an
    overflow; the device path would apply them on skipped steps too, so such models take
    Keras' path (its boolean reads show it) and end as with Keras' optimizer."""
    import torch

    from xsight_keras.training import DeviceLossScaleOptimizer

    def run(wrapper):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(3, kernel_constraint=keras.constraints.UnitNorm())(inputs)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=wrapper(FusedAdamW(1e-2)), loss="mse")
        reads, original = [], torch.Tensor.__bool__
        rng = np.random.default_rng(0)
        for i in range(4):
            y = rng.normal(size=(8, 3)).astype("float32")
            if i == 1:
                y[0, 0] = 3e38
            torch.Tensor.__bool__ = lambda self: reads.append(1) or original(self)
            try:
                model.train_on_batch(rng.normal(size=(8, 4)).astype("float32"), y)
            finally:
                torch.Tensor.__bool__ = original
        return [v.numpy() for v in model.weights], len(reads)

    keras_weights, _ = run(keras.optimizers.LossScaleOptimizer)
    device_weights, reads = run(DeviceLossScaleOptimizer)
    assert reads > 0
    assert_same_weights(device_weights, keras_weights)
