"""Predict label maps for images of any size with a trained model.

    xsight-predict slide1.png tiles/ --run outputs/demo --out predictions/ [--tta] [--save_probs]
    xsight-predict image.tif --model outputs/demo/best.keras --out predictions/

For each input image: <name>_labels.png (class index per pixel), <name>_overlay.png (every
nucleus outlined in its class colour), with
--save_probs <name>_probs.npy (float16 (H, W, K)), and with --instances <name>_instances.png
(16-bit nucleus ids) and <name>.geojson (one polygon per nucleus with its class, for QuPath). Unreadable files are skipped, listed at the
end, and make the exit status 1; the other images are still written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from xsight_keras.data.images import IMAGE_SUFFIXES, read_image
from xsight_keras.data.preprocess import PreprocessConfig
from xsight_keras.evaluation.evaluate import load_postprocess
from xsight_keras.files import atomic_write_text
from xsight_keras.heads import SEMANTIC
from xsight_keras.inference import Predictor
from xsight_keras.inference.instances import (
    PostprocessConfig,
    instances_to_geojson,
    separate_instances,
)
from xsight_keras.inference.predictor import load_model_file
from xsight_keras.labels import label_names
from xsight_keras.viz.plots import overlay


def collect_inputs(inputs) -> list[Path]:
    """Expand folders (non-recursive) into their image files; keep files as given."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its best.keras and preprocessing")
    source.add_argument("--model", help="a .keras file (default preprocessing: CLAHE + z-score)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default a quarter tile)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--save_probs", action="store_true")
    parser.add_argument("--overlay_fill", type=float, default=0.0, metavar="ALPHA",
                        help="also fill each nucleus on the overlay with its class colour at "
                             "this opacity (0: outlines only)")
    parser.add_argument("--instances", action="store_true",
                        help="also write nucleus instance maps and GeoJSON polygons")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = dict(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                  tta="all" if args.tta else None)
    try:
        if args.run:
            predictor = Predictor.from_run(args.run, **kwargs)
        else:
            predictor = Predictor(load_model_file(args.model), PreprocessConfig(), **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    postprocess = load_postprocess(args.run) if args.run else PostprocessConfig()
    class_names = label_names(predictor.class_names or ["nucleus"])
    failed = []
    for path in tqdm(collect_inputs(args.inputs), desc="predicting", unit="image"):
        try:
            image = read_image(path, channels=predictor.in_channels)
        except (FileNotFoundError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
            continue
        maps = predictor.predict_maps(image)
        probs = maps[SEMANTIC]
        labels = Predictor.to_labels(probs)
        nuclei, types = separate_instances(probs, maps, postprocess)  # outlines in the overlay
        if args.instances:
            cv2.imwrite(str(out / f"{path.stem}_instances.png"), nuclei.astype(np.uint16))
            geojson = instances_to_geojson(nuclei, types, class_names)
            atomic_write_text(out / f"{path.stem}.geojson", json.dumps(geojson))
        cv2.imwrite(str(out / f"{path.stem}_labels.png"), labels)
        shown = overlay(image, labels, nuclei, args.overlay_fill)
        cv2.imwrite(str(out / f"{path.stem}_overlay.png"), cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
        if args.save_probs:
            np.save(out / f"{path.stem}_probs.npy", probs.astype(np.float16))
    if failed:
        print(f"{len(failed)} file(s) could not be read and were skipped:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
