"""Inference outputs: in memory then one file, or zone by zone in a writer thread (tiled TIFF, OME-Zarr).

Every output is written under a temporary name and renamed when complete. See README.md, "Stage 3".
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from typing import Any, Callable, Iterator

import numpy as np

from segkit import cliutil
from segkit import image_io
from segkit import tiling
from segkit.inference.settings import Settings

WRITE_QUEUE_TILES = 4

_END = object()


class _ArrayOutput:
    """Zones pasted into an in-memory array; the file is written on successful exit."""

    def __init__(self, tmp_path: str, shape: tuple[int, ...], dtype: np.dtype, encode: Callable):
        self.tmp_path, self.encode = tmp_path, encode
        self.array = np.zeros(shape, dtype)

    def __enter__(self) -> "_ArrayOutput":
        return self

    def put(self, zone: tiling.Zone, probs_hwk: np.ndarray) -> None:
        self.array[zone.region()] = self.encode(probs_hwk)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            _write_whole(self.tmp_path, self.array)


def _write_whole(path: str, array: np.ndarray) -> None:
    if os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS:
        import tifffile

        tifffile.imwrite(path, array, compression="zlib", photometric="minisblack", metadata=None,
                         planarconfig="contig" if array.ndim == 3 else None)
    else:
        import imageio.v3 as iio

        iio.imwrite(path, array)


class _ThreadedOutput:
    """Zones handed to a writer thread through a bounded queue (so writing overlaps the model)."""

    def __init__(self, encode: Callable):
        self.encode = encode
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_TILES)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> "_ThreadedOutput":
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
            self._put(_END)
            self._thread.join()
            if self._error is not None:
                raise self._error
            return
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_END)
        self._thread.join()


class _TiffTileOutput(_ThreadedOutput):
    """A tiled, zlib-compressed BigTIFF written tile by tile (zones in raster order = TIFF tiles)."""

    def __init__(self, tmp_path: str, shape: tuple[int, ...], dtype: np.dtype, tile: int, encode: Callable):
        super().__init__(encode)
        self.tmp_path, self.shape, self.dtype, self.tile = tmp_path, shape, np.dtype(dtype), tile

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        import tifffile

        with tifffile.TiffWriter(self.tmp_path, bigtiff=True) as tif:
            tif.write((data for _, data in items), shape=self.shape, dtype=self.dtype, tile=(self.tile, self.tile),
                      compression="zlib", photometric="minisblack", metadata=None,
                      planarconfig="contig" if len(self.shape) == 3 else None)


class _ZarrOutput(_ThreadedOutput):
    """OME-Zarr 0.4 (zarr format 2), one level: a mask ([z,] y, x) or probabilities (c, [z,] y, x).

    ``shape`` is the spatial shape, plus the class axis last when ``channels`` (probabilities).
    """

    def __init__(self, tmp_dir: str, shape: tuple[int, ...], dtype: np.dtype, tile: int, encode: Callable,
                 channels: bool):
        super().__init__(encode)
        self.tmp_dir, self.shape, self.dtype, self.tile = tmp_dir, shape, np.dtype(dtype), tile
        self.channels = channels

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        import numcodecs
        import zarr

        channels_first = self.channels
        spatial = self.shape[:-1] if channels_first else self.shape
        shape = (self.shape[-1],) + spatial if channels_first else spatial
        chunks = ((shape[0],) if channels_first else ()) + (self.tile,) * len(spatial)
        group = zarr.open_group(self.tmp_dir, mode="w", zarr_format=2)
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=self.dtype, fill_value=0,
                                   compressors=numcodecs.Zstd(level=3),
                                   chunk_key_encoding={"name": "v2", "separator": "/"})
        for zone, data in items:
            if channels_first:
                array[(slice(None),) + zone.region()] = np.moveaxis(data, -1, 0)
            else:
                array[zone.region()] = data
        axes = [{"name": name, "type": "space"} for name in "zyx"[-len(spatial):]]
        if channels_first:
            axes.insert(0, {"name": "c", "type": "channel"})
        group.attrs["multiscales"] = [{
            "version": "0.4", "name": os.path.basename(self.tmp_dir), "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(shape)}]}],
        }]


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
    if kind == "mask":
        dtype = image_io.dtype_for_classes(settings.number_classes)
        return (lambda p: np.argmax(p, axis=-1).astype(dtype)), dtype
    if settings.probability_dtype == "uint8":
        return (lambda p: np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)), np.dtype(np.uint8)
    return (lambda p: np.asarray(p, np.float32)), np.dtype(np.float32)


def open_outputs(stack: contextlib.ExitStack, todo: dict[str, str], spatial_shape: tuple[int, ...],
                 out_of_core: bool, settings: Settings) -> list[Any]:
    """One writer per prediction output to (re)write; temporaries are removed on failure.

    ``spatial_shape``: the image's (height, width) (or a volume's (z, y, x): zarr or in memory).
    """
    outputs = []
    for kind in ("mask", "probabilities"):
        if kind not in todo:
            continue
        path = todo[kind]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        encode, dtype = _encoder(kind, settings)
        spatial = tuple(spatial_shape)
        shape = spatial if kind == "mask" else spatial + (settings.number_classes,)
        if settings.output_format == "zarr":
            tmp = stack.enter_context(atomic_dir(path))
            outputs.append(stack.enter_context(
                _ZarrOutput(tmp, shape, dtype, settings.tile_size, encode, channels=kind != "mask")))
        elif out_of_core and os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS:
            tmp = stack.enter_context(cliutil.atomic_path(path, suffix=".tif"))
            outputs.append(stack.enter_context(_TiffTileOutput(tmp, shape, dtype, settings.tile_size, encode)))
        else:
            tmp = stack.enter_context(cliutil.atomic_path(path, suffix=os.path.splitext(path)[1]))
            outputs.append(stack.enter_context(_ArrayOutput(tmp, shape, dtype, encode)))
    return outputs
