"""Stage 3: segment a folder of images with a trained SavedModel -- any image size, tiled exactly.

    python inference_unet.py --saved_model_filepath RUN/saved_model --image_folder IMAGES \\
        --output_folder MASKS [--image_format tif]

Channels, classes, normalization, size factor and receptive-field radius come from the
SavedModel's metadata (``model_metadata``); the other flags trade speed, memory and extras.

Outputs, in ``--output_folder``:

* ``NAME``: class-index mask under the image's file name (a ``.jpg``/``.webp`` image gets a
  lossless ``.png`` mask), in the smallest unsigned type that holds the classes. TIFF masks
  are zlib-compressed; out-of-core ones are tiled BigTIFF. ``--output_format zarr``:
  ``STEM.zarr`` instead (OME-Zarr 0.4, one resolution level, axes y x).
* ``probabilities/STEM.tif`` (``--save_probabilities 1``): H x W x K per-class probabilities,
  float32, or with ``--probability_dtype uint8`` round(255 * p) (p = value / 255, +-0.002).
  As zarr: ``probabilities/STEM.zarr``, axes c y x.
* ``overlays/STEM.png`` (``--overlay 1``): the mask in colour over the image, downsampled to at
  most 2048 pixels on a side; for people to look at.
* ``metrics.csv`` (``--mask_folder``): pixel accuracy, mean and per-class IoU and Dice per image
  and over all images (row ``ALL``); ground-truth masks pair with images by file stem. Their
  values are remapped first with ``--mask_map`` (default: the map the model's training databases
  were built with, from its metadata), so 0/255 masks score as classes 0/1 like in training.
  Sharded runs write ``metrics_shardI_of_N.csv``; rerun unsharded (all images are then
  skipped, only scored) for one file over the whole folder.

Tiling (``tiling.predict_tiled``): each zone of ``--tile_size`` pixels is predicted from a tile
with ``--halo`` pixels of context on every side, mirror-padded at the image border; with the
default halo (the model's theoretical receptive-field radius, rounded up to the size factor)
the masks equal whole-image prediction, whatever the tile size. The image is normalized with
the statistics of the WHOLE image, exactly as in training.

Out-of-core: an image whose float32 working set (H x W x (channels + classes) x 4 bytes) exceeds
``--memory_limit_mb`` (or a quarter of the available memory) is read region by region (TIFF:
memory-mapped if uncompressed, else through tifffile's zarr store) and its outputs are written
tile by tile, so memory depends on the tile size, not the image size. Other formats are read
whole. A reading thread prefetches normalized tiles and writer threads compress outputs while
the model runs.

Restart and faults: every output is written under a hidden temporary name
(``.NAME.tmp-HOST-PID-RANDOM``) and renamed when complete; images whose outputs exist are skipped
(``--overwrite 1`` redoes them). Temporaries of killed runs on this machine (dead PID) are removed
at the start of the next run; those of other machines are left alone (an array job may still
write them). An image that cannot be read, or has the wrong channel count or pixel type, is
reported in one line and skipped; the run goes on and exits with code 1 and a summary. Bad
flags: exit code 2.
Ctrl-C or SIGTERM (Slurm's pre-emption, time limit and ``scancel``): the image in progress is
abandoned, its temporaries are removed, exit code 130; a rerun does the images not yet finished.

Sharding: ``--shard_index I --shard_count N`` processes every N-th image starting at I (sorted
by name); under a Slurm array both default to the array task (``SLURM_ARRAY_TASK_ID`` minus
``SLURM_ARRAY_TASK_MIN``, divided by ``SLURM_ARRAY_TASK_STEP``; ``SLURM_ARRAY_TASK_COUNT``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from segkit import cliutil
from segkit import image_io
from segkit import metrics
from segkit import model_metadata
from segkit import tiling
from segkit.cliutil import InputError

log = logging.getLogger("inference_unet")

DEFAULT_TILE_SIZE = 1024
DEFAULT_MEMORY_LIMIT_MB = 2048
TIFF_TILE_MULTIPLE = 16  # TIFF tiles must be multiples of 16 pixels
OVERLAY_MAX_SIDE = 2048
WRITE_QUEUE_TILES = 4
EXIT_IMAGES_FAILED = 1
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
PROBABILITY_DTYPES = ("float32", "uint8")
OUTPUT_FORMATS = ("tif", "zarr")
PROBABILITIES_FOLDER, OVERLAYS_FOLDER = "probabilities", "overlays"  # under --output_folder
OUTPUT_SUBFOLDERS = (PROBABILITIES_FOLDER, OVERLAYS_FOLDER)
TILE_PROGRESS_MIN_TILES = 16
MAX_BLOCK_BYTES = 256 * 2**20  # out-of-core reads need a TIFF stored in tiles or strips smaller than this


# --- settings: resolved and validated before TensorFlow loads ---------------------------


@dataclass(frozen=True)
class Settings:
    saved_model_filepath: str
    image_folder: str
    output_folder: str
    names: tuple[str, ...]                 # this shard's images
    meta: dict[str, Any]
    tile_size: int
    halo: int
    batch_size: int
    save_probabilities: bool
    probability_dtype: str
    tta: bool
    masks: dict[str, str] | None          # image name -> ground-truth mask path
    mask_map: dict[int, int]              # ground-truth value -> class id before scoring ({} = as is)
    overlay: bool
    overwrite: bool
    output_format: str
    working_set_limit: int                # bytes
    shard: tuple[int, int]

    @property
    def size_factor(self) -> int:
        return int(self.meta["size_factor"])

    @property
    def number_classes(self) -> int:
        return int(self.meta["number_classes"])


def resolve_halo(halo: str | int | None, meta: dict[str, Any]) -> int:
    """'exact' (default): theoretical radius; 'erf': measured effective radius; or pixels.

    Rounded up to a multiple of the size factor so tiles align with the model's pooling grid.
    """
    factor = int(meta["size_factor"])
    radius = int(math.ceil(float(meta["receptive_field_radius"])))
    spec = "exact" if halo is None else str(halo).strip().lower()
    if spec == "exact":
        pixels = radius
    elif spec == "erf":
        if meta.get("effective_receptive_field_radius") is None:
            raise InputError("--halo erf: the SavedModel's metadata has no effective_receptive_field_radius; "
                             "use --halo exact or a number of pixels")
        pixels = int(math.ceil(float(meta["effective_receptive_field_radius"])))
    else:
        try:
            pixels = int(spec)
        except ValueError:
            raise InputError(f"--halo must be 'exact', 'erf' or a number of pixels >= 0, got {halo!r}") from None
        if pixels < 0:
            raise InputError(f"--halo must be >= 0 pixels, got {pixels}")
    rounded = -(-pixels // factor) * factor
    if rounded < radius:
        log.warning("halo %d px is below the model's receptive-field radius %d px: tiled masks can differ from "
                    "whole-image prediction near tile borders (use --halo exact for identical results)", rounded, radius)
    return rounded


def resolve_tile_size(tile_size: int, size_factor: int) -> int:
    """Round the zone size up to a multiple of the size factor and of 16 (TIFF tiles)."""
    if int(tile_size) < 1:
        raise InputError(f"--tile_size must be >= 1 pixel, got {tile_size}")
    step = math.lcm(size_factor, TIFF_TILE_MULTIPLE)
    return -(-int(tile_size) // step) * step


def _env_int(environ: dict[str, str], key: str) -> int | None:
    value = environ.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {key}={value!r} is not an integer; unset it or pass "
                         "--shard_index/--shard_count") from None


def resolve_shard(shard_index: int | None, shard_count: int | None,
                  environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count), defaulting to the Slurm array task when the flags are not given."""
    environ = dict(os.environ) if environ is None else environ
    if shard_count is None:
        shard_count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT") or 1
    if shard_index is None:
        task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
        shard_index = 0 if task is None else (task - first) // step
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise InputError(f"shard index {shard_index} is not in [0, shard count {shard_count}); check "
                         "--shard_index/--shard_count (or the Slurm array range)")
    return shard_index, shard_count


