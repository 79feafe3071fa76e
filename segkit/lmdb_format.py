"""The LMDB record format shared by ``build_lmdb.py`` and ``imagereader.py``.

A database is one LMDB environment (a directory ``NAME.lmdb``) holding:

* records under keys ``b"r%09d" % index`` for index in ``range(num_records)``;
* one metadata record under ``META_KEY`` (JSON, see :func:`make_metadata`).

A record is self-describing and versioned; no protobuf, no compile step::

    MAGIC (4 bytes b"SSR1") | header length (uint32 little endian) | header JSON | payload

The header JSON names, for each array (``image`` in HWC order, ``mask`` in HW
order; a volume's are ZYXC and ZYX: spatial axes, channels last), its dtype,
shape, byte offset into the payload and byte count, plus ``source_index`` (into
the metadata's ``sources`` list), ``origin`` ([y, x] -- [z, y, x] for a volume --
of the record's first pixel in the source image, negative when mirror padding
was added) and ``classes`` (the class ids present in the mask).
Decoding is zero-copy: arrays are ``numpy.frombuffer`` views of the value.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MAGIC = b"SSR1"
META_KEY = b"__metadata__"
NORMALIZATION_METHOD = "zscore_per_channel_whole_image"

IMAGE_DTYPES = ("uint8", "uint16", "int32", "float32")
MASK_DTYPES = ("uint8", "uint16", "int32")

_HEADER_LEN = struct.Struct("<I")


def record_key(index: int) -> bytes:
    return b"r%09d" % index


@dataclass
class Record:
    """One training sample: an image (HWC; ZYXC for a volume) and its class mask (HW; ZYX).

    The field names say the 2-D order; a volume's arrays have one more leading axis.
    """

    image_hwc: np.ndarray
    mask_hw: np.ndarray
    source_index: int = 0
    origin: tuple[int, ...] = (0, 0)
    classes: list[int] = field(default_factory=list)


def encode_record(record: Record) -> bytes:
    image = np.ascontiguousarray(record.image_hwc)
    mask = np.ascontiguousarray(record.mask_hw)
    if image.ndim < 3:
        raise ValueError(f"image must be HWC (or ZYXC), got shape {image.shape}")
    if mask.shape != image.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape}")
    origin = [int(v) for v in record.origin] if any(record.origin) else [0] * mask.ndim
    if len(origin) != mask.ndim:
        raise ValueError(f"origin {record.origin} needs one value per spatial axis of mask {mask.shape}")
    classes = record.classes or [int(c) for c in np.unique(mask)]
    header = {
        "version": FORMAT_VERSION,
        "image": {"dtype": image.dtype.str, "shape": list(image.shape), "offset": 0, "nbytes": image.nbytes},
        "mask": {"dtype": mask.dtype.str, "shape": list(mask.shape), "offset": image.nbytes, "nbytes": mask.nbytes},
        "source_index": int(record.source_index),
        "origin": origin,
        "classes": [int(c) for c in classes],
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header_bytes)), header_bytes, image.tobytes(), mask.tobytes()])


def decode_record(value: bytes | memoryview) -> Record:
    """Decode a record; arrays are read-only views of ``value`` (copy to modify)."""
    buf = memoryview(value)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("not a segmentation record (bad magic); rebuild the database with build_lmdb.py")
    (header_len,) = _HEADER_LEN.unpack(buf[4:8])
    header = json.loads(bytes(buf[8 : 8 + header_len]).decode("utf-8"))
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"record format version {header.get('version')} is not supported (expected {FORMAT_VERSION}); "
            "rebuild the database with this version of build_lmdb.py"
        )
    payload = buf[8 + header_len :]

    def array(spec: dict[str, Any]) -> np.ndarray:
        start = spec["offset"]
        raw = payload[start : start + spec["nbytes"]]
        return np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])

    return Record(
        image_hwc=array(header["image"]),
        mask_hw=array(header["mask"]),
        source_index=header["source_index"],
        origin=tuple(header["origin"]),
        classes=header["classes"],
    )


def make_metadata(
    *,
    channels: int,
    image_dtype: str,
    tile_size: int | None,
    tile_stride: int | None,
    num_records: int,
    class_pixel_counts: dict[int, int],
    class_records: dict[int, list[int]],
    sources: list[dict[str, Any]],
    split: str,
    seed: int | None,
    number_classes: int | None = None,
    spatial_rank: int = 2,
    voxel_size_zyx_um: tuple[float, float, float] | None = None,
    mask_type: str = "classes",
    instance_target: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the per-database metadata record.

    ``sources`` holds one dict per source image: ``{"file": name, "height": H,
    "width": W, "mean": [per channel], "std": [per channel]}``, the statistics
    computed over the WHOLE source image (see ``image_io.image_stats``).
    ``class_records[c]`` lists every record index whose mask contains class c.
    Volumes: ``spatial_rank`` 3 and ``voxel_size_zyx_um`` (micrometres; the reader's 3D augmentation
    needs it). ``mask_type`` "instances": the masks were instance labels and ``instance_target`` says
    which target was stored and why (``segkit/instance_targets``).
    """
    classes_seen = sorted(int(c) for c, n in class_pixel_counts.items() if n > 0)
    return {
        "format": "segmentation-lmdb",
        "format_version": FORMAT_VERSION,
        "split": split,
        "channels": int(channels),
        "image_dtype": str(np.dtype(image_dtype).name),
        "tile_size": tile_size,
        "tile_stride": tile_stride,
        "num_records": int(num_records),
        "number_classes": int(number_classes) if number_classes else (max(classes_seen) + 1 if classes_seen else 1),
        "classes_seen": classes_seen,
        "class_pixel_counts": {str(int(c)): int(n) for c, n in sorted(class_pixel_counts.items())},
        "class_records": {str(int(c)): [int(i) for i in idx] for c, idx in sorted(class_records.items())},
        "normalization": NORMALIZATION_METHOD,
        "sources": sources,
        "seed": seed,
        "spatial_rank": int(spatial_rank),
        "voxel_size_zyx_um": None if voxel_size_zyx_um is None else [float(v) for v in voxel_size_zyx_um],
        "mask_type": mask_type,
        "instance_target": instance_target,
    }


