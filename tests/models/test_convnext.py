import keras
import numpy as np
import pytest
import torch

from tests.helpers import to_format
from tests.models.torch_convnext import make_torch_convnext
from xsight_keras.models import (
    attention_unet,
    find_imagenet_checkpoint,
    get_encoder,
    register_encoder,
)
from xsight_keras.models.encoders import registry
from xsight_keras.models.encoders.convnext import ChannelLayerNormalization, ConvNeXt

STRIDES = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def torch_net_and_file(tmp_path_factory):
    """A random torchvision-layout ConvNeXt-Tiny and its state_dict saved as a .pth file."""
    net = make_torch_convnext(seed=0)
    path = tmp_path_factory.mktemp("convnext") / "convnext_tiny-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_convnext_tiny_features_match_plain_pytorch(torch_net_and_file, data_format):
    net, path = torch_net_and_file
    encoder = get_encoder("convnext_tiny")
    assert encoder.channels == {4: 96, 8: 192, 16: 384, 32: 768}  # no stride-2 feature
    model = encoder.build(weights=path)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    with torch.no_grad():
        expected = net.pyramid(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    got = model.predict(to_format(x, data_format), verbose=0)
    for stride, g in zip(STRIDES, got):
        e = expected[stride].numpy()
        if data_format == "channels_last":
            g = g.transpose(0, 3, 1, 2)
        assert g.shape == e.shape == (2, encoder.channels[stride], 64 // stride, 64 // stride)
        assert np.abs(g - e).max() <= 1e-4, (stride, np.abs(g - e).max())


def test_attention_unet_on_convnext_runs_and_round_trips(torch_net_and_file, tmp_path):
    keras.config.set_image_data_format("channels_first")  # the configuration's default
    net, path = torch_net_and_file
    model = attention_unet(3, encoder="convnext_tiny", encoder_weights=path,
                           decoder_filters=(16, 16, 8, 8, 8))
    gates = [layer.name for layer in model.layers if layer.name.endswith("_att_scale")]
    assert gates == ["dec1_att_scale", "dec2_att_scale", "dec3_att_scale"]  # strides 16, 8, 4
    scale = net.features[5][8].layer_scale.detach().numpy().reshape(-1)
    np.testing.assert_array_equal(model.get_layer("enc_features_5_8_layer_scale").get_weights()[0],
                                  scale)
    x = np.random.default_rng(2).normal(size=(1, 3, 64, 64)).astype("float32")
    y = model.predict(x, verbose=0)
    assert y.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    model.save(tmp_path / "convnext_unet.keras")
    loaded = keras.models.load_model(tmp_path / "convnext_unet.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), y, atol=1e-6)


def test_grayscale_stem_takes_the_summed_rgb_kernel(torch_net_and_file):
    net, path = torch_net_and_file
    model = get_encoder("convnext_tiny").build(input_channels=1, weights=path)
    rgb = net.features[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(model.get_layer("enc_features_0_0").get_weights()[0],
                               rgb.sum(axis=2, keepdims=True), rtol=1e-6)


def test_imagenet_checkpoint_is_named_with_its_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"convnext_tiny-983f1562\.pth"):
        find_imagenet_checkpoint("convnext_tiny")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_channel_layer_norm_normalises_channels_first_under_any_policy(policy):
    # Channels first with width == channels: the case Keras' own layer gets wrong on torch.
    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(3).normal(3.0, 2.0, size=(2, 4, 5, 4)).astype("float32")
    layer = ChannelLayerNormalization(axis=1, epsilon=1e-6)
    y = keras.ops.convert_to_numpy(keras.ops.cast(layer(x), "float32"))
    assert layer.gamma.dtype == "float32"  # statistics and affine terms stay float32
    assert str(layer.compute_dtype) == ("bfloat16" if policy.startswith("mixed") else "float32")
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, expected, atol=2e-2 if policy.startswith("mixed") else 1e-5)
    restored = ChannelLayerNormalization.from_config(layer.get_config())
    assert restored.axis == 1  # the built layer's config says [1]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_one_training_step_under_mixed_precision(policy, monkeypatch):
    # A 4-block ConvNeXt (same code as convnext_tiny, narrower) keeps this fast.
    monkeypatch.setattr(registry, "_ENCODERS", dict(registry._ENCODERS))
    register_encoder(ConvNeXt("test_convnext_mini", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = attention_unet(3, encoder="test_convnext_mini", decoder_filters=(16, 16, 8, 8, 8))
    assert model.get_layer("enc_features_1_0_block_3").compute_dtype == policy.removeprefix("mixed_")
    assert model.get_layer("enc_features_1_0_layer_scale").gamma.dtype == "float32"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, size=(2, 32, 32)), 3)
    optimizer = keras.optimizers.Adam(1e-3)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    assert np.isfinite(model.train_on_batch(x, y))
    assert model.predict(x, verbose=0).dtype == np.float32
