"""build_lmdb.py's per-image work (in worker processes): read an image and its mask, make the training
target, cut records and encode them (README, "Stage 1"). Never imports TensorFlow."""
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from segkit import build_volume, image_io, instance_targets, lmdb_format, tiling
from segkit.build_inputs import _listing
from segkit.cliutil import InputError

# ----------------------------------------------------------------------------- per image (worker)


@dataclass(frozen=True)
class Task:
    image_path: str
    mask_path: str
    split: str
    tile_size: int | tuple[int, ...] | None  # one value, or (z, y, x) for volumes
    tile_stride: int | None
    mask_map: dict[int, int]
    number_classes: int | None
    source_index: int  # position of the image in its split's metadata "sources"
    mask_type: str = "classes"
    instance_target: str | None = None  # None: chosen from each mask (instance_targets.choose_target)
    voxel_size: tuple[float, float, float] | None = None  # --voxel_size, overrides the files' metadata
    image_dataset: str | None = None
    mask_dataset: str | None = None


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
    spatial_rank: int = 2
    voxel_size: tuple[float, float, float] | None = None
    choice: instance_targets.Choice | None = None  # --mask_type instances: the target and why
    object_sizes: np.ndarray | None = None  # --mask_type instances: each object's pixels (voxels), whole image


def _read(path: str) -> np.ndarray:
    fix = "the file is unreadable or corrupt: re-export it or remove it (and its pair)"
    try:
        array = image_io.read_image(path)
    except image_io.ImageReadError as exc:
        raise InputError(f"{exc}; {fix}") from exc
    if array.size == 0 or array.ndim < 2:
        raise InputError(f"{path}: cannot read image (decoded {array.shape}, no pixels); {fix}")
    return array


def load_image(path: str, array: np.ndarray | None = None) -> np.ndarray:
    """Read (unless ``array`` was read already) and check an image; returns image_hwc."""
    array = _read(path) if array is None else array
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
    return class_mask(read_mask(path, image_hw), path, mask_map, number_classes)


def read_mask(path: str, image_hw: tuple[int, int]) -> np.ndarray:
    """Read a 2-D mask and check its shape against its image (values unchecked)."""
    mask = _read(path)
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[2]):
        mask = mask.reshape(mask.shape[:2] if mask.shape[2] == 1 else mask.shape[1:])
    if mask.ndim != 2:
        raise InputError(f"{path}: mask has shape {mask.shape}; masks must be single-channel (one class id per "
                         "pixel): save it as a grayscale image")
    if mask.shape != tuple(image_hw):
        raise InputError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                         f"{image_hw[0]}x{image_hw[1]} (height x width); they must match pixel for pixel")
    return mask


def class_mask(mask: np.ndarray, path: str, mask_map: dict[int, int], number_classes: int | None) -> np.ndarray:
    """Check a mask's class ids (any number of spatial axes); returns it in the smallest unsigned type."""
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if mask.dtype.kind not in "ui":
        raise InputError(f"{path}: mask pixel type is {mask.dtype.name}, not an integer type; masks hold integer "
                         "class ids: save it as uint8, uint16 or int32")
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


