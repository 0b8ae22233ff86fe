"""``none`` and ``null`` mean "no file" for the settings that may be None, from the command
line and from YAML alike: ``--encoder_weights none`` is random initialisation."""

from types import SimpleNamespace

import pytest

from tests.helpers import script_main
from xsight_keras.config import load_config
from xsight_keras.heads import HV


@pytest.mark.parametrize("word", ["none", "null", "NULL", "None", " Null "])
def test_none_and_null_are_none_for_optional_settings(word):
    assert load_config("pannuke").encoder_weights == "imagenet"  # the preset keeps its value
    config = load_config("pannuke", overrides={
        "encoder_weights": word, "progressive": "false", "size_schedule": word, "val_size": word,
        "steps_per_epoch": word, "grad_clip_val": word, "early_stopping_patience": word})
    assert config.encoder_weights is None and config.size_schedule is None
    assert config.val_size is None and config.steps_per_epoch is None
    assert config.grad_clip_val is None and config.early_stopping_patience is None


def test_none_takes_off_the_heads_a_preset_declares(tmp_path):
    assert load_config("monuseg").heads == (HV,)
    assert load_config("monuseg", overrides={"heads": "none"}).heads == ()
    assert load_config("monuseg", overrides={"heads": "null"}).heads == ()
    settings = tmp_path / "run.yaml"
    settings.write_text("heads: null\n")
    assert load_config("monuseg", config_file=settings).heads == ()
    assert load_config("demo", overrides={"heads": HV}).heads == (HV,)


def test_other_values_are_kept(tmp_path):
    path = str(tmp_path / "none.pth")
    assert load_config("demo", overrides={"encoder_weights": path}).encoder_weights == path
    assert load_config("demo", overrides={"encoder_weights": "nonesuch"}).encoder_weights == "nonesuch"
    config = load_config("demo", overrides={"lr_scaling": "none"})
    assert config.lr_scaling == "none"  # a choice, not a missing value


def test_yaml_none_and_null_are_none(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("encoder_weights: None\nsize_schedule: NULL\nval_size: none\n")
    config = load_config("monuseg", config_file=settings)
    assert config.encoder_weights is None and config.size_schedule is None
    assert config.val_size is None


def test_train_flag_encoder_weights_none_trains_from_scratch(tmp_path, monkeypatch):
    from xsight_keras.training import run

    seen = []

    def fake_train(config, resume=False):
        seen.append(config)
        return SimpleNamespace(run_dir=tmp_path, seconds=0.0)

    monkeypatch.setattr(run, "train", fake_train)
    assert script_main("train")(["--preset", "monuseg", "--encoder_weights", "none"]) == 0
    assert seen[0].encoder_weights is None


def test_optional_numbers_are_numbers():
    config = load_config("demo", overrides={"val_size": "128", "steps_per_epoch": "32",
                                            "grad_clip_val": "0.5"})
    assert config.val_size == 128 and config.steps_per_epoch == 32 and config.grad_clip_val == 0.5
