import keras
import numpy as np
import pytest

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


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_augmentation_keeps_masks_aligned_with_the_image(level):
    rng = np.random.default_rng(level)
    classes = np.zeros((128, 128), np.uint8)
    instances = np.zeros((128, 128), np.int32)
    for k in range(12):
        y, x = rng.integers(8, 112, 2)
        classes[y:y + 10, x:x + 14] = 1 + k % 5
        instances[y:y + 10, x:x + 14] = k + 1
    image = np.where(classes[..., None] > 0, 230, 20).astype(np.uint8).repeat(3, -1)
    aug = build_augmentation(level)
    for seed in range(5):
        out, (c, i) = augment_sample(aug, image, [classes, instances], seed)
        assert out.shape == image.shape and c.dtype == np.uint8 and i.dtype == np.int32
        assert set(np.unique(c)) <= set(np.unique(classes))  # nearest neighbour: no new labels
        assert set(np.unique(i)) <= set(np.unique(instances))
        bright = out.mean(-1) > 125
        disagree = np.mean(bright != (c > 0))
        assert disagree < 0.03, (level, seed, disagree)
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
