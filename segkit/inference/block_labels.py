"""Instance labels of an output split into blocks (issue #21), block-parallel where it can be.

Each block is labelled from the blocks' probabilities over its zone plus the seam halo (so once every block within
that halo is predicted): its labels (ids local to the block) go into ``.blocks/ids`` and what the seam merge needs
(the ids on the zone's outer layer and on the one-pixel ring around it, :class:`segkit.instance_seams.SeamMerger`)
into ``.blocks/Z.Y.X.seams.npz``, which also marks the block labelled. Shards label their own blocks as soon as
the neighbourhood is predicted; the closing step labels the rest, offsets each block's ids by the ids of the blocks
before it (raster order, as one out-of-core run numbers them), pairs touching ids across every block border,
union-find, and relabels block by block: the same label image as :func:`segkit.instance_seams.label_zones`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np

from segkit import cliutil, instance_seams, tiling
from segkit.instances import labels_from_probabilities

if TYPE_CHECKING:
    from segkit.inference.blocks import Job
    from segkit.inference.settings import Settings

IDS_ARRAY = "ids"  # under .blocks: int64 block-local ids, one chunk per block


def seams_path(job: Job, zone: tiling.Zone) -> str:
    from segkit.inference.blocks import block_id

    return os.path.join(job.blocks_dir, block_id(zone) + ".seams.npz")


def neighbourhood_done(job: Job, zone: tiling.Zone, halo: tiling.PerAxis) -> bool:
    """Whether every block whose zone meets ``zone`` grown by ``halo`` is predicted (marked done)."""
    grown = instance_seams.grow(zone.region(), halo, job.plan.shape)
    ranges = [range(s.start // t, (s.stop - 1) // t + 1) for s, t in zip(grown, job.plan.zone_size)]
    by_index = {z.index: z for z in job.plan.zones}
    return all(os.path.exists(job.marker(by_index[index])) for index in itertools.product(*ranges))


def label_block(job: Job, zone: tiling.Zone, settings: Settings) -> None:
    """Label one block (block-local ids) and store its ids chunk and its seam data, atomically."""
    import zarr

    from segkit.inference.blocks import PROBS_ARRAY, put_chunks

    inst, shape = settings.instances, job.plan.shape
    probs = zarr.open_array(os.path.join(job.blocks_dir, PROBS_ARRAY), mode="r", zarr_format=2)
    box = zone.region()
    region = instance_seams.grow(box, inst.halo_px, shape)
    labels = labels_from_probabilities(np.asarray(probs[region]), inst.thresholds, inst.labelling_target,
                                       origin=[s.start for s in region])
    ring = instance_seams.grow(box, 1, shape)
    merger = instance_seams.SeamMerger(shape)
    put_chunks(os.path.join(job.blocks_dir, IDS_ARRAY), box, merger.add(box, labels[instance_seams.within(ring, region)]))
    with cliutil.atomic_path(seams_path(job, zone), suffix=".npz") as tmp:
        np.savez(tmp, **merger.record())


def label_ready(job: Job, zones: list[tiling.Zone], settings: Settings) -> int:
    """Label those of ``zones`` not labelled yet whose neighbourhood is predicted; returns how many."""
    count = 0
    for zone in zones:
        if not os.path.exists(seams_path(job, zone)) and neighbourhood_done(job, zone, settings.instances.halo_px):
            label_block(job, zone, settings)
            count += 1
    return count


def merge_table(job: Job) -> tuple[np.ndarray, list[int]]:
    """(:meth:`SeamMerger.finish` table over every block, each block's id offset), blocks in raster order."""
    merger = instance_seams.SeamMerger(job.plan.shape)
    offsets = []
    for zone in job.plan.zones:
        with np.load(seams_path(job, zone)) as seams:
            offsets.append(merger.add_record(seams))
    return merger.finish(), offsets


def write_labels(job: Job, settings: Settings) -> None:
    """The closing step: label the blocks still unlabelled, merge, relabel block by block into the label image
    (written atomically as any OME-Zarr output)."""
    import zarr

    from segkit.inference import writers

    label_ready(job, list(job.plan.zones), settings)
    table, offsets = merge_table(job)
    ids = zarr.open_array(os.path.join(job.blocks_dir, IDS_ARRAY), mode="r", zarr_format=2)
    os.makedirs(os.path.dirname(job.paths.labels), exist_ok=True)
    with contextlib.ExitStack() as stack:
        writer = writers.open_writer(stack, job.paths.labels, job.plan.shape, table.dtype, job.plan.zone_size,
                                     lambda a: a, False, True, "zarr", job.calibration, os.path.basename(job.name))
        for zone, offset in zip(job.plan.zones, offsets):
            local = np.asarray(ids[zone.region()])
            writer.put(zone, table[np.where(local > 0, local + offset, 0)])


def remove_intermediates(job: Job) -> None:
    """The blocks' ids and seam data, once the label image is written."""
    for zone in job.plan.zones:
        with contextlib.suppress(FileNotFoundError):
            os.remove(seams_path(job, zone))
    shutil.rmtree(os.path.join(job.blocks_dir, IDS_ARRAY), ignore_errors=True)


def create_ids_array(blocks_dir: str, plan: tiling.TilePlan) -> Any:
    import numcodecs
    import zarr

    chunks = tuple(min(t, n) for t, n in zip(plan.zone_size, plan.shape))
    return zarr.create_array(os.path.join(blocks_dir, IDS_ARRAY), shape=plan.shape, chunks=chunks, dtype=np.int64,
                             fill_value=0, zarr_format=2, compressors=numcodecs.Zstd(level=1),
                             chunk_key_encoding={"name": "v2", "separator": "/"})
