import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import xsight_keras
from xsight_keras.models import attention_unet, progressive_unet

LOAD_AND_PREDICT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import xsight_keras  # registers the custom objects
    model = keras.models.load_model(sys.argv[1], safe_mode=True)
    out = model.predict(np.load(sys.argv[2]), verbose=0)
    if isinstance(out, dict):
        out = out["fused"]
    np.save(sys.argv[3], out)
    """
)


@pytest.mark.parametrize("family", ["attention_unet", "progressive_unet"])
def test_saved_model_predicts_the_same_in_a_fresh_process(tmp_path, family):
    keras.utils.set_random_seed(0)
    if family == "attention_unet":
        model = attention_unet(4, encoder="resnet18", decoder_filters=(32, 16, 16, 8, 8))
    else:
        model = progressive_unet(2, in_channels=3, num_classes=1, base_filters=4)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    expected = model.predict(x, verbose=0)
    expected = expected["fused"] if isinstance(expected, dict) else expected
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_PREDICT)
    env_backend = {"KERAS_BACKEND": keras.backend.backend()}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.keras"), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        check=True, env={**_base_env(), **env_backend}, capture_output=True,
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-6)


def _base_env():
    import os

    return {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}


def test_size_check_round_trips_in_channels_first(tmp_path):
    keras.config.set_image_data_format("channels_first")
    model = progressive_unet(1, in_channels=1, num_classes=1, base_filters=4)
    model.save(tmp_path / "cf.keras")
    keras.config.set_image_data_format("channels_last")
    loaded = keras.models.load_model(tmp_path / "cf.keras")
    assert loaded.get_layer("size_check").data_format == "channels_first"
    assert loaded.predict(np.zeros((1, 1, 32, 32), "float32"), verbose=0)["fused"].shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="multiples of 2"):
        loaded(np.zeros((1, 1, 33, 32), "float32"))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_one_training_step_under_mixed_precision(policy):
    # mixed_float16 is slow on CPU (emulated kernels) but these models are tiny: one step still
    # proves the models build and train under the policy the CUDA presets use.
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    models = [
        attention_unet(3, encoder="resnet18", decoder_filters=(16, 16, 8, 8, 8)),
        progressive_unet(1, in_channels=3, num_classes=3, base_filters=4),
    ]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, size=(2, 32, 32)), 3)
    for model in models:
        first_conv = "enc_conv1" if "attention" in model.name else "enc1_block1_conv"
        assert model.get_layer(first_conv).compute_dtype == policy.removeprefix("mixed_")
        optimizer = keras.optimizers.Adam(1e-3)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        targets = y if "attention" in model.name else {"fused": y, "scale_1": y}
        loss = model.train_on_batch(x, targets)
        assert np.all(np.isfinite(loss))
        out = model.predict(x, verbose=0)
        out = out["fused"] if isinstance(out, dict) else out
        assert out.dtype == np.float32  # the final activation runs in float32


def test_package_selects_torch_backend_when_none_chosen(tmp_path):
    env = {**_base_env(), "KERAS_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import xsight_keras, keras; print(keras.backend.backend())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == "torch"
    assert xsight_keras.__version__