def encode_metadata(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


def decode_metadata(value: bytes | memoryview) -> dict[str, Any]:
    meta = json.loads(bytes(value).decode("utf-8"))
    if meta.get("format") != "segmentation-lmdb":
        raise ValueError("metadata record is not a segmentation-lmdb record")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"database format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION}); "
            "rebuild it with this version of build_lmdb.py"
        )
    meta["class_records"] = {int(c): idx for c, idx in meta["class_records"].items()}
    meta["class_pixel_counts"] = {int(c): n for c, n in meta["class_pixel_counts"].items()}
    return meta


def open_readonly(path: str):
    """Open a database read-only without locking (safe in forked/spawned workers)."""
    import lmdb

    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512, subdir=True)


def read_record(path: str, index: int = 0) -> Record | None:
    """Record ``index`` of a database (its arrays backed by bytes of their own), None when it has no such
    record; ValueError when the record does not decode."""
    env = open_readonly(path)
    try:
        with env.begin() as txn:
            value = txn.get(record_key(index))
    finally:
        env.close()
    return None if value is None else decode_record(value)


def read_metadata(path: str) -> dict[str, Any]:
    """Read a database's metadata; raises ValueError with a user-facing message."""
    import os

    import lmdb

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "data.mdb")):
        raise ValueError(f"{path}: no LMDB database here; build one with build_lmdb.py")
    try:
        env = open_readonly(path)
    except lmdb.Error as exc:
        raise ValueError(f"{path}: cannot open LMDB database ({exc}); rebuild it with build_lmdb.py") from exc
    try:
        with env.begin(buffers=False) as txn:
            value = txn.get(META_KEY)
    finally:
        env.close()
    if value is None:
        raise ValueError(f"{path}: database has no metadata record (incomplete or foreign); rebuild it with build_lmdb.py")
    return decode_metadata(value)
