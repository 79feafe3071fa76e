"""Reading images for inference: whole, or lazily region by region (TIFF, zarr) when they are large.

See README.md, "Stage 3" (out-of-core).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from segkit import image_io
from segkit.inference.settings import Settings

log = logging.getLogger("inference_unet.regions")

MAX_BLOCK_BYTES = 256 * 2**20  # out-of-core reads need a TIFF stored in tiles or strips smaller than this


class LazyHWC:
    """HWC view of an on-disk array (np.memmap or zarr) stored HW, HWC or CHW (``image_io.to_hwc``'s rule).

    ``view[y0:y1, x0:x1]`` reads only that region and returns it as an HWC numpy array;
    steps are allowed. Read errors become ``image_io.ImageReadError`` naming the file.
    """

    def __init__(self, array: Any, path: str):
        self._array, self.path = array, path
        shape = tuple(int(n) for n in array.shape)
        self._kept = [i for i, n in enumerate(shape)] if len(shape) <= 3 else [i for i, n in enumerate(shape) if n != 1]
        kept_shape = [shape[i] for i in self._kept]
        if len(kept_shape) == 2:
            self._kind = "HW"
        elif len(kept_shape) == 3:
            self._kind = "CHW" if kept_shape[0] <= 4 and kept_shape[2] > 4 else "HWC"
        else:
            raise ValueError(f"{path}: expected a 2-D image (HW or HWC), got shape {shape}")
        h, w, c = {"HW": (0, 1, None), "HWC": (0, 1, 2), "CHW": (1, 2, 0)}[self._kind]
        self.shape = (kept_shape[h], kept_shape[w], 1 if c is None else kept_shape[c])
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        ys, xs = (tuple(key) + (slice(None), slice(None)))[:2] if isinstance(key, tuple) else (key, slice(None))
        index: list[Any] = [0] * len(self._array.shape)
        spatial = {"HW": (ys, xs), "HWC": (ys, xs, slice(None)), "CHW": (slice(None), ys, xs)}[self._kind]
        for axis, item in zip(self._kept, spatial):
            index[axis] = item
        try:
            region = np.asarray(self._array[tuple(index)])
        except Exception as exc:  # every codec raises its own types
            raise image_io.ImageReadError(f"{self.path}: cannot read region ({type(exc).__name__}: {exc})") from exc
        if self._kind == "HW":
            return region[:, :, None]
        return np.moveaxis(region, 0, -1) if self._kind == "CHW" else region


def open_lazy(path: str) -> tuple[LazyHWC, Callable[[], None]]:
    """Open a TIFF or a zarr folder for region reads; returns (view, close)."""
    import zarr

    if os.path.isdir(path):  # our OME-Zarr outputs
        return LazyHWC(zarr.open_group(path, mode="r")["0"], path), lambda: None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            contiguous = tif.series[0].dataoffset is not None
        if contiguous:  # uncompressed: the OS pages regions in
            return LazyHWC(tifffile.memmap(path, mode="r"), path), lambda: None
        store = tifffile.imread(path, aszarr=True)  # series 0, full resolution
        array = zarr.open(store, mode="r")
        if isinstance(array, zarr.Group):  # pyramid: level 0
            array = array["0"]
        return LazyHWC(array, path), store.close
    except Exception as exc:
        raise image_io.ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def open_any(path: str) -> tuple[Any, Callable[[], None]]:
    """An HWC view of an image or mask file: lazy for TIFF / zarr, else read whole."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or ext in image_io.TIFF_EXTENSIONS:
        return open_lazy(path)
    return image_io.to_hwc(image_io.read_image(path)), lambda: None


@contextlib.contextmanager
def opened(path: str) -> Iterator[Any]:
    """:func:`open_any` as a context manager: the view, closed on exit."""
    array, close = open_any(path)
    try:
        yield array
    finally:
        close()


@dataclass
class Source:
    image_hwc: Any          # np.ndarray or LazyHWC
    out_of_core: bool
    close: Callable[[], None]


def working_set_bytes(height: int, width: int, channels: int, number_classes: int) -> int:
    """float32 image + float32 probabilities: what whole-image processing would hold."""
    return height * width * (channels + number_classes) * 4


def open_source(path: str, settings: Settings) -> Source:
    """Open an image for prediction; lazily when its working set is over the limit (TIFF only).

    Raises ImageReadError / ValueError (wrong channel count or pixel type) for this image.
    """
    channels, classes = settings.meta.channels, settings.number_classes
    is_tiff = os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS
    if is_tiff:
        view, close = open_lazy(path)
        try:
            _check_image(view, path, channels)
        except BaseException:
            close()
            raise
        if working_set_bytes(view.shape[0], view.shape[1], channels, classes) > settings.working_set_limit:
            block = _block_bytes(view)
            if block <= MAX_BLOCK_BYTES:
                return Source(view, True, close)
            log.warning("%s: stored in compressed blocks of %.0f MB, so every region read would decode a whole "
                        "block; reading it whole instead (save it as a tiled TIFF for out-of-core inference)",
                        path, block / 2**20)
        close()
    image = image_io.to_hwc(image_io.read_image(path))
    if not is_tiff and working_set_bytes(image.shape[0], image.shape[1], channels, classes) > settings.working_set_limit:
        log.warning("%s: larger than the memory limit, but only TIFF images can be read region by region; "
                    "read it whole", path)
    _check_image(image, path, channels)
    return Source(image, False, lambda: None)


def _block_bytes(view: LazyHWC) -> int:
    """Bytes one on-disk chunk decodes to (0 when memory-mapped)."""
    chunks = getattr(view._array, "chunks", None)
    return int(np.prod(chunks)) * view.dtype.itemsize if chunks else 0


def _check_image(image: Any, path: str, channels: int) -> None:
    image_io.check_dtype(image, path)
    if image.shape[2] != channels:
        stack = _stack_hint(image, path)
        if stack:
            raise ValueError(f"{path}: {stack}; this model segments 2-D images: save the slices as separate images "
                             "or use a model trained on volumes")
        raise ValueError(f"{path}: image has {image.shape[2]} channel(s) but the model expects {channels}; "
                         "convert it or use a model trained on such images")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{path}: image has no pixels (shape {image.shape})")


def _stack_hint(image: Any, path: str) -> str | None:
    """``image_io.tiff_stack_hint`` for a lazy view too (its stored shape, no pixels read) (issue #17)."""
    if isinstance(image, LazyHWC):
        image = np.broadcast_to(np.zeros((), image.dtype), tuple(int(n) for n in image._array.shape))
    return image_io.tiff_stack_hint(path, image)


def stats_blocks(image: Any) -> dict[str, int | None]:
    """image_stats chunking: in memory as in training; on disk, whole on-disk chunks, ~4 MB of float64."""
    if not isinstance(image, LazyHWC):
        return {}
    height, width, channels = image.shape
    chunks = getattr(image._array, "chunks", None)
    if chunks is None:  # memory-mapped: any block is cheap
        rows = cols = 1024
    else:
        axis_y, axis_x = image._kept[:2] if image._kind != "CHW" else image._kept[1:]
        rows, cols = int(chunks[axis_y]), int(chunks[axis_x])
        per_block = max(1, (4 * 2**20) // (rows * cols * channels * 8))
        cols = min(width, cols * per_block)
    return {"rows_per_chunk": rows, "cols_per_chunk": cols}
