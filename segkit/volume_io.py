"""Reading volumes: TIFF stacks, OME-Zarr / Zarr and HDF5, as (Z, Y, X, C) with their voxel size.

One home for: which axes a file declares, which of its metadata gives the voxel size (in micrometres,
(z, y, x) order), and the ``--voxel_size z,y,x`` flag value. Zarr and HDF5 volumes are read lazily
(:class:`ZYXCView` reads only the region asked for); TIFF stacks are read whole, or lazily on request. Bad input raises
:class:`segkit.cliutil.InputError` in one line. No TensorFlow here.
"""
from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

import numpy as np

from segkit.cliutil import InputError

SPATIAL = "zyx"
ANISOTROPY_RATIO = 2.0  # an axis whose spacing is more than this times the finest is "anisotropic"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
UNIT_UM = {  # unit spellings of ImageJ, OME, NGFF and HDF5 attributes -> micrometres per unit
    "m": 1e6, "meter": 1e6, "cm": 1e4, "centimeter": 1e4, "mm": 1e3, "millimeter": 1e3,
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "pm": 1e-6, "picometer": 1e-6,
    "å": 1e-4, "angstrom": 1e-4, "inch": 25400.0, "in": 25400.0,
}
TIFF_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 1e4}  # ResolutionUnit tag: inch, centimetre (1 = none)


@dataclass
class Volume:
    """A volume as ``data_zyxc`` (numpy array or lazy :class:`ZYXCView`), its voxel size in micrometres
    ((z, y, x), None when the file does not say) and ``description``: what was found, for the log."""

    data_zyxc: object
    spacing_zyx_um: tuple[float, float, float] | None
    description: str
    axes: str  # the axes as stored, e.g. "ZCYX" or "czyx"
    _closers: list = field(default_factory=list, repr=False)

    @property
    def shape_zyxc(self) -> tuple[int, int, int, int]:
        return tuple(self.data_zyxc.shape)

    def close(self) -> None:
        for closer in self._closers:
            closer()
        self._closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ZYXCView:
    """Lazy (Z, Y, X, C) view of a stored array with other axis order: ``view[z0:z1, y0:y1]`` reads
    only that region. ``order`` gives, for each of z, y, x, c, the stored axis (None: a new axis);
    stored singleton axes not in ``order`` are indexed at 0. :meth:`zyx` is the (Z, Y, X) view of a
    single-channel volume (a mask)."""

    def __init__(self, array, order: tuple[int | None, ...]):
        self.array, self.order = array, tuple(order)
        self.dtype = np.dtype(array.dtype)
        self.shape = tuple(1 if a is None else int(array.shape[a]) for a in self.order)
        self.ndim = len(self.order)

    def zyx(self, where: str = "volume") -> ZYXCView:
        if self.ndim == 4 and self.shape[3] != 1:
            raise InputError(f"{where}: {self.shape[3]} channels where a single-channel volume (a mask) is expected")
        return ZYXCView(self.array, self.order[:3])

    def __getitem__(self, key) -> np.ndarray:
        """Slices or integers in (z, y, x, c) order, numpy's meaning (an integer drops its axis)."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > self.ndim:
            raise IndexError(f"ZYXCView takes up to {self.ndim} slices or integers (z, y, x[, c])")
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        dropped = tuple(i for i, k in enumerate(key) if isinstance(k, (int, np.integer)))
        key = tuple(slice(k, k + 1 if k != -1 else None) if i in dropped else k for i, k in enumerate(key))
        stored = [0] * self.array.ndim
        for k, axis in zip(key, self.order):
            if axis is not None:
                stored[axis] = k
        region = np.asarray(self.array[tuple(stored)])
        present = [a for a in self.order if a is not None]
        kept = sorted(present)  # axes indexed at 0 vanished; the rest keep their stored order
        region = np.transpose(region, [kept.index(a) for a in present])
        for position, axis in enumerate(self.order):
            if axis is None:
                region = np.expand_dims(region, position)
        return region.squeeze(dropped) if dropped else region

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data if dtype is None else data.astype(dtype)


# ---- Units and the --voxel_size flag --------------------------------------------------------------

def unit_to_um(unit, where: str) -> float | None:
    """Micrometres per ``unit`` (None for an absent unit or 'pixel'); unknown spellings raise InputError."""
    if unit is None:
        return None
    text = str(unit).strip().lower()
    if text in ("", "pixel", "pixels", "px", "none"):
        return None
    if text not in UNIT_UM:
        raise InputError(f"{where}: unknown length unit {unit!r}; pass the voxel size with --voxel_size z,y,x (micrometres)")
    return UNIT_UM[text]


def parse_voxel_size(text: str) -> tuple[float, float, float]:
    """A ``--voxel_size z,y,x`` value in micrometres: three finite positive numbers."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--voxel_size must be three positive numbers z,y,x in micrometres "
                         f"(e.g. --voxel_size 0.04,0.004,0.004), got {text!r}")
    return values


