"""3D augmentation of volumes: the 2D design of ``augment.py`` for (Z, Y, X) crops, one resampling per sample.

The settings are the 3D block of constants at the top of ``augment.py`` (read through
:class:`AugmentParams3D`). No TensorFlow here.

Axis order: images ``image_zyxc``, masks ``mask_zyx``; vectors and matrices are in (z, y, x) order,
in voxels of the input. The voxel size (``spacing_zyx_um``) is required: anisotropy is read from it
(``segkit.volume_io.is_anisotropic``) and the elastic settings are in micrometres.

* Geometry is fused: mirror, transpose, rotation, scale, elastic displacement and section slip/shift
  form ONE map from output voxels to input voxels (:class:`Geometry3D`)::

      input(p) = c_in + rotation @ diag(mirror / scale) @ permutation @ (p - c_out)
                 + displacement(p) + (0, section_offsets_yx[p_z])

  applied in ONE resampling, linear for images and nearest neighbour for masks. When z stays z and
  integer (always for an anisotropic z), every output section is one remap of one input section;
  otherwise two input sections are remapped and blended linearly along z. The sections are laid out
  as one 2D image (a tall stack, or a mosaic of sections when taller than OpenCV's coordinate range)
  so each of those is a single ``cv2.remap``; a region inside the record is such a stack already, as a
  strided view of it (no copy: :func:`_section_stack`); integer images of at most 16 bits are remapped in their
  own type (``REMAP_NATIVE_DTYPES``), regions too large even for a mosaic use ``scipy.ndimage``.
* Context instead of padding, as in 2D: :meth:`Geometry3D.extent` says how far the warp samples,
  :func:`choose_origin_3d` places the crop so that it reads real data when the record is large enough
  (mirror reflection otherwise), and :func:`context_margin_3d` bounds the context any draw needs.
* Section effects act on output z sections: slip/shift (gunpowder's misalignment), intensity scale and
  shift per section, missing and low-contrast sections, then Gaussian noise.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

import augment
from segkit.volume_io import is_anisotropic

MIN_ELASTIC_SPACING_VOXELS = 4   # a control grid finer than this folds the volume
ELASTIC_CLIP_SIGMAS = 3.0        # control-point displacements are clipped to +-this many std (bounded context)
# Integer images interpolated in their own type by cv2.remap (1/32-voxel fixed-point weights, the value
# rounded to the integer grid: at most half a grey level plus a 64th of the local slope per in-plane axis,
# tests/test_augment3d.py): a quarter of the bytes of float32, and no conversion of the whole region.
REMAP_NATIVE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))
CV_MAX_ROWS = 32000              # cv2.remap's fixed-point coordinates must stay below 32767
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: arrays below it come from the heap, not fresh mmap pages
TRIM_THRESHOLD_BYTES = 128 << 20  # free heap kept for the next sample instead of returned to the OS
NOISE_BANK_VALUES = 1 << 22      # standard normal values drawn once per process (16 MB); noise is a window of them
NOISE_BANK_SEED = 20261205       # the bank is the same in every worker and run: samples depend on the seed only
_noise_bank: np.ndarray | None = None


def tune_allocator() -> bool:
    """Let this process reuse the memory of freed large arrays (glibc ``mallopt``); True if applied.

    By default glibc gives every array above 128 KiB fresh pages from the OS and returns them on free, so
    each 1-4 MB temporary of a 3D sample pays page faults again: half of the CPU time per sample on the
    development machine (see benchmarks/bench_augment3d.py). Call once at the start of a reader worker.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(-1, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, musl): the default allocator stays
        return False


