import cv2
import numpy as np
import pytest

from xsight_keras.data import (
    PreparedDataset,
    demo_tile,
    find_folder_pairs,
    prepare_folders,
    write_demo_dataset,
)


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_tree(root):
    rng = np.random.default_rng(0)
    for split, names in (("train", ["a.png", "b.png", "flipped_a.png", "rotated_90_b.png"]),
                         ("valid", ["c.png"])):
        for k, name in enumerate(names):
            size = (48, 64) if name.startswith("b") else (32, 40)
            write(root / split / "images" / name, rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            mask = np.zeros(size, np.uint8)
            mask[4:10, 4:10] = 255
            mask[20:24, 20:30] = 255
            write(root / split / "masks" / name, mask)


def test_folders_prepare_binary_masks_components_and_ragged_sizes(tmp_path):
    make_tree(tmp_path / "src")
    written = prepare_folders(tmp_path / "src", tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["train", "valid"]
    train = PreparedDataset(tmp_path / "out" / "train")
    assert train.names == ["a", "b"]  # augmented copies skipped by default
    assert train.ragged and train.shape(1) == (48, 64, 3)
    s = train[1]
    assert s.image.shape == (48, 64, 3) and set(np.unique(s.classes)) == {0, 1}
    assert s.instances.max() == 2 and s.classes[5, 5] == 1 and s.instances[5, 5] != s.instances[21, 25]
    src = cv2.imread(str(tmp_path / "src" / "train" / "images" / "b.png"))[..., ::-1]
    np.testing.assert_array_equal(s.image, src)
    with_aug = find_folder_pairs(tmp_path / "src" / "train", use_augmented=True)
    assert sorted(p.name for p, _ in with_aug) == ["a.png", "b.png", "flipped_a.png", "rotated_90_b.png"]
    prepare_folders(tmp_path / "src", tmp_path / "gray", channels=1, progress=False)
    assert PreparedDataset(tmp_path / "gray" / "valid")[0].image.shape == (32, 40, 1)


def test_folder_errors_name_the_files(tmp_path):
    make_tree(tmp_path / "src")
    (tmp_path / "src" / "train" / "masks" / "b.png").rename(tmp_path / "src" / "train" / "masks" / "b2.png")
    with pytest.raises(ValueError, match=r"without a mask: \['b.png'\].*without an image: \['b2.png'\]"):
        find_folder_pairs(tmp_path / "src" / "train")
    make_tree(tmp_path / "s2")
    write(tmp_path / "s2" / "valid" / "masks" / "c.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"c.png is 40×32 but its mask .*c.png is 10×10"):
        prepare_folders(tmp_path / "s2", tmp_path / "o2")
    make_tree(tmp_path / "s3")
    write(tmp_path / "s3" / "valid" / "masks" / "c.png", np.eye(32, 40, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"masks/c.png: mask values are 0..1"):
        prepare_folders(tmp_path / "s3", tmp_path / "o3")
    make_tree(tmp_path / "s4")
    (tmp_path / "s4" / "valid" / "images" / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"images/c.png: cannot be decoded"):
        prepare_folders(tmp_path / "s4", tmp_path / "o4")
    assert not (tmp_path / "o4" / "valid").exists()


def test_demo_set_is_deterministic_has_all_classes_and_touching_nuclei(tmp_path):
    a, b = demo_tile(0, 5), demo_tile(0, 5)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(demo_tile(0, 6)[0], a[0])
    paths = write_demo_dataset(tmp_path, {"train": 24, "valid": 4}, seed=0)
    ds = PreparedDataset(paths["train"])
    assert ds.class_names == ["background", "neoplastic", "inflammatory", "connective", "dead",
                              "epithelial"]
    assert (ds.instance_counts[1:] > 0).all()
    touching = 0
    for i in range(len(ds)):
        inst = ds[i].instances
        # two different nuclei side by side (horizontally or vertically adjacent pixels)
        for u, v in ((inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:])):
            touching += np.count_nonzero((u > 0) & (v > 0) & (u != v))
    assert touching > 0
    nuclei_size = {c: ds.pixel_counts[c] / ds.instance_counts[c] for c in range(1, 6)}
    assert nuclei_size[1] > nuclei_size[5] > nuclei_size[2]  # neoplastic > epithelial > inflammatory
