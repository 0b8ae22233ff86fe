"""Pixel metrics from a confusion matrix: Dice and IoU per class, means, and reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xsight_keras.files import atomic_write_text


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class, for integer label maps."""
    if truth.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: {truth.shape} vs {pred.shape}")
    idx = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray, class_names) -> dict:
    """Dice and IoU per class and their means (all classes, foreground = classes 1..K-1).

    A class absent from both truth and prediction scores NaN and is left out of the means.
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return {
        "dice": {n: float(d) for n, d in zip(class_names, dice)},
        "iou": {n: float(i) for n, i in zip(class_names, iou)},
        "mean_dice": float(np.nanmean(dice)),
        "mean_fg_dice": float(np.nanmean(dice[1:])) if len(dice) > 1 else float(dice[0]),
        "mean_iou": float(np.nanmean(iou)),
        "mean_fg_iou": float(np.nanmean(iou[1:])) if len(iou) > 1 else float(iou[0]),
        "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1)),
    }


def markdown_report(results: dict, title: str) -> str:
    """A Markdown report of one or more evaluations (``results[name] = scores``)."""
    names = list(results)
    classes = list(next(iter(results.values()))["dice"])
    lines = [f"# {title}", "", "| class | " + " | ".join(f"Dice {n} | IoU {n}" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for c in classes:
        cells = " | ".join(f"{results[n]['dice'][c]:.4f} | {results[n]['iou'][c]:.4f}" for n in names)
        lines.append(f"| {c} | {cells} |")
    for key, label in (("mean_dice", "mean (all)"), ("mean_fg_dice", "mean (foreground)")):
        iou_key = key.replace("dice", "iou")
        cells = " | ".join(f"{results[n][key]:.4f} | {results[n][iou_key]:.4f}" for n in names)
        lines.append(f"| **{label}** | {cells} |")
    if all("instances" in results[n] for n in names):
        lines += ["", "## Nuclei (watershed instances; PanNuke protocol)", "",
                  "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for key in ("bpq", "mpq", "aji", "detection_f1"):
            lines.append(f"| {key} | " + " | ".join(f"{results[n]['instances'][key]:.4f}" for n in names) + " |")
        for c in next(iter(results.values()))["instances"]["pq_per_class"]:
            lines.append(f"| PQ {c} | " + " | ".join(f"{results[n]['instances']['pq_per_class'][c]:.4f}" for n in names) + " |")
            lines.append(f"| F1 {c} | " + " | ".join(f"{results[n]['instances']['f1_per_class'][c]:.4f}" for n in names) + " |")
    lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out_dir, stem: str, title: str, extra: dict | None = None) -> dict:
    """Write ``{stem}.json`` and ``{stem}.md`` (atomically) into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    payload = {**(extra or {}), "results": results}
    for key, text in (("json", json.dumps(payload, indent=2)), ("md", markdown_report(results, title))):
        atomic_write_text(paths[key], text)
    return paths