@dataclass(frozen=True)
class AugmentParams3D:
    """3D augmentation strengths; the defaults are the 3D constants at the top of ``augment.py``."""

    mirror: bool = augment.MIRROR_3D
    transpose: bool = augment.TRANSPOSE_3D
    rotation: bool = augment.ROTATION_3D
    rotation_out_of_plane: bool = augment.ROTATION_3D_OUT_OF_PLANE
    scale_fraction: float = augment.SCALE_FRACTION_3D
    elastic_spacing_um: tuple = augment.ELASTIC_SPACING_UM_3D
    elastic_jitter_um: tuple = augment.ELASTIC_JITTER_UM_3D
    slip_probability: float = augment.SLIP_PROBABILITY_3D
    shift_probability: float = augment.SHIFT_PROBABILITY_3D
    misalign_max_pixels: int = augment.MISALIGN_MAX_PIXELS_3D
    section_scale_fraction: float = augment.SECTION_SCALE_FRACTION_3D
    section_shift_fraction: float = augment.SECTION_SHIFT_FRACTION_3D
    missing_probability: float = augment.MISSING_SECTION_PROBABILITY_3D
    low_contrast_probability: float = augment.LOW_CONTRAST_PROBABILITY_3D
    low_contrast_factor: float = augment.LOW_CONTRAST_FACTOR_3D
    noise_fraction: float = augment.NOISE_FRACTION_3D

    def __post_init__(self):
        for name in ("scale_fraction", "misalign_max_pixels", "section_scale_fraction", "section_shift_fraction",
                     "low_contrast_factor", "noise_fraction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"3D augmentation {name} must be >= 0, got {getattr(self, name)}")
        for name in ("slip_probability", "shift_probability", "missing_probability", "low_contrast_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"3D augmentation {name} must be in [0, 1], got {getattr(self, name)}")
        if self.missing_probability + self.low_contrast_probability > 1:
            raise ValueError("3D augmentation missing_probability + low_contrast_probability must be <= 1")
        if self.scale_fraction >= 1 or self.section_scale_fraction >= 1:
            raise ValueError("3D augmentation scale_fraction and section_scale_fraction must be < 1")
        for name in ("elastic_spacing_um", "elastic_jitter_um"):
            values = getattr(self, name)
            if len(values) != 3 or not all(v >= 0 for v in values):
                raise ValueError(f"3D augmentation {name} must be three numbers >= 0 (z, y, x), got {values}")
        if not all(v > 0 for v in self.elastic_spacing_um):
            raise ValueError(f"3D augmentation elastic_spacing_um must be > 0, got {self.elastic_spacing_um}")

    @classmethod
    def none(cls, **enabled) -> AugmentParams3D:
        """Everything off, except the settings given as keyword arguments."""
        off = dict(mirror=False, transpose=False, rotation=False, scale_fraction=0.0, elastic_jitter_um=(0, 0, 0),
                   slip_probability=0.0, shift_probability=0.0, section_scale_fraction=0.0,
                   section_shift_fraction=0.0, missing_probability=0.0, low_contrast_probability=0.0,
                   noise_fraction=0.0)
        return cls(**{**off, **enabled})

    def replace(self, **changes) -> AugmentParams3D:
        return dataclasses.replace(self, **changes)


# ---- Geometry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry3D:
    """A sampled spatial transform from crop (output) voxels to record (input) voxels, by its parts.

    ``permutation[i]`` is the output axis read for input-frame axis i; ``mirror_zyx`` is +-1 per axis;
    ``rotation`` a 3x3 rotation; ``scale_zyx`` the zoom per axis; ``displacement`` None or, per axis,
    None or a (Z, Y, X) float32 field in input voxels; ``section_offsets_yx`` None or (Z, 2) integer
    in-plane offsets per output section. See the module docstring for the composition.
    """

    out_zyx: tuple[int, int, int]
    permutation: tuple[int, int, int] = (0, 1, 2)
    mirror_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    scale_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    displacement: tuple | None = None
    section_offsets_yx: np.ndarray | None = None

    @functools.cached_property
    def linear(self) -> np.ndarray:
        """The 3x3 output->input matrix: rotation @ diag(mirror / scale) @ permutation."""
        permutation = np.eye(3)[list(self.permutation)]
        return self.rotation @ np.diag(np.divide(self.mirror_zyx, self.scale_zyx)) @ permutation

    @property
    def is_identity(self) -> bool:
        return (self.displacement is None and self.section_offsets_yx is None
                and np.array_equal(self.linear, np.eye(3)))

    @property
    def keeps_sections(self) -> bool:
        """Does every output section read exactly one input section (z maps to +-z, no z displacement)?"""
        z_only = np.array_equal(np.abs(self.linear[0]), [1, 0, 0]) and np.array_equal(np.abs(self.linear[:, 0]), [1, 0, 0])
        return z_only and (self.displacement is None or self.displacement[0] is None)

    @functools.cached_property
    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): per axis (z, y, x) the sampled input positions relative to ``c_in`` (cached)."""
        half = (np.asarray(self.out_zyx) - 1) / 2
        corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
        mapped = self.linear @ corners
        lo, hi = mapped.min(axis=1), mapped.max(axis=1)
        if self.displacement is not None:
            reach = np.array([0.0 if d is None else _largest_magnitude(d) for d in self.displacement])
            lo, hi = lo - reach, hi + reach
        if self.section_offsets_yx is not None:
            lo[1:] += np.minimum(self.section_offsets_yx.min(axis=0), 0)
            hi[1:] += np.maximum(self.section_offsets_yx.max(axis=0), 0)
        return lo, hi


def _largest_magnitude(field: np.ndarray) -> float:
    """max |field| in one pass (cv2.minMaxLoc: min and max together)."""
    low, high, _, _ = cv2.minMaxLoc(np.ascontiguousarray(field, np.float32).reshape(-1, field.shape[-1]))
    return max(-low, high)


def _isotropic_axes(spacing_zyx_um) -> list[int]:
    if spacing_zyx_um is None or len(spacing_zyx_um) != 3:
        raise ValueError(f"3D augmentation needs the voxel size (z, y, x) in micrometres, got {spacing_zyx_um}; "
                         f"set --voxel_size z,y,x")
    return [axis for axis, aniso in enumerate(is_anisotropic(spacing_zyx_um)) if not aniso]


def _rotation_axes(isotropic: list[int], params: AugmentParams3D) -> list[int]:
    """The axes a rotation turns: the isotropic in-plane axes (y, x), all three isotropic ones with
    ``rotation_out_of_plane``; none when fewer than two."""
    axes = isotropic if params.rotation_out_of_plane else [a for a in isotropic if a != 0]
    return axes if params.rotation and len(axes) >= 2 else []


def _random_rotation(rng: np.random.Generator, axes: list[int]) -> np.ndarray:
    """Uniform rotation within the span of ``axes`` (a random unit quaternion for three, an angle for two)."""
    rotation = np.eye(3)
    if len(axes) == 2:
        angle = rng.uniform(0.0, 2 * math.pi)
        (a, b), cos, sin = axes, math.cos(angle), math.sin(angle)
        rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = cos, -sin, sin, cos
    elif len(axes) == 3:
        quaternion = rng.normal(size=4)  # isotropic in 4D, so uniform on the unit sphere once normalized
        w, x, y, z = quaternion / np.linalg.norm(quaternion)
        rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    return rotation


def elastic_grid_3d(out_zyx, spacing_zyx_um, params: AugmentParams3D) -> tuple[tuple[int, ...], np.ndarray]:
    """(control grid shape, jitter std per axis in voxels) for a crop; anisotropic axes get no jitter."""
    voxel = np.asarray(spacing_zyx_um, float)
    spacing = np.maximum(np.asarray(params.elastic_spacing_um) / voxel, MIN_ELASTIC_SPACING_VOXELS)
    jitter = np.asarray(params.elastic_jitter_um, float) / voxel
    jitter[[a for a in range(3) if a not in _isotropic_axes(spacing_zyx_um)]] = 0.0
    grid = tuple(max(2, math.ceil(size / step) + 1) for size, step in zip(out_zyx, spacing))
    return grid, jitter


def elastic_displacement_3d(rng, out_zyx, spacing_zyx_um, params: AugmentParams3D) -> tuple | None:
    """A smooth displacement per axis (z, y, x): None (none along it) or (Z, Y, X) float32 input voxels.

    Clipped Gaussian values on a control grid, upsampled bicubically and separably
    (``augment._upsampling_matrix``); None when the jitter is 0 on every axis.
    """
    grid, jitter = elastic_grid_3d(out_zyx, spacing_zyx_um, params)
    if not np.any(jitter):
        return None
    moving = [axis for axis in range(3) if jitter[axis]]
    weights = [augment._upsampling_matrix(int(n), g) for n, g in zip(out_zyx, grid)]
    control = rng.normal(size=(len(moving),) + grid).clip(-ELASTIC_CLIP_SIGMAS, ELASTIC_CLIP_SIGMAS)
    control = (control * jitter[moving, None, None, None]).astype(np.float32)
    control = np.einsum("za,kabc->kzbc", weights[0], control)  # z first: the control grid stays small
    fields = iter(weights[1] @ control @ weights[2].T)  # (moving axes, Z, Y, X): one stacked product
    return tuple(next(fields) if jitter[axis] else None for axis in range(3))


def section_offsets(rng: np.random.Generator, sections: int, params: AugmentParams3D) -> np.ndarray | None:
    """(Z, 2) integer in-plane offsets: a slip moves one section, a shift it and all after it (gunpowder's
    misalignment); each section's total is clipped to +-misalign_max_pixels. None when nothing moved."""
    slips, shifts = rng.random(sections) < params.slip_probability, rng.random(sections) < params.shift_probability
    reach = int(params.misalign_max_pixels)
    draws = rng.integers(-reach, reach + 1, size=(2, sections, 2))
    offsets = np.where(slips[:, None], draws[0], 0) + np.cumsum(np.where(shifts[:, None], draws[1], 0), axis=0)
    offsets = np.clip(offsets, -reach, reach).astype(np.float64)
    return offsets if np.any(offsets) else None


def sample_geometry_3d(rng: np.random.Generator, out_zyx, spacing_zyx_um, params: AugmentParams3D) -> Geometry3D:
    """Draw one fused spatial transform for a crop of size ``out_zyx`` of a volume with this voxel size."""
    out_zyx = tuple(int(v) for v in out_zyx)
    isotropic = _isotropic_axes(spacing_zyx_um)
    mirror = (1.0, 1.0, 1.0)
    if params.mirror:
        mirror = tuple(float(v) for v in np.where(rng.random(3) < 0.5, -1.0, 1.0))
    permutation = [0, 1, 2]
    if params.transpose and len(isotropic) > 1:
        for axis, source in zip(isotropic, rng.permutation(isotropic)):
            permutation[axis] = int(source)
    rotation = _random_rotation(rng, _rotation_axes(isotropic, params))
    scale = np.ones(3)
    if params.scale_fraction > 0:
        scale[isotropic] = rng.uniform(1 - params.scale_fraction, 1 + params.scale_fraction, size=len(isotropic))
    displacement = elastic_displacement_3d(rng, out_zyx, spacing_zyx_um, params)
    offsets = None
    if params.slip_probability or params.shift_probability:
        offsets = section_offsets(rng, out_zyx[0], params)
    return Geometry3D(out_zyx, tuple(permutation), mirror, rotation, tuple(float(s) for s in scale),
                      displacement, offsets)


def context_margin_3d(out_zyx, spacing_zyx_um, params: AugmentParams3D | None = None) -> np.ndarray:
    """Voxels (z, y, x) of context any draw may read beyond the crop on each side: a record (or the
    region a reader loads) ``out_zyx + 2 * margin`` large never needs mirror padding."""
    params = AugmentParams3D() if params is None else params
    isotropic = _isotropic_axes(spacing_zyx_um)
    half = (np.asarray(out_zyx, float) - 1) / 2
    reach = half.copy()
    if isotropic and params.transpose:  # any isotropic half-extent may land on any isotropic axis
        reach[isotropic] = half[isotropic].max()
    rotating = _rotation_axes(isotropic, params)
    if rotating:  # the largest extents that can share the rotating axes, turned onto one of them
        sizes = np.sort(half[isotropic])[::-1][:len(rotating)] if params.transpose else half[rotating]
        reach[rotating] = np.linalg.norm(sizes)
    reach[isotropic] /= 1 - params.scale_fraction
    grid, jitter = elastic_grid_3d(out_zyx, spacing_zyx_um, params)
    gain = np.prod([np.abs(augment._upsampling_matrix(int(s), g)).sum(axis=1).max() for s, g in zip(out_zyx, grid)])
    reach += ELASTIC_CLIP_SIGMAS * jitter * gain
    if params.slip_probability or params.shift_probability:
        reach[1:] += params.misalign_max_pixels
    return np.ceil(reach - half + 1).astype(int)  # +1: the interpolation neighbour


def choose_origin_3d(rng: np.random.Generator, record_zyx, geometry: Geometry3D) -> tuple[int, int, int]:
    """Corner (z, y, x) of the crop in the record: context first, mirror fallback (``augment._pick_axis``)."""
    lo, hi = geometry.extent
    return tuple(augment._pick_axis(rng, int(record_zyx[a]), geometry.out_zyx[a], float(lo[a]), float(hi[a]))
                 for a in range(3))


# ---- Resampling ----------------------------------------------------------------------------------

def _region(array, lo, hi) -> np.ndarray:
    """array[lo:hi] over the three spatial axes (numpy or lazy array: only this region is read); the part
    outside the array is mirror-reflected (BORDER_REFLECT_101, as in 2D)."""
    shape = array.shape[:3]
    inner = np.asarray(array[tuple(slice(max(a, 0), min(b, s)) for a, b, s in zip(lo, hi, shape))])
    for axis, (before, after) in enumerate((max(-a, 0), max(b - s, 0)) for a, b, s in zip(lo, hi, shape)):
        while before or after:  # numpy's reflect needs pad < size: pad tiny arrays in steps
            size = inner.shape[axis]
            step = (min(before, size - 1), min(after, size - 1)) if size > 1 else (before, after)
            widths = [(0, 0)] * inner.ndim
            widths[axis] = step
            inner = np.pad(inner, widths, mode="reflect" if size > 1 else "edge")
            before, after = before - step[0], after - step[1]
    return inner


def _input_coordinates(geometry: Geometry3D, centre_in: np.ndarray, region_zyx) -> list[np.ndarray]:
    """Input positions (z, y, x) of every output voxel, clipped to the region: float32 (Z, Y, X) arrays,
    z (Z, 1, 1) when :attr:`Geometry3D.keeps_sections`. Each is allocated once and built in place."""
    size = geometry.out_zyx
    offsets = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) for n in size]
    grids = [offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]]
    linear = geometry.linear.astype(np.float32)
    coords = []
    for axis in range(3):
        # the affine part and the per-section offsets on broadcast (Z, Y, 1) arrays: one full-size pass
        value = np.full((1, 1, 1), centre_in[axis], np.float32)
        if geometry.section_offsets_yx is not None and axis:
            value = value + geometry.section_offsets_yx[:, axis - 1, None, None].astype(np.float32)
        for k in range(3):
            if linear[axis, k] != 0:
                value = value + linear[axis, k] * grids[k]
        full = (size[0], 1, 1) if axis == 0 and geometry.keeps_sections else size
        value = np.broadcast_to(value, full).copy() if value.shape != tuple(full) else value
        if geometry.displacement is not None and geometry.displacement[axis] is not None:
            value += geometry.displacement[axis]
        coords.append(np.clip(value, 0, region_zyx[axis] - 1, out=value))  # float fuzz only: the region has margin
    return coords


