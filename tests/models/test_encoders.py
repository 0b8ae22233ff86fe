import numpy as np
import pytest
import torch

from tests.helpers import to_format
from tests.models.torch_resnet import make_torch_resnet
from xsight_keras.config import load_config
from xsight_keras.models import (
    attention_unet,
    available_encoders,
    encoder_channels,
    find_imagenet_checkpoint,
    get_encoder,
    register_encoder,
    resnet_encoder,
)
from xsight_keras.models.encoders import ENCODER_PREFIX, Encoder, ResNet, registry


def torch_features(net, x_nhwc):
    with torch.no_grad():
        feats = net.features(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)))
    return [f.numpy().transpose(0, 2, 3, 1) for f in feats]


def keras_features(model, x_nhwc, data_format):
    feats = model.predict(to_format(x_nhwc, data_format), verbose=0)
    if data_format == "channels_first":
        feats = [f.transpose(0, 2, 3, 1) for f in feats]
    return feats


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", "resnet50"])
def test_skip_features_have_strides_2_to_32(encoder, data_format):
    model = resnet_encoder(encoder)
    x = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype("float32")
    feats = keras_features(model, x, data_format)
    assert [f.shape[1:3] for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert tuple(f.shape[-1] for f in feats) == encoder_channels(encoder)


@pytest.mark.parametrize(
    "encoder,data_format,suffix",
    [
        ("resnet34", "channels_last", ".pth"),
        ("resnet34", "channels_first", ".safetensors"),
        ("resnet50", "channels_last", ".pth"),
    ],
    indirect=["data_format"],
)
def test_torchvision_weights_import_matches_torch(tmp_path, encoder, data_format, suffix):
    net = make_torch_resnet(encoder)
    path = tmp_path / f"{encoder}-random{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = resnet_encoder(encoder, weights=path)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = torch_features(net, x)
    got = keras_features(model, x, data_format)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        assert np.abs(g - e).max() <= 1e-4, np.abs(g - e).max()


def test_grayscale_input_takes_summed_rgb_kernel(tmp_path):
    net = make_torch_resnet("resnet18")
    path = tmp_path / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    model = resnet_encoder("resnet18", input_channels=1, weights=path)
    gray = np.random.default_rng(2).normal(size=(1, 64, 64, 1)).astype("float32")
    expected = torch_features(net, np.repeat(gray, 3, axis=-1))  # same image in R, G and B
    got = model.predict(gray, verbose=0)
    assert np.abs(got[-1] - expected[-1]).max() <= 1e-4


def test_imagenet_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # not in the cache and not downloadable (no network in tests: an empty file:// mirror);
    # the download itself is tested in test_weights_download.py
    monkeypatch.setenv("XSIGHT_WEIGHTS_URL_PREFIX", (tmp_path / "empty_mirror").as_uri())
    with pytest.raises(FileNotFoundError) as err:
        resnet_encoder("resnet18", weights="imagenet")
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "resnet18-f37072fd.pth" in message  # says how to get it
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    net = make_torch_resnet("resnet18", seed=3)
    torch.save(net.state_dict(), folder / "resnet18-f37072fd.pth")
    assert find_imagenet_checkpoint("resnet18").name == "resnet18-f37072fd.pth"
    model = resnet_encoder("resnet18", weights="imagenet")
    kernel = net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.get_layer("enc_conv1").get_weights()[0], kernel)


def test_wrong_or_broken_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet34-wrong.pth"
    torch.save(make_torch_resnet("resnet34").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet34-wrong\.pth.*resnet18"):
        resnet_encoder("resnet18", weights=path)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        resnet_encoder("resnet18", weights=broken)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resnet_encoder("resnet18", weights=tmp_path / "missing.pth")


# -- the registry and the interface ----------------------------------------------------------


class ResNet18FromStride4(ResNet):
    """resnet18 without its stride-2 feature: an encoder that lacks a stride."""

    def __init__(self):
        super().__init__("test_resnet18_from_stride4", "basic", (2, 2, 2, 2))
        del self.channels[2]

    def features(self, x, prefix=ENCODER_PREFIX):
        feats = super().features(x, prefix)
        del feats[2]
        return feats


@pytest.fixture
def scratch_registry(monkeypatch):
    """Encoders registered in a test are forgotten afterwards."""
    monkeypatch.setattr(registry, "_ENCODERS", dict(registry._ENCODERS))


def test_registry_lists_encoders_and_names_them_on_a_typo():
    assert {"resnet18", "resnet34", "resnet50"} <= set(available_encoders())
    assert available_encoders() == sorted(available_encoders())
    enc = get_encoder("resnet50")
    assert enc.name == "resnet50" and enc.strides == (2, 4, 8, 16, 32)
    assert enc.channels == {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet99'.*'resnet18', 'resnet34'"):
        get_encoder("resnet99")
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet99'"):
        attention_unet(2, encoder="resnet99")
    with pytest.raises(ValueError, match=r"encoder must be one of .*'resnet34'.*got 'resnet99'"):
        load_config("demo", overrides={"encoder": "resnet99"})


def test_every_encoder_names_its_torchvision_checkpoint():
    for name in available_encoders():
        checkpoint = get_encoder(name).imagenet
        assert checkpoint.url.startswith("https://download.pytorch.org/models/")
        assert checkpoint.file_name == f"{name}-{checkpoint.sha256_prefix}.pth"
        assert len(checkpoint.sha256_prefix) == 8 and int(checkpoint.sha256_prefix, 16) >= 0


def test_registering_checks_names_and_strides(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(ResNet("resnet18", "basic", (2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"includes 32, got \[2, 4, 8, 16\]"):
        Encoder("too_shallow", {2: 8, 4: 8, 8: 8, 16: 8})
    with pytest.raises(ValueError, match=r"got \[3, 32\]"):
        Encoder("odd_stride", {3: 8, 32: 8})


def test_decoder_stage_without_a_skip_when_the_encoder_lacks_that_stride(
    tmp_path, scratch_registry
):
    register_encoder(ResNet18FromStride4())
    net = make_torch_resnet("resnet18")
    path = tmp_path / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    model = attention_unet(3, encoder="test_resnet18_from_stride4", encoder_weights=path,
                           decoder_filters=(16, 16, 8, 8, 8))
    gates = [layer.name for layer in model.layers if layer.name.endswith("_att_scale")]
    assert gates == ["dec1_att_scale", "dec2_att_scale", "dec3_att_scale"]  # no stride-2 skip
    np.testing.assert_array_equal(
        model.get_layer("enc_layer4_1_conv2").get_weights()[0],
        net.layer4[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    assert model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 32, 32, 3)
