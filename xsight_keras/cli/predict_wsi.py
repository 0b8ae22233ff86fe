"""Segment every nucleus of whole-slide images and export them for QuPath.

    xsight-predict-wsi slides/ --run outputs/monuseg --out wsi/
    xsight-predict-wsi cohort.txt --run outputs/monuseg --out wsi/ --shard $SLURM_ARRAY_TASK_ID/8
    xsight-predict-wsi scan.tif --model best.keras --model_mpp 0.25 --mpp 0.25 --out wsi/

Inputs: slide files (.svs, .ndpi, .mrxs, tiled .tif …), folders of them, or .txt lists (one
path per line). Per slide, in <out>/<slide name>/: <name>.geojson (--gzip: .geojson.gz),
<name>_nuclei.parquet, <name>_overlay.png, <name>_tissue.png and summary.json (see
xsight_keras.slides.pipeline). Slides already done are skipped; a killed run resumes from the
last finished block of its slide when started again with the same arguments. A slide that
cannot be read is listed in <out>/cohort_summary.json and the exit status is 1; the others are
still predicted. Exit status 2: bad arguments or model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xsight_keras.data.loader import parse_schedule
from xsight_keras.data.preprocess import PreprocessConfig
from xsight_keras.evaluation.evaluate import load_postprocess
from xsight_keras.inference import Predictor
from xsight_keras.inference.instances import PostprocessConfig
from xsight_keras.inference.predictor import load_model_file
from xsight_keras.rundir import RunDir
from xsight_keras.slides import SlideSettings, collect_slides, predict_cohort


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="slide files, folders of slides, .txt lists")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its best.keras, preprocessing, mpp and "
                                      "tuned post-processing")
    source.add_argument("--model", help="a .keras file (default preprocessing: CLAHE + z-score; "
                                        "needs --model_mpp)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model_mpp", type=float,
                        help="µm per pixel the model was trained at (default: the run's mpp)")
    parser.add_argument("--mpp", type=float,
                        help="µm per pixel of the slides, for slides whose metadata has none")
    parser.add_argument("--shard", help="I/N: predict every N-th slide from the I-th (0 <= I < N)")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles "
                                                    "(default a quarter tile)")
    parser.add_argument("--batch_size", type=int,
                        help="tiles per forward pass (default 16 on a GPU; 4 on the CPU, as fast "
                             "there as 8 with 30%% less memory)")
    parser.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    parser.add_argument("--block", type=int, default=SlideSettings.block,
                        help="pixels per side of the blocks a slide is processed in")
    parser.add_argument("--margin", type=int, default=SlideSettings.margin,
                        help="context around each block, above the largest nucleus' diameter")
    parser.add_argument("--workers", type=int, default=SlideSettings.workers,
                        help="threads reading and preparing blocks ahead of the model")
    parser.add_argument("--clahe_cell", type=float,
                        help="pixels per CLAHE cell in each block (default: as on the run's "
                             "validation images, e.g. 1000 px / 8 = 125 for MoNuSeg)")
    parser.add_argument("--overlay_fill", type=float, default=0.0, metavar="ALPHA",
                        help="also fill each nucleus on the overlay with its class colour at "
                             "this opacity (0: outlines only)")
    parser.add_argument("--gzip", action="store_true", help="write .geojson.gz")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def validation_image_size(run: RunDir) -> int:
    """The side of the images a run was validated and had its post-processing tuned on (whole
    images through the predictor: their CLAHE cells are that side over the grid): the first
    image of its prepared validation split when it is still there, else the size it last
    trained at."""
    try:
        _, dataset = run.split("valid")
        return int(max(dataset.shape(0)[:2]))
    except (OSError, ValueError, KeyError, IndexError):
        settings = run.settings
        schedule = settings.get("size_schedule")
        if schedule and settings.get("progressive"):
            return int(max(parse_schedule(schedule).items())[1])
        return int(settings.get("input_size", 256))


def default_batch_size() -> int:
    """16 tiles per forward pass on a GPU, 4 on the CPU (measured on 2 cores with the MoNuSeg
    model: the same tiles/s as 8, peak memory 2.1 GB instead of 2.9)."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        return 16 if torch.cuda.is_available() else 4
    if keras.backend.backend() == "jax":
        import jax

        return 16 if jax.default_backend() == "gpu" else 4
    return 4


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = dict(tile_size=args.tile_size, overlap=args.overlap,
                  batch_size=args.batch_size or default_batch_size(),
                  tta="all" if args.tta else None)
    try:
        settings = SlideSettings(block=args.block, margin=args.margin, slide_mpp=args.mpp,
                                 gzip=args.gzip, workers=args.workers,
                                 overlay_fill=args.overlay_fill)
        if args.run:
            run = RunDir.open(args.run)
            predictor = Predictor.from_run(args.run, **kwargs)
            model_mpp = args.model_mpp or run.settings.get("mpp")
            postprocess = load_postprocess(args.run)
            cell = args.clahe_cell or validation_image_size(run) / max(predictor.preprocess.clahe_grid)
            model_id = str(Path(args.run).resolve() / "best.keras")
        else:
            predictor = Predictor(load_model_file(args.model), PreprocessConfig(), **kwargs)
            model_mpp, postprocess, cell = args.model_mpp, PostprocessConfig(), args.clahe_cell
            model_id = str(Path(args.model).resolve())
        if not model_mpp:
            raise ValueError("the model's µm per pixel is unknown (its run has no mpp): pass "
                             "--model_mpp (0.25 for a model trained on 40x tiles)")
        slides = collect_slides(args.inputs)
        if not slides:
            raise ValueError(f"no slides found in {' '.join(args.inputs)}")
        result = predict_cohort(slides, predictor, args.out, model_mpp, shard_spec=args.shard,
                                postprocess=postprocess, settings=settings, clahe_cell=cell,
                                model_id=model_id, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result['done'])} slide(s) predicted, {len(result['skipped'])} already done, "
          f"{len(result['failed'])} failed; outputs in {args.out}")
    for failure in result["failed"]:
        print(f"  failed: {failure['slide']}: {failure['error']}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
