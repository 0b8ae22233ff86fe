import albumentations as A
import cv2
import keras
import numpy as np
import pytest
from scipy import ndimage

from xsight_keras.data import (
    EpochBatchSampler,
    PreparedDataset,
    PreprocessConfig,
    SegmentationDataset,
    augment_sample,
    build_augmentation,
    make_loader,
    mixup,
    parse_schedule,
    preprocess_image,
    value_at,
)


def test_preprocess_gives_zero_mean_unit_std_and_dataset_mode():
    image = np.random.default_rng(0).integers(30, 200, (64, 64, 3), dtype=np.uint8)
    x = preprocess_image(image)
    assert x.dtype == np.float32 and x.shape == (64, 64, 3)
    np.testing.assert_allclose(x.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1)), 1, atol=1e-3)
    cfg = PreprocessConfig(clahe_clip_limit=0, zscore="dataset", mean=(10, 20, 30), std=(2, 4, 5))
    np.testing.assert_allclose(preprocess_image(image, cfg)[3, 4], (image[3, 4] - [10, 20, 30]) / [2, 4, 5], rtol=1e-5)
    gray = preprocess_image(image[..., :1])
    assert gray.shape == (64, 64, 1)
    with pytest.raises(ValueError, match="needs per-channel mean"):
        PreprocessConfig(zscore="dataset")


def low_contrast_tissue(seed=0, size=128):
    """A pale H&E-like RGB uint8 image: pink background, slightly darker purple nuclei, noise;
    the lightness spans a narrow band, as in a faded or under-stained slide."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.ones((size, size, 3)) * [200, 170, 190]
    for _ in range(20):
        cy, cx = rng.integers(10, size - 10, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = [185, 155, 180]
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def local_contrast(lightness, tile=16):
    """Mean standard deviation of ``lightness`` over tile × tile windows."""
    h, w = lightness.shape
    return np.mean([lightness[r:r + tile, c:c + tile].std()
                    for r in range(0, h, tile) for c in range(0, w, tile)])


def test_clahe_raises_local_contrast_on_lightness_only():
    image = low_contrast_tissue()
    plain = preprocess_image(image, PreprocessConfig(clahe_clip_limit=0, zscore="none"))
    clahe = preprocess_image(image, PreprocessConfig(clahe_clip_limit=2.0, zscore="none"))
    np.testing.assert_array_equal(np.rint(plain * 255).astype(np.uint8), image)  # 0 = CLAHE off
    lab_in = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(int)
    lab_out = cv2.cvtColor(np.rint(clahe * 255).astype(np.uint8), cv2.COLOR_RGB2LAB).astype(int)
    assert local_contrast(lab_out[..., 0]) > 1.5 * local_contrast(lab_in[..., 0])
    # the hue is kept: CIE-Lab a and b move by rounding at most
    ab_change = np.abs(lab_out[..., 1:] - lab_in[..., 1:])
    assert ab_change.max() <= 2 and ab_change.mean() < 0.05, (ab_change.max(), ab_change.mean())
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    gray_out = preprocess_image(gray, PreprocessConfig(clahe_clip_limit=2.0, zscore="none"))
    assert gray_out.shape == gray.shape
    assert local_contrast(gray_out[..., 0] * 255) > 1.5 * local_contrast(gray[..., 0].astype(float))


def boxes_scene(seed, size=128):
    """Twelve 10×14 nuclei (classes 1–5, ids 1–12) as bright boxes on a dark image; nuclei
    cover about 10 % of the pixels, as in H&E tiles."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for k in range(12):
        y, x = rng.integers(8, size - 16, 2)
        classes[y:y + 10, x:x + 14] = 1 + k % 5
        instances[y:y + 10, x:x + 14] = k + 1
    image = np.where(classes[..., None] > 0, 230, 20).astype(np.uint8).repeat(3, -1)
    return image, classes, instances