def _valid_spacing(values, scale: float = 1.0) -> tuple[float, float, float] | None:
    values = tuple(float(v) * scale for v in values)
    return values if len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values) else None


def is_anisotropic(spacing_zyx_um) -> tuple[bool, bool, bool]:
    """Per axis: is its spacing more than ANISOTROPY_RATIO times the finest?"""
    finest = min(spacing_zyx_um)
    return tuple(bool(s > ANISOTROPY_RATIO * finest) for s in spacing_zyx_um)


# ---- Axes -----------------------------------------------------------------------------------------

def axes_order(axes: str, shape, where: str) -> tuple[tuple[int | None, ...], str]:
    """Map stored axes (letters, any case) to (z, y, x, c) positions; returns (order, note).

    Channels are 'c' or 's' (samples); a stack of pages ('i' or 'q', a TIFF without named axes) is taken
    as z when there is no 'z'. Other axes (e.g. time) must have length 1.
    """
    axes = axes.lower()
    if len(axes) != len(shape) or len(set(axes)) != len(axes):
        raise InputError(f"{where}: axes {axes!r} do not fit the data shape {tuple(shape)}; pass the axes explicitly")
    note = ""
    if "z" not in axes:
        pages = [a for a in "iq" if a in axes and shape[axes.index(a)] > 1]
        if len(pages) == 1:
            axes, note = axes.replace(pages[0], "z"), "the stack of pages is taken as z (the file names no axes)"
    if "y" not in axes or "x" not in axes or "z" not in axes:
        kind = "2D data" if "z" not in axes else "data"
        raise InputError(f"{where}: {kind} with axes {axes.upper()} {tuple(shape)} where a volume (Z, Y, X) is "
                         f"expected; give a z-stack, or name the axes of the file")
    channel_axes = [a for a in "cs" if a in axes and shape[axes.index(a)] > 1]
    if len(channel_axes) > 1:
        raise InputError(f"{where}: both C and S axes hold several channels {tuple(shape)}; merge them into one channel axis")
    for letter, size in zip(axes, shape):
        if letter not in "zyxcs" and size > 1:
            raise InputError(f"{where}: axis {letter.upper()} has length {size} (axes {axes.upper()}); "
                             f"only Z, Y, X and channels are read: extract one {letter.upper()} first")
    channel = axes.index(channel_axes[0]) if channel_axes else None
    return tuple(axes.index(a) for a in SPATIAL) + (channel,), note


def _reorder(data: np.ndarray, order) -> np.ndarray:
    """In-memory version of :class:`ZYXCView`."""
    return ZYXCView(data, order)[:]


# ---- TIFF ------------------------------------------------------------------------------------------

def tiff_pixels_per_unit(tags) -> tuple[float, float] | None:
    """(y, x) pixels per resolution unit from a TIFF page's XResolution / YResolution tags (YResolution defaults
    to XResolution); None when absent or zero. The one reader of these tags (segkit.calibration uses it too)."""
    xres = tags.get("XResolution")
    if xres is None:
        return None
    values = tuple(_rational(tag.value) for tag in (tags.get("YResolution") or xres, xres))
    return values if all(v > 0 for v in values) else None


def _rational(value) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def ome_pixels(xml: str):
    """The ``Pixels`` element of OME-XML (any namespace), or None."""
    root = ElementTree.fromstring(xml)
    return next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)


