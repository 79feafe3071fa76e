"""Tiling geometry for any number of spatial axes: one home for how images and volumes are cut.

Arrays are spatial axes then channels last (``image_hwc``, ``volume_zyxc``); tile size, stride,
halo and size factor are one int for every axis or one value per axis. The build-time grid
(:func:`tile_origins`) and inference's exact zone-of-responsibility tiling (:func:`plan_tiles`,
:func:`predict_tiled`) are described in README.md ("Exact tiling"). No TensorFlow here.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

PerAxis = int | Sequence[int]  # one value for every spatial axis, or one per axis


def per_axis(value: PerAxis, ndim: int, name: str) -> tuple[int, ...]:
    """``value`` as one int per spatial axis; ValueError when a sequence has the wrong length."""
    values = (value,) * ndim if np.isscalar(value) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name} must be one int or {ndim} (one per spatial axis), got {value!r}")
    for v in values:
        if int(v) != v:
            raise ValueError(f"{name} must be whole numbers, got {value!r}")
    return tuple(int(v) for v in values)


def tile_starts(length: int, tile: int, stride: int | None = None) -> list[int]:
    """Start offsets along one axis so that tiles of ``tile`` cover [0, length).

    ``stride`` defaults to ``tile`` (no overlap). The last tile is slid inward
    to end exactly at ``length``. When ``length <= tile`` there is one tile at
    0 (the caller pads the image up to the tile).
    """
    if tile <= 0:
        raise ValueError(f"tile must be > 0, got {tile}")
    stride = tile if stride is None else stride
    if stride <= 0 or stride > tile:
        raise ValueError(f"tile stride must be in [1, tile={tile}], got {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_origins(shape: Sequence[int], tile: PerAxis, stride: PerAxis | None = None) -> list[tuple[int, ...]]:
    """First pixel of every tile of a grid covering an array of spatial ``shape`` (raster order)."""
    tiles = per_axis(tile, len(shape), "tile")
    strides = tiles if stride is None else per_axis(stride, len(shape), "tile stride")
    return list(itertools.product(*(tile_starts(n, t, s) for n, t, s in zip(shape, tiles, strides))))


def tile_grid(height: int, width: int, tile: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(y, x) top-left corners of a tile grid covering a height x width image (build_lmdb's 2D call)."""
    return tile_origins((height, width), tile, stride)


# --- Inference: zone-of-responsibility tiling --------------------------------
#
# Output pixels are split into zones on a regular grid of step ``tile`` (so
# zones are the tiles of a tiled TIFF); each zone is predicted from one tile:
# the zone's window (the zone slid inward to fit the array rounded up to the
# size factor, P) plus ``halo`` of context. What lies beyond the array's border
# is the ``border`` rule:
#
# * "zero" (the original toolkit's whole-image prediction): the array is
#   reflect-padded only at the end of each axis, up to P, and the network's own
#   zero padding acts at the border. A tile never crosses the border: it is
#   window + 2 * halo long, clipped to P and shifted inward to fit, so context is
#   added only on interior edges (a tile edge on the border stops there, as the
#   whole array does), every tile of an array has one shape, and an array that
#   fits one tile is predicted at its own (padded) size.
# * "mirror": the array is seen as its infinite mirror extension
#   (image_io.mirror_pad's rule) and every tile is window + 2 * halo.
#
# Tile origins are multiples of the size factor (halo and P are too), so every
# tile's pooling grid agrees with the whole array's. "Untiled" is the same
# function with one tile covering the whole array: with halo >= the model's
# receptive-field radius both give the same result, for either border rule
# (exactly for pointwise models, within float tolerance for convolutional
# ones). Every axis is handled alike.

BORDERS = ("zero", "mirror")


def reflect_index(positions: np.ndarray | Sequence[int], length: int) -> np.ndarray:
    """Indices into [0, length) of positions on the array's infinite mirror extension.

    Same rule as ``image_io.mirror_pad`` and ``np.pad(mode='reflect')`` (reflect without
    repeating the edge, repeatedly for positions far outside): for length 4, positions
    -2..5 map to 2 1 0 1 2 3 2 1.
    """
    positions = np.asarray(positions, np.int64)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.mod(positions, period)
    return np.where(folded < length, folded, period - folded)


@dataclass(frozen=True)
class Zone:
    """One zone of responsibility, in array coordinates, one entry per spatial axis.

    The zone's output pixels are ``start[i]:stop[i]`` on each axis; they are predicted
    from the tile whose first pixel is ``tile_start`` (negative or past the border where
    the tile reaches into mirror padding). ``index`` is the zone's place on the grid.
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    tile_start: tuple[int, ...]

    def region(self) -> tuple[slice, ...]:
        """The zone in the array (array coordinates)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def crop(self) -> tuple[slice, ...]:
        """The zone inside its tile's prediction (tile coordinates)."""
        return tuple(slice(a - t, b - t) for a, b, t in zip(self.start, self.stop, self.tile_start))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