def shard_names(names: Sequence[str], index: int, count: int) -> list[str]:
    """Every ``count``-th name starting at ``index``: shards neither overlap nor leave gaps."""
    return list(names[index::count])


def _list_inputs(image_folder: str, image_format: str) -> list[str]:
    if not os.path.isdir(image_folder):
        raise InputError(f"--image_folder {image_folder}: not a folder")
    names = image_io.list_images(image_folder, image_format)
    if not names:
        raise InputError(image_io.no_images_message(image_folder, image_format))
    clashes = image_io.stem_clashes(names)
    if clashes:
        raise InputError(f"{image_folder}: images share a file stem ({', '.join(clashes[:5])}), so their outputs "
                         "would collide; rename or move one of each")
    return names


def pair_masks(names: Sequence[str], mask_folder: str) -> dict[str, str]:
    """Image name -> ground-truth mask path, paired by file stem (a.png scores a.tif)."""
    if not os.path.isdir(mask_folder):
        raise InputError(f"--mask_folder {mask_folder}: not a folder")
    by_stem = image_io.group_by_stem(image_io.list_images(mask_folder))
    pairs = {}
    for name in names:
        found = by_stem.get(image_io.stem(name), [])
        if len(found) > 1:
            raise InputError(f"{mask_folder}: several masks share the stem of {name} ({', '.join(found)}); keep one")
        if found:
            pairs[name] = os.path.join(mask_folder, found[0])
    return pairs


