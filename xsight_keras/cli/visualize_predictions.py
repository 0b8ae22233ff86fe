"""A grid of image | ground truth | prediction | overlay for samples of a split.

    xsight-visualize-predictions                 # latest run under outputs/, test split
    xsight-visualize-predictions --run outputs/demo --split valid --n 6 --tta
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from xsight_keras.inference import Predictor
from xsight_keras.rundir import RunDir
from xsight_keras.viz.plots import plot_prediction_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run directory (default: the latest under --output_dir)")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--out", help="PNG path (default <run>/predictions_<split>.png)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = RunDir.open(args.run) if args.run else RunDir.latest(args.output_dir)
        folder, dataset = run.split(args.split)
        predictor = Predictor.from_run(run.path, tta="all" if args.tta else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    idx = np.linspace(0, len(dataset) - 1, min(args.n, len(dataset))).astype(int)
    samples = []
    for i in idx:
        s = dataset[int(i)]
        pred = predictor.predict_labels(s.image)
        truth = (s.classes > 0).astype(np.uint8) if len(run.label_names) == 2 else s.classes
        samples.append((s.image, truth, pred))
    out = Path(args.out) if args.out else run.path / f"predictions_{args.split}.png"
    plot_prediction_grid(samples, run.label_names, out, title=f"{run.path.name} — {folder}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
