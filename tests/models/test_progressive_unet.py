import keras
import numpy as np
import pytest

from tests.helpers import to_format
from xsight_keras.models import STAGE_RESOLUTIONS, grow, inference_view, progressive_unet


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_outputs_one_map_per_scale_plus_fused(stage, data_format):
    model = progressive_unet(stage, in_channels=1, num_classes=1, base_filters=4)
    size = STAGE_RESOLUTIONS[stage]
    x = np.random.default_rng(0).normal(size=(2, size, size, 1)).astype("float32")
    out = model.predict(to_format(x, data_format), verbose=0)
    scales = [2**i for i in range(stage)]
    assert list(out) == ["fused"] + [f"scale_{s}" for s in scales]
    for s in scales:
        hw = (size // s, size // s)
        expected = (2, *hw, 1) if data_format == "channels_last" else (2, 1, *hw)
        assert out[f"scale_{s}"].shape == expected
    assert out["fused"].shape == out["scale_1"].shape
    assert 0.0 <= out["fused"].min() and out["fused"].max() <= 1.0  # sigmoid for one class
    n_levels = sum(1 for layer in model.layers if layer.name.endswith("_head"))
    assert n_levels == stage


def test_multiclass_rgb_head_is_softmax_and_accepts_larger_inputs():
    model = progressive_unet(2, in_channels=3, num_classes=4, base_filters=4)
    out = model.predict(np.random.default_rng(0).random((1, 96, 128, 3), "float32"), verbose=0)
    assert out["fused"].shape == (1, 96, 128, 4)
    assert out["scale_2"].shape == (1, 48, 64, 4)
    np.testing.assert_allclose(out["fused"].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(np.zeros((1, 66, 64, 3), "float32"))


def test_grow_copies_every_shared_weight_and_initialises_the_new_level(data_format):
    keras.utils.set_random_seed(0)
    stage1 = progressive_unet(1, in_channels=3, num_classes=2, base_filters=4)
    for layer in stage1.layers:  # make the trained weights distinguishable from any init
        layer.set_weights([w + 0.123 for w in layer.get_weights()])
    stage2 = grow(stage1)
    assert stage2.name == "progressive_unet_stage2"
    assert stage2.get_layer("dec2_head").filters == 2
    old = {layer.name: layer for layer in stage1.layers}
    shared = [l for l in stage2.layers if l.weights and l.name in old]
    assert {l.name for l in shared} >= {"enc1_block1_conv", "bottleneck_block2_bn", "dec1_head"}
    for layer in shared:
        for new, ref in zip(layer.get_weights(), old[layer.name].get_weights()):
            np.testing.assert_array_equal(new, ref)
    fresh = [l for l in stage2.layers if l.weights and l.name not in old]
    assert {l.name for l in fresh} >= {"stem2_conv", "enc2_block1_conv", "dec2_block2_conv", "dec2_head"}
    # Fresh convolutions come from the initialiser, not from a shifted copy.
    assert not np.any(np.isclose(stage2.get_layer("dec2_head").get_weights()[1], 0.123))
    # The stage-1 stem is gone: level 1 now reads the output of level 2.
    assert "stem1_conv" not in {l.name for l in stage2.layers}
    stage4 = grow(grow(stage2))
    np.testing.assert_array_equal(
        stage4.get_layer("enc1_block1_conv").get_weights()[0],
        stage1.get_layer("enc1_block1_conv").get_weights()[0],
    )
    with pytest.raises(ValueError, match="last PGU-Net stage"):
        grow(stage4)


def test_multi_scale_loss_dict_trains_and_inference_view_returns_fused():
    keras.utils.set_random_seed(0)
    model = progressive_unet(2, in_channels=1, num_classes=1, base_filters=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, 64, 1)).astype("float32")
    mask = (x > 0.3).astype("float32")
    targets = {"fused": mask, "scale_1": mask, "scale_2": mask[:, ::2, ::2]}
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={k: "binary_crossentropy" for k in targets},
        loss_weights={"fused": 1.0, "scale_1": 0.5, "scale_2": 0.25},
    )
    before = model.evaluate(x, targets, verbose=0, return_dict=True)["loss"]
    for _ in range(3):
        model.train_on_batch(x, targets)
    after = model.evaluate(x, targets, verbose=0, return_dict=True)["loss"]
    assert after < before
    view = inference_view(model)
    fused = view.predict(x, verbose=0)
    np.testing.assert_allclose(fused, model.predict(x, verbose=0)["fused"], atol=1e-6)


def test_a_grown_stage_fades_its_new_level_in_from_the_previous_stage(tmp_path):
    """grow(fade_in=N): at alpha 0 stage 2 computes what stage 1 computed on the image
    downsampled 2× (PGGAN's fade-in); each training step raises alpha by 1/N; at alpha 1 it is
    the plain stage 2, which settle() returns without the fade-in branch; alpha is saved."""
    from xsight_keras.models import fade_alpha, set_fade, settle

    keras.utils.set_random_seed(0)
    stage1 = progressive_unet(1, base_filters=4, data_format="channels_first")
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32")
    half = x.reshape(2, 3, 32, 2, 32, 2).mean(axis=(3, 5))
    stage2 = grow(stage1, fade_in=4)
    assert fade_alpha(stage2) == 0.0 and fade_alpha(stage1) is None
    before = keras.ops.convert_to_numpy(stage1(half, training=False)["fused"])
    faded_out = {k: keras.ops.convert_to_numpy(v) for k, v in stage2(x, training=False).items()}
    np.testing.assert_allclose(faded_out["scale_2"], before, atol=1e-6)  # level 1, unchanged
    coarse = keras.ops.convert_to_numpy(keras.ops.image.resize(
        np.log(before / (1 - before)), (64, 64), data_format="channels_first"))
    np.testing.assert_allclose(faded_out["fused"], 1 / (1 + np.exp(-coarse)), atol=1e-5)
    with pytest.raises(ValueError, match="still fading"):
        settle(stage2)
    stage2(x, training=True)
    stage2(x, training=True)  # two of the four fade-in steps; inference does not count
    stage2(x, training=False)
    assert fade_alpha(stage2) == 0.5
    halfway = keras.ops.convert_to_numpy(stage2(x, training=False)["fused"])
    assert np.abs(halfway - faded_out["fused"]).max() > 1e-3  # the new level counts now
    set_fade(stage2, 1.0)
    full = keras.ops.convert_to_numpy(stage2(x, training=False)["fused"])
    stage2.save(tmp_path / "fading.keras")
    reloaded = keras.models.load_model(tmp_path / "fading.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)["fused"]), full, atol=1e-6)
    plain = settle(stage2)
    assert plain.arguments["fade_in"] == 0 and fade_alpha(plain) is None
    assert not [layer.name for layer in plain.layers if "fade" in layer.name or layer.name == "stem1_conv"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x, training=False)["fused"]), full,
                               atol=1e-6)
    stage2(x, training=True)
    assert fade_alpha(stage2) == 1.0  # and stays there
    with pytest.raises(ValueError, match="stage 1 has none"):
        progressive_unet(1, base_filters=4, fade_in=10)
