"""Segmentation metrics from a confusion matrix: pixel accuracy, per-class IoU and Dice.

One home for the definitions used by training (test passes) and inference
(``--mask_folder``). Pure numpy; training accumulates the confusion matrix in
TensorFlow and hands it here.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, number_classes: int) -> np.ndarray:
    """``cm[t, p]`` counts pixels of true class t predicted as p (int64).

    Truth values outside [0, number_classes) are ignored.
    """
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    valid = (truth >= 0) & (truth < number_classes)
    pred = np.clip(pred[valid], 0, number_classes - 1)
    flat = truth[valid] * number_classes + pred
    return np.bincount(flat, minlength=number_classes * number_classes).reshape(number_classes, number_classes)


def scores(cm: np.ndarray) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU and Dice, and their means over classes present.

    A class absent from both truth and prediction gets NaN for IoU/Dice and is
    left out of the means.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = cm.sum()
    return {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": [float(v) for v in iou],
        "dice": [float(v) for v in dice],
        "mean_iou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "mean_dice": float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else float("nan"),
    }


def flat_row(prefix_fields: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A CSV-ready row: the given fields, accuracy, mean IoU/Dice, then iou_c / dice_c per class."""
    row = dict(prefix_fields)
    row["pixel_accuracy"] = result["pixel_accuracy"]
    row["mean_iou"] = result["mean_iou"]
    row["mean_dice"] = result["mean_dice"]
    for c, v in enumerate(result["iou"]):
        row[f"iou_{c}"] = v
    for c, v in enumerate(result["dice"]):
        row[f"dice_{c}"] = v
    return row
