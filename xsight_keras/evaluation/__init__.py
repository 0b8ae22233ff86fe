"""Evaluation: pixel metrics (Dice, IoU) on whole images, reports."""

from xsight_keras.evaluation.evaluate import evaluate_run, evaluate_split
from xsight_keras.evaluation.pixel_metrics import (
    confusion_matrix,
    markdown_report,
    scores_from_confusion,
    write_report,
)

__all__ = ["confusion_matrix", "evaluate_run", "evaluate_split", "markdown_report",
           "scores_from_confusion", "write_report"]
