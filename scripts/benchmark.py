#!/usr/bin/env python
"""Print performance figures as a table and JSON.

    python scripts/benchmark.py loader [--tiles 192 --level 2 --size 256 --batch 8]
    python scripts/benchmark.py prepare-memory [--tiles 2656]
    python scripts/benchmark.py model [--encoder resnet34 --batch 4 --size 256 --data_format channels_first]

``loader``: tiles/s of the training pipeline (memory-mapped read, crop, augmentation at
``--level``, CLAHE + z-score, one-hot targets) for 0, 1 and 2 worker processes, median of
``--repeats`` epochs after one warm-up epoch (worker start-up excluded).
``model``: training images/s (one ``train_on_batch`` of the hybrid loss), inference tiles/s with
and without 8-fold TTA, and the time to predict a 1000×1000 image with the sliding-window
predictor, for the Attention U-Net; median of ``--repeats`` after warm-up.
``prepare-memory``: writes a fake PanNuke fold of ``--tiles`` tiles in the real float64 layout
(2656 tiles ≈ 12.5 GB on disk), prepares it in a child process and prints that process' peak
resident memory (VmHWM, Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"


def bench_loader(args) -> dict:
    from xsight_keras.data import SegmentationDataset, make_loader, write_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_dataset(tmp, {"train": args.tiles}, seed=0)["train"]
        dataset = SegmentationDataset(path, size=args.size, level=args.level)
        results = {}
        for workers in args.workers:
            loader = make_loader(dataset, args.batch, num_workers=workers)
            rates = []
            for epoch in range(args.repeats + 1):
                start, n = time.perf_counter(), 0
                for x, _ in loader:
                    n += len(x)
                if epoch:  # the first epoch warms up (and starts the workers)
                    rates.append(n / (time.perf_counter() - start))
            results[f"workers_{workers}"] = round(statistics.median(rates), 1)
            del loader
    return {"benchmark": "loader", "machine": machine(), "size": args.size, "level": args.level,
            "batch": args.batch, "tiles_per_s": results}


def _make_fake_fold(root: Path, n: int) -> None:
    img_dir, mask_dir = root / "Fold 1" / "images" / "fold1", root / "Fold 1" / "masks" / "fold1"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    images = np.lib.format.open_memmap(img_dir / "images.npy", "w+", np.float64, (n, 256, 256, 3))
    masks = np.lib.format.open_memmap(mask_dir / "masks.npy", "w+", np.float64, (n, 256, 256, 6))
    rng = np.random.default_rng(0)
    for start in range(0, n, 64):
        stop = min(start + 64, n)
        images[start:stop] = rng.uniform(0, 255, (stop - start, 256, 256, 3))
        m = np.zeros((stop - start, 256, 256, 6))
        m[:, 10:40, 10:40, 0] = 3
        m[:, 60:80, 100:140, 2] = 8
        m[..., 5] = m[..., :5].sum(-1) == 0
        masks[start:stop] = m
    images.flush()
    masks.flush()
    del images, masks
    np.save(img_dir / "types.npy", np.array(["Breast"] * n))


def bench_prepare_memory(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src = Path(tmp) / "src"
        t0 = time.perf_counter()
        _make_fake_fold(src, args.tiles)
        made = time.perf_counter() - t0
        code = ("import sys; sys.path.insert(0, sys.argv[3]);"
                "from xsight_keras.data import prepare_pannuke;"
                "prepare_pannuke(sys.argv[1], sys.argv[2], progress=False);"
                # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, str(src), str(Path(tmp) / "out"),
                              os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                             check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_mb = int(out.stdout.strip().splitlines()[-1]) / 1024
        source_gb = sum(p.stat().st_size for p in src.rglob("*.npy")) / 1e9
    return {"benchmark": "prepare-memory", "machine": machine(), "tiles": args.tiles,
            "source_gb": round(source_gb, 2), "peak_rss_mb": round(peak_mb, 1),
            "prepare_s": round(seconds, 1), "fake_fold_write_s": round(made, 1)}


def bench_model(args) -> dict:
    import keras

    import xsight_keras  # noqa: F401
    from xsight_keras.data.preprocess import PreprocessConfig
    from xsight_keras.inference import Predictor
    from xsight_keras.models import attention_unet
    from xsight_keras.training.losses import HybridLoss

    keras.config.set_image_data_format(args.data_format)
    if args.policy != "float32":
        keras.config.set_dtype_policy(args.policy)
    model = attention_unet(6, encoder=args.encoder)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=HybridLoss(data_format=args.data_format))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    x = rng.normal(size=shape + (3,)).astype("float32")
    y = np.eye(6, dtype="float32")[rng.integers(0, 6, shape)]
    if args.data_format == "channels_first":
        x, y = x.transpose(0, 3, 1, 2).copy(), y.transpose(0, 3, 1, 2).copy()

    def timed(fn, repeats):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    train_s = timed(lambda: model.train_on_batch(x, y), args.repeats)
    infer_s = timed(lambda: model.predict_on_batch(x), args.repeats)
    image = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    tta = Predictor(model, PreprocessConfig(), tile_size=args.size, tta="all")
    tta_s = timed(lambda: tta.predict_probabilities(image), args.repeats)
    whole = rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    predictor = Predictor(model, PreprocessConfig(), tile_size=args.size, batch_size=args.batch)
    whole_s = timed(lambda: predictor.predict_probabilities(whole), max(1, args.repeats // 2))
    return {"benchmark": "model", "machine": machine(), "backend": keras.backend.backend(),
            "encoder": args.encoder, "data_format": args.data_format, "policy": args.policy,
            "batch": args.batch, "size": args.size,
            "train_images_per_s": round(args.batch / train_s, 2),
            "inference_tiles_per_s": round(args.batch / infer_s, 2),
            "tta8_tiles_per_s": round(1 / tta_s, 2),
            "predict_1000x1000_s": round(whole_s, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loader")
    p.add_argument("--tiles", type=int, default=192)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--level", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p = sub.add_parser("prepare-memory")
    p.add_argument("--tiles", type=int, default=2656)
    p.add_argument("--tmp", default=None, help="folder for the fake fold (needs ~5 MB per tile)")
    p = sub.add_parser("model")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data_format", default="channels_first", choices=("channels_first", "channels_last"))
    p.add_argument("--policy", default="float32", help="float32, mixed_float16 (CUDA) or mixed_bfloat16")
    args = parser.parse_args(argv)
    bench = {"loader": bench_loader, "prepare-memory": bench_prepare_memory, "model": bench_model}
    result = bench[args.what](args)
    for key, value in result.items():
        print(f"{key:>18s}: {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
