"""Parallel reading of LMDB training databases with on-the-fly augmentation: :class:`ImageReader`.

The trainer only picks up ready batches; N worker processes make them.

* Databases: one or several (concatenated lazily: global index -> (database, local index)); they must
  agree on the channel count. Records and metadata follow ``lmdb_format``.
* Workers: ``spawn``-started processes (fork after TensorFlow is loaded is unsafe), each opening its own
  LMDB environments after start and running ``cv2.setNumThreads(1)``. Worker ``w`` makes the global batches
  ``g = w, w + N, w + 2N, ...``; the consumer reads them in order ``g = 0, 1, 2, ...`` (round-robin over
  the workers), so the stream is reproducible.
* Seeds: one ``seed``; batch ``g`` of shard ``s`` draws from ``reader_sampling.batch_generators(seed, s, g)``
  (two generators: record sampling and augmentation, so switching augmentation off does not change which
  records are drawn). The shuffled epoch order is a function of ``(seed, epoch)`` only, shared by every
  worker and shard. Same seed -> identical stream, for any worker count; ``start_batch=k`` starts the
  stream at batch k exactly as the uninterrupted stream has it (a resumed run).
* Sampling (train mode; ``reader_sampling``): ``shuffle`` = epochs without replacement (default; the epoch is split over the
  shards by position and over the workers by batch), ``replacement`` = uniform with replacement,
  ``balanced`` = a class uniformly among the classes present, then a record uniformly among the records
  containing it (the metadata's ``class_records``). ``database_weights`` sets the share of samples each
  database contributes (default: proportional to its size; with ``balanced``, the database is drawn first).
* Geometry for any number of spatial axes: records are 2-D (image HWC, mask HW) or volumes (ZYXC, ZYX);
  crop sizes, eval crops and the shared-memory slots have one size per spatial axis. 2-D train samples
  come from ``augment.make_sample``; volume train samples from ``augment3d.make_sample_3d`` with the
  database's ``voxel_size_zyx_um`` (plain random crops with ``augment=False``; ``reader_worker``).
* Eval mode: every record exactly once per pass, in order, whole: padded at the end of every spatial axis
  up to a multiple of ``size_factor`` (image mirrored, mask ``IGNORE_LABEL`` = -1 there, which the test
  pass does not score), no augmentation; batches group consecutive records of equal shape. With several shards,
  shard ``s`` gets batches ``s, s + shard_count, ...`` of the pass.
* Samples: see ``augment.make_sample`` (context crop, one fused warp, intensity transforms on raw values),
  then ``image_io.normalize`` with the record's source-image statistics from the metadata.
* Transfer: each worker owns a ring of batch slots in anonymous shared memory
  (``multiprocessing.RawArray``: a file in /dev/shm -- or the temp folder when /dev/shm is too small --
  unlinked at creation, so nothing can leak, not even after ``kill -9``). A slot holds float32 images and
  labels in the smallest integer type; only ``(batch id, slot, shape)`` goes through the worker's pipe.
  The consumer copies the slot out (labels widened to int32) and frees it: ~20 us per 256x256 sample,
  against ~1.8 ms for pickling the same batch through a pipe (benchmarks/bench_reader.py).
* Spawned workers do not re-run the parent's main script (see ``_main_module_hidden``).
* Faults: a worker exception reaches the consumer as :class:`ReaderWorkerError` carrying the worker's
  traceback; a worker that dies (killed, out of memory) is detected within ``POLL_SECONDS``; ``close()``
  never hangs (join with a timeout, then terminate, then kill) and ends every worker. Workers ignore
  SIGINT and SIGTERM (Ctrl-C and Slurm signal every process of the job): the training process handles
  them, and its ``with`` block / ``finally`` closes the reader.
* Queue: when the buffered batches fall below 10% of capacity the log says ``Input Queue Starvation !!!!``,
  when back above 50% ``Input Queue Starvation Over`` (once per transition; train mode only).

One consumer at a time: iterate the reader (or its dataset) from one thread.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import weakref
from typing import Iterator, Sequence

import numpy as np

import augment as augmentation
from reader_databases import ReaderDatabases, _record_shapes, _tile_tuple  # noqa: F401
from reader_sampling import RandomSampler, ShuffleOrder  # noqa: F401 (public here, as before)
from reader_worker import IGNORE_LABEL, _eval_shape, _Plan, _Producer, _slot_views, _worker_main  # noqa: F401 (benchmarks use _Producer)
from segkit import cliutil, image_io

log = logging.getLogger(__name__)

STARVATION_MESSAGE = "Input Queue Starvation !!!!"
STARVATION_OVER_MESSAGE = "Input Queue Starvation Over"
STARVATION_LOW, STARVATION_HIGH = 0.1, 0.5   # fractions of the queue capacity
DEFAULT_QUEUE_SAMPLES = 100                   # samples buffered per worker, as in the original design
MAX_RING_BYTES = 512 << 20                    # cap on one worker's shared-memory ring (unless 2 slots need more)
POLL_SECONDS = 0.25                           # how often a waiting consumer checks that the workers live
JOIN_SECONDS = 3.0                            # how long close() waits before terminating workers
MODES = ("train", "eval")
SAMPLINGS = ("shuffle", "replacement", "balanced")


class ReaderWorkerError(RuntimeError):
    """A reader worker failed or died; the message carries the worker's traceback when there is one."""


