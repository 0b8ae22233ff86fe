import keras
import numpy as np
import pytest

from xsight_keras.training.losses import (
    BCEDiceLoss,
    BoundaryLoss,
    FocalLoss,
    HybridLoss,
    SoftDiceLoss,
    class_weights_from_counts,
    multiscale_losses,
)
from xsight_keras.training.metrics import segmentation_metrics
from xsight_keras.training.schedules import OneCycle, WarmupCosine


def onehot(labels, k):
    return np.eye(k, dtype=np.float32)[labels]


def test_soft_dice_matches_hand_computation():
    y = onehot(np.array([[[0, 1], [1, 1]]]), 2)  # (1, 2, 2, 2)
    p = np.array([[[[0.8, 0.2], [0.4, 0.6]], [[0.1, 0.9], [0.5, 0.5]]]], np.float32)
    # class 0: inter 0.8, sums 1 + 1.8 ; class 1: inter 2.0, sums 3 + 2.2 (smooth 1)
    d0 = (2 * 0.8 + 1) / (1 + 1.8 + 1)
    d1 = (2 * 2.0 + 1) / (3 + 2.2 + 1)
    loss = SoftDiceLoss()(y, p)
    assert float(loss) == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    weighted = SoftDiceLoss(class_weights=[1.0, 3.0])(y, p)
    assert float(weighted) == pytest.approx(1 - (d0 + 3 * d1) / 4, abs=1e-6)
    perfect = SoftDiceLoss(smooth=0.0)(y, y)
    assert float(perfect) == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_matches_hand_computation_and_down_weights_easy_pixels():
    y = onehot(np.array([[[1]]]), 2)
    p = np.array([[[[0.3, 0.7]]]], np.float32)
    expected = -0.25 * (1 - 0.7) ** 2 * np.log(0.7)
    assert float(FocalLoss(gamma=2, alpha=0.25)(y, p)) == pytest.approx(expected, rel=1e-5)
    easy = np.array([[[[0.05, 0.95]]]], np.float32)
    assert float(FocalLoss()(y, easy)) < float(FocalLoss(gamma=0)(y, easy)) / 10
    yb, pb = np.array([[[[1.0]]]], np.float32), np.array([[[[0.7]]]], np.float32)
    assert float(FocalLoss(gamma=2, alpha=0.25)(yb, pb)) == pytest.approx(expected, rel=1e-5)


def test_boundary_loss_is_zero_for_a_perfect_prediction_and_grows_with_shift():
    labels = np.zeros((1, 32, 32), int)
    labels[0, 8:20, 8:20] = 1
    y = onehot(labels, 2)
    assert float(BoundaryLoss()(y, y)) == pytest.approx(0.0, abs=1e-4)
    shifted = onehot(np.roll(labels, 6, axis=2), 2)
    far = onehot(np.roll(labels, 12, axis=2), 2)
    assert 0 < float(BoundaryLoss()(y, shifted)) < float(BoundaryLoss()(y, far))


def test_hybrid_is_the_weighted_sum_and_channels_first_agrees():
    rng = np.random.default_rng(0)
    y = onehot(rng.integers(0, 3, (2, 16, 16)), 3)
    logits = rng.normal(size=(2, 16, 16, 3))
    p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    hybrid = HybridLoss(1.0, 2.0, 0.5)(y, p)
    parts = SoftDiceLoss()(y, p) + 2.0 * FocalLoss()(y, p) + 0.5 * BoundaryLoss()(y, p)
    assert float(hybrid) == pytest.approx(float(parts), rel=1e-5)
    cf = HybridLoss(1.0, 2.0, 0.5, data_format="channels_first")(y.transpose(0, 3, 1, 2), p.transpose(0, 3, 1, 2))
    assert float(cf) == pytest.approx(float(hybrid), rel=1e-5)
    binary = BCEDiceLoss()(y[..., 1:2], p[..., 1:2])
    assert np.isfinite(float(binary))


def test_frequency_weights_favour_rare_classes():
    w = class_weights_from_counts([1_000_000, 50_000, 500, 0])
    assert w[2] > w[1] > w[0] and w[3] == max(w[:3]) and np.mean(w) == pytest.approx(1.0)
    losses, weights = multiscale_losses("mse", ["scale_2", "fused", "scale_1"])
    assert list(losses) == ["fused", "scale_1", "scale_2"] and weights == {"fused": 1.0, "scale_1": 0.5, "scale_2": 0.25}


def test_losses_serialize_round_trip():
    for loss in (HybridLoss(class_weights=[1, 2], data_format="channels_first"), FocalLoss(3, 0.5),
                 BoundaryLoss(2, 4), BCEDiceLoss(), SoftDiceLoss([1.0, 2.0])):
        again = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(again) is type(loss) and again.get_config() == loss.get_config()


def test_metrics_accumulate_tp_fp_fn_over_the_epoch():
    names = ["background", "neoplastic", "dead"]
    metrics = {m.name: m for m in segmentation_metrics(names)}
    truth = np.array([[[0, 1, 1, 2]]])
    pred = np.array([[[0, 1, 2, 2]]])
    metrics_list = list(metrics.values())
    for m in metrics_list:
        m.update_state(onehot(truth, 3), onehot(pred, 3) * 0.9 + 0.05)
    # neoplastic: tp 1, fn 1 -> 2/3 ; dead: tp 1, fp 1 -> 2/3 ; background: 1
    assert float(metrics["dice_neoplastic"].result()) == pytest.approx(2 / 3)
    assert float(metrics["dice_dead"].result()) == pytest.approx(2 / 3)
    assert float(metrics["mean_fg_dice"].result()) == pytest.approx(2 / 3)
    assert float(metrics["mean_dice"].result()) == pytest.approx((1 + 4 / 3) / 3)
    assert float(metrics["mean_iou"].result()) == pytest.approx((1 + 0.5 + 0.5) / 3)
    for m in metrics_list:  # a second batch: counts add up, they are not averaged per batch
        m.update_state(onehot(np.array([[[1, 1]]]), 3), onehot(np.array([[[1, 1]]]), 3))
    assert float(metrics["dice_neoplastic"].result()) == pytest.approx(2 * 3 / (2 * 3 + 1))


def test_schedules_give_expected_learning_rates_and_serialize():
    cycle = OneCycle(max_lr=1e-2, total_steps=100, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    assert float(cycle(0)) == pytest.approx(1e-2 / 25, rel=1e-5)
    peak_step = 0.3 * 100 - 1
    assert float(cycle(peak_step)) == pytest.approx(1e-2, rel=1e-5)
    assert float(cycle(99)) == pytest.approx(1e-2 / 25 / 1e4, rel=1e-3)
    assert float(cycle(10)) < float(cycle(20)) and float(cycle(50)) > float(cycle(80))
    warm = WarmupCosine(lr=1e-3, total_steps=110, warmup_steps=10, min_lr_factor=0.01)
    assert float(warm(0)) == pytest.approx(1e-4, rel=1e-5)
    assert float(warm(9)) == pytest.approx(1e-3, rel=1e-5)
    assert float(warm(10)) == pytest.approx(1e-3, rel=1e-5)
    assert float(warm(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-4)
    assert float(warm(110)) == pytest.approx(1e-5, rel=1e-4)
    for schedule in (cycle, warm):
        again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
        assert again.get_config() == schedule.get_config()
