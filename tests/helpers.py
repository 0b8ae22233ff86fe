"""Helpers shared by the test modules: paths, subprocess environments, writers of small fixtures
in the real on-disk formats (PanNuke folds, Aperio XML), and weight comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SHARED_DATA = ROOT.parent / "shared" / "data"


def script_env(**extra) -> dict:
    """The environment for a subprocess of the package: this checkout first on the path,
    the torch backend unless ``extra`` says otherwise."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name: str, *args, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>.py args...`` in a fresh process; returns the completed process
    (stdout and stderr as text), whatever its exit status."""
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
                          env=script_env(**env), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)


def start_python(*args, env: dict) -> subprocess.Popen:
    """``python args...`` started in the background from the repository root (stdout and stderr
    captured as text); wait for it with :func:`finish`."""
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a process from :func:`start_python`; assert it succeeded; return its stdout.
    The process is killed if it is still running when the wait ends (time-out, interrupt)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def script_main(name: str):
    """The ``main(argv) -> exit status`` of the command ``scripts/<name>.py`` runs
    (``xsight_keras.cli.<name>``), to run it in this process (no interpreter start-up; errors go
    to this process' stderr)."""
    import importlib

    return importlib.import_module(f"xsight_keras.cli.{name}").main


def numpy_weights(model: keras.Model) -> list[np.ndarray]:
    """Every variable of ``model`` (weights and BatchNorm statistics) as numpy arrays."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def saved_weights(path) -> list[np.ndarray]:
    """The variables of a saved ``.keras`` file (see :func:`numpy_weights`)."""
    import xsight_keras  # noqa: F401  (registers the custom objects)

    return numpy_weights(keras.models.load_model(path))


def assert_same_weights(a, b, rtol: float = 0.0, atol: float = 0.0, what: str = "weights") -> None:
    """Two lists of arrays agree one by one, and have the same length and shapes (a bare
    ``zip`` would stop silently at the shorter list). Exact unless a tolerance is given."""
    a, b = list(a), list(b)
    assert len(a) == len(b), f"{what}: {len(a)} arrays vs {len(b)}"
    assert len(a) > 0, f"{what}: nothing to compare"
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, f"{what}[{i}]: shape {x.shape} vs {y.shape}"
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")


def same_computation_tolerance() -> dict:
    """``rtol``/``atol`` for two paths that run the same float32 computation: 0 (bit for bit) on
    the CPU; float32 rounding on a GPU, where cuDNN may pick kernels that sum in another order
    from one call to the next (atomics in backward passes)."""
    import torch

    return {"rtol": 1e-5, "atol": 1e-6} if torch.cuda.is_available() else {"rtol": 0, "atol": 0}


def write_fold(root, folder, fold, n=3, size=32, images_dtype=np.float64):
    """A PanNuke fold in the real layout: float images, 6-channel float masks, tissue names."""
    img_dir = Path(root) / folder / "images" / f"fold{fold}"
    mask_dir = Path(root) / folder / "masks" / f"fold{fold}"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    rng = np.random.default_rng(fold)
    images = rng.uniform(0, 255, size=(n, size, size, 3)).astype(images_dtype)
    masks = np.zeros((n, size, size, 6), np.float64)
    # tile 0: neoplastic id 5, inflammatory id 3, dead id 5 (same id, other channel), epithelial 12
    masks[0, 2:6, 2:6, 0] = 5
    masks[0, 10:14, 10:12, 1] = 3
    masks[0, 20:22, 20:25, 3] = 5
    masks[0, 25:30, 2:4, 4] = 12
    masks[0, 25:30, 5:7, 4] = 40  # a second epithelial nucleus
    # tile 1: no nucleus; tile 2: one connective nucleus covering a corner
    masks[2, :8, :8, 2] = 7
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    np.save(img_dir / "images.npy", images)
    np.save(mask_dir / "masks.npy", masks)
    np.save(img_dir / "types.npy", np.array(["Breast", "Colon", "Lung"][:n]))
    return images, masks


XML = """<?xml version="1.0"?>
<Annotations MicronsPerPixel="0.25">
 <Annotation Id="1"><Regions>
  {regions}
 </Regions></Annotation>
</Annotations>"""


def region(rid, points) -> str:
    """One Aperio ImageScope ``<Region>`` with the given (x, y) vertices."""
    vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in points)
    return f'<Region Id="{rid}"><Attributes/><Vertices>{vertices}</Vertices></Region>'


def write_pair(folder: Path, stem: str, regions, size=(40, 50)) -> np.ndarray:
    """A MoNuSeg image (``<stem>.tif``, random RGB) and its XML; returns the image as written
    (BGR)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / f"{stem}.tif"), image)
    (folder / f"{stem}.xml").write_text(XML.format(regions="\n".join(regions)))
    return image


def to_format(x, data_format):
    """NHWC numpy array -> the layout of ``data_format``."""
    return x if data_format == "channels_last" else x.transpose(0, 3, 1, 2)
