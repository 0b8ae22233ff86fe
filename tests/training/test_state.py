"""The training state's atomic swap (``xsight_keras.training.state``): a write interrupted at
any point leaves a state that ``load_state`` reads, holding the last complete epoch."""

import os
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights, numpy_weights
from xsight_keras.training import state as state_module
from xsight_keras.training.state import load_state, save_state


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def save(run_dir, model, epoch):
    return save_state(run_dir, model, epoch, None, {"loss": [0.5] * (epoch + 1)}, {})


def saved_model_arrays(state) -> list[np.ndarray]:
    return [state["arrays"][f"model_{i}"] for i in range(state["num_model"])]


def interrupt_rename(monkeypatch, at: int) -> list[str]:
    """Make the ``at``-th ``os.replace`` of the state module (1-based) raise KeyboardInterrupt
    (a kill at that instant); returns the destinations of the calls made."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(state_module.os, "replace", replace)
    return calls


def test_a_state_write_killed_between_the_two_renames_is_read_from_the_old_folder(tmp_path, monkeypatch):
    first, second, third = tiny_model(0), tiny_model(1), tiny_model(2)
    save(tmp_path, first, 0)
    calls = interrupt_rename(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, second, 1)
    assert calls == [".state.old", "state"]  # state/ moved aside, the new one not yet in place
    assert not (tmp_path / "state").exists() and (tmp_path / ".state.old").is_dir()
    state = load_state(tmp_path)
    assert state["epoch"] == 0 and state["history"] == {"loss": [0.5]}
    assert_same_weights(saved_model_arrays(state), numpy_weights(first), what="epoch 0 state")
    # the resumed run's first save is killed before its new folder is in place: the old state
    # is still the one to read (it must not be deleted before a new one replaces it)
    calls = interrupt_rename(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, third, 1)
    assert calls == ["state"]
    state = load_state(tmp_path)
    assert state["epoch"] == 0
    assert_same_weights(saved_model_arrays(state), numpy_weights(first), what="epoch 0 state")
    # and a save that completes replaces it and leaves no old folder behind
    monkeypatch.undo()
    save(tmp_path, third, 1)
    assert not (tmp_path / ".state.old").exists()
    state = load_state(tmp_path)
    assert state["epoch"] == 1
    assert_same_weights(saved_model_arrays(state), numpy_weights(third), what="epoch 1 state")


def test_a_state_write_killed_while_writing_the_new_folder_leaves_the_previous_state(tmp_path, monkeypatch):
    first, second = tiny_model(0), tiny_model(1)
    save(tmp_path, first, 0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()}

    def dies_half_way(path, **arrays):
        Path(path).write_bytes(b"PK\x03\x04 half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module.np, "savez", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, second, 1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()} == before
    state = load_state(tmp_path)
    assert state["epoch"] == 0
    assert_same_weights(saved_model_arrays(state), numpy_weights(first), what="epoch 0 state")
