"""FusedAdam / FusedAdamW update exactly as Keras' Adam / AdamW do."""

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights
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
