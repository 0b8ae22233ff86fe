"""Figures: overlays, prediction grids, dataset statistics, confusion matrices, run comparison."""

from xsight_keras.viz.plots import (
    CLASS_COLOURS,
    colourise,
    latest_run,
    overlay,
    plot_confusion_matrix,
    plot_dataset_statistics,
    plot_prediction_grid,
    plot_run_comparison,
)

__all__ = ["CLASS_COLOURS", "colourise", "latest_run", "overlay", "plot_confusion_matrix",
           "plot_dataset_statistics", "plot_prediction_grid", "plot_run_comparison"]