def foreground_agreement(image, foreground):
    """IoU of the image's bright pixels (Otsu threshold, robust to colour jitter) and
    ``foreground``, not counting disagreements within 1 px of the mask's border (interpolated
    image edges, blur)."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    bright = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1] > 0
    band = ndimage.binary_dilation(foreground) & ~ndimage.binary_erosion(foreground)
    disagree = (bright != foreground) & ~band
    return 1 - disagree.sum() / (bright | foreground).sum()


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_augmentation_keeps_masks_aligned_with_the_image(level):
    image, classes, instances = boxes_scene(level)
    aug = build_augmentation(level)
    moved = 0
    for seed in range(8):
        out, (c, i) = augment_sample(aug, image, [classes, instances], seed)
        assert out.shape == image.shape and c.dtype == np.uint8 and i.dtype == np.int32
        assert set(np.unique(c)) <= set(np.unique(classes))  # nearest neighbour: no new labels
        assert set(np.unique(i)) <= set(np.unique(instances))
        np.testing.assert_array_equal(c > 0, i > 0)  # the two maps move together
        kinds = {(int(a), int(b)) for a, b in zip(i[i > 0], c[i > 0])}
        assert len(kinds) == len({a for a, _ in kinds})  # each nucleus keeps one class
        fg = c > 0
        moved += not np.array_equal(fg, classes > 0)
        assert foreground_agreement(out, fg) > 0.97, (level, seed)
        # the measure is strict enough to see a 2 px misalignment of every nucleus
        assert foreground_agreement(out, np.roll(fg, 2, axis=1)) < 0.95, (level, seed)
    assert moved >= 4  # the geometry really changed in most draws
    again, _ = augment_sample(aug, image, [classes, instances], 3)
    np.testing.assert_array_equal(augment_sample(aug, image, [classes, instances], 3)[0], again)


def test_mixup_mixes_images_and_targets_with_the_same_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (6, 4, 4))]
    mx, my = mixup(x, y, 0.4, np.random.default_rng(1))
    np.testing.assert_allclose(my.sum(-1), 1, atol=1e-6)
    lam = np.random.default_rng(1).beta(0.4, 0.4, size=6).astype(np.float32)
    perm = np.random.default_rng(1)
    perm.beta(0.4, 0.4, size=6)
    perm = perm.permutation(6)
    np.testing.assert_allclose(mx[0], lam[0] * x[0] + (1 - lam[0]) * x[perm[0]], rtol=1e-5)
    np.testing.assert_allclose(my[0], lam[0] * y[0] + (1 - lam[0]) * y[perm[0]], rtol=1e-5)


def test_schedules():
    s = parse_schedule("0:128,10:256")
    assert [value_at(s, e) for e in (0, 9, 10, 50)] == [128, 128, 256, 256]
    assert parse_schedule(3) == {0: 3}
    with pytest.raises(ValueError, match="start at epoch 0"):
        parse_schedule("5:2")


def test_sampler_sees_every_sample_once_per_epoch_with_seeded_shuffle():
    sampler = EpochBatchSampler(10, 3, shuffle=True, drop_last=False, seed=4)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert {e for b in epoch0 for e, _ in b} == {0} and {e for b in epoch1 for e, _ in b} == {1}
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for _, i in b) == list(range(10))
    assert [i for b in epoch0 for _, i in b] != [i for b in epoch1 for _, i in b]
    assert list(EpochBatchSampler(10, 3, seed=4, drop_last=False)) == epoch0
    with pytest.raises(ValueError, match="larger than the dataset"):
        EpochBatchSampler(4, 8)


def test_schedules_take_effect_at_their_epoch_in_worker_processes(demo_data):
    ds = SegmentationDataset(demo_data / "train", size="0:64,2:128", level="0:0,1:2", seed=3)
    loader = make_loader(ds, 2, num_workers=2)
    plain = SegmentationDataset(demo_data / "train", size="0:64,2:128", level=0, seed=3)
    for epoch, size in enumerate([64, 64, 128]):
        batches = list(loader)
        keys = list(EpochBatchSampler(8, 2, seed=3, start_epoch=epoch))
        assert len(batches) == len(keys) == 4
        changed = []
        for (x, y), key in zip(batches, keys):
            assert tuple(x.shape) == (2, size, size, 3) and tuple(y.shape) == (2, size, size, 6)
            # the worker computed exactly what the schedule says for (epoch, index)
            expected = np.stack([ds.sample(e, i)[0] for e, i in key])
            np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
            unaugmented = np.stack([plain.sample(e, i)[0] for e, i in key])
            changed += [not np.allclose(a, b) for a, b in zip(x.numpy(), unaugmented)]
        # level 0 changes nothing; level 2 changes most samples (each transform has a probability)
        assert sum(changed) == 0 if epoch == 0 else sum(changed) >= len(changed) // 2, changed


def test_loader_feeds_model_fit_with_onehot_and_multiscale_targets(demo_data):
    from xsight_keras.models import attention_unet, progressive_unet

    keras.utils.set_random_seed(0)
    train = SegmentationDataset(demo_data / "train", size=64, level=1)
    model = attention_unet(6, encoder="resnet18", decoder_filters=(16, 16, 8, 8, 8))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    history = model.fit(make_loader(train, 8, mixup_alpha=0.2), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()

    pgu = progressive_unet(2, in_channels=3, num_classes=1, base_filters=4)
    binary = SegmentationDataset(demo_data / "train", size=64, target="binary", scales=(1, 2))
    x, y = next(iter(make_loader(binary, 4)))
    assert sorted(y) == ["fused", "scale_1", "scale_2"] and tuple(y["scale_2"].shape) == (4, 32, 32, 1)
    pgu.compile(optimizer="adam", loss={k: "binary_crossentropy" for k in y})
    valid = SegmentationDataset(demo_data / "valid", size=64, target="binary", scales=(1, 2), train=False)
    history = pgu.fit(make_loader(binary, 4), validation_data=make_loader(valid, 2), epochs=1, verbose=0)
    assert "val_loss" in history.history


def test_channels_first_and_sparse_targets(demo_data):
    ds = SegmentationDataset(demo_data / "valid", size=64, target="sparse", data_format="channels_first",
                             train=False)
    x, y = ds.sample(0, 0)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == np.int32
    raw = PreparedDataset(demo_data / "valid")[0]
    np.testing.assert_array_equal(y, raw.classes[96:160, 96:160])  # central crop for validation


def test_hed_jitter_is_exact_at_identity_and_moves_the_haematoxylin_stain():
    from xsight_keras.data.augment import hed_jitter

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(hed_jitter(image, [1, 1, 1], [0, 0, 0]), image)
    nucleus = np.full((8, 8, 3), (92, 40, 120), np.uint8)  # haematoxylin-rich purple
    stronger = hed_jitter(nucleus, [1.3, 1, 1], [0, 0, 0])
    assert stronger.mean() < nucleus.mean()  # more stain absorbs more light


def test_instance_targets_follow_the_augmented_maps(demo_data):
    """The instance head's targets are computed after augmentation: every nucleus pixel of the
    (augmented) semantic target, and no other, has a distance or contour target, and the
    distance peaks at 1 in the nuclei (a piece cut off a nucleus by a neighbour peaks lower)."""
    ds = SegmentationDataset(demo_data / "train", size=128, level=4, instance_targets=True, seed=2)
    plain = SegmentationDataset(demo_data / "train", size=128, level=0, instance_targets=True, seed=2)
    moved, peaks = 0, []
    for index in range(len(ds)):
        _, y = ds.sample(1, index)
        semantic_fg = np.argmax(y["semantic"], -1) > 0
        distance, contour = y["instance"][..., 0], y["instance"][..., 1]
        np.testing.assert_array_equal((distance > 0) | (contour > 0), semantic_fg)
        labels, n = ndimage.label(distance > 0)
        peaks += list(ndimage.maximum(distance, labels, np.arange(1, n + 1))) if n else []
        moved += not np.array_equal(semantic_fg, np.argmax(plain.sample(1, index)[1]["semantic"], -1) > 0)
    assert moved >= len(ds) // 2  # the augmentation really moved the nuclei
    assert len(peaks) > 50 and np.mean(np.isclose(peaks, 1.0)) > 0.8


def test_resize_mode_shows_the_whole_tile_scaled(demo_data):
    raw = PreparedDataset(demo_data / "valid")[1]
    ds = SegmentationDataset(demo_data / "valid", size=64, resize_mode="resize", target="sparse",
                             train=False, preprocess=PreprocessConfig(clahe_clip_limit=0, zscore="none"))
    x, y = ds.sample(0, 1)
    assert x.shape == (64, 64, 3) and y.shape == (64, 64)
    # 256 → 64: the image is averaged over 4×4 blocks, the labels are sampled (never blended)
    blocks = raw.image.astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(x * 255, blocks, atol=0.51)
    np.testing.assert_array_equal(y, raw.classes[::4, ::4])
    crop = SegmentationDataset(demo_data / "valid", size=64, target="sparse", train=False)
    np.testing.assert_array_equal(crop.sample(0, 1)[1], raw.classes[96:160, 96:160])
    with pytest.raises(ValueError, match="resize_mode"):
        SegmentationDataset(demo_data / "valid", size=64, resize_mode="stretch")


def test_each_transform_draws_its_own_chance(demo_data):
    """Every transform of a level is applied with its own probability: with the 7 transforms
    of level 2 (each p ≤ 0.5) a sample is left untouched about 1 time in 100 (were they drawn
    together, every other sample would be), and the two flips do not always come together."""
    image = PreparedDataset(demo_data / "train")[0].image[:64, :64]
    untouched = sum(np.array_equal(augment_sample(build_augmentation(2), image, [], seed)[0], image)
                    for seed in range(64))
    assert untouched <= 6, f"{untouched} of 64 samples were not augmented at level 2"
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seen = {tuple(np.array_equal(augment_sample(flips, image, [], seed)[0], f(image))
                  for f in (np.fliplr, np.flipud)) for seed in range(32)}
    assert {(True, False), (False, True)} <= seen, seen  # one flip without the other, both ways


def _large_images_split(root):
    """A ragged prepared split: a 300×300, a 200×400 and an 80×100 image (smaller than the
    crop), random pixels, the image index as its class everywhere."""
    from xsight_keras.data import PreparedWriter

    shapes = [(300, 300, 3), (200, 400, 3), (80, 100, 3)]
    rng = np.random.default_rng(0)
    with PreparedWriter(root, shapes, ["background", "a", "b", "c"]) as writer:
        for i, (h, w, c) in enumerate(shapes):
            classes = np.full((h, w), i + 1, np.uint8)
            instances = np.zeros((h, w), np.int32)
            instances[10:20, 10:20] = 1
            writer.write(i, rng.integers(0, 256, (h, w, c), dtype=np.uint8), classes, instances,
                         f"img{i}")
    return shapes


def test_samples_per_epoch_draws_crops_across_images_by_area(tmp_path):
    shapes = _large_images_split(tmp_path / "big")
    raw = PreprocessConfig(clahe_clip_limit=0, zscore="none")
    ds = SegmentationDataset(tmp_path / "big", size=128, level=1, samples_per_epoch=46,
                             target="sparse", preprocess=raw, seed=3, data_format="channels_last")
    assert len(ds) == 46
    areas = np.array([h * w for h, w, _ in shapes], float)
    for epoch in (0, 1):
        images = [ds.image_of(epoch, i) for i in range(len(ds))]
        counts = np.bincount(images, minlength=3)
        expected = 46 * areas / areas.sum()  # 18.9, 16.8, 0.3 crops
        assert np.all(np.abs(counts - expected) < 1), (counts, expected)
        for i in range(len(ds)):  # each crop comes from the image the mapping names, padded if small
            x, y, _ = ds[(epoch, i)]
            assert x.shape == (128, 128, 3) and np.all(y == images[i] + 1)
    # the windowed read is the crop a whole read would have given
    from xsight_keras.data.loader import _fit_to_size

    full = ds.dataset[0]
    rng = np.random.default_rng([3, 0, 5])
    image, _ = _fit_to_size((full.image, [full.classes]), 128, rng, True, False)
    window_rng = np.random.default_rng([3, 0, 5])
    from xsight_keras.data.loader import _crop_window

    y0, x0, h, w = _crop_window((300, 300), 128, window_rng, True)
    np.testing.assert_array_equal(ds.dataset.window(0, y0, x0, h, w).image, image)
    # validation keeps one sample per image, whatever samples_per_epoch says
    assert len(SegmentationDataset(tmp_path / "big", size=128, train=False, samples_per_epoch=46,
                                   preprocess=raw)) == 3
    with pytest.raises(ValueError, match="samples_per_epoch must be a positive number"):
        SegmentationDataset(tmp_path / "big", size=128, samples_per_epoch=0)


def test_samples_per_epoch_batches_are_the_same_with_workers_and_after_a_resume(tmp_path):
    _large_images_split(tmp_path / "big")
    ds = SegmentationDataset(tmp_path / "big", size=64, level=2, samples_per_epoch=12, seed=1,
                             data_format="channels_first")

    def epochs(loader, n):
        return [[(x.numpy().copy(), y.numpy().copy()) for x, y in loader] for _ in range(n)]

    plain = epochs(make_loader(ds, 4), 2)
    workers = epochs(make_loader(ds, 4, num_workers=2), 2)
    resumed = epochs(make_loader(ds, 4, start_epoch=1), 1)  # a run resumed at epoch 1
    assert len(plain[0]) == 3
    for a, b in zip(plain[0] + plain[1], workers[0] + workers[1]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for a, b in zip(plain[1], resumed[0]):
        np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(plain[0][0][0], plain[1][0][0])  # epochs differ


def test_fit_asking_more_steps_than_the_loader_has_stops_before_training(demo_data):
    import keras

    from xsight_keras.training import SyncLoaderEpoch

    ds = SegmentationDataset(demo_data / "train", size=32, target="binary",
                             data_format="channels_last")
    loader = make_loader(ds, 4)  # 8 images: 2 batches per epoch
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile("sgd", "binary_crossentropy")
    before = model.get_weights()
    with pytest.raises(ValueError, match="fit asks for 5 steps per epoch but the loader has 2 batches"):
        model.fit(loader, steps_per_epoch=5, epochs=1, verbose=0, callbacks=[SyncLoaderEpoch(loader)])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    loader = make_loader(SegmentationDataset(demo_data / "train", size=32, target="binary",
                                             data_format="channels_last", samples_per_epoch=20), 4)
    history = model.fit(loader, epochs=1, verbose=0, callbacks=[SyncLoaderEpoch(loader)])
    assert len(loader) == 5 and history.history["loss"]