def _tiff_xy_um(page) -> tuple[float, float] | None:
    """(y, x) pixel size from the resolution tags, in micrometres, when the unit tag says inch or cm."""
    unit, per_pixel = page.tags.get("ResolutionUnit"), tiff_pixels_per_unit(page.tags)
    if unit is None or per_pixel is None or int(unit.value) not in TIFF_RESOLUTION_UNIT_UM:
        return None
    per_unit = TIFF_RESOLUTION_UNIT_UM[int(unit.value)]
    return per_unit / per_pixel[0], per_unit / per_pixel[1]


def _imagej_spacing(tif, where: str) -> tuple[tuple | None, str]:
    meta = tif.imagej_metadata or {}
    per_unit = unit_to_um(meta.get("unit"), where)
    per_pixel = tiff_pixels_per_unit(tif.pages[0].tags)
    if per_unit is None or per_pixel is None or "spacing" not in meta:
        return None, "ImageJ metadata without a calibrated z spacing and unit"
    spacing = _valid_spacing((meta["spacing"], 1.0 / per_pixel[0], 1.0 / per_pixel[1]), per_unit)
    return spacing, f"ImageJ spacing {meta['spacing']} and resolution tags in {meta.get('unit')}"


def _ome_spacing(tif, where: str) -> tuple[tuple | None, str]:
    pixels = ome_pixels(tif.ome_metadata)
    if pixels is None:
        return None, "OME metadata without Pixels"
    sizes = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        per_unit = unit_to_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"), where)
        sizes.append(None if value is None or per_unit is None else float(value) * per_unit)
    if None in sizes:
        return None, "OME metadata without PhysicalSizeX/Y/Z"
    return _valid_spacing(sizes), "OME PhysicalSizeZ/Y/X"


