"""Losses as sums of per-batch statistics, so a loss over several batches or replicas is exact.

TensorFlow is imported inside the functions. README.md, "Stage 2" (--loss, --class_weights).
"""
from __future__ import annotations

FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def batch_statistics(labels, logits, loss: str, class_weights, number_classes: int, ignore_negative: bool = False) -> dict:
    """Sums over the batch from which :func:`loss_from_statistics` computes the loss (sum across replicas/batches).

    ``ignore_negative`` (test passes): pixels labelled < 0 (the reader's padding to the size factor,
    ``imagereader.IGNORE_LABEL``) count nowhere: not in the pixels, the cross-entropy or the Dice sums.
    """
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    valid = None
    if ignore_negative:
        valid = tf.cast(labels >= 0, tf.float32)
        labels = tf.maximum(labels, 0)  # any class: its terms are multiplied by 0 below
    stats = {"pixels": tf.cast(tf.size(labels), tf.float32) if valid is None else tf.reduce_sum(valid)}
    if loss in ("ce", "ce+dice", "focal"):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        weight = tf.gather(class_weights, labels)
        if loss == "focal":
            ce = (1.0 - tf.exp(-ce)) ** FOCAL_GAMMA * ce
        if valid is not None:
            weight = weight * valid
        stats["ce_sum"] = tf.reduce_sum(weight * ce)
    if loss in ("dice", "ce+dice"):
        probs = tf.nn.softmax(logits, axis=-1)
        truth = tf.one_hot(labels, number_classes, dtype=tf.float32)
        if valid is not None:
            probs, truth = probs * valid[..., None], truth * valid[..., None]
        axes = tf.range(tf.rank(truth) - 1)
        stats["intersection"] = tf.reduce_sum(probs * truth, axis=axes)
        stats["prob_sum"] = tf.reduce_sum(probs, axis=axes)
        stats["true_sum"] = tf.reduce_sum(truth, axis=axes)
    return stats


def zero_statistics(loss: str, number_classes: int) -> dict:
    """The statistics of an empty batch (the model's kernels reject a batch of 0 images)."""
    import tensorflow as tf

    shapes = {"pixels": [], "ce_sum": [], "intersection": [number_classes], "prob_sum": [number_classes],
              "true_sum": [number_classes]}
    present = ({"pixels"} | ({"ce_sum"} if loss in ("ce", "ce+dice", "focal") else set())
               | ({"intersection", "prob_sum", "true_sum"} if loss in ("dice", "ce+dice") else set()))
    return {k: tf.zeros(shape) for k, shape in shapes.items() if k in present}


def loss_from_statistics(stats: dict, loss: str, class_weights):
    """Weighted mean cross-entropy (or focal) per pixel, plus 1 - weighted mean soft Dice over classes."""
    import tensorflow as tf

    total = tf.constant(0.0)
    if "ce_sum" in stats:
        total += stats["ce_sum"] / tf.maximum(stats["pixels"], 1.0)
    if loss in ("dice", "ce+dice"):
        dice = (2.0 * stats["intersection"] + DICE_SMOOTH) / (stats["prob_sum"] + stats["true_sum"] + DICE_SMOOTH)
        total += 1.0 - tf.reduce_sum(class_weights * dice) / tf.reduce_sum(class_weights)
    return total
