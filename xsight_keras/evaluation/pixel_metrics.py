"""Pixel metrics from a confusion matrix: Dice and IoU per class, means, and reports.

The confusion matrix and the scores from it are computed in :mod:`xsight_keras.inference.scoring`
(TTA validation during training uses them too) and are importable from here as well.
"""

from __future__ import annotations

import json
from pathlib import Path

from xsight_keras.files import atomic_write_text
from xsight_keras.inference.scoring import confusion_matrix, scores_from_confusion

__all__ = ["confusion_matrix", "markdown_report", "scores_from_confusion", "write_report"]


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
