"""The fused torch fast paths compute what Keras' own layers compute."""

import keras
import numpy as np
import pytest
from keras import layers

from xsight_keras.models import FusedBatchNormalization, FusedUpSampling2D


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
    for g_ref, g_fused in zip(*grads):
        np.testing.assert_allclose(g_fused, g_ref, atol=1e-4)


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
