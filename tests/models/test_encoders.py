import numpy as np
import pytest
import torch

from tests.helpers import to_format
from tests.models.torch_resnet import make_torch_resnet
from xsight_keras.models import encoder_channels, find_imagenet_checkpoint, resnet_encoder


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
