"""Instance outputs of inference (``--instances``, issue #16): label images, ``objects.csv``, ``instance_metrics.csv``
and object outlines on overlays.

Labels come from the predicted probabilities (:func:`segkit.instances.labels_from_probabilities`): whole-image in
memory; out of core zone by zone from a disk-backed copy of the probabilities with the model's seam halo, merged
across seams (:mod:`segkit.instance_seams`). Measurements and scores are read back from the written files, so a
restarted run (outputs kept) still lists every image. See README.md, "Stage 3" (objects).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from segkit import cliutil, instance_seams, instance_targets, metrics, tiling
from segkit.cliutil import InputError
from segkit.instance_metrics import InstanceScores, dense_scores
from segkit.instances import (
    TARGET_OF_BUILD,
    InstanceThresholds,
    ObjectTotals,
    ThresholdError,
    compact_labels,
    labels_from_probabilities,
    object_columns,
    spacing_from_calibration,
)
from segkit.model_metadata import MAX_OBJECT_DIAMETER_PX

if TYPE_CHECKING:
    from segkit.inference.settings import Settings
    from segkit.model_metadata import ModelMetadata

log = logging.getLogger("inference_unet.instances")

LABELS_FOLDER = "labels"  # under --output_folder
OUTLINE_RGB = (255.0, 255.0, 0.0)  # object outlines on overlays: yellow
MEASURE_BLOCK_PIXELS = 16 * 2**20  # objects.csv reads labels and image this many pixels at a time


@dataclass(frozen=True)
class InstanceSettings:
    """How one run turns probabilities into objects: the model's target, thresholds and seam halo (flags win)."""

    target: str                       # the build stage's name: three_class | boundary
    thresholds: InstanceThresholds
    halo_px: int | tuple[int, ...]    # context per side when labelling zone by zone (out of core)
    diameter: float | None = None     # --object_diameter: the objects' diameter in px; None = measured (auto)
    trained_diameter: float | None = None  # the median training object's (metadata); None: no rescaling
    rescale: bool = False             # 2-D images in memory are labelled at the training objects' scale

    @property
    def labelling_target(self) -> str:
        return TARGET_OF_BUILD[self.target]


