import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import ROOT, run_script, script_env, script_main
from xsight_keras.config import load_config
from xsight_keras.training.run import DataNotFoundError, train


def record_served_samples(monkeypatch):
    """Record every sample the run's loaders serve, with the Keras epoch it was served in.

    Returns a dict: ``"train"`` / ``"valid"`` lists of ``(keras_epoch, (epoch, index), image)``
    (``keras_epoch`` is ``None`` for the batch ``fit`` draws before its first epoch, ``"after
    fit"`` for later passes such as SWA's BatchNorm update). The epoch
    comes from Keras' ``on_epoch_begin``, not from the library's schedules."""
    from xsight_keras.data import loader as loader_module
    from xsight_keras.training import run as run_module

    served = {"epoch": None, "train": [], "valid": []}
    getitem = loader_module.SegmentationDataset.__getitem__

    def recording_getitem(self, key):
        item = getitem(self, key)
        served["train" if self.train else "valid"].append((served["epoch"], key, item[0].copy()))
        return item

    class KerasEpoch(run_module.EpochSeeder):
        def on_epoch_begin(self, epoch, logs=None):
            served["epoch"] = epoch
            super().on_epoch_begin(epoch, logs)

        def on_train_end(self, logs=None):
            served["epoch"] = "after fit"  # e.g. SWA's BatchNorm pass over the loader

    monkeypatch.setattr(loader_module.SegmentationDataset, "__getitem__", recording_getitem)
    monkeypatch.setattr(run_module, "EpochSeeder", KerasEpoch)
    return served


