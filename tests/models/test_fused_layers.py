"""The fused torch fast paths compute what Keras' own layers compute."""

import keras
import numpy as np
import pytest
from keras import layers

from tests.helpers import assert_same_weights
from xsight_keras.models import (
    FusedBatchNormalization,
    FusedUpSampling2D,
    TorchOrderConv2D,
    match_optimizer_layout,
)

torch_only = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch memory layout")


def _pair(data_format, channels=5):
    """A Keras BatchNormalization and a fused one with the same random weights and statistics."""
    axis = -1 if data_format == "channels_last" else 1
    shape = (2, 6, 7, channels) if data_format == "channels_last" else (2, channels, 6, 7)
    rng = np.random.default_rng(0)
    ref = layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5)
    fused = FusedBatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5)
    ref.build(shape)
    fused.build(shape)
    weights = [rng.normal(size=channels), rng.normal(size=channels),
               rng.normal(size=channels), rng.uniform(0.5, 2, size=channels)]
    ref.set_weights(weights)
    fused.set_weights(weights)
    x = rng.normal(2.0, 3.0, size=shape).astype("float32")
    return ref, fused, x


def test_batch_norm_matches_keras_in_inference_and_training(data_format):
    ref, fused, x = _pair(data_format)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused(x, training=False)),
                               keras.ops.convert_to_numpy(ref(x, training=False)), atol=1e-5)
    start_var = keras.ops.convert_to_numpy(fused.moving_variance).copy()
    out_ref = keras.ops.convert_to_numpy(ref(x, training=True))
    out_fused = keras.ops.convert_to_numpy(fused(x, training=True))
    np.testing.assert_allclose(out_fused, out_ref, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused.moving_mean),
                               keras.ops.convert_to_numpy(ref.moving_mean), rtol=1e-5, atol=1e-6)
    # PyTorch's moving variance takes the unbiased batch variance (Keras the biased one)
    axes = tuple(i for i in range(4) if i != fused.axis % 4)
    n = x.size // x.shape[fused.axis]
    expected = 0.9 * start_var + 0.1 * x.var(axis=axes) * n / (n - 1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused.moving_variance), expected, rtol=1e-4)


def test_batch_norm_frozen_layer_uses_moving_statistics():
    ref, fused, x = _pair("channels_first")
    ref.trainable = fused.trainable = False
    before = keras.ops.convert_to_numpy(fused.moving_mean).copy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused(x, training=True)),
                               keras.ops.convert_to_numpy(ref(x, training=True)), atol=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused.moving_mean), before)


def test_batch_norm_gradients_match_keras():
    ref, fused, x = _pair("channels_first")
    weights = keras.ops.reshape(keras.ops.linspace(-1.0, 1.0, x.size), x.shape)
    grads = []
    for layer in (ref, fused):
        xt = keras.ops.convert_to_tensor(x).requires_grad_()  # on the backend's device
        (layer(xt, training=True) * weights).sum().backward()
        grads.append([keras.ops.convert_to_numpy(g) for g in
                      (xt.grad, layer.gamma.value.grad, layer.beta.value.grad)])
    assert_same_weights(grads[1], grads[0], rtol=1e-7, atol=1e-4, what="input, gamma, beta grads")


def test_batch_norm_under_mixed_bfloat16_keeps_float32_statistics():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = FusedBatchNormalization(axis=1)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype("float32")
    out = layer(keras.ops.cast(x, "bfloat16"), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.moving_mean.dtype == "float32"
    expected = (x - x.mean((0, 2, 3), keepdims=True)) / np.sqrt(x.var((0, 2, 3), keepdims=True) + 1e-3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), expected, atol=0.05)


def test_batch_norm_in_a_stateless_scope_is_keras_own():
    ref, fused, x = _pair("channels_last")
    with keras.StatelessScope() as scope:
        out = fused(x, training=True)
    # the update went to the scope, not to the variable (as Keras' layer does it)
    assert scope.get_current_value(fused.moving_mean) is not None
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out),
                               keras.ops.convert_to_numpy(ref(x, training=True)), atol=1e-4)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_upsampling_matches_keras(data_format, interpolation):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype("float32")
    if data_format == "channels_last":
        x = x.transpose(0, 2, 3, 1).copy()
    ref = layers.UpSampling2D((2, 4), interpolation=interpolation, data_format=data_format)
    fused = FusedUpSampling2D((2, 4), interpolation=interpolation, data_format=data_format)
    out = keras.ops.convert_to_numpy(fused(x))
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(ref(x)), atol=1e-5)
    assert out.shape == tuple(ref.compute_output_shape(x.shape))


