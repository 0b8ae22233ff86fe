"""The hv head (HoVer-Net's horizontal and vertical maps): targets on hand-made nuclei, its loss,
its post-processing, test-time augmentation of a direction field, and a model that trains with it
and survives a save."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
from scipy import ndimage

from tests.helpers import ROOT
from xsight_keras.heads import HV, SEMANTIC, get_head, hover_maps, output_names
from xsight_keras.inference import Predictor
from xsight_keras.inference.instances import PostprocessConfig, separate_instances
from xsight_keras.inference.tta import ALL_TRANSFORMS
from xsight_keras.training.losses import HoverLoss
from xsight_keras.training.registries import head_loss


def discs(shape, *discs_):
    """Instance map (int32) with discs ``(row, col, radius)`` as ids 1, 2, …; a later disc
    covers an earlier one where they overlap (so overlapping discs touch along a line)."""
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for i, (r, c, radius) in enumerate(discs_, 1):
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2] = i
    return inst


def probabilities(instances):
    """(H, W, 2) background/nucleus probabilities: 1 on nuclei."""
    fg = (instances > 0).astype(np.float32)
    return np.stack([1 - fg, fg], -1)


def test_hv_name_is_spelled_in_the_heads_module_only():
    quoted = re.compile(rf"""["']{HV}["']""")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "xsight_keras").rglob("*.py"))
                 if not (p.name == "heads.py" and p.parent.name == "xsight_keras")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if quoted.search(line)]
    assert not offenders


def test_hv_targets_of_a_disc_are_antisymmetric_about_its_centre():
    inst = discs((41, 41), (20, 20, 9))
    maps = get_head(HV).target(inst)
    assert maps.dtype == np.float32 and maps.shape == (41, 41, 2)
    h, v = maps[..., 0], maps[..., 1]
    np.testing.assert_allclose(h, -h[:, ::-1], atol=1e-6)  # antisymmetric left–right
    np.testing.assert_allclose(v, -v[::-1, :], atol=1e-6)  # and top–bottom
    np.testing.assert_allclose(h, v.T, atol=1e-6)  # the vertical map is the horizontal one turned
    assert np.all(maps[inst == 0] == 0)
    assert maps.min() == -1.0 and maps.max() == 1.0
    assert h[20, 11] == -1.0 and h[20, 29] == 1.0 and v[11, 20] == -1.0 and v[29, 20] == 1.0
    assert np.all(np.diff(h[20, 11:30]) > 0)  # rises left to right across the nucleus
    assert np.count_nonzero(np.all(maps == 0, -1) & (inst > 0)) == 1  # the centre only


