"""Class distribution (pixels and nuclei per class, per tissue for PanNuke) and a sample grid.

    xsight-visualize-dataset data/demo/train [--out figures/]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xsight_keras.data import PreparedDataset
from xsight_keras.viz.plots import plot_dataset_statistics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", help="a prepared split folder")
    parser.add_argument("--out", help="output folder (default: the split folder)")
    parser.add_argument("--n", type=int, default=8, help="samples in the grid")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dataset = PreparedDataset(args.split)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or args.split)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_dataset_statistics(dataset, out / "class_distribution.png", out / "samples.png", args.n):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
