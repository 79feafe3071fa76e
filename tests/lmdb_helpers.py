"""Write small LMDB databases straight through lmdb_format (tests and benchmarks; no build_lmdb.py needed)."""
from __future__ import annotations

import os
from typing import Sequence

import lmdb
import numpy as np

from segkit import image_io, lmdb_format


def write_database(path: str, samples: Sequence[tuple[np.ndarray, np.ndarray]], *, source_index: Sequence[int] | None = None,
                   sources: list[dict] | None = None, tile_size: int | None = None, number_classes: int | None = None,
                   corrupt: Sequence[int] = (), voxel_size: Sequence[float] | None = None) -> str:
    """Write ``samples`` ((image HW or HWC, mask HW), or (ZYXC, ZYX) volume pairs) as records 0..n-1 of a database at ``path``.

    By default every sample is its own source image, with statistics computed over the sample
    (``image_io.image_stats``); pass ``sources`` and ``source_index`` to share sources. Records whose
    index is in ``corrupt`` get garbage bytes (to test worker faults).
    """
    images = [np.asarray(image) if np.ndim(image) == np.ndim(mask) + 1 else image_io.to_hwc(np.asarray(image))
              for image, mask in samples]  # HW, HWC, or a volume ZYXC with its ZYX mask
    masks = [np.asarray(mask) for _, mask in samples]
    if sources is None:
        sources = []
        for i, image in enumerate(images):
            mean, std = image_io.image_stats(image)
            sources.append({"file": f"sample_{i}.tif", "height": image.shape[0], "width": image.shape[1],
                            "mean": mean, "std": std})
        source_index = list(range(len(images)))
    source_index = list(source_index) if source_index is not None else [0] * len(images)
    class_pixel_counts: dict[int, int] = {}
    class_records: dict[int, list[int]] = {}
    for i, mask in enumerate(masks):
        values, counts = np.unique(mask, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            class_pixel_counts[value] = class_pixel_counts.get(value, 0) + count
            class_records.setdefault(value, []).append(i)
    meta = lmdb_format.make_metadata(
        channels=images[0].shape[-1], image_dtype=images[0].dtype.name, tile_size=tile_size, tile_stride=None,
        num_records=len(images), class_pixel_counts=class_pixel_counts, class_records=class_records,
        sources=sources, split="train", seed=0, number_classes=number_classes,
        spatial_rank=masks[0].ndim, voxel_size_zyx_um=voxel_size)
    total = sum(i.nbytes + m.nbytes for i, m in zip(images, masks))
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=2 * total + (16 << 20), subdir=True)
    with env.begin(write=True) as txn:
        for i, (image, mask) in enumerate(zip(images, masks)):
            record = lmdb_format.Record(image, mask, source_index=source_index[i])
            value = b"garbage" if i in corrupt else lmdb_format.encode_record(record)
            txn.put(lmdb_format.record_key(i), value)
        txn.put(lmdb_format.META_KEY, lmdb_format.encode_metadata(meta))
    env.close()
    return path


def id_samples(count: int, hw: tuple[int, int] = (16, 16), channels: int = 1, classes: int = 3,
               dtype=np.uint16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Samples whose image is constant = 100 + index (identifiable after normalization with mean 0, std 1)
    and whose mask holds background plus class 1 + index % (classes - 1)."""
    out = []
    for i in range(count):
        image = np.full(hw + (channels,), 100 + i, dtype)
        mask = np.zeros(hw, np.uint8)
        mask[: hw[0] // 2] = 1 + i % (classes - 1)
        out.append((image, mask))
    return out



def unit_sources(channels: int = 1) -> list[dict]:
    """One source whose statistics make normalization the identity (mean 0, std 1)."""
    return [{"file": "unit.tif", "height": 1, "width": 1, "mean": [0.0] * channels, "std": [1.0] * channels}]


def read_db(path: str):
    """(metadata, decoded records) of a database, in record order."""
    meta = lmdb_format.read_metadata(path)
    env = lmdb_format.open_readonly(path)
    with env.begin(buffers=False) as txn:
        records = [lmdb_format.decode_record(txn.get(lmdb_format.record_key(i))) for i in range(meta["num_records"])]
    env.close()
    return meta, records
