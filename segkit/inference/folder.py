"""Inference over a folder: one image or volume (predict, score, overlay), the folder loop and its Summary.

See README.md, "Stage 3".
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from segkit import cliutil, image_io, metrics, tiling
from segkit.cliutil import InputError
from segkit.inference import blocks, instances_out
from segkit.inference.predictor import MISMATCH, SavedModelPredictor, with_tta
from segkit.inference.regions import is_volume, open_source, opened
from segkit.inference.settings import OUTPUT_SUBFOLDERS, Settings, output_paths, resolve_settings
from segkit.inference.writers import open_outputs

log = logging.getLogger("inference_unet.folder")

OVERLAY_MAX_SIDE = 2048
TILE_PROGRESS_MIN_TILES = 16


def _bar_interval() -> float:
    """Seconds between progress updates: live on a terminal, sparse in batch-job log files."""
    return 0.1 if sys.stderr.isatty() else 30.0


# --- one image --------------------------------------------------------------------------------


def predict_image(path: str, todo: dict[str, str], predict_fn: Callable, settings: Settings) -> str:
    """Predict one image or volume and write the requested outputs; returns a one-line description."""
    source = open_source(path, settings)
    try:
        image = source.image
        spatial = tuple(image.shape[:-1])
        mean, std = image_io.image_stats(image, **source.stats_blocks)
        if not np.all(np.isfinite(mean + std)):
            raise ValueError(f"{path}: image contains NaN or infinite pixels; replace them first")
        tile, halo, factor = settings.geometry(len(spatial))
        slice_wise = len(spatial) > settings.spatial_rank
        if slice_wise:
            predict_fn = _slice_wise(predict_fn, path, settings)
        plan = tiling.plan_tiles(spatial, tile, halo, factor, settings.border)

        def tiled(array: Any, **outputs: Any) -> np.ndarray | None:
            return tiling.predict_tiled(array, predict_fn, tile, halo, factor, batch_size=settings.batch_size,
                                        preprocess=lambda t: image_io.normalize(t, mean, std), border=settings.border,
                                        **outputs)

        scaled = None
        if _rescales_objects(settings, source, slice_wise, todo):
            def predict_at(image_hwc: np.ndarray, scale: float) -> np.ndarray:
                if scale != 1.0:
                    size = (round(spatial[0] * scale), round(spatial[1] * scale))
                    image_hwc = instances_out.resize(image_hwc, (max(1, size[0]), max(1, size[1])))
                return tiled(image_hwc)

            scaled = instances_out.objects_at_scale(image, predict_at, settings.instances, settings.number_classes,
                                                    settings.working_set_limit)
        # A tile bar for large images, on a terminal only (batch logs get the per-image line).
        show_bar = (source.out_of_core or len(plan.zones) >= TILE_PROGRESS_MIN_TILES) and sys.stderr.isatty()
        from tqdm import tqdm

        with contextlib.ExitStack() as stack:
            outputs = open_outputs(stack, todo, spatial, source.out_of_core, settings, calibration=source.calibration,
                                   name=os.path.basename(path), tile=tile)
            bar = stack.enter_context(tqdm(total=len(plan.zones), desc=os.path.basename(path), unit="tile",
                                           leave=False, disable=not show_bar))

            def sink(zone: tiling.Zone, probs: np.ndarray) -> None:
                for out in outputs:
                    out.put(zone, probs)

            if scaled is None:
                tiled(image, sink=sink, progress=bar.update)
            else:  # predicted already (objects_at_scale): the outputs take its probabilities and labels
                probs, labels, _ = scaled
                for out in outputs:
                    if isinstance(out, instances_out.LabelOutput):
                        out.labels = labels
                for zone in plan.zones:
                    sink(zone, probs[zone.region()])
    finally:
        source.close()
    where = "out of core" if source.out_of_core else "in memory"
    halo_text = _size(tiling.per_axis(halo, len(spatial), "halo")) if source.volume else settings.halo
    mode = ", 2-D model section by section" if slice_wise else ""
    return (f"{_size(spatial)}, {len(tiling.tile_groups(plan))} tile(s) of {_size(plan.tile_shape)} "
            f"(halo {halo_text}, border {settings.border}{mode}), {where}{scaled[2] if scaled else _unscaled(settings, source)}")


def _unscaled(settings: Settings, source: Any) -> str:
    """The log's note for an image whose objects could have been rescaled but was too large to hold in memory."""
    inst = settings.instances
    if inst is not None and inst.rescale and source.out_of_core and not source.volume:
        return ", objects labelled at the image's own scale (--object_diameter applies to images held in memory)"
    return ""


