"""Build the train and test LMDB databases from a folder of images and a folder of masks.

    python build_lmdb.py --image_folder IMAGES --mask_folder MASKS --output_folder OUT \\
        --dataset_name NAME [--train_fraction 0.8] [--image_format tif] [--use_tiling 1 --tile_size 256]

writes ``OUT/train-NAME.lmdb`` and ``OUT/test-NAME.lmdb`` (record format: ``lmdb_format``).

* Pairing: a mask pairs with the image of the same file stem; its extension may differ
  (``a.png`` masks ``a.tif``). Every image needs a mask and every mask an image.
* Split: ``numpy.random.default_rng(seed).permutation`` of the name-sorted pairs; the first
  ``round(train_fraction * N)`` go to train (at least 1 to each split). ``--test_list`` names
  the test images instead.
* Records: one per image (stored whole; the reader crops to the model's size factor), or with
  ``--use_tiling 1`` one per tile (``tiling.tile_grid``; images smaller than the tile are
  mirror-padded, image and mask alike, and the record's origin is negative).
* Masks are stored in the smallest unsigned type that holds their values (uint8 below 256).
* Validation happens in the same single pass that encodes; nothing is renamed into place
  unless every file is valid. Bad input: one line on stderr, exit code 2.
* Also writes ``OUT/split-NAME.csv`` (columns file, split).
* Crash safety and write faults (temporary names, atomic install or swap with ``--overwrite``,
  clean-up after killed runs, full disk): ``segkit/lmdb_store.py``. Workers die with the main
  process; a killed worker is reported with its file (exit 1). Ctrl-C / SIGTERM: exit 130.
  Details: README, "Building databases" and "Troubleshooting".

For tests only: environment variable ``BUILD_LMDB_TEST_DELAY`` (seconds) sleeps after each
record written, so a test can kill a build in progress.

Never imports TensorFlow.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import math
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from segkit import cliutil
from segkit import image_io
from segkit import lmdb_format
from segkit import lmdb_store
from segkit import tiling
from segkit.cliutil import InputError

log = logging.getLogger("build_lmdb")

SPLITS = ("train", "test")
TILE_MULTIPLE = 32
MAX_TILE = 32768          # sizes beyond are typos; a 32768^2 float32 tile is already 4 GB
MAX_WORKERS = 256
MAX_CLASSES = 2**31
MASK_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp", ".pgm", ".pbm", ".gif")
TEST_DELAY_ENV = "BUILD_LMDB_TEST_DELAY"
MAX_LISTED = 8


# ----------------------------------------------------------------------------- inputs


def parse_mask_map(text: str | dict | None) -> dict[int, int]:
    """``"255:1,128:2"`` -> ``{255: 1, 128: 2}`` (mask value -> class id); see ``image_io.parse_mask_map``."""
    try:
        return image_io.parse_mask_map(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _by_stem(names: list[str], folder: str, flag: str) -> dict[str, str]:
    clashes = image_io.stem_clashes(names)
    if clashes:
        raise InputError(f"{folder}: several files share a stem ({_listing(clashes)}), so pairing by name is "
                         f"ambiguous; remove the extra files or pick one extension with {flag}")
    return {image_io.stem(name): name for name in names}


def warn_dangling_links(folder: str) -> list[str]:
    """Log (and return) the symbolic links in ``folder`` whose target is missing: they are skipped."""
    dangling = sorted(n for n in os.listdir(folder)
                      if os.path.islink(os.path.join(folder, n)) and not os.path.exists(os.path.join(folder, n)))
    if dangling:
        log.warning("%s: %d symbolic link(s) point to missing files and are skipped: %s; fix or remove them",
                    folder, len(dangling), _listing(dangling))
    return dangling


def pair_files(image_folder: str, mask_folder: str, image_format: str = "tif",
               mask_format: str | None = None) -> list[tuple[str, str]]:
    """(image name, mask name) pairs matched by file stem, sorted by image name."""
    for folder in dict.fromkeys((image_folder, mask_folder)):
        warn_dangling_links(folder)
    images = image_io.list_images(image_folder, image_format)
    if not images:
        raise InputError(image_io.no_images_message(image_folder, image_format))
    if mask_format:
        masks = image_io.list_images(mask_folder, mask_format)
    else:
        accept = MASK_EXTENSIONS + (image_io.normalize_extension(image_format),)
        masks = [n for n in image_io.list_images(mask_folder) if os.path.splitext(n)[1].lower() in accept]
    if not masks:
        raise InputError(f"{mask_folder}: no mask files found (looked for "
                         f"{mask_format or ', '.join(MASK_EXTENSIONS)}); check --mask_folder")
    image_by_stem = _by_stem(images, image_folder, "--image_format")
    mask_by_stem = _by_stem(masks, mask_folder, "--mask_format")
    lonely_images = sorted(image_by_stem[s] for s in image_by_stem.keys() - mask_by_stem.keys())
    lonely_masks = sorted(mask_by_stem[s] for s in mask_by_stem.keys() - image_by_stem.keys())
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) in {image_folder} have no mask: {_listing(lonely_images)}")
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} mask(s) in {mask_folder} have no image: {_listing(lonely_masks)}")
        raise InputError("; ".join(parts) + "; masks pair with images by file stem (a.png masks a.tif): "
                         "add or remove files so that every image has exactly one mask")
    return sorted((image_by_stem[s], mask_by_stem[s]) for s in image_by_stem)


def read_test_list(path: str, image_names: Sequence[str]) -> set[str]:
    """Image names listed in ``path`` (one per line, by file name or stem; # comments)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.split("#", 1)[0].strip() for ln in fh]
    except OSError as exc:
        raise InputError(f"--test_list {path}: cannot read it ({exc.strerror}); give a text file of image names") from exc
    lookup = {n: n for n in image_names} | {image_io.stem(n): n for n in image_names}
    wanted = [os.path.basename(ln) for ln in lines if ln]
    unknown = [w for w in wanted if w not in lookup]
    if unknown:
        raise InputError(f"--test_list {path}: {len(unknown)} name(s) match no image in the image folder: "
                         f"{_listing(unknown)}; list image file names (or stems), one per line")
    return {lookup[w] for w in wanted}


def split_names(names: Sequence[str], train_fraction: float, seed: int,
                test_names: set[str] | None = None) -> dict[str, list[str]]:
    """{'train': [...], 'test': [...]}, each sorted; reproducible for a given seed."""
    if test_names is not None:
        split = {"train": [n for n in names if n not in test_names], "test": [n for n in names if n in test_names]}
        empty = [s for s in SPLITS if not split[s]]
        if empty:
            raise InputError(f"--test_list leaves the {empty[0]} split empty ({len(split['train'])} train / "
                             f"{len(split['test'])} test images); list some but not all images")
        return split
    if len(names) < 2:
        raise InputError(f"only {len(names)} image pair found: a train/test split needs at least 2 images; "
                         "add images")
    n_train = int(round(train_fraction * len(names)))
    clamped = min(max(n_train, 1), len(names) - 1)
    if clamped != n_train:
        log.warning("--train_fraction %s of %d images would leave the %s split empty; using %d train / %d test",
                    train_fraction, len(names), "test" if n_train >= len(names) else "train",
                    clamped, len(names) - clamped)
    order = np.random.default_rng(seed).permutation(len(names))
    train = {names[i] for i in order[:clamped]}
    return {"train": [n for n in names if n in train], "test": [n for n in names if n not in train]}


# ----------------------------------------------------------------------------- per image (worker)


@dataclass(frozen=True)
class Task:
    image_path: str
    mask_path: str
    split: str
    tile_size: int | None
    tile_stride: int | None
    mask_map: dict[int, int]
    number_classes: int | None
    source_index: int  # position of the image in its split's metadata "sources"


@dataclass
class Encoded:
    """One source image, encoded: what the parent writes and summarizes."""

    task: Task
    source: dict[str, Any]
    image_dtype: str
    channels: int
    records: list[bytes]
    record_classes: list[list[int]]
    class_counts: np.ndarray  # pixels per class id, over the records (tiles may overlap)


def _read(path: str) -> np.ndarray:
    fix = "the file is unreadable or corrupt: re-export it or remove it (and its pair)"
    try:
        array = image_io.read_image(path)
    except image_io.ImageReadError as exc:
        raise InputError(f"{exc}; {fix}") from exc
    if array.size == 0 or array.ndim < 2:
        raise InputError(f"{path}: cannot read image (decoded {array.shape}, no pixels); {fix}")
    return array


def load_image(path: str) -> np.ndarray:
    """Read and check an image; returns image_hwc."""
    array = _read(path)
    stack = image_io.tiff_stack_hint(path, array)
    if stack:
        raise InputError(f"{path}: {stack}; build_lmdb takes 2-D images (HW or HWC): save each slice as its own "
                         "file, or a multichannel image with its channels last")
    try:
        image = image_io.to_hwc(array)
        image_io.check_dtype(image, path)
    except ValueError as exc:
        raise InputError(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from exc
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"{path}: image contains NaN or infinite pixels; replace them before building")
    return image


def _values_hint(values: np.ndarray, number_classes: int) -> str:
    hint = image_io.mask_values_hint(values.tolist())
    if hint:
        return "; " + hint
    return f"; values found: {_listing([str(v) for v in values.tolist()])}; fix the mask or raise --number_classes"


def load_mask(path: str, image_hw: tuple[int, int], mask_map: dict[int, int],
              number_classes: int | None) -> np.ndarray:
    """Read and check a mask against its image; returns mask_hw in the smallest unsigned type."""
    mask = _read(path)
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[2]):
        mask = mask.reshape(mask.shape[:2] if mask.shape[2] == 1 else mask.shape[1:])
    if mask.ndim != 2:
        raise InputError(f"{path}: mask has shape {mask.shape}; masks must be single-channel (one class id per "
                         "pixel): save it as a grayscale image")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if mask.dtype.kind not in "ui":
        raise InputError(f"{path}: mask pixel type is {mask.dtype.name}, not an integer type; masks hold integer "
                         "class ids: save it as uint8, uint16 or int32")
    if mask.shape != tuple(image_hw):
        raise InputError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                         f"{image_hw[0]}x{image_hw[1]} (height x width); they must match pixel for pixel")
    if mask.size and mask.dtype.kind == "i" and int(mask.min()) < 0:
        raise InputError(f"{path}: mask has negative values (minimum {int(mask.min())}); class ids must be "
                         ">= 0 with 0 = background")
    mask = image_io.apply_mask_map(mask, mask_map)
    top = int(mask.max()) if mask.size else 0
    if number_classes is not None and top >= number_classes:
        values = np.unique(mask)
        raise InputError(f"{path}: mask value {top} is >= --number_classes {number_classes}"
                         + _values_hint(values, number_classes))
    if top >= 2**31:
        raise InputError(f"{path}: mask value {top} is too large for a class id; renumber the classes from 0")
    return mask.astype(image_io.dtype_for_classes(top + 1), copy=False)


