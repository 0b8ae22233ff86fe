"""A training run's folder, the one place that knows its layout.

::

    <run>/config.json          the resolved run configuration (preprocessing nested under
                               "preprocess"), plus class_names, dtype_policy, keras_backend
    <run>/best.keras           best checkpoint (best_stage_<k>.keras per PGU-Net stage)
    <run>/final.keras          weights at the end of training; swa.keras when SWA ran
    <run>/history.csv          one row per epoch (history_stage_<k>.csv per PGU-Net stage)
    <run>/postprocess.json     tuned watershed settings (tune_postprocessing)
    <run>/summary.json         time taken, best and final metrics (PGU-Net: per stage too)
    <run>/state/               resume point (xsight_keras.training.state)
    <run>/run.lock             held by the live training process (xsight_keras.training.run_lock)

Training writes a run through it; evaluation, prediction, post-processing tuning, figures and
resume read it through it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from xsight_keras.data.preprocess import PreprocessConfig
from xsight_keras.files import atomic_write_text
from xsight_keras.labels import label_names

CONFIG_FILE = "config.json"
POSTPROCESS_FILE = "postprocess.json"
STATE_DIR = "state"
#: The flat keys older runs stored their preprocessing under (before "preprocess" was nested).
LEGACY_PREPROCESS_KEYS = ("clahe_clip_limit", "clahe_grid", "zscore")


def preprocess_from_settings(settings: dict) -> PreprocessConfig:
    """The :class:`PreprocessConfig` of a run's settings: the nested ``preprocess`` mapping, or
    the flat keys runs wrote before it existed (missing keys take the defaults)."""
    nested = settings.get("preprocess")
    if isinstance(nested, PreprocessConfig):
        return nested
    if nested is None:
        nested = {k: settings[k] for k in LEGACY_PREPROCESS_KEYS if k in settings}
    values = dict(nested)
    if "clahe_clip_limit" in values:
        values["clahe_clip_limit"] = float(values["clahe_clip_limit"])
    if "clahe_grid" in values:
        values["clahe_grid"] = tuple(int(v) for v in values["clahe_grid"])
    return PreprocessConfig(**values)


def load_model_file(path):
    """``keras.models.load_model`` in safe mode with an error that names the file when it is
    missing or not a ``.keras`` model (``FileNotFoundError`` / ``ValueError``)."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:  # the package's custom objects are registered by importing xsight_keras
        return keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # zip, JSON and deserialisation errors alike
        raise ValueError(f"{path} is not a loadable .keras model: {type(exc).__name__}: {exc}") from exc


class RunDir:
    """The folder of one training run (see the module docstring for its layout).

    ``RunDir(path)`` names a folder that may not exist yet (training creates it);
    :meth:`open` requires an existing run and raises ``FileNotFoundError`` otherwise.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path) -> RunDir:
        run = cls(path)
        if not run.config_path.is_file():
            raise FileNotFoundError(f"{run.path} is not a run directory (no {CONFIG_FILE})")
        return run

    @classmethod
    def latest(cls, output_dir="outputs") -> RunDir:
        """The most recently trained run under ``output_dir`` (the newest ``best.keras``)."""
        runs = [p.parent for p in Path(output_dir).glob("*/best.keras")]
        if not runs:
            raise FileNotFoundError(f"no run with a best.keras under {output_dir}; train one first "
                                    f"(xsight-train --preset demo)")
        return cls(max(runs, key=lambda p: (p / "best.keras").stat().st_mtime))

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def postprocess_path(self) -> Path:
        return self.path / POSTPROCESS_FILE

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    def checkpoint(self, name: str = "best", stage: int | None = None) -> Path:
        """Path of checkpoint ``name`` (``best``, ``final``, ``swa``), of a PGU-Net ``stage``."""
        return self.path / (f"{name}_stage_{stage}.keras" if stage else f"{name}.keras")

    def epoch_checkpoint(self, epoch: int, stage: int | None = None) -> Path:
        """Path of the model kept after ``epoch`` (1-based; ``save_every_epochs``)."""
        return self.checkpoint(f"epoch_{int(epoch):03d}", stage)

    def history_csv(self, stage: int | None = None) -> Path:
        return self.path / (f"history_stage_{stage}.csv" if stage else "history.csv")

    def stage_histories(self) -> list[Path]:
        """The per-stage history files of a PGU-Net run, by stage."""
        return sorted(self.path.glob("history_stage_*.csv"),
                      key=lambda p: int(p.stem.rsplit("_", 1)[1]))

    # ---- config.json
    @cached_property
    def settings(self) -> dict:
        """``config.json`` as a dict (``FileNotFoundError`` / ``ValueError`` naming the file)."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no {CONFIG_FILE})")
        try:
            data = json.loads(self.config_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{self.config_path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{self.config_path}: expected a JSON object of settings")
        return data

    def write_settings(self, settings: dict) -> None:
        """Write ``config.json`` atomically."""
        atomic_write_text(self.config_path, json.dumps(settings, indent=2))
        self.__dict__.pop("settings", None)

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the run's models were trained with."""
        return preprocess_from_settings(self.settings)

    @property
    def class_names(self) -> list[str] | None:
        """Names of the model's output channels as stored (``["nucleus"]`` for binary)."""
        return self.settings.get("class_names")

    @property
    def label_names(self) -> list[str]:
        """Names of the label values 0..K-1 (binary runs: background, nucleus)."""
        return label_names(self.class_names or ["nucleus"])

    def split(self, split: str, data_root=None):
        """``(folder name, PreparedDataset)`` of ``split`` (``train``/``valid``/``test``, mapped
        through the run's configuration, or a split folder name) of the run's dataset."""
        from xsight_keras.data.prepared import PreparedDataset

        s = self.settings
        folder = {"train": s.get("train_split"), "valid": s.get("val_split"),
                  "val": s.get("val_split"), "test": s.get("test_split")}.get(split) or split
        return folder, PreparedDataset(Path(data_root or s["data_root"]) / folder)

    # ---- models and post-processing
    def load_model(self, name_or_path="best"):
        """A checkpoint of the run by name (``best``, ``final``, ``swa``) or a ``.keras`` path."""
        text = str(name_or_path)
        path = Path(text) if text.endswith(".keras") else self.checkpoint(text)
        return load_model_file(path)

    def postprocess_settings(self) -> dict:
        """The tuned watershed settings (``postprocess.json``), ``{}`` when not tuned."""
        if not self.postprocess_path.is_file():
            return {}
        try:
            return json.loads(self.postprocess_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{self.postprocess_path}: not valid JSON ({exc})") from exc

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (time taken, best and final metrics) atomically."""
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def write_postprocess(self, settings: dict, search: dict | None = None) -> None:
        atomic_write_text(self.postprocess_path, json.dumps(settings, indent=2))
        if search is not None:
            atomic_write_text(self.path / "postprocess_search.json",
                              json.dumps(search, indent=2, default=float))


__all__ = ["RunDir", "load_model_file", "preprocess_from_settings"]