def iter_records(image: np.ndarray, mask: np.ndarray, tile_size: int | tuple[int, ...] | None,
                 tile_stride: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
    """(image, mask, origin) per record (HWC / HW or ZYXC / ZYX): the whole array, or tiles of the padded one."""
    if tile_size is None:
        yield image, mask, (0,) * mask.ndim
        return
    tiles = tiling.per_axis(tile_size, mask.ndim, "--tile_size")
    strides = tiles if tile_stride is None else tiling.per_axis(tile_stride, mask.ndim, "--tile_stride")
    pads = [_centered_pad(t - n) for t, n in zip(tiles, mask.shape)]
    image, mask = image_io.mirror_pad(image, pads), image_io.mirror_pad(mask, pads)
    for origin in tiling.tile_origins(mask.shape, tiles, strides):
        region = tuple(slice(o, o + t) for o, t in zip(origin, tiles))
        yield image[region], mask[region], tuple(o - pad[0] for o, pad in zip(origin, pads))


def target_mask(mask: np.ndarray, task: Task) -> tuple[np.ndarray, instance_targets.Choice | None, np.ndarray | None]:
    """The stored class mask: the mask's class ids, or the training target of an instance mask; with the
    instance mask's object sizes (pixels or voxels of each id present; None for class masks)."""
    if task.mask_type == "classes":
        return class_mask(mask, task.mask_path, task.mask_map, task.number_classes), None, None
    instance_targets.check_instances(mask, task.mask_path)
    choice = instance_targets.choose_target(mask, task.instance_target)
    return (instance_targets.make_target(mask, choice.target), choice,
            instance_targets.object_sizes(mask))


def encode_pair(task: Task) -> Encoded:
    """Read, validate and encode one image/mask pair, 2-D or volume (runs in a worker process)."""
    array = None if build_volume.is_volume_file(task.image_path) else _read(task.image_path)
    if build_volume.is_volume_file(task.image_path, array):
        return encode_volume(task, image_io.tiff_stack_hint(task.image_path, array) if array is not None else None)
    image = load_image(task.image_path, array)
    if isinstance(task.tile_size, tuple):
        raise InputError(f"{task.image_path}: a 2-D image, but --tile_size {','.join(map(str, task.tile_size))} "
                         "has one value per axis of a volume; give one tile size for 2-D images")
    mask, choice, sizes = target_mask(read_mask(task.mask_path, image.shape[:2]), task)
    source = {"file": os.path.basename(task.image_path), "mask": os.path.basename(task.mask_path),
              "height": int(image.shape[0]), "width": int(image.shape[1])}
    return _encode_records(task, image, mask, source, choice=choice, sizes=sizes)


def encode_volume(task: Task, stack_hint: str | None = None) -> Encoded:
    """Read, validate and encode one volume pair (TIFF stack, Zarr, HDF5): image ZYXC, mask ZYX."""
    image, labels, spacing = build_volume.load_volume_pair(
        task.image_path, task.mask_path, image_dataset=task.image_dataset, mask_dataset=task.mask_dataset,
        voxel_size_zyx_um=task.voxel_size, stack_hint=stack_hint)
    mask, choice, sizes = target_mask(labels, task)
    source = {"file": os.path.basename(task.image_path), "mask": os.path.basename(task.mask_path),
              "depth": int(image.shape[0]), "height": int(image.shape[1]), "width": int(image.shape[2]),
              "voxel_size_zyx_um": list(spacing)}
    return _encode_records(task, image, mask, source, spacing, choice, sizes)


def _encode_records(task: Task, image: np.ndarray, mask: np.ndarray, source: dict[str, Any],
                    spacing: tuple[float, float, float] | None = None,
                    choice: instance_targets.Choice | None = None, sizes: np.ndarray | None = None) -> Encoded:
    mean, std = image_io.image_stats(image)
    source.update(mean=mean, std=std)
    records, record_classes = [], []
    counts = np.zeros(int(mask.max()) + 1 if mask.size else 1, np.int64)
    for tile_image, tile_mask, origin in iter_records(image, mask, task.tile_size, task.tile_stride):
        tile_counts = np.bincount(tile_mask.ravel(), minlength=counts.size)
        counts += tile_counts
        classes = [int(c) for c in np.flatnonzero(tile_counts)]
        record = lmdb_format.Record(tile_image, tile_mask, task.source_index, origin, classes)
        records.append(lmdb_format.encode_record(record))
        record_classes.append(classes)
    if choice is not None:
        source["instance_target"] = {"target": choice.target, "reason": choice.reason}
    if sizes is not None:
        source["objects"] = int(sizes.size)
    return Encoded(task, source, image.dtype.name, int(image.shape[-1]), records, record_classes, counts,
                   mask.ndim, spacing, choice, sizes)


def check_consistent(encoded: Encoded, first: Encoded | None) -> None:
    if first is None:
        return
    if encoded.spatial_rank != first.spatial_rank:
        kinds = {2: "a 2-D image", 3: "a volume"}
        raise InputError(f"{encoded.task.image_path} is {kinds[encoded.spatial_rank]} but {first.task.image_path} is "
                         f"{kinds[first.spatial_rank]}; a database holds one kind: build them separately")
    if encoded.choice is not None and encoded.choice.target != first.choice.target:
        raise InputError(f"{encoded.task.mask_path}: instance target {encoded.choice.target} ({encoded.choice.reason}) "
                         f"differs from {first.task.mask_path}'s {first.choice.target} ({first.choice.reason}); "
                         f"choose one with --instance_target {'|'.join(instance_targets.TARGETS)}")
    for what, a, b in (("channels", encoded.channels, first.channels),
                       ("pixel type", encoded.image_dtype, first.image_dtype)):
        if a != b:
            raise InputError(f"{encoded.task.image_path}: {what} {a} differs from {first.task.image_path} ({b}); "
                             f"all images of a data set need the same {what}: convert them or build separate databases")
