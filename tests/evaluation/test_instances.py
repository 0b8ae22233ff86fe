import json

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights
from xsight_keras.data.demo import demo_tile
from xsight_keras.data.loader import SegmentationDataset
from xsight_keras.evaluation.instance_metrics import panoptic_quality
from xsight_keras.inference.instances import (
    PostprocessConfig,
    instance_targets,
    instances_to_geojson,
    separate_instances,
)
from xsight_keras.models import attention_unet, grow, progressive_unet
from xsight_keras.training.losses import InstanceLoss


def two_touching_disks(size=48):
    yy, xx = np.mgrid[:size, :size]
    a = (yy - 24) ** 2 + (xx - 15) ** 2 <= 81
    b = ((yy - 24) ** 2 + (xx - 32) ** 2 <= 81) & ~a
    inst = np.zeros((size, size), np.int32)
    inst[a], inst[b] = 1, 2
    return inst


def test_instance_targets_peak_at_centres_and_mark_shared_borders():
    inst = two_touching_disks()
    t = instance_targets(inst)
    assert t.shape == (48, 48, 2) and t.dtype == np.float32
    assert t[24, 15, 0] == pytest.approx(1.0) and t[24, 32, 0] > 0.95  # b lost a sliver to a
    assert (t[inst == 0] == 0).all()
    border = (inst[:, :-1] == 1) & (inst[:, 1:] == 2)
    rows, cols = np.nonzero(border)
    assert (t[rows, cols, 1] == 1).all() and (t[rows, cols + 1, 1] == 1).all()


def test_touching_nuclei_come_out_separate():
    inst = two_touching_disks()
    probs = np.stack([inst == 0, inst > 0], -1).astype(np.float32)
    semantic_only, types = separate_instances(probs)  # distance transform of the foreground
    assert semantic_only.max() == 2 and panoptic_quality(inst, semantic_only)["pq"] > 0.85
    assert types[1:].tolist() == [1, 1]
    with_head, _ = separate_instances(probs, instance_targets(inst))
    assert panoptic_quality(inst, with_head)["pq"] > 0.9
    # demo tiles (touching nuclei included) with perfect maps: nuclei recovered one by one
    pqs = []
    for i in range(5):
        _, cls, truth, _ = demo_tile(0, i)
        probs = np.eye(6, dtype=np.float32)[cls]
        pred, _ = separate_instances(probs, instance_targets(truth), PostprocessConfig(min_size=1))
        pqs.append(panoptic_quality(truth, pred)["pq"])
    assert np.nanmean(pqs) > 0.95


def test_each_predicted_nucleus_takes_the_majority_class_of_its_pixels():
    yy, xx = np.mgrid[:48, :64]
    left = (yy - 24) ** 2 + (xx - 14) ** 2 <= 100
    right = (yy - 24) ** 2 + (xx - 48) ** 2 <= 100
    labels = np.zeros((48, 64), np.int64)
    labels[left] = 3
    labels[left & (xx >= 18)] = 5  # the left disk: a minority of class 5 on its right side
    labels[right] = 1
    labels[right & (xx < 49)] = 2  # the right disk: a small majority of class 2
    assert (labels == 3).sum() > (labels == 5).sum() and (labels == 2).sum() > (labels == 1).sum()
    probs = np.eye(6, dtype=np.float32)[labels]
    instances, types = separate_instances(probs)
    assert instances.max() == 2 and types.tolist() == [0, 3, 2]
    assert (instances[24, 14], instances[24, 48]) == (1, 2)


def test_geojson_has_one_closed_classified_polygon_per_nucleus():
    inst = two_touching_disks()
    types = np.array([0, 2, 5])
    g = instances_to_geojson(inst, types, ["bg", "a", "inflammatory", "c", "d", "epithelial"])
    assert g["type"] == "FeatureCollection" and len(g["features"]) == 2
    names = [f["properties"]["classification"]["name"] for f in g["features"]]
    assert names == ["inflammatory", "epithelial"]
    ring = g["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) > 8
    xs = [p[0] for p in ring]
    assert 5 <= min(xs) and max(xs) <= 25  # the left disk, centred at x = 15, radius 9
    json.dumps(g)


@pytest.mark.parametrize("family", ["attention_unet", "progressive_unet"])
def test_models_gain_an_instance_output(family):
    if family == "attention_unet":
        model = attention_unet(6, encoder="resnet18", decoder_filters=(8, 8, 8, 8, 8), instance_head=True)
        out = model.predict(np.zeros((1, 64, 64, 3), "float32"), verbose=0)
        assert out["semantic"].shape == (1, 64, 64, 6) and out["instance"].shape == (1, 64, 64, 2)
    else:
        model = progressive_unet(1, 3, 1, base_filters=4, instance_head=True)
        grown = grow(model)
        out = grown.predict(np.zeros((1, 64, 64, 3), "float32"), verbose=0)
        assert out["instance"].shape == (1, 64, 64, 2) and out["fused"].shape == (1, 64, 64, 1)
        assert_same_weights(grown.get_layer("dec1_head").get_weights(),
                            model.get_layer("dec1_head").get_weights(), what="dec1_head")
    assert 0 <= out["instance"].min() and out["instance"].max() <= 1


def test_instance_loss_and_targets_from_the_loader(demo_data):
    inst = two_touching_disks()[None]
    t = instance_targets(inst[0])[None]
    assert float(InstanceLoss()(t, t)) < 0.01
    assert float(InstanceLoss()(t, np.full_like(t, 0.5))) > 0.5
    again = keras.losses.deserialize(keras.losses.serialize(InstanceLoss(2.0, 0.5)))
    assert again.get_config()["distance_weight"] == 2.0
    ds = SegmentationDataset(demo_data / "train", size=64, level=1, instance_targets=True)
    x, y = ds.sample(0, 0)
    assert sorted(y) == ["instance", "semantic"] and y["instance"].shape == (64, 64, 2)
    assert y["semantic"].shape == (64, 64, 6)


def test_overlay_outlines_each_nucleus_in_its_class_colour_and_leaves_the_chromatin_visible():
    from xsight_keras.labels import CLASS_COLOURS
    from xsight_keras.viz.plots import overlay

    image = np.full((20, 30, 3), 100, np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    instances = np.zeros((20, 30), np.int32)
    labels[5:15, 5:25] = 2
    instances[5:15, 5:15], instances[5:15, 15:25] = 1, 2  # two touching nuclei
    out = overlay(image, labels, instances)
    assert (out[10, 10] == 100).all() and (out[0, 0] == 100).all()  # inside and background kept
    for column in (5, 14, 15, 24):  # outer edges and both sides of the shared border
        assert (out[10, column] == CLASS_COLOURS[2]).all(), column
    merged = overlay(image, labels)  # class regions only: the two are one outline
    assert (merged[10, 14] == 100).all() and (merged[10, 5] == CLASS_COLOURS[2]).all()
    filled = overlay(image, labels, instances, fill_alpha=0.25)
    expected = np.rint(0.75 * 100 + 0.25 * CLASS_COLOURS[2].astype(float))
    assert np.array_equal(filled[10, 10], expected.astype(np.uint8))
