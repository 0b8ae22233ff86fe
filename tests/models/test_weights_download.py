"""encoder_weights="imagenet" downloads the checkpoint once into the torch hub cache, checks its
SHA-256 prefix, and leaves nothing behind when the download fails. No internet: the files are
served from 127.0.0.1 (or a file:// mirror)."""

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from tests.models.torch_resnet import make_torch_resnet
from xsight_keras.models import find_imagenet_checkpoint, get_encoder, resnet_encoder
from xsight_keras.models.encoders import (
    Checkpoint,
    CorruptDownloadError,
    WeightsDownloadError,
    download,
)


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory):
    """A random resnet18 state_dict named like torchvision's files: (folder, file name, hash
    prefix, the torch net)."""
    root = tmp_path_factory.mktemp("served")
    net = make_torch_resnet("resnet18", seed=3)
    tmp = root / "resnet18.tmp"
    torch.save(net.state_dict(), tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"resnet18-{prefix}.pth"
    tmp.rename(root / name)
    return root, name, prefix, net


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; ``/truncated/<name>`` announces the whole file and sends half of it,
    ``/corrupt/<name>`` sends it whole with one byte changed."""

    hits: ClassVar[list] = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind not in ("truncated", "corrupt"):
            return super().do_GET()
        data = bytearray(Path(self.directory, name).read_bytes())
        sent = data[: len(data) // 2] if kind == "truncated" else data
        if kind == "corrupt":
            sent[len(sent) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(bytes(sent))
        self.close_connection = True


@pytest.fixture
def server(served_checkpoint):
    """An HTTP server on 127.0.0.1 serving the checkpoint folder; yields (base URL, hits)."""
    root = served_checkpoint[0]
    handler = type("Handler", (_Handler,), {"hits": []})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty TORCH_HOME; returns its hub/checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(download.WEIGHTS_URL_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def use_checkpoint(monkeypatch, url, prefix):
    """Point resnet18's ImageNet checkpoint at ``url`` for this test."""
    monkeypatch.setattr(get_encoder("resnet18"), "imagenet", Checkpoint(url, prefix))


def closed_port_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_imagenet_weights_download_once_into_the_torch_hub_cache(
        served_checkpoint, server, cache, monkeypatch):
    root, name, prefix, net = served_checkpoint
    base, hits = server
    use_checkpoint(monkeypatch, f"{base}/{name}", prefix)
    cache.mkdir(parents=True)
    stale = cache / f".{name}.0123abcd.partial"  # left by a killed download: never used
    stale.write_bytes(b"half a file")

    model = resnet_encoder("resnet18", weights="imagenet")
    assert hits == [f"/{name}"]
    assert (cache / name).read_bytes() == (root / name).read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted([name, stale.name])
    kernel = net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.get_layer("enc_conv1").get_weights()[0], kernel)

    # the second time the cached file is used: no request
    model.get_layer("enc_conv1").set_weights([np.zeros_like(kernel)])
    get_encoder("resnet18").load_weights(model, "imagenet")
    assert find_imagenet_checkpoint("resnet18", download=True) == cache / name
    assert hits == [f"/{name}"]
    np.testing.assert_array_equal(model.get_layer("enc_conv1").get_weights()[0], kernel)


def test_mirror_prefix_replaces_the_published_url(served_checkpoint, cache, monkeypatch):
    root, name, prefix, _ = served_checkpoint
    use_checkpoint(monkeypatch, f"https://download.pytorch.org/models/{name}", prefix)
    monkeypatch.setenv(download.WEIGHTS_URL_ENV, root.as_uri() + "/")
    assert find_imagenet_checkpoint("resnet18", download=True) == cache / name
    assert (cache / name).read_bytes() == (root / name).read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_corrupt_or_truncated_download_is_refused_and_not_kept(
        served_checkpoint, server, cache, monkeypatch, kind):
    root, name, prefix, _ = served_checkpoint
    url = f"{server[0]}/{kind}/{name}"
    use_checkpoint(monkeypatch, url, prefix)
    data = bytearray((root / name).read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    actual = hashlib.sha256(data).hexdigest()[:8]
    with pytest.raises(CorruptDownloadError) as err:
        resnet_encoder("resnet18", weights="imagenet")
    message = str(err.value)
    assert url in message and f"starts with {actual}, expected {prefix}" in message
    assert isinstance(err.value, ValueError)  # the CLI reports it and exits with status 2
    if kind == "truncated":
        assert f"{len(data)} of {len((root / name).read_bytes())} bytes" in message
    assert list(cache.iterdir()) == []


def test_interrupted_download_leaves_nothing(served_checkpoint, cache, monkeypatch):

    root, name, prefix, _ = served_checkpoint

    def interrupted(response, out, *args):
        out.write(response.read(1000))
        raise KeyboardInterrupt  # Ctrl-C in the middle of the transfer

    monkeypatch.setattr(download, "_copy", interrupted)
    use_checkpoint(monkeypatch, (root / name).as_uri(), prefix)
    with pytest.raises(KeyboardInterrupt):
        find_imagenet_checkpoint("resnet18", download=True)
    assert [p.name for p in cache.iterdir()] == []


def test_offline_error_says_which_file_to_place_where(cache, monkeypatch):
    base = closed_port_url()
    monkeypatch.setenv(download.WEIGHTS_URL_ENV, base)  # the published checkpoint, via a mirror
    checkpoint = get_encoder("resnet18").imagenet
    with pytest.raises(WeightsDownloadError) as err:
        resnet_encoder("resnet18", weights="imagenet")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports it and exits with status 2
    assert f"{base}/{checkpoint.file_name}" in message
    assert f"place that file at {cache / checkpoint.file_name}" in message
    assert "encoder_weights: none" in message
    assert not cache.exists()  # offline: nothing was created


def test_a_server_that_never_answers_times_out_as_offline(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/resnet18-00000000.pth"
        destination = tmp_path / "checkpoints" / "resnet18-00000000.pth"
        with pytest.raises(WeightsDownloadError, match=rf"{url} \(.*timed out\).*{destination}"):
            download.download_checkpoint(url, destination, "00000000", timeout=0.3)
    assert not destination.parent.exists()
