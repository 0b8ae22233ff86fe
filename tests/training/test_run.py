import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import ROOT
from xsight_keras.config import load_config
from xsight_keras.training.run import DataNotFoundError, train


def test_attention_unet_run_writes_every_artefact(demo_data, tmp_path):
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "tiny",
        "epochs": 2, "batch_size": 4, "progressive": True, "size_schedule": "0:32,1:64", "val_size": 64,
        "decoder_filters": "16,16,8,8,8", "use_ema": True, "use_swa": True, "swa_start_epoch": 1,
        "boundary_weight": 0.5, "mixup_alpha": 0.2, "aug_schedule": "0:0,1:2",
    })
    result = train(config)
    run = tmp_path / "tiny"
    for name in ("config.json", "history.csv", "best.keras", "final.keras", "swa.keras",
                 "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["encoder"] == "resnet18" and saved["epochs"] == 2 and saved["class_names"][4] == "dead"
    history = result.history
    assert len(history["loss"]) == 2 and "val_dice_neoplastic" in history
    assert history["aug_level"] == [0.0, 2.0]  # the augmentation schedule took effect at epoch 1
    assert history["train_size"] == [32.0, 64.0]  # and so did progressive resizing
    code = ("import sys, numpy as np, keras, xsight_keras;"
            "m = keras.models.load_model(sys.argv[1]);"
            "p = m.predict(np.zeros((1, 3, 64, 64), 'float32'), verbose=0);"
            "assert p.shape == (1, 6, 64, 64) and np.isfinite(p).all(), p.shape")
    subprocess.run([sys.executable, "-c", code, str(run / "best.keras")], check=True)
    with pytest.raises(FileExistsError, match="already exists"):
        train(config)


def test_progressive_unet_run_goes_through_all_four_stages(demo_data, tmp_path):
    config = load_config("papsmear", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "pgu",
        "epochs_per_stage": 1, "base_filters": 4, "batch_sizes": "32:4,64:4,128:4,256:4",
    })
    result = train(config)
    run = tmp_path / "pgu"
    for stage in (1, 2, 3, 4):
        assert (run / f"best_stage_{stage}.keras").is_file()
        assert (run / f"history_stage_{stage}.csv").is_file()
    final = keras.models.load_model(run / "final.keras")
    assert final.name == "progressive_unet_stage4"
    assert len(result.history["loss"]) == 4
    assert "val_fused_dice_nucleus" in result.history


def test_missing_prepared_data_exits_2_with_instructions(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "pannuke",
         "--data_root", str(tmp_path / "nothing"), "--output_dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "prepare_data.py pannuke" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(DataNotFoundError):
        train(load_config("pannuke", overrides={"data_root": str(tmp_path / "none")}))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        load_config("demo", overrides={"learning_rate": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: magic\n")
    with pytest.raises(ValueError, match="loss must be one of"):
        load_config("demo", config_file=bad)
    config = load_config("pannuke", overrides={"epochs": "3", "use_swa": "false", "batch_size": 2})
    assert config.epochs == 3 and config.use_swa is False and config.use_ema is True


def test_readme_user_code_example_runs(demo_data):
    """The 'Train from your own code' example of the README, with a tiny model and data."""
    from xsight_keras import (
        ExponentialMovingAverage,
        FusedAdamW,
        HybridLoss,
        OneCycle,
        SegmentationDataset,
        SyncLoaderEpoch,
        attention_unet,
        class_weights_from_counts,
        make_loader,
        segmentation_metrics,
    )

    train_ds = SegmentationDataset(demo_data / "train", size=64, level=1)
    val_ds = SegmentationDataset(demo_data / "valid", size=64, train=False)
    model = attention_unet(6, encoder="resnet18", decoder_filters=(16, 16, 8, 8, 8))
    weights = class_weights_from_counts(train_ds.dataset.pixel_counts)
    model.compile(
        optimizer=FusedAdamW(learning_rate=OneCycle(1e-3, total_steps=4), global_clipnorm=1.0),
        loss=HybridLoss(class_weights=weights),
        metrics=segmentation_metrics(train_ds.dataset.class_names),
    )
    train_loader = make_loader(train_ds, 4, mixup_alpha=0.2)
    history = model.fit(train_loader, validation_data=make_loader(val_ds, 4), epochs=2,
                        callbacks=[ExponentialMovingAverage(0.99), SyncLoaderEpoch(train_loader)],
                        verbose=0)
    assert np.isfinite(history.history["val_mean_fg_dice"]).all()


def test_mixed_precision_policy_follows_the_device():
    from xsight_keras.training.run import _cuda_available, select_precision

    config = load_config("demo", overrides={"use_mixed_precision": True})
    expected = "mixed_float16" if _cuda_available() else "mixed_bfloat16"
    assert select_precision(config) == expected  # never float16 on a CPU (emulated, ~75x slower)
    assert select_precision(load_config("demo")) == "float32"


def test_train_leaves_keras_global_settings_as_it_found_them(demo_data, tmp_path):
    keras.config.set_image_data_format("channels_last")
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "g",
        "epochs": 1, "batch_size": 4, "input_size": 32, "val_size": 32, "steps_per_epoch": 1,
        "decoder_filters": "8,8,8,8,8", "data_format": "channels_first", "use_mixed_precision": True})
    train(config)
    assert keras.config.image_data_format() == "channels_last"
    assert keras.config.dtype_policy().name == "float32"


def test_run_with_an_instance_head_trains_both_outputs(demo_data, tmp_path):
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "inst",
        "epochs": 1, "batch_size": 4, "input_size": 32, "val_size": 32, "instance_head": True,
        "decoder_filters": "8,8,8,8,8"})
    result = train(config)
    assert {"val_semantic_mean_fg_dice", "instance_loss", "val_instance_loss"} <= set(result.history)
    model = keras.models.load_model(result.run_dir / "best.keras")
    assert set(model.output) == {"semantic", "instance"}
