"""A reproducible real-data benchmark on MoNuSeg training images.

From a folder of MoNuSeg images and Aperio XML annotations (for example the 13 images in
``shared/data/monuseg-train``): prepare them with a fixed split by image id (:data:`VAL_IDS`
validate, the others train), train the ``monuseg`` preset from random initialisation for a
fixed number of optimizer steps, tune the watershed on the validation images, and score every
validation image whole: pixel Dice of the nuclei, AJI, PQ (DQ, SQ), detection F1 and the true
and predicted nucleus counts. These are validation figures (the images are MoNuSeg training
images), not test figures.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from xsight_keras.config import load_config
from xsight_keras.data.monuseg import prepare_monuseg
from xsight_keras.evaluation.evaluate import load_postprocess
from xsight_keras.evaluation.instance_metrics import aggregated_jaccard_index, panoptic_quality
from xsight_keras.evaluation.tuning import tune_run
from xsight_keras.files import atomic_write_text
from xsight_keras.heads import SEMANTIC
from xsight_keras.inference.instances import separate_instances
from xsight_keras.inference.predictor import Predictor
from xsight_keras.rundir import RunDir
from xsight_keras.training.run import train

#: Validation images (three organs: lung, kidney, breast); the other ten of the shared set train.
VAL_IDS = ("TCGA-21-5786-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1")
METRICS = ("dice", "aji", "pq", "dq", "sq", "f1", "true_nuclei", "predicted_nuclei")


def score_image(true_instances: np.ndarray, pred_instances: np.ndarray) -> dict:
    """Pixel Dice of the nuclei, AJI, PQ/DQ/SQ, detection F1 (= DQ) and nucleus counts of one
    image from two int instance maps (H, W) (0 = background)."""
    t, p = true_instances > 0, pred_instances > 0
    denominator = int(t.sum() + p.sum())
    pq = panoptic_quality(true_instances, pred_instances)
    return {"dice": 2.0 * int((t & p).sum()) / denominator if denominator else float("nan"),
            "aji": float(aggregated_jaccard_index(true_instances, pred_instances)),
            "pq": float(pq["pq"]), "dq": float(pq["dq"]), "sq": float(pq["sq"]),
            "f1": float(pq["dq"]),
            "true_nuclei": int(len(np.unique(true_instances)) - (0 in true_instances)),
            "predicted_nuclei": int(len(np.unique(pred_instances)) - (0 in pred_instances))}


def score_run(run_dir, split: str = "valid", tta=None, model_path=None) -> dict:
    """Score each image of a run's ``split`` whole with its best checkpoint (or ``model_path``)
    and tuned post-processing: ``{"images": {name: scores}, "mean": scores}`` (see
    :func:`score_image`)."""
    run = RunDir.open(run_dir)
    _, dataset = run.split(split)
    predictor = Predictor.from_run(run.path, model_path, tta=tta)
    postprocess = load_postprocess(run.path)
    images = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        maps = predictor.predict_maps(sample.image)
        probabilities = maps.pop(SEMANTIC)
        instances, _ = separate_instances(probabilities, maps or None, postprocess)
        images[sample.name] = score_image(sample.instances, instances)
    mean = {k: float(np.nanmean([s[k] for s in images.values()])) for k in METRICS}
    return {"images": images, "mean": mean}


def run_monuseg_benchmark(src, out, steps: int = 600, epochs: int = 10, overrides=None,
                          progress: bool = True, curve: int = 0) -> dict:
    """Prepare ``src`` (split by :data:`VAL_IDS`) under ``out/data``, train the ``monuseg``
    preset from random initialisation for ``steps`` optimizer steps (``epochs`` epochs of
    ``ceil(steps / epochs)`` steps: validation, checkpoints and the schedule run per epoch), tune
    the post-processing on the validation images and score them. ``overrides``: further run
    settings (e.g. ``{"encoder": "resnet18", "head_branch_stages": 2}``; not the ones that set
    the number of steps). ``curve``: also keep the model of every ``curve``-th epoch (0: none)
    and score it afterwards with the tuned post-processing (``report["curve"]``: optimizer steps
    and mean scores per kept epoch; scoring is not counted in the training time). Writes
    ``out/monuseg_benchmark.json``; returns the same dict (settings, training seconds, scores).
    Raises ``ValueError`` for settings that cannot work, before anything is prepared.
    """
    if steps < 1 or epochs < 1 or not 0 <= curve <= epochs:
        raise ValueError(f"steps and epochs must be at least 1 and curve in [0, epochs], got "
                         f"steps {steps}, epochs {epochs}, curve {curve}")
    fixed = {"epochs", "steps_per_epoch", "samples_per_epoch", "save_every_epochs"} & set(overrides or {})
    if fixed:
        raise ValueError(f"{sorted(fixed)} follow from the benchmark's steps, epochs and curve; "
                         "set those instead")
    out = Path(out)
    data = out / "data"
    if not ((data / "train" / "meta.json").is_file() and (data / "valid" / "meta.json").is_file()):
        prepare_monuseg(src, data, progress, val_ids=VAL_IDS)
    steps_per_epoch = math.ceil(steps / epochs)
    settings = {"data_root": str(data), "output_dir": str(out / "runs"),
                "experiment_name": "monuseg_benchmark", "overwrite": True,
                "encoder_weights": None, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                "early_stopping_patience": None, "save_every_epochs": curve or None,
                **(overrides or {})}
    config = load_config("monuseg", overrides=settings)
    start = time.time()
    result = train(config)
    seconds = time.time() - start
    tuned = tune_run(result.run_dir, "valid", progress=progress)
    report = {"settings": {k: v for k, v in settings.items() if k not in ("data_root", "output_dir")},
              "validation_images": list(VAL_IDS), "optimizer_steps": steps_per_epoch * epochs,
              "train_seconds": round(seconds, 1), "postprocess": tuned["best"],
              "run_dir": str(result.run_dir), **score_run(result.run_dir)}
    if curve:
        run = RunDir.open(result.run_dir)
        kept = [n for n in range(1, config.epochs + 1) if run.epoch_checkpoint(n).is_file()]
        report["curve"] = [{"epoch": n, "optimizer_steps": n * steps_per_epoch,
                            **score_run(run.path, model_path=run.epoch_checkpoint(n))["mean"]}
                           for n in kept]
    atomic_write_text(out / "monuseg_benchmark.json", json.dumps(report, indent=2, default=float))
    return report


def format_report(report: dict) -> str:
    """The per-image and mean scores of :func:`run_monuseg_benchmark` as a text table."""
    header = f"{'image':28s}" + "".join(f"{k:>10s}" for k in ("Dice", "AJI", "PQ", "DQ", "SQ",
                                                              "F1", "true", "pred"))
    rows = [header]
    for name, s in [*report["images"].items(), ("mean", report["mean"])]:
        rows.append(f"{name:28s}" + "".join(
            f"{s[k]:>10.0f}" if k.endswith("nuclei") else f"{s[k]:>10.3f}" for k in METRICS))
    rows.append(f"{report['optimizer_steps']} optimizer steps in {report['train_seconds']:.0f} s; "
                f"post-processing {report['postprocess']}")
    if report.get("curve"):
        rows.append("mean scores against optimizer steps (each epoch's model, the tuned "
                    "post-processing):")
        rows.append(f"{'steps':>8s}" + "".join(f"{k:>8s}" for k in ("Dice", "AJI", "PQ")))
        rows += [f"{c['optimizer_steps']:>8d}" + "".join(f"{c[k]:>8.3f}" for k in ("dice", "aji", "pq"))
                 for c in report["curve"]]
    return "\n".join(rows)


__all__ = ["METRICS", "VAL_IDS", "format_report", "run_monuseg_benchmark", "score_image",
           "score_run"]
