"""Inference outputs: in memory then one file, or zone by zone in a writer thread (tiled TIFF, OME-Zarr).

Every output is written under a temporary name and renamed when complete, with the input's calibration
(:mod:`segkit.calibration`); probabilities are channel-first (C, Y, X), as Fiji and napari expect; OME-Zarr
outputs get a multiscale pyramid when large. See README.md, "Stage 3" (outputs).
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from typing import Any, Callable, Iterator

import numpy as np

from segkit import cliutil, image_io, tiling
from segkit.calibration import Calibration, ome_zarr_unit, tiff_kwargs
from segkit.inference.settings import Settings
from segkit.tiling import PerAxis

WRITE_QUEUE_TILES = 4
PYRAMID_MAX_SIDE = 1024  # OME-Zarr levels halve the image while its largest side is above this
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # pixel types an ImageJ hyperstack can hold

_END = object()


class _ArrayOutput:
    """Zones pasted into an in-memory array (spatial axes, then the class axis for probabilities);
    the file is written on successful exit, probabilities channel-first."""

    def __init__(self, tmp_path: str, shape: tuple[int, ...], dtype: np.dtype, encode: Callable,
                 channels: bool = False, calibration: Calibration | None = None):
        self.tmp_path, self.encode, self.channels, self.calibration = tmp_path, encode, channels, calibration
        self.array = np.zeros(shape, dtype)

    def __enter__(self) -> _ArrayOutput:
        return self

    def put(self, zone: tiling.Zone, probs_hwk: np.ndarray) -> None:
        self.array[zone.region()] = self.encode(probs_hwk)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            array = class_axis_stored(self.array) if self.channels else self.array
            write_whole(self.tmp_path, array, channels=self.channels, calibration=self.calibration)


def tiff_axes(ndim: int, channels: bool) -> str:
    """'YX', 'CYX', 'ZYX' or 'ZCYX': the class axis before Y, X, as ImageJ hyperstacks are stored."""
    spatial = ndim - 1 if channels else ndim
    axes = "ZYX"[-spatial:]
    return axes[:-2] + "C" + axes[-2:] if channels else axes


def class_axis_stored(array: np.ndarray) -> np.ndarray:
    """Probabilities (spatial..., K) -> as stored in TIFFs: (K, Y, X) or (Z, K, Y, X) (:func:`tiff_axes`)."""
    return np.moveaxis(array, -1, -3)


def write_whole(path: str, array: np.ndarray, channels: bool = False, calibration: Calibration | None = None) -> None:
    """One output file: an ImageJ TIFF (zlib, calibrated; ``array`` channel-first when ``channels``), else PNG."""
    if os.path.splitext(path)[1].lower() not in image_io.TIFF_EXTENSIONS:
        import imageio.v3 as iio

        iio.imwrite(path, array)
        return
    import tifffile

    axes = tiff_axes(array.ndim, channels)
    spacing = {"spacing": calibration.pixel_size_yx[0]} if calibration and "Z" in axes \
        and len(calibration.pixel_size_yx) == 3 else {}  # a volume's z step (ImageJ's 'spacing')
    if array.dtype in IMAGEJ_DTYPES:
        extra = tiff_kwargs(calibration, imagej=True)
        metadata = {"axes": axes, **spacing, **({"unit": extra.pop("unit")} if "unit" in extra else {})}
        tifffile.imwrite(path, array, imagej=True, compression="zlib", metadata=metadata, **extra)
    else:  # e.g. uint32 masks of > 65535 classes: a plain TIFF
        tifffile.imwrite(path, array, compression="zlib", photometric="minisblack", metadata={"axes": axes, **spacing},
                         **tiff_kwargs(calibration, imagej=False))


class _ThreadedOutput:
    """Zones handed to a writer thread through a bounded queue (so writing overlaps the model)."""

    def __init__(self, encode: Callable):
        self.encode = encode
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_TILES)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> _ThreadedOutput:
        self._thread.start()
        return self

    def _items(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if self._stop.is_set():
                raise RuntimeError("output aborted")  # ends the writer; the temporary is removed
            if item is _END:
                return
            yield item

    def _run(self) -> None:
        try:
            self.consume(self._items())
        except BaseException as exc:  # re-raised in the model thread by put() / __exit__
            self._error = exc

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        raise NotImplementedError

    def _put(self, item: Any) -> None:
        while True:
            if self._error is not None or not self._thread.is_alive():
                if item is _END and self._error is None:
                    return  # the writer took every tile it needed and finished (tifffile does)
                raise RuntimeError(f"{type(self).__name__} writer stopped") from self._error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def put(self, zone: tiling.Zone, probs_hwk: np.ndarray) -> None:
        self._put((zone, self.encode(probs_hwk)))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._put(_END)
            except BaseException:  # Ctrl-C while the queue is full, or the writer failed
                self._stop.set()
                self._join()
                raise
            self._join()
            if self._error is not None:
                raise self._error
            return
        self._stop.set()
        self._join()

    def _join(self) -> None:
        """Join the writer even through Ctrl-C (re-raised once it ended): no thread of ours outlives the
        image's source or writes into a temporary already removed (issue #17)."""
        interrupted = False
        while self._thread.is_alive():
            if self._stop.is_set():  # wake a writer waiting for a tile; a full queue wakes it anyway
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_END)
            try:
                self._thread.join()
            except KeyboardInterrupt:
                interrupted = True
                self._stop.set()
        if interrupted:
            raise KeyboardInterrupt


