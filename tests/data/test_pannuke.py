import json

import numpy as np
import pytest

from tests.helpers import write_fold
from xsight_keras.data import PreparedDataset, find_pannuke_folds, masks_to_maps, prepare_pannuke


@pytest.fixture
def pannuke_root(tmp_path):
    root = tmp_path / "pannuke"
    write_fold(root, "Fold 1", 1)
    write_fold(root, "fold_2", 2)
    return root


def test_folds_are_found_whatever_the_folder_spelling(pannuke_root):
    folds = find_pannuke_folds(pannuke_root)
    assert sorted(folds) == [1, 2]
    assert folds[1]["masks"].name == "masks.npy" and "Fold 1" in str(folds[1]["masks"])


def test_prepared_fold_has_exact_classes_and_instances(pannuke_root, tmp_path):
    out = tmp_path / "prepared"
    prepare_pannuke(pannuke_root, out, folds=[1], chunk_size=2, progress=False)
    ds = PreparedDataset(out / "fold1")
    assert len(ds) == 3 and ds.class_names[4] == "dead"
    s = ds[0]
    assert s.image.dtype == np.uint8 and s.classes.dtype == np.uint8 and s.instances.dtype == np.int32
    assert (s.classes[2:6, 2:6] == 1).all() and (s.classes[10:14, 10:12] == 2).all()
    assert (s.classes[20:22, 20:25] == 4).all() and (s.classes[25:30, 2:4] == 5).all()
    assert s.classes.sum() == 16 * 1 + 8 * 2 + 10 * 4 + 20 * 5
    # five nuclei, ids 1..5, and the two "id 5" nuclei of different channels are distinct
    assert sorted(np.unique(s.instances)) == [0, 1, 2, 3, 4, 5]
    assert s.instances[3, 3] != s.instances[21, 21]
    assert (ds[1].classes == 0).all() and ds[1].instances.max() == 0
    assert ds[2].instances.max() == 1 and (ds[2].classes[:8, :8] == 3).all()
    images = np.load(pannuke_root / "Fold 1" / "images" / "fold1" / "images.npy")
    np.testing.assert_array_equal(ds[0].image, np.clip(np.rint(images[0]), 0, 255).astype(np.uint8))
    assert list(ds.tissues) == ["Breast", "Colon", "Lung"]
    meta = json.loads((out / "fold1" / "meta.json").read_text())
    assert meta["instance_counts"] == [0, 1, 1, 1, 1, 2]
    assert meta["pixel_counts"][1:] == [16, 8, 64, 10, 20]


def test_opening_a_prepared_fold_maps_it_instead_of_loading_it(pannuke_root, tmp_path):
    prepare_pannuke(pannuke_root, tmp_path / "p", folds=[2], progress=False)
    ds = PreparedDataset(tmp_path / "p" / "fold2")
    assert all(isinstance(a, np.memmap) for a in ds.arrays.values())


def test_masks_to_maps_later_channel_wins_on_overlap():
    masks = np.zeros((1, 4, 4, 6))
    masks[0, :2, :2, 0] = 1
    masks[0, 1:3, 1:3, 2] = 9
    classes, instances = masks_to_maps(masks)
    assert classes[0, 1, 1] == 3 and classes[0, 0, 0] == 1
    assert instances[0, 1, 1] == 2 and instances[0, 0, 0] == 1


def test_missing_file_truncated_array_and_bad_values_are_clear_errors(pannuke_root, tmp_path):
    (pannuke_root / "fold_2" / "masks" / "fold2" / "masks.npy").unlink()
    with pytest.raises(FileNotFoundError, match="fold 2 .* lacks masks.npy"):
        find_pannuke_folds(pannuke_root)
    root = tmp_path / "truncated"
    write_fold(root, "Fold 1", 1)
    path = root / "Fold 1" / "masks" / "fold1" / "masks.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="masks.npy.*truncated"):
        prepare_pannuke(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "fold1").exists()
    root = tmp_path / "badvalues"
    images, _ = write_fold(root, "Fold 3", 3)
    images[1, 0, 0, 0] = 300
    np.save(root / "Fold 3" / "images" / "fold3" / "images.npy", images)
    with pytest.raises(ValueError, match="outside 0–255"):
        prepare_pannuke(root, tmp_path / "out3", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no PanNuke fold"):
        find_pannuke_folds(tmp_path / "empty")
