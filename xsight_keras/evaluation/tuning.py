"""Choose the watershed settings that maximise PQ on a validation split (small grid search)."""

from __future__ import annotations

import itertools

import numpy as np
from tqdm import tqdm

from xsight_keras.data.prepared import PreparedDataset
from xsight_keras.evaluation.instance_metrics import dataset_scores, image_scores
from xsight_keras.heads import separating_head
from xsight_keras.inference.predictor import Predictor
from xsight_keras.inference.scoring import predict_sample
from xsight_keras.rundir import RunDir

#: Tried whatever the model: the least nucleus size in pixels.
GRID = {"min_size": (5, 10, 20)}
#: Tried for a model without a nucleus-separating head (markers from the distance transform);
#: with one, its :attr:`~xsight_keras.heads.Head.tuning_grid` is tried instead.
GRID_WITHOUT_HEAD = {"dist_threshold": (0.3, 0.4, 0.5, 0.6, 0.7)}


def tune_postprocessing(predictor: Predictor, dataset: PreparedDataset, limit: int | None = None,
                        metric: str | None = None, progress: bool = True) -> dict:
    """Grid-search :class:`PostprocessConfig` on ``dataset``; predictions are made once.

    The grid: :data:`GRID` and the settings the model's nucleus-separating head reads
    (:attr:`xsight_keras.heads.Head.tuning_grid`), or :data:`GRID_WITHOUT_HEAD`; settings outside
    the grid keep their defaults.

    ``metric``: ``"mpq"`` or ``"bpq"`` (default: mPQ with several nucleus classes, else bPQ).
    Returns ``{"best": settings, "score": value, "metric": name, "trials": [...]}``.
    """
    from xsight_keras.inference.instances import PostprocessConfig, separate_instances

    n = len(dataset) if limit is None else min(limit, len(dataset))
    cached = []
    for i in tqdm(range(n), desc="predicting", disable=not progress):
        s = dataset[i]
        probs, inst_maps, truth, k = predict_sample(predictor, s, dataset.num_classes)
        cached.append((s.instances, truth, probs, inst_maps, k))
    k = cached[0][4]
    metric = metric or ("mpq" if k > 2 else "bpq")
    names = ["background"] + [f"class_{c}" for c in range(1, k)]
    head = separating_head(cached[0][3] or ())
    grid = {**(head.tuning_grid if head else GRID_WITHOUT_HEAD), **GRID}
    trials = []
    for values in tqdm(list(itertools.product(*grid.values())), desc="tuning", disable=not progress):
        config = PostprocessConfig(**dict(zip(grid, values)))
        per_image = []
        for true_inst, truth, probs, inst_maps, kk in cached:
            pred_inst, _ = separate_instances(probs, inst_maps, config)
            labels = Predictor.to_labels(probs)
            per_image.append(image_scores(true_inst, truth, pred_inst, labels, kk))
        tissues = None if dataset.tissues is None else dataset.tissues[:n]
        score = dataset_scores(per_image, names, tissues)[metric]
        trials.append({**config.to_dict(), metric: score})
    best = max(trials, key=lambda t: -np.inf if np.isnan(t[metric]) else t[metric])
    settings = {key: best[key] for key in PostprocessConfig().to_dict()}
    return {"best": settings, "score": best[metric], "metric": metric, "trials": trials}


def tune_run(run_dir, split: str = "valid", limit: int | None = None, progress: bool = True) -> dict:
    """Tune on a run's validation split and write ``postprocess.json`` (used by evaluate/predict)."""
    run = RunDir.open(run_dir)
    _, dataset = run.split(split)
    result = tune_postprocessing(Predictor.from_run(run.path), dataset, limit, progress=progress)
    run.write_postprocess(result["best"], search=result)
    return result