class _TiffTileOutput(_ThreadedOutput):
    """A tiled, zlib-compressed, calibrated BigTIFF written tile by tile (zones in raster order = TIFF tiles).

    Probabilities (``channels``) are stored channel-first, one plane per class; zones arrive with every
    class at once, so they are gathered in a disk-backed array beside the output first. Volumes too (a zone
    spans several pages), then written as an ImageJ stack (:func:`write_whole`) from that array.
    """

    def __init__(self, tmp_path: str, shape: tuple[int, ...], dtype: np.dtype, tile: PerAxis, encode: Callable,
                 channels: bool = False, calibration: Calibration | None = None):
        super().__init__(encode)
        self.tmp_path, self.shape, self.dtype, self.tile = tmp_path, shape, np.dtype(dtype), tile
        self.channels, self.calibration = channels, calibration

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        import tifffile

        spatial_ndim = len(self.shape) - (1 if self.channels else 0)
        options = dict(tile=tiling.per_axis(self.tile, spatial_ndim, "tile")[-2:], compression="zlib",
                       photometric="minisblack", metadata={"axes": tiff_axes(len(self.shape), self.channels)},
                       **tiff_kwargs(self.calibration, imagej=False))
        if not self.channels and spatial_ndim == 2:
            with tifffile.TiffWriter(self.tmp_path, bigtiff=True) as tif:
                tif.write((data for _, data in items), shape=self.shape, dtype=self.dtype, **options)
            return
        spill = cliutil.make_temp(self.tmp_path, suffix=".npy")
        try:
            spatial, classes = (self.shape[:-1], self.shape[-1:]) if self.channels else (self.shape, ())
            stored = tuple(spatial[:-2]) + tuple(classes) + tuple(spatial[-2:])  # class_axis_stored's layout
            planes = np.lib.format.open_memmap(spill, mode="w+", dtype=self.dtype, shape=stored)
            pasted = np.moveaxis(planes, -3, -1) if self.channels else planes  # (spatial..., K) view
            for zone, data in items:
                pasted[zone.region()] = data
            planes.flush()
            if spatial_ndim == 3:
                write_whole(self.tmp_path, planes, channels=self.channels, calibration=self.calibration)
            else:
                with tifffile.TiffWriter(self.tmp_path, bigtiff=True) as tif:
                    tif.write(planes, **options)
            del planes, pasted
        finally:
            os.remove(spill)


class _ZarrOutput(_ThreadedOutput):
    """OME-Zarr 0.4 (zarr format 2): a mask ([z,] y, x) or probabilities (c, [z,] y, x), named after the
    image, scaled by its calibration, with levels halved (nearest neighbour for masks, mean for
    probabilities) while the largest side exceeds PYRAMID_MAX_SIDE.

    ``shape`` is the spatial shape, plus the class axis last when ``channels`` (probabilities).
    """

    def __init__(self, tmp_dir: str, shape: tuple[int, ...], dtype: np.dtype, tile: PerAxis, encode: Callable,
                 channels: bool, name: str = "", calibration: Calibration | None = None):
        super().__init__(encode)
        self.tmp_dir, self.shape, self.dtype, self.tile = tmp_dir, shape, np.dtype(dtype), tile
        self.channels, self.name, self.calibration = channels, name, calibration

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        import zarr

        spatial = self.shape[:-1] if self.channels else self.shape
        group = zarr.open_group(self.tmp_dir, mode="w", zarr_format=2)
        array = create_zarr_level(group, "0", spatial, self.shape[-1] if self.channels else None, self.dtype, self.tile)
        for zone, data in items:
            if self.channels:
                array[(slice(None),) + zone.region()] = np.moveaxis(data, -1, 0)
            else:
                array[zone.region()] = data
        finish_pyramid(group, array, len(spatial), self.channels, self.tile, self.name, self.calibration)