def test_hv_targets_give_each_of_two_touching_discs_its_own_centre():
    inst = discs((40, 60), (20, 20, 9), (20, 35, 9))
    maps = hover_maps(inst)
    h = maps[..., 0]
    assert np.abs(maps).max() <= 1.0
    for i in (1, 2):
        cy, cx = ndimage.center_of_mass(inst == i)
        ys, xs = np.nonzero(inst == i)
        assert np.array_equal(np.sign(h[ys, xs]), np.sign(xs - cx))
        assert np.array_equal(np.sign(maps[ys, xs, 1]), np.sign(ys - cy))
        assert h[ys, xs].min() == -1.0 and h[ys, xs].max() == 1.0
    boundary = np.nonzero(inst[20] == 2)[0][0]  # first column of the right disc on the middle row
    assert h[20, boundary - 1] > 0.5 and h[20, boundary] == -1.0  # the fall post-processing finds
    # sparse ids, an empty map and a one-pixel nucleus; a detached piece of an id is its own nucleus
    sparse = np.where(inst == 2, 300, np.where(inst == 1, 7, 0)).astype(np.uint16)
    np.testing.assert_array_equal(hover_maps(sparse), maps)
    assert not hover_maps(np.zeros((5, 5), np.int32)).any()
    dot = np.zeros((5, 5), np.int32)
    dot[2, 2] = 1
    assert not hover_maps(dot).any()
    mirrored = discs((40, 60), (20, 20, 9)) + discs((40, 60), (20, 45, 9))  # both id 1
    np.testing.assert_array_equal(hover_maps(mirrored), hover_maps(discs((40, 60), (20, 20, 9), (20, 45, 9))))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_hover_loss_is_zero_for_the_target_and_grows_with_a_shift(data_format):
    inst = np.stack([discs((48, 48), (20, 20, 9), (20, 35, 9)), discs((48, 48), (24, 24, 12))])
    target = np.stack([hover_maps(i) for i in inst])
    shifted = np.roll(target, 2, axis=2)
    if data_format == "channels_first":
        target, shifted = target.transpose(0, 3, 1, 2), shifted.transpose(0, 3, 1, 2)
    loss = HoverLoss(data_format=data_format)
    assert float(loss(target, target)) == 0.0
    far = np.roll(shifted, 2, axis=-1 if data_format == "channels_first" else 2)
    assert 0 < float(loss(target, shifted)) < float(loss(target, far))
    # against numpy: the map MSE plus the Sobel-derivative MSE on nucleus pixels
    t, p = (np.moveaxis(a, 1, -1) if data_format == "channels_first" else a for a in (target, shifted))
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    err = p - t
    grad = np.stack([[ndimage.correlate(e[..., 0], sobel_x, mode="constant"),
                      ndimage.correlate(e[..., 1], sobel_x.T, mode="constant")] for e in err])
    nucleus = np.any(t != 0, -1)[:, None]
    expected = np.mean(err ** 2) + np.sum(nucleus * grad ** 2) / (2 * nucleus.sum())
    np.testing.assert_allclose(float(loss(target, shifted)), expected, rtol=1e-5)
    gradient_only = HoverLoss(mse_weight=0.0, data_format=data_format)
    assert float(gradient_only(target, shifted)) > 0
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, HoverLoss) and restored.get_config() == loss.get_config()
    assert isinstance(head_loss(get_head(HV), data_format), HoverLoss)


def test_hv_postprocessing_separates_touching_discs_and_keeps_a_lone_one_whole():
    config = PostprocessConfig()
    pair = discs((48, 64), (24, 22, 10), (24, 40, 10))
    instances, _ = separate_instances(probabilities(pair), {HV: hover_maps(pair)}, config)
    assert instances.max() == 2
    for i in (1, 2):  # each found nucleus is one of the discs, nearly exactly
        found = instances[pair == i]
        j = np.bincount(found).argmax()
        assert j > 0 and np.count_nonzero(instances == j) - np.count_nonzero(found == j) <= 2
        assert np.count_nonzero(found == j) >= 0.95 * found.size
    lone = discs((48, 48), (24, 24, 11))
    instances, _ = separate_instances(probabilities(lone), {HV: hover_maps(lone)}, config)
    assert instances.max() == 1 and np.array_equal(instances > 0, lone > 0)


def _gradient_model(data_format):
    """A fixed model: ``semantic`` = sigmoid of the image, ``hv`` = the image's Sobel gradient
    (x, y), a direction field that turns and mirrors with the image as HV maps do."""
    shape = (1, None, None) if data_format == "channels_first" else (None, None, 1)
    x = keras.Input(shape)
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    kernel = np.stack([sobel_x, sobel_x.T], -1)[:, :, None, :]
    gradient = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, data_format=data_format,
                                   name="gradient")
    semantic = keras.layers.Conv2D(1, 1, activation="sigmoid", data_format=data_format, name="p")
    model = keras.Model(x, {SEMANTIC: semantic(x), HV: gradient(x)})
    gradient.set_weights([kernel])
    return model


def test_tta_restores_hv_maps_for_every_transform(data_format):
    from xsight_keras.data import PreprocessConfig

    model = _gradient_model(data_format)
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.uniform(0, 255, (64, 64)), 3).astype(np.uint8)[..., None]
    pre = PreprocessConfig(clahe_clip_limit=0, zscore="none")
    plain = Predictor(model, pre, tile_size=64).predict_maps(image)
    assert np.abs(plain[HV]).max() > 0.05
    for k in ALL_TRANSFORMS:
        maps = Predictor(model, pre, tile_size=64, tta=(k,)).predict_maps(image)
        np.testing.assert_allclose(maps[HV], plain[HV], atol=1e-5, err_msg=f"transform {k}")
        np.testing.assert_allclose(maps[SEMANTIC], plain[SEMANTIC], atol=1e-5)
    averaged = Predictor(model, pre, tile_size=64, tta="all").predict_maps(image)
    np.testing.assert_allclose(averaged[HV], plain[HV], atol=1e-5)


