"""Reading images and volumes for inference: whole, or lazily region by region (TIFF, zarr, HDF5) when large.

One lazy view for any number of spatial axes (:class:`LazyView`). See README.md, "Stage 3" (out-of-core, volumes).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from segkit import build_volume, image_io, volume_io
from segkit.calibration import Calibration, read_calibration
from segkit.cliutil import InputError
from segkit.inference.settings import Settings

log = logging.getLogger("inference_unet.regions")

MAX_BLOCK_BYTES = 256 * 2**20  # out-of-core reads need a TIFF stored in tiles or strips smaller than this


class LazyView(volume_io.ZYXCView):
    """Spatial axes then channels (HWC, ZYXC) view of an on-disk array (np.memmap, zarr, HDF5) stored in
    another axis order: ``order`` names the stored axis of each view axis (volume_io.ZYXCView's rule).

    ``view[y0:y1, x0:x1]`` (``view[z0:z1, y0:y1, x0:x1]``) reads only that region; steps are allowed.
    Read errors become ``image_io.ImageReadError`` naming the file.
    """

    def __init__(self, array: Any, order: tuple[int | None, ...], path: str):
        super().__init__(array, order)
        self.path = path

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return super().__getitem__(key)
        except IndexError:
            raise
        except Exception as exc:  # every codec raises its own types
            raise image_io.ImageReadError(f"{self.path}: cannot read region ({type(exc).__name__}: {exc})") from exc

    def chunk_shape(self) -> tuple[int, ...] | None:
        """The stored chunk along each spatial axis of the view (None when not chunked: memory-mapped)."""
        chunks = getattr(self.array, "chunks", None)
        if not chunks:
            return None
        return tuple(1 if axis is None else int(chunks[axis]) for axis in self.order[:-1])


def hwc_order(shape: tuple[int, ...], path: str) -> tuple[int | None, ...]:
    """Stored axes of (H, W, C) for an array stored HW, HWC or CHW (``image_io.to_hwc``'s rule; other
    singleton axes are dropped)."""
    kept = list(range(len(shape))) if len(shape) <= 3 else [i for i, n in enumerate(shape) if n != 1]
    if len(kept) == 2:
        return kept[0], kept[1], None
    if len(kept) == 3:
        if shape[kept[0]] <= 4 and shape[kept[2]] > 4:  # CHW
            return kept[1], kept[2], kept[0]
        return tuple(kept)
    raise ValueError(f"{path}: expected a 2-D image (HW or HWC), got shape {tuple(shape)}")


class LazyHWC(LazyView):
    """:class:`LazyView` of a 2-D image stored HW, HWC or CHW (:func:`hwc_order`)."""

    def __init__(self, array: Any, path: str):
        super().__init__(array, hwc_order(tuple(int(n) for n in array.shape), path), path)


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


def open_any(path: str, volume: bool = False, dataset: str | None = None,
             role: str = "image") -> tuple[Any, Callable[[], None]]:
    """A view (spatial axes, then channels) of an image or mask file: lazy for TIFF / zarr, else read whole.
    ``volume``: a z-stack, .zarr or HDF5 volume read lazily as ZYXC (``dataset`` inside a container, else
    build_volume.address's default for ``role`` 'image' or 'mask')."""
    if volume:
        view, opened_volume = open_volume_view(path, dataset, role)
        return view, opened_volume.close
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or ext in image_io.TIFF_EXTENSIONS:
        return open_lazy(path)
    return image_io.to_hwc(image_io.read_image(path)), lambda: None


@contextlib.contextmanager
def opened(path: str, volume: bool = False, dataset: str | None = None, role: str = "image") -> Iterator[Any]:
    """:func:`open_any` as a context manager: the view, closed on exit."""
    array, close = open_any(path, volume, dataset, role)
    try:
        yield array
    finally:
        close()


# --- volumes ------------------------------------------------------------------------------------


def open_volume_view(path: str, dataset: str | None = None,
                     role: str = "image") -> tuple[LazyView, volume_io.Volume]:
    """(lazy ZYXC view, the opened Volume: close it) of a TIFF stack, .zarr store or HDF5 file.
    Bad axes, datasets or files raise InputError in one line (volume_io)."""
    try:
        volume = volume_io.open_volume(build_volume.address(path, dataset, role), lazy=True)
    except InputError as exc:
        if dataset is None and "several datasets" in str(exc):
            raise InputError(f"{exc}, or pass --{role}_dataset DATASET") from None
        raise
    stored = volume.data_zyxc
    return LazyView(stored.array, stored.order, path), volume


def is_volume(path: str, channels: int) -> bool:
    """A .zarr / HDF5 container, or a TIFF whose z axis (ImageJ, OME) or stack of pages makes it a z-stack.

    A plain multi-page TIFF with exactly ``channels`` pages stays a multichannel 2-D image (CHW), as before
    volumes were read. Unreadable files are not volumes (the 2-D reader reports them).
    """
    if os.path.isdir(path) or path.lower().endswith(build_volume.CONTAINER_EXTENSIONS):
        return True
    if os.path.splitext(path)[1].lower() not in image_io.TIFF_EXTENSIONS:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(int(n) for n in tif.series[0].shape)
            sizes = dict(zip(tif.series[0].axes.upper(), shape))
    except Exception:
        return False
    if sizes.get("Z", 1) > 1:
        return True
    pages = max((sizes.get(axis, 1) for axis in "IQ"), default=1)
    squeezed = tuple(n for n in shape if n != 1)
    if len(squeezed) == 3 and squeezed[-1] <= 4 and squeezed[-1] == channels:
        return False  # HWC with the model's channels (image_io.to_hwc's rule), however tifffile paged it
    return pages > 1 and pages != channels


# --- a source to predict -------------------------------------------------------------------------


@dataclass
class Source:
    """What is predicted: ``image`` (spatial axes then channels: HWC, ZYXC; numpy or :class:`LazyView`)."""

    image: Any
    out_of_core: bool
    close: Callable[[], None]
    volume: bool = False
    calibration: Calibration | None = None
    stats_blocks: dict[str, Any] = field(default_factory=dict)  # image_io.image_stats chunking

    @property
    def image_hwc(self) -> Any:  # the 2-D name
        return self.image


def working_set_bytes(*sizes: int) -> int:
    """float32 image + float32 probabilities: what whole-image processing would hold.
    ``sizes``: the spatial sizes (height, width; or z, y, x), then channels, then classes."""
    *spatial, channels, number_classes = sizes
    return int(np.prod(spatial, dtype=np.int64)) * (channels + number_classes) * 4


def open_source(path: str, settings: Settings) -> Source:
    """Open an image or volume for prediction; lazily when its working set is over the limit (TIFF, and
    every volume format). Raises ImageReadError / ValueError (wrong channel count or pixel type) for this
    image, InputError for a volume this toolkit cannot read or a 2-D image given to a volume model."""
    if is_volume(path, settings.meta.channels):
        return open_volume_source(path, settings)
    if settings.spatial_rank == 3:
        raise InputError(f"{path}: a 2-D image, but the model segments volumes (spatial rank 3); give z-stacks "
                         "(a TIFF with a z axis or several pages, .zarr, .h5) or use a 2-D model")
    source = _open_image_source(path, settings)
    source.calibration = read_calibration(path)
    source.stats_blocks = stats_blocks(source.image)
    return source


def open_volume_source(path: str, settings: Settings) -> Source:
    """A volume: lazily when its working set is over the limit, else read whole (the same statistics blocks
    either way, so both give the same result)."""
    view, volume = open_volume_view(path, settings.image_dataset)
    try:
        _check_image(view, path, settings.meta.channels)
        log.debug("%s", volume.description)
        spacing = volume.spacing_zyx_um
        calibration = Calibration(tuple(spacing), "micrometer") if spacing else None
        blocks = stats_blocks(view)
        if working_set_bytes(*view.shape, settings.number_classes) > settings.working_set_limit:
            return Source(view, True, volume.close, True, calibration, blocks)
        data = np.asarray(view[:])
    except BaseException:
        volume.close()
        raise
    volume.close()
    return Source(data, False, lambda: None, True, calibration, blocks)


def _open_image_source(path: str, settings: Settings) -> Source:
    channels, classes = settings.meta.channels, settings.number_classes
    is_tiff = os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS
    if is_tiff:
        view, close = open_lazy(path)
        try:
            _check_image(view, path, channels)
        except BaseException:
            close()
            raise
        if working_set_bytes(*view.shape, classes) > settings.working_set_limit:
            block = _block_bytes(view)
            if block <= MAX_BLOCK_BYTES:
                return Source(view, True, close)
            log.warning("%s: stored in compressed blocks of %.0f MB, so every region read would decode a whole "
                        "block; reading it whole instead (save it as a tiled TIFF for out-of-core inference)",
                        path, block / 2**20)
        close()
    image = image_io.to_hwc(image_io.read_image(path))
    if not is_tiff and working_set_bytes(*image.shape, classes) > settings.working_set_limit:
        log.warning("%s: larger than the memory limit, but only TIFF images can be read region by region; "
                    "read it whole", path)
    _check_image(image, path, channels)
    return Source(image, False, lambda: None)


def _block_bytes(view: LazyView) -> int:
    """Bytes one on-disk chunk decodes to (0 when memory-mapped)."""
    chunks = getattr(view.array, "chunks", None)
    return int(np.prod(chunks)) * view.dtype.itemsize if chunks else 0


def _check_image(image: Any, path: str, channels: int) -> None:
    image_io.check_dtype(image, path)
    if image.shape[-1] != channels:
        stack = _stack_hint(image, path) if image.ndim == 3 else None
        if stack:
            raise ValueError(f"{path}: {stack}; this model segments 2-D images: save the slices as separate images "
                             "or use a model trained on volumes")
        raise ValueError(f"{path}: image has {image.shape[-1]} channel(s) but the model expects {channels}; "
                         "convert it or use a model trained on such images")
    if min(image.shape[:-1]) < 1:
        raise ValueError(f"{path}: image has no pixels (shape {image.shape})")


def _stack_hint(image: Any, path: str) -> str | None:
    """``image_io.tiff_stack_hint`` for a lazy view too (its stored shape, no pixels read) (issue #17)."""
    if isinstance(image, LazyView):
        image = np.broadcast_to(np.zeros((), image.dtype), tuple(int(n) for n in image.array.shape))
    return image_io.tiff_stack_hint(path, image)


STATS_BLOCK_BYTES = 4 * 2**20  # float64 per image_stats block on disk


def stats_blocks(image: Any) -> dict[str, Any]:
    """image_stats chunking: in memory as in training; on disk, whole on-disk chunks (grown along the last
    axis to ~4 MB of float64); memory-mapped, 1024 x 1024 blocks of one section."""
    if not isinstance(image, LazyView):
        return {}
    spatial, channels = image.shape[:-1], image.shape[-1]
    chunks = image.chunk_shape()
    if chunks is None:  # memory-mapped: any block is cheap
        block = [1] * (len(spatial) - 2) + [1024, 1024]
    else:
        block = list(chunks)
        per_block = max(1, STATS_BLOCK_BYTES // (int(np.prod(block)) * channels * 8))
        block[-1] = min(spatial[-1], block[-1] * per_block)
    if len(spatial) == 2:
        return {"rows_per_chunk": block[0], "cols_per_chunk": block[1]}
    return {"block_shape": tuple(block)}
