"""Headless matplotlib figures (PNG): overlays, prediction grids, dataset statistics, run comparison.

Figures are ``matplotlib.figure.Figure`` objects drawn and saved directly (matplotlib renders
them with its Agg canvas when saved as PNG), never through ``pyplot``: the user's matplotlib
backend and pyplot's figure list are left as they are.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xsight_keras.heads import FUSED, SEMANTIC
from xsight_keras.labels import CLASS_COLOURS, colourise, count_classes
from xsight_keras.rundir import RunDir


def overlay(image: np.ndarray, labels: np.ndarray, instances: np.ndarray | None = None,
            fill_alpha: float = 0.0) -> np.ndarray:
    """Outline every nucleus in its class colour over an RGB or gray uint8 (H, W, C) image.

    ``labels`` int (H, W) class per pixel (0 background). ``instances`` int (H, W) nucleus ids:
    each nucleus gets its own outline, so touching nuclei stay apart; without it the outlines
    follow the class regions. ``fill_alpha`` blends the class colour inside (0, the default:
    outlines only, so the chromatin under them stays visible). Returns uint8 (H, W, 3);
    background is left untouched.
    """
    rgb = np.repeat(image, 3, axis=-1) if image.ndim == 3 and image.shape[-1] == 1 else image
    rgb = rgb if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, -1)
    colours = colourise(labels)
    fg = labels > 0
    out = rgb.copy()
    if fill_alpha > 0:
        blend = (1 - fill_alpha) * out[fg].astype(np.float32) + fill_alpha * colours[fg]
        out[fg] = np.rint(blend).astype(np.uint8)
    edges = outline_pixels(instances if instances is not None else labels) & fg
    out[edges] = colours[edges]
    return out


def outline_pixels(regions: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of each region (non-zero id of an int (H, W) map) that touch
    another id or the background across an edge: one-pixel outlines inside the regions."""
    edge = np.zeros(regions.shape, bool)
    edge[:-1] |= regions[:-1] != regions[1:]
    edge[1:] |= regions[1:] != regions[:-1]
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    return edge & (regions > 0)


def _legend(ax, class_names):
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLOURS[i % len(CLASS_COLOURS)] / 255, label=n)
               for i, n in enumerate(class_names) if i > 0]
    ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, 1.0))


def _save_with_legend(fig, class_names, path, top: float) -> Path:
    """Lay out ``fig`` below ``top`` (a figure fraction), put the class legend above, save."""
    fig.tight_layout(rect=(0, 0, 1, top))
    legend_ax = fig.add_axes((0, top + 0.005, 1, 0.995 - top))
    legend_ax.axis("off")
    _legend(legend_ax, class_names)
    fig.savefig(path, dpi=80)
    return Path(path)


def plot_prediction_grid(samples, class_names, path, title: str = "") -> Path:
    """One row per sample: image | ground truth | prediction | overlay of the prediction.

    ``samples``: list of (image uint8 (H, W, C), truth labels (H, W), predicted labels (H, W)).
    """
    n = len(samples)
    fig = Figure(figsize=(12, 3 * n + 0.6))
    axes = fig.subplots(n, 4, squeeze=False)
    for row, (image, truth, pred) in zip(axes, samples):
        shown = image[..., 0] if image.shape[-1] == 1 else image
        for ax, panel, name in zip(row, (shown, colourise(truth), colourise(pred), overlay(image, pred)),
                                   ("image", "ground truth", "prediction", "overlay")):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save_with_legend(fig, class_names, path, top=0.96)