def _working_set_limit(memory_limit_mb: float) -> int:
    if memory_limit_mb <= 0:
        raise InputError(f"--memory_limit_mb must be > 0, got {memory_limit_mb}")
    limit = int(memory_limit_mb * 2**20)
    try:
        import psutil

        limit = min(limit, psutil.virtual_memory().available // 4)
    except ImportError:  # psutil is in requirements.txt; without it, the flag alone decides
        pass
    return limit


def resolve_settings(*, saved_model_filepath: str, image_folder: str, output_folder: str, image_format: str = "tif",
                     tile_size: int = DEFAULT_TILE_SIZE, halo: str | int | None = "exact", batch_size: int = 1,
                     save_probabilities: bool = False, probability_dtype: str = "float32", tta: bool = False,
                     mask_folder: str | None = None, overlay: bool = False, shard_index: int | None = None,
                     shard_count: int | None = None, overwrite: bool = False, output_format: str = "tif",
                     memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB, mask_map: str | None = None) -> Settings:
    """Check every input and resolve the settings; raises InputError. Reads no image, no TensorFlow."""
    try:
        meta = model_metadata.read_metadata(saved_model_filepath)
    except ValueError as exc:
        raise InputError(f"--saved_model_filepath: {exc}") from None
    method = (meta.get("normalization") or {}).get("method")
    if method != image_io.NORMALIZATION_METHOD:
        raise InputError(f"{saved_model_filepath}: the model was trained with normalization {method!r}, this toolkit "
                         f"applies {image_io.NORMALIZATION_METHOD!r}; re-export the model with this toolkit")
    if batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {batch_size}")
    if probability_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"--probability_dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {probability_dtype!r}")
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    names = _list_inputs(image_folder, image_format)
    if os.path.realpath(output_folder) == os.path.realpath(image_folder):
        raise InputError(f"--output_folder {output_folder} is the image folder: masks would replace the images; "
                         "choose another folder")
    index, count = resolve_shard(shard_index, shard_count)
    mine = shard_names(names, index, count)
    masks = pair_masks(mine, mask_folder) if mask_folder else None
    truth_map = resolve_mask_map(mask_map, meta) if masks is not None else {}
    tile, halo_px = resolve_tile_size(tile_size, int(meta["size_factor"])), resolve_halo(halo, meta)
    overhead = ((tile + 2 * halo_px) / tile) ** 2
    if overhead > 4:
        log.warning("each %d px tile computes %.1fx its zone because of the %d px halo: a larger --tile_size is "
                    "faster if memory allows (the result does not change)", tile, overhead, halo_px)
    return Settings(
        saved_model_filepath=saved_model_filepath, image_folder=image_folder, output_folder=output_folder,
        names=tuple(mine), meta=meta, tile_size=tile, halo=halo_px, batch_size=int(batch_size), save_probabilities=bool(save_probabilities),
        probability_dtype=probability_dtype, tta=bool(tta), masks=masks, mask_map=truth_map, overlay=bool(overlay),
        overwrite=bool(overwrite), output_format=output_format,
        working_set_limit=_working_set_limit(memory_limit_mb), shard=(index, count))