class _Closed(Exception):
    """The reader was closed while a consumer was waiting."""


# ---- Consumer side -------------------------------------------------------------------------------

class QueueWatch:
    """Logs queue starvation once per transition: below 10% full, then back above 50%.

    Silent until the queue has first been above 50% full or ``grace`` batches were consumed, so the
    start-up fill does not count as starvation.
    """

    def __init__(self, grace: int):
        self.grace = grace
        self.seen = 0
        self.armed = False
        self.starving = False

    def update(self, fill: float) -> None:
        self.seen += 1
        if not self.armed:
            self.armed = fill > STARVATION_HIGH or self.seen >= self.grace
            if not self.armed:
                return
        if not self.starving and fill < STARVATION_LOW:
            self.starving = True
            log.warning(STARVATION_MESSAGE)
        elif self.starving and fill > STARVATION_HIGH:
            self.starving = False
            log.info(STARVATION_OVER_MESSAGE)


def _shutdown(procs, stop, conns, timeout: float = JOIN_SECONDS) -> None:
    """End every worker: ask, wait up to ``timeout``, terminate, kill. Never hangs."""
    stop.set()
    procs = [p for p in procs if p.pid is not None]  # started ones
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for action in ("terminate", "kill"):
        alive = [p for p in procs if p.is_alive()]
        for proc in alive:
            getattr(proc, action)()
        for proc in alive:
            proc.join(1.0)
    for conn in conns:
        conn.close()


@contextlib.contextmanager
def _main_module_hidden():
    """Hide ``__main__``'s file and spec while spawning workers.

    A spawned child normally re-runs the parent's main script (as ``__mp_main__``) before it starts.
    The workers need nothing from it, and re-running it costs start-up time, could import TensorFlow
    in every worker, and fails for scripts without an ``if __name__ == "__main__":`` guard.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class _WorkerPool:
    """The reader's worker processes, their shared-memory rings and pipes: start, watch, close. The
    consuming side (:class:`ImageReader`) sets ``workers``, ``_plan``, ``_closed`` and ``_procs``."""

    def start(self) -> None:
        """Start the workers (iteration does this on first use; call it to warm up early)."""
        if self._closed:
            raise RuntimeError("the reader is closed")
        if self._procs:
            return
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._produced = ctx.RawArray("q", self.workers)
        self._consumed = [0] * self.workers
        self._conns, self._free, self._rings = [], [], []
        # Registered first, over the lists filled below: even an interrupted start is cleaned up.
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._stop, self._conns)
        for w in range(self.workers):
            ring = ctx.RawArray("B", self._plan.slots * self._plan.slot_bytes)
            free = ctx.Semaphore(self._plan.slots)
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"imagereader-{w}", daemon=True,
                               args=(self._plan, w, sender, free, self._stop, self._produced, ring))
            self._procs.append(proc)  # before start: close() must see it even if start is interrupted
            self._conns.append(receiver)
            self._free.append(free)
            self._rings.append(np.frombuffer(ring, np.uint8))
            with _main_module_hidden(), cliutil.interrupts_ignored():  # ignored already while it imports
                proc.start()
            sender.close()

    def close(self) -> None:
        """End every worker (waits at most a few seconds) and release the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown once
        self._rings = []

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self) -> float:
        ready = sum(self._produced[w] - self._consumed[w] for w in range(self.workers))
        return ready / (self._plan.slots * self.workers)


    def _ready(self, w: int) -> bool:
        try:
            return bool(self._conns[w].poll(0))
        except (OSError, EOFError, IndexError):
            return False  # closed or dying: _recv reports it


    def _recv(self, w: int):
        conn = self._conns[w] if not self._closed else None
        try:
            while conn is not None and not conn.poll(POLL_SECONDS):
                if self._closed:
                    break
                self._check_workers()
            if self._closed:
                raise _Closed
            return conn.recv()
        except (EOFError, OSError):
            if self._closed:
                raise _Closed from None
            self._procs[w].join(POLL_SECONDS)  # it is exiting: report how
            self._check_workers()
            self._fail(f"reader worker {w} (pid {self._procs[w].pid}) closed its pipe unexpectedly")


    def _check_workers(self) -> None:
        for w, proc in enumerate(self._procs):
            if proc.exitcode is None:
                continue
            try:
                while self._conns[w].poll(0):
                    message = self._conns[w].recv()
                    if message[0] == "error":
                        self._fail(f"reader worker {w} (pid {proc.pid}) failed:\n{message[2]}")
            except (EOFError, OSError):
                pass
            how = (f"was killed by signal {signal.Signals(-proc.exitcode).name}" if proc.exitcode < 0
                   else f"exited with code {proc.exitcode}")
            self._fail(f"reader worker {w} (pid {proc.pid}) {how} (out of memory?); the input stream cannot continue")


    def _fail(self, message: str):
        self.close()
        raise ReaderWorkerError(message)