def test_fused_layers_round_trip_through_keras_files(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = FusedBatchNormalization(name="bn")(inputs)
    outputs = FusedUpSampling2D(2, name="up")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").set_weights([np.full(3, 2.0, "float32"), np.ones(3, "float32"),
                                       np.zeros(3, "float32"), np.ones(3, "float32")])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    assert type(loaded.get_layer("up")) is FusedUpSampling2D
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)))


def _conv_pair(conv_class, data_format, kernel_size=3, strides=1, filters=4):
    """A tiny Functional model: conv -> BN -> ReLU -> 1×1 conv, built with ``conv_class``."""
    shape = (8, 8, 3) if data_format == "channels_last" else (3, 8, 8)
    inputs = keras.Input(shape)
    x = conv_class(filters, kernel_size, strides=strides, padding="same", name="conv")(inputs)
    x = layers.ReLU()(FusedBatchNormalization(axis=-1 if data_format == "channels_last" else 1)(x))
    outputs = conv_class(2, 1, name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (1, 1), (7, 2)])
def test_torch_order_conv_matches_keras_conv(data_format, kernel_size, strides):
    ref = _conv_pair(layers.Conv2D, data_format, kernel_size, strides)
    fast = _conv_pair(TorchOrderConv2D, data_format, kernel_size, strides)
    fast.set_weights(ref.get_weights())
    conv = fast.get_layer("conv")
    # the Keras view is untouched: shape and get_weights in (kh, kw, in, out)
    assert tuple(conv.kernel.shape) == (kernel_size, kernel_size, 3, 4)
    np.testing.assert_array_equal(conv.get_weights()[0], ref.get_layer("conv").get_weights()[0])
    x = np.random.default_rng(0).normal(size=(2,) + tuple(ref.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fast(x, training=True)),
                               keras.ops.convert_to_numpy(ref(x, training=True)), atol=1e-5)


@torch_only
def test_torch_order_conv_kernel_and_gradient_need_no_copy():
    import torch

    model = _conv_pair(TorchOrderConv2D, "channels_first")
    kernel = model.get_layer("conv").kernel
    assert kernel.value.permute(3, 2, 0, 1).is_contiguous()  # what the backend hands to conv2d
    # the tensor the layer's module tracks is the one the variable holds (zero_grad reaches it)
    assert any(p is kernel.value for p in model.parameters())
    x = torch.randn(2, 3, 8, 8)
    model(x, training=True).sum().backward()
    assert kernel.value.grad.stride() == kernel.value.stride()


@torch_only
def test_training_with_torch_order_kernels_equals_keras_conv_training(tmp_path):
    """Same data, same start: SGD with momentum on TorchOrderConv2D kernels (slot re-laid by
    match_optimizer_layout) ends where plain Keras Conv2D ends; AdamW's two slots are re-laid
    too; the layout survives saving and loading. (SGD for the comparison: Adam turns the
    last-bit differences of two convolution algorithms on near-zero gradients into ±lr steps.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 8, 8)).astype("float32")
    y = rng.normal(size=(8, 2, 8, 8)).astype("float32")
    keras.config.set_image_data_format("channels_first")
    models = [_conv_pair(layers.Conv2D, "channels_first"), _conv_pair(TorchOrderConv2D, "channels_first")]
    models[1].set_weights(models[0].get_weights())
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=1.0),
                      loss="mse")
        model.optimizer.build(model.trainable_variables)
        match_optimizer_layout(model.optimizer, model.trainable_variables)
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    ref, fast = models
    kernel = fast.get_layer("conv").kernel
    slots = [v for v in fast.optimizer.variables if v.name.startswith("conv_kernel_")]
    assert len(slots) == 1 and slots[0].value.stride() == kernel.value.stride()
    assert_same_weights(fast.get_weights(), ref.get_weights(), rtol=1e-4, atol=1e-6,
                        what="trained weights")

    adamw = keras.optimizers.AdamW(1e-3)
    adamw.build(fast.trainable_variables)
    assert match_optimizer_layout(adamw, fast.trainable_variables) == 4  # m, v of both kernels
    slots = [v for v in adamw.variables if v.name.startswith("conv_kernel_")]
    assert len(slots) == 2 and all(s.value.stride() == kernel.value.stride() for s in slots)
    assert not np.allclose(ref.get_layer("conv").get_weights()[0],
                           _conv_pair(layers.Conv2D, "channels_first").get_layer("conv").get_weights()[0])

    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert type(loaded.get_layer("conv")) is TorchOrderConv2D
    assert loaded.get_layer("conv").kernel.value.permute(3, 2, 0, 1).is_contiguous()
    np.testing.assert_array_equal(loaded.get_layer("conv").get_weights()[0], kernel.numpy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(fast(x)),
                               atol=1e-6)
