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
    assert np.isnan(scores["pq"][2])  # class 3 absent from the truth: NaN
    assert scores["mpq"] == pytest.approx((1 / 1.5 + 2 / 2.5) / 2)
    # a predicted nucleus of class 3 (absent from the truth): its class stays NaN and mPQ does not
    # change (its false positive is not counted), but bPQ counts it: TP 4, FP 1 → 4 / 4.5
    extra_inst = np.where(truth_inst > 0, truth_inst, 0)
    extra_inst[48:58, 48:58] = 5
    extra_cls = pred_cls.copy()
    extra_cls[48:58, 48:58] = 3
    with_fp = image_scores(truth_inst, truth_cls, extra_inst, extra_cls, num_classes=4)
    assert np.isnan(with_fp["pq"][2]) and np.isnan(with_fp["f1"][2])
    assert with_fp["mpq"] == pytest.approx((1 / 1.5 + 2 / 2.5) / 2)
    assert with_fp["pq"][:2] == pytest.approx(scores["pq"][:2])
    assert with_fp["bpq"] == pytest.approx(4 / 4.5) and with_fp["detection_f1"] == pytest.approx(4 / 4.5)
    other = image_scores(truth_inst, truth_cls, np.zeros_like(truth_inst), np.zeros_like(truth_cls), 4)
    report = dataset_scores([scores, other, scores], ["bg", "a", "b", "c"], tissues=["x", "y", "x"])
    assert report["bpq"] == pytest.approx((1.0 + 0.0) / 2)  # mean of tissue means
    assert report["mpq_per_tissue"]["y"] == 0.0
    assert report["pq_per_class"]["a"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert np.isnan(report["pq_per_class"]["c"])


def test_detection_f1_counts_matches_per_image_and_per_class():
    """F1 at IoU > 0.5 is 2·TP / (2·TP + FP + FN) (= DQ), for all nuclei and for each class."""
    truth_inst = squares(*FOUR)
    truth_cls = np.zeros_like(truth_inst)
    truth_cls[(truth_inst == 1) | (truth_inst == 2)] = 1
    truth_cls[truth_inst >= 3] = 2
    # found: nuclei 1, 2 (called class 2), 3; missed: nucleus 4; extra: one class-1 nucleus
    pred_inst = squares(FOUR[0], FOUR[1], FOUR[2], (48, 48, 10, 10))
    pred_cls = np.zeros_like(pred_inst)
    pred_cls[(pred_inst == 1) | (pred_inst == 4)] = 1
    pred_cls[(pred_inst == 2) | (pred_inst == 3)] = 2
    first = image_scores(truth_inst, truth_cls, pred_inst, pred_cls, num_classes=4)
    assert first["detection_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # TP 3, FP 1, FN 1
    # class 1: TP nucleus 1, FP the extra one, FN nucleus 2 (called class 2)
    assert first["f1"][0] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # class 2: TP nucleus 3, FP nucleus 2 (a class-1 nucleus), FN nucleus 4
    assert first["f1"][1] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert np.isnan(first["f1"][2])  # class 3 in neither map
    # a second image: two class-1 nuclei, one found and one missed, no false positive
    second_truth = squares(FOUR[0], FOUR[3])
    second_cls = np.where(second_truth > 0, 1, 0)
    second_pred = squares(FOUR[0])
    second = image_scores(second_truth, second_cls, second_pred, np.where(second_pred > 0, 1, 0), 4)
    assert second["detection_f1"] == pytest.approx(2 / 3) and second["f1"][0] == pytest.approx(2 / 3)
    assert np.isnan(second["f1"][1])
    report = dataset_scores([first, second], ["bg", "a", "b", "c"])
    assert report["detection_f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert report["f1_per_class"]["a"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert report["f1_per_class"]["b"] == pytest.approx(0.5)  # the NaN of image 2 is ignored
    assert np.isnan(report["f1_per_class"]["c"])


def test_a_nucleus_takes_the_majority_class_of_its_pixels_background_not_voting():
    inst = np.zeros((4, 12), np.int32)
    cls = np.zeros((4, 12), np.int32)
    inst[0, :] = 1  # 12 pixels: 5 background-class, 4 of class 2, 3 of class 3
    cls[0, 5:9], cls[0, 9:] = 2, 3
    inst[1, :6] = 3  # id 2 carried by no pixel; id 3: 2 of class 1, 4 of class 4
    cls[1, :2], cls[1, 2:6] = 1, 4
    inst[2, :4] = 4  # id 4: one class-4 pixel among background-class ones
    cls[2, 3] = 4
    assert instance_classes(inst, cls, 5).tolist() == [0, 2, 0, 4, 4]