def resolve_mask_map(mask_map: str | None, meta: dict[str, Any]) -> dict[int, int]:
    """The ground-truth value -> class map: ``--mask_map`` when given (``none`` = as is), else the one the
    model's training databases were built with (metadata ``mask_map``), else none."""
    if mask_map is not None:
        if str(mask_map).strip().lower() == "none":
            return {}
        try:
            return image_io.parse_mask_map(mask_map)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    try:
        mapping = image_io.parse_mask_map(meta.get("mask_map") or {})
    except ValueError:
        raise InputError(f"the model's metadata has an invalid mask_map {meta.get('mask_map')!r}; pass --mask_map "
                         "yourself (e.g. 255:1, or none)") from None
    if mapping:
        log.info("ground-truth masks remapped with the model's --mask_map %s (from its training databases; "
                 "--mask_map none scores them as they are)", image_io.format_mask_map(mapping))
    return mapping


# --- output paths ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputPaths:
    mask: str
    probabilities: str | None
    overlay: str | None

    def todo(self, overwrite: bool) -> dict[str, str]:
        """Outputs to (re)write: all with ``overwrite``, else those that do not exist yet."""
        wanted = {"mask": self.mask, "probabilities": self.probabilities, "overlay": self.overlay}
        return {k: p for k, p in wanted.items() if p is not None and (overwrite or not os.path.exists(p))}


def output_paths(name: str, settings: Settings) -> OutputPaths:
    folder, base, ext = settings.output_folder, image_io.stem(name), os.path.splitext(name)[1]
    if settings.output_format == "zarr":
        mask = os.path.join(folder, base + ".zarr")
    else:
        mask = os.path.join(folder, base + ".png" if ext.lower() in LOSSY_EXTENSIONS else name)
    probs_ext = ".zarr" if settings.output_format == "zarr" else ".tif"
    return OutputPaths(
        mask=mask,
        probabilities=(os.path.join(folder, PROBABILITIES_FOLDER, base + probs_ext)
                       if settings.save_probabilities else None),
        overlay=os.path.join(folder, OVERLAYS_FOLDER, base + ".png") if settings.overlay else None,
    )


# --- reading: whole images, or lazily region by region -------------------------------------


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
    channels, classes = int(settings.meta["channels"]), settings.number_classes
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
        raise ValueError(f"{path}: image has {image.shape[2]} channel(s) but the model expects {channels}; "
                         "convert it or use a model trained on such images")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{path}: image has no pixels (shape {image.shape})")


def _stats_blocks(image: Any) -> dict[str, int | None]:
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


# --- writing: in memory then one file, or tile by tile in a writer thread --------------------

_END = object()


class _ArrayOutput:
    """Zones pasted into an in-memory array; the file is written on successful exit."""

    def __init__(self, tmp_path: str, shape: tuple[int, ...], dtype: np.dtype, encode: Callable):
        self.tmp_path, self.encode = tmp_path, encode
        self.array = np.zeros(shape, dtype)

    def __enter__(self) -> "_ArrayOutput":
        return self

    def put(self, zone: tiling.Zone, probs_hwk: np.ndarray) -> None:
        self.array[zone.y0 : zone.y1, zone.x0 : zone.x1] = self.encode(probs_hwk)

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
    """OME-Zarr 0.4 (zarr format 2), one level: a mask (y, x) or probabilities (c, y, x)."""

    def __init__(self, tmp_dir: str, shape: tuple[int, ...], dtype: np.dtype, tile: int, encode: Callable):
        super().__init__(encode)
        self.tmp_dir, self.shape, self.dtype, self.tile = tmp_dir, shape, np.dtype(dtype), tile

    def consume(self, items: Iterator[tuple[tiling.Zone, np.ndarray]]) -> None:
        import numcodecs
        import zarr

        channels_first = len(self.shape) == 3
        shape = (self.shape[2],) + self.shape[:2] if channels_first else self.shape
        chunks = (shape[0], self.tile, self.tile) if channels_first else (self.tile, self.tile)
        group = zarr.open_group(self.tmp_dir, mode="w", zarr_format=2)
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=self.dtype, fill_value=0,
                                   compressors=numcodecs.Zstd(level=3),
                                   chunk_key_encoding={"name": "v2", "separator": "/"})
        for zone, data in items:
            if channels_first:
                array[:, zone.y0 : zone.y1, zone.x0 : zone.x1] = np.moveaxis(data, -1, 0)
            else:
                array[zone.y0 : zone.y1, zone.x0 : zone.x1] = data
        axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
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


