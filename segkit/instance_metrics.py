"""Object-level scores: one-to-one matching of predicted and true objects by IoU, average precision, F1 and
panoptic quality over IoU thresholds, and the dense-label errors (adapted Rand, variation of information).

One home for the object-level definitions (inference's object scores and the benchmarks use them). Labels are
integer arrays of any number of spatial axes, 0 = background, any other value one object. numpy, scipy and
scikit-image only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import adapted_rand_error, variation_of_information

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5, 0.55, ..., 0.9


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(iou, true_ids, pred_ids)``: iou[i, j] of true object true_ids[i] and predicted pred_ids[j]."""
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"true and predicted labels differ in shape: {true_labels.shape} vs {pred_labels.shape}")
    true_ids, t = np.unique(true_labels.ravel(), return_inverse=True)
    pred_ids, p = np.unique(pred_labels.ravel(), return_inverse=True)
    overlap = np.bincount(t * len(pred_ids) + p, minlength=len(true_ids) * len(pred_ids))
    overlap = overlap.reshape(len(true_ids), len(pred_ids)).astype(np.float64)
    t_keep, p_keep = true_ids != 0, pred_ids != 0
    size_true, size_pred = overlap.sum(axis=1), overlap.sum(axis=0)
    overlap = overlap[t_keep][:, p_keep]
    union = size_true[t_keep][:, None] + size_pred[p_keep][None, :] - overlap
    return overlap / np.maximum(union, 1.0), true_ids[t_keep], pred_ids[p_keep]


def match(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches with IoU >= threshold: as many as possible, then the largest total IoU (the
    StarDist matching, Hungarian algorithm). Returns the matched (true, predicted) row and column indices."""
    if iou.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    hit = iou >= threshold
    # a hit is worth 1, its IoU breaks ties; the IoU of all matches sums to < 1/2, so it never buys a hit
    cost = -(hit.astype(np.float64) + iou / (2.0 * min(iou.shape)))
    rows, cols = linear_sum_assignment(cost)
    keep = hit[rows, cols]
    return rows[keep], cols[keep]


@dataclass
class Counts:
    """Matches at one IoU threshold; summed over images for the overall scores."""
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    def scores(self) -> dict[str, float]:
        """AP = TP/(TP+FP+FN), precision, recall, F1, and panoptic quality PQ = SQ x RQ (RQ is F1, SQ the
        mean IoU of the matches). 1.0 when there is nothing to find and nothing found."""
        tp, fp, fn = self.tp, self.fp, self.fn
        if tp + fp + fn == 0:
            return {"ap": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "sq": 1.0, "pq": 1.0}
        f1 = 2 * tp / (2 * tp + fp + fn)
        sq = self.iou_sum / tp if tp else 0.0
        return {"ap": tp / (tp + fp + fn), "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": f1, "sq": sq, "pq": sq * f1}


def image_counts(true_labels: np.ndarray, pred_labels: np.ndarray,
                 thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[float, Counts]:
    """Per IoU threshold, the matches of one image."""
    iou, true_ids, pred_ids = iou_matrix(true_labels, pred_labels)
    out = {}
    for threshold in thresholds:
        rows, cols = match(iou, threshold)
        tp = len(rows)
        out[threshold] = Counts(tp, len(pred_ids) - tp, len(true_ids) - tp, float(iou[rows, cols].sum()))
    return out


@dataclass
class InstanceScores:
    """Accumulates images: per-image rows and overall counts (TP/FP/FN summed over images, then scored)."""
    thresholds: Sequence[float] = IOU_THRESHOLDS
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: dict[float, Counts] = field(default_factory=dict)

    def add(self, name: str, true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, Any]:
        counts = image_counts(true_labels, pred_labels, self.thresholds)
        for threshold, c in counts.items():
            self.total[threshold] = self.total.get(threshold, Counts()) + c
        row = flat_row(name, counts)
        self.rows.append(row)
        return row

    def overall(self, name: str = "ALL") -> dict[str, Any]:
        return flat_row(name, {t: self.total.get(t, Counts()) for t in self.thresholds})


def flat_row(name: str, counts: dict[float, Counts]) -> dict[str, Any]:
    """A CSV row: image, then per threshold t (as ``t50`` ... ``t90``) tp, fp, fn, ap, f1, pq; and the mean AP
    over the thresholds (``ap_mean``)."""
    row: dict[str, Any] = {"image": name}
    aps = []
    for threshold, c in counts.items():
        tag = f"t{round(threshold * 100):02d}"
        s = c.scores()
        row.update({f"tp_{tag}": c.tp, f"fp_{tag}": c.fp, f"fn_{tag}": c.fn, f"ap_{tag}": s["ap"],
                    f"f1_{tag}": s["f1"], f"pq_{tag}": s["pq"]})
        aps.append(s["ap"])
    row["ap_mean"] = float(np.mean(aps)) if aps else float("nan")
    return row


def average_precision(pairs: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5) -> float:
    """AP = TP/(TP+FP+FN) at one IoU threshold over (true, predicted) label pairs, counts summed."""
    total = Counts()
    for true_labels, pred_labels in pairs:
        total = total + image_counts(true_labels, pred_labels, (threshold,))[threshold]
    return total.scores()["ap"]


def dense_scores(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """Errors of dense labels (EM connectomics), 0 = perfect: scikit-image's adapted Rand error with its
    precision (pairs together in both / pairs together in the truth: low when objects are split) and recall
    (/ pairs together in the prediction: low when objects are merged), true background 0 ignored; and the
    variation of information in bits, ``vi_split`` = H(pred | true) (over-segmentation) plus
    ``vi_merge`` = H(true | pred) (under-segmentation)."""
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    are, precision, recall = adapted_rand_error(true_labels, pred_labels)
    split, merge = variation_of_information(true_labels, pred_labels)
    return {"adapted_rand_error": float(are), "rand_precision": float(precision), "rand_recall": float(recall),
            "vi_split": float(split), "vi_merge": float(merge), "vi": float(split + merge)}
