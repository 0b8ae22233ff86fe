"""Training runs through the torch fast paths end as runs through Keras' own code.

The lean graph executor against Keras' Functional call, and the device-side loss scaling
against Keras' ``LossScaleOptimizer`` under mixed_float16.

Each test trains the same configuration twice: with the executor (the default on torch) and with
``XSIGHT_KERAS_LEAN_GRAPH=0`` (Keras' own call), and requires the same history (losses, metrics,
learning rates), the same weights in every saved file (best, final, SWA; EMA weights where
the run keeps them) and the same optimizer state. The per-call comparisons are in
``tests/models/test_lean_graph.py``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights, saved_weights
from xsight_keras.config import load_config
from xsight_keras.models.lean_graph import ENV_SWITCH, LeanGraph
from xsight_keras.training.run import train

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="the executor serves the torch backend")


def _train_both(config_for, monkeypatch, tmp_path):
    """Train ``config_for(output_dir)`` with and without the executor; returns
    {lean: (result, run folder, lean calls seen)}."""
    runs = {}
    original = LeanGraph.run
    for lean in (True, False):
        calls = []

        def counting(self, *args, _calls=calls, **kwargs):
            _calls.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(LeanGraph, "run", counting)
        if lean:
            monkeypatch.delenv(ENV_SWITCH, raising=False)
        else:
            monkeypatch.setenv(ENV_SWITCH, "0")
        config = config_for(tmp_path / ("lean" if lean else "keras"))
        result = train(config)
        runs[lean] = (result, result.run_dir, len(calls))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert runs[True][2] > 0, "the executor never ran"
    assert runs[False][2] == 0, "the executor ran although switched off"
    return runs


def _assert_same_runs(runs, files, rtol=1e-6):
    (lean, lean_dir, _), (plain, plain_dir, _) = runs[True], runs[False]
    assert lean.history.keys() == plain.history.keys()
    for key in lean.history:
        np.testing.assert_allclose(lean.history[key], plain.history[key], rtol=rtol, atol=1e-7,
                                   err_msg=key)
    for name in files:
        assert_same_weights(saved_weights(lean_dir / name), saved_weights(plain_dir / name),
                            rtol=rtol, atol=1e-7, what=name)
    # the resume state: optimizer moments and step, EMA weights, callbacks' arrays
    with np.load(lean_dir / "state" / "arrays.npz") as a, np.load(plain_dir / "state" / "arrays.npz") as b:
        assert sorted(a.files) == sorted(b.files) and a.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-7, err_msg=key)


def test_attention_unet_with_ema_swa_clipping_and_instance_head(demo_data, tmp_path, monkeypatch):
    def config_for(out):
        return load_config("demo", overrides={
            "data_root": str(demo_data), "output_dir": str(out), "experiment_name": "r",
            "epochs": 2, "batch_size": 4, "input_size": 32, "val_size": 32, "steps_per_epoch": 3,
            "decoder_filters": "16,8,8,8,8", "instance_head": True, "use_ema": True,
            "use_swa": True, "swa_start_epoch": 1, "grad_clip_val": 0.05,
            "num_workers": 0})

    runs = _train_both(config_for, monkeypatch, tmp_path)
    _assert_same_runs(runs, ("best.keras", "final.keras", "swa.keras"))
    assert {"instance_loss", "val_semantic_mean_fg_dice"} <= set(runs[True][0].history)


def test_a_run_stopped_under_keras_call_resumes_with_the_executor_to_the_same_end(
        demo_data, tmp_path, monkeypatch):
    """SIGUSR1 in the middle of epoch 2 of a run through Keras' call (a mid-epoch resume point),
    then ``--resume`` with the executor: the run ends as an uninterrupted run with the executor
    (history, final/best/SWA weights; the resume tests' tolerances)."""
    import os
    import signal

    from xsight_keras.training import state as state_module
    from xsight_keras.training.preemption import TrainingStopped

    def config_for(out):
        return load_config("demo", overrides={
            "data_root": str(demo_data), "output_dir": str(out), "experiment_name": "r",
            "epochs": 2, "batch_size": 4, "input_size": 32, "val_size": 32, "steps_per_epoch": 3,
            "decoder_filters": "16,8,8,8,8", "use_ema": True, "use_swa": True,
            "swa_start_epoch": 1, "grad_clip_val": 0.05, "num_workers": 0,
            "precise_bn_batches": 2, "tensorboard_images": 0})

    whole = train(config_for(tmp_path / "whole")).run_dir  # the executor (the default)
    original = state_module.TrainingState.on_train_batch_end

    def stop_in_epoch_2(self, batch, logs=None):
        if self._epoch == 1 and batch == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # honoured at the end of this step
        return original(self, batch, logs)

    monkeypatch.setattr(state_module.TrainingState, "on_train_batch_end", stop_in_epoch_2)
    monkeypatch.setenv(ENV_SWITCH, "0")
    config = config_for(tmp_path / "split")
    with pytest.raises(TrainingStopped):
        train(config)
    monkeypatch.setattr(state_module.TrainingState, "on_train_batch_end", original)
    monkeypatch.delenv(ENV_SWITCH)
    split = train(config, resume=True).run_dir
    rows = [np.loadtxt(run / "history.csv", delimiter=",", skiprows=1) for run in (whole, split)]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-3, atol=1e-4)
    for name in ("final.keras", "best.keras", "swa.keras"):
        assert_same_weights(saved_weights(split / name), saved_weights(whole / name),
                            rtol=1e-4, atol=1e-5, what=name)


