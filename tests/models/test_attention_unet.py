import keras
import numpy as np
import pytest

from tests.helpers import to_format
from xsight_keras.models import attention_unet

SMALL_DECODER = (32, 16, 16, 8, 8)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (128, 64)])
def test_output_has_input_size_and_one_channel_per_class(size, data_format):
    model = attention_unet(6, encoder="resnet18", decoder_filters=SMALL_DECODER)
    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype("float32")
    y = model.predict(to_format(x, data_format), verbose=0)
    expected = (2, *size, 6) if data_format == "channels_last" else (2, 6, *size)
    assert y.shape == expected
    assert y.dtype == np.float32
    class_axis = -1 if data_format == "channels_last" else 1
    np.testing.assert_allclose(y.sum(axis=class_axis), 1.0, atol=1e-5)  # softmax over classes


def test_resnet34_parameter_count():
    # The figure printed in the README; changes to the architecture must update both.
    assert attention_unet(6).count_params() == 24_591_034
    assert attention_unet(1, activation="sigmoid", input_channels=1).count_params() == 24_584_677


def test_size_not_a_multiple_of_32_is_a_clear_error():
    model = attention_unet(2, encoder="resnet18", decoder_filters=SMALL_DECODER)
    with pytest.raises(ValueError, match=r"multiples of 32, got 48×64"):
        model(np.zeros((1, 48, 64, 3), "float32"))
    with pytest.raises(ValueError, match=r"multiples of 32, got 100×100"):
        attention_unet(2, encoder="resnet18", input_size=(100, 100))


def test_sigmoid_grayscale_head_gives_probabilities():
    model = attention_unet(
        1, encoder="resnet18", decoder_filters=SMALL_DECODER, activation="sigmoid", input_channels=1
    )
    y = model.predict(np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype("float32"), verbose=0)
    assert y.shape == (1, 64, 64, 1)
    assert 0.0 <= y.min() and y.max() <= 1.0


def test_attention_gates_sit_on_every_skip():
    model = attention_unet(3, encoder="resnet18", decoder_filters=SMALL_DECODER)
    gates = [layer.name for layer in model.layers if layer.name.endswith("_att_scale")]
    assert gates == ["dec1_att_scale", "dec2_att_scale", "dec3_att_scale", "dec4_att_scale"]


def test_one_training_step_lowers_the_loss(data_format):
    keras.utils.set_random_seed(0)
    model = attention_unet(3, encoder="resnet18", decoder_filters=SMALL_DECODER, dropout=0.1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, 64, 3)).astype("float32")
    labels = (x[..., 0] > 0).astype("int32") + (x[..., 1] > 1).astype("int32")
    y = keras.utils.to_categorical(labels, 3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    x, y = to_format(x, data_format), to_format(y, data_format)
    before = model.evaluate(x, y, verbose=0)
    for _ in range(3):
        model.train_on_batch(x, y)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(after) and after < before
