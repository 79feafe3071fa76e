"""Volumes in the build stage (``build_lmdb.py``): which inputs are volumes, how a container's dataset
is addressed, and reading one image/mask volume pair checked against each other.

Reading itself (axes, voxel size from metadata) is ``segkit/volume_io``'s. README: "Building databases",
"Volumes". No TensorFlow here.
"""
from __future__ import annotations

import os

import numpy as np

from segkit import image_io, volume_io
from segkit.cliutil import InputError

CONTAINER_EXTENSIONS = (".zarr",) + volume_io.HDF5_SUFFIXES
DEFAULT_DATASETS = {"image": "raw", "mask": "labels"}  # used when present and no --image/mask_dataset is given


def is_container_format(image_format: str | None) -> bool:
    return bool(image_format) and image_io.normalize_extension(image_format) in CONTAINER_EXTENSIONS


def list_containers(folder: str, image_format: str) -> list[str]:
    """Sorted names of the ``.zarr`` stores (folders) or HDF5 files in ``folder`` with this extension."""
    ext = image_io.normalize_extension(image_format)
    accept = volume_io.HDF5_SUFFIXES if ext in volume_io.HDF5_SUFFIXES else (ext,)
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.splitext(n)[1].lower() in accept
                  and os.path.exists(os.path.join(folder, n)))


def is_volume_file(path: str, array: np.ndarray | None = None) -> bool:
    """A ``.zarr`` / HDF5 container, or a TIFF whose axes or pages make it a z-stack."""
    if path.lower().endswith(CONTAINER_EXTENSIONS):
        return True
    return array is not None and image_io.tiff_stack_hint(path, array) is not None


def _has_member(path: str, name: str) -> bool:
    if path.lower().endswith(volume_io.HDF5_SUFFIXES):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                return name in handle
        except OSError:
            return False  # open_volume reports the unreadable file
    return os.path.exists(os.path.join(path, name))


def address(path: str, dataset: str | None, role: str) -> str:
    """``path/dataset`` for a container: the given dataset, else "raw" (images) / "labels" (masks) when the
    container has it, else the container itself (its only dataset, an OME-Zarr image or a plain array)."""
    if not path.lower().endswith(CONTAINER_EXTENSIONS):
        return path
    if dataset:
        return f"{path}/{dataset.strip('/')}"
    default = DEFAULT_DATASETS[role]
    return f"{path}/{default}" if _has_member(path, default) else path


def read_volume(path: str, dataset: str | None, voxel_size_zyx_um, role: str):
    """(data ZYXC numpy, voxel size or None, description) of the image or mask volume at ``path``."""
    with volume_io.open_volume(address(path, dataset, role), voxel_size_zyx_um=voxel_size_zyx_um) as volume:
        data = np.asarray(volume.data_zyxc)
        return data, volume.spacing_zyx_um, volume.description


def load_volume_pair(image_path: str, mask_path: str, *, image_dataset: str | None = None,
                     mask_dataset: str | None = None, voxel_size_zyx_um=None,
                     stack_hint: str | None = None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(image_zyxc, mask_zyx, voxel size in um) of a volume pair, checked; raises InputError in one line.
    ``stack_hint``: why a TIFF was taken for a z-stack (``image_io.tiff_stack_hint``), for the message."""
    image, spacing, description = read_volume(image_path, image_dataset, voxel_size_zyx_um, "image")
    if spacing is None:
        what = f"{stack_hint}, read as a volume, but its" if stack_hint else "a volume, but its"
        found = description.split("voxel size from ", 1)[-1]
        raise InputError(f"{image_path}: {what} metadata give no voxel size ({found}); pass it with "
                         "--voxel_size z,y,x (micrometres, e.g. --voxel_size 0.04,0.004,0.004)")
    try:
        image_io.check_dtype(image, image_path)
    except ValueError as exc:
        raise InputError(str(exc) if str(exc).startswith(image_path) else f"{image_path}: {exc}") from None
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"{image_path}: volume contains NaN or infinite voxels; replace them before building")
    mask, _, _ = read_volume(mask_path, mask_dataset, voxel_size_zyx_um, "mask")
    if mask.ndim == 4:
        if mask.shape[3] != 1:
            raise InputError(f"{mask_path}: mask volume has {mask.shape[3]} channels; masks hold one id per voxel: "
                             "save it single-channel")
        mask = mask[..., 0]
    if mask.shape != image.shape[:3]:
        raise InputError(f"{mask_path}: mask volume is {'x'.join(map(str, mask.shape))} but its image is "
                         f"{'x'.join(map(str, image.shape[:3]))} (z x y x x); they must match voxel for voxel")
    return image, mask, tuple(float(v) for v in spacing)