def read_tiff_volume(path: str, axes: str | None = None, lazy: bool = False) -> Volume:
    """A TIFF stack (ImageJ hyperstack, OME-TIFF or plain multi-page) as (Z, Y, X, C): read whole, or with
    ``lazy`` a :class:`ZYXCView` that reads only the pages / tiles asked for (memory-mapped when the file is
    uncompressed and contiguous, else through tifffile's zarr store); close the Volume when done."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            stored_axes = axes or series.axes
            shape, contiguous = tuple(series.shape), series.dataoffset is not None
            data = None if lazy else series.asarray()
            if tif.is_ome:
                spacing, found = _ome_spacing(tif, path)
            elif tif.is_imagej:
                spacing, found = _imagej_spacing(tif, path)
            else:
                spacing, found = None, "no ImageJ or OME metadata"
            xy = _tiff_xy_um(tif.pages[0])
        order, note = axes_order(stored_axes, shape, path)
        closers = []
        if lazy:
            data, closers = _lazy_tiff(path, contiguous)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise InputError(f"{path}: cannot read TIFF ({error}); re-export the stack") from None
    if spacing is None and xy is not None:
        found += f"; resolution tags give y, x = {xy[0]:.6g}, {xy[1]:.6g} um but no z spacing"
    view = ZYXCView(data, order) if lazy else _reorder(data, order)
    return Volume(view, spacing, _describe(path, "TIFF", stored_axes, found, note), stored_axes, closers)


def _lazy_tiff(path: str, contiguous: bool):
    """(array of series 0 read on demand, closers): a memory map when uncompressed, else a zarr view."""
    import tifffile
    import zarr

    if contiguous:
        return tifffile.memmap(path, mode="r"), []
    store = tifffile.imread(path, aszarr=True)
    array = zarr.open(store, mode="r")
    if isinstance(array, zarr.Group):  # pyramid: full resolution
        array = array["0"]
    return array, [store.close]


def _describe(path, kind, axes, found, note="") -> str:
    text = f"{path}: {kind}, axes {axes}; voxel size from {found}"
    return f"{text}; {note}" if note else text


# ---- Attributes shared by HDF5 and plain Zarr ------------------------------------------------------

def _attribute_axes(attrs) -> str | None:
    """Axes named by common attributes: 'axes' (string or list), ilastik 'axistags', xarray '_ARRAY_DIMENSIONS'."""
    if "axistags" in attrs:
        try:
            return "".join(tag["key"] for tag in json.loads(attrs["axistags"])["axes"])
        except (ValueError, KeyError, TypeError):
            return None
    for key in ("axes", "_ARRAY_DIMENSIONS", "dimension_names"):
        value = attrs.get(key)
        if isinstance(value, str):
            return value
        if value is not None and all(isinstance(v, str) and len(v) == 1 for v in value):
            return "".join(value)
    return None


def _attribute_spacing(attrs, where: str) -> tuple[tuple | None, str]:
    """Voxel size from 'element_size_um' (Fiji/ilastik, um) or 'resolution' (CREMI/gunpowder: nm unless a
    'unit'/'units' attribute says otherwise), both in (z, y, x) order."""
    if "element_size_um" in attrs:
        return _valid_spacing(np.ravel(attrs["element_size_um"])), "attribute element_size_um"
    if "resolution" in attrs:
        unit = attrs.get("unit", attrs.get("units"))
        per_unit = unit_to_um(unit, where) if unit is not None else 1e-3
        said = f"in {unit}" if unit is not None else "taken as nm (the CREMI/gunpowder convention)"
        return _valid_spacing(np.ravel(attrs["resolution"]), per_unit or 1e-3), f"attribute resolution {said}"
    return None, "no voxel-size attribute (element_size_um, resolution)"


def _default_axes(shape, where: str) -> str:
    if len(shape) == 3:
        return "zyx"  # C order of CREMI, ilastik, BigDataViewer and zarr/HDF5 exports
    if len(shape) < 3:
        raise InputError(f"{where}: 2D data {tuple(shape)} where a volume (Z, Y, X) is expected; give a z-stack")
    raise InputError(f"{where}: unknown axes for a {len(shape)}-D dataset {tuple(shape)}; add an 'axes' attribute "
                     f"(e.g. 'zyxc') or name the axes explicitly")


# ---- HDF5 ------------------------------------------------------------------------------------------

def split_container_path(address: str, suffixes) -> tuple[str, str] | None:
    """'folder/file.h5/group/data' -> ('folder/file.h5', 'group/data'); None if no part ends in a suffix."""
    parts = address.replace(os.sep, "/").split("/")
    for i in range(len(parts), 0, -1):
        head = "/".join(parts[:i])
        if head.lower().endswith(suffixes):
            return head, "/".join(parts[i:])
    return None


def read_hdf5_volume(address: str, axes: str | None = None) -> Volume:
    """An HDF5 dataset addressed as ``file.h5/dataset/path``, lazily; close the Volume when done."""
    import h5py

    file_path, inner = split_container_path(address, HDF5_SUFFIXES)
    if not os.path.isfile(file_path):
        raise InputError(f"{file_path}: no such HDF5 file")
    try:
        handle = h5py.File(file_path, "r")
    except OSError as error:
        raise InputError(f"{file_path}: cannot open HDF5 ({error})") from None
    try:
        dataset = _hdf5_dataset(handle, file_path, inner)
        attrs = dict(dataset.attrs)
        stored_axes = axes or _attribute_axes(attrs) or _default_axes(dataset.shape, address)
        order, note = axes_order(stored_axes, dataset.shape, address)
        spacing, found = _attribute_spacing(attrs, address)
    except Exception:
        handle.close()
        raise
    return Volume(ZYXCView(dataset, order), spacing, _describe(address, "HDF5", stored_axes, found, note),
                  stored_axes, [handle.close])


def _hdf5_dataset(handle, file_path: str, inner: str):
    import h5py

    names = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if not inner and len(names) == 1:
        inner = names[0]
    target = handle.get(inner) if inner else None
    if not isinstance(target, h5py.Dataset):
        listing = ", ".join(names[:10]) or "none"
        what = f"no dataset {inner!r}" if inner else "several datasets"
        raise InputError(f"{file_path}: {what} (datasets: {listing}); address one as {file_path}/DATASET")
    return target


# ---- Zarr / OME-Zarr --------------------------------------------------------------------------------

def _ngff_scale(multiscale, dataset) -> list | None:
    scale = None
    for transforms in (dataset.get("coordinateTransformations", []), multiscale.get("coordinateTransformations", [])):
        for transform in transforms:
            if transform.get("type") == "scale":
                values = np.asarray(transform["scale"], float)
                scale = values if scale is None else scale * values
    return scale


def _read_ome_zarr(group, where: str, axes: str | None) -> Volume:
    multiscale = group.attrs["multiscales"][0]
    dataset = multiscale["datasets"][0]
    array = group[dataset["path"]]
    axis_list = multiscale.get("axes") or [{"name": a} for a in "tczyx"[-array.ndim:]]  # NGFF 0.3 default
    names = "".join(a["name"] if isinstance(a, dict) else a for a in axis_list)
    stored_axes = axes or names
    order, note = axes_order(stored_axes, array.shape, where)
    scale, spacing, found = _ngff_scale(multiscale, dataset), None, "no coordinateTransformations scale"
    if scale is not None:
        units = {a["name"]: a.get("unit") for a in axis_list if isinstance(a, dict)}
        per_unit = [unit_to_um(units.get(letter), where) for letter in SPATIAL]
        if None not in per_unit:
            spacing = _valid_spacing([scale[names.index(a)] * u for a, u in zip(SPATIAL, per_unit)])
            found = f"NGFF scale of dataset {dataset['path']!r} in {[units[a] for a in SPATIAL]}"
        else:
            found = "NGFF scale without spatial units"
    return Volume(ZYXCView(array, order), spacing, _describe(where, "OME-Zarr", stored_axes, found, note), stored_axes)


def read_zarr_volume(address: str, axes: str | None = None) -> Volume:
    """OME-Zarr (NGFF 0.4, first resolution level) or a plain Zarr array (``store.zarr`` or
    ``store.zarr/path/to/array``), lazily."""
    import zarr

    split = split_container_path(address, (".zarr",)) or (address, "")
    store, inner = split
    if not os.path.isdir(store):
        raise InputError(f"{store}: no such Zarr store")
    try:
        node = zarr.open_group(store, mode="r")
        if inner:
            node = node[inner]
    except zarr.errors.ContainsArrayError:  # the store itself is one array
        node = zarr.open_array(store, mode="r")
    except (KeyError, FileNotFoundError, ValueError) as error:
        raise InputError(f"{address}: cannot open Zarr ({error}); address an array as STORE.zarr/ARRAY") from None
    if isinstance(node, zarr.Group):
        if "multiscales" in node.attrs:
            return _read_ome_zarr(node, address, axes)
        arrays = sorted(name for name, _ in node.arrays())
        raise InputError(f"{address}: a Zarr group with no OME multiscales (arrays: {', '.join(arrays[:10]) or 'none'}); "
                         f"address one as {address}/ARRAY")
    attrs = dict(node.attrs)
    if getattr(node.metadata, "dimension_names", None):
        attrs.setdefault("dimension_names", list(node.metadata.dimension_names))
    stored_axes = axes or _attribute_axes(attrs) or _default_axes(node.shape, address)
    order, note = axes_order(stored_axes, node.shape, address)
    spacing, found = _attribute_spacing(attrs, address)
    return Volume(ZYXCView(node, order), spacing, _describe(address, "Zarr", stored_axes, found, note), stored_axes)


# ---- Entry point -----------------------------------------------------------------------------------

def open_volume(address: str, axes: str | None = None,
                voxel_size_zyx_um: tuple[float, float, float] | None = None, lazy: bool = False) -> Volume:
    """Open a volume by its address (TIFF file, ``.zarr`` store or array, ``file.h5/dataset``).

    Zarr and HDF5 are always lazy; ``lazy`` makes TIFF stacks lazy too (:func:`read_tiff_volume`).

    ``axes`` overrides the stored axes (letters, e.g. 'zcyx'); ``voxel_size_zyx_um`` (from
    :func:`parse_voxel_size`) overrides what the metadata says.
    """
    address = str(address)
    lower = address.lower()
    if split_container_path(address, HDF5_SUFFIXES):
        volume = read_hdf5_volume(address, axes)
    elif split_container_path(address, (".zarr",)) or os.path.isdir(address):
        volume = read_zarr_volume(address, axes)
    elif lower.endswith((".tif", ".tiff")):
        if not os.path.isfile(address):
            raise InputError(f"{address}: no such file")
        volume = read_tiff_volume(address, axes, lazy=lazy)
    else:
        raise InputError(f"{address}: not a volume format this toolkit reads (TIFF stack, .zarr, file.h5/dataset)")
    if voxel_size_zyx_um is not None:
        volume.spacing_zyx_um = tuple(float(v) for v in voxel_size_zyx_um)
        volume.description += f"; voxel size set by --voxel_size {volume.spacing_zyx_um}"
    return volume
