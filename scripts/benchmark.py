#!/usr/bin/env python
"""Print performance figures as a table and JSON.

    python scripts/benchmark.py all             # everything below; < 10 min on a 2-core CPU
    python scripts/benchmark.py model [--model attention_unet|progressive_unet --batch 4
                                       --data_format channels_first --policy float32]
    python scripts/benchmark.py loader [--tiles 192 --level 2 --size 256 --batch 8]
    python scripts/benchmark.py prepare-memory [--tiles 2656]
    python scripts/benchmark.py monuseg --src ../shared/data/monuseg-train [--steps 600 --epochs 10]
    python scripts/benchmark.py wsi --run RUN --src ../shared/data/monuseg-train [--accuracy ID ...]

``model``: training images/s (``train_on_batch`` with the hybrid loss, AdamW; PGU-Net at its
256 px stage with its multi-scale loss) and, for the Attention U-Net, the same step of the
plain-PyTorch twin in ``benchmarks/torch_twin.py`` and the ratio of the two; inference tiles/s
with and without 8-fold TTA; the time to predict a 1000×1000 image with the sliding-window
predictor and its ratio to the same 25 tiles fed to the model in plain batches. Each figure is
the median of ``--repeats`` timings after warm-up, variants timed in turns.
``loader``: tiles/s of the training pipeline (memory-mapped read, crop, augmentation at
``--level``, CLAHE + z-score, one-hot targets) for 0, 1 and 2 worker processes, median of
``--repeats`` epochs after one warm-up epoch (worker start-up excluded).
``prepare-memory``: writes a fake PanNuke fold of ``--tiles`` tiles in the real float64 layout
(2656 tiles ≈ 12.5 GB on disk), prepares it in a child process and prints that process' peak
resident memory (VmHWM, Linux).
``monuseg``: real data: the MoNuSeg images under ``--src`` split by image id (3 validate, the
rest train), the ``monuseg`` preset trained from random initialisation for ``--steps`` optimizer
steps, post-processing tuned on the validation images, then per image and in mean: pixel Dice,
AJI, PQ (DQ, SQ), detection F1, true and predicted nucleus counts, and the training time
(:mod:`xsight_keras.evaluation.monuseg_benchmark`).
``wsi``: two slides (0.25 µm/px, 4 levels) mosaicked from the MoNuSeg images under ``--src``,
``--side`` and twice that wide, whose tissue squares differ 4× in area, each predicted by
``predict_wsi.py`` with ``--run`` in a fresh process: peak resident memory (VmHWM), seconds,
tiles/s and nuclei/s of the whole pipeline; the model alone (``Predictor`` forward passes on
preprocessed tiles of the same slides, same batch size) in fresh processes twice before and
twice after the slides, and each slide's tiles/s over the mean of those. ``--accuracy ID …``: those images side by side on one slide with glass around them,
predicted as a slide and scored per image against their annotations (Dice, AJI, PQ), to compare
with the whole-image figures of ``monuseg``.
``all``: each of the above but ``monuseg`` and ``wsi``, each in its own process, float32 and (on CUDA) mixed_float16, both data
formats for the Attention U-Net; prints one table and the JSON.

A developer tool, not a console command of the package: it needs a clone (the plain-PyTorch
twin in ``benchmarks/``, and it starts itself again by this file's path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np


def machine() -> str:
    """CPU model and cores, GPU name when torch sees one, Python, torch and Keras versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {len(os.sched_getaffinity(0))} CPU cores"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
        text += f", torch {torch.__version__}"
        import keras

        text += f", keras {keras.__version__}"
    except ImportError:
        pass
    return f"{text}, Python {platform.python_version()}"


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
    return {"benchmark": "loader", "size": args.size, "level": args.level,
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
    return {"benchmark": "prepare-memory", "tiles": args.tiles,
            "source_gb": round(source_gb, 2), "peak_rss_mb": round(peak_mb, 1),
            "prepare_s": round(seconds, 1), "fake_fold_write_s": round(made, 1)}


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable, timed in turns (a, b, a, b, …) after ``warmup`` calls of
    each, so that a slow stretch of the machine hits every variant alike. Each callable must
    finish its device work before it returns (read a result back)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _synthetic_batch(batch, size, classes, data_format, scales=(), seed=0):
    """Float32 images and one-hot targets (a dict per PGU-Net scale when ``scales``)."""
    from xsight_keras.heads import FUSED, scale_output

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 3, size, size)).astype("float32")
    y = np.eye(classes, dtype="float32")[rng.integers(0, classes, (batch, size, size))]
    y = y.transpose(0, 3, 1, 2).copy()
    if scales:
        y = {FUSED: y, **{scale_output(s): y[:, :, ::s, ::s].copy() for s in scales}}
    if data_format == "channels_last":
        to_last = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
        x = to_last(x)
        y = {k: to_last(v) for k, v in y.items()} if scales else to_last(y)
    return x, y