def resolve_instances(instances: bool | None, meta: ModelMetadata, saved_model_filepath: str,
                      min_object_size: int | None = None, seed_threshold: float | None = None,
                      foreground_threshold: float | None = None, seed_dynamic: float | None = None,
                      seam_halo: int | None = None, object_diameter: str | float | None = None) -> InstanceSettings | None:
    """``--instances`` and its thresholds resolved against the model's metadata ``instances`` block (None: off).

    Default (None): on for models with the block. ``--instances 1`` for a model without it: InputError.
    ``object_diameter``: ``auto`` (default), ``0`` (native scale) or the objects' diameter in pixels."""
    block = meta.instances
    if instances is None:
        instances = block is not None
    if not instances:
        return None
    if block is None:
        raise InputError(f"--instances 1: the model {saved_model_filepath} was not trained on instance targets (its "
                         "metadata has no 'instances' block); build the databases with build_lmdb.py --mask_type "
                         "instances and train on them, or drop --instances")
    overrides = {"min_size": min_object_size, "seed": seed_threshold, "foreground": foreground_threshold,
                 "dynamic": seed_dynamic}
    flags = {"min_size": "--min_object_size", "seed": "--seed_threshold", "foreground": "--foreground_threshold",
             "dynamic": "--seed_dynamic"}
    if seed_dynamic and block["target"] != "distance":
        raise InputError(f"--seed_dynamic splits the seed regions of the distance target; the model "
                         f"{saved_model_filepath} was trained on the {block['target']} target: drop the flag")
    values = dict(block["thresholds"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        thresholds = InstanceThresholds.from_dict(values)
    except ThresholdError as exc:
        given = [flags[k] for k, v in overrides.items() if v is not None]
        raise InputError(f"{' / '.join(given) or 'the model metadata'}: {exc}") from None
    halo = block["halo_px"] if seam_halo is None else seam_halo
    for h in halo if isinstance(halo, (list, tuple)) else [halo]:
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
            raise InputError(f"--seam_halo must be a whole number of pixels >= 1, got {seam_halo!r}")
    halo = tuple(int(h) for h in halo) if isinstance(halo, (list, tuple)) else int(halo)
    source = "fitted on the training records" if "tuning" in block else "the model's"
    given = ", ".join(f"{k} from {flags[k]}" for k, v in overrides.items() if v is not None)
    log.info("instances (%s target): seed %g, foreground %g, min_size %d, dynamic %g (%s%s)", block["target"],
             thresholds.seed, thresholds.foreground, thresholds.min_size, thresholds.dynamic, source,
             f"; {given}" if given else "")
    diameter, trained = _object_diameter(object_diameter, block.get("object_diameter_px"), saved_model_filepath)
    rescale = trained is not None and diameter != 0
    if rescale:
        log.info("instances: %s", f"objects of --object_diameter {diameter:g} px are labelled at the training objects' "
                 f"scale ({trained:g} px)" if diameter else "images in memory whose objects are over "
                 f"{AUTO_MIN_FACTOR:g}x smaller than the training objects ({trained:g} px across) are labelled again, "
                 "enlarged to their scale (--object_diameter auto; 0 = off)")
    return InstanceSettings(block["target"], thresholds, halo, diameter or None, trained, rescale)


def _object_diameter(flag: str | float | None, trained: float | None,
                     saved_model_filepath: str) -> tuple[float | None, float | None]:
    """(--object_diameter in pixels: None = auto, 0 = off; the model's training objects' diameter or None)."""
    text = "auto" if flag is None else str(flag).strip().lower()
    if text == "auto":
        return None, trained
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value == 0 or 1 <= value <= MAX_OBJECT_DIAMETER_PX):  # NaN fails
        raise InputError(f"--object_diameter must be auto, 0 (off) or the objects' diameter in pixels (1-"
                         f"{MAX_OBJECT_DIAMETER_PX:g}), got {flag!r}")
    if value and trained is None:
        raise InputError(f"--object_diameter {value:g}: the model {saved_model_filepath} does not record its training "
                         "objects' diameter (a volume model, or trained on databases built before build_lmdb.py "
                         "recorded it); drop the flag, or rebuild the databases and retrain")
    return value, trained


# --- objects at the training objects' scale (--object_diameter) ---------------------------------------

AUTO_MIN_FACTOR = 1.3  # auto: enlarge only objects this much smaller than the training ones (README, "Objects")
MAX_FACTOR = 4.0       # rescaling by at most this much either way


def median_diameter(labels: np.ndarray) -> float | None:
    """The diameter of the disc as large as the median object of ``labels`` (None without objects)."""
    sizes = instance_targets.object_sizes(labels)
    return instance_targets.equivalent_diameter(float(np.median(sizes))) if sizes.size else None


def objects_at_scale(image_hwc: np.ndarray, predict: Callable[[np.ndarray, float], np.ndarray],
                     inst: InstanceSettings, number_classes: int,
                     working_set_limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Class probabilities and instance labels of a 2-D image in memory, labelled where its objects have the
    training objects' size: (probabilities HWK, labels HW, a note for the log line).

    ``predict(image, factor)`` gives the probabilities of the image resized by ``factor``. With a given diameter
    the image is resized once by trained / given; with ``auto`` it is labelled at its own scale first, and
    enlarged (by at most MAX_FACTOR, and within ``working_set_limit``) only when its median object is over
    AUTO_MIN_FACTOR times smaller than the training objects: a model sees small, packed objects best at the size
    it learned them, while objects at or above that size are left as they are (not measured to gain from
    shrinking). The labels of an enlarged image are brought back by nearest-neighbour sampling, the probabilities
    by area averaging; the smallest-seed threshold scales with the area."""
    height, width = image_hwc.shape[:2]
    if inst.diameter is not None:
        factor, why = inst.trained_diameter / inst.diameter, f"--object_diameter {inst.diameter:g} px"
        probs = labels = None
    else:
        probs = predict(image_hwc, 1.0)
        labels = labels_from_probabilities(probs, inst.thresholds, inst.labelling_target)
        found = median_diameter(labels)
        if found is None or inst.trained_diameter / found < AUTO_MIN_FACTOR:
            return probs, labels, ""
        factor, why = inst.trained_diameter / found, f"median object {found:.3g} px across"
    factor = min(max(factor, 1 / MAX_FACTOR), MAX_FACTOR)
    # bytes per pixel of the enlarged image: the image and its normalized copy, the probabilities twice (model
    # output, gathered), the labels and the watershed's work arrays
    per_pixel = 4 * (2 * image_hwc.shape[-1] + 2 * number_classes) + 32
    factor = min(factor, max(1.0, float(np.sqrt(working_set_limit / max(1, per_pixel * height * width)))))
    if abs(factor - 1) < 0.05:  # as good as the image's own scale (or all the memory allows)
        if probs is None:
            probs = predict(image_hwc, 1.0)
        if labels is None:
            labels = labels_from_probabilities(probs, inst.thresholds, inst.labelling_target)
        return probs, labels, ""
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    big = predict(image_hwc, factor)
    thresholds = dataclasses.replace(inst.thresholds, min_size=int(round(inst.thresholds.min_size * factor ** 2)))
    labels = compact_labels(_nearest(labels_from_probabilities(big, thresholds, inst.labelling_target),
                                     (height, width)))  # an object under a sampled pixel is gone: ids 1..N again
    probs = resize(big, (height, width))
    probs /= np.maximum(probs.sum(axis=-1, keepdims=True), 1e-12)
    return probs, labels, (f", objects labelled at x{factor:.2f} ({why}; training objects {inst.trained_diameter:.3g} "
                           f"px, {size[0]}x{size[1]})")


def resize(array_hwc: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """float32 ``array_hwc`` resized to ``size_hw``: linear when enlarging, area averaging when shrinking."""
    import cv2

    array = np.asarray(array_hwc, np.float32)
    height, width = size_hw
    method = cv2.INTER_AREA if height * width < array.shape[0] * array.shape[1] else cv2.INTER_LINEAR
    out = np.empty((height, width, array.shape[-1]), np.float32)
    for c in range(0, array.shape[-1], 4):  # cv2 resizes up to 4 channels at once
        part = cv2.resize(np.ascontiguousarray(array[..., c:c + 4]), (width, height), interpolation=method)
        out[..., c:c + 4] = part.reshape(height, width, -1)
    return out


def _nearest(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``labels`` sampled at the centres of a ``size_hw`` grid over the same extent (ids kept exactly)."""
    rows = np.minimum(((np.arange(size_hw[0]) + 0.5) * labels.shape[0] / size_hw[0]).astype(np.int64),
                      labels.shape[0] - 1)
    cols = np.minimum(((np.arange(size_hw[1]) + 0.5) * labels.shape[1] / size_hw[1]).astype(np.int64),
                      labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


# --- the label image of one input ------------------------------------------------------------------


class LabelOutput:
    """An inference output (``put(zone, probs)``) that gathers the probabilities (in memory, or in a hidden
    temporary file beside the output when out of core) and on success writes the label image atomically."""

    def __init__(self, path: str, spatial: tuple[int, ...], out_of_core: bool, settings: Settings,
                 calibration: Any = None, name: str = "", tile: tiling.PerAxis | None = None):
        self.path, self.spatial, self.out_of_core, self.settings = path, tuple(spatial), out_of_core, settings
        self.calibration, self.name = calibration, name
        self.tile = settings.tile_size if tile is None else tile
        self._temporaries: list[str] = []
        self.probs: Any = None
        self.labels: np.ndarray | None = None  # set when the labels were made already (objects_at_scale)

    def _array(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if not self.out_of_core:
            return np.zeros(shape, dtype)
        spill = cliutil.make_temp(self.path, suffix=".npy")
        self._temporaries.append(spill)
        return np.lib.format.open_memmap(spill, mode="w+", dtype=dtype, shape=shape)

    def __enter__(self) -> LabelOutput:
        self.probs = self._array(self.spatial + (self.settings.number_classes,), np.float32)
        return self

    def put(self, zone: tiling.Zone, probs: np.ndarray) -> None:
        if self.labels is None:
            self.probs[zone.region()] = probs

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._write()
        finally:
            self.probs = None
            for path in self._temporaries:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _write(self) -> None:
        from segkit.inference import writers

        inst = self.settings.instances
        if self.out_of_core:  # zone by zone with the seam halo, ids merged across seams
            ids = self._array(self.spatial, np.int64)
            table = instance_seams.label_zones(self.probs, ids, self.tile, inst.halo_px, inst.thresholds,
                                               inst.labelling_target)
            dtype, block = table.dtype, (lambda box: instance_seams.relabel(ids[box], table))
        else:
            labels = self.labels
            if labels is None:
                labels = labels_from_probabilities(self.probs, inst.thresholds, inst.labelling_target)
            dtype, block = labels.dtype, (lambda box: labels[box])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.ExitStack() as stack:
            writer = writers.open_writer(stack, self.path, self.spatial, dtype, self.tile, lambda a: a, False,
                                         self.out_of_core, self.settings.output_format, self.calibration, self.name)
            for box in instance_seams.zones(self.spatial, self.tile):
                start = tuple(s.start for s in box)
                writer.put(tiling.Zone(start, start, tuple(s.stop for s in box), start), block(box))


# --- objects.csv and instance_metrics.csv -------------------------------------------------------------


@dataclass
class InstanceResults:
    """What a run collects for its tables: object rows, matches and dense scores per image."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    scores: InstanceScores = field(default_factory=InstanceScores)
    dense: dict[str, dict[str, float]] = field(default_factory=dict)
    channels: int = 0
    ndim: int = 2


def _read_whole(view: Any) -> np.ndarray:
    return np.asarray(view[0:view.shape[0]])


def measure_image(name: str, image_path: str, labels_file: str, volume: bool, settings: Settings,
                  results: InstanceResults) -> int:
    """Rows of ``objects.csv`` for one image from its written labels and the image (block by block along the
    first axis); returns the number of objects."""
    from segkit.inference.regions import open_source, opened

    source = open_source(image_path, settings)
    try:
        with opened(labels_file, volume) as labels:
            ndim = len(labels.shape) - 1
            channels = int(source.image.shape[-1])
            totals = ObjectTotals(ndim, channels)
            step = max(1, MEASURE_BLOCK_PIXELS // max(1, int(np.prod(labels.shape[1:-1]))))
            for start in range(0, labels.shape[0], step):
                totals.add(np.asarray(labels[start:start + step])[..., 0], np.asarray(source.image[start:start + step]))
        rows = totals.rows(spacing_from_calibration(source.calibration, ndim), name)
    finally:
        source.close()
    results.objects.extend(rows)
    results.channels, results.ndim = channels, ndim
    return len(rows)


def read_truth_labels(truth_path: str, volume: bool, mask_dataset: str | None, shape: tuple[int, ...]) -> np.ndarray:
    """Ground-truth instance labels, checked: integer ids >= 0, the image's shape; ValueError (this image) else."""
    from segkit.inference.regions import opened

    with opened(truth_path, volume, mask_dataset, role="mask") as view:
        if view.shape[-1] != 1:
            raise ValueError(f"{truth_path}: ground-truth mask has {view.shape[-1]} channels; instance masks are "
                             "single-channel")
        truth = _read_whole(view)[..., 0]
    try:
        instance_targets.check_instances(truth, truth_path)
    except InputError as exc:  # one bad ground truth fails its image, not the folder
        raise ValueError(str(exc)) from None
    if truth.shape != tuple(shape):
        raise ValueError(f"{truth_path}: ground-truth mask is {'x'.join(map(str, truth.shape))} but the labels are "
                         f"{'x'.join(map(str, shape))}; they must match pixel for pixel")
    return truth


def score_image(name: str, mask_file: str, labels_file: str, truth_path: str, volume: bool, settings: Settings,
                results: InstanceResults) -> np.ndarray:
    """Instance scores of one image into ``results``; returns the per-class confusion matrix of the predicted
    classes against the target made from the true labels (instance_targets.make_target), for metrics.csv."""
    from segkit.inference.regions import opened

    with opened(labels_file, volume) as view:
        pred = _read_whole(view)[..., 0]
    truth = read_truth_labels(truth_path, volume, settings.mask_dataset, pred.shape)
    results.scores.add(name, truth, pred)
    results.dense[name] = dense_scores(truth, pred)
    with opened(mask_file, volume) as view:
        classes = _read_whole(view)[..., 0]
    target = instance_targets.make_target(truth, settings.instances.target)
    return metrics.confusion_matrix(target.astype(np.int64), classes, settings.number_classes)


def _table_name(stem: str, settings: Settings) -> str:
    index, count = settings.shard
    return f"{stem}.csv" if count == 1 else f"{stem}_shard{index}_of_{count}.csv"


def _write_csv(path: str, rows: list[Mapping[str, Any]], columns: list[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    cliutil.atomic_write_text(path, text.getvalue())


def write_tables(results: InstanceResults, settings: Settings, scored: bool) -> list[str]:
    """``objects.csv`` (every image's objects) and, when ground truth was scored, ``instance_metrics.csv``: one
    row per image and ``ALL`` (matches summed over images; dense scores: their mean over images)."""
    folder = settings.output_folder
    objects_path = os.path.join(folder, _table_name("objects", settings))
    _write_csv(objects_path, results.objects, object_columns(results.ndim, results.channels))
    log.info("%d object(s) -> %s", len(results.objects), objects_path)
    if not scored or not results.scores.rows:
        return [objects_path]
    rows = [{**row, **results.dense[row["image"]]} for row in results.scores.rows]
    dense_mean = {k: float(np.mean([d[k] for d in results.dense.values()])) for k in next(iter(results.dense.values()))}
    overall = {**results.scores.overall(), **dense_mean}
    metrics_path = os.path.join(folder, _table_name("instance_metrics", settings))
    _write_csv(metrics_path, rows + [overall], list(overall))
    log.info("objects over %d image(s): AP@0.5 %.4f, AP@0.75 %.4f, PQ@0.5 %.4f -> %s", len(rows),
             overall["ap_t50"], overall["ap_t75"], overall["pq_t50"], metrics_path)
    return [objects_path, metrics_path]


# --- overlays ---------------------------------------------------------------------------------------


def draw_outlines(rgb: np.ndarray, labels: np.ndarray, colour: tuple[float, float, float] = OUTLINE_RGB) -> np.ndarray:
    """``rgb`` (H, W, 3) with the outline of every object of ``labels`` (H, W) painted in ``colour``."""
    from skimage.segmentation import find_boundaries

    out = np.array(rgb, dtype=np.float32, copy=True)
    out[find_boundaries(labels, mode="inner") & (labels > 0)] = colour
    return out