def create_zarr_level(group, path: str, spatial: tuple[int, ...], classes: int | None, dtype: np.dtype,
                      tile: PerAxis):
    """One level of an OME-Zarr output: ([classes,] spatial...), chunked by the zone size (one chunk per zone
    at level 0), Zstd, chunk keys '/'-separated (segkit.inference.blocks renames chunk files by these keys)."""
    import numcodecs

    shape = ((classes,) if classes else ()) + tuple(spatial)
    tiles = tiling.per_axis(tile, len(spatial), "tile")
    chunks = ((classes,) if classes else ()) + tuple(min(t, n) for t, n in zip(tiles, spatial))
    return group.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              compressors=numcodecs.Zstd(level=3), chunk_key_encoding={"name": "v2", "separator": "/"})


def finish_pyramid(group, array, spatial_ndim: int, channels: bool, tile: PerAxis, name: str,
                   calibration: Calibration | None) -> int:
    """Levels 1.. halved from level 0 (``array``, complete) while the largest side exceeds PYRAMID_MAX_SIDE, and
    the ``multiscales`` metadata; returns the number of levels."""
    levels = [array]
    while max(levels[-1].shape[-spatial_ndim:]) > PYRAMID_MAX_SIDE:
        levels.append(_halve(group, levels[-1], len(levels), spatial_ndim, channels, tile))
    group.attrs["multiscales"] = [multiscales_entry(name, spatial_ndim, channels, len(levels), calibration)]
    return len(levels)