def _keras_model(name, data_format, policy, jit_compile, optimizer="fused_adamw"):
    import keras

    from xsight_keras.heads import scale_of
    from xsight_keras.models import attention_unet, progressive_unet
    from xsight_keras.training import DeviceLossScaleOptimizer, FusedAdamW
    from xsight_keras.training.losses import HybridLoss, multiscale_losses

    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy(policy)
    loss = HybridLoss(data_format=data_format)
    if name == "attention_unet":
        model = attention_unet(6, "resnet34", data_format=data_format)
        loss_weights, scales = None, ()
    else:  # PGU-Net's last stage (256 px), trained with its multi-scale loss as in train.py
        model = progressive_unet(4, 3, 6, data_format=data_format)
        loss, loss_weights = multiscale_losses(loss, model.output_names)
        scales = tuple(s for s in map(scale_of, model.output_names) if s)
    # FusedAdamW is what the engine trains with; keras_adamw for the before/after comparison
    optimizer = FusedAdamW(1e-3) if optimizer == "fused_adamw" else keras.optimizers.AdamW(1e-3)
    if policy == "mixed_float16":  # as the engine compiles it (Keras' own wraps otherwise)
        optimizer = DeviceLossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, jit_compile=jit_compile)
    return model, scales


def _twin_step(data_format, policy, x, y):
    """The plain-PyTorch twin's training step on the same batch (``benchmarks/torch_twin.py``)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twin import TorchAttentionUNet, make_train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory_format = torch.channels_last if data_format == "channels_last" else torch.contiguous_format
    model = TorchAttentionUNet().to(device, memory_format=memory_format)
    amp = {"mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}.get(policy)
    step = make_train_step(model, amp_dtype=amp, device=device)
    if data_format == "channels_last":  # the twin always takes NCHW shapes; NHWC memory here
        x, y = x.transpose(0, 3, 1, 2), y.transpose(0, 3, 1, 2)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device, memory_format=memory_format)
    yt = torch.from_numpy(np.ascontiguousarray(y)).to(device, memory_format=memory_format)
    return lambda: step(xt, yt).item()


def bench_model(args) -> dict:
    """Training and inference figures for one model, data format and precision policy."""
    import keras

    import xsight_keras  # noqa: F401
    from xsight_keras.data.preprocess import PreprocessConfig
    from xsight_keras.inference import Predictor
    from xsight_keras.inference.predictor import _positions
    from xsight_keras.training.host_memory import keep_freed_memory_in_process

    if not args.glibc_malloc_defaults and not _cuda():  # as the training engine does on CPUs
        keep_freed_memory_in_process()
    model, scales = _keras_model(args.model, args.data_format, args.policy, args.jit_compile,
                                 args.optimizer)
    model.lean_execution = not args.keras_call
    x, y = _synthetic_batch(args.batch, args.size, 6, args.data_format, scales)
    # on the device already, as the twin's batch is: the step is timed, not the host-to-device copy
    xd, yd = keras.tree.map_structure(keras.ops.convert_to_tensor, (x, y))
    keras_step = lambda: model.train_on_batch(xd, yd)
    steps = {"keras": keras_step}
    if args.model == "attention_unet" and not args.no_twin:
        steps["twin"] = _twin_step(args.data_format, args.policy, x, y)
    train = interleaved_medians(steps, args.repeats)
    result = {"benchmark": "model", "model": args.model, "data_format": args.data_format,
              "policy": args.policy, "jit_compile": args.jit_compile, "batch": args.batch,
              "size": args.size, "optimizer": args.optimizer, "keras_call": args.keras_call,
              "glibc_malloc_defaults": args.glibc_malloc_defaults or _cuda(),
              "train_images_per_s": round(args.batch / train["keras"], 2)}
    if "twin" in train:
        result["twin_train_images_per_s"] = round(args.batch / train["twin"], 2)
        result["train_step_ratio_vs_twin"] = round(train["keras"] / train["twin"], 3)
    if _cuda():
        result["gpu_busy_train"] = gpu_busy_fraction(keras_step)
        if "twin" in steps:
            result["gpu_busy_train_twin"] = gpu_busy_fraction(steps["twin"])
    if args.train_only:
        return {**result, "train_only": True}

    rng = np.random.default_rng(1)
    whole = rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    predictor = Predictor(model, PreprocessConfig(), tile_size=args.size, batch_size=args.batch)
    tta = Predictor(model, PreprocessConfig(), tile_size=args.size, tta="all", batch_size=args.batch)
    tile = whole[:args.size, :args.size]
    # the reference for the sliding window: the same tiles of the same preprocessed image, fed
    # to the model in the same batches, without cutting, blending or TTA
    from xsight_keras.data.preprocess import preprocess_image

    image = preprocess_image(whole, PreprocessConfig())
    starts = _positions(1000, args.size, args.size - predictor.overlap)
    tiles = np.stack([image[r:r + args.size, c:c + args.size] for r in starts for c in starts])
    if args.data_format == "channels_first":
        tiles = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
    plain = [tiles[i:i + args.batch] for i in range(0, len(tiles), args.batch)]
    infer = interleaved_medians({
        "batch": lambda: model.predict_on_batch(xd),
        "tta": lambda: tta.predict_probabilities(tile),
        "whole": lambda: predictor.predict_probabilities(whole),
        "plain": lambda: [model.predict_on_batch(b) for b in plain],
    }, max(1, args.repeats // 2 + 1), warmup=1)
    result.update({
        "inference_tiles_per_s": round(args.batch / infer["batch"], 2),
        "tta8_tiles_per_s": round(1 / infer["tta"], 2),
        "predict_1000x1000_s": round(infer["whole"], 3),
        "plain_batches_same_tiles_s": round(infer["plain"], 3),
        "sliding_window_ratio": round(infer["whole"] / infer["plain"], 3),
    })
    return result


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_busy_fraction(fn, steps: int = 5) -> float | None:
    """Share of the wall time of ``steps`` calls of ``fn`` during which the GPU ran kernels
    (the sum of kernel times from ``torch.profiler``, divided by the wall time); None without
    CUDA. The profiler adds a little host time, so this slightly understates the busy share."""
    import torch

    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels_us = 0.0
    for event in prof.key_averages():
        kernels_us += getattr(event, "self_device_time_total", None) or getattr(
            event, "self_cuda_time_total", 0.0)
    return round(kernels_us / 1e6 / wall, 3)


def bench_host_overhead(args) -> dict:
    """Python time per step: the Attention U-Net (ResNet34, channels_first, float32) on tiny
    inputs (default 32×32, batch 2), where the arithmetic is negligible and a step is mostly
    the framework's own Python, as a GPU step is while the GPU waits. A training-mode forward
    pass and a training step (hybrid loss, FusedAdamW) of the Keras model, with its lean graph
    executor (the default on torch) and with Keras' own Functional call, against the
    plain-PyTorch twin's; medians of interleaved runs."""
    import keras
    import torch

    import xsight_keras  # noqa: F401
    from xsight_keras.models.lean_graph import LeanGraph

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twin import TorchAttentionUNet

    torch.manual_seed(0)
    model, _ = _keras_model("attention_unet", "channels_first", "float32", False)
    x, y = _synthetic_batch(args.batch, args.size, 6, "channels_first")
    xd, yd = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    device = "cuda" if _cuda() else "cpu"
    twin = TorchAttentionUNet().to(device).train()
    xt = torch.from_numpy(x).to(device)

    def keras_call(fn, lean):
        def run():
            model.lean_execution = lean
            try:
                fn()
                _sync()
            finally:
                model.lean_execution = True
        return run

    def twin_forward():
        twin(xt)
        _sync()

    forward = interleaved_medians({
        "lean": keras_call(lambda: model(xd, training=True), True),
        "keras": keras_call(lambda: model(xd, training=True), False),
        "twin": twin_forward,
    }, args.repeats, warmup=3)
    train = interleaved_medians({
        "lean": keras_call(lambda: model.train_on_batch(xd, yd), True),
        "keras": keras_call(lambda: model.train_on_batch(xd, yd), False),
        "twin": _twin_step("channels_first", "float32", x, y),
    }, args.repeats, warmup=3)
    compiled = {}
    if args.compile_mode:  # torch.compile of the lean executor's inference pass, against eager
        graph = LeanGraph.plan(model)
        fn = torch.compile(lambda t: graph.run(t, False), mode=args.compile_mode)

        def infer(f):
            def run():
                with torch.no_grad():
                    f(xd)
                _sync()
            return run

        start = time.perf_counter()
        infer(fn)()
        first = time.perf_counter() - start
        times = interleaved_medians({"compiled": infer(fn), "eager": infer(lambda t: graph.run(t, False))},
                                    args.repeats, warmup=2)
        compiled = {"compile_mode": args.compile_mode, "compile_first_call_s": round(first, 1),
                    "inference_ms": {k: round(v * 1000, 2) for k, v in times.items()}}
    ms = lambda t: round(t * 1000, 2)
    busy = {}
    if _cuda():
        busy = {"gpu_busy_forward": gpu_busy_fraction(keras_call(lambda: model(xd, training=True), True)),
                "gpu_busy_forward_twin": gpu_busy_fraction(twin_forward)}
    return {**busy, **compiled,
        "benchmark": "host-overhead", "batch": args.batch, "size": args.size,
        "layers_run": LeanGraph.plan(model).kinds(),
        "forward_ms": {k: ms(v) for k, v in forward.items()},
        "forward_ratio_vs_twin": round(forward["lean"] / forward["twin"], 3),
        "forward_ratio_keras_call_vs_twin": round(forward["keras"] / forward["twin"], 3),
        "train_step_ms": {k: ms(v) for k, v in train.items()},
        "train_step_ratio_vs_twin": round(train["lean"] / train["twin"], 3),
        "train_step_ratio_keras_call_vs_twin": round(train["keras"] / train["twin"], 3),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_all(args) -> dict:
    """Every figure of the README's performance table, each benchmark in a fresh process (so
    one's Keras globals and memory do not touch the next)."""
    def run(*argv):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--quiet"],
                             check=False, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"benchmark {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    policies = ["float32"] + (["mixed_float16"] if _cuda() else [])
    rows = []
    for policy in policies:
        for fmt in args.data_formats:
            rows.append(run("model", "--model", "attention_unet", "--data_format", fmt,
                            "--policy", policy, "--repeats", str(args.repeats),
                            "--batch", str(args.batch)))
        rows.append(run("model", "--model", "progressive_unet", "--data_format", "channels_first",
                        "--policy", policy, "--repeats", str(args.repeats), "--batch", str(args.batch)))
    if not _cuda():  # the same train step with glibc's default malloc (Keras and twin alike)
        rows.append(run("model", "--model", "attention_unet", "--data_format", "channels_first",
                        "--repeats", str(args.repeats), "--batch", str(args.batch), "--train_only",
                        "--glibc_malloc_defaults"))
    loader = run("loader", "--repeats", str(args.repeats), "--batch", str(args.batch))
    memory = run("prepare-memory", "--tiles", str(args.tiles)) if args.tiles else None
    default = next(r for r in rows if r["model"] == "attention_unet" and r["policy"] == "float32"
                   and r["data_format"] == "channels_first" and not r.get("train_only"))
    consumption = default["train_images_per_s"]
    return {"benchmark": "all", "machine": machine(), "models": rows, "loader": loader,
            "prepare_memory": memory,
            "loader_2_workers_over_training": round(loader["tiles_per_s"]["workers_2"] / consumption, 1)}


def print_table(result: dict) -> None:
    """Human-readable lines for any benchmark's result (``all`` gets one row per model)."""
    if result["benchmark"] != "all":
        for key, value in result.items():
            print(f"{key:>26s}: {value}")
        return
    print(f"machine: {result['machine']}")
    cols = ("model", "data_format", "policy", "glibc_malloc_defaults", "train_images_per_s",
            "twin_train_images_per_s", "train_step_ratio_vs_twin",
            "inference_tiles_per_s", "tta8_tiles_per_s", "predict_1000x1000_s", "sliding_window_ratio")
    print(" | ".join(cols))
    for row in result["models"]:
        print(" | ".join(str(row.get(c, "-")) for c in cols))
    print(f"loader tiles/s: {result['loader']['tiles_per_s']}; with 2 workers "
          f"{result['loader_2_workers_over_training']}× what the default model trains on")
    if result["prepare_memory"]:
        m = result["prepare_memory"]
        print(f"preparing a {m['tiles']}-tile fold ({m['source_gb']} GB): peak {m['peak_rss_mb']} MB, "
              f"{m['prepare_s']} s")


WSI_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from xsight_keras.cli.predict_wsi import main
status = main(sys.argv[2:])
peak = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"status": status, "peak_rss_kb": int(peak)}))
"""

MODEL_ALONE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from xsight_keras.inference import Predictor
from xsight_keras.slides import SlideReader
run, slide, mpp, n, batch = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
p = Predictor.from_run(run, batch_size=batch)
with SlideReader(slide, mpp) as reader:
    h, w = reader.size
    image = reader.read(h // 2 - 512, w // 2 - 512, 1024, 1024)  # tissue at the centre
region = p.prepare_region(image)
tiles = np.stack([region.pixels[r:r + p.tile_size, c:c + p.tile_size] for r, c in region.tiles])
tiles = np.concatenate([tiles] * (-(-n // len(tiles))))[:n]
p._forward(tiles[:batch])  # warm-up
start = time.perf_counter()
for i in range(0, n, batch):
    p._forward(tiles[i:i + batch])
print(json.dumps({"tiles": n, "seconds": time.perf_counter() - start}))
"""


