import cv2
import numpy as np
import pytest

from tests.helpers import SHARED_DATA
from xsight_keras.data import (
    PreparedDataset,
    demo_tile,
    find_folder_pairs,
    prepare_folders,
    write_demo_dataset,
)
from xsight_keras.data.folders import is_augmented_copy, read_binary_mask, read_folder_sample


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


def test_mask_reader_thresholds_soft_edges_and_refuses_grey_pictures(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    mask[9, 10:30], mask[30, 10:30] = 100, 200  # soft edges: below and above the threshold
    mask[10:30, 9], mask[10:30, 30] = 127, 128
    write(tmp_path / "soft.png", mask)
    stats = {}
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "soft.png", stats), mask >= 128)
    assert stats == {"grey_pixels": 80, "pixels": 64 * 64, "masks_with_grey": 1}  # the 4 rims
    # the same mask through JPEG compression (ringing around the edges) reads back almost exactly
    write(tmp_path / "soft.jpg", np.where(mask >= 128, 255, 0).astype(np.uint8))
    jpeg = read_binary_mask(tmp_path / "soft.jpg")
    assert set(np.unique(jpeg)) == {0, 1} and np.mean(jpeg != (mask >= 128)) < 0.005
    # small nuclei with 2 px soft rims, as JPEG masks of small crops have: 12.5 % grey, all of
    # it at the edges (a 5 % grey rule refused half of the real Pap-smear masks)
    rims = np.zeros((64, 64), np.uint8)
    for r in (4, 20, 36, 52):
        for c in (8, 40):
            rims[r - 2:r + 8, c - 2:c + 8] = 100  # outer rim: below the threshold
            rims[r - 1:r + 7, c - 1:c + 7] = 180  # inner rim: above it
            rims[r:r + 6, c:c + 6] = 255
    write(tmp_path / "rims.png", rims)
    assert np.mean((rims > 32) & (rims < 224)) > 0.1
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "rims.png"), rims >= 128)
    # a grey-level picture is not a mask
    picture = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    write(tmp_path / "picture.png", picture)
    with pytest.raises(ValueError, match=r"picture\.png: \d+% of pixels are neither near 0 nor"):
        read_binary_mask(tmp_path / "picture.png")
    # grey patches away from any mask edge (3 % of the pixels) are not compression noise
    stray = np.where(mask >= 128, 255, 0).astype(np.uint8)
    stray[45:56, 45:56] = 90
    write(tmp_path / "stray.png", stray)
    with pytest.raises(ValueError, match=r"stray\.png: .*away from the mask's edges"):
        read_binary_mask(tmp_path / "stray.png")


def test_nuclei_are_8_connected_components_of_the_mask(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 255
    mask[5:8, 5:8] = 255    # touches the first block only at a corner: the same nucleus
    mask[2:5, 10:13] = 255  # one empty column away from the next block: two nuclei
    mask[2:5, 14:17] = 255
    write(tmp_path / "images" / "a.png", np.zeros((20, 20, 3), np.uint8))
    write(tmp_path / "masks" / "a.png", mask)
    _, classes, instances = read_folder_sample(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")
    assert instances.max() == 3
    assert instances[3, 3] == instances[6, 6] != 0
    assert len({instances[3, 3], instances[3, 11], instances[3, 15]}) == 3
    np.testing.assert_array_equal(classes, (mask > 0).astype(np.uint8))


def test_every_pre_augmented_prefix_is_recognised():
    for name in ("flipped_a.png", "mirrored_a.png", "rotated_30_a.jpg", "rotated_-45_a.jpg",
                 "rotated_22.5_a.png"):
        assert is_augmented_copy(name), name
    for name in ("a.png", "unflipped_a.png", "a_mirrored_.png", "rotated_a.png", "mirrored.png"):
        assert not is_augmented_copy(name), name


def test_preparation_says_how_many_pre_augmented_copies_it_skipped_or_used(tmp_path):
    from tests.helpers import run_script

    disc = np.zeros((32, 32), np.uint8)
    disc[8:20, 10:22] = 255
    for split in ("train", "valid"):
        for name in ("a.png", "b.png", "flipped_a.png", "rotated_90_b.png", "mirrored_b.png"):
            for sub in ("images", "masks"):
                (tmp_path / "src" / split / sub).mkdir(parents=True, exist_ok=True)
                picture = np.dstack([disc] * 3) if sub == "images" else disc
                cv2.imwrite(str(tmp_path / "src" / split / sub / name), picture)
    proc = run_script("prepare_data", "folders", "--src", tmp_path / "src", "--out", tmp_path / "a",
                      "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert ("train: 2 original images; 3 pre-augmented copies (flipped_/mirrored_/rotated_) "
            "skipped, --use_augmented includes them") in proc.stdout
    assert len(PreparedDataset(tmp_path / "a" / "valid")) == 2
    proc = run_script("prepare_data", "folders", "--src", tmp_path / "src", "--out", tmp_path / "b",
                      "--use_augmented", "--quiet")
    assert "valid: 5 images, including 3 pre-augmented copies" in proc.stdout
    meta = PreparedDataset(tmp_path / "b" / "train").meta
    assert meta["augmented_copies"] == {"found": 3, "used": 3} and meta["num_samples"] == 5


@pytest.mark.skipif(not (SHARED_DATA / "papsmear").is_dir(), reason="shared Pap-smear set not present")
def test_real_papsmear_folders_with_jpeg_masks(tmp_path):
    """The real Pap-smear set (JPEG images and masks, soft mask edges, pre-augmented copies)."""
    src = SHARED_DATA / "papsmear"
    written = prepare_folders(src, tmp_path, progress=False)
    assert [p.name for p in written] == ["train", "valid"]
    train, valid = PreparedDataset(written[0]), PreparedDataset(written[1])
    assert (len(train), len(valid)) == (165, 25)  # originals only: no prefixed copy
    assert len(find_folder_pairs(src / "valid", use_augmented=True)) == 384
    for ds in (train, valid):
        grey = ds.meta["mask_grey"]  # soft JPEG edges, counted: 5 % of the pixels in this set
        assert grey["masks_with_grey"] == grey["masks"] == len(ds)
        assert 0.02 < grey["grey_pixels"] / grey["pixels"] < 0.10
        share = ds.pixel_counts[1] / ds.pixel_counts.sum()
        assert 0.05 < share < 0.5, share  # one nucleus per crop, a plausible part of it
        assert ds.instance_counts[1] >= len(ds)
    # a mirrored copy's mask is its original's mask mirrored left–right, after JPEG noise
    masks = src / "valid" / "masks"
    pairs = [(masks / p.name.removeprefix("mirrored_"), p) for p in sorted(masks.glob("mirrored_*"))
             if (masks / p.name.removeprefix("mirrored_")).is_file()]
    assert pairs
    for original, mirrored in pairs:
        a, b = np.fliplr(read_binary_mask(original)), read_binary_mask(mirrored)
        assert np.sum(a & b) / np.sum(a | b) > 0.95, mirrored.name
