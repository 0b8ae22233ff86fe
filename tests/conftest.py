import os

os.environ.setdefault("KERAS_BACKEND", "torch")

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


@pytest.fixture(params=["channels_last", "channels_first"])
def data_format(request):
    """Run a test once per image data format."""
    keras.config.set_image_data_format(request.param)
    return request.param


def to_format(x, data_format):
    """NHWC numpy array -> the layout of ``data_format``."""
    return x if data_format == "channels_last" else x.transpose(0, 3, 1, 2)
