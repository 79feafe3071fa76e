"""An ImageReader worker process: makes batches into its shared-memory ring (see imagereader.py).

One home for a sample's geometry for any number of spatial axes (records HWC / HW or ZYXC / ZYX): the
train crop (2-D through ``augment.make_sample``, volumes through ``augment3d.make_sample_3d`` with the
database's voxel size, or :func:`_random_crop` without augmentation), the eval record padded up to the size
factor (:func:`_eval_sample`: mirrored image, padding labelled :data:`IGNORE_LABEL`), and the shapes of a ring slot.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

import augment as augmentation
from reader_sampling import RandomSampler, ShuffleOrder, batch_generators
from segkit import cliutil, image_io, lmdb_format, tiling

if TYPE_CHECKING:
    import augment3d

IGNORE_LABEL = -1  # eval masks (int32): pixels added to reach the size factor; the test pass never scores them


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs; pickled once at spawn."""

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mode: str
    sampling: str
    batch_size: int
    workers: int
    seed: int
    shard_index: int
    shard_count: int
    crop_shape: tuple[int, ...] | None          # train crop, one size per spatial axis
    params: augmentation.AugmentParams | None   # None: no augmentation
    weights: tuple[float, ...] | None
    class_records: tuple[dict, ...] | None
    eval_batches: np.ndarray | None        # (batches, 2) global [start, stop) per eval batch of this shard
    eval_shapes: np.ndarray | None         # (records, spatial axes) eval shape of every record
    stats: tuple[tuple[np.ndarray, np.ndarray], ...]  # per database: (mean, std) arrays (sources, C)
    channels: int
    mask_dtype: str
    slots: int
    slot_bytes: int
    params_3d: augment3d.AugmentParams3D | None = None  # volumes; None: plain random crops
    spacings_zyx_um: tuple | None = None                 # per database, the voxel size (volumes)
    start_batch: int = 0                   # train: the first batch index (a resumed run's step)


