"""The databases an ImageReader reads: their metadata, the checks that they fit together, and the
facts derived from them (record shapes, the default train crop, voxel sizes, class counts). No
TensorFlow; the reader's workers never need this (README, "Stage 2")."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from segkit import lmdb_format, tiling


class ReaderDatabases:
    """One or more LMDB databases read as one (concatenated); raises ValueError with a user-facing message."""

    def __init__(self, paths: Sequence[str]):
        self.paths = tuple(paths)
        self.metadata = [lmdb_format.read_metadata(p) for p in self.paths]

    @property
    def channels(self) -> int:
        return int(self.metadata[0]["channels"])

    @property
    def number_classes(self) -> int:
        return max(int(m["number_classes"]) for m in self.metadata)

    @property
    def num_records(self) -> int:
        return sum(int(m["num_records"]) for m in self.metadata)

    @property
    def image_dtype(self) -> str:
        """The databases' stored pixel type (numpy's promotion when they differ)."""
        return np.result_type(*[np.dtype(m["image_dtype"]) for m in self.metadata]).name

    @property
    def class_pixel_counts(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for meta in self.metadata:
            for c, n in meta["class_pixel_counts"].items():
                total[int(c)] = total.get(int(c), 0) + int(n)
        return dict(sorted(total.items()))

    def check(self, sampling: str | None) -> None:
        channels = {m["channels"] for m in self.metadata}
        if len(channels) > 1:
            listing = ", ".join(f"{p}: {m['channels']}" for p, m in zip(self.paths, self.metadata))
            raise ValueError(f"the databases have different channel counts ({listing}); use databases built from "
                             f"images with the same channels")
        for path, meta in zip(self.paths, self.metadata):
            if meta["num_records"] < 1:
                raise ValueError(f"{path}: the database has no records; rebuild it with build_lmdb.py from a "
                                 f"non-empty image folder")
            if sampling == "balanced" and not any(len(v) for v in meta["class_records"].values()):
                raise ValueError(f"{path}: the metadata lists no records per class, needed for class balancing; "
                                 f"rebuild it with build_lmdb.py")

    def voxel_sizes(self) -> tuple[tuple[float, float, float], ...]:
        """Each database's voxel size (z, y, x) in micrometres, which 3D augmentation needs."""
        missing = [p for p, m in zip(self.paths, self.metadata) if not m.get("voxel_size_zyx_um")]
        if missing:
            raise ValueError(f"{missing[0]}: volume database without a voxel size in its metadata, which 3D "
                             "augmentation needs; rebuild it with build_lmdb.py (--voxel_size z,y,x if the files "
                             "lack it), or read it with augment=False")
        return tuple(tuple(float(v) for v in m["voxel_size_zyx_um"]) for m in self.metadata)

    def all_record_shapes(self) -> np.ndarray:
        """(records, spatial axes) of every database, concatenated; one number of spatial axes for all."""
        shapes = [_record_shapes(p, m["num_records"]) for p, m in zip(self.paths, self.metadata)]
        if len({s.shape[1] for s in shapes}) > 1:
            listing = ", ".join(f"{p}: {s.shape[1]}-D" for p, s in zip(self.paths, shapes))
            raise ValueError(f"the databases mix 2-D images and volumes ({listing}); train on one kind")
        return np.concatenate(shapes)

    def resolve_crop(self, crop_size, size_factor: int | Sequence[int]) -> tuple[int, ...]:
        """The train crop, one size per spatial axis (the records' number of spatial axes), each a multiple of
        its axis' size factor (one number, or one per axis)."""
        tiles = {_tile_tuple(m.get("tile_size")) for m in self.metadata}
        ndim = _record_shapes(self.paths[0], 1).shape[1]  # the first record tells 2-D from volumes
        factors = tiling.per_axis(size_factor, ndim, "size_factor")
        if crop_size is None:
            if len(tiles) == 1 and None not in tiles:
                tile = tiles.pop()
                sizes = tile if len(tile) == ndim else tile * ndim
            else:
                sizes = tuple(int(v) for v in self.all_record_shapes().min(axis=0))
            return tuple(max(v // f, 1) * f for v, f in zip(sizes, factors))
        crop = (crop_size,) * ndim if np.isscalar(crop_size) else tuple(crop_size)
        if len(crop) != ndim or any(int(v) != v or v < 1 or v % f for v, f in zip(crop, factors)):
            shown = factors[0] if len(set(factors)) == 1 else "x".join(map(str, factors))
            raise ValueError(f"crop size must be one or {ndim} positive multiples of the size factor {shown} "
                             f"(the records have {ndim} spatial axes), got {crop_size}")
        return tuple(int(v) for v in crop)


def _record_shapes(path: str, count: int) -> np.ndarray:
    """(count, spatial axes) sizes of a database's records (headers only; no pixel data is read)."""
    env = lmdb_format.open_readonly(path)
    try:
        with env.begin(buffers=True) as txn:
            shapes = []
            for i in range(count):
                value = txn.get(lmdb_format.record_key(i))
                if value is None:
                    raise ValueError(f"{path}: record {i} of {count} is missing; rebuild the database with build_lmdb.py")
                try:
                    shapes.append(lmdb_format.decode_record(value).mask_hw.shape)
                except ValueError as exc:
                    raise ValueError(f"{path}: record {i}: {exc}") from None
    finally:
        env.close()
    if len({len(shape) for shape in shapes}) > 1:
        raise ValueError(f"{path}: records have {sorted({len(sh) for sh in shapes})} spatial axes; a database holds "
                         "2-D images or volumes, not both: rebuild it from one kind")
    return np.array(shapes, np.int64).reshape(count, -1)


def _tile_tuple(tile_size) -> tuple[int, ...] | None:
    """A database's tile size: None, one edge, or one per axis (volumes) -> None or a tuple."""
    if tile_size is None:
        return None
    return tuple(int(v) for v in tile_size) if isinstance(tile_size, (list, tuple)) else (int(tile_size),)