@dataclass(frozen=True)
class TilePlan:
    """Zones (raster order) of an array of spatial ``shape`` and the one shape every tile has."""

    shape: tuple[int, ...]
    zone_size: tuple[int, ...]
    tile_shape: tuple[int, ...]
    halo: tuple[int, ...]
    size_factor: tuple[int, ...]
    grid_shape: tuple[int, ...]
    zones: tuple[Zone, ...]
    border: str = "zero"


def _axis_zones(length: int, tile: int, halo: int, size_factor: int,
                border: str) -> tuple[int, list[tuple[int, int, int]]]:
    """Tile length and (start, stop, tile_start) of each zone along one axis."""
    padded = -(-length // size_factor) * size_factor
    window = min(tile, padded)
    tile_length = window + 2 * halo if border == "mirror" else min(window + 2 * halo, padded)
    zones = []
    for start in range(0, length, tile):
        window_start = min(start, padded - window)  # slide the last window inward
        tile_start = window_start - halo
        if border == "zero":  # never cross the border: clip to [0, padded), shifted inward
            tile_start = min(max(tile_start, 0), padded - tile_length)
        zones.append((start, min(start + tile, length), tile_start))
    return tile_length, zones


def _check_geometry(shape: tuple[int, ...], tiles: tuple[int, ...], halos: tuple[int, ...],
                    factors: tuple[int, ...], border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    if any(f < 1 for f in factors):
        raise ValueError(f"size_factor must be >= 1, got {factors}")
    for t, f in zip(tiles, factors):
        if t < 1 or t % f:
            raise ValueError(f"tile must be a positive multiple of the size factor {f}, got {t}")
    for h, f in zip(halos, factors):
        if h < 0 or h % f:
            raise ValueError(f"halo must be a non-negative multiple of the size factor {f}, got {h}")
    if any(n < 1 for n in shape):
        raise ValueError(f"array must have at least one pixel, got shape {'x'.join(map(str, shape))}")


def plan_tiles(shape: Sequence[int], tile: PerAxis, halo: PerAxis, size_factor: PerAxis,
               border: str = "zero") -> TilePlan:
    """Zone-of-responsibility tiling of an array of spatial ``shape``; see :func:`predict_tiled`."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    tiles, halos = per_axis(tile, ndim, "tile"), per_axis(halo, ndim, "halo")
    factors = per_axis(size_factor, ndim, "size_factor")
    _check_geometry(shape, tiles, halos, factors, border)
    axes = [_axis_zones(*args, border) for args in zip(shape, tiles, halos, factors)]
    zones = tuple(
        Zone(index=tuple(i for i, _ in picked), start=tuple(z[0] for _, z in picked),
             stop=tuple(z[1] for _, z in picked), tile_start=tuple(z[2] for _, z in picked))
        for picked in itertools.product(*(list(enumerate(axis_zones)) for _, axis_zones in axes))
    )
    return TilePlan(shape, tiles, tuple(t for t, _ in axes), halos, factors,
                    tuple(len(z) for _, z in axes), zones, border)


def read_tile(array: Any, plan: TilePlan, zone: Zone) -> np.ndarray:
    """The tile of ``zone`` (spatial axes then channels) in the array's dtype, mirror-padded outside it.

    Reads one region: the bounding box of the pixels the tile needs (never
    larger than the tile), so on-disk arrays are read region by region.
    """
    indices = [reflect_index(np.arange(t, t + n), length)
               for t, n, length in zip(zone.tile_start, plan.tile_shape, plan.shape)]
    lows = [int(i.min()) for i in indices]
    region = np.asarray(array[tuple(slice(lo, int(i.max()) + 1) for lo, i in zip(lows, indices))])
    if region.shape[: len(indices)] == plan.tile_shape and min(zone.tile_start) >= 0:
        return region  # entirely inside the array: no padding needed
    return region[np.ix_(*(i - lo for i, lo in zip(indices, lows)))]


def tile_groups(plan: TilePlan) -> list[tuple[tuple[int, ...], list[Zone]]]:
    """(tile_start, zones predicted from that tile), tiles in raster order.

    With ``border="zero"``, tiles shifted inward at the border can serve several zones:
    each distinct tile is predicted once.
    """
    groups: dict[tuple[int, ...], list[Zone]] = {}
    for zone in plan.zones:
        groups.setdefault(zone.tile_start, []).append(zone)
    return sorted(groups.items())


def _batches(array: Any, plan: TilePlan, preprocess: Callable[[np.ndarray], np.ndarray],
             batch_size: int) -> Iterator[tuple[list[list[Zone]], np.ndarray]]:
    """(zones of each tile, batch float32: N, spatial..., C), tiles in raster order; the last batch may be shorter."""
    groups = [zones for _, zones in tile_groups(plan)]
    for first in range(0, len(groups), batch_size):
        chunk = groups[first : first + batch_size]
        yield chunk, np.stack([np.asarray(preprocess(read_tile(array, plan, zones[0])), np.float32) for zones in chunk])


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(iterable: Iterable[Any], depth: int, name: str = "prefetch") -> Iterator[Any]:
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead.

    Exceptions of the producer are re-raised in the consumer; when the consumer
    stops early (exception, ``close()``), the producer is stopped and joined.
    ``depth <= 0`` iterates in the calling thread.
    """
    if depth <= 0:
        yield from iterable
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()


def predict_tiled(
    array: Any,
    predict_fn: Callable[[np.ndarray], Any],
    tile: PerAxis,
    halo: PerAxis,
    size_factor: PerAxis,
    *,
    batch_size: int = 1,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    sink: Callable[[Zone, np.ndarray], None] | None = None,
    prefetch: int = 2,
    progress: Callable[[int], Any] | None = None,
    border: str = "zero",
) -> np.ndarray | None:
    """Predict an array of any size tile by tile; the result does not depend on the tiling.

    Args:
        array: spatial axes then channels (``image_hwc``, ``volume_zyxc``), as anything
            with ``.shape`` and slicing by a tuple of slices -- a numpy array, a
            ``np.memmap``, or a lazy on-disk view (only the regions the tiles need are read).
        predict_fn: float32 ``batch`` (N, spatial..., C) -> per-class ``probabilities``
            (same N and spatial shape, K last). Called with tiles of one shape per array.
        tile: zone of responsibility (one int, or one per spatial axis), a multiple of
            ``size_factor``. Axes (rounded up to the size factor) shorter than a tile get
            one shorter tile.
        halo: context added on the interior sides of a zone (int or per axis; with
            ``border="mirror"`` on every side), a multiple of ``size_factor``. The result
            equals whole-array prediction (same ``border``) when ``halo`` is
            at least the model's receptive-field radius (the farthest input pixel that
            can change an output pixel); with less, pixels near zone borders can differ.
        size_factor: model inputs must have spatial sizes multiple of this (int or per
            axis); tile origins are aligned to it so pooling grids agree with the whole array.
        batch_size: tiles per ``predict_fn`` call.
        preprocess: raw tile -> float32 tile (e.g. ``image_io.normalize`` with WHOLE-image
            statistics); runs in the prefetch thread. Default: cast to float32.
        sink: ``sink(zone, probabilities)`` receives each zone's prediction (cropped to the
            zone) in raster order -- the writer for out-of-core outputs. Without a sink the
            stitched (spatial..., K) float32 array is returned.
        prefetch: batches read and preprocessed ahead in a background thread (0: no thread).
        progress: called with the number of zones finished after each batch.
        border: what the model sees beyond the array's border. "zero" (the original
            toolkit's whole-image prediction): the array reflect-padded at the end of each
            axis up to a multiple of the size factor, the model's own zero padding beyond;
            tiles add context only on interior edges. "mirror": the array's mirror
            extension (``image_io.mirror_pad``'s rule) by the halo on every side.

    Geometry: see :func:`plan_tiles` and the comment above it.
    """
    spatial = tuple(array.shape[:-1])
    plan = plan_tiles(spatial, tile, halo, size_factor, border)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preprocess = preprocess or (lambda t: t.astype(np.float32))
    stitched: list[np.ndarray] = []

    def put(zone: Zone, part: np.ndarray) -> None:
        if sink is not None:
            sink(zone, part)
            return
        if not stitched:
            stitched.append(np.empty(spatial + (part.shape[-1],), np.float32))
        stitched[0][zone.region()] = part

    pending: dict[tuple[int, ...], np.ndarray] = {}  # zones predicted, waiting for their turn in raster order
    order = iter(plan.zones)
    following = next(order)
    for groups, batch in prefetched(_batches(array, plan, preprocess, batch_size), prefetch, "tile-prefetch"):
        probs = np.asarray(predict_fn(batch))
        if probs.ndim != batch.ndim or probs.shape[:-1] != batch.shape[:-1]:
            raise ValueError(f"predict_fn returned shape {probs.shape} for input {batch.shape}; expected "
                             "(N, spatial..., K) with the input's N and spatial shape")
        done = 0
        for zones, tile_probs in zip(groups, probs):
            for zone in zones:
                pending[zone.index] = np.array(tile_probs[zone.crop()], np.float32)  # a copy: frees the batch
        while following is not None and following.index in pending:
            put(following, pending.pop(following.index))
            following, done = next(order, None), done + 1
        if progress is not None:
            progress(done)
    return stitched[0] if stitched and sink is None else None
