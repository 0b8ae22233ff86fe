import numpy as np
import pytest

from xsight_keras.evaluation.instance_metrics import (
    aggregated_jaccard_index,
    dataset_scores,
    image_scores,
    panoptic_quality,
)
from xsight_keras.labels import instance_classes


def squares(*boxes, shape=(64, 64)):
    """Instance map with one id per (row, col, height, width) box, ids 1.. in order."""
    out = np.zeros(shape, np.int32)
    for i, (r, c, h, w) in enumerate(boxes, start=1):
        out[r:r + h, c:c + w] = i
    return out


FOUR = [(2, 2, 10, 10), (2, 30, 10, 10), (30, 2, 10, 10), (30, 30, 10, 10)]


def test_identical_maps_score_one():
    truth = squares(*FOUR)
    relabelled = np.where(truth > 0, truth * 7 + 100, 0)  # ids need not match
    q = panoptic_quality(truth, relabelled)
    assert (q["pq"], q["dq"], q["sq"], q["tp"]) == (1.0, 1.0, 1.0, 4)
    assert aggregated_jaccard_index(truth, relabelled) == 1.0


def test_one_missed_nucleus():
    truth, pred = squares(*FOUR), squares(*FOUR[:3])
    q = panoptic_quality(truth, pred)
    assert (q["tp"], q["fp"], q["fn"]) == (3, 0, 1)
    assert q["pq"] == pytest.approx(3 / 3.5)  # DQ = 3 / (3 + ½·1), SQ = 1
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(300 / 400)


def test_one_split_nucleus():
    truth = squares((2, 2, 10, 20), (30, 2, 10, 10), (30, 30, 10, 10))
    pred = squares((2, 2, 10, 10), (2, 12, 10, 10), (30, 2, 10, 10), (30, 30, 10, 10))
    q = panoptic_quality(truth, pred)  # each half has IoU 0.5 with the nucleus: not a match
    assert (q["tp"], q["fp"], q["fn"]) == (2, 2, 1)
    assert q["pq"] == pytest.approx(2 / 3.5)
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(300 / 500)


def test_one_merged_pair():
    truth = squares((2, 2, 10, 10), (2, 12, 10, 10), (30, 30, 10, 10))
    pred = squares((2, 2, 10, 20), (30, 30, 10, 10))
    q = panoptic_quality(truth, pred)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 1, 2)
    assert q["pq"] == pytest.approx(1 / 2.5)
    assert aggregated_jaccard_index(truth, pred) == pytest.approx(300 / 500)


def test_partial_overlap_lowers_sq_not_dq():
    truth = squares((2, 2, 10, 10))
    pred = squares((2, 3, 10, 10))  # IoU 90 / 110
    q = panoptic_quality(truth, pred)
    assert q["dq"] == 1.0 and q["sq"] == pytest.approx(90 / 110)


def test_classes_follow_the_pannuke_protocol():
    truth_inst = squares(*FOUR)
    truth_cls = np.zeros_like(truth_inst)
    truth_cls[truth_inst == 1] = 1
    truth_cls[truth_inst == 2] = 1
    truth_cls[truth_inst >= 3] = 2
    pred_cls = truth_cls.copy()
    pred_cls[truth_inst == 2] = 2  # one neoplastic nucleus called inflammatory
    kinds = instance_classes(truth_inst, truth_cls, 4)
    assert kinds[1:5].tolist() == [1, 1, 2, 2]
    scores = image_scores(truth_inst, truth_cls, truth_inst, pred_cls, num_classes=4)
    assert scores["bpq"] == 1.0  # every nucleus found
    assert scores["pq"][0] == pytest.approx(1 / 1.5)  # class 1: TP 1, FN 1
    assert scores["pq"][1] == pytest.approx(2 / 2.5)  # class 2: TP 2, FP 1
    assert np.isnan(scores["pq"][2])  # class 3 absent from the truth: NaN, its FPs not counted
    assert scores["mpq"] == pytest.approx((1 / 1.5 + 2 / 2.5) / 2)
    other = image_scores(truth_inst, truth_cls, np.zeros_like(truth_inst), np.zeros_like(truth_cls), 4)
    report = dataset_scores([scores, other, scores], ["bg", "a", "b", "c"], tissues=["x", "y", "x"])
    assert report["bpq"] == pytest.approx((1.0 + 0.0) / 2)  # mean of tissue means
    assert report["mpq_per_tissue"]["y"] == 0.0
    assert report["pq_per_class"]["a"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert np.isnan(report["pq_per_class"]["c"])
