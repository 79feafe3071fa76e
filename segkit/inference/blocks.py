"""One input split across processes, block by block, restartable (issue #21).

A block is one zone of the input's tile plan (:func:`segkit.tiling.plan_tiles`): exactly one chunk of every
OME-Zarr output (:func:`segkit.inference.writers.create_zarr_level` chunks by the zone size). Block ``b`` (raster
order) of ``B`` belongs to shard ``b * N // B``: contiguous runs, so a shard's blocks are mostly each other's
neighbours and it can label their objects itself (:mod:`segkit.inference.block_labels`). The outputs are created
once with their full shape (a temporary folder renamed into place: whichever shard comes first); each block is
written into a temporary array and its chunk files are renamed into place, then marked done
(``MASK.zarr/.blocks/Z.Y.X.done``); the closing step (``--finalize 1``, or the last shard to finish) checks every
block, writes the multiscale levels and merges the instance labels. Layout, launchers and restarts: README.md,
"One volume across a cluster".
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from segkit import cliutil, image_io, tiling
from segkit.cliutil import InputError
from segkit.inference import block_labels, writers
from segkit.inference.regions import Source, open_source
from segkit.inference.settings import OutputPaths, Settings, output_paths

log = logging.getLogger("inference_unet.blocks")

BLOCKS_FOLDER = ".blocks"  # in the mask's OME-Zarr: plan.json, one BLOCK.done per finished block, finalized
PLAN_FILE, FINAL_FILE = "plan.json", "finalized"
PROBS_ARRAY = "probs"      # --instances: float32 (spatial..., K) probabilities, labelled by the closing step
ZARR_META = (".zarray", ".zattrs", ".zgroup")
WRITE_QUEUE_BLOCKS = 2    # blocks predicted and waiting for the writer thread
PLAN_KEYS = ("shape", "tile", "halo", "border", "saved_model", "outputs")  # what every shard of an output agrees on


class BlocksMissing(Exception):
    """The closing step found blocks not done yet; the message names them and their shards in one line."""


# --- which outputs are split, and their state ---------------------------------------------------------------


def wanted(name: str, settings: Settings) -> bool:
    """Whether ``name`` is processed block by block: shards of an OME-Zarr run, ``--finalize 1``, or a plain run
    that meets an output split into blocks and not finished (it then does the remaining blocks itself)."""
    if settings.output_format != "zarr":
        return False
    return settings.blocks or (not settings.overwrite and unfinished(output_paths(name, settings).mask))


def unfinished(mask_path: str) -> bool:
    return (os.path.isdir(os.path.join(mask_path, BLOCKS_FOLDER))
            and not os.path.exists(os.path.join(mask_path, BLOCKS_FOLDER, FINAL_FILE)))


def block_id(zone: tiling.Zone) -> str:
    return ".".join(map(str, zone.index))


@dataclass
class Job:
    """One input's block work: its outputs, tile plan and normalization (the same in every shard)."""

    name: str
    paths: OutputPaths
    plan: tiling.TilePlan
    record: dict[str, Any]  # plan.json: geometry, statistics, the shard count it was planned for
    calibration: Any

    @property
    def blocks_dir(self) -> str:
        return os.path.join(self.paths.mask, BLOCKS_FOLDER)

    def marker(self, zone: tiling.Zone) -> str:
        return os.path.join(self.blocks_dir, block_id(zone) + ".done")

    def missing(self) -> list[tuple[int, tiling.Zone]]:
        """(number, zone) of the blocks without a done-marker (one listing of the folder, not a stat per block)."""
        done = {entry.name for entry in os.scandir(self.blocks_dir) if entry.name.endswith(".done")}
        return [(b, zone) for b, zone in enumerate(self.plan.zones) if block_id(zone) + ".done" not in done]


# --- one input, one shard ------------------------------------------------------------------------------------


def process(name: str, predict: Callable[[], Callable], settings: Settings, summary: Any) -> bool:
    """This shard's blocks of ``name`` (or, with ``--finalize 1``, the closing step); True when the outputs are
    complete (closed here or before), so scores and tables can be made from them. Raises BlocksMissing."""
    path = os.path.join(settings.image_folder, name)
    paths = output_paths(name, settings)
    index, count = settings.shard
    if os.path.isdir(paths.mask) and not unfinished(paths.mask):
        summary.skipped.append(name)  # closed before; the closing step still scores it
        return settings.finalize
    if settings.finalize and not os.path.isdir(paths.mask):
        raise BlocksMissing(f"{paths.mask}: no block was written yet; run the shards first, then --finalize 1")
    start = time.perf_counter()
    source = open_source(path, settings)
    try:
        job = prepare(name, paths, source, settings)
        _remove_stale(job)
        if settings.finalize:
            closed = _close(job, settings, explicit=True)
            summary.segmented.append(name)
            return closed
        owned = [zone for b, zone in enumerate(job.plan.zones) if owner(b, len(job.plan.zones), count) == index]
        mine = [zone for zone in owned if not os.path.exists(job.marker(zone))]
        if mine:
            predict_blocks(job, source.image, mine, _model(predict, path, settings, job), _block_writers(job, settings),
                           settings.batch_size)
    finally:
        source.close()
    if settings.instances is not None:
        block_labels.label_ready(job, owned, settings)
    summary.segmented.append(name)
    done = len(job.plan.zones) - len(job.missing())
    log.info("%s: shard %d of %d: %d block(s) computed, %d of %d done, %.1f s", name, index, count, len(mine), done,
             len(job.plan.zones), time.perf_counter() - start)
    return _close(job, settings, explicit=False)