def _open_outputs(stack: contextlib.ExitStack, todo: dict[str, str], height: int, width: int,
                  out_of_core: bool, settings: Settings) -> list[Any]:
    """One writer per prediction output to (re)write; temporaries are removed on failure."""
    outputs = []
    for kind in ("mask", "probabilities"):
        if kind not in todo:
            continue
        path = todo[kind]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        encode, dtype = _encoder(kind, settings)
        shape = (height, width) if kind == "mask" else (height, width, settings.number_classes)
        if settings.output_format == "zarr":
            tmp = stack.enter_context(atomic_dir(path))
            outputs.append(stack.enter_context(_ZarrOutput(tmp, shape, dtype, settings.tile_size, encode)))
        elif out_of_core and os.path.splitext(path)[1].lower() in image_io.TIFF_EXTENSIONS:
            tmp = stack.enter_context(cliutil.atomic_path(path, suffix=".tif"))
            outputs.append(stack.enter_context(_TiffTileOutput(tmp, shape, dtype, settings.tile_size, encode)))
        else:
            tmp = stack.enter_context(cliutil.atomic_path(path, suffix=os.path.splitext(path)[1]))
            outputs.append(stack.enter_context(_ArrayOutput(tmp, shape, dtype, encode)))
    return outputs


# --- the model ----------------------------------------------------------------------------


class SavedModelPredictor:
    """``batch_nhwc`` float32 -> ``probabilities_nhwk`` through the SavedModel's serving signature.

    The signature is a concrete function: calling it never retraces, and every tile of an
    image has the same shape, so TensorFlow reuses its shape-specialized kernels.
    """

    def __init__(self, saved_model_dir: str):
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # already initialized
                tf.config.experimental.set_memory_growth(gpu, True)
        self._tf = tf
        self._loaded = tf.saved_model.load(saved_model_dir)  # keeps the variables alive
        sig = model_metadata.SIGNATURE
        if sig["name"] not in self._loaded.signatures:
            raise InputError(f"{saved_model_dir}: SavedModel has no {sig['name']!r} signature "
                             f"(has {', '.join(self._loaded.signatures) or 'none'}); re-export it with train_unet.py")
        self._fn = self._loaded.signatures[sig["name"]]
        inputs = self._fn.structured_input_signature[1]
        if sig["input"] not in inputs or sig["output"] not in self._fn.structured_outputs:
            raise InputError(f"{saved_model_dir}: signature {sig['name']} must map {sig['input']!r} to "
                             f"{sig['output']!r}, has {sorted(inputs)} -> {sorted(self._fn.structured_outputs)}")
        self._input, self._output = sig["input"], sig["output"]

    def __call__(self, batch_nhwc: np.ndarray) -> np.ndarray:
        out = self._fn(**{self._input: self._tf.constant(batch_nhwc, self._tf.float32)})
        return out[self._output].numpy()


# The 8 symmetries of the square: rot90 k times, optionally after a left-right flip.
D4 = tuple((k, flip) for flip in (False, True) for k in range(4))