def _monuseg_sources(src: str, ids=None):
    """(images uint8 (N, 1000, 1000, 3), instances int32 (N, 1000, 1000), names) of the
    MoNuSeg images under ``src`` (``ids``: only these)."""
    from xsight_keras.data.monuseg import find_monuseg_pairs, read_monuseg_sample

    pairs = [p for p in find_monuseg_pairs(src) if not ids or p[0].stem in ids]
    samples = [read_monuseg_sample(*p) for p in pairs]
    return (np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples]),
            [p[0].stem for p in pairs])


def _write_benchmark_slide(path: Path, side: int, tissue: int, images, instances):
    """A ``side``×``side`` slide (0.25 µm/px, 3 levels) with a ``tissue``×``tissue`` square of
    mosaicked source tiles at its centre."""
    from xsight_keras.slides.synthetic import Mosaic, write_pyramid_tiff

    lo, hi = (side - tissue) // 2, (side + tissue) // 2
    mosaic = Mosaic(images, instances,
                    tissue=lambda y, x: (y >= lo) & (y < hi) & (x >= lo) & (x < hi))
    if not path.is_file():
        write_pyramid_tiff(path, (side, side), mosaic.render, mpp=0.25, levels=4)
    return mosaic


def bench_wsi(args) -> dict:
    """Peak memory and throughput of whole-slide prediction on two slides whose tissue differs
    4× in area, against the model alone on the same tiles; with ``--accuracy``, the nuclei of a
    slide made of the run's validation images scored against their annotations."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, instances, names = _monuseg_sources(args.src)
    with open(Path(args.run) / "config.json") as f:
        settings = json.load(f)
    mpp = args.model_mpp or settings.get("mpp") or 0.25
    result = {"benchmark": "wsi", "run": str(args.run), "model_mpp": mpp,
              "batch_size": args.batch, "slides": {}}
    tiles_for_model = str(args.model_tiles)

    def model_alone() -> float:
        """tiles/s of the model alone, in a fresh process (the machine's speed drifts: this is
        measured before and after the slides, twice each, and the mean is the reference)."""
        source = out / "slide_small.tif"
        child = subprocess.run([sys.executable, "-c", MODEL_ALONE_CHILD, str(ROOT), str(args.run),
                                str(source), str(mpp), tiles_for_model, str(args.batch)],
                               capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(f"model-alone timing failed:\n{child.stderr[-3000:]}")
        timing = json.loads(child.stdout.strip().splitlines()[-1])
        return round(timing["tiles"] / timing["seconds"], 2)

    alone_before = None
    for label, tissue in (("small", args.tissue), ("large", 2 * args.tissue)):
        slide = out / f"slide_{label}.tif"
        _write_benchmark_slide(slide, args.side if label == "small" else 2 * args.side, tissue,
                               images, instances)
        if alone_before is None:
            alone_before = [model_alone() for _ in range(2)]
        preds = out / "predictions"
        shutil.rmtree(preds / slide.stem, ignore_errors=True)
        argv = [str(slide), "--run", str(args.run), "--out", str(preds), "--model_mpp", str(mpp),
                "--batch_size", str(args.batch), "--no_progress"]
        t0 = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", WSI_CHILD, str(ROOT), *argv],
                               capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if child.returncode:
            raise RuntimeError(f"predict_wsi failed:\n{child.stderr[-3000:]}")
        child_result = json.loads(child.stdout.strip().splitlines()[-1])
        summary = json.loads((preds / slide.stem / "summary.json").read_text())
        tiles = summary["tiles_predicted"]
        result["slides"][label] = {
            "size_px": summary["reader"]["level0_size"], "tissue_mm2": summary["tissue_mm2"],
            "tiles": tiles, "nuclei": summary["nuclei"],
            "peak_rss_mb": round(child_result["peak_rss_kb"] / 1024, 1),
            "seconds": summary["seconds"], "process_wall_s": round(wall, 1),
            "tiles_per_s": round(tiles / summary["seconds"]["total"], 2),
            "nuclei_per_s": round(summary["nuclei"] / summary["seconds"]["total"], 1)}
    alone = [model_alone() for _ in range(2)]
    result["model_alone_tiles_per_s"] = alone_before + alone
    reference = statistics.mean(result["model_alone_tiles_per_s"])
    for slide_result in result["slides"].values():
        slide_result["over_model_alone"] = round(slide_result["tiles_per_s"] / reference, 3)
    small, large = result["slides"]["small"], result["slides"]["large"]
    result["tissue_area_ratio"] = round(large["tissue_mm2"] / small["tissue_mm2"], 2)
    result["peak_rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    if args.accuracy:
        result["accuracy"] = _wsi_accuracy(args, out, mpp)
    return result


def _wsi_accuracy(args, out: Path, mpp: float) -> dict:
    """The run's validation images side by side on one slide with glass around them, predicted
    as a slide; each image's nuclei (rasterised from the Parquet polygons) scored against its
    annotations with the MoNuSeg metrics."""
    import cv2
    import pyarrow.parquet as pq
    import shapely

    from xsight_keras.evaluation.monuseg_benchmark import score_image
    from xsight_keras.slides.synthetic import GLASS, write_pyramid_tiff

    images, instances, names = _monuseg_sources(args.src, args.accuracy)
    n, size, border = len(images), images.shape[1], 300
    canvas_shape = (size + 2 * border, n * size + 2 * border)

    def render(y, x, h, w):
        region = np.full((h, w, 3), GLASS, np.uint8)
        for i, image in enumerate(images):
            oy, ox = border, border + i * size
            a, b = max(oy - y, 0), max(ox - x, 0)
            c, d = min(oy + size - y, h), min(ox + size - x, w)
            if c > a and d > b:
                region[a:c, b:d] = image[y + a - oy:y + c - oy, x + b - ox:x + d - ox]
        return region

    slide = out / "slide_validation.tif"
    write_pyramid_tiff(slide, canvas_shape, render, mpp=0.25, levels=3)
    preds = out / "predictions"
    shutil.rmtree(preds / slide.stem, ignore_errors=True)
    from xsight_keras.cli.predict_wsi import main as predict_wsi

    predict_wsi([str(slide), "--run", str(args.run), "--out", str(preds), "--model_mpp", str(mpp),
                 "--batch_size", str(args.batch), "--no_progress"])
    table = pq.read_table(preds / slide.stem / f"{slide.stem}_nuclei.parquet")
    found = np.zeros(canvas_shape, np.int32)
    polygons = shapely.from_wkb(table.column("polygon").to_numpy(zero_copy_only=False))
    for i, polygon in enumerate(polygons, start=1):
        ring = shapely.get_coordinates(shapely.get_exterior_ring(polygon))
        cv2.fillPoly(found, [np.round(ring).astype(np.int32)], i)
    scores = {}
    for i, name in enumerate(names):
        crop = found[border:border + size, border + i * size:border + (i + 1) * size]
        scores[name] = {k: round(float(v), 4) for k, v in score_image(instances[i], crop).items()}
    mean = {k: round(float(np.mean([s[k] for s in scores.values()])), 4)
            for k in ("dice", "aji", "pq")}
    return {"images": scores, "mean": mean}


def bench_monuseg(args) -> int:
    from xsight_keras.evaluation.monuseg_benchmark import format_report, run_monuseg_benchmark

    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        report = run_monuseg_benchmark(args.src, args.out, args.steps, args.epochs, overrides,
                                       progress=not args.quiet, curve=args.curve)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["machine"] = machine()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result to this file")
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
    p.add_argument("--model", default="attention_unet", choices=("attention_unet", "progressive_unet"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data_format", default="channels_first", choices=("channels_first", "channels_last"))
    p.add_argument("--policy", default="float32", help="float32, mixed_float16 (CUDA) or mixed_bfloat16")
    p.add_argument("--jit_compile", action="store_true", help="torch.compile the train and predict steps")
    p.add_argument("--no_twin", action="store_true", help="skip the plain-PyTorch comparison")
    p.add_argument("--train_only", action="store_true", help="skip the inference figures")
    p.add_argument("--optimizer", default="fused_adamw", choices=("fused_adamw", "keras_adamw"))
    p.add_argument("--glibc_malloc_defaults", action="store_true",
                   help="leave glibc's malloc as it is (the engine keeps freed memory in the process)")
    p.add_argument("--keras_call", action="store_true",
                   help="run the model through Keras' own Functional call, not the lean executor")
    p = sub.add_parser("host-overhead")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--compile_mode", default=None,
                   help="also time torch.compile of the inference pass in this mode (default, "
                        "reduce-overhead: CUDA graphs on GPUs, max-autotune)")
    p = sub.add_parser("monuseg")
    p.add_argument("--src", required=True, help="MoNuSeg images + XML (e.g. ../shared/data/monuseg-train)")
    p.add_argument("--out", default="benchmarks/monuseg", help="prepared data, run and JSON go here")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps in all")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="run settings over the preset, e.g. encoder=resnet18 instance_head=true")
    p.add_argument("--curve", type=int, default=0, metavar="N",
                   help="also score the model of every N-th epoch: Dice, AJI and PQ against "
                        "optimizer steps (0: no curve)")
    p = sub.add_parser("wsi")
    p.add_argument("--run", required=True, help="a trained run (e.g. the monuseg benchmark's)")
    p.add_argument("--src", required=True, help="MoNuSeg images + XML the slides are made of")
    p.add_argument("--out", default="benchmarks/wsi", help="slides and predictions go here")
    p.add_argument("--side", type=int, default=6144, help="the small slide's side (the large: 2x)")
    p.add_argument("--tissue", type=int, default=3072, help="the small slide's tissue side (large: 2x)")
    p.add_argument("--batch", type=int, default=4, help="predict_wsi.py's default on the CPU")
    p.add_argument("--model_mpp", type=float, help="when the run's config has no mpp")
    p.add_argument("--model_tiles", type=int, default=160,
                   help="tiles per timing of the model alone (four timings)")
    p.add_argument("--accuracy", nargs="*", metavar="IMAGE_ID",
                   help="also score a slide made of these MoNuSeg images (the run's validation "
                        "images) against their annotations")
    p = sub.add_parser("all")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiles", type=int, default=2656, help="fold size for prepare-memory (0: skip)")
    p.add_argument("--data_formats", nargs="+", default=["channels_first", "channels_last"])
    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.what == "monuseg":
        return bench_monuseg(args)
    bench = {"loader": bench_loader, "prepare-memory": bench_prepare_memory, "model": bench_model,
             "wsi": bench_wsi, "all": bench_all, "host-overhead": bench_host_overhead}
    result = bench[args.what](args)
    if args.what != "all":
        result["machine"] = machine()
    if not args.quiet:
        print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