def owner(block: int, blocks: int, shard_count: int) -> int:
    """The shard of block number ``block`` (raster order) of ``blocks``: contiguous runs of nearly equal length."""
    return block * shard_count // blocks


def _model(predict: Callable[[], Callable], path: str, settings: Settings, job: Job) -> Callable:
    predict_fn = predict()
    if len(job.plan.shape) > settings.spatial_rank:  # a 2-D model section by section
        from segkit.inference.folder import _slice_wise

        predict_fn = _slice_wise(predict_fn, path, settings)
    return predict_fn


def predict_blocks(job: Job, image: Any, zones: list[tiling.Zone], predict_fn: Callable,
                   write: Callable[[tiling.Zone, np.ndarray], None], batch_size: int = 1) -> None:
    """Predict ``zones`` (each from its own tile, as :func:`segkit.tiling.predict_tiled` does) and ``write`` each
    zone's float32 probabilities; zones another process finished meanwhile are skipped. Tiles are read ahead and
    blocks written in background threads, so the model rarely waits for the disk."""
    mean, std = job.record["mean"], job.record["std"]

    def batches():
        for first in range(0, len(zones), batch_size):
            group = [zone for zone in zones[first : first + batch_size] if not os.path.exists(job.marker(zone))]
            if group:
                yield group, np.stack([np.asarray(image_io.normalize(tiling.read_tile(image, job.plan, zone), mean,
                                                                     std), np.float32) for zone in group])

    pending: list[concurrent.futures.Future] = []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="block-writer") as pool:
        try:
            for group, batch in tiling.prefetched(batches(), 2, "block-prefetch"):
                probs = np.asarray(predict_fn(batch))
                for zone, tile_probs in zip(group, probs):
                    pending.append(pool.submit(write, zone, np.array(tile_probs[zone.crop()], np.float32)))
                while len(pending) > WRITE_QUEUE_BLOCKS or (pending and pending[0].done()):
                    pending.pop(0).result()  # re-raises a failed write here
            for future in pending:
                future.result()
        except BaseException:
            for future in pending:  # blocks not started stay undone; the one being written finishes
                future.cancel()
            raise


def _block_writers(job: Job, settings: Settings) -> Callable[[tiling.Zone, np.ndarray], None]:
    """``write(zone, probs)``: the zone's chunk of every output, atomically, then its done-marker."""
    encode_mask, _ = writers.encoder("mask", settings.number_classes)
    arrays = [(os.path.join(job.paths.mask, "0"), lambda zone, p: (zone.region(), encode_mask(p)))]
    if job.paths.probabilities:
        encode_probs, _ = writers.encoder("probabilities", settings.number_classes, settings.probability_dtype)
        arrays.append((os.path.join(job.paths.probabilities, "0"),
                       lambda zone, p: ((slice(None),) + zone.region(), np.moveaxis(encode_probs(p), -1, 0))))
    if settings.instances is not None:
        arrays.append((os.path.join(job.blocks_dir, PROBS_ARRAY), lambda zone, p: (zone.region(), p)))

    def write(zone: tiling.Zone, probs: np.ndarray) -> None:
        for array_dir, place in arrays:
            put_chunks(array_dir, *place(zone, probs))
        cliutil.atomic_write_text(job.marker(zone), json.dumps({"block": block_id(zone), "by": cliutil.owner_tag()}))

    return write