def _mosaic_columns(region_zyx) -> int | None:
    """Sections per row of the mosaic that keeps cv2.remap's source below CV_MAX_ROWS on both axes
    (1: one tall stack of sections); None when even a square mosaic is too large."""
    z, y, x = (int(v) for v in region_zyx)
    columns = max(1, math.ceil(z * y / CV_MAX_ROWS)) if CV_MAX_ROWS else 0
    while columns and columns <= z and math.ceil(z / columns) * y > CV_MAX_ROWS:
        columns += 1
    fits = columns and math.ceil(z / columns) * y <= CV_MAX_ROWS and min(columns, z) * x <= CV_MAX_ROWS
    return min(columns, z) if fits else None


def _mosaic(region, columns: int, dtype) -> np.ndarray:
    """The (Zr, Yr, Xr[, C]) sections laid out as one 2D image, ``columns`` sections per row (in ``dtype``:
    the layout and the conversion are one copy). Section z sits at rows (z // columns) * Yr, columns
    (z % columns) * Xr."""
    z, y, x = region.shape[:3]
    rows = math.ceil(z / columns)
    tail = region.shape[3:]
    if columns == 1:
        return np.ascontiguousarray(region, dtype).reshape((z * y, x) + tail)
    mosaic = np.zeros((rows, y, columns, x) + tail, dtype)
    for r in range(rows):
        part = region[r * columns:(r + 1) * columns]
        mosaic[r, :, :len(part)] = np.swapaxes(part, 0, 1)
    return mosaic.reshape((rows * y, columns * x) + tail)


