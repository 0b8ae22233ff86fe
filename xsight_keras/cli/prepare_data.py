"""Convert a downloaded dataset to the prepared, memory-mappable format.

    xsight-prepare-data pannuke --src ~/data/pannuke --out data/pannuke [--folds 1 2 3]
    xsight-prepare-data monuseg --src "~/data/MoNuSeg 2018 Training Data" --out data/monuseg --val_fraction 0.2
    xsight-prepare-data monuseg --src ~/data/MoNuSegTestData --out data/monuseg/test
    xsight-prepare-data folders --src ~/data/papsmear --out data/papsmear [--use_augmented]
    xsight-prepare-data demo --out data/demo [--train 192 --valid 48 --test 48]

Errors in the input (missing files, mismatched pairs, corrupt images, bad XML) end with exit
status 2 and a message naming the file; nothing half-written is left in --out.
"""

from __future__ import annotations

import argparse
import sys

from xsight_keras.data import (
    PreparedDataset,
    prepare_folders,
    prepare_monuseg,
    prepare_pannuke,
    write_demo_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("pannuke", help="PanNuke folds (images.npy, masks.npy, types.npy)")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, nargs="+", help="default: every fold found")
    p.add_argument("--chunk_size", type=int, default=16)
    p = sub.add_parser("monuseg", help="MoNuSeg .tif images with Aperio XML annotations")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True, help="the split folder; with --val_fraction the dataset root")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this fraction of the images as out/valid (the rest: out/train)")
    p.add_argument("--val_ids", nargs="+", help="hold out these images (file stems) as out/valid")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("folders", help="{train,valid,test}/{images,masks} folders, binary masks")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--use_augmented", action="store_true",
                   help="include the flipped_/mirrored_/rotated_<angle>_ copies")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p = sub.add_parser("demo", help="the built-in synthetic H&E set (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    for split, n in (("train", 192), ("valid", 48), ("test", 48)):
        p.add_argument(f"--{split}", type=int, default=n, help=f"tiles (default {n})")
    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    try:
        if args.dataset == "pannuke":
            written = prepare_pannuke(args.src, args.out, args.folds, args.chunk_size, progress)
        elif args.dataset == "monuseg":
            written = prepare_monuseg(args.src, args.out, progress, args.val_fraction, args.seed,
                                      args.val_ids)
        elif args.dataset == "folders":
            written = prepare_folders(args.src, args.out, args.use_augmented, args.channels, progress)
        else:
            sizes = {"train": args.train, "valid": args.valid, "test": args.test}
            written = list(write_demo_dataset(args.out, sizes, args.seed).values())
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}{_copies_note(path)}{_grey_note(path)}")
    return 0


def _grey_note(path) -> str:
    """How many mask pixels were ambiguous and thresholded (folders), else ''."""
    grey = PreparedDataset(path).meta.get("mask_grey") or {}
    if not grey.get("grey_pixels"):
        return ""
    return (f"; {grey['grey_pixels']:,} mask pixels ({100 * grey['grey_pixels'] / grey['pixels']:.1f}%, "
            f"in {grey['masks_with_grey']} of {grey['masks']} masks) were grey (soft JPEG edges) "
            "and thresholded at 128")


def _copies_note(path) -> str:
    """What a prepared split did with the pre-augmented copies it found (folders), else ''."""
    meta = PreparedDataset(path).meta
    copies = meta.get("augmented_copies") or {}
    if not copies.get("found"):
        return ""
    if copies["used"]:
        return (f": {meta['num_samples']} images, including {copies['used']} pre-augmented "
                "copies (flipped_/mirrored_/rotated_)")
    return (f": {meta['num_samples']} original images; {copies['found']} pre-augmented copies "
            "(flipped_/mirrored_/rotated_) skipped, --use_augmented includes them")


if __name__ == "__main__":
    sys.exit(main())