def put_chunks(array_dir: str, key: tuple[slice, ...], data: np.ndarray) -> None:
    """``array[key] = data`` for the zarr (format 2) array in ``array_dir``, chunk-aligned, with no half-written
    chunk ever visible: written into a temporary array of the same metadata beside the chunks, each chunk file
    then fsynced and renamed into place (whoever writes a block writes the same bytes)."""
    import zarr

    tmp = cliutil.make_temp(os.path.join(array_dir, "block"), directory=True)
    try:
        shutil.copyfile(os.path.join(array_dir, ".zarray"), os.path.join(tmp, ".zarray"))
        zarr.open_array(tmp, mode="r+", zarr_format=2)[key] = data
        for folder, _, files in os.walk(tmp):
            for file in files:
                if folder == tmp and file in ZARR_META:
                    continue
                source = os.path.join(folder, file)
                target = os.path.join(array_dir, os.path.relpath(source, tmp))
                cliutil.fsync_path(source)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(job: Job) -> None:
    """Temporaries of killed shards (this machine): half-built blocks and markers."""
    folders = [job.blocks_dir, os.path.join(job.paths.mask, "0")]
    folders += [os.path.join(job.blocks_dir, name) for name in (PROBS_ARRAY, block_labels.IDS_ARRAY)]
    if job.paths.probabilities:
        folders.append(os.path.join(job.paths.probabilities, "0"))
    cliutil.remove_stale_temporaries(*folders)


# --- the outputs, created once ----------------------------------------------------------------------------------


def prepare(name: str, paths: OutputPaths, source: Source, settings: Settings) -> Job:
    """The tile plan of ``name`` and its outputs: created (full shape, chunks, metadata) by the first shard to
    get here, opened and checked by the others. InputError when an existing output does not match."""
    spatial = tuple(int(n) for n in source.image.shape[:-1])
    tile, halo, factor = settings.geometry(len(spatial))
    plan = tiling.plan_tiles(spatial, tile, halo, factor, settings.border)
    record = {"image": name, "shape": list(spatial), "tile": list(plan.zone_size), "halo": list(plan.halo),
              "border": plan.border, "saved_model": os.path.abspath(settings.saved_model_filepath),
              "outputs": {"probabilities": settings.probability_dtype if paths.probabilities else None,
                          "instances": settings.instances is not None},
              "blocks": len(plan.zones), "shard_count": settings.shard[1]}
    job = Job(name, paths, plan, record, source.calibration)
    plan_path = os.path.join(job.blocks_dir, PLAN_FILE)
    if not os.path.isdir(paths.mask):
        with _locked(os.path.dirname(os.path.abspath(paths.mask))):  # one statistics pass, not one per shard
            if not os.path.isdir(paths.mask):
                mean, std = image_io.image_stats(source.image, **source.stats_blocks)
                if not np.all(np.isfinite(np.asarray(mean) + np.asarray(std))):
                    raise ValueError(f"{name}: image contains NaN or infinite pixels; replace them first")
                record.update(mean=[float(m) for m in mean], std=[float(s) for s in std])
                _create_once(paths.mask, lambda tmp: _build_mask(tmp, job, settings))
    with open(plan_path, encoding="utf-8") as fh:
        existing = json.load(fh)
    changed = [k for k in PLAN_KEYS if existing.get(k) != record[k]]
    if changed:
        raise InputError(f"{paths.mask}: started with a different {', '.join(changed)} ("
                         f"{', '.join(f'{k} {existing.get(k)}' for k in changed)}); run every shard with the same "
                         "flags, or remove it and start again")
    job.record = existing
    _check_array(os.path.join(paths.mask, "0"), _shape(spatial, None), _chunks(plan, None),
                 writers.encoder("mask", settings.number_classes)[1])
    if paths.probabilities:
        classes, dtype = settings.number_classes, writers.encoder("probabilities", settings.number_classes,
                                                                  settings.probability_dtype)[1]
        os.makedirs(os.path.dirname(paths.probabilities), exist_ok=True)
        _create_once(paths.probabilities, lambda tmp: _build_level(tmp, job, classes, dtype))
        _check_array(os.path.join(paths.probabilities, "0"), _shape(spatial, classes), _chunks(plan, classes), dtype)
    return job


def _shape(spatial: tuple[int, ...], classes: int | None) -> tuple[int, ...]:
    return ((classes,) if classes else ()) + tuple(spatial)


def _chunks(plan: tiling.TilePlan, classes: int | None) -> tuple[int, ...]:
    return ((classes,) if classes else ()) + tuple(min(t, n) for t, n in zip(plan.zone_size, plan.shape))


def _create_once(path: str, build: Callable[[str], None]) -> bool:
    """Create the folder ``path`` by ``build(tmp)`` in a temporary folder renamed into place; False when another
    process was first (its folder is kept, ours removed)."""
    if os.path.isdir(path):
        return False
    tmp = cliutil.make_temp(path, directory=True)
    try:
        build(tmp)
        os.rename(tmp, path)  # fails on the winner's (non-empty) folder: never replaces it
        return True
    except OSError:
        if os.path.isdir(path):
            return False
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_level(folder: str, job: Job, classes: int | None, dtype: np.dtype) -> None:
    """An OME-Zarr of level 0 only (the closing step adds the other levels), every chunk still missing."""
    import zarr

    group = zarr.open_group(folder, mode="w", zarr_format=2)
    writers.create_zarr_level(group, "0", job.plan.shape, classes, dtype, job.plan.zone_size)
    group.attrs["multiscales"] = [writers.multiscales_entry(os.path.basename(job.name), len(job.plan.shape),
                                                            bool(classes), 1, job.calibration)]