def test_loader_computes_hv_targets_on_the_augmented_instances(demo_data, monkeypatch):
    from xsight_keras.data import PreprocessConfig, SegmentationDataset

    head, seen = get_head(HV), []

    def target(instances):
        seen.append(instances.copy())
        return hover_maps(instances)

    monkeypatch.setattr(head, "target", target)
    ds = SegmentationDataset(demo_data / "train", size=96, level=4, outputs=(SEMANTIC, HV),
                             data_format="channels_last",
                             preprocess=PreprocessConfig(clahe_clip_limit=0, zscore="none"))
    for index in range(4):
        _, targets = ds.sample(3, index)
        nuclei = targets[SEMANTIC][..., 1:].sum(-1) > 0  # after crop and augmentation
        assert np.array_equal(seen[-1] > 0, nuclei)
        assert np.array_equal(targets[HV], hover_maps(seen[-1]))


def test_attention_unet_with_the_hv_head_trains_a_step_and_saves(tmp_path):
    from xsight_keras.config import load_config, validate_config
    from xsight_keras.models import attention_unet, progressive_unet

    config = load_config("demo", overrides={"heads": "hv"})  # as `--heads hv` gives it
    assert config.heads == (HV,) and config.hover_loss_weight == 1.0
    validate_config(config)
    keras.utils.set_random_seed(0)
    model = attention_unet(2, "resnet18", decoder_filters=(16, 16, 8, 8, 8), heads=config.heads)
    assert output_names(model) == [SEMANTIC, HV]
    head = get_head(HV)
    model.compile(optimizer="adam",
                  loss={SEMANTIC: "categorical_crossentropy", HV: head_loss(head)},
                  loss_weights={SEMANTIC: 1.0, HV: getattr(config, head.loss_weight_setting)})
    inst = np.stack([discs((32, 32), (12, 10, 6), (12, 21, 6)), discs((32, 32), (20, 16, 9))])
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    y = {SEMANTIC: np.stack([probabilities(i) for i in inst]),
         HV: np.stack([hover_maps(i) for i in inst])}
    hv_conv = model.get_layer(f"{HV}_head")
    before = [w.copy() for w in hv_conv.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and f"{HV}_loss" in logs
    assert not np.allclose(before[0], hv_conv.get_weights()[0])  # the hv head's conv learnt
    trained = model.get_weights()
    path = tmp_path / "hv.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(loaded.get_weights(), trained):
        np.testing.assert_array_equal(a, b)
    out = loaded.predict_on_batch(x)
    assert out[HV].shape == (2, 32, 32, 2) and out[HV].dtype == np.float32
    assert out[HV].min() < 0  # linear: signed like its targets
    assert loaded.get_layer(HV).get_config()["activation"] == "linear"
    pgu = progressive_unet(2, 3, 2, base_filters=8, heads=(HV,))  # the other family takes it too
    assert HV in output_names(pgu) and pgu.output[HV].shape[1:] == (None, None, 2)


def test_tuning_an_hv_model_searches_the_energy_threshold_not_the_unused_distance():
    from types import SimpleNamespace

    from xsight_keras.evaluation.tuning import GRID, tune_postprocessing

    pair = discs((48, 64), (24, 22, 10), (24, 40, 10))

    class Maps:  # a predictor that returns perfect maps
        def predict_maps(self, image):
            return {SEMANTIC: probabilities(pair), HV: hover_maps(pair)}

    sample = SimpleNamespace(image=np.zeros((48, 64, 3), np.uint8), instances=pair,
                             classes=(pair > 0).astype(np.uint8), name="pair")
    dataset = type("OneImage", (), {"num_classes": 2, "tissues": None,
                                     "__len__": lambda self: 1,
                                     "__getitem__": lambda self, i: sample})()
    result = tune_postprocessing(Maps(), dataset, progress=False)
    contour = get_head(HV).tuning_grid["contour_threshold"]
    assert 0.4 in contour  # HoVer-Net's own threshold on the energy
    assert len(result["trials"]) == len(contour) * len(GRID["min_size"])
    assert {t["dist_threshold"] for t in result["trials"]} == {PostprocessConfig().dist_threshold}
    assert result["metric"] == "bpq" and result["score"] > 0.99  # both discs found whole
