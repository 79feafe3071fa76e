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
* Volumes (TIFF z-stacks, ``.zarr``, ``.h5``; ``segkit/build_volume.py``) and instance masks
  (``--mask_type instances``; ``segkit/instance_targets.py``): README, "Volumes" and "Instance masks".
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
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from segkit import cliutil, instance_targets, lmdb_format, lmdb_store, volume_io
from segkit.build_encode import Encoded, Task, check_consistent, encode_pair  # noqa: F401 (tests patch encode_pair here)
from segkit.build_inputs import (  # noqa: F401  # noqa: F401
    MASK_TYPES,
    SPLITS,
    TEST_DELAY_ENV,
    _check_instance_flags,
    _check_tile_fits,
    _listing,
    check_parameters,
    default_workers,
    pair_files,
    parse_mask_map,
    parse_tile_size,
    read_test_list,
    split_names,
)
from segkit.cliutil import InputError

log = logging.getLogger("build_lmdb")



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
    object_sizes: list[np.ndarray] = field(default_factory=list)  # instance masks: each image's object sizes

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
        if encoded.object_sizes is not None:
            self.object_sizes.append(encoded.object_sizes)

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
    notes: list[str] = field(default_factory=list)  # volumes and instance targets: what was chosen and why

    def format(self) -> str:
        total = sum(s.images for s in self.splits.values())
        lines = [f"built {len(self.splits)} databases from {total} image pairs in {self.seconds:.1f} s "
                 f"({self.channels} channel(s), {self.image_dtype}, {self.number_classes} classes)"]
        for name, s in self.splits.items():
            fractions = "  ".join(f"{c}: {100 * f:.1f}%" for c, f in s.fractions().items())
            lines.append(f"  {name:5s} {s.images:5d} images -> {s.records:6d} records, {s.nbytes / 1e6:8.1f} MB  "
                         f"{os.path.abspath(s.path)}")
            lines.append(f"        class pixel fractions: {fractions}")
        lines.extend(f"  {note}" for note in self.notes)
        if self.split_csv:
            lines.append(f"  split (file -> train/test): {os.path.abspath(self.split_csv)}")
        return "\n".join(lines)


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
                    mask_format: str | None = None, progress: bool = True, mask_type: str = "classes",
                    instance_target: str | None = None, voxel_size: str | Sequence[float] | None = None,
                    image_dataset: str | None = None, mask_dataset: str | None = None) -> BuildSummary:
    """Build ``train-NAME.lmdb`` and ``test-NAME.lmdb`` in ``output_folder``; raises InputError on bad input.

    2-D images or volumes (README "Volumes"); ``mask_type="instances"``: masks are instance labels and the
    database stores a target of ``segkit/instance_targets``.
    """
    start = time.perf_counter()
    workers = default_workers() if workers is None else workers
    tile_size = parse_tile_size(tile_size)
    check_parameters(image_folder=image_folder, mask_folder=mask_folder, dataset_name=dataset_name,
                     train_fraction=train_fraction, use_tiling=use_tiling, tile_size=tile_size,
                     tile_stride=tile_stride, number_classes=number_classes, workers=workers, test_list=test_list,
                     seed=seed, image_format=image_format)
    _check_instance_flags(mask_type, instance_target, number_classes, mask_map)
    spacing = None
    if voxel_size is not None:
        spacing = volume_io.parse_voxel_size(voxel_size if isinstance(voxel_size, str) else ",".join(map(str, voxel_size)))
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
                  index, mask_type, None if instance_target == "auto" else instance_target, spacing,
                  image_dataset, mask_dataset)
             for s in SPLITS for index, n in enumerate(split[s])]
    created_folder = not os.path.isdir(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    databases: dict[str, lmdb_store.TempDatabase] = {}
    try:
        results, first = _write_all(tasks, finals, databases, workers, progress)
        if use_tiling and first.spatial_rank == 2:
            _check_tile_fits(tile_size, [(s["height"], s["width"]) for r in results.values() for s in r.sources])
        classes = number_classes or max(max(r.class_pixel_counts, default=0) for r in results.values()) + 1
        if first.choice is not None:
            classes = instance_targets.CLASSES[first.choice.target]
        build = {"id": uuid.uuid4().hex, "dataset_name": dataset_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "train_fraction": None if test_list else train_fraction, "test_list": test_list,
                 "mask_map": {str(k): v for k, v in mapping.items()}, "image_folder": os.path.abspath(image_folder),
                 "mask_folder": os.path.abspath(mask_folder)}
        for name in SPLITS:
            r = results[name]
            meta = lmdb_format.make_metadata(
                channels=first.channels, image_dtype=first.image_dtype, tile_size=_stored_tile(tile_size) if use_tiling else None,
                tile_stride=(tile_stride or _stored_tile(tile_size)) if use_tiling else None, num_records=r.records,
                class_pixel_counts=r.class_pixel_counts, class_records=r.class_records, sources=r.sources,
                split=name, seed=None if test_list else seed, number_classes=classes,
                spatial_rank=first.spatial_rank, voxel_size_zyx_um=first.voxel_size, mask_type=mask_type,
                instance_target=_target_metadata(first.choice, r.object_sizes, first.spatial_rank))
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
    return BuildSummary(results, first.channels, first.image_dtype, classes, time.perf_counter() - start, split_csv,
                        _notes(first))


def _stored_tile(tile_size: int | tuple[int, ...]) -> int | list[int]:
    return list(tile_size) if isinstance(tile_size, tuple) else tile_size


def _target_metadata(choice: instance_targets.Choice | None, sizes: list[np.ndarray],
                     spatial_rank: int) -> dict[str, Any] | None:
    if choice is None:
        return None
    return {"target": choice.target, "number_classes": instance_targets.CLASSES[choice.target],
            "reason": choice.reason, "classes": instance_targets.CLASS_NAMES[choice.target],
            **instance_targets.object_size_summary(sizes, spatial_rank)}


def _notes(first: Encoded) -> list[str]:
    notes = []
    if first.spatial_rank == 3:
        notes.append("volumes (3 spatial axes), voxel size z,y,x = "
                     + ", ".join(f"{v:.6g}" for v in first.voxel_size) + " um")
    if first.choice is not None:
        names = ", ".join(f"{c} {n}" for c, n in enumerate(instance_targets.CLASS_NAMES[first.choice.target]))
        notes.append(f"instance masks -> {first.choice.target} target ({names}); why: {first.choice.reason}")
    return notes


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
                check_consistent(encoded, first)
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
    p.add_argument("--mask_format", default=None, help="file extension of the masks (default: any image extension)")
    p.add_argument("--use_tiling", type=cliutil.str2bool, default=False, metavar="0/1", help="1 = cut images into tiles")
    p.add_argument("--tile_size", default="512",
                   help="tile edge in pixels (multiple of 32); volumes: one value or z,y,x, e.g. 16,128,128")
    p.add_argument("--tile_stride", type=int, default=None,
                   help="tile step in pixels (default: --tile_size; the last tile slides inward to the border)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--test_list", default=None,
                   help="text file naming the test images, one per line (overrides --train_fraction)")
    p.add_argument("--number_classes", type=int, default=None,
                   help="check every mask value is below this (default: no check, classes = max value + 1)")
    p.add_argument("--mask_map", default=None, help="remap mask values first, e.g. 255:1 or 255:1,128:2")
    p.add_argument("--mask_type", choices=MASK_TYPES, default="classes",
                   help="classes: mask values are class ids; instances: one id per object (0 = background), "
                        "stored as a training target (see --instance_target)")
    p.add_argument("--instance_target", choices=("auto",) + instance_targets.TARGETS, default="auto",
                   help="target of instance masks: three_class (background, interior, boundary), boundary "
                        "(membrane / rest), distance (background, boundary, 4 levels of depth in the object); "
                        "auto: boundary when less than 5%% of the voxels are background, else distance")
    p.add_argument("--voxel_size", default=None,
                   help="volumes: voxel size z,y,x in micrometres, when the files' metadata lack it (overrides them)")
    p.add_argument("--image_dataset", default=None,
                   help="dataset inside .zarr / .h5 images; None: 'raw' if present, else the only one or the OME image")
    p.add_argument("--mask_dataset", default=None,
                   help="dataset inside .zarr / .h5 masks; None: 'labels' if present, else the only one")
    p.add_argument("--workers", type=int, default=default_workers(), help="processes decoding images")
    p.add_argument("--overwrite", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="replace existing databases (only once the new ones are complete)")
    cliutil.add_verbose_flag(p)
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args)
    cliutil.setup_logging(options.pop("verbose"))
    summary = build_databases(**options)
    print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit 0, 2 for bad input (one line), 1 for a fault, 130 on Ctrl-C / SIGTERM."""
    return cliutil.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