def _centered_pad(short_by: int) -> tuple[int, int]:
    before = max(short_by, 0) // 2
    return before, max(short_by, 0) - before


def iter_records(image_hwc: np.ndarray, mask_hw: np.ndarray, tile_size: int | None,
                 tile_stride: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """(image_hwc, mask_hw, origin_yx) per record: the whole image, or tiles of the padded image."""
    if tile_size is None:
        yield image_hwc, mask_hw, (0, 0)
        return
    height, width = mask_hw.shape
    pad_y, pad_x = _centered_pad(tile_size - height), _centered_pad(tile_size - width)
    image = image_io.mirror_pad(image_hwc, pad_y, pad_x)
    mask = image_io.mirror_pad(mask_hw, pad_y, pad_x)
    for y, x in tiling.tile_grid(image.shape[0], image.shape[1], tile_size, tile_stride):
        yield (image[y : y + tile_size, x : x + tile_size], mask[y : y + tile_size, x : x + tile_size],
               (y - pad_y[0], x - pad_x[0]))


def encode_pair(task: Task) -> Encoded:
    """Read, validate and encode one image/mask pair (runs in a worker process)."""
    image = load_image(task.image_path)
    mask = load_mask(task.mask_path, image.shape[:2], task.mask_map, task.number_classes)
    mean, std = image_io.image_stats(image)
    records, record_classes = [], []
    counts = np.zeros(int(mask.max()) + 1 if mask.size else 1, np.int64)
    for tile_image, tile_mask, origin in iter_records(image, mask, task.tile_size, task.tile_stride):
        tile_counts = np.bincount(tile_mask.ravel(), minlength=counts.size)
        counts += tile_counts
        classes = [int(c) for c in np.flatnonzero(tile_counts)]
        record = lmdb_format.Record(tile_image, tile_mask, task.source_index, origin, classes)
        records.append(lmdb_format.encode_record(record))
        record_classes.append(classes)
    source = {"file": os.path.basename(task.image_path), "mask": os.path.basename(task.mask_path),
              "height": int(image.shape[0]), "width": int(image.shape[1]), "mean": mean, "std": std}
    return Encoded(task, source, image.dtype.name, int(image.shape[2]), records, record_classes, counts)


# ----------------------------------------------------------------------------- the build


@dataclass
class SplitResult:
    path: str
    images: int = 0
    records: int = 0
    nbytes: int = 0
    class_pixel_counts: dict[int, int] = field(default_factory=dict)
    class_records: dict[int, list[int]] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def add(self, encoded: Encoded, first_index: int) -> None:
        self.images += 1
        self.records += len(encoded.records)
        self.nbytes += sum(len(r) for r in encoded.records)
        for c, n in enumerate(encoded.class_counts.tolist()):
            if n:
                self.class_pixel_counts[c] = self.class_pixel_counts.get(c, 0) + int(n)
        for offset, classes in enumerate(encoded.record_classes):
            for c in classes:
                self.class_records.setdefault(c, []).append(first_index + offset)
        self.sources.append(encoded.source)

    def fractions(self) -> dict[int, float]:
        total = sum(self.class_pixel_counts.values()) or 1
        return {c: n / total for c, n in sorted(self.class_pixel_counts.items())}


@dataclass
class BuildSummary:
    splits: dict[str, SplitResult]
    channels: int
    image_dtype: str
    number_classes: int
    seconds: float
    split_csv: str | None = None

    def format(self) -> str:
        total = sum(s.images for s in self.splits.values())
        lines = [f"built {len(self.splits)} databases from {total} image pairs in {self.seconds:.1f} s "
                 f"({self.channels} channel(s), {self.image_dtype}, {self.number_classes} classes)"]
        for name, s in self.splits.items():
            fractions = "  ".join(f"{c}: {100 * f:.1f}%" for c, f in s.fractions().items())
            lines.append(f"  {name:5s} {s.images:5d} images -> {s.records:6d} records, {s.nbytes / 1e6:8.1f} MB  "
                         f"{os.path.abspath(s.path)}")
            lines.append(f"        class pixel fractions: {fractions}")
        if self.split_csv:
            lines.append(f"  split (file -> train/test): {os.path.abspath(self.split_csv)}")
        return "\n".join(lines)


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # respects Slurm / taskset CPU limits
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def check_parameters(*, image_folder, mask_folder, dataset_name, train_fraction, use_tiling, tile_size,
                     tile_stride, number_classes, workers, test_list, seed=0) -> None:
    for flag, folder in (("--image_folder", image_folder), ("--mask_folder", mask_folder)):
        if not os.path.isdir(folder):
            raise InputError(f"{flag} {folder}: no such folder")
    if os.path.samefile(image_folder, mask_folder):
        raise InputError(f"--image_folder and --mask_folder are the same folder ({image_folder}); "
                         "keep masks in their own folder, named like their images")
    if not dataset_name or os.sep in dataset_name or "/" in dataset_name or dataset_name.startswith("."):
        raise InputError(f"--dataset_name {dataset_name!r}: give a plain name (no '/', not starting with '.')")
    if not math.isfinite(train_fraction) or (not 0.0 < train_fraction < 1.0 and test_list is None):
        raise InputError(f"--train_fraction must be > 0 and < 1, got {train_fraction}; e.g. 0.8 keeps 20% for test")
    if use_tiling and not TILE_MULTIPLE <= tile_size <= MAX_TILE:
        raise InputError(f"--tile_size must be between {TILE_MULTIPLE} and {MAX_TILE} pixels, got {tile_size}")
    if use_tiling and (tile_size <= 0 or tile_size % TILE_MULTIPLE):
        raise InputError(f"--tile_size must be a positive multiple of {TILE_MULTIPLE}, got {tile_size}; "
                         f"e.g. {max(TILE_MULTIPLE, tile_size // TILE_MULTIPLE * TILE_MULTIPLE)}")
    if tile_stride is not None and not use_tiling:
        raise InputError("--tile_stride only applies with --use_tiling 1")
    if use_tiling and tile_stride is not None and not 1 <= tile_stride <= tile_size:
        raise InputError(f"--tile_stride must be between 1 and --tile_size {tile_size}, got {tile_stride}")
    if number_classes is not None and not 1 <= number_classes <= MAX_CLASSES:
        raise InputError(f"--number_classes must be between 1 (background counts as a class) and {MAX_CLASSES}, "
                         f"got {number_classes}")
    if not 1 <= workers <= MAX_WORKERS:
        raise InputError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}; e.g. {default_workers()}")
    if not 0 <= seed < 2**63:
        raise InputError(f"--seed must be a non-negative integer below 2**63, got {seed}")


