"""Object-level scores against values computed by hand on small cases."""
import math

import numpy as np
import pytest

from segkit import instance_metrics as im


def test_iou_matrix_by_hand():
    true = np.array([[1, 1, 1, 1, 0, 2, 2]])
    pred = np.array([[5, 5, 5, 0, 0, 9, 3]])
    iou, true_ids, pred_ids = im.iou_matrix(true, pred)
    assert list(true_ids) == [1, 2] and list(pred_ids) == [3, 5, 9]
    np.testing.assert_allclose(iou, [[0, 3 / 4, 0], [1 / 2, 0, 1 / 2]])


def test_matching_maximises_hits_not_total_iou():
    # raw Hungarian on IoU would take 0.3 + 0.3 = 0.6 over the single hit 0.51, and find no match at 0.5
    iou = np.array([[0.51, 0.3], [0.3, 0.0]])
    rows, cols = im.match(iou, 0.5)
    assert list(zip(rows, cols)) == [(0, 0)]
    assert list(zip(*im.match(iou, 0.25))) == [(0, 1), (1, 0)]  # two hits beat one


def test_one_object_split_in_two_halves_matches_only_one():
    true = np.array([[1, 1, 1, 1]])
    pred = np.array([[1, 1, 2, 2]])  # each half has IoU exactly 0.5 with the object
    c = im.image_counts(true, pred, (0.5,))[0.5]
    assert (c.tp, c.fp, c.fn, c.iou_sum) == (1, 1, 0, 0.5)


def test_counts_and_scores_by_hand():
    true = np.zeros((4, 10), int)
    true[0:2, 0:2] = 1      # 4 px, found exactly
    true[0:2, 4:8] = 2      # 8 px, predicted as 6 of them: IoU 0.75
    true[3, 0:2] = 3        # missed
    pred = np.zeros_like(true)
    pred[0:2, 0:2] = 7
    pred[0:2, 4:7] = 8
    pred[3, 8:10] = 9       # false positive
    counts = im.image_counts(true, pred)
    c50, c80 = counts[0.5], counts[0.8]
    assert (c50.tp, c50.fp, c50.fn) == (2, 1, 1) and c50.iou_sum == pytest.approx(1.75)
    assert (c80.tp, c80.fp, c80.fn) == (1, 2, 2)
    s = c50.scores()
    assert s["ap"] == pytest.approx(2 / 4) and s["f1"] == pytest.approx(4 / 6)
    assert s["sq"] == pytest.approx(0.875) and s["pq"] == pytest.approx(0.875 * 4 / 6)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert c80.scores()["ap"] == pytest.approx(1 / 5)


def test_overall_sums_counts_over_images_before_scoring():
    scores = im.InstanceScores(thresholds=(0.5,))
    perfect = np.array([[1, 1, 0, 2, 2]])
    row_a = scores.add("a", perfect, perfect)                        # 2 TP
    row_b = scores.add("b", np.array([[1, 1, 0, 0]]), np.zeros((1, 4), int))  # 1 FN
    assert row_a["ap_t50"] == 1.0 and row_b["ap_t50"] == 0.0 and row_b["fn_t50"] == 1
    total = scores.overall()
    assert total["image"] == "ALL" and total["ap_t50"] == pytest.approx(2 / 3)  # not the mean 0.5
    assert total["ap_mean"] == pytest.approx(2 / 3)


def test_row_has_every_threshold():
    row = im.InstanceScores().add("x", np.ones((3, 3), int), np.ones((3, 3), int))
    assert [k for k in row if k.startswith("ap_t")] == [f"ap_t{t}" for t in range(50, 95, 5)]
    assert row["ap_mean"] == 1.0 and row["pq_t90"] == 1.0


def test_empty_images():
    empty = np.zeros((3, 3), int)
    assert im.image_counts(empty, empty, (0.5,))[0.5].scores()["ap"] == 1.0
    c = im.image_counts(np.ones((3, 3), int), empty, (0.5,))[0.5]
    assert (c.tp, c.fn, c.scores()["ap"], c.scores()["pq"]) == (0, 1, 0.0, 0.0)
    assert im.average_precision([(empty, np.ones((3, 3), int))]) == 0.0


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        im.iou_matrix(np.zeros((2, 2)), np.zeros((2, 3)))


def test_works_on_volumes():
    true = np.zeros((2, 3, 3), int)
    true[:, :2, :2] = 4
    pred = true.copy()
    pred[1, 0, 0] = 0  # 7 of 8 voxels: IoU 7/8
    c = im.image_counts(true, pred, (0.85, 0.9))
    assert c[0.85].tp == 1 and c[0.9].tp == 0


def test_dense_scores_split_by_hand():
    true = np.array([[1, 1, 1, 1]])
    pred = np.array([[1, 1, 2, 2]])
    s = im.dense_scores(true, pred)
    # pairs (ordered, without self-pairs) together in the truth 12, in the prediction 4, in both 4
    assert s["rand_precision"] == pytest.approx(4 / 12) and s["rand_recall"] == pytest.approx(1.0)
    assert s["adapted_rand_error"] == pytest.approx(1 - 2 * (1 / 3) / (1 / 3 + 1))
    assert s["vi_split"] == pytest.approx(1.0) and s["vi_merge"] == pytest.approx(0.0)  # one bit


def test_dense_scores_merge_by_hand():
    true = np.array([[1, 1, 2, 2, 3, 3, 3, 3]])
    pred = np.array([[5, 5, 5, 5, 6, 6, 6, 6]])
    s = im.dense_scores(true, pred)
    assert s["vi_split"] == pytest.approx(0.0) and s["vi_merge"] == pytest.approx(0.5)  # H(true|pred) = 1/2 bit
    assert s["rand_precision"] == pytest.approx(1.0) and s["rand_recall"] == pytest.approx(16 / 24)
    assert s["vi"] == pytest.approx(0.5)
    assert im.dense_scores(true, true)["adapted_rand_error"] == pytest.approx(0.0)
    assert not math.isnan(s["adapted_rand_error"])
