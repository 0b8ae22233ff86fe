"""Evaluate a run's best checkpoint on a split of its dataset; write JSON + Markdown reports.

    xsight-evaluate --run outputs/demo [--split test] [--tta] [--model FILE]
"""

from __future__ import annotations

import argparse
import sys

from xsight_keras.evaluation import evaluate_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (outputs/<experiment>)")
    parser.add_argument("--split", default="test", help="train, valid, test or a split folder name")
    parser.add_argument("--tta", action="store_true", help="also evaluate with the 8 flips/rotations")
    parser.add_argument("--model", help="checkpoint to evaluate instead of the run's best.keras")
    parser.add_argument("--data_root", help="prepared data folder, if it moved since training")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate_run(args.run, args.split, args.tta, args.model, args.data_root,
                              limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(open(report["paths"]["md"]).read())
    print(f"wrote {report['paths']['json']}, {report['paths']['md']}, {report['confusion_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
