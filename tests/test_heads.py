"""The heads contract: output names live in xsight_keras/heads.py only, and a head declared
outside the package reaches the loader, the engine's loss table, the predictor and
post-processing without any other module knowing it."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from tests.helpers import ROOT
from xsight_keras import heads
from xsight_keras.data import PreprocessConfig, SegmentationDataset
from xsight_keras.heads import FUSED, INSTANCE, SEMANTIC, Head, get_head, register_head
from xsight_keras.inference import Predictor
from xsight_keras.inference.instances import PostprocessConfig, separate_instances
from xsight_keras.training.registries import HEAD_LOSSES, head_loss

OUTPUT_NAME = re.compile(r"""["'](fused|semantic|instance)["']""")


def test_output_names_are_spelled_in_the_heads_module_only():
    offenders = []
    for path in sorted((ROOT / "xsight_keras").rglob("*.py")):
        if path.name == "heads.py" and path.parent.name == "xsight_keras":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OUTPUT_NAME.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "output names outside xsight_keras/heads.py:\n" + "\n".join(offenders)


class Foreground(Head):
    """A toy head: one sigmoid channel, 1 on nuclei. Its markers: connected foreground cores."""

    name = "foreground_test"
    channels = 1
    loss = "foreground_bce_test"

    def target(self, instances):
        return (instances > 0).astype(np.float32)[..., None]

    def build(self, features, filters):
        x = keras.layers.Conv2D(1, 1, name="foreground_test_conv")(features)
        return keras.layers.Activation("sigmoid", dtype="float32", name=self.name)(x)

    def markers(self, foreground, maps, config):
        cores = foreground & (maps[..., 0] > 0.99)
        return cores, -maps[..., 0]


@pytest.fixture
def foreground_head():
    head = register_head(Foreground())
    HEAD_LOSSES.register(head.loss, lambda data_format: keras.losses.BinaryCrossentropy())
    try:
        yield head
    finally:
        del heads.HEADS[head.name]
        HEAD_LOSSES.unregister(head.loss)


def test_a_new_head_reaches_loader_loss_predictor_and_postprocessing(foreground_head, demo_data):
    from xsight_keras.models import attention_unet

    keras.utils.set_random_seed(0)
    model = attention_unet(6, "resnet18", decoder_filters=(32, 16, 16, 8, 8),
                           heads=(foreground_head.name,))
    assert heads.output_names(model) == [SEMANTIC, foreground_head.name]
    # the loader serves one target per output: the head's own from the instance map
    ds = SegmentationDataset(demo_data / "train", size=64, outputs=heads.output_names(model),
                             preprocess=PreprocessConfig(clahe_clip_limit=0, zscore="none"))
    image, targets = ds.sample(0, 0)
    assert set(targets) == {SEMANTIC, foreground_head.name}
    assert targets[foreground_head.name].shape == (64, 64, 1)
    assert set(np.unique(targets[foreground_head.name])) <= {0.0, 1.0}
    assert isinstance(head_loss(foreground_head), keras.losses.BinaryCrossentropy)
    # the predictor returns the head's blended map by name, without channel packing
    maps = Predictor(model, PreprocessConfig(clahe_clip_limit=0, zscore="none"),
                     tile_size=64).predict_maps(np.zeros((80, 72, 3), np.uint8))
    assert set(maps) == {SEMANTIC, foreground_head.name}
    assert maps[SEMANTIC].shape == (80, 72, 6) and maps[foreground_head.name].shape == (80, 72, 1)
    # post-processing takes markers from the first head that provides them
    probs = np.zeros((20, 20, 2), np.float32)
    probs[..., 0] = 1
    probs[2:8, 2:8] = (0, 1)
    probs[12:18, 12:18] = (0, 1)
    fg_map = np.zeros((20, 20, 1), np.float32)
    fg_map[4:6, 4:6] = 1.0  # only the first blob has a core
    instances, _ = separate_instances(probs, {foreground_head.name: fg_map},
                                      PostprocessConfig(min_marker_size=1, min_size=1))
    assert instances.max() == 1 and instances[3, 3] == 1 and instances[15, 15] == 0


def test_declarations_of_the_built_in_heads():
    assert heads.primary_class_map([FUSED, "scale_2", INSTANCE]) == FUSED
    assert heads.scale_of(heads.scale_output(4)) == 4 and heads.scale_of(FUSED) is None
    assert heads.is_class_map("scale_8") and not heads.is_class_map(INSTANCE)
    assert get_head(SEMANTIC).activation(1) == "sigmoid" and get_head(SEMANTIC).activation(6) == "softmax"
    with pytest.raises(ValueError, match="unknown model output 'nope'"):
        get_head("nope")
    with pytest.raises(ValueError, match="already declared"):
        register_head(get_head(INSTANCE))
    with pytest.raises(ValueError, match="is a class map"):
        heads.extra_heads(names=(FUSED,))