def test_attention_unet_run_writes_every_artefact(demo_data, tmp_path, monkeypatch):
    from xsight_keras.data import SegmentationDataset

    served = record_served_samples(monkeypatch)
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "tiny",
        "epochs": 2, "batch_size": 4, "progressive": True, "size_schedule": "0:32,1:64", "val_size": 64,
        "decoder_filters": "16,16,8,8,8", "use_ema": True, "use_swa": True, "swa_start_epoch": 1,
        "boundary_weight": 0.5, "mixup_alpha": 0.2, "aug_schedule": "0:0,1:2", "num_workers": 0,
    })
    result = train(config)
    run = tmp_path / "tiny"
    for name in ("config.json", "history.csv", "best.keras", "final.keras", "swa.keras",
                 "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["encoder"] == "resnet18" and saved["epochs"] == 2 and saved["class_names"][4] == "dead"
    # what the loaders served, epoch by epoch: the schedules 0:32,1:64 and 0:0,1:2 by hand
    pre = config.preprocess
    common = dict(preprocess=pre, data_format="channels_first", seed=config.seed)
    for epoch, size, level in ((0, 32, 0), (1, 64, 2)):
        # the same crops at the scheduled level, and at its neighbours 1 and 3 for contrast
        at = {lv: SegmentationDataset(demo_data / "train", size=size, level=lv, **common)
              for lv in {0, max(level - 1, 0), level, level + 1}}
        rows = [(key, x) for e, key, x in served["train"] if e == epoch]
        assert sorted(index for (_, index), _ in rows) == list(range(8)), epoch  # 2 steps × 4
        unlike = {lv: 0 for lv in at}
        for (key_epoch, index), x in rows:
            assert key_epoch == epoch and x.shape == (3, size, size), (epoch, key_epoch, x.shape)
            np.testing.assert_array_equal(x, at[level].sample(epoch, index)[0])
            for lv, ds in at.items():
                unlike[lv] += not np.array_equal(x, ds.sample(epoch, index)[0])
        # exactly the scheduled level: every other level gives other samples
        assert all(unlike[lv] > 0 for lv in at if lv != level), f"epoch {epoch}: {unlike} of 8 differ"
        plain_val = SegmentationDataset(demo_data / "valid", size=64, train=False, **common)
        rows = [(key, x) for e, key, x in served["valid"] if e == epoch]
        assert sorted(i for (_, i), _ in rows) == list(range(4)), epoch
        for (key_epoch, index), x in rows:
            np.testing.assert_array_equal(x, plain_val.sample(key_epoch, index)[0])  # 64 px, as is
    history = result.history
    assert len(history["loss"]) == 2 and "val_dice_neoplastic" in history
    assert history["aug_level"] == [0.0, 2.0]  # and the logger reports the schedules
    assert history["train_size"] == [32.0, 64.0]
    code = ("import sys, numpy as np, keras, xsight_keras;"
            "m = keras.models.load_model(sys.argv[1]);"
            "p = m.predict(np.zeros((1, 3, 64, 64), 'float32'), verbose=0);"
            "assert p.shape == (1, 6, 64, 64) and np.isfinite(p).all(), p.shape")
    subprocess.run([sys.executable, "-c", code, str(run / "best.keras")], check=True)
    with pytest.raises(FileExistsError, match="already exists"):
        train(config)


def test_progressive_unet_run_goes_through_all_four_stages(demo_data, tmp_path, monkeypatch):
    from xsight_keras.data import PreparedDataset, preprocess_image
    from xsight_keras.data.images import resize_image

    served = record_served_samples(monkeypatch)
    config = load_config("papsmear", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "pgu",
        "epochs_per_stage": 1, "base_filters": 4, "batch_sizes": "32:4,64:4,128:4,256:4",
        "grown_lr_factor": 0.5,
    })
    result = train(config)
    run = tmp_path / "pgu"
    # every stage has its own schedule (same steps here); the grown stages peak at lr × 0.5
    lrs = result.history["lr"]
    np.testing.assert_allclose(lrs[1:], [0.5 * lrs[0]] * 3, rtol=1e-5)
    for stage in (1, 2, 3, 4):
        assert (run / f"best_stage_{stage}.keras").is_file()
        assert (run / f"history_stage_{stage}.csv").is_file()
    final = keras.models.load_model(run / "final.keras")
    assert final.name == "progressive_unet_stage4"
    assert len(result.history["loss"]) == 4
    assert "val_fused_dice_nucleus" in result.history
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["1", "2", "3", "4"]
    assert summary["stages"]["4"]["resolution"] == 256 and summary["stages"]["1"]["epochs"] == 1
    # each grown stage is scored before its first step (the previous stage at its resolution)
    assert "at_growth" not in summary["stages"]["1"]
    assert all(0 <= summary["stages"][k]["at_growth"] <= 1 for k in "234")
    # validation sees each stage's images as training does (resize_mode resize): whole images
    # resized to 32, 64, 128, 256 px, not crops of those sizes at the stored scale
    sizes = [item[2].shape[-1] for item in served["valid"]]
    assert sorted(set(sizes)) == [32, 64, 128, 256]
    first = next(item for item in served["valid"] if item[1][1] == 0)
    raw = PreparedDataset(demo_data / "valid")[0].image
    expected = preprocess_image(resize_image(raw, 32, 32), config.preprocess).transpose(2, 0, 1)
    np.testing.assert_allclose(first[2], expected, atol=1e-5)