class ImageReader(_WorkerPool):
    """Batches (images float32 normalized, (n, *spatial, C); masks int32 class ids, (n, *spatial)) from LMDB databases.

    Args:
        databases: one path or several (concatenated; they must have the same channel count).
        batch_size: samples per batch (train: every batch is full; eval: the last of a shape group may be shorter).
        mode: ``"train"`` (endless augmented stream of crops) or ``"eval"`` (one in-order pass per iteration).
        workers: worker processes.
        sampling: ``"shuffle"`` | ``"replacement"`` | ``"balanced"`` (train mode).
        database_weights: share of the samples each database contributes (train mode; default by size).
        augment: apply ``augment.py``'s augmentation (train mode; off = plain random crops).
        crop_size: train crop (int, or one size per spatial axis: (h, w) or (z, y, x)), multiples of
            ``size_factor``. Default: the databases' tile
            size, else the smallest record, rounded down to the size factor.
        size_factor: the model's size factor, one number or one per spatial axis (a volume model pools z
            less than y and x on anisotropic voxels); eval records are padded up to a multiple of it on each
            axis (the padding's labels are ``IGNORE_LABEL``).
        seed: the one seed of the stream; shard_index / shard_count: this process's share (multi-host).
        queue_size: samples buffered per worker (default 100, at most 512 MB of shared memory per worker,
            at least 2 batches).

    Raises ValueError with a user-facing message for a bad or missing database or bad arguments.
    """

    def __init__(self, databases: str | Sequence[str], *, batch_size: int, mode: str = "train", workers: int = 1,
                 sampling: str = "shuffle", database_weights: Sequence[float] | None = None, augment: bool = True,
                 crop_size: int | tuple[int, int] | None = None, size_factor: int | Sequence[int] = 1, seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1, queue_size: int | None = None, start_batch: int = 0):
        self._closed = True  # until fully constructed: close() is a no-op
        self._procs: list = []
        paths = (databases,) if isinstance(databases, (str, os.PathLike)) else tuple(databases)
        _check_arguments(paths, batch_size, mode, workers, sampling, database_weights, size_factor,
                         shard_index, shard_count, queue_size)
        self._db = ReaderDatabases(os.fspath(p) for p in paths)
        self._paths, self._metadata = self._db.paths, self._db.metadata
        self._db.check(sampling if mode == "train" else None)
        self.mode, self.batch_size, self.workers = mode, int(batch_size), int(workers)
        self.size_factor = int(size_factor) if np.isscalar(size_factor) else tuple(int(f) for f in size_factor)
        eval_shapes = eval_batches = None
        if mode == "eval":
            eval_shapes = np.array([_eval_shape(shape, size_factor) for shape in self._db.all_record_shapes()], np.int64)
            eval_batches = _eval_batches(eval_shapes, batch_size)[shard_index::shard_count]
            if len(eval_batches) == 0:
                raise ValueError(f"shard {shard_index} of {shard_count} gets no evaluation batch: "
                                 f"there are fewer batches than shards; use fewer shards or a smaller batch size")
            shapes = {tuple(int(v) for v in shape) for shape in eval_shapes}
            self._crop_shape = shapes.pop() if len(shapes) == 1 else None
        else:
            self._crop_shape = self._db.resolve_crop(crop_size, size_factor)
        self._plan = _make_plan(self._db, mode=mode, sampling=sampling, batch_size=self.batch_size, workers=self.workers,
                                seed=seed, shard_index=shard_index, shard_count=shard_count, crop_shape=self._crop_shape,
                                augment=augment, database_weights=database_weights, eval_batches=eval_batches,
                                eval_shapes=eval_shapes, queue_size=queue_size, start_batch=start_batch)
        slots = self._plan.slots
        self._next_g = self._plan.start_batch
        # Delivered batches, and those whose worker had none ready when asked (the ring was empty).
        self.batches_delivered = self.batches_starved = 0
        self._closed = False
        self._watch = QueueWatch(grace=2 * slots * self.workers)
        self._finalizer = None

    # ---- validation and properties -----------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self._db.channels

    @property
    def number_classes(self) -> int:
        return self._db.number_classes

    @property
    def num_records(self) -> int:
        return self._db.num_records

    @property
    def crop_shape(self) -> tuple[int, ...] | None:
        """The batches' spatial shape (train crop; eval: None when records differ), one size per axis."""
        return self._crop_shape

    @property
    def crop_hw(self) -> tuple[int, ...] | None:
        """:attr:`crop_shape` under its 2-D name."""
        return self._crop_shape

    @property
    def image_dtype(self) -> str:
        """The databases' stored pixel type (numpy's promotion when they differ)."""
        return self._db.image_dtype

    @property
    def class_pixel_counts(self) -> dict[int, int]:
        return self._db.class_pixel_counts

    @property
    def metadata(self) -> list[dict]:
        return list(self._metadata)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def batches_per_pass(self) -> int | None:
        """Eval mode: batches in one pass of this shard."""
        return None if self._plan.eval_batches is None else len(self._plan.eval_batches)

    # ---- consuming -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Train: endless full batches. Eval: one pass (a new pass on every iteration)."""
        self.start()
        if self.mode == "eval":
            per_pass = len(self._plan.eval_batches)
            first = -(-self._next_g // per_pass) * per_pass  # an abandoned pass is skipped, not resumed
            batch_ids: Iterator[int] = iter(range(first, first + per_pass))
        else:
            batch_ids = itertools.count(self._next_g)
        try:
            for g in batch_ids:
                batch = self._receive(g)
                self._next_g = g + 1
                if self.mode == "train":
                    self._watch.update(self._fill())
                yield batch
        except _Closed:
            return
        except KeyboardInterrupt:
            self.close()
            raise

    def _receive(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        w = g % self.workers
        ready = self._ready(w)
        while True:
            message = self._recv(w)
            if message[0] == "error":
                self._fail(f"reader worker {w} (pid {self._procs[w].pid}) failed:\n{message[2]}")
            _, mg, slot, n, shape = message
            rings = self._rings  # close() from another thread empties the list; this reference stays valid
            if self._closed or not rings:
                raise _Closed
            if mg == g:
                images, masks = _slot_views(rings[w], slot, self._plan, n, shape)
                batch = np.array(images), masks.astype(np.int32)
            self._consumed[w] += 1
            self._free[w].release()
            if mg == g:
                self.batches_delivered += 1
                self.batches_starved += not ready
                return batch
            # mg < g: a batch of an abandoned eval pass; skip it

    def dataset(self):
        """A ``tf.data.Dataset`` of the same batches as iteration (eval: one pass per dataset iteration)."""
        import tensorflow as tf

        n = self.batch_size if self.mode == "train" else None
        spatial = list(self._crop_shape) if self._crop_shape is not None else [None] * self._plan.eval_shapes.shape[1]
        signature = (tf.TensorSpec([n, *spatial, self.channels], tf.float32), tf.TensorSpec([n, *spatial], tf.int32))
        return tf.data.Dataset.from_generator(self.__iter__, output_signature=signature)



def _eval_batches(eval_shapes: np.ndarray, batch_size: int) -> np.ndarray:
    """[start, stop) of each eval batch: consecutive records of equal shape, at most batch_size each."""
    batches = []
    start = 0
    for i in range(1, len(eval_shapes) + 1):
        if i == len(eval_shapes) or i - start == batch_size or tuple(eval_shapes[i]) != tuple(eval_shapes[start]):
            batches.append((start, i))
            start = i
    return np.array(batches, np.int64).reshape(-1, 2)


def _source_stats(meta: dict, path: str) -> tuple[np.ndarray, np.ndarray]:
    sources = meta.get("sources") or []
    try:
        means = np.array([s["mean"] for s in sources], np.float32).reshape(len(sources), meta["channels"])
        stds = np.array([s["std"] for s in sources], np.float32).reshape(len(sources), meta["channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the metadata lacks per-channel mean/std for its source images ({exc}); "
                         "rebuild the database with build_lmdb.py") from None
    return means, stds


def _check_arguments(paths, batch_size, mode, workers, sampling, weights, size_factor, shard_index, shard_count,
                     queue_size) -> None:
    if not paths:
        raise ValueError("no database given")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    factors = [size_factor] if np.isscalar(size_factor) else list(size_factor)
    for name, value in (("batch_size", batch_size), ("workers", workers), ("shard_count", shard_count),
                        *(("size_factor", f) for f in factors)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if queue_size is not None and queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(paths) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"database_weights must be {len(paths)} non-negative numbers (one per database) "
                             f"with a positive sum, got {weights}")


def _make_plan(db: ReaderDatabases, *, mode, sampling, batch_size, workers, seed, shard_index, shard_count, crop_shape,
               augment, database_weights, eval_batches, eval_shapes, queue_size, start_batch) -> _Plan:
    """What every worker needs to know (picklable): databases, sampling, crop, augmentation, ring sizes."""
    paths, metadata = db.paths, db.metadata
    sizes = tuple(int(m["num_records"]) for m in metadata)
    volume_augment = augment and mode == "train" and len(crop_shape) == 3
    spacings = db.voxel_sizes() if volume_augment else None
    params_3d = None
    if volume_augment:
        import augment3d  # only for volumes: its imports (scipy) cost a second

        params_3d = augment3d.AugmentParams3D()
    mask_dtype = image_io.dtype_for_classes(max(db.number_classes, max(
        (max(m["classes_seen"], default=0) + 1 for m in metadata), default=1)))
    if mode == "eval":  # signed: the padding to the size factor is IGNORE_LABEL (-1)
        mask_dtype = np.dtype(np.int32)
    max_pixels = int(eval_shapes.prod(axis=1).max()) if mode == "eval" else math.prod(crop_shape)
    slot_bytes = -(-batch_size * max_pixels * (4 * db.channels + mask_dtype.itemsize) // 64) * 64
    wanted = DEFAULT_QUEUE_SAMPLES if queue_size is None else queue_size
    slots = max(2, min(math.ceil(wanted / batch_size), MAX_RING_BYTES // slot_bytes))
    return _Plan(
        paths=paths, sizes=sizes, mode=mode, sampling=sampling, batch_size=batch_size,
        workers=workers, seed=int(seed), shard_index=int(shard_index), shard_count=int(shard_count),
        crop_shape=crop_shape if mode == "train" else None,
        params=augmentation.AugmentParams() if (augment and mode == "train") else None,
        params_3d=params_3d, spacings_zyx_um=spacings,
        weights=None if database_weights is None else tuple(float(w) for w in database_weights),
        class_records=tuple(m["class_records"] for m in metadata) if sampling == "balanced" else None,
        eval_batches=eval_batches, eval_shapes=eval_shapes,
        stats=tuple(_source_stats(m, p) for m, p in zip(metadata, paths)),
        channels=db.channels, mask_dtype=mask_dtype.name, slots=int(slots), slot_bytes=int(slot_bytes),
        start_batch=int(start_batch) if mode == "train" else 0)
