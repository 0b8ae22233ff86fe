"""Models that know their configuration: the builders' arguments survive a .keras round trip,
grow() reads them, and building leaves Keras' global settings alone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from xsight_keras import _backend
from xsight_keras._backend import default_data_format
from xsight_keras.heads import FUSED, HV, INSTANCE, SEMANTIC
from xsight_keras.models import (
    AttentionUNet,
    ProgressiveUNet,
    attention_unet,
    describe_model,
    grow,
    progressive_unet,
)
from xsight_keras.models.base import clone_architecture

SMALL_DECODER = (32, 16, 16, 8, 8)


def test_default_layout_is_channels_first_on_torch_and_globals_stay(monkeypatch):
    monkeypatch.setattr(_backend, "default_data_format", default_data_format)  # the real default
    keras.config.set_image_data_format("channels_last")
    model = attention_unet(2, "resnet18", decoder_filters=SMALL_DECODER)
    expected = "channels_first" if keras.backend.backend() == "torch" else "channels_last"
    assert model.data_format == expected
    assert model.get_layer("enc_conv1").data_format == expected
    assert keras.config.image_data_format() == "channels_last"  # not switched by building
    assert keras.config.dtype_policy().name == "float32"


def test_saved_model_tells_family_encoder_heads_and_layout(tmp_path):
    model = attention_unet(3, "resnet18", decoder_filters=SMALL_DECODER, instance_head=True,
                           data_format="channels_last", input_channels=1, activation="softmax")
    model.save(tmp_path / "m.keras")
    keras.config.set_image_data_format("channels_first")  # loading must not depend on it
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, AttentionUNet)
    info = describe_model(loaded)
    assert info["family"] == "attention_unet" and info["encoder"] == "resnet18"
    assert info["data_format"] == "channels_last" and info["input_channels"] == 1
    assert info["instance_head"] and info["outputs"] == [SEMANTIC, INSTANCE]
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype("float32")
    for name, value in model.predict(x, verbose=0).items():
        np.testing.assert_allclose(loaded.predict(x, verbose=0)[name], value, atol=1e-6)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_grow_reads_the_saved_configuration(tmp_path, layout):
    stage1 = progressive_unet(1, num_classes=2, base_filters=4, dropout=0.2, instance_head=True,
                              data_format=layout)
    stage1.save(tmp_path / "s1.keras")
    other = "channels_last" if layout == "channels_first" else "channels_first"
    keras.config.set_image_data_format(other)
    stage2 = grow(keras.models.load_model(tmp_path / "s1.keras"))
    assert keras.config.image_data_format() == other
    assert isinstance(stage2, ProgressiveUNet)
    assert stage2.arguments | {"stage": 1} == stage1.arguments
    assert describe_model(stage2)["outputs"] == [FUSED, "scale_2", "scale_1", INSTANCE]
    np.testing.assert_array_equal(stage2.get_layer("enc1_block1_conv").get_weights()[0],
                                  stage1.get_layer("enc1_block1_conv").get_weights()[0])


def test_models_saved_before_they_kept_their_configuration_still_grow(tmp_path):
    built = progressive_unet(2, num_classes=1, base_filters=4, data_format="channels_first")
    legacy = keras.Model(built.inputs, built.outputs, name=built.name)  # a plain Functional
    legacy.save(tmp_path / "legacy.keras")
    loaded = keras.models.load_model(tmp_path / "legacy.keras")
    assert not isinstance(loaded, ProgressiveUNet)
    info = describe_model(loaded)
    assert info["family"] == "progressive_unet" and info["stage"] == 2
    grown = grow(loaded)
    assert grown.arguments["stage"] == 3 and grown.data_format == "channels_first"
    assert grown.arguments["base_filters"] == 4


def test_clone_keeps_class_layout_and_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = progressive_unet(2, num_classes=1, base_filters=4, data_format="channels_last")
    keras.config.set_dtype_policy("float32")
    clone = clone_architecture(model)
    assert isinstance(clone, ProgressiveUNet) and clone.data_format == "channels_last"
    assert clone.get_layer("enc1_block1_conv").compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"


def test_a_model_saved_by_the_code_before_this_contract_loads_predicts_and_grows():
    """tests/fixtures/legacy_pgu_stage2_instance.keras was saved by commit 91fa518 (PGU-Net
    stage 2, 3 classes, instance head, channels_first; plain Functional), with the outputs it
    gave for the stored input."""
    from tests.helpers import ROOT
    from xsight_keras.data import PreprocessConfig
    from xsight_keras.inference import Predictor

    fixtures = ROOT / "tests" / "fixtures"
    stored = np.load(fixtures / "legacy_pgu_stage2_instance.npz")
    model = keras.models.load_model(fixtures / "legacy_pgu_stage2_instance.keras")
    got = model.predict(stored["x"], verbose=0)
    assert sorted(got) == sorted(k for k in stored.files if k != "x")
    for name, value in got.items():
        np.testing.assert_allclose(value, stored[name], atol=1e-6, err_msg=name)
    info = describe_model(model)
    assert (info["stage"], info["num_classes"], info["instance_head"]) == (2, 3, True)
    assert grow(model).arguments["stage"] == 3
    maps = Predictor(model, PreprocessConfig(clahe_clip_limit=0, zscore="none"),
                     tile_size=64).predict_maps(np.zeros((70, 64, 3), np.uint8))
    assert maps[SEMANTIC].shape == (70, 64, 3) and maps[INSTANCE].shape == (70, 64, 2)


def test_separate_head_branches_are_their_own_decoder_and_round_trip(tmp_path):
    model = attention_unet(2, "resnet18", decoder_filters=SMALL_DECODER, instance_head=True,
                           heads=(HV,), head_branch_stages=2, data_format="channels_last")
    names = {layer.name for layer in model.layers}
    for head in (INSTANCE, HV):
        assert {f"{head}_dec4_block1_conv", f"{head}_dec5_block2_bn"} <= names
        assert f"{head}_dec3_block1_conv" not in names  # stages 1-3 stay shared
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    layer = model.get_layer(f"{HV}_dec5_block1_conv")
    layer.set_weights([w + 0.5 for w in layer.get_weights()])
    after = model.predict(x, verbose=0)
    np.testing.assert_array_equal(after[SEMANTIC], before[SEMANTIC])  # not on the hv branch
    np.testing.assert_array_equal(after[INSTANCE], before[INSTANCE])
    assert not np.allclose(after[HV], before[HV])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.arguments["head_branch_stages"] == 2
    for name, value in after.items():
        np.testing.assert_allclose(loaded.predict(x, verbose=0)[name], value, atol=1e-6)
    shared = attention_unet(2, "resnet18", decoder_filters=SMALL_DECODER, instance_head=True,
                            heads=(HV,), data_format="channels_last")
    assert not any(layer.name.startswith(f"{HV}_dec") for layer in shared.layers)
    with pytest.raises(ValueError, match="head_branch_stages"):
        attention_unet(2, "resnet18", decoder_filters=SMALL_DECODER, head_branch_stages=6)