def _slot_views(ring: np.ndarray, slot: int, plan: _Plan, n: int,
                shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The image (n, *shape, C) float32 and label (n, *shape) arrays stored in one slot of a ring."""
    base = slot * plan.slot_bytes
    shape = tuple(int(v) for v in shape)
    pixels = n * math.prod(shape)
    images = np.frombuffer(ring, np.float32, pixels * plan.channels, base).reshape((n,) + shape + (plan.channels,))
    masks = np.frombuffer(ring, plan.mask_dtype, pixels, base + pixels * plan.channels * 4).reshape((n,) + shape)
    return images, masks


class _Producer:
    """Makes batch ``g`` into a ring slot, inside a worker process."""

    def __init__(self, plan: _Plan, worker: int, ring):
        import cv2

        cv2.setNumThreads(1)  # the workers are the parallelism; OpenCV threads would oversubscribe
        self.augment3d = None
        if plan.params_3d is not None:  # imported only here: it costs 2-D workers a second of start-up
            import augment3d

            augment3d.tune_allocator()  # 3D samples reuse freed heap instead of page-faulting fresh memory
            self.augment3d = augment3d
        self.plan = plan
        self.ring = ring
        self.offsets = np.concatenate([[0], np.cumsum(plan.sizes)])
        self.envs = [lmdb_format.open_readonly(p) for p in plan.paths]
        self.txns = [env.begin(buffers=True) for env in self.envs]
        self.order = self.sampler = None
        if plan.mode == "train" and plan.sampling == "shuffle":
            self.order = ShuffleOrder(plan.sizes, plan.seed, plan.weights)
        elif plan.mode == "train":
            balanced = plan.class_records if plan.sampling == "balanced" else None
            self.sampler = RandomSampler(plan.sizes, balanced, plan.weights)

    def close(self) -> None:
        for txn in self.txns:
            txn.abort()
        for env in self.envs:
            env.close()

    def database(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def record(self, index: int) -> tuple[lmdb_format.Record, np.ndarray, np.ndarray]:
        db = self.database(index)
        local = int(index - self.offsets[db])
        value = self.txns[db].get(lmdb_format.record_key(local))
        if value is None:
            raise ValueError(f"{self.plan.paths[db]}: record {local} is missing; rebuild the database with build_lmdb.py")
        try:
            record = lmdb_format.decode_record(value)
        except ValueError as exc:
            raise ValueError(f"{self.plan.paths[db]}: record {local}: {exc}") from exc
        means, stds = self.plan.stats[db]
        return record, means[record.source_index], stds[record.source_index]

    def train_indices(self, g: int, sample_rng: np.random.Generator) -> np.ndarray:
        b = self.plan.batch_size
        if self.order is not None:
            stream = np.arange(g * b, (g + 1) * b, dtype=np.int64)
            return self.order.take(stream * self.plan.shard_count + self.plan.shard_index)
        return self.sampler.draw(sample_rng, b)

    def fill(self, slot: int, g: int) -> tuple[int, tuple[int, ...]]:
        """Write batch ``g`` into ``slot``; returns its sample count and spatial shape."""
        plan = self.plan
        if plan.mode == "train":
            sample_rng, augment_rng = batch_generators(plan.seed, plan.shard_index, g)
            indices = self.train_indices(g, sample_rng)
            shape = plan.crop_shape
        else:
            start, stop = plan.eval_batches[g % len(plan.eval_batches)]
            indices = np.arange(start, stop)
            shape = tuple(int(v) for v in plan.eval_shapes[start])
        images, masks = _slot_views(self.ring, slot, plan, len(indices), shape)
        for i, index in enumerate(indices):
            record, mean, std = self.record(int(index))
            if plan.mode == "eval":
                image, mask = _eval_sample(record.image_hwc, record.mask_hw, shape)
            elif len(shape) == 2:  # augment.py's 2-D pipeline, exactly as before volumes existed
                params = plan.params or augmentation.AugmentParams.none()
                image, mask = augmentation.make_sample(record.image_hwc, record.mask_hw, augment_rng, shape, params)
            elif plan.params_3d is not None:  # context read around the crop; mirror only past the record
                spacing = plan.spacings_zyx_um[self.database(int(index))]
                image, mask = self.augment3d.make_sample_3d(record.image_hwc, record.mask_hw, augment_rng,
                                                            shape, spacing, plan.params_3d)
            else:
                image, mask = _random_crop(record.image_hwc, record.mask_hw, augment_rng, shape)
            images[i] = image_io.normalize(image, mean, std)
            masks[i] = mask
        return len(indices), shape


def _eval_shape(shape: Sequence[int], size_factor: int | Sequence[int]) -> tuple[int, ...]:
    """Eval shape of a record: every spatial axis padded UP to a multiple of its size factor (all pixels scored)."""
    return tuple(-(-int(v) // f) * f for v, f in zip(shape, tiling.per_axis(size_factor, len(shape), "size_factor")))


def _eval_sample(image: np.ndarray, mask: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The whole record in ``shape`` (>= the record's): the image mirror-padded at the end of each axis, the
    mask (int32) with :data:`IGNORE_LABEL` on the padding so that loss and scores skip it."""
    padded = _crop(image, (0,) * len(shape), shape)
    labels = np.full(tuple(shape), IGNORE_LABEL, np.int32)
    labels[tuple(slice(0, n) for n in mask.shape)] = mask
    return padded, labels


def _crop(array: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The region of ``shape`` at ``origin`` of the record's leading (spatial) axes; mirror-padded
    (``image_io.mirror_pad``) where it reaches outside the record."""
    inner = array[tuple(slice(max(o, 0), max(o + n, 0)) for o, n in zip(origin, shape))]
    pads = [(max(-o, 0), max(o + n - size, 0)) for o, n, size in zip(origin, shape, array.shape)]
    return image_io.mirror_pad(inner, pads)


def _random_crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A plain random crop of any number of spatial axes (records smaller than the crop: placed at random
    inside it, mirror-padded around), image as float32 raw values: volumes without augmentation."""
    origin = [int(rng.integers(min(0, size - n), max(0, size - n) + 1)) for size, n in zip(mask.shape, shape)]
    return _crop(image, origin, shape).astype(np.float32), _crop(mask, origin, shape)


def _wait_for_slot(free, stop) -> bool:
    parent = mp.parent_process()
    while not free.acquire(timeout=0.1):
        if stop.is_set() or (parent is not None and not parent.is_alive()):
            return False
    return not stop.is_set()


def _worker_main(plan: _Plan, worker: int, conn, free, stop, produced, ring_buffer) -> None:
    """Worker process entry: make batches g = worker, worker + N, ... until stopped."""
    cliutil.ignore_interrupts()  # Ctrl-C and SIGTERM are the consumer's to handle; it ends the workers
    g = None
    producer = None
    try:
        ring = np.frombuffer(ring_buffer, np.uint8)
        producer = _Producer(plan, worker, ring)
        first = plan.start_batch + (worker - plan.start_batch) % plan.workers  # this worker's g: worker mod N
        for n, g in enumerate(itertools.count(first, plan.workers)):
            if not _wait_for_slot(free, stop):
                return
            slot = n % plan.slots
            count, shape = producer.fill(slot, g)
            produced[worker] += 1
            conn.send(("batch", g, slot, count, shape))
    except Exception:
        if not stop.is_set():
            try:
                conn.send(("error", g, traceback.format_exc()))
            except OSError:
                pass
            raise SystemExit(1) from None
    finally:
        if producer is not None:
            producer.close()