def test_pgunet_standard_mode_trains_the_whole_network_at_full_resolution(demo_data, tmp_path):
    """progressive false (the original PGU-Net's baseline): no growth, stage 4 from the start."""
    config = load_config("papsmear", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "std",
        "progressive": False, "epochs_per_stage": 2, "steps_per_epoch": 1, "base_filters": 4,
        "batch_sizes": "32:4,64:4,128:4,256:2",
    })
    result = train(config)
    run = tmp_path / "std"
    assert sorted(p.name for p in run.glob("best_stage_*.keras")) == ["best_stage_4.keras"]
    assert keras.models.load_model(run / "final.keras").name == "progressive_unet_stage4"
    assert len(result.history["loss"]) == 2  # epochs_per_stage epochs of the one stage
    assert json.loads((run / "config.json").read_text())["progressive"] is False
    assert load_config("papsmear").grows and not load_config("demo").grows


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
    for overrides, message in (
            ({"mixup_alpha": 0.2}, r"would blend the per-nucleus targets of the head\(s\) \['hv'\]"),
            ({"heads": "none", "head_branch_stages": 2}, "the model has none"),
            ({"head_branch_stages": 6}, r"head_branch_stages must be in \[0, 5\]"),
            ({"save_every_epochs": 0}, "save_every_epochs must be positive")):
        with pytest.raises(ValueError, match=message):
            load_config("monuseg", overrides=overrides)
    assert load_config("pannuke", overrides={"heads": "none", "mixup_alpha": 0.2}).mixup_alpha == 0.2
    with pytest.raises(ValueError, match="attention_unet setting"):
        load_config("papsmear", overrides={"heads": "hv", "head_branch_stages": 1})
    for overrides, message in (({"fade_in_epochs": 3, "epochs_per_stage": 2}, "within its stage"),
                               ({"precise_bn_batches": -1}, "precise_bn_batches must be 0"),
                               ({"grown_lr_factor": 0}, r"grown_lr_factor must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            load_config("papsmear", overrides=overrides)


def test_every_flag_the_readme_lists_is_a_train_flag():
    import re

    from xsight_keras.cli.train import build_parser

    text = (ROOT / "README.md").read_text()
    start = text.index("Flags: `--epochs")
    listed = set(re.findall(r"--(\w+)", text[start:text.index("boolean flags", start)]))
    known = {a.dest for a in build_parser()._actions}
    assert len(listed) > 40 and listed <= known, sorted(listed - known)


def readme_python_block(heading: str) -> str:
    """The first ```python block of README.md after the line that starts with ``heading``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    begin = text.index("```python\n", start) + len("```python\n")
    return text[begin:text.index("```", begin)]


def test_readme_user_code_example_runs(demo_data, tmp_path):
    """The README's 'Train from your own code' example, taken from README.md and run in a
    fresh process as written except for two cost substitutions: 64 px crops instead of 128 and
    2 epochs instead of 8 (as written it takes minutes on a 2-core CPU). Its relative
    ``data/demo`` points at the session's demo set."""
    code = readme_python_block("**From your own code**")
    for old, new, count in (("size=128", "size=64", 2), ("epochs=8", "epochs=2", 1)):
        assert code.count(old) == count, f"the README example changed: {old!r}"
        code = code.replace(old, new)
    assert 'SegmentationDataset("data/demo/train"' in code and "model.fit(" in code
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_data, target_is_directory=True)
    code += ("\nimport numpy as np\nh = model.history.history\n"
             "assert len(h['loss']) == 2 and np.isfinite(h['val_mean_fg_dice']).all(), h\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_mixed_precision_policy_follows_the_device(monkeypatch, capsys, native_bf16):
    import torch

    from xsight_keras.training import run

    monkeypatch.setattr(run, "cpu_has_native_bfloat16", lambda: native_bf16)
    config = load_config("demo", overrides={"use_mixed_precision": True})
    cuda = keras.backend.backend() == "torch" and torch.cuda.is_available()
    # never float16 on a CPU (emulated, ~75x slower), nor bfloat16 where it is emulated
    expected = "mixed_float16" if cuda else "mixed_bfloat16" if native_bf16 else "float32"
    assert run.select_precision(config) == expected
    if not cuda and not native_bf16:
        assert "no native bfloat16" in capsys.readouterr().err
    assert run.select_precision(load_config("demo")) == "float32"


def test_bfloat16_on_cuda_is_chosen_by_mixed_precision_dtype(monkeypatch):
    """On CUDA, mixed_precision_dtype picks float16 (the default) or bfloat16, and bfloat16 on
    a GPU without it is refused by name (the CUDA queries are stubbed: no GPU here)."""
    import torch

    from xsight_keras.training import run

    monkeypatch.setattr(run, "_cuda_available", lambda: True)
    on = {"use_mixed_precision": True}
    assert run.select_precision(load_config("demo", overrides=on)) == "mixed_float16"
    bf16 = load_config("demo", overrides={**on, "mixed_precision_dtype": "bfloat16"})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert run.select_precision(bf16) == "mixed_bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="does not compute bfloat16"):
        run.select_precision(bf16)
    with pytest.raises(ValueError, match="mixed_precision_dtype must be float16 or bfloat16"):
        load_config("demo", overrides={"mixed_precision_dtype": "float8"})


def test_native_bfloat16_is_read_from_the_cpu_flags():
    from xsight_keras.training.run import cpu_has_native_bfloat16

    assert not cpu_has_native_bfloat16("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert cpu_has_native_bfloat16("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bfloat16("processor : 0\nflags : fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bfloat16("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n")
    assert not cpu_has_native_bfloat16("")


def test_train_leaves_keras_global_settings_as_it_found_them(demo_data, tmp_path):
    keras.config.set_image_data_format("channels_last")
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "g",
        "epochs": 1, "batch_size": 4, "input_size": 32, "val_size": 32, "steps_per_epoch": 1,
        "decoder_filters": "8,8,8,8,8", "data_format": "channels_first", "use_mixed_precision": True})
    train(config)
    assert keras.config.image_data_format() == "channels_last"
    assert keras.config.dtype_policy().name == "float32"


def test_run_with_an_instance_head_trains_both_outputs_for_the_steps_asked(demo_data, tmp_path):
    """8 training images at batch 4 are 2 steps; --steps_per_epoch 5 must run 5 (crops drawn
    across the images), with the one-cycle schedule built for those 5 steps."""
    config = load_config("demo", overrides={
        "data_root": str(demo_data), "output_dir": str(tmp_path), "experiment_name": "inst",
        "epochs": 1, "batch_size": 4, "input_size": 32, "val_size": 32, "instance_head": True,
        "decoder_filters": "8,8,8,8,8", "steps_per_epoch": 5})
    result = train(config)
    assert {"val_semantic_mean_fg_dice", "instance_loss", "val_instance_loss"} <= set(result.history)
    model = keras.models.load_model(result.run_dir / "final.keras")
    assert set(model.output) == {"semantic", "instance"}
    assert int(model.optimizer.iterations) == 5
    assert model.optimizer.get_config()["learning_rate"]["config"]["total_steps"] == 5


def test_non_finite_loss_from_the_command_line_exits_3_and_keeps_the_checkpoints(run_copy, trained_run):
    """A resumed run whose learning rate makes the weights overflow in its second epoch: exit
    status 3, one line naming the epoch and the step, no traceback, and the good checkpoints
    of the first epoch stay as they were (in the folder given to --resume, not elsewhere)."""
    files = ("best.keras", "final.keras", "state/state.json", "state/arrays.npz", "history.csv")
    before = {name: (run_copy / name).read_bytes() for name in files}
    original = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")}
    proc = run_script("train", "--resume", run_copy, "--epochs", 2, "--lr", "1e30")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"became (nan|-?inf) at epoch 2, step 2;", errors[0]), errors
    for name in files:
        assert (run_copy / name).read_bytes() == before[name], f"{name} was rewritten"
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")} == original


def test_overwrite_from_the_command_line_replaces_a_run(demo_data, tmp_path, capsys):
    """An existing run directory: without --overwrite, exit 2 before anything is touched; with
    it, the old files are gone and the new run is complete."""
    run = tmp_path / "runs" / "r"
    (run / "state").mkdir(parents=True)
    (run / "state" / "state.json").write_text('{"epoch": 7}')
    (run / "old_marker.txt").write_text("from the previous run")
    (run / "history.csv").write_text("epoch,loss\n0,1\n1,1\n2,1\n")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("val_size: 32\ndecoder_filters: [8, 8, 8, 8, 8]\ntensorboard_images: 0\n")
    args = ("--preset", "demo", "--config", tiny, "--data_root", demo_data, "--output_dir",
            tmp_path / "runs", "--experiment_name", "r", "--epochs", 1, "--batch_size", 4,
            "--input_size", 32, "--steps_per_epoch", 1)
    main = script_main("train")  # in this process: no interpreter start-up for each call
    args = [str(a) for a in args]
    assert main(args) == 2
    refused = capsys.readouterr().err
    assert "already exists" in refused and "Traceback" not in refused
    assert (run / "old_marker.txt").is_file()
    assert main(args + ["--overwrite"]) == 0, capsys.readouterr().err[-3000:]
    assert not (run / "old_marker.txt").exists()
    for name in ("config.json", "history.csv", "best.keras", "final.keras", "summary.json"):
        assert (run / name).is_file(), name
    assert len((run / "history.csv").read_text().strip().splitlines()) == 2  # header + 1 epoch
    assert json.loads((run / "state" / "state.json").read_text())["epoch"] == 0
    assert json.loads((run / "config.json").read_text())["input_size"] == 32
