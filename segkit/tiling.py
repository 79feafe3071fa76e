"""Tiling geometry: one home for how images are cut into tiles.

* :func:`tile_starts` / :func:`tile_grid`: the build-time grid (the original's
  behaviour: tiles stride across the image and the last tile in each row and
  column slides inward to end at the border, so every pixel is covered).
* :func:`plan_tiles` / :func:`predict_tiled`: inference's zone-of-responsibility
  tiling (see the section below), equal to whole-image prediction.
No TensorFlow here.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np


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


def tile_grid(height: int, width: int, tile: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(y, x) top-left corners of a tile grid covering a height x width image."""
    return [(y, x) for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]


# --- Inference: zone-of-responsibility tiling --------------------------------
#
# The image is seen as its infinite mirror extension (image_io.mirror_pad's
# rule). Output pixels are split into zones on a regular grid of step ``tile``;
# each zone is predicted from a tile = window + ``halo`` on every side, where
# the window is the zone slid inward to fit the image rounded up to the size
# factor, so every tile of an image has one shape. Window origins are
# multiples of the size factor and the halo is too, so every tile's pooling
# grid agrees with the whole image's. "Untiled" is the same function with one
# tile covering the whole image: with halo >= the model's receptive-field
# radius, both give the same result (exactly for pointwise models, within
# float tolerance for convolutional ones).

def reflect_index(positions: np.ndarray | Sequence[int], length: int) -> np.ndarray:
    """Indices into [0, length) of positions on the image's infinite mirror extension.

    Same rule as ``image_io.mirror_pad`` (reflect without repeating the edge,
    repeatedly for positions far outside): for length 4, positions -2..5 map to
    2 1 0 1 2 3 2 1.
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
    """One zone of responsibility, in image coordinates.

    The zone's output pixels are rows ``y0:y1`` and columns ``x0:x1``; they are
    predicted from the tile whose top-left corner is ``(tile_y, tile_x)``
    (negative or past the border where the tile reaches into the mirror
    padding). ``row``/``col`` is the zone's place on the grid.
    """

    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    tile_y: int
    tile_x: int

    def crop(self) -> tuple[slice, slice]:
        """The zone inside its tile's prediction (tile coordinates)."""
        return (slice(self.y0 - self.tile_y, self.y1 - self.tile_y), slice(self.x0 - self.tile_x, self.x1 - self.tile_x))


@dataclass(frozen=True)
class TilePlan:
    """Zones (raster order) of an ``height`` x ``width`` image and the shape every tile has."""

    height: int
    width: int
    zone_size: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: int
    size_factor: int
    grid_shape: tuple[int, int]
    zones: tuple[Zone, ...]


