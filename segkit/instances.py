"""Objects from a softmax segmenter (issue #16): probabilities -> instance labels, the 3-class training target,
and per-object measurements for ``objects.csv``.

Any number of spatial axes, channels last (``probs_yxk``, ``probs_zyxk``). Seam merging of independently labelled
zones (tiled / out-of-core runs) lives in :mod:`segkit.instance_seams`; the scores in :mod:`segkit.instance_metrics`.
numpy, scipy and scikit-image only; no TensorFlow here.
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import relabel_sequential, watershed

from segkit import cliutil

TARGETS = ("3class", "membrane", "distance")
# the build stage's target names (segkit.instance_targets, model metadata ``instances.target``) -> the labelling's
TARGET_OF_BUILD = {"three_class": "3class", "boundary": "membrane", "distance": "distance"}
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2  # classes of the 3-class target
INSIDE, MEMBRANE = 0, 1  # classes of the 2-class membrane target (dense labels)
# the distance target: 0 background, 1 boundary, then the interior's depth levels, shallowest first


class ThresholdError(cliutil.InputError, ValueError):
    """An instance threshold or target out of range: one line, exit code 2 at the command line."""


@dataclass(frozen=True)
class InstanceThresholds:
    """How confident probabilities become objects; saved in the model metadata under ``instances``."""

    seed: float = 0.5
    """A pixel seeds an object where p_interior > seed (membrane target: 1 - p_membrane > seed; distance target:
    the expected depth > seed, depth from 0 at the edge to 1 at the object's core)."""
    foreground: float = 0.5
    """3-class and distance: seeds grow back over pixels where 1 - p_background > foreground."""
    min_size: int = 4
    """Seeds (and seedless foreground components) smaller than this many pixels are dropped."""
    dynamic: float = 0.0
    """Distance target: a component of d > seed holds one seed per peak of d that rises at least this much above
    the saddle to any higher peak (the h-maxima of morphology, h = dynamic), so touching objects whose cores
    run together through a neck of depth above ``seed`` still get a seed each; 0 = one seed per component."""

    def __post_init__(self) -> None:
        for name in ("seed", "foreground"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ThresholdError(f"instance threshold {name} must be a probability strictly between 0 and 1, "
                                     f"got {value!r}; e.g. {name}=0.5")
        dynamic = self.dynamic
        if isinstance(dynamic, bool) or not isinstance(dynamic, (int, float)) or not 0.0 <= dynamic < 1.0:
            raise ThresholdError(f"instance threshold dynamic must be a depth difference >= 0 and < 1 (0 = off), "
                                 f"got {dynamic!r}; e.g. dynamic=0.2")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ThresholdError(f"instance threshold min_size must be a whole number of pixels >= 0, "
                                 f"got {self.min_size!r}; e.g. min_size=4")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> InstanceThresholds:
        """From metadata JSON; unknown keys are refused by name (``where`` names the file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ThresholdError(f"{where + ': ' if where else ''}unknown instance threshold(s) {unknown}; "
                                 f"known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_probs(probs: np.ndarray, target: str) -> None:
    if target not in TARGETS:
        raise ThresholdError(f"instance target must be one of {TARGETS}, got {target!r}")
    classes = {"3class": 3, "membrane": 2}.get(target)
    if probs.ndim < 3 or (probs.shape[-1] != classes if classes else probs.shape[-1] < 3):
        wanted = classes or "3 or more"
        raise ThresholdError(f"the {target} target needs probabilities with {wanted} classes last "
                             f"(spatial axes then classes), got shape {probs.shape}")


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in order of first appearance (0 stays background): uint16, or uint32 above 65535."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("instance labels must be >= 0")
    relabelled, _, _ = relabel_sequential(labels)
    count = int(relabelled.max()) if relabelled.size else 0
    return relabelled.astype(label_dtype(count), copy=False)


def label_dtype(count: int) -> np.dtype:
    """The smallest of uint16 / uint32 that holds ``count`` object ids."""
    if count > np.iinfo(np.uint32).max:
        raise ValueError(f"{count} objects do not fit uint32 ids")
    return np.dtype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)


def _seeds(inside: np.ndarray, min_size: int) -> np.ndarray:
    """Connected components of ``inside`` (face connectivity), those under ``min_size`` pixels dropped."""
    seeds, count = ndi.label(inside)
    if count and min_size > 1:
        small = np.bincount(seeds.ravel(), minlength=count + 1) < min_size
        small[0] = False
        seeds[small[seeds]] = 0
    return seeds


_LEVEL_BITS, _PLACE_BITS = 23, 28  # key = level << 28 | place: below 2**51, exact in the float64 watershed


def flooding_keys(landscape: np.ndarray, origin: Sequence[int] | None = None) -> np.ndarray:
    """``landscape`` (values in [0, 1]) as int64 keys that order the watershed's flooding without ties.

    skimage's watershed breaks ties between equal values by the order pixels entered its queue, which depends on
    the whole array, so a crop would label differently from the whole image. Here equal values (saturated
    probabilities are common) are ordered by the pixel's global position (``origin``: the position of the
    array's first pixel in the whole image), periodic with period 2**(28 // ndim) per axis, so pixels that can
    compete never tie, in a crop and in the whole image alike.
    """
    ndim = landscape.ndim
    origin = (0,) * ndim if origin is None else tuple(int(o) for o in origin)
    period_bits = _PLACE_BITS // ndim
    place = np.zeros(landscape.shape, np.int64)
    for axis, (size, start) in enumerate(zip(landscape.shape, origin)):
        coords = np.arange(start, start + size, dtype=np.int64) % (1 << period_bits)
        place += (coords << (period_bits * (ndim - 1 - axis))).reshape([-1 if a == axis else 1 for a in range(ndim)])
    levels = np.rint(np.clip(landscape, 0.0, 1.0) * ((1 << _LEVEL_BITS) - 1)).astype(np.int64)
    return (levels << _PLACE_BITS) | place


def labels_from_probabilities(probs: np.ndarray, thresholds: InstanceThresholds = InstanceThresholds(),
                              target: str = "3class", origin: Sequence[int] | None = None) -> np.ndarray:
    """Instance labels (0 = background) from per-pixel class probabilities, classes last.

    ``3class`` (background, interior, boundary): seeds are the components of p_interior > seed, grown back by a
    seeded watershed on 1 - p_interior within the foreground p_interior + p_boundary > foreground; a foreground
    component that holds no seed becomes one object of its own (when it has min_size pixels). ``membrane``
    (inside, membrane; dense labels): seeds are the components of p_inside > seed, flooded by a watershed on
    p_membrane over the whole image, so every pixel joins a seed; no agglomeration of the resulting fragments
    (over-segmentation is left as it is). ``distance`` (background, boundary, depth levels): as 3class, with the
    expected depth (:func:`expected_depth`) for p_interior and 1 - p_background for the foreground; with
    ``thresholds.dynamic`` > 0 a seed region holding several depth peaks is split into them
    (:func:`_split_at_saddles`). Returns
    uint16, or uint32 beyond 65535 objects. ``origin``: where ``probs`` starts in the whole image, for crops of
    it (:func:`flooding_keys`).
    """
    probs = np.asarray(probs, dtype=np.float32)
    _check_probs(probs, target)
    if target == "membrane":
        seeds = _seeds(probs[..., INSIDE] > thresholds.seed, thresholds.min_size)
        if not seeds.any():
            return np.zeros(probs.shape[:-1], np.uint16)
        return compact_labels(watershed(flooding_keys(probs[..., MEMBRANE], origin), markers=seeds))
    if target == "distance":
        interior, foreground = expected_depth(probs), 1.0 - probs[..., BACKGROUND] > thresholds.foreground
    else:
        interior = probs[..., INTERIOR]
        foreground = interior + probs[..., BOUNDARY] > thresholds.foreground
    seeds = _seeds((interior > thresholds.seed) & foreground, thresholds.min_size)
    if target == "distance" and thresholds.dynamic > 0:
        seeds = _split_at_saddles(seeds, interior, thresholds.dynamic)
    labels = watershed(flooding_keys(1.0 - interior, origin), markers=seeds, mask=foreground)
    return compact_labels(_fill_holes(_add_seedless(labels, foreground, thresholds.min_size)))


def _split_at_saddles(seeds: np.ndarray, depth: np.ndarray, dynamic: float) -> np.ndarray:
    """``seeds`` (labelled components) with each component that holds two or more peaks of ``depth`` of dynamic
    at least ``dynamic`` replaced by those peaks: the regional maxima of the morphological reconstruction of
    depth - dynamic under the depth (the h-maxima, h = dynamic). Peaks of equal height in one dome (saturated
    cores) count as one unless a saddle deeper than ``dynamic`` parts them. Every other component stays its own
    seed. Each component is taken alone (its depth, 0 around it, in its bounding box), so its seeds depend on its
    own pixels only and a crop that holds it finds the same ones; only components with more than one local
    maximum of depth are reconstructed."""
    faces = ndi.generate_binary_structure(seeds.ndim, 1)  # the connectivity of _seeds' components
    inside = seeds > 0
    if not inside.any():
        return seeds
    landscape = np.where(inside, depth, 0.0).astype(np.float64)
    tops, _ = ndi.label(local_maxima(landscape, footprint=faces) & inside, structure=faces)
    pairs = np.unique(np.stack([seeds[tops > 0], tops[tops > 0]]), axis=1)
    several = np.flatnonzero(np.bincount(pairs[0], minlength=int(seeds.max()) + 1) > 1)
    out = seeds.astype(np.int64)
    next_id = int(seeds.max()) + 1
    boxes = ndi.find_objects(seeds)
    for index in several:
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in boxes[index - 1])  # a ring of 0 around it
        mine = seeds[box] == index
        land = np.where(mine, landscape[box], 0.0)
        domes = reconstruction(land - dynamic, land, method="dilation", footprint=faces)
        peaks, count = ndi.label(local_maxima(domes, footprint=faces) & mine, structure=faces)
        if count > 1:
            region = out[box]
            region[mine] = 0
            region[peaks > 0] = peaks[peaks > 0] + (next_id - 1)
            next_id += count
    return out


def expected_depth(probs: np.ndarray) -> np.ndarray:
    """The distance target's probabilities (background, boundary, depth levels shallowest first) as the expected
    depth in [0, 1): 0 for background and boundary, the middle of its bin for each level."""
    levels = probs.shape[-1] - 2
    centres = np.concatenate([[0.0, 0.0], (np.arange(levels) + 0.5) / levels]).astype(np.float32)
    return probs @ centres


def _add_seedless(labels: np.ndarray, foreground: np.ndarray, min_size: int) -> np.ndarray:
    """Foreground components the watershed did not reach (no seed in them) as objects of their own."""
    orphans = _seeds(foreground & (labels == 0), min_size)
    if orphans.any():
        labels = labels.astype(np.int64)
        labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    return labels


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Background enclosed by one object joins it (a dim nucleolus under the foreground threshold leaves a hole,
    which would be missing from the object's area and mean intensity). A pocket of background (components with
    full connectivity) is filled when it does not reach the array's edge and every labelled pixel that shares a
    face with it belongs to one object; a pocket between two objects stays background. In a crop the same pocket
    gets the same answer whenever its object lies wholly inside the crop (the condition of exact tiling)."""
    ndim = labels.ndim
    pockets, count = ndi.label(labels == 0, structure=np.ones((3,) * ndim, bool))
    outside = np.zeros(count + 1, bool)
    outside[0] = True
    for axis in range(ndim):
        for end in (0, -1):
            outside[np.take(pockets, end, axis=axis)] = True
    if outside.all():  # the usual case: no enclosed background (or no background) at all
        return labels
    enclosed = np.where(outside, 0, np.arange(count + 1))[pockets]  # the enclosed pockets' ids, 0 elsewhere
    step = int(labels.max()) + 1
    keys = []  # pocket * step + the label of a face neighbour
    for axis in range(ndim):
        lo = [slice(None)] * ndim
        hi = [slice(None)] * ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        for a, b in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):
            meet = (enclosed[a] > 0) & (labels[b] > 0)
            keys.append(enclosed[a][meet].astype(np.int64) * step + labels[b][meet])
    keys = np.unique(np.concatenate(keys))
    pocket, owner_of = keys // step, keys % step
    neighbours = np.bincount(pocket, minlength=count + 1)
    owner = np.zeros(count + 1, np.int64)
    owner[pocket] = owner_of
    fill = neighbours == 1  # an enclosed pocket always has a labelled neighbour
    if not fill.any():
        return labels
    labels = labels.astype(np.int64)
    hole = fill[pockets]
    labels[hole] = owner[pockets[hole]]
    return labels


def target_from_labels(labels: np.ndarray, target: str = "three_class") -> np.ndarray:
    """The training target of instance labels as the build stage makes it (segkit.instance_targets), by
    default the 3-class one (uint8: 0 background, 1 interior, 2 boundary: ``find_boundaries(mode="inner")``,
    per z section for volumes; the image border is not a boundary)."""
    from segkit import instance_targets

    return instance_targets.make_target(np.asarray(labels), target)


def one_hot(target: np.ndarray, classes: int) -> np.ndarray:
    """Class indices -> float32 probabilities of 0 and 1, classes last (the ceiling of a perfect model)."""
    return np.eye(classes, dtype=np.float32)[np.asarray(target)]


# ---- measurements: objects.csv ----------------------------------------------------------------------------------

def _axis_names(ndim: int) -> list[str]:
    return list("zyx"[-ndim:]) if ndim <= 3 else [f"a{i}" for i in range(ndim)]


def object_columns(ndim: int, channels: int) -> list[str]:
    """The header of ``objects.csv`` for labels with ``ndim`` spatial axes and an image of ``channels``."""
    axes = _axis_names(ndim)
    size = "area" if ndim == 2 else "volume"
    unit = {2: "um2", 3: "um3"}.get(ndim, f"um{ndim}")
    return (["image", "id", f"{size}_px", f"{size}_{unit}"] + [f"centroid_{a}_px" for a in axes]
            + [f"centroid_{a}_um" for a in axes] + [f"bbox_{a}_min" for a in axes]
            + [f"bbox_{a}_max" for a in axes] + [f"mean_intensity_c{c}" for c in range(channels)])


def spacing_from_calibration(calibration: Any, ndim: int) -> tuple[float, ...] | None:
    """Micrometres per pixel along each spatial axis from a :class:`segkit.calibration.Calibration`, or None."""
    if calibration is None or len(calibration.pixel_size_yx) != ndim:
        return None
    scale = calibration.micrometres_per_unit()
    return tuple(float(v) * scale for v in calibration.pixel_size_yx)


def measure_objects(labels: np.ndarray, image: np.ndarray | None = None, spacing_um: Sequence[float] | None = None,
                    name: str = "") -> list[dict[str, Any]]:
    """One row per object (columns :func:`object_columns`): size, centroid and bounding box (max exclusive) in
    pixels, size and centroid in micrometres (None when ``spacing_um``, one value per spatial axis, is unknown),
    mean intensity per channel of ``image`` (spatial axes as ``labels``, channels last or none)."""
    labels = np.asarray(labels)
    ndim = labels.ndim
    if spacing_um is not None and len(spacing_um) != ndim:
        raise ValueError(f"spacing_um needs one value per spatial axis ({ndim}), got {spacing_um!r}")
    if image is not None:
        image = np.asarray(image)
        if image.shape[:ndim] != labels.shape:
            raise ValueError(f"image shape {image.shape} does not start with the labels' shape {labels.shape}")
    channels = 0 if image is None else (1 if image.ndim == ndim else image.shape[-1])
    props = ["label", "area", "centroid", "bbox"] + (["intensity_mean"] if image is not None else [])
    table = regionprops_table(labels, intensity_image=image, properties=props)
    columns = object_columns(ndim, channels)
    volume = float(np.prod(spacing_um)) if spacing_um is not None else None
    rows = []
    for i, label in enumerate(table["label"]):
        centroid = [float(table[f"centroid-{a}"][i]) for a in range(ndim)]
        values = [name, int(label), int(table["area"][i]), None if volume is None else float(table["area"][i]) * volume]
        values += centroid
        values += [None] * ndim if spacing_um is None else [c * s for c, s in zip(centroid, spacing_um)]
        values += [int(table[f"bbox-{a}"][i]) for a in range(2 * ndim)]
        if image is not None and image.ndim == ndim:
            values.append(float(table["intensity_mean"][i]))
        else:
            values += [float(table[f"intensity_mean-{c}"][i]) for c in range(channels)]
        rows.append(dict(zip(columns, values)))
    return rows


class ObjectTotals:
    """:func:`measure_objects` block by block, for labels larger than memory: ``add`` consecutive blocks along
    the first axis (labels and the image's same block), then ``rows``. Sums per object id (pixels, coordinates,
    intensities) and bounding boxes; the same rows as :func:`measure_objects` up to float rounding."""

    def __init__(self, ndim: int, channels: int):
        self.ndim, self.channels = ndim, channels
        self.count = np.zeros(1, np.int64)
        self.coord_sum = np.zeros((ndim, 1))
        self.intensity_sum = np.zeros((channels, 1))
        self.lo = np.full((ndim, 1), np.iinfo(np.int64).max)
        self.hi = np.zeros((ndim, 1), np.int64)
        self.offset = 0

    def _grow(self, size: int) -> None:
        if size <= len(self.count):
            return
        extra = size - len(self.count)
        self.count = np.pad(self.count, (0, extra))
        self.coord_sum, self.intensity_sum, self.hi = (np.pad(a, ((0, 0), (0, extra)))
                                                       for a in (self.coord_sum, self.intensity_sum, self.hi))
        self.lo = np.pad(self.lo, ((0, 0), (0, extra)), constant_values=np.iinfo(np.int64).max)

    def add(self, labels_block: np.ndarray, image_block: np.ndarray | None = None) -> None:
        labels_block = np.asarray(labels_block)
        flat = labels_block.ravel().astype(np.int64)
        size = int(flat.max(initial=0)) + 1
        self._grow(size)
        self.count[:size] += np.bincount(flat, minlength=size)
        grids = np.indices(labels_block.shape, sparse=True)
        for axis in range(self.ndim):
            coords = np.broadcast_to(grids[axis] + (self.offset if axis == 0 else 0), labels_block.shape)
            self.coord_sum[axis, :size] += np.bincount(flat, coords.ravel().astype(np.float64), size)
        if image_block is not None and self.channels:
            pixels = np.asarray(image_block, np.float64).reshape(flat.size, -1)
            for c in range(self.channels):
                self.intensity_sum[c, :size] += np.bincount(flat, pixels[:, c], size)
        for label, box in enumerate(ndi.find_objects(labels_block), start=1):
            if box is not None:
                starts = [s.start + (self.offset if a == 0 else 0) for a, s in enumerate(box)]
                stops = [s.stop + (self.offset if a == 0 else 0) for a, s in enumerate(box)]
                self.lo[:, label] = np.minimum(self.lo[:, label], starts)
                self.hi[:, label] = np.maximum(self.hi[:, label], stops)
        self.offset += labels_block.shape[0]

    def rows(self, spacing_um: Sequence[float] | None = None, name: str = "") -> list[dict[str, Any]]:
        """One row per object with pixels, in id order (columns :func:`object_columns`)."""
        columns = object_columns(self.ndim, self.channels)
        volume = float(np.prod(spacing_um)) if spacing_um is not None else None
        out = []
        for label in np.flatnonzero(self.count[1:] > 0) + 1:
            n = int(self.count[label])
            centroid = [float(v) / n for v in self.coord_sum[:, label]]
            values = [name, int(label), n, None if volume is None else n * volume] + centroid
            values += [None] * self.ndim if spacing_um is None else [c * s for c, s in zip(centroid, spacing_um)]
            values += [int(v) for v in self.lo[:, label]] + [int(v) for v in self.hi[:, label]]
            values += [float(v) / n for v in self.intensity_sum[:, label]]
            out.append(dict(zip(columns, values)))
        return out


def write_objects_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` atomically (temporary, then rename); None becomes an empty cell."""
    with cliutil.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
