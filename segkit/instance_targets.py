"""Training targets from instance label masks (``build_lmdb.py --mask_type instances``).

One home for which target an instance mask becomes and why (README, "Building databases", "Instance
masks"): ``distance`` for sparse objects, ``boundary`` (1 = membrane, 0 elsewhere) for dense labels, and on
request ``three_class`` (0 background, 1 interior, 2 boundary). ``distance`` is 0 background, 1 boundary, 2 ...
1 + DISTANCE_LEVELS the interior by its depth in the object: the distance to the object's edge over the
object's largest such distance, in equal bins, as the Deep Watershed Transform quantizes its energy; the
deepest levels mark each object's core, apart from its neighbours' however they touch). Boundaries are
``skimage.segmentation.find_boundaries`` with ``mode="inner"``: one pixel inside each object, so touching
objects stay apart. Volumes get their boundaries (and depths) per 2D section (z stays z), which gives
in-plane membranes on anisotropic stacks too.
No TensorFlow here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segkit.cliutil import InputError

TARGETS = ("three_class", "boundary", "distance")
DISTANCE_LEVELS = 4  # interior levels of the distance target: quarters of each object's depth
CLASSES = {"three_class": 3, "boundary": 2, "distance": 2 + DISTANCE_LEVELS}
CLASS_NAMES = {"three_class": ["background", "interior", "boundary"], "boundary": ["other", "boundary"],
               "distance": ["background", "boundary"] + [f"depth_{k + 1}_of_{DISTANCE_LEVELS}"
                                                         for k in range(DISTANCE_LEVELS)]}
DENSE_BACKGROUND_FRACTION = 0.05  # fewer background voxels than this: dense labels (neurons), boundary target


@dataclass(frozen=True)
class Choice:
    """The target of one mask and the reason, as recorded in the metadata and the build summary."""

    target: str
    background_fraction: float
    reason: str


def check_instances(labels: np.ndarray, path: str) -> None:
    """Refuse, in one line, a mask that cannot hold instance ids (non-integer or negative values)."""
    if labels.dtype == bool or labels.dtype.kind not in "ui":
        raise InputError(f"{path}: instance mask pixel type is {labels.dtype.name}, not an integer type; instance "
                         "masks hold one integer id per object (0 = background): save it as uint16 or int32")
    if labels.size and labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise InputError(f"{path}: instance mask has negative ids (minimum {int(labels.min())}); ids must be >= 0 "
                         "with 0 = background: renumber the objects")


def choose_target(labels: np.ndarray, override: str | None = None) -> Choice:
    """``distance`` for sparse objects, ``boundary`` for dense labels (background < 5 %), or ``override``.

    ``distance`` rather than ``three_class`` for sparse objects: on a validation split of the DSB training
    images (README, "Quality") it scored AP@0.5 0.839 against 0.810, its cores staying apart where touching
    objects' boundary is missed."""
    fraction = float(np.count_nonzero(labels == 0)) / max(labels.size, 1)
    if override:
        return Choice(override, fraction, f"--instance_target {override}")
    dense = fraction < DENSE_BACKGROUND_FRACTION
    rule = f"{100 * fraction:.1f}% background {'<' if dense else '>='} {100 * DENSE_BACKGROUND_FRACTION:.0f}%"
    return Choice("boundary" if dense else "distance", fraction,
                  f"{rule}: {'dense labels' if dense else 'sparse objects'}")


def object_sizes(labels: np.ndarray) -> np.ndarray:
    """Pixels (voxels) of each object id present in ``labels`` (0 = background), as int64."""
    counts = np.bincount(labels.ravel().astype(np.int64)) if labels.size else np.zeros(1, np.int64)
    return counts[1:][counts[1:] > 0]


def equivalent_diameter(pixels: float) -> float:
    """The diameter of the disc of this many pixels (skimage.measure's equivalent_diameter_area in 2-D)."""
    return float(2.0 * np.sqrt(pixels / np.pi))


def object_size_summary(sizes: list[np.ndarray], spatial_rank: int) -> dict[str, float | int]:
    """The metadata's record of a split's objects: their count, the median object's pixels (voxels) and, for
    2-D images, the diameter of the disc of that area, which inference compares with the objects it finds
    (``inference_unet.py --object_diameter``)."""
    pooled = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    summary: dict[str, float | int] = {"objects": int(pooled.size)}
    if pooled.size:
        median = float(np.median(pooled))
        summary["median_object_pixels"] = median
        if spatial_rank == 2:
            summary["median_object_diameter_px"] = round(equivalent_diameter(median), 3)
    return summary


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Inner boundaries of every object: over the whole image (2D), per z section (volumes, ZYX)."""
    from skimage.segmentation import find_boundaries

    if labels.ndim == 2:
        return find_boundaries(labels, mode="inner")
    return np.stack([find_boundaries(section, mode="inner") for section in labels])


def make_target(labels: np.ndarray, target: str) -> np.ndarray:
    """The uint8 class mask of ``labels`` (HW or ZYX) for ``target`` (one of :data:`TARGETS`)."""
    border = boundaries(labels) & (labels != 0)
    if target == "boundary":
        return border.astype(np.uint8)
    if target == "distance":
        return _depth_levels(labels, border)
    out = (labels != 0).astype(np.uint8)
    out[border] = 2
    return out


def _depth_levels(labels: np.ndarray, border: np.ndarray) -> np.ndarray:
    """The distance target: 0 background, 1 boundary, 2 + bin of the interior's normalized depth (Euclidean
    distance to the nearest boundary or background pixel over the object's largest, in DISTANCE_LEVELS equal
    bins); volumes per z section, as their boundaries."""
    from scipy import ndimage as ndi

    if labels.ndim == 3:
        return np.stack([_depth_levels(section, edge) for section, edge in zip(labels, border)])
    out = np.where(border, 1, 0).astype(np.uint8)
    interior = (labels != 0) & ~border
    if not interior.any():
        return out
    depth = ndi.distance_transform_edt(interior)
    _, which = np.unique(labels[interior], return_inverse=True)  # ids may be large: index the ones present
    deepest = np.zeros(int(which.max()) + 1)
    np.maximum.at(deepest, which, depth[interior])
    share = depth[interior] / deepest[which]  # in (0, 1]
    out[interior] = 2 + np.minimum((share * DISTANCE_LEVELS).astype(np.int64), DISTANCE_LEVELS - 1)
    return out


def three_class_of(target: np.ndarray, name: str) -> np.ndarray:
    """A stored ``three_class`` or ``distance`` target as the 3-class one (0 background, 1 interior, 2
    boundary): the objects it encodes, without the depth."""
    target = np.asarray(target)
    if name == "three_class":
        return target
    if name != "distance":
        raise ValueError(f"only the three_class and distance targets encode separate objects, not {name!r}")
    return np.select([target == 0, target == 1], [0, 2], 1).astype(np.uint8)