def _remap(source, rows, cols, interpolation) -> np.ndarray:
    """One cv2.remap of a mosaic at (rows, cols) (each (Z, Y, X)); returns (Z, Y, X[, C])."""
    z, y, x = rows.shape
    rows, cols = rows.reshape(z * y, x), cols.reshape(z * y, x)

    def fn(array):
        return cv2.remap(array, cols, rows, interpolation, borderMode=cv2.BORDER_REPLICATE)
    if interpolation == cv2.INTER_NEAREST:
        return augment._nearest(fn, source).reshape(z, y, x)
    if source.ndim == 2:
        source = source[..., None]
    return augment._grouped(fn, source).reshape(z, y, x, -1)


def _mosaic_position(section, y, x, pitch_yx, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) in the source of in-section positions (y, x) of integer-valued float32 ``section``:
    section z starts at rows (z // columns) * pitch_yx[0], columns (z % columns) * pitch_yx[1]."""
    row_pitch, col_pitch = (int(v) for v in pitch_yx)
    if columns == 1:
        if section.shape != np.shape(y) or section.dtype != np.float32 or y.dtype != np.float32:
            return section * np.float32(row_pitch) + y, x  # section (Z, 1, 1) (keeps_sections): broadcast
        # section * pitch + y in one pass: the product is an exact integer, so one rounding as in numpy
        flat = section.reshape(-1, section.shape[-1])
        return cv2.scaleAdd(flat, float(row_pitch), y.reshape(flat.shape)).reshape(section.shape), x
    # tile row = section // columns in float32 arithmetic (floor_divide and integer tables are 3x slower);
    # exact: (section + 0.5) / columns is never within float32 error of an integer for these sizes
    tile = section * np.float32(1 / columns)
    tile += np.float32(0.5 / columns)
    np.floor(tile, out=tile)
    cols = section - tile * np.float32(columns)
    cols *= np.float32(col_pitch)
    tile *= np.float32(row_pitch)
    return tile + y, cols + x  # section may be (Z, 1, 1) (keeps_sections): broadcast


def _section_stack(region) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The (Z, Y, X[, C]) region as one 2D image with its sections one below the other, WITHOUT a copy:
    a strided view when the region is a block of a larger C-ordered record (section z then starts
    ``pitch`` rows below section z - 1, the record's row count; the rows between are never sampled).
    Returns (view, (pitch, X)), or None when the layout is not a stack of rows, the channels need
    grouping, or the view would have more rows than cv2.remap takes."""
    z, y, x = region.shape[:3]
    channels = region.shape[3] if region.ndim == 4 else 1
    strides = region.strides
    item = region.itemsize * channels
    if channels > 4 or (region.ndim == 4 and strides[3] != region.itemsize) or strides[2] != item:
        return None
    if strides[1] < x * item or strides[0] % strides[1] or strides[0] // strides[1] < y:
        return None
    pitch = strides[0] // strides[1]
    rows = (z - 1) * pitch + y
    if rows > CV_MAX_ROWS or x > CV_MAX_ROWS:
        return None
    view = np.lib.stride_tricks.as_strided(region, (rows, x) + region.shape[3:], strides[1:], writeable=False)
    return view, (pitch, x)


def _remap_source(region, dtype, columns: int) -> tuple[np.ndarray, tuple[int, int], int]:
    """(2D source for cv2.remap, section pitch (rows, cols), sections per row): a view of the region when it
    already has ``dtype`` and a stack layout (:func:`_section_stack`), else a converted mosaic copy."""
    if region.dtype == dtype:
        stack = _section_stack(region)
        if stack is not None:
            return stack[0], stack[1], 1
    return _mosaic(region, columns, dtype), region.shape[1:3], columns


def _sample_cv2(region, region_mask, coords, keeps_sections, columns: int, float_dtype):
    """Linear image and nearest mask samples at ``coords`` through cv2.remap on 2D layouts of the region
    (views where the memory allows, else mosaics)."""
    zr = region.shape[0]
    image_source, image_pitch, image_columns = _remap_source(
        region, region.dtype if region.dtype in REMAP_NATIVE_DTYPES else float_dtype, columns)
    mask_source, mask_pitch, mask_columns = _remap_source(region_mask, region_mask.dtype, columns)
    z, y, x = coords
    if keeps_sections:  # one input section per output section: exact rows, 2D interpolation only
        section = np.rint(z)
        rows, cols = _mosaic_position(section, y, x, image_pitch, image_columns)
        image = _remap(image_source, rows, cols, cv2.INTER_LINEAR)
        if (mask_pitch, mask_columns) != (image_pitch, image_columns):
            rows, cols = _mosaic_position(section, y, x, mask_pitch, mask_columns)
        return image, _remap(mask_source, rows, cols, cv2.INTER_NEAREST)
    z0 = np.minimum(np.floor(z), zr - 2, out=np.floor(z)) if zr > 1 else np.zeros_like(z)
    weight = np.subtract(z, z0)
    rows, cols = _mosaic_position(z0, y, x, image_pitch, image_columns)
    lower = _remap(image_source, rows, cols, cv2.INTER_LINEAR)
    if image_columns == 1 and zr > 1:  # section z0 + 1 of the stack is section z0 of the stack a pitch down: a view
        upper = _remap(image_source[image_pitch[0]:], rows, cols, cv2.INTER_LINEAR)
    else:
        upper = _remap(image_source, *_mosaic_position(np.minimum(z0 + 1, zr - 1), y, x, image_pitch, image_columns),
                       cv2.INTER_LINEAR)
    # the blend along z in floating point (not rounded to the source type)
    if float_dtype == np.float32 and upper.shape[-1] <= augment.CV_MAX_CHANNELS:
        image = cv2.subtract(upper, lower, dtype=cv2.CV_32F).reshape(upper.shape)  # one pass
    else:
        image = upper.astype(float_dtype)
        image -= lower
    image *= weight[..., None]
    image += lower
    nearest = np.rint(z, out=z)  # z is owned by this call
    mask = _remap(mask_source, *_mosaic_position(nearest, y, x, mask_pitch, mask_columns), cv2.INTER_NEAREST)
    return image, mask


def _sample_scipy(region, region_mask, coords):
    """map_coordinates on the whole region: for stacks too tall for cv2.remap."""
    points = np.stack([np.broadcast_to(c, coords[1].shape) for c in coords])
    channels = [ndimage.map_coordinates(region[..., c], points, order=1, mode="nearest") for c in range(region.shape[3])]
    labels, inverse = np.unique(region_mask, return_inverse=True)
    index = ndimage.map_coordinates(inverse.reshape(region_mask.shape).astype(np.int32), np.rint(points), order=0,
                                    mode="nearest")
    return np.stack(channels, axis=-1), labels[index]


def warp_3d(image_zyxc, mask_zyx, geometry: Geometry3D, origin_zyx, float_dtype=np.float32):
    """Resample the crop at ``origin_zyx`` through ``geometry`` ONCE; returns (crop_zyxc in ``float_dtype``,
    crop_zyx in the mask's dtype). Only the region the transform samples is read."""
    out = np.asarray(geometry.out_zyx)
    origin = np.asarray(origin_zyx)
    if geometry.is_identity:
        stop = origin + out
        return _region(image_zyxc, origin, stop).astype(float_dtype), _region(mask_zyx, origin, stop)
    centre = origin + (out - 1) / 2
    lo, hi = geometry.extent
    margin = np.array([0 if geometry.keeps_sections else 1, 1, 1])
    start = np.floor(centre + lo + 1e-6).astype(int) - margin  # +1e-6: exact integers stay where they are
    stop = np.ceil(centre + hi - 1e-6).astype(int) + 1 + margin
    region = _region(image_zyxc, start, stop)  # a view where it lies inside the record: converted once, below
    region_mask = _region(mask_zyx, start, stop)
    coords = _input_coordinates(geometry, centre - start, region.shape)
    columns = _mosaic_columns(region.shape[:3])
    if columns is not None:
        image, mask = _sample_cv2(region, region_mask, coords, geometry.keeps_sections, columns, float_dtype)
    else:
        image, mask = _sample_scipy(region.astype(float_dtype), region_mask, coords)
    return image.astype(float_dtype, copy=False), mask


# ---- Intensity and section defects (in place on a float working copy) ----------------------------

def apply_intensity_3d(image_zyxc: np.ndarray, rng: np.random.Generator, params: AugmentParams3D) -> np.ndarray:
    """Per-section intensity scale and shift, Gaussian noise, then missing and low-contrast sections, on a
    float (Z, Y, X, C) working image (modified in place; use the returned array)."""
    image = np.ascontiguousarray(image_zyxc)
    z, y, x, c = image.shape
    stacked = image.reshape(z * y, x, c)  # a view: augment's row helpers work on it unchanged
    lo, span = augment._dynamic_range(stacked)
    if params.section_scale_fraction or params.section_shift_fraction:
        mean = stacked.reshape(-1, c).mean(axis=0)
        scale = rng.uniform(1 - params.section_scale_fraction, 1 + params.section_scale_fraction, size=z)
        shift = rng.uniform(-params.section_shift_fraction, params.section_shift_fraction, size=z)
        image *= scale.astype(image.dtype)[:, None, None, None]
        image += (mean * (1 - scale[:, None]) + shift[:, None] * span).astype(image.dtype)[:, None, None, :]
    if params.noise_fraction > 0:
        augment._noise_inplace(stacked, rng, params.noise_fraction, span, _standard_normal)
    if params.missing_probability or params.low_contrast_probability:
        draw = rng.random(z)
        for section in np.flatnonzero(draw < params.missing_probability):
            image[section] = lo
        low = (draw >= params.missing_probability) & (draw < params.missing_probability + params.low_contrast_probability)
        for section in np.flatnonzero(low):
            mean = image[section].reshape(-1, c).mean(axis=0)
            image[section] = mean + (image[section] - mean) * params.low_contrast_factor
    return image


def _standard_normal(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` independent standard normal float32 values: a window, at a position drawn from ``rng``, of
    NOISE_BANK_VALUES drawn once per process (a window is drawn in one slice instead of ``count`` fresh
    draws: 0.5 ms, 7 % of a 16x128x128 sample's cost). Windows of different samples may overlap, at other
    voxels; larger requests are drawn fresh."""
    global _noise_bank
    if count > NOISE_BANK_VALUES:
        fresh = np.empty(count, np.float32)
        cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
        return cv2.randn(fresh, 0.0, 1.0).reshape(-1)
    if _noise_bank is None:
        bank = np.empty(NOISE_BANK_VALUES, np.float32)
        cv2.setRNGSeed(NOISE_BANK_SEED)
        _noise_bank = cv2.randn(bank, 0.0, 1.0).reshape(-1)
    start = int(rng.integers(0, NOISE_BANK_VALUES - count + 1))
    return _noise_bank[start:start + count]


# ---- The sample pipeline and the public pure transforms -----------------------------------------

def make_sample_3d(image_zyxc, mask_zyx, rng: np.random.Generator, out_zyx, spacing_zyx_um,
                   params: AugmentParams3D | None = None, float_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One training crop of size ``out_zyx`` from a record of any size (numpy or lazy (Z, Y, X, C) array).

    Draws the geometry, places the crop (context first), warps once, then the intensity and section
    effects. Returns (crop_zyxc in ``float_dtype`` with RAW values, crop_zyx in the mask's dtype).
    """
    params = AugmentParams3D() if params is None else params
    geometry = sample_geometry_3d(rng, out_zyx, spacing_zyx_um, params)
    origin = choose_origin_3d(rng, image_zyxc.shape[:3], geometry)
    image, mask = warp_3d(image_zyxc, mask_zyx, geometry, origin, float_dtype)
    return apply_intensity_3d(image, rng, params), mask


def augment_3d(image, mask_zyx, rng: np.random.Generator, spacing_zyx_um, params: AugmentParams3D | None = None,
               out_zyx=None) -> tuple[np.ndarray, np.ndarray]:
    """Augment one volume (ZYX or ZYXC image, ZYX mask); new arrays of the input's dtype and layout.
    ``out_zyx`` defaults to the input's size. Integer images are rounded and clipped at the end."""
    image = np.asarray(image)
    if image.ndim not in (3, 4) or tuple(mask_zyx.shape) != image.shape[:3]:
        raise ValueError(f"expected a ZYX or ZYXC image and a ZYX mask of the same size, got {image.shape} and {mask_zyx.shape}")
    image_zyxc = image[..., None] if image.ndim == 3 else image
    wide = image.dtype.itemsize > 4 or (image.dtype.kind in "ui" and image.dtype.itemsize == 4)
    out_zyx = tuple(image.shape[:3]) if out_zyx is None else tuple(out_zyx)
    out, mask = make_sample_3d(image_zyxc, mask_zyx, rng, out_zyx, spacing_zyx_um, params,
                               np.float64 if wide else np.float32)
    out = augment._to_dtype(out, image.dtype)
    return (out[..., 0] if image.ndim == 3 else out), mask


def volume_augmenter(spacing_zyx_um, params: AugmentParams3D | None = None, out_zyx=None):
    """The pure transform ``f(image, mask, rng) -> (image, mask)`` for volumes of this voxel size."""
    _isotropic_axes(spacing_zyx_um)  # fail now, not in a worker
    return functools.partial(_augment_bound, spacing_zyx_um=tuple(spacing_zyx_um), params=params, out_zyx=out_zyx)


def _augment_bound(image, mask_zyx, rng, spacing_zyx_um, params, out_zyx):
    return augment_3d(image, mask_zyx, rng, spacing_zyx_um, params, out_zyx)
