"""Evaluate a model on a prepared split: pixel Dice/IoU per class, with and without TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xsight_keras.data.prepared import PreparedDataset
from xsight_keras.evaluation.instance_metrics import dataset_scores, image_scores
from xsight_keras.evaluation.pixel_metrics import write_report
from xsight_keras.inference.predictor import Predictor
from xsight_keras.inference.scoring import predict_sample, score_split
from xsight_keras.rundir import RunDir

__all__ = ["evaluate_run", "evaluate_split", "load_postprocess", "predict_sample", "run_split"]


def run_split(run_dir, split: str, data_root=None):
    """A run's configuration and the prepared split ``split`` (train/valid/test or a folder name)
    of its dataset: returns ``(config dict, split folder name, PreparedDataset)``."""
    run = RunDir.open(run_dir)
    folder, dataset = run.split(split, data_root)
    return run.settings, folder, dataset


def evaluate_split(predictor: Predictor, dataset: PreparedDataset, progress: bool = True,
                   limit: int | None = None, instances: bool = True, postprocess=None) -> dict:
    """Predict every image of ``dataset`` whole and score it (pixels: :func:`score_split`).

    Returns ``{"scores": ..., "confusion": (K, K) list}`` where K = the dataset's classes, or 2
    (background, nucleus) for a binary model (the dataset's classes > 0 count as nucleus). With
    ``instances`` the predicted nuclei (watershed, :mod:`xsight_keras.inference.instances`) are
    scored too: ``scores["instances"]`` holds bPQ, mPQ, per-class PQ and F1, AJI.
    ``postprocess``: a :class:`~xsight_keras.inference.instances.PostprocessConfig` (defaults).
    """
    from xsight_keras.inference.instances import PostprocessConfig, separate_instances

    postprocess = postprocess or PostprocessConfig()
    per_image = []

    def score_instances(sample, probs, instance_maps, truth, labels, k):
        pred_inst, _ = separate_instances(probs, instance_maps, postprocess)
        per_image.append(image_scores(sample.instances, truth, pred_inst, labels, k))

    result = score_split(predictor, dataset, progress, limit, score_instances if instances else None)
    if instances:
        n = result["images"]
        tissues = None if dataset.tissues is None else dataset.tissues[:n]
        result["scores"]["instances"] = dataset_scores(per_image, result["class_names"], tissues)
    return result


def load_postprocess(run_dir):
    """The run's tuned watershed settings (``postprocess.json``) or the defaults."""
    from xsight_keras.inference.instances import PostprocessConfig

    return PostprocessConfig(**RunDir(run_dir).postprocess_settings())


def evaluate_run(run_dir, split: str = "test", tta: bool = False, model_path=None,
                 data_root=None, progress: bool = True, limit: int | None = None) -> dict:
    """Evaluate a run's best checkpoint (or ``model_path``) on ``split`` of the run's dataset.

    ``split`` is ``train``/``valid``/``test`` (mapped through the run's configuration) or a split
    folder name. Writes ``evaluation_<split>.json``/``.md`` and ``confusion_<split>.png`` into the
    run directory; with ``tta`` both plain and TTA results are reported. Returns the report data.
    """
    from xsight_keras.viz.plots import plot_confusion_matrix

    run_dir = Path(run_dir)
    _, folder, dataset = run_split(run_dir, split, data_root)
    predictor = Predictor.from_run(run_dir, model_path)
    postprocess = load_postprocess(run_dir)
    runs = {"plain": evaluate_split(predictor, dataset, progress, limit, postprocess=postprocess)}
    if tta:
        predictor.transforms = tuple(range(8))
        runs["tta"] = evaluate_split(predictor, dataset, progress, limit, postprocess=postprocess)
    results = {name: r["scores"] for name, r in runs.items()}
    extra = {"run": str(run_dir), "model": str(model_path or RunDir(run_dir).checkpoint("best")),
             "split": folder, "images": runs["plain"]["images"],
             "confusion": {name: r["confusion"] for name, r in runs.items()}}
    paths = write_report(results, run_dir, f"evaluation_{split}",
                         f"Evaluation of {run_dir.name} on {folder}", extra)
    plot_confusion_matrix(np.asarray(runs["plain"]["confusion"]), runs["plain"]["class_names"],
                          run_dir / f"confusion_{split}.png")
    return {"results": results, "paths": {k: str(v) for k, v in paths.items()},
            "confusion_png": str(run_dir / f"confusion_{split}.png")}
