"""Training curves of several runs on one figure and their final per-class Dice.

    xsight-compare-runs outputs/pannuke outputs/pannuke_backup --out comparison.png
"""

from __future__ import annotations

import argparse
import sys

from xsight_keras.viz.plots import plot_run_comparison


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="comparison.png")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = plot_run_comparison(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
