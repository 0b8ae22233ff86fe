import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import shutil

import keras
import pytest


@pytest.fixture(autouse=True)
def _restore_keras_globals():
    """Tests may switch the data format or dtype policy; put both back afterwards."""
    data_format = keras.config.image_data_format()
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy(policy)


@pytest.fixture(autouse=True)
def _builders_follow_keras_image_data_format(monkeypatch):
    """Model builders given no ``data_format`` pick the backend's fast layout (channels_first on
    torch; tested in tests/models/test_model_config.py). The other tests choose the layout with
    ``keras.config.set_image_data_format`` (the ``data_format`` fixture runs them in both), so
    here a builder without ``data_format`` follows that setting."""
    from xsight_keras import _backend

    monkeypatch.setattr(_backend, "default_data_format", keras.config.image_data_format)


@pytest.fixture(params=["channels_last", "channels_first"])
def data_format(request):
    """Run a test once per image data format."""
    keras.config.set_image_data_format(request.param)
    return request.param


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The synthetic demo set, written once per session: 256 px tiles, train 8 / valid 4 /
    test 3, seed 0. Read-only: a test that damages data writes its own copy."""
    from xsight_keras.data import write_demo_dataset

    root = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(root, {"train": 8, "valid": 4, "test": 3}, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory):
    """One tiny demo run trained once per session (1 epoch, 64 px, TTA validation).
    Read-only: tests that write into a run use :func:`run_copy`."""
    from xsight_keras.config import load_config
    from xsight_keras.training.run import train

    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path_factory.mktemp("runs")),
        "experiment_name": "tiny", "epochs": 1, "batch_size": 4, "input_size": 64, "val_size": 64,
        "tta_val": True, "decoder_filters": "16,16,8,8,8"})
    return train(config).run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of :func:`trained_run` that a test may write into."""
    return shutil.copytree(trained_run, tmp_path / trained_run.name)
