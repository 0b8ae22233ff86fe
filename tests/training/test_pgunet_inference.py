"""PGU-Net on Pap-smear-like folders: the checkpoints predict in inference mode what the same
weights compute in training mode, and growing does not lose what the previous stage learnt."""

import cv2
import keras
import numpy as np
import pytest

from xsight_keras.config import load_config
from xsight_keras.data import PreparedDataset, SegmentationDataset, prepare_folders
from xsight_keras.training.run import train


def write_cell_folders(root, counts=(("train", 24), ("valid", 8)), size=128, seed=0):
    """Pap-smear-like crops in the PGU-Net folder layout: a pale cell with one dark nucleus per
    128 px RGB JPEG, its nucleus mask a JPEG too (soft edges), names as in the real set."""
    rng = np.random.default_rng(seed)
    for split, n in counts:
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            image = np.full((size, size, 3), rng.integers(180, 230), np.uint8)
            centre = tuple(int(v) for v in rng.integers(40, size - 40, 2))
            cv2.ellipse(image, centre, (int(rng.integers(30, 45)), int(rng.integers(25, 40))),
                        int(rng.integers(0, 180)), 0, 360, (200, 150, 170), -1)  # cytoplasm
            mask = np.zeros((size, size), np.uint8)
            axes = (int(rng.integers(8, 18)), int(rng.integers(7, 15)))
            angle = int(rng.integers(0, 180))
            cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1)
            nucleus = np.array([rng.integers(60, 110), rng.integers(30, 70), rng.integers(80, 130)])
            image[mask > 0] = nucleus
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            name = f"{1000 + k}-{2000 + k}-001.jpg"
            cv2.imwrite(str(root / split / "images" / name), image)
            cv2.imwrite(str(root / split / "masks" / name), mask)


def dice(p, t):
    return 2 * np.sum(p & t) / max(np.sum(p) + np.sum(t), 1)


def mode_dice(model, split, size, preprocess):
    """Validation Dice of the fused map in inference and in training mode (batch statistics)."""
    ds = SegmentationDataset(split, size=size, resize_mode="resize", train=False, target="binary",
                             preprocess=preprocess, data_format="channels_first")
    x = np.stack([ds.sample(0, i)[0] for i in range(len(ds))])
    t = np.stack([ds.sample(0, i)[1] for i in range(len(ds))]) > 0.5
    out = {}
    for training in (False, True):
        fused = keras.ops.convert_to_numpy(model(x, training=training)["fused"])
        out[training] = dice(fused > 0.5, t)
    return out[False], out[True]


@pytest.fixture(scope="module")
def cell_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    write_cell_folders(root / "src")
    prepare_folders(root / "src", root / "prepared", progress=False)
    return root / "prepared"


def test_every_stage_checkpoint_predicts_in_inference_mode_and_growth_does_not_collapse(
        cell_data, tmp_path):
    """The Pap-smear preset on cell crops (two stages, to stay quick): every best_stage_N.keras
    gives in inference mode the Dice its weights give in training mode (batch statistics of the
    same images), and validation does not collapse after growth (before precise BatchNorm and
    validation at the training scale it fell to ~0 in inference mode)."""
    import csv

    config = load_config("papsmear", overrides={
        "data_root": str(cell_data), "output_dir": str(tmp_path), "experiment_name": "cells",
        "stages": [1, 2], "base_filters": 8, "epochs_per_stage": 2, "steps_per_epoch": 4,
        "batch_sizes": "32:8,64:8",
    })
    train(config)
    run = tmp_path / "cells"
    previous_best = None
    for stage, size in ((1, 32), (2, 64)):
        model = keras.models.load_model(run / f"best_stage_{stage}.keras")
        inference, training = mode_dice(model, PreparedDataset(cell_data / "train"), size,
                                        config.preprocess)
        assert training > 0.5, (stage, training)  # the network has learnt the nuclei
        assert abs(inference - training) < 0.05, (stage, inference, training)
        with open(run / f"history_stage_{stage}.csv", newline="") as f:
            scores = [float(r["val_fused_mean_fg_dice"]) for r in csv.DictReader(f)]
        if previous_best is not None:  # no collapse: within 15 % of the previous stage's best
            assert scores[0] >= 0.85 * previous_best, (stage, scores, previous_best)
        previous_best = max(scores)