def _rescales_objects(settings: Settings, source: Any, slice_wise: bool, todo: dict[str, str]) -> bool:
    """Whether this image's objects are labelled at the training objects' scale (--object_diameter): instance
    models that record that scale, a 2-D image held in memory, and outputs to write."""
    inst = settings.instances
    return (inst is not None and inst.rescale and not source.out_of_core and not source.volume and not slice_wise
            and bool({"mask", "probabilities", "labels"} & set(todo)))


_SLICE_WISE_NOTICE: list[bool] = []


def _slice_wise(predict_fn: Callable, path: str, settings: Settings) -> Callable:
    """A 2-D model over (N, Z, Y, X, C) tiles of one section each (z tile 1): (N*Z, Y, X, C) through the model."""
    if settings.slice_wise is False:
        raise InputError(f"{path}: a volume, but the model is 2-D and --slice_wise 0 was given; pass --slice_wise 1 "
                         "(the 2-D model section by section) or a 3-D model")
    if not _SLICE_WISE_NOTICE:
        _SLICE_WISE_NOTICE.append(True)
        log.info("the model is 2-D: volumes are segmented section by section (--slice_wise)")

    def predict(batch_nzyxc: np.ndarray) -> np.ndarray:
        n, z = batch_nzyxc.shape[:2]
        probs = np.asarray(predict_fn(batch_nzyxc.reshape((n * z,) + batch_nzyxc.shape[2:])))
        return probs.reshape((n, z) + probs.shape[1:])

    return predict


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def confusion_from_files(pred_path: str, truth_path: str, number_classes: int,
                         mask_map: dict[int, int] | None = None, volume: bool = False,
                         mask_dataset: str | None = None) -> tuple[np.ndarray, int, set[int]]:
    """Confusion matrix of a written mask against ground truth (values remapped by ``mask_map``
    first), block by block along the first axis (rows; z sections of volumes).

    Returns (cm, pixels of the truth with a class id outside [0, number_classes), those ids).
    """
    with opened(pred_path, volume) as pred, opened(truth_path, volume, mask_dataset, role="mask") as truth:
        if truth.shape[-1] != 1:
            raise ValueError(f"{truth_path}: ground-truth mask has {truth.shape[-1]} channels; masks are single-channel")
        if tuple(truth.shape[:-1]) != tuple(pred.shape[:-1]):
            raise ValueError(f"{truth_path}: ground-truth mask is {_size(truth.shape[:-1])} but the image is "
                             f"{_size(pred.shape[:-1])}; they must match {'voxel for voxel' if volume else 'pixel for pixel'}")
        cm = np.zeros((number_classes, number_classes), np.int64)
        outside, outside_ids = 0, set()
        rows = max(1, (16 * 2**20) // max(1, int(np.prod(pred.shape[1:-1]))))
        for y in range(0, pred.shape[0], rows):
            t = np.asarray(truth[y : y + rows])[..., 0].astype(np.int64)
            if mask_map:
                valid = t >= 0  # negative ids are outside whatever the map says
                t = np.where(valid, image_io.apply_mask_map(np.where(valid, t, 0), mask_map), t)
            cm += metrics.confusion_matrix(t, np.asarray(pred[y : y + rows])[..., 0], number_classes)
            bad = (t < 0) | (t >= number_classes)
            if bad.any():
                outside += int(np.count_nonzero(bad))
                outside_ids.update(np.unique(t[bad]).tolist())
        return cm, outside, outside_ids


def _display_rgb(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 RGB for display: 3+ channels as RGB, else the first channel; 1-99.5 percentile stretch."""
    img = image_hwc[..., :3] if image_hwc.shape[2] >= 3 else image_hwc[..., :1]
    img = img.astype(np.float32)
    lo = np.percentile(img, 1, axis=(0, 1))
    hi = np.percentile(img, 99.5, axis=(0, 1))
    img = np.clip((img - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def write_overlay(image_path: str, mask_path: str, overlay_path: str, alpha: float = image_io.OVERLAY_ALPHA,
                  volume: bool = False, image_dataset: str | None = None, labels_path: str | None = None) -> None:
    """The mask (class 0 transparent) over the image, at most OVERLAY_MAX_SIDE pixels on a side; of a
    volume, its middle z section. ``labels_path``: instance labels whose object outlines are drawn on top."""
    with opened(image_path, volume, image_dataset) as image, opened(mask_path, volume) as mask:
        lead = (image.shape[0] // 2,) if volume else ()
        height, width = image.shape[len(lead) : len(lead) + 2]
        step = max(1, -(-max(height, width) // OVERLAY_MAX_SIDE))
        plane = lead + (slice(None, None, step),) * 2
        rgb = _display_rgb(np.asarray(image[plane]))
        classes = np.asarray(mask[plane])[..., 0]
        if labels_path is not None:
            with opened(labels_path, volume) as labels:
                outlined = np.asarray(labels[plane])[..., 0]
    out = image_io.tint(rgb, classes, alpha)
    if labels_path is not None:
        out = instances_out.draw_outlines(out, outlined)
    import imageio.v3 as iio

    os.makedirs(os.path.dirname(overlay_path), exist_ok=True)
    with cliutil.atomic_path(overlay_path, suffix=".png") as tmp:
        iio.imwrite(tmp, np.rint(out).astype(np.uint8))


# --- the folder -------------------------------------------------------------------------------


@dataclass
class Summary:
    segmented: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # outputs existed already
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    metrics_path: str | None = None
    instances: instances_out.InstanceResults = field(default_factory=instances_out.InstanceResults)

    def line(self) -> str:
        text = f"{len(self.segmented)} segmented, {len(self.skipped)} already done (skipped), {len(self.failed)} failed"
        if self.failed:
            text += ": " + ", ".join(name for name, _ in self.failed[:10]) + (" ..." if len(self.failed) > 10 else "")
        return text


def _write_metrics(summary: Summary, settings: Settings) -> str:
    index, count = settings.shard
    name = "metrics.csv" if count == 1 else f"metrics_shard{index}_of_{count}.csv"
    path = os.path.join(settings.output_folder, name)
    rows = [metrics.flat_row({"image": n}, metrics.scores(cm)) for n, cm in sorted(summary.confusion.items())]
    total = sum(summary.confusion.values(), np.zeros((settings.number_classes,) * 2, np.int64))
    rows.append(metrics.flat_row({"image": "ALL"}, metrics.scores(total)))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[-1]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    cliutil.atomic_write_text(path, text.getvalue())
    overall = metrics.scores(total)
    log.info("metrics over %d image(s): pixel accuracy %.4f, mean IoU %.4f, mean Dice %.4f -> %s", len(summary.confusion),
             overall["pixel_accuracy"], overall["mean_iou"], overall["mean_dice"], path)
    return path


def _process(name: str, predict: Callable[[], Callable], settings: Settings, summary: Summary,
             predicted: bool = False) -> None:
    """Predict (if needed, unless ``predicted``: block by block already), overlay, score one image; per-image
    faults go to ``summary.failed``.

    A full disk fails the image and raises :class:`DiskFull` (the folder stops; see docs/faults.md).
    """
    path = os.path.join(settings.image_folder, name)
    volume = is_volume(path, settings.meta.channels)
    paths = output_paths(name, settings)
    todo = paths.todo(settings.overwrite)
    start = time.perf_counter()
    writing = {}  # what is being written, for a full disk's message
    try:
        if predicted:
            pass
        elif {"mask", "probabilities", "labels"} & set(todo):
            writing = {k: v for k, v in todo.items() if k != "overlay"}
            detail = predict_image(path, todo, predict(), settings)
            summary.segmented.append(name)
            log.info("%s: %s, %.1f s", name, detail, time.perf_counter() - start)
        else:
            summary.skipped.append(name)
            log.debug("%s: outputs exist, skipped", name)
        if "overlay" in todo:
            writing = {"overlay": todo["overlay"]}
            write_overlay(path, paths.mask, paths.overlay, volume=volume, image_dataset=settings.image_dataset,
                          labels_path=paths.labels)
            if volume:
                log.info("%s: the overlay shows the middle z section", name)
        writing = {}
        if settings.instances is not None:
            count = instances_out.measure_image(name, path, paths.labels, volume, settings, summary.instances)
            log.debug("%s: %d object(s)", name, count)
        if settings.masks is not None:
            if name not in settings.masks:
                log.warning("%s: no ground-truth mask with this stem in the mask folder; not scored", name)
            elif settings.instances is not None:  # instance labels as ground truth
                summary.confusion[name] = instances_out.score_image(name, paths.mask, paths.labels, settings.masks[name],
                                                                    volume, settings, summary.instances)
            else:
                cm, outside, ids = confusion_from_files(paths.mask, settings.masks[name], settings.number_classes,
                                                        settings.mask_map, volume, settings.mask_dataset)
                summary.confusion[name] = cm
                if outside:
                    hint = image_io.mask_values_hint({0} | ids)  # outside ids {255}: a 0/255 mask
                    log.warning("%s: %d ground-truth pixels have class ids outside 0..%d (%s) and are not scored%s",
                                settings.masks[name], outside, settings.number_classes - 1,
                                ", ".join(map(str, sorted(ids)[:8])), f"; {hint}" if hint else "")
    except cliutil.InputError:
        raise  # the settings or the model, not this image: the folder stops
    except (image_io.ImageReadError, ValueError, RuntimeError, OSError) as exc:  # this image only
        _fail(name, path, exc, writing, settings, summary)
    finally:
        summary.seconds[name] = time.perf_counter() - start


def _process_blocks(name: str, predict: Callable[[], Callable], settings: Settings, summary: Summary) -> None:
    """This shard's blocks of one input's OME-Zarr outputs (:mod:`segkit.inference.blocks`); once they are all
    done, the overlay, objects and scores as for any image."""
    start = time.perf_counter()
    try:
        complete = blocks.process(name, predict, settings, summary)
    except cliutil.InputError:
        raise
    except blocks.BlocksMissing as exc:
        log.error("%s", exc)
        summary.failed.append((name, str(exc)))
        return
    except (image_io.ImageReadError, ValueError, RuntimeError, OSError) as exc:
        _fail(name, os.path.join(settings.image_folder, name), exc, {}, settings, summary)
        return
    finally:
        summary.seconds[name] = time.perf_counter() - start
    if complete:
        _process(name, predict, settings, summary, predicted=True)


# --- faults of one image (issue #17; docs/faults.md, "Stage 3") ----------------------------------


class DiskFull(Exception):
    """No space left while writing an image's outputs: that image failed, the folder stops."""


def _fail(name: str, path: str, exc: BaseException, writing: dict[str, str], settings: Settings,
          summary: Summary) -> None:
    """Record a failed image (its temporaries are gone already: every output is atomic) in one line;
    raise DiskFull on a full disk, since no later image could be written either."""
    if writing and cliutil.is_disk_full(exc):
        what = " and ".join(f"the {kind} {os.path.relpath(p, settings.output_folder)}" for kind, p in writing.items())
        kept = f"{len([n for n in summary.segmented if n != name])} image(s) segmented before are kept"
        message = cliutil.disk_full_message(settings.output_folder, what, _output_bytes(path, writing, settings), kept)
        summary.failed.append((name, "no space left"))
        raise DiskFull(message) from None
    cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc  # writer threads
    message = " ".join(str(cause).split()) or type(cause).__name__
    if not isinstance(cause, (image_io.ImageReadError, ValueError)):
        message = f"{type(cause).__name__}: {message}"
    log.error("%s: skipped: %s", name, message)
    log.debug("details", exc_info=True)
    summary.failed.append((name, message))


def _output_bytes(path: str, writing: dict[str, str], settings: Settings) -> float | None:
    """About how many bytes the outputs in ``writing`` take uncompressed (for a full disk's message)."""
    try:
        with opened(path) as image:
            pixels = float(np.prod(image.shape[:-1]))
    except Exception:  # the estimate must not hide the fault
        return None
    per_pixel = {"mask": image_io.dtype_for_classes(settings.number_classes).itemsize,
                 "probabilities": settings.number_classes * (1 if settings.probability_dtype == "uint8" else 4),
                 "overlay": 3, "labels": 4}
    return pixels * sum(per_pixel[kind] for kind in writing)


def _all_mismatched(summary: Summary) -> bool:
    return bool(summary.failed) and not summary.segmented and all(m.startswith(MISMATCH) for _, m in summary.failed)


def segment_folder(*, predict_fn: Callable[[np.ndarray], np.ndarray] | None = None, **kwargs: Any) -> Summary:
    """Segment this shard's images of a folder; keyword arguments as :func:`resolve_settings`.

    Per-image faults are collected in the returned summary; bad settings raise InputError
    before anything is written or TensorFlow is imported. ``predict_fn``: an already loaded
    :class:`SavedModelPredictor` of the same SavedModel (benchmarks reuse one; TTA is still
    applied per ``tta``); by default the model is loaded when the first image needs it.
    """
    settings = resolve_settings(**kwargs)
    _SLICE_WISE_NOTICE.clear()  # said once per run
    index, count = settings.shard
    if settings.blocks and not settings.finalize:
        log.info("shard %d of %d: its blocks of %d image(s) (OME-Zarr outputs split block by block)", index, count,
                 len(settings.names))
    elif count > 1:
        log.info("shard %d of %d: %d image(s)", index, count, len(settings.names))
    os.makedirs(settings.output_folder, exist_ok=True)
    cliutil.remove_stale_temporaries(settings.output_folder,
                                     *(os.path.join(settings.output_folder, sub) for sub in OUTPUT_SUBFOLDERS))
    predictor: list[Callable] = []

    def predict() -> Callable:  # load TensorFlow and the model only if some image needs them
        if not predictor:
            fn = predict_fn or SavedModelPredictor(settings.saved_model_filepath)
            predictor.append(with_tta(fn, settings.spatial_rank) if settings.tta else fn)
        return predictor[0]

    summary = Summary()
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    full: DiskFull | None = None
    # The bar is closed (its line ended) before anything propagates: an error line starts on a fresh line.
    with logging_redirect_tqdm(), tqdm(total=len(settings.names), desc="images", unit="image",
                                       mininterval=_bar_interval()) as bar:
        try:
            for name in settings.names:
                if blocks.wanted(name, settings):
                    _process_blocks(name, predict, settings, summary)
                else:
                    _process(name, predict, settings, summary)
                bar.update(1)
        except DiskFull as exc:
            full = exc
    _finish(summary, settings, full)
    return summary


def _finish(summary: Summary, settings: Settings, full: DiskFull | None) -> None:
    """metrics.csv, the summary line, and the one line that ends a folder that could not be finished."""
    if settings.masks is not None and summary.confusion:
        try:
            summary.metrics_path = _write_metrics(summary, settings)
        except OSError as exc:
            if not cliutil.is_disk_full(exc):
                raise cliutil.FaultError(f"cannot write metrics.csv in {settings.output_folder} ({exc}): the masks "
                                         "are kept; rerun the same command to score them") from None
            if full is None:
                full = DiskFull(cliutil.disk_full_message(settings.output_folder, "metrics.csv", 2e3 * len(
                    summary.confusion), "the masks are kept; rerun to score them"))
    if settings.instances is not None and full is None:
        try:
            instances_out.write_tables(summary.instances, settings, scored=bool(summary.confusion))
        except OSError as exc:
            raise cliutil.FaultError(f"cannot write objects.csv / instance_metrics.csv in {settings.output_folder} "
                                     f"({exc}): the label images are kept; rerun the same command") from None
    (log.error if summary.failed or full else log.info)("done: %s", summary.line())
    if full is not None:
        fault = cliutil.FaultError(str(full))
        fault.summary = summary  # type: ignore[attr-defined]
        raise fault
    if _all_mismatched(summary):
        raise cliutil.InputError(f"every image failed the same way: {summary.failed[0][1]}")
