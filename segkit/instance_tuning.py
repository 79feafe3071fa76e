"""Instance thresholds fitted to a trained model on its own training records (issue #16).

A softmax segmenter's probabilities are calibrated by its training, not by the data: one fixed seed threshold
suits neither a model that is sure of every interior pixel nor one that is not. As StarDist fits its thresholds
to each trained model, :func:`tune_thresholds` searches the labelling thresholds of
:class:`segkit.instances.InstanceThresholds` (the seed threshold, the foreground threshold, the smallest seed and,
for the distance target, the dynamic that splits a seed region at its depth's saddles)
for the best object score on (probabilities, true labels) pairs, one threshold at a time over a fixed grid
(coordinate ascent, two rounds; the seed threshold and the dynamic as one pair), keeping the current value
unless another scores strictly higher. The
minimum sizes tried follow the data: fractions of the median true object size.

The score is AP = TP / (TP + FP + FN) with one-to-one matching, counts summed over the images, at IoU 0.5 and
0.75 averaged (0.5 alone rewards objects that are only roughly right). numpy, scipy and scikit-image only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from segkit.instance_metrics import Counts, image_counts
from segkit.instance_targets import object_sizes, three_class_of
from segkit.instances import InstanceThresholds, labels_from_probabilities, one_hot

SEED_GRIDS = {"3class": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998),  # p_interior
              "distance": (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)}  # the expected depth
FOREGROUND_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DYNAMIC_GRIDS = {"3class": (0.0,), "distance": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)}  # the depth peaks' dynamic
MIN_SIZE_FRACTIONS = (0.02, 0.05, 0.1, 0.2)  # of the median true object size, besides the default
OBJECTIVE_IOUS = (0.5, 0.75)
ROUNDS = 2


@dataclass
class Tuning:
    """The outcome: the thresholds chosen, and the score of the defaults and of the choice on the same pairs."""
    thresholds: InstanceThresholds
    default_score: dict[str, float]
    tuned_score: dict[str, float]
    images: int
    objects: int
    tried: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record saved with the model (metadata ``instances.tuning``)."""
        return {"on": f"{self.images} training record(s), {self.objects} object(s)",
                "objective": "AP at IoU " + " and ".join(f"{t:g}" for t in OBJECTIVE_IOUS) + ", averaged",
                "default": _rounded(self.default_score), "tuned": _rounded(self.tuned_score),
                "thresholds_tried": self.tried}

    def summary(self) -> str:
        """One log line."""
        t = self.thresholds
        return (f"instance thresholds fitted on {self.images} training record(s) ({self.objects} objects): seed "
                f"{t.seed:g}, foreground {t.foreground:g}, min_size {t.min_size}, dynamic {t.dynamic:g}; AP@0.5 "
                f"{self.default_score['ap50']:.3f} -> {self.tuned_score['ap50']:.3f}, AP@0.75 "
                f"{self.default_score['ap75']:.3f} -> {self.tuned_score['ap75']:.3f} (defaults -> fitted)")


def _rounded(score: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in score.items()}


def true_labels_of_target(target: np.ndarray, name: str = "three_class") -> np.ndarray:
    """Instance labels recovered from a stored ``three_class`` or ``distance`` target (what the training
    databases hold): the labelling of its 3-class one-hot probabilities with no size limit (AP@0.5 0.989
    against the DSB ground truth)."""
    three = three_class_of(target, name).astype(np.int64)
    return labels_from_probabilities(one_hot(three, 3), InstanceThresholds(min_size=0))


def score(pairs: Sequence[tuple[np.ndarray, np.ndarray]], thresholds: InstanceThresholds,
          target: str = "3class") -> dict[str, float]:
    """AP at each objective IoU (``ap50``, ``ap75``) over (probabilities, true labels) pairs, and their mean."""
    totals = {t: Counts() for t in OBJECTIVE_IOUS}
    for probs, truth in pairs:
        counts = image_counts(truth, labels_from_probabilities(probs, thresholds, target), OBJECTIVE_IOUS)
        for t in OBJECTIVE_IOUS:
            totals[t] = totals[t] + counts[t]
    out = {f"ap{round(t * 100)}": totals[t].scores()["ap"] for t in OBJECTIVE_IOUS}
    out["objective"] = float(np.mean(list(out.values())))
    return out


def min_size_grid(pairs: Sequence[tuple[np.ndarray, np.ndarray]], default: int) -> tuple[int, ...]:
    """The default and fractions of the median true object size (pixels or voxels)."""
    sizes = np.concatenate([object_sizes(truth) for _, truth in pairs]) if pairs else np.zeros(0)
    if not sizes.size:
        return (default,)
    median = float(np.median(sizes))
    return tuple(sorted({default, *(max(1, int(round(f * median))) for f in MIN_SIZE_FRACTIONS)}))


def tune_thresholds(pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                    start: InstanceThresholds = InstanceThresholds(), target: str = "3class") -> Tuning | None:
    """The thresholds that score best on ``pairs`` ((probabilities classes last, true labels); ``target``: the
    labelling's, 3class or distance); None when the pairs hold no object to score on (then the defaults stay)."""
    pairs = [(np.asarray(p, np.float32), np.asarray(t)) for p, t in pairs]
    objects = sum(int(len(np.unique(t)) - (1 if (t == 0).any() else 0)) for _, t in pairs)
    if not objects:
        return None
    # the seed threshold and the dynamic together (a lower seed threshold pays only with the dynamic that splits
    # the larger seed regions it makes), then the smallest seed, then the foreground
    blocks = [[{"seed": seed, "dynamic": dynamic} for seed in SEED_GRIDS[target] for dynamic in DYNAMIC_GRIDS[target]],
              [{"min_size": value} for value in min_size_grid(pairs, start.min_size)],
              [{"foreground": value} for value in FOREGROUND_GRID]]
    cache: dict[InstanceThresholds, dict[str, float]] = {}

    def scored(t: InstanceThresholds) -> dict[str, float]:
        if t not in cache:
            cache[t] = score(pairs, t, target)
        return cache[t]

    best = start
    for _ in range(ROUNDS):
        for block in blocks:
            for values in block:
                candidate = dataclasses.replace(best, **values)
                if scored(candidate)["objective"] > scored(best)["objective"]:
                    best = candidate
    return Tuning(best, scored(start), scored(best), len(pairs), objects, len(cache))
