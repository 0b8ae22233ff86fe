"""Tune the watershed that turns predictions into nuclei, on a run's validation split.

    xsight-tune-postprocessing --run outputs/demo [--split valid] [--limit 50]

Writes <run>/postprocess.json (read by xsight-evaluate and xsight-predict) and the whole search to
<run>/postprocess_search.json.
"""

from __future__ import annotations

import argparse
import sys

from xsight_keras.evaluation.tuning import tune_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default="valid")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = tune_run(args.run, args.split, args.limit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best {result['metric']} = {result['score']:.4f} with {result['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