def _halve(group, source, level: int, spatial_ndim: int, channels: bool, tile: PerAxis):
    """The next level from ``source``, a band of rows at a time (memory: two bands)."""
    spatial = tuple(-(-n // 2) for n in source.shape[-spatial_ndim:])
    target = create_zarr_level(group, str(level), spatial, source.shape[0] if channels else None, source.dtype, tile)
    lead = (slice(None),) * (source.ndim - 2)  # class and z axes are read whole per band
    rows = 2 * tiling.per_axis(tile, spatial_ndim, "tile")[-2]
    for y in range(0, source.shape[-2], rows):
        band = np.asarray(source[lead + (slice(y, y + rows),)])
        target[lead + (slice(y // 2, y // 2 + -(-band.shape[-2] // 2)),)] = downsample2(band, spatial_ndim, mean=channels)
    return target


def downsample2(array: np.ndarray, spatial_ndim: int, mean: bool) -> np.ndarray:
    """Halve the last ``spatial_ndim`` axes (odd sizes round up): nearest neighbour (every other pixel,
    for class masks), or the mean of each 2x2(x2) block with the border replicated (probabilities)."""
    axes = tuple(range(array.ndim - spatial_ndim, array.ndim))  # a volume's z halves too (a band holds every z)
    if not mean:
        return array[tuple(slice(None, None, 2) if a in axes else slice(None) for a in range(array.ndim))]
    pad = [(0, array.shape[a] % 2 if a in axes else 0) for a in range(array.ndim)]
    padded = np.pad(array.astype(np.float32), pad, mode="edge")
    shape = []
    for a, n in enumerate(padded.shape):
        shape += [n // 2, 2] if a in axes else [n]
    blocks = padded.reshape(shape).mean(axis=tuple(a + k + 1 for k, a in enumerate(axes)))
    return np.rint(blocks).astype(array.dtype) if np.issubdtype(array.dtype, np.integer) else blocks.astype(array.dtype)


def multiscales_entry(name: str, spatial_ndim: int, channels: bool, levels: int,
                      calibration: Calibration | None) -> dict:
    """OME-Zarr 0.4 ``multiscales`` metadata: axes with units, one scale transformation per level."""
    unit = ome_zarr_unit(calibration)
    axes = [{"name": axis, "type": "space", **({"unit": unit} if unit else {})} for axis in "zyx"[-spatial_ndim:]]
    if channels:
        axes.insert(0, {"name": "c", "type": "channel"})
    size = list(calibration.pixel_size_yx) if calibration else [1.0] * 2
    size = ([1.0] * (spatial_ndim - len(size)) + size)[-spatial_ndim:]
    datasets = [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": (
        [1.0] if channels else []) + [s * 2**level for s in size]}]} for level in range(levels)]
    return {"version": "0.4", "name": name, "axes": axes, "datasets": datasets}


@contextlib.contextmanager
def atomic_dir(final_path: str) -> Iterator[str]:
    """Like ``cliutil.atomic_path`` for a folder: a hidden temporary folder renamed into place."""
    tmp = cliutil.make_temp(final_path, directory=True)
    try:
        yield tmp
        if os.path.exists(final_path):  # --overwrite: move the old one aside, then remove it
            old = cliutil.make_temp(final_path, suffix=".old", directory=True)
            os.replace(final_path, os.path.join(old, "x"))
            os.replace(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _encoder(kind: str, settings: Settings) -> tuple[Callable[[np.ndarray], np.ndarray], np.dtype]:
    return encoder(kind, settings.number_classes, settings.probability_dtype)


def encoder(kind: str, number_classes: int, probability_dtype: str = "float32"
            ) -> tuple[Callable[[np.ndarray], np.ndarray], np.dtype]:
    """(probabilities (..., K) -> stored values, their dtype) for ``kind`` 'mask' (the class index in the
    smallest unsigned type) or 'probabilities' (float32, or uint8 = round(255 p))."""
    if kind == "mask":
        dtype = image_io.dtype_for_classes(number_classes)
        return (lambda p: np.argmax(p, axis=-1).astype(dtype)), dtype
    if probability_dtype == "uint8":
        return (lambda p: np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)), np.dtype(np.uint8)
    return (lambda p: np.asarray(p, np.float32)), np.dtype(np.float32)


def open_outputs(stack: contextlib.ExitStack, todo: dict[str, str], spatial_shape: tuple[int, ...],
                 out_of_core: bool, settings: Settings, calibration: Calibration | None = None,
                 name: str = "", tile: PerAxis | None = None) -> list[Any]:
    """One writer per prediction output to (re)write; temporaries are removed on failure.

    ``spatial_shape``: the image's (height, width) (or a volume's (z, y, x): zarr or in memory).
    ``calibration``: the input's pixel size (written into every output); ``name``: the image's name
    (OME-Zarr ``multiscales.name``); ``tile``: the zone size (TIFF tiles, zarr chunks; default the
    settings' tile size).
    """
    outputs = []
    for kind in ("mask", "probabilities", "labels"):
        if kind in todo:
            os.makedirs(os.path.dirname(todo[kind]), exist_ok=True)
            outputs.append(_open_output(stack, kind, todo[kind], tuple(spatial_shape), out_of_core, settings,
                                        calibration, name, settings.tile_size if tile is None else tile))
    return outputs


def _open_output(stack: contextlib.ExitStack, kind: str, path: str, spatial: tuple[int, ...], out_of_core: bool,
                 settings: Settings, calibration: Calibration | None, name: str, tile: PerAxis) -> Any:
    if kind == "labels":  # instance labels (segkit.inference.instances_out)
        from segkit.inference.instances_out import LabelOutput

        return stack.enter_context(LabelOutput(path, spatial, out_of_core, settings, calibration, name, tile))
    encode, dtype = _encoder(kind, settings)
    channels = kind != "mask"
    shape = spatial + (settings.number_classes,) if channels else spatial
    return open_writer(stack, path, shape, dtype, tile, encode, channels, out_of_core, settings.output_format,
                       calibration, name)


def open_writer(stack: contextlib.ExitStack, path: str, shape: tuple[int, ...], dtype: np.dtype, tile: PerAxis,
                encode: Callable, channels: bool, out_of_core: bool, output_format: str,
                calibration: Calibration | None = None, name: str = "") -> Any:
    """The writer of one output file (``put(zone, data)``, data encoded by ``encode``): OME-Zarr, a tiled
    TIFF out of core, else one array written on exit; atomic (temporaries removed on failure)."""
    if output_format == "zarr":
        tmp = stack.enter_context(atomic_dir(path))
        return stack.enter_context(_ZarrOutput(tmp, shape, dtype, tile, encode, channels=channels,
                                               name=name, calibration=calibration))
    if out_of_core and os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS:
        tmp = stack.enter_context(cliutil.atomic_path(path, suffix=".tif"))
        return stack.enter_context(_TiffTileOutput(tmp, shape, dtype, tile, encode, channels=channels,
                                                   calibration=calibration))
    tmp = stack.enter_context(cliutil.atomic_path(path, suffix=os.path.splitext(path)[1]))
    return stack.enter_context(_ArrayOutput(tmp, shape, dtype, encode, channels=channels, calibration=calibration))