def test_progressive_unet_growth_with_fade_in(demo_data, tmp_path, monkeypatch):
    def config_for(out):
        return load_config("papsmear", overrides={
            "data_root": str(demo_data), "output_dir": str(out), "experiment_name": "p",
            "stages": "1,2", "epochs_per_stage": 1, "base_filters": 4,
            "batch_sizes": "32:4,64:4", "fade_in_epochs": 1, "grown_lr_factor": 0.5,
            "use_ema": True, "num_workers": 0})

    runs = _train_both(config_for, monkeypatch, tmp_path)
    _assert_same_runs(runs, ("best_stage_1.keras", "best_stage_2.keras", "final.keras"))
    assert len(runs[True][0].history["loss"]) == 2


def test_mixed_float16_run_scales_the_loss_on_the_device_as_keras_does(demo_data, tmp_path,
                                                                        monkeypatch):
    """The engine compiles mixed_float16 runs (on CUDA; forced here on the CPU) with
    DeviceLossScaleOptimizer; the run equals one with Keras' LossScaleOptimizer."""
    from xsight_keras.training import DeviceLossScaleOptimizer
    from xsight_keras.training import run as run_module

    monkeypatch.setattr(run_module, "select_precision", lambda config: "mixed_float16")
    results = {}
    for wrapper in (DeviceLossScaleOptimizer, keras.optimizers.LossScaleOptimizer):
        monkeypatch.setattr(run_module, "DeviceLossScaleOptimizer", wrapper)
        config = load_config("demo", overrides={
            "data_root": str(demo_data), "output_dir": str(tmp_path / wrapper.__name__),
            "experiment_name": "m", "epochs": 1, "batch_size": 4, "input_size": 32,
            "val_size": 32, "steps_per_epoch": 3, "decoder_filters": "16,8,8,8,8",
            "use_mixed_precision": True, "num_workers": 0, "precise_bn_batches": 1})
        result = train(config)
        model = keras.models.load_model(result.run_dir / "final.keras")
        assert type(model.optimizer) is wrapper
        results[wrapper] = result
    device, plain = results[DeviceLossScaleOptimizer], results[keras.optimizers.LossScaleOptimizer]
    for key in plain.history:
        np.testing.assert_allclose(device.history[key], plain.history[key], rtol=1e-6, err_msg=key)
    assert_same_weights(saved_weights(device.run_dir / "final.keras"),
                        saved_weights(plain.run_dir / "final.keras"), what="final.keras")
