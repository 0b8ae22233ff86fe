"""Every entry point, fed broken input, stops with a clear message and writes nothing half-done.

One row per case: (name, entry point, argv builder, expected exit status, message pattern).
"""

import re

import cv2
import numpy as np
import pytest

from tests.helpers import XML, region, script_main, write_fold
from xsight_keras.data import write_demo_dataset


def truncated_pannuke(tmp):
    write_fold(tmp / "src", "Fold 1", 1)
    path = tmp / "src" / "Fold 1" / "images" / "fold1" / "images.npy"
    path.write_bytes(path.read_bytes()[:500])
    return ["pannuke", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def wrong_shape_pannuke(tmp):
    write_fold(tmp / "src", "Fold 1", 1)
    np.save(tmp / "src" / "Fold 1" / "images" / "fold1" / "images.npy", np.zeros((3, 32, 32, 4)))
    return ["pannuke", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def wrong_dtype_pannuke(tmp):
    write_fold(tmp / "src", "Fold 1", 1)
    np.save(tmp / "src" / "Fold 1" / "images" / "fold1" / "types.npy", np.zeros(3))
    return ["pannuke", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def labels_out_of_range_pannuke(tmp):
    _, masks = write_fold(tmp / "src", "Fold 1", 1)
    masks[0, 0, 0, 0] = -3
    np.save(tmp / "src" / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    return ["pannuke", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def folder_tree(tmp, mask_bytes=None, image_bytes=None, mask=None):
    for sub in ("images", "masks"):
        (tmp / "src" / "train" / sub).mkdir(parents=True)
    cv2.imwrite(str(tmp / "src" / "train" / "images" / "a.png"), np.zeros((16, 16, 3), np.uint8))
    cv2.imwrite(str(tmp / "src" / "train" / "masks" / "a.png"),
                np.zeros((16, 16), np.uint8) if mask is None else mask)
    if image_bytes is not None:
        (tmp / "src" / "train" / "images" / "a.png").write_bytes(image_bytes)
    if mask_bytes is not None:
        (tmp / "src" / "train" / "masks" / "a.png").write_bytes(mask_bytes)
    return ["folders", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def bad_xml(tmp):
    (tmp / "src").mkdir()
    cv2.imwrite(str(tmp / "src" / "a.tif"), np.zeros((16, 16, 3), np.uint8))
    (tmp / "src" / "a.xml").write_text(XML.format(regions=region(5, [(1, 1), ("x", 2), (3, 3)])))
    return ["monuseg", "--src", str(tmp / "src"), "--out", str(tmp / "out"), "--quiet"]


def demo_data(tmp):
    write_demo_dataset(tmp / "data", {"train": 4, "valid": 2, "test": 2}, seed=0)
    return tmp / "data"


def train_args(tmp, data, *extra):
    return ["--preset", "demo", "--data_root", str(data), "--output_dir", str(tmp / "out"),
            "--epochs", "1", "--input_size", "32", "--batch_size", "2", *extra]


def truncated_prepared_split(tmp):
    data = demo_data(tmp)
    path = data / "train" / "classes.npy"
    path.write_bytes(path.read_bytes()[:300])
    return train_args(tmp, data)


def batch_larger_than_data(tmp):
    return train_args(tmp, demo_data(tmp), "--batch_size", "64")


def unwritable_output(tmp):
    (tmp / "file").write_text("not a folder")
    data = demo_data(tmp)
    return ["--preset", "demo", "--data_root", str(data), "--output_dir", str(tmp / "file" / "out"),
            "--batch_size", "2"]


def existing_run(tmp):
    (tmp / "out" / "demo").mkdir(parents=True)
    (tmp / "out" / "demo" / "config.json").write_text("{}")
    return train_args(tmp, demo_data(tmp))


def cuda_without_gpu(tmp):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return train_args(tmp, demo_data(tmp), "--device", "cuda")


def not_a_keras_file(tmp):
    (tmp / "model.keras").write_bytes(b"PK\x03\x04 definitely not a model")
    cv2.imwrite(str(tmp / "x.png"), np.zeros((8, 8, 3), np.uint8))
    return [str(tmp / "x.png"), "--model", str(tmp / "model.keras"), "--out", str(tmp / "out")]


def run_without_config(tmp):
    (tmp / "run").mkdir()
    return ["--run", str(tmp / "run")]


def resume_elsewhere(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{}")
    return ["--resume", str(tmp / "run"), "--output_dir", str(tmp / "other")]


CASES = [
    ("truncated .npy", "prepare_data", truncated_pannuke, 2, r"images\.npy.*truncated"),
    ("wrong shape", "prepare_data", wrong_shape_pannuke, 2, r"images\.npy: expected \(N, H, W, 3\)"),
    ("wrong dtype of tissue names", "prepare_data", wrong_dtype_pannuke, 2, r"types\.npy: unknown tissue"),
    ("labels out of range", "prepare_data", labels_out_of_range_pannuke, 2, r"masks\.npy: instance ids must be non-negative"),
    ("corrupt image bytes", "prepare_data", lambda t: folder_tree(t, image_bytes=b"\x89PNG\r\nbroken"), 2, r"images/a\.png: cannot be decoded"),
    ("empty mask file", "prepare_data", lambda t: folder_tree(t, mask_bytes=b""), 2, r"masks/a\.png: cannot be decoded"),
    ("mask with label indices", "prepare_data", lambda t: folder_tree(t, mask=np.full((16, 16), 2, np.uint8)), 2, r"masks/a\.png: mask values are 0\.\.2"),
    ("XML with a non-numeric vertex", "prepare_data", bad_xml, 2, r"a\.xml: region Id=5 has a vertex without numeric X/Y"),
    ("truncated prepared split", "train", truncated_prepared_split, 2, r"classes\.npy.*truncated"),
    ("batch larger than the dataset", "train", batch_larger_than_data, 2, r"batch size 64 is larger than an epoch of the training split \(4 samples"),
    ("samples_per_epoch 0", "train", lambda t: train_args(t, demo_data(t), "--samples_per_epoch", "0"), 2, r"samples_per_epoch must be positive \(or unset\), got 0"),
    ("negative crops_per_image", "train", lambda t: train_args(t, demo_data(t), "--crops_per_image", "-2"), 2, r"crops_per_image must be positive \(or unset\), got -2"),
    ("steps and samples disagree", "train", lambda t: train_args(t, demo_data(t), "--steps_per_epoch", "3", "--samples_per_epoch", "5"), 2, r"steps_per_epoch 3 × batch 2 × 1 process\(es\) = 6 samples per epoch, but samples_per_epoch is 5"),
    ("output directory not writable", "train", unwritable_output, 2, r"cannot write to the output directory"),
    ("existing run without --overwrite", "train", existing_run, 2, r"already exists.*--overwrite"),
    ("resume with a preset", "train", lambda t: ["--resume", str(t), "--preset", "demo"], 2, r"--resume takes the run's own config\.json; drop --preset/--config"),
    ("resume into another folder", "train", resume_elsewhere, 2, r"--resume continues in the folder it is given; drop --output_dir"),
    ("CUDA requested without a GPU", "train", cuda_without_gpu, 2, r"no CUDA GPU is available"),
    ("not a .keras file", "predict", not_a_keras_file, 2, r"model\.keras is not a loadable \.keras model"),
    ("evaluate a folder that is no run", "evaluate", run_without_config, 2, r"is not a run directory"),
]


@pytest.mark.parametrize("name,entry,make_args,status,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path, capsys, name, entry, make_args, status, pattern):
    argv = make_args(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    assert script_main(entry)(argv) == status
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    created = {p for p in tmp_path.rglob("*")} - before
    half_done = [p for p in created if p.suffix in (".npy", ".keras", ".json") or p.name.startswith(".")]
    assert not half_done, half_done