def plot_confusion_matrix(confusion: np.ndarray, class_names, path) -> Path:
    """Row-normalised confusion matrix (true class per row, each cell the fraction of that
    class' pixels), as a PNG."""
    confusion = np.asarray(confusion, np.float64)
    norm = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig = Figure(figsize=(1.2 * k + 2, 1.1 * k + 1.5))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def plot_dataset_statistics(dataset, path, samples_path=None, n_samples: int = 8) -> list[Path]:
    """Class distribution of a prepared split (pixels and nuclei per class; nuclei per class and
    tissue when tissues are known) and, optionally, a grid of samples with their overlays.

    ``dataset``: a :class:`~xsight_keras.data.PreparedDataset` or any object with its reading
    interface (``root``, ``class_names``, ``tissues``, ``pixel_counts``, ``instance_counts``,
    ``len()`` and items with ``image``, ``classes``, ``instances`` and ``name``); this module
    reads it and does not import the data package.
    """
    names = dataset.class_names
    tissues = dataset.tissues
    panels = 3 if tissues is not None else 2
    fig = Figure(figsize=(5.5 * panels, 4.2))
    axes = fig.subplots(1, panels)
    colours = CLASS_COLOURS[1:len(names)] / 255
    axes[0].bar(names[1:], dataset.pixel_counts[1:], color=colours)
    axes[0].set_title("pixels per class")
    axes[1].bar(names[1:], dataset.instance_counts[1:], color=colours)
    axes[1].set_title("nuclei per class")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45)
    if tissues is not None:
        kinds = sorted(set(tissues))
        table = np.zeros((len(kinds), len(names)), np.int64)
        for i in range(len(dataset)):
            s = dataset[i]
            table[kinds.index(tissues[i])] += count_classes(s.classes[None], s.instances[None], len(names))[1]
        bottom = np.zeros(len(kinds))
        for c in range(1, len(names)):
            axes[2].bar(kinds, table[:, c], bottom=bottom, color=colours[c - 1], label=names[c])
            bottom += table[:, c]
        axes[2].set_title("nuclei per tissue")
        axes[2].tick_params(axis="x", rotation=60)
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{dataset.root} — {len(dataset)} images")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    written = [Path(path)]
    if samples_path:
        idx = np.linspace(0, len(dataset) - 1, min(n_samples, len(dataset))).astype(int)
        cols = 4
        rows = -(-len(idx) // cols)
        fig = Figure(figsize=(3 * cols, 3 * rows + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, i in zip(axes.ravel(), idx):
            s = dataset[int(i)]
            ax.imshow(overlay(s.image, s.classes, s.instances))
            ax.set_title(f"{s.name}" + (f" ({tissues[i]})" if tissues is not None else ""), fontsize=8)
        for ax in axes.ravel():
            ax.axis("off")
        written.append(_save_with_legend(fig, names, samples_path, top=0.95))
    return written


def _read_history(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).history_csv()
    if not path.is_file():
        stages = RunDir(run_dir).stage_histories()
        if not stages:
            raise FileNotFoundError(f"{run_dir} has no history.csv")
        rows = []
        for p in stages:
            with open(p) as f:
                rows += list(csv.DictReader(f))
        return rows
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_run_comparison(run_dirs, path) -> Path:
    """Training curves (loss, validation mean foreground Dice) of several runs on one figure and a
    bar chart of each run's final per-class validation Dice."""
    run_dirs = [Path(r) for r in run_dirs]
    histories = {r.name: _read_history(r) for r in run_dirs}
    fig = Figure(figsize=(17, 4.5))
    axes = fig.subplots(1, 3)
    dice_keys = None
    for name, rows in histories.items():
        epochs = np.arange(1, len(rows) + 1)
        axes[0].plot(epochs, [float(r["loss"]) for r in rows], label=f"{name} train")
        if "val_loss" in rows[0]:
            axes[0].plot(epochs, [float(r["val_loss"]) for r in rows], "--", label=f"{name} val")
        prefixes = ["val_"] + [f"val_{name}_" for name in (FUSED, SEMANTIC)]  # dict-output models
        key = next((p + k for k in ("mean_fg_dice", "dice_nucleus") for p in prefixes
                    if p + k in rows[0]), None)
        if key:
            axes[1].plot(epochs, [float(r[key]) for r in rows], label=name)
        keys = [k for k in rows[0] if k.startswith("val_") and "dice_" in k and "mean" not in k]
        dice_keys = dice_keys or keys
    axes[0].set_title("loss")
    axes[1].set_title("validation mean foreground Dice")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if dice_keys:
        width = 0.8 / len(histories)
        x = np.arange(len(dice_keys))
        for i, (name, rows) in enumerate(histories.items()):
            axes[2].bar(x + i * width, [float(rows[-1].get(k, "nan")) for k in dice_keys], width, label=name)
        axes[2].set_xticks(x + 0.4 - width / 2, [k.split("dice_")[-1] for k in dice_keys], rotation=45, ha="right")
        axes[2].set_ylim(0, 1)
        axes[2].set_title("final validation Dice per class")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)


def latest_run(output_dir="outputs") -> Path:
    """The most recently modified run directory under ``output_dir`` that has a best.keras."""
    return RunDir.latest(output_dir).path


def run_class_names(run_dir) -> list[str]:
    """Names of a run's label values 0..K-1 (see :attr:`RunDir.label_names`)."""
    return RunDir.open(run_dir).label_names