def _check_tile_fits(tile_size: int, sizes: list[tuple[int, int]]) -> None:
    """Refuse a tile larger than every image in both directions: every record would be mostly padding."""
    if any(max(hw) >= tile_size for hw in sizes):
        return
    best = max(max(hw) for hw in sizes) // TILE_MULTIPLE * TILE_MULTIPLE
    fix = f"use --tile_size {best} or smaller" if best else "use --use_tiling 0"
    largest = max(sizes, key=lambda hw: hw[0] * hw[1])
    raise InputError(f"--tile_size {tile_size} is larger than every image (largest is {largest[0]}x{largest[1]}); {fix}")


def _check_consistent(encoded: Encoded, first: Encoded | None) -> None:
    if first is None:
        return
    for what, a, b in (("channels", encoded.channels, first.channels),
                       ("pixel type", encoded.image_dtype, first.image_dtype)):
        if a != b:
            raise InputError(f"{encoded.task.image_path}: {what} {a} differs from {first.task.image_path} ({b}); "
                             f"all images of a data set need the same {what}: convert them or build separate databases")


def _worker_init(parent_pid: int) -> None:
    cliutil.ignore_interrupts()
    cliutil.die_with_parent(parent_pid)


class Encoder:
    """Encodes tasks in order, in up to ``workers`` processes with a bounded look-ahead.

    Create it before opening LMDB environments or tqdm: with the fork start method all
    workers are forked on the first submit, which happens here in the constructor.
    """

    def __init__(self, tasks: list[Task], workers: int):
        self.tasks = iter(tasks)
        self.pending: collections.deque[tuple[Task, cf.Future]] = collections.deque()
        self.pool = None
        if workers > 1 and len(tasks) > 1:
            threaded = "tensorflow" in sys.modules or "torch" in sys.modules  # forking those is unsafe
            context = multiprocessing.get_context("spawn" if threaded or sys.platform != "linux" else "fork")
            # Workers ignore Ctrl-C / SIGTERM (the main process handles them and shuts the pool down) and die
            # with the main process (kill -9 of it would leave them blocked on the task queue forever).
            self.pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                               initializer=_worker_init, initargs=(os.getpid(),))
            self.window = 2 * workers
            self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.window:
            task = next(self.tasks, None)
            if task is None:
                return
            try:
                future = self.pool.submit(encode_pair, task)
            except cf.process.BrokenProcessPool as exc:  # a worker died: report it in order, never skip the task
                future = cf.Future()
                future.set_exception(exc)
            self.pending.append((task, future))
            if future.done() and future.exception() is not None:
                return

    def __iter__(self) -> Iterator[Encoded]:
        if self.pool is None:
            yield from map(encode_pair, self.tasks)
            return
        while self.pending:
            task, future = self.pending[0]
            try:
                encoded = future.result()
            except cf.process.BrokenProcessPool:
                raise cliutil.FaultError(self._died_message()) from None
            self.pending.popleft()
            self._fill()
            yield encoded

    def _died_message(self) -> str:
        names = [os.path.basename(task.image_path) for task, _ in self.pending]
        others = f" (or one of the {len(names) - 1} images decoded with it: {_listing(names[1:])})" if len(names) > 1 else ""
        return (f"a build worker process died (killed by the system, most often for lack of memory) while decoding "
                f"{self.pending[0][0].image_path}{others}; retry with --workers 1, or free memory")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def build_databases(*, image_folder: str, mask_folder: str, output_folder: str, dataset_name: str,
                    train_fraction: float = 0.8, image_format: str = "tif", use_tiling: bool = False,
                    tile_size: int = 512, tile_stride: int | None = None, seed: int = 0,
                    test_list: str | None = None, number_classes: int | None = None,
                    mask_map: str | dict | None = None, workers: int | None = None, overwrite: bool = False,
                    mask_format: str | None = None, progress: bool = True) -> BuildSummary:
    """Build ``train-NAME.lmdb`` and ``test-NAME.lmdb`` in ``output_folder``; raises InputError on bad input."""
    start = time.perf_counter()
    workers = default_workers() if workers is None else workers
    check_parameters(image_folder=image_folder, mask_folder=mask_folder, dataset_name=dataset_name,
                     train_fraction=train_fraction, use_tiling=use_tiling, tile_size=tile_size,
                     tile_stride=tile_stride, number_classes=number_classes, workers=workers, test_list=test_list,
                     seed=seed)
    mapping = parse_mask_map(mask_map)
    lmdb_store.check_output_folder(output_folder)
    finals = lmdb_store.database_paths(output_folder, dataset_name)
    lmdb_store.clean_stale_temporaries(output_folder, list(finals.values()))
    lmdb_store.check_database_paths(finals, overwrite)
    existing = [p for p in finals.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise InputError(f"{_listing(existing)} already exist(s); use --overwrite to replace, or another "
                         "--dataset_name / --output_folder")
    pairs = pair_files(image_folder, mask_folder, image_format, mask_format)
    names = [img for img, _ in pairs]
    test_names = read_test_list(test_list, names) if test_list else None
    split = split_names(names, train_fraction, seed, test_names)
    mask_of = dict(pairs)
    tasks = [Task(os.path.join(image_folder, n), os.path.join(mask_folder, mask_of[n]), s,
                  tile_size if use_tiling else None, tile_stride if use_tiling else None, mapping, number_classes,
                  index)
             for s in SPLITS for index, n in enumerate(split[s])]
    created_folder = not os.path.isdir(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    databases: dict[str, lmdb_store.TempDatabase] = {}
    try:
        results, first = _write_all(tasks, finals, databases, workers, progress)
        if use_tiling:
            _check_tile_fits(tile_size, [(s["height"], s["width"]) for r in results.values() for s in r.sources])
        classes = number_classes or max(max(r.class_pixel_counts, default=0) for r in results.values()) + 1
        build = {"id": uuid.uuid4().hex, "dataset_name": dataset_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "train_fraction": None if test_list else train_fraction, "test_list": test_list,
                 "mask_map": {str(k): v for k, v in mapping.items()}, "image_folder": os.path.abspath(image_folder),
                 "mask_folder": os.path.abspath(mask_folder)}
        for name in SPLITS:
            r = results[name]
            meta = lmdb_format.make_metadata(
                channels=first.channels, image_dtype=first.image_dtype, tile_size=tile_size if use_tiling else None,
                tile_stride=(tile_stride or tile_size) if use_tiling else None, num_records=r.records,
                class_pixel_counts=r.class_pixel_counts, class_records=r.class_records, sources=r.sources,
                split=name, seed=None if test_list else seed, number_classes=classes)
            meta["build"] = build
            databases[name].finish(meta)
        for name in SPLITS:
            lmdb_store.install(databases[name].path, finals[name], overwrite)
        split_csv = write_split_csv(output_folder, dataset_name, split)
    except BaseException as exc:
        written = sum(db.nbytes for db in databases.values())
        for db in databases.values():
            db.discard()
        if created_folder and not os.listdir(output_folder):
            os.rmdir(output_folder)
        fault = lmdb_store.write_fault(exc, output_folder, [p for t in tasks for p in (t.image_path, t.mask_path)],
                                       written)
        if fault is not None:
            raise fault from None
        raise
    log.info("wrote %s (the file -> split of every image)", split_csv)
    return BuildSummary(results, first.channels, first.image_dtype, classes, time.perf_counter() - start, split_csv)


def write_split_csv(output_folder: str, dataset_name: str, split: dict[str, list[str]]) -> str:
    """``split-NAME.csv`` beside the databases (columns file, split; image name order), written atomically."""
    path = os.path.join(output_folder, f"split-{dataset_name}.csv")
    rows = sorted((name, s) for s in SPLITS for name in split[s])
    cliutil.atomic_write_text(path, "file,split\n" + "".join(f"{_csv_field(n)},{s}\n" for n, s in rows))
    return path


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _write_all(tasks: list[Task], finals: dict[str, str], databases: dict[str, lmdb_store.TempDatabase], workers: int,
               progress: bool) -> tuple[dict[str, SplitResult], Encoded]:
    """The single pass: encode every pair (validating it) and append its records to its database."""
    from tqdm import tqdm

    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    results = {s: SplitResult(finals[s]) for s in SPLITS}
    first = None
    encoder = Encoder(tasks, workers)  # forks before LMDB and tqdm's thread exist
    try:
        for split in SPLITS:
            databases[split] = lmdb_store.TempDatabase(finals[split])
        with tqdm(total=len(tasks), unit="img", desc="build_lmdb", disable=not progress, dynamic_ncols=True, leave=False,
                  mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
            for encoded in encoder:
                _check_consistent(encoded, first)
                first = first or encoded
                result = results[encoded.task.split]
                first_index = databases[encoded.task.split].append(encoded.records)
                result.add(encoded, first_index)
                bar.update(1)
                if delay:
                    time.sleep(delay * len(encoded.records))
    except BaseException:
        if progress:
            cliutil.end_progress_line()  # the error line that follows starts on a fresh line in a log
        raise
    finally:
        encoder.close()
    return results, first


# ----------------------------------------------------------------------------- command line


def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description="Build train/test LMDB databases from image and mask folders.")
    p.add_argument("--image_folder", required=True, help="folder of images (HW or HWC; uint8/uint16/int32/float32)")
    p.add_argument("--mask_folder", required=True, help="folder of masks, paired with images by file stem")
    p.add_argument("--output_folder", required=True, help="where train-NAME.lmdb and test-NAME.lmdb go")
    p.add_argument("--dataset_name", required=True, help="NAME in train-NAME.lmdb / test-NAME.lmdb")
    p.add_argument("--train_fraction", type=float, default=0.8, help="fraction of images for training (0 < f < 1)")
    p.add_argument("--image_format", default="tif", help="file extension of the images (tif also matches tiff)")
    p.add_argument("--mask_format", default=None, help="file extension of the masks; None: any image extension")
    p.add_argument("--use_tiling", type=cliutil.str2bool, default=False, metavar="0/1", help="1 = cut images into tiles")
    p.add_argument("--tile_size", type=int, default=512, help="tile edge in pixels (multiple of 32)")
    p.add_argument("--tile_stride", type=int, default=None,
                   help="tile step in pixels; None: tile_size (the last tile slides inward to the border)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--test_list", default=None, help="text file naming the test images, one per line (overrides --train_fraction)")
    p.add_argument("--number_classes", type=int, default=None,
                   help="check every mask value is below this; None: no check, classes = max value + 1")
    p.add_argument("--mask_map", default=None, help="remap mask values first, e.g. 255:1 or 255:1,128:2")
    p.add_argument("--workers", type=int, default=default_workers(), help="processes decoding images")
    p.add_argument("--overwrite", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="replace existing databases (only once the new ones are complete)")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cliutil.setup_logging()
    summary = build_databases(**vars(args))
    print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit 0, 2 for bad input (one line), 1 for a fault, 130 on Ctrl-C / SIGTERM."""
    return cliutil.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