def with_tta(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: mean of the 8 flip/rot90 predictions, in probability space.

    Tiles are multiples of the size factor, so each transformed tile keeps the pooling grid
    of the transformed whole image: tiled == untiled holds for every transform, hence for the mean.
    """

    def predict(batch_nhwc: np.ndarray) -> np.ndarray:
        total = None
        for k, flip in D4:
            x = batch_nhwc[:, :, ::-1] if flip else batch_nhwc
            p = np.asarray(predict_fn(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))))
            p = np.rot90(p, -k, axes=(1, 2))
            p = p[:, :, ::-1] if flip else p
            total = p.astype(np.float32) if total is None else total + p
        return total / len(D4)

    return predict


def _bar_interval() -> float:
    """Seconds between progress updates: live on a terminal, sparse in batch-job log files."""
    return 0.1 if sys.stderr.isatty() else 30.0


# --- one image --------------------------------------------------------------------------------


def predict_image(path: str, todo: dict[str, str], predict_fn: Callable, settings: Settings) -> str:
    """Predict one image and write the requested outputs; returns a one-line description."""
    source = open_source(path, settings)
    try:
        image = source.image_hwc
        height, width, _ = image.shape
        mean, std = image_io.image_stats(image, **_stats_blocks(image))
        if not np.all(np.isfinite(mean + std)):
            raise ValueError(f"{path}: image contains NaN or infinite pixels; replace them first")
        plan = tiling.plan_tiles(height, width, settings.tile_size, settings.halo, settings.size_factor)
        # A tile bar for large images, on a terminal only (batch logs get the per-image line).
        show_bar = (source.out_of_core or len(plan.zones) >= TILE_PROGRESS_MIN_TILES) and sys.stderr.isatty()
        from tqdm import tqdm

        with contextlib.ExitStack() as stack:
            outputs = _open_outputs(stack, todo, height, width, source.out_of_core, settings)
            bar = stack.enter_context(tqdm(total=len(plan.zones), desc=os.path.basename(path), unit="tile",
                                           leave=False, disable=not show_bar))

            def sink(zone: tiling.Zone, probs_hwk: np.ndarray) -> None:
                for out in outputs:
                    out.put(zone, probs_hwk)

            tiling.predict_tiled(image, predict_fn, settings.tile_size, settings.halo, settings.size_factor,
                                 batch_size=settings.batch_size, preprocess=lambda t: image_io.normalize(t, mean, std),
                                 sink=sink, progress=bar.update)
    finally:
        source.close()
    where = "out of core" if source.out_of_core else "in memory"
    return (f"{height}x{width}, {len(plan.zones)} tile(s) of {plan.tile_shape[0]}x{plan.tile_shape[1]} "
            f"(halo {settings.halo}), {where}")


def confusion_from_files(pred_path: str, truth_path: str, number_classes: int,
                         mask_map: dict[int, int] | None = None) -> tuple[np.ndarray, int, set[int]]:
    """Confusion matrix of a written mask against ground truth (values remapped by ``mask_map``
    first), row block by row block.

    Returns (cm, pixels of the truth with a class id outside [0, number_classes), those ids).
    """
    with opened(pred_path) as pred, opened(truth_path) as truth:
        if truth.shape[2] != 1:
            raise ValueError(f"{truth_path}: ground-truth mask has {truth.shape[2]} channels; masks are single-channel")
        if tuple(truth.shape[:2]) != tuple(pred.shape[:2]):
            raise ValueError(f"{truth_path}: ground-truth mask is {truth.shape[0]}x{truth.shape[1]} but the image is "
                             f"{pred.shape[0]}x{pred.shape[1]}; they must match pixel for pixel")
        cm = np.zeros((number_classes, number_classes), np.int64)
        outside, outside_ids = 0, set()
        rows = max(1, (16 * 2**20) // max(1, pred.shape[1]))
        for y in range(0, pred.shape[0], rows):
            t = np.asarray(truth[y : y + rows])[..., 0].astype(np.int64)
            if mask_map:
                valid = t >= 0  # negative ids are outside whatever the map says
                t = np.where(valid, image_io.apply_mask_map(np.where(valid, t, 0), mask_map), t)
            cm += metrics.confusion_matrix(t, np.asarray(pred[y : y + rows])[..., 0], number_classes)
            bad = (t < 0) | (t >= number_classes)
            if bad.any():
                outside += int(np.count_nonzero(bad))
                outside_ids.update(np.unique(t[bad]).tolist())
        return cm, outside, outside_ids


def _display_rgb(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 RGB for display: 3+ channels as RGB, else the first channel; 1-99.5 percentile stretch."""
    img = image_hwc[..., :3] if image_hwc.shape[2] >= 3 else image_hwc[..., :1]
    img = img.astype(np.float32)
    lo = np.percentile(img, 1, axis=(0, 1))
    hi = np.percentile(img, 99.5, axis=(0, 1))
    img = np.clip((img - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def write_overlay(image_path: str, mask_path: str, overlay_path: str, alpha: float = image_io.OVERLAY_ALPHA) -> None:
    """The mask (class 0 transparent) over the image, at most OVERLAY_MAX_SIDE pixels on a side."""
    with opened(image_path) as image, opened(mask_path) as mask:
        step = max(1, -(-max(image.shape[0], image.shape[1]) // OVERLAY_MAX_SIDE))
        rgb = _display_rgb(np.asarray(image[::step, ::step]))
        classes = np.asarray(mask[::step, ::step])[..., 0]
    out = image_io.tint(rgb, classes, alpha)
    import imageio.v3 as iio

    os.makedirs(os.path.dirname(overlay_path), exist_ok=True)
    with cliutil.atomic_path(overlay_path, suffix=".png") as tmp:
        iio.imwrite(tmp, np.rint(out).astype(np.uint8))


# --- the folder -------------------------------------------------------------------------------


@dataclass
class Summary:
    segmented: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # outputs existed already
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    metrics_path: str | None = None

    def line(self) -> str:
        text = f"{len(self.segmented)} segmented, {len(self.skipped)} already done (skipped), {len(self.failed)} failed"
        if self.failed:
            text += ": " + ", ".join(name for name, _ in self.failed[:10]) + (" ..." if len(self.failed) > 10 else "")
        return text


def _write_metrics(summary: Summary, settings: Settings) -> str:
    index, count = settings.shard
    name = "metrics.csv" if count == 1 else f"metrics_shard{index}_of_{count}.csv"
    path = os.path.join(settings.output_folder, name)
    rows = [metrics.flat_row({"image": n}, metrics.scores(cm)) for n, cm in sorted(summary.confusion.items())]
    total = sum(summary.confusion.values(), np.zeros((settings.number_classes,) * 2, np.int64))
    rows.append(metrics.flat_row({"image": "ALL"}, metrics.scores(total)))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[-1]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    cliutil.atomic_write_text(path, text.getvalue())
    overall = metrics.scores(total)
    log.info("metrics over %d image(s): pixel accuracy %.4f, mean IoU %.4f, mean Dice %.4f -> %s", len(summary.confusion),
             overall["pixel_accuracy"], overall["mean_iou"], overall["mean_dice"], path)
    return path


def _process(name: str, predict: Callable[[], Callable], settings: Settings, summary: Summary) -> None:
    """Predict (if needed), overlay, score one image; per-image faults go to ``summary.failed``."""
    path = os.path.join(settings.image_folder, name)
    paths = output_paths(name, settings)
    todo = paths.todo(settings.overwrite)
    start = time.perf_counter()
    try:
        if "mask" in todo or "probabilities" in todo:
            detail = predict_image(path, todo, predict(), settings)
            summary.segmented.append(name)
            log.info("%s: %s, %.1f s", name, detail, time.perf_counter() - start)
        else:
            summary.skipped.append(name)
            log.debug("%s: outputs exist, skipped", name)
        if "overlay" in todo:
            write_overlay(path, paths.mask, paths.overlay)
        if settings.masks is not None:
            if name not in settings.masks:
                log.warning("%s: no ground-truth mask with this stem in the mask folder; not scored", name)
            else:
                cm, outside, ids = confusion_from_files(paths.mask, settings.masks[name], settings.number_classes,
                                                        settings.mask_map)
                summary.confusion[name] = cm
                if outside:
                    hint = image_io.mask_values_hint({0} | ids)  # outside ids {255}: a 0/255 mask
                    log.warning("%s: %d ground-truth pixels have class ids outside 0..%d (%s) and are not scored%s",
                                settings.masks[name], outside, settings.number_classes - 1,
                                ", ".join(map(str, sorted(ids)[:8])), f"; {hint}" if hint else "")
    except (image_io.ImageReadError, ValueError) as exc:
        message = str(exc).replace("\n", " ")
        log.error("%s: skipped: %s", name, message)
        log.debug("details", exc_info=True)
        summary.failed.append((name, message))
    summary.seconds[name] = time.perf_counter() - start


def segment_folder(*, predict_fn: Callable[[np.ndarray], np.ndarray] | None = None, **kwargs: Any) -> Summary:
    """Segment this shard's images of a folder; keyword arguments as :func:`resolve_settings`.

    Per-image faults are collected in the returned summary; bad settings raise InputError
    before anything is written or TensorFlow is imported. ``predict_fn``: an already loaded
    :class:`SavedModelPredictor` of the same SavedModel (benchmarks reuse one; TTA is still
    applied per ``tta``); by default the model is loaded when the first image needs it.
    """
    settings = resolve_settings(**kwargs)
    index, count = settings.shard
    if count > 1:
        log.info("shard %d of %d: %d image(s)", index, count, len(settings.names))
    os.makedirs(settings.output_folder, exist_ok=True)
    cliutil.remove_stale_temporaries(settings.output_folder,
                                     *(os.path.join(settings.output_folder, sub) for sub in OUTPUT_SUBFOLDERS))
    predictor: list[Callable] = []

    def predict() -> Callable:  # load TensorFlow and the model only if some image needs them
        if not predictor:
            fn = predict_fn or SavedModelPredictor(settings.saved_model_filepath)
            predictor.append(with_tta(fn) if settings.tta else fn)
        return predictor[0]

    summary = Summary()
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        for name in tqdm(settings.names, desc="images", unit="image", mininterval=_bar_interval()):
            _process(name, predict, settings, summary)
    if settings.masks is not None and summary.confusion:
        summary.metrics_path = _write_metrics(summary, settings)
    (log.error if summary.failed else log.info)("done: %s", summary.line())
    return summary


# --- command line ------------------------------------------------------------------------------


def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saved_model_filepath", required=True, help="the saved_model/ folder train_unet.py wrote")
    p.add_argument("--image_folder", required=True, help="folder of images to segment")
    p.add_argument("--output_folder", required=True, help="where masks (and the extras) go")
    p.add_argument("--image_format", default="tif", help="file extension of the images (tif also matches tiff)")
    p.add_argument("--tile_size", type=int, default=DEFAULT_TILE_SIZE,
                   help="zone of responsibility per tile, in pixels (the tile adds the halo on every side); rounded up "
                        "to a multiple of the size factor and 16. Changes speed and memory, not the result")
    p.add_argument("--halo", default="exact",
                   help="context around each zone: 'exact' = the model's theoretical receptive-field radius (tiled == "
                        "whole-image prediction), 'erf' = the measured effective radius (faster, near-identical), or pixels")
    p.add_argument("--batch_size", type=int, default=1, help="tiles per forward pass")
    p.add_argument("--save_probabilities", type=cliutil.str2bool, nargs="?", const=True, default=False,
                   help="1 = also write per-class probabilities to probabilities/")
    p.add_argument("--probability_dtype", choices=PROBABILITY_DTYPES, default="float32",
                   help="float32, or uint8 = round(255 * p)")
    p.add_argument("--tta", type=cliutil.str2bool, nargs="?", const=True, default=False,
                   help="1 = average the 8 flip/rot90 predictions (8x slower)")
    p.add_argument("--mask_folder", default=None,
                   help="ground-truth masks (paired by file stem): write metrics.csv")
    p.add_argument("--mask_map", default=None,
                   help="ground-truth value -> class before scoring, e.g. 255:1 (build_lmdb.py's syntax); default: "
                        "the map the model's training databases were built with; none = score values as they are")
    p.add_argument("--overlay", type=cliutil.str2bool, nargs="?", const=True, default=False,
                   help="1 = write overlays/STEM.png, the mask over the image")
    p.add_argument("--shard_index", type=int, default=None,
                   help="process every shard_count-th image, starting at this one; None = the Slurm array task "
                        "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN), else 0")
    p.add_argument("--shard_count", type=int, default=None,
                   help="number of shards; None = SLURM_ARRAY_TASK_COUNT, else 1")
    p.add_argument("--overwrite", type=cliutil.str2bool, nargs="?", const=True, default=False,
                   help="1 = redo images whose outputs exist; 0 = skip them (restart after a failure)")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="tif",
                   help="tif = masks under the image's file name; zarr = OME-Zarr folders")
    p.add_argument("--memory_limit_mb", type=float, default=DEFAULT_MEMORY_LIMIT_MB,
                   help="images whose float32 working set (H*W*(channels+classes)*4 bytes) exceeds this, or a quarter "
                        "of the available memory, are processed out of core (TIFF)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cliutil.setup_logging(args.verbose)
    options = vars(args)
    options.pop("verbose")
    summary = segment_folder(**options)
    return EXIT_IMAGES_FAILED if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
