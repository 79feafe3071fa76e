"""build_lmdb.py's inputs: pairing images with masks, the split, and the checks of flags and files
that run before any work (README, "Stage 1"). Never imports TensorFlow."""
import logging
import math
import os
from typing import Sequence

import numpy as np

from segkit import build_volume, image_io, instance_targets
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
MASK_TYPES = ("classes", "instances")


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
    if build_volume.is_container_format(image_format):
        return _pair_containers(image_folder, mask_folder, image_format, mask_format or image_format)
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
    return _pair_by_stem(images, masks, image_folder, mask_folder)


def _pair_containers(image_folder: str, mask_folder: str, image_format: str,
                     mask_format: str) -> list[tuple[str, str]]:
    """Pairs of ``.zarr`` stores or HDF5 files by stem (masks may be the image files themselves)."""
    images = build_volume.list_containers(image_folder, image_format)
    if not images:
        raise InputError(image_io.no_images_message(image_folder, image_format))
    masks = build_volume.list_containers(mask_folder, mask_format)
    if not masks:
        raise InputError(f"{mask_folder}: no {image_io.normalize_extension(mask_format)} mask volumes found; "
                         "check --mask_folder and --mask_format")
    return _pair_by_stem(images, masks, image_folder, mask_folder)


def _pair_by_stem(images: list[str], masks: list[str], image_folder: str, mask_folder: str) -> list[tuple[str, str]]:
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




def parse_tile_size(value: int | str | Sequence[int]) -> int | tuple[int, int, int]:
    """``--tile_size``: one edge (``512``) or one per volume axis (``16,128,128``, z,y,x)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    parts = [p for p in str(value).replace(",", " ").split()] if isinstance(value, str) else list(value)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise InputError(f"--tile_size must be one integer or three (z,y,x, for volumes), got {value!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _check_tile(tile_size: int | tuple[int, ...], tile_stride: int | None, volumes: bool) -> None:
    """2-D tiles (one value) are multiples of 32; volume tiles are free (the reader crops to the size factor)."""
    if isinstance(tile_size, tuple) or volumes:
        tiles = tile_size if isinstance(tile_size, tuple) else (tile_size,)
        if not all(1 <= t <= MAX_TILE for t in tiles):
            raise InputError(f"--tile_size must be between 1 and {MAX_TILE} voxels per axis, got {tile_size}")
        if tile_stride is not None and not 1 <= tile_stride <= min(tiles):
            raise InputError(f"--tile_stride must be between 1 and the smallest --tile_size {min(tiles)}, got {tile_stride}")
        return
    if not TILE_MULTIPLE <= tile_size <= MAX_TILE:
        raise InputError(f"--tile_size must be between {TILE_MULTIPLE} and {MAX_TILE} pixels, got {tile_size}")
    if tile_size <= 0 or tile_size % TILE_MULTIPLE:
        raise InputError(f"--tile_size must be a positive multiple of {TILE_MULTIPLE}, got {tile_size}; "
                         f"e.g. {max(TILE_MULTIPLE, tile_size // TILE_MULTIPLE * TILE_MULTIPLE)}")
    if tile_stride is not None and not 1 <= tile_stride <= tile_size:
        raise InputError(f"--tile_stride must be between 1 and --tile_size {tile_size}, got {tile_stride}")


def _check_instance_flags(mask_type: str, instance_target: str | None, number_classes: int | None,
                          mask_map: str | dict | None) -> None:
    if mask_type not in MASK_TYPES:
        raise InputError(f"--mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
    if instance_target not in (None, "auto") + instance_targets.TARGETS:
        raise InputError(f"--instance_target must be one of auto, {', '.join(instance_targets.TARGETS)}, "
                         f"got {instance_target!r}")
    if mask_type == "classes":
        if instance_target not in (None, "auto"):
            raise InputError("--instance_target only applies with --mask_type instances")
        return
    for flag, value in (("--number_classes", number_classes), ("--mask_map", mask_map)):
        if value:
            raise InputError(f"{flag} does not apply to --mask_type instances (the instance target sets the "
                             "classes); drop it")


def check_parameters(*, image_folder, mask_folder, dataset_name, train_fraction, use_tiling, tile_size,
                     tile_stride, number_classes, workers, test_list, seed=0, image_format="tif") -> None:
    for flag, folder in (("--image_folder", image_folder), ("--mask_folder", mask_folder)):
        if not os.path.isdir(folder):
            raise InputError(f"{flag} {folder}: no such folder")
    containers = build_volume.is_container_format(image_format)
    if os.path.samefile(image_folder, mask_folder) and not containers:
        raise InputError(f"--image_folder and --mask_folder are the same folder ({image_folder}); "
                         "keep masks in their own folder, named like their images")
    if not dataset_name or os.sep in dataset_name or "/" in dataset_name or dataset_name.startswith("."):
        raise InputError(f"--dataset_name {dataset_name!r}: give a plain name (no '/', not starting with '.')")
    if not math.isfinite(train_fraction) or (not 0.0 < train_fraction < 1.0 and test_list is None):
        raise InputError(f"--train_fraction must be > 0 and < 1, got {train_fraction}; e.g. 0.8 keeps 20% for test")
    if tile_stride is not None and not use_tiling:
        raise InputError("--tile_stride only applies with --use_tiling 1")
    if use_tiling:
        _check_tile(tile_size, tile_stride, containers)
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


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # respects Slurm / taskset CPU limits
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))