def _axis_zones(length: int, tile: int, halo: int, size_factor: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Tile length and (start, stop, tile_start) of each zone along one axis."""
    padded = -(-length // size_factor) * size_factor
    window = min(tile, padded)
    zones = []
    for start in range(0, length, tile):
        window_start = min(start, padded - window)  # slide the last window inward
        zones.append((start, min(start + tile, length), window_start - halo))
    return window + 2 * halo, zones


def plan_tiles(height: int, width: int, tile: int | tuple[int, int], halo: int, size_factor: int) -> TilePlan:
    """Zone-of-responsibility tiling of a ``height`` x ``width`` image; see :func:`predict_tiled`."""
    tile_yx = (tile, tile) if np.isscalar(tile) else tuple(tile)
    if size_factor < 1:
        raise ValueError(f"size_factor must be >= 1, got {size_factor}")
    for name, value in (("tile", tile_yx[0]), ("tile", tile_yx[1]), ("halo", halo)):
        if int(value) != value or value < (1 if name == "tile" else 0) or value % size_factor:
            raise ValueError(f"{name} must be a {'positive' if name == 'tile' else 'non-negative'} multiple of the size factor {size_factor}, got {value}")
    if height < 1 or width < 1:
        raise ValueError(f"image must have at least one pixel, got {height}x{width}")
    tile_h, rows = _axis_zones(height, int(tile_yx[0]), int(halo), size_factor)
    tile_w, cols = _axis_zones(width, int(tile_yx[1]), int(halo), size_factor)
    zones = tuple(
        Zone(r, c, y0, y1, x0, x1, ty, tx) for r, (y0, y1, ty) in enumerate(rows) for c, (x0, x1, tx) in enumerate(cols)
    )
    return TilePlan(height, width, (int(tile_yx[0]), int(tile_yx[1])), (tile_h, tile_w), int(halo), size_factor,
                    (len(rows), len(cols)), zones)


def read_tile(image_hwc: Any, plan: TilePlan, zone: Zone) -> np.ndarray:
    """The tile of ``zone`` as HWC in the image's dtype, mirror-padded where it leaves the image.

    Reads one region: the bounding box of the pixels the tile needs (never
    larger than the tile), so on-disk arrays are read region by region.
    """
    rows = reflect_index(np.arange(zone.tile_y, zone.tile_y + plan.tile_shape[0]), plan.height)
    cols = reflect_index(np.arange(zone.tile_x, zone.tile_x + plan.tile_shape[1]), plan.width)
    y_lo, y_hi, x_lo, x_hi = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    region = np.asarray(image_hwc[y_lo:y_hi, x_lo:x_hi])
    if region.shape[:2] == plan.tile_shape and zone.tile_y >= 0 and zone.tile_x >= 0:
        return region  # entirely inside the image: no padding needed
    return region[(rows - y_lo)[:, None], (cols - x_lo)[None, :]]


def _batches(image_hwc: Any, plan: TilePlan, preprocess: Callable[[np.ndarray], np.ndarray],
             batch_size: int) -> Iterator[tuple[list[Zone], np.ndarray]]:
    """(zones, batch_nhwc float32) in raster order; the last batch may be shorter."""
    for first in range(0, len(plan.zones), batch_size):
        zones = list(plan.zones[first : first + batch_size])
        yield zones, np.stack([np.asarray(preprocess(read_tile(image_hwc, plan, z)), np.float32) for z in zones])


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
    image_hwc: Any,
    predict_fn: Callable[[np.ndarray], Any],
    tile: int | tuple[int, int],
    halo: int,
    size_factor: int,
    *,
    batch_size: int = 1,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    sink: Callable[[Zone, np.ndarray], None] | None = None,
    prefetch: int = 2,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray | None:
    """Predict an image of any size tile by tile; the result does not depend on the tiling.

    Args:
        image_hwc: the image, H x W x C, as anything with ``.shape`` and
            ``[y0:y1, x0:x1]`` slicing -- a numpy array, a ``np.memmap``, or a
            lazy on-disk view (the region reader: only the regions the tiles
            need are read).
        predict_fn: ``batch_nhwc`` float32 -> per-class ``probabilities_nhwk``
            (same N, H, W). Called with tiles of one constant shape per image.
        tile: zone of responsibility (int or (h, w)), a multiple of ``size_factor``.
            Images (after rounding up to the size factor) smaller than a tile
            get one smaller tile.
        halo: context added on every side of a zone, a multiple of ``size_factor``.
            The result is guaranteed to equal whole-image prediction when
            ``halo`` is at least the model's receptive-field radius (the
            farthest input pixel that can change an output pixel); with less,
            pixels near zone borders can differ (seams).
        size_factor: model inputs must have H and W multiples of this; tile
            origins are aligned to it so pooling grids agree with the whole image.
        batch_size: tiles per ``predict_fn`` call.
        preprocess: raw ``tile_hwc`` -> float32 ``tile_hwc`` (e.g. ``image_io.normalize``
            with WHOLE-image statistics); runs in the prefetch thread. Default:
            cast to float32.
        sink: ``sink(zone, probabilities_hwk)`` receives each zone's prediction
            (cropped to the zone) in raster order -- the writer for out-of-core
            outputs. Without a sink the stitched H x W x K float32 array is returned.
        prefetch: batches read and preprocessed ahead in a background thread
            (0: no thread).
        progress: called with the number of tiles finished after each batch.

    Geometry: the image is mirror-padded at its borders (``image_io.mirror_pad``'s
    rule) by the halo and up to a multiple of the size factor; see :func:`plan_tiles`.
    """
    height, width, _ = image_hwc.shape
    plan = plan_tiles(height, width, tile, halo, size_factor)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preprocess = preprocess or (lambda t: t.astype(np.float32))
    stitched: np.ndarray | None = None
    for zones, batch in prefetched(_batches(image_hwc, plan, preprocess, batch_size), prefetch, "tile-prefetch"):
        probs = np.asarray(predict_fn(batch))
        if probs.ndim != 4 or probs.shape[:3] != batch.shape[:3]:
            raise ValueError(f"predict_fn returned shape {probs.shape} for input {batch.shape}; expected (N, H, W, K) with the input's N, H, W")
        for zone, tile_probs in zip(zones, probs):
            part = tile_probs[zone.crop()]
            if sink is not None:
                sink(zone, part)
                continue
            if stitched is None:
                stitched = np.empty((height, width, probs.shape[3]), np.float32)
            stitched[zone.y0 : zone.y1, zone.x0 : zone.x1] = part
        if progress is not None:
            progress(len(zones))
    return stitched