def _build_mask(folder: str, job: Job, settings: Settings) -> None:
    import zarr

    _build_level(folder, job, None, writers.encoder("mask", settings.number_classes)[1])
    blocks = os.path.join(folder, BLOCKS_FOLDER)
    os.makedirs(blocks)
    with open(os.path.join(blocks, PLAN_FILE), "w", encoding="utf-8") as fh:
        json.dump(job.record, fh, indent=1)
    if settings.instances is not None:
        chunks = _chunks(job.plan, None) + (settings.number_classes,)
        zarr.create_array(os.path.join(blocks, PROBS_ARRAY), shape=job.plan.shape + (settings.number_classes,),
                          chunks=chunks, dtype=np.float32, fill_value=0, zarr_format=2, compressors=None,
                          chunk_key_encoding={"name": "v2", "separator": "/"})
        block_labels.create_ids_array(blocks, job.plan)


def _check_array(array_dir: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype) -> None:
    try:
        with open(os.path.join(array_dir, ".zarray"), encoding="utf-8") as fh:
            meta = json.load(fh)
        found = (tuple(meta["shape"]), tuple(meta["chunks"]), np.dtype(meta["dtype"]))
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found != (tuple(shape), tuple(chunks), np.dtype(dtype)):
        what = "is not a zarr array" if found is None else \
            f"has shape {found[0]}, chunks {found[1]}, {found[2]}"
        raise InputError(f"{os.path.dirname(array_dir)}: the existing output {what}, but this run writes shape "
                         f"{tuple(shape)}, chunks {tuple(chunks)}, {np.dtype(dtype)}; remove it (or choose another "
                         "--output_folder) and run every shard again")


# --- the closing step -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(folder: str):
    """An exclusive flock on ``folder`` itself (blocking; no lock file): one creator of an output, one closing step
    at a time. Where flock is unsupported the step runs unlocked: it is idempotent (atomic writes, same bytes)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _close(job: Job, settings: Settings, explicit: bool) -> bool:
    """The closing step when every block is done (True); else False, or with ``explicit`` BlocksMissing."""
    with _locked(job.blocks_dir):
        if os.path.exists(os.path.join(job.blocks_dir, FINAL_FILE)):
            return True
        missing = job.missing()
        if missing:
            if explicit:
                raise BlocksMissing(missing_message(job, missing))
            return False
        start = time.perf_counter()
        levels = _pyramid(job.paths.mask, job, False)
        if job.paths.probabilities:
            _pyramid(job.paths.probabilities, job, True)
        if settings.instances is not None:
            _labels(job, settings)
        cliutil.atomic_write_text(os.path.join(job.blocks_dir, FINAL_FILE),
                                  json.dumps({"by": cliutil.owner_tag(), "levels": levels}))
    log.info("%s: all %d block(s) done; %d level(s)%s written, %.1f s", job.name, len(job.plan.zones), levels,
             " and instance labels" if settings.instances is not None else "", time.perf_counter() - start)
    return True


def missing_message(job: Job, missing: list[tuple[int, tiling.Zone]]) -> str:
    count, blocks = int(job.record.get("shard_count", 1)), len(job.plan.zones)
    listed = ", ".join(f"{block_id(zone)} (shard {owner(b, blocks, count)})" for b, zone in missing[:8])
    shards = sorted({owner(b, blocks, count) for b, _ in missing})
    return (f"{job.paths.mask}: {len(missing)} of {len(job.plan.zones)} block(s) not done: {listed}"
            f"{' ...' if len(missing) > 8 else ''}; rerun shard(s) {', '.join(map(str, shards[:16]))} of "
            f"--shard_count {count} (finished blocks are skipped), then --finalize 1")


def _pyramid(path: str, job: Job, channels: bool) -> int:
    """Levels 1.. and the multiscales metadata, once every block of level 0 is in (not block-parallel)."""
    import zarr

    group = zarr.open_group(path, mode="r+", zarr_format=2)
    return writers.finish_pyramid(group, group["0"], len(job.plan.shape), channels, job.plan.zone_size,
                                  os.path.basename(job.name), job.calibration)


def _labels(job: Job, settings: Settings) -> None:
    """Instance labels merged across every block border (:mod:`segkit.inference.block_labels`); then the blocks'
    probabilities are removed (a closing step run again after that finds the labels written)."""
    probs_dir = os.path.join(job.blocks_dir, PROBS_ARRAY)
    if os.path.isdir(probs_dir):
        block_labels.write_labels(job, settings)
        shutil.rmtree(probs_dir, ignore_errors=True)  # first: the labels are written (ids and seams still needed before)
    block_labels.remove_intermediates(job)
