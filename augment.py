"""Data augmentation for segmentation samples: pure functions, one resampling per sample.

Edit the constants in the block below to change what training sees; the reader
(``imagereader.py``) reads them through :class:`AugmentParams`. No TensorFlow here. The 3D settings
(volumes) are the second block; their code is ``augment3d.py`` (``augment3d.make_sample_3d``).

Axis order: images are ``image_hw`` or ``image_hwc`` (any channel count), masks
``mask_hw``. Coordinates follow OpenCV: x is the column, y the row.

Design
------
* Every transform is a pure function ``f(image, mask, rng) -> (image, mask)``
  drawing only from the injected ``numpy.random.Generator``; it returns new
  arrays of the input's dtype and layout and never modifies its arguments.
* Geometry is fused. Reflection, rotation, scale, jitter and the elastic
  deformation are composed into ONE map from output pixels to input pixels
  (:class:`Geometry`) and applied in ONE resampling: ``cv2.warpAffine`` for the
  affine part alone, ``cv2.remap`` on a dense map when elastic deformation is on.
  The image is interpolated linearly, the mask with nearest neighbour, so the
  output mask values are always a subset of the input mask values. Borders are
  filled by mirror reflection (``BORDER_REFLECT_101``, ``image_io.mirror_pad``'s rule).
* Context instead of padding. :func:`sample_geometry` draws the transform first,
  :meth:`Geometry.extent` says how far from the crop centre the warp will
  sample, and :func:`choose_origin` places the crop so that this whole region
  lies in the record whenever the record is large enough; only otherwise does
  mirror reflection supply the missing pixels. The warp writes the crop
  directly (its output IS the crop).
* Intensity transforms (gamma, intensity shift, blur, noise) act on the raw
  values in floating point, before normalization; "dynamic range" is measured
  per channel on the warped crop (max - min). Blur is spatial only (each
  channel on its own).
* Noise comes from OpenCV's fast Gaussian generator (4x faster than numpy's
  here), re-seeded from the injected generator right before each use, so the
  result is still a deterministic function of (image, mask, rng state).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from segkit import image_io

# ---- Augmentation settings: edit these ---------------------------------------------------------
REFLECTION = True          # mirror along x and along y, each with probability 0.5
ROTATION = True            # rotate by an angle drawn uniformly from [0, 360) degrees
JITTER_FRACTION = 0.1      # shift by up to +-this fraction of the crop size (field of view), per axis
SCALE_FRACTION = 0.1       # zoom by a factor drawn uniformly from [1 - s, 1 + s], per axis
NOISE_FRACTION = 0.02      # Gaussian noise, sigma drawn uniformly from [0, this] x dynamic range
BLUR_MAX_SIGMA = 2.0       # Gaussian blur (spatial axes only), sigma drawn uniformly from [0, this] pixels
INTENSITY_FRACTION = 0.0   # additive shift up to +-this fraction of the dynamic range (off; 0.05 suggested)
GAMMA_FRACTION = 0.0       # gamma drawn log-uniformly from [1/(1+g), 1+g] (off; 0.2 suggested)
ELASTIC_SIGMA = 0.0        # elastic deformation: displacement std in pixels at each control point (off; 3 suggested)
ELASTIC_SPACING = 64       # elastic deformation: control-point spacing in pixels (larger = smoother)
# -------------------------------------------------------------------------------------------------

# ---- 3D augmentation settings (volumes as (Z, Y, X) crops; the code is in augment3d.py): edit these --
# An axis is anisotropic when its voxel spacing is > 2x the finest (segkit.volume_io.ANISOTROPY_RATIO):
# it is mirrored, but never rotated into, transposed, scaled or elastically displaced along.
MIRROR_3D = True                # mirror each axis with probability 0.5
TRANSPOSE_3D = True             # random order of the isotropic axes (y, x; all three for an isotropic volume)
ROTATION_3D = True              # uniform rotation about z, in the (y, x) plane, when y and x are isotropic
ROTATION_3D_OUT_OF_PLANE = False  # isotropic volumes: any 3D rotation instead (gunpowder rotates in-plane only;
                                  # z is the cutting axis; +16% reader CPU per 16x128x128 crop, measured)
SCALE_FRACTION_3D = 0.1         # zoom per isotropic axis by a factor drawn uniformly from [1 - s, 1 + s]
ELASTIC_SPACING_UM_3D = (0.16, 0.16, 0.16)  # (z, y, x) control-point spacing, micrometres (at least 4 voxels)
ELASTIC_JITTER_UM_3D = (0.008, 0.008, 0.008)  # (z, y, x) displacement std at each control point, micrometres (0 = off)
SLIP_PROBABILITY_3D = 0.05      # per section: it alone moves in-plane
SHIFT_PROBABILITY_3D = 0.05     # per section: it and all sections after it move in-plane
MISALIGN_MAX_PIXELS_3D = 25     # slip/shift by up to +-this many pixels per axis (a section's total is clipped to it)
SECTION_SCALE_FRACTION_3D = 0.1  # per section: intensity scaled about the mean by a factor in [1 - s, 1 + s]
SECTION_SHIFT_FRACTION_3D = 0.1  # per section: additive shift up to +-this fraction of the dynamic range
MISSING_SECTION_PROBABILITY_3D = 0.05  # per section: blanked to the crop's minimum (the mask is kept)
LOW_CONTRAST_PROBABILITY_3D = 0.05     # per section: contrast about the section mean multiplied by ...
LOW_CONTRAST_FACTOR_3D = 0.1           # ... this factor
NOISE_FRACTION_3D = NOISE_FRACTION     # Gaussian noise, sigma up to this fraction of the dynamic range
# -------------------------------------------------------------------------------------------------

MIN_BLUR_SIGMA = 0.3        # below this a Gaussian kernel is practically the identity: skip the blur
CV_MAX_CHANNELS = 4         # OpenCV warps/filters take groups of at most this many channels
_SAFETY = 0.05              # pixels kept between the sampled region and the record border (fixed-point slack)
_NEAREST_SAFE = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)}


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation strengths; the defaults are the constants at the top of this module."""

    reflection: bool = REFLECTION
    rotation: bool = ROTATION
    jitter_fraction: float = JITTER_FRACTION
    scale_fraction: float = SCALE_FRACTION
    noise_fraction: float = NOISE_FRACTION
    blur_max_sigma: float = BLUR_MAX_SIGMA
    intensity_fraction: float = INTENSITY_FRACTION
    gamma_fraction: float = GAMMA_FRACTION
    elastic_sigma: float = ELASTIC_SIGMA
    elastic_spacing: float = ELASTIC_SPACING

    def __post_init__(self):
        for name in ("jitter_fraction", "scale_fraction", "noise_fraction", "blur_max_sigma",
                     "intensity_fraction", "gamma_fraction", "elastic_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.scale_fraction >= 1:
            raise ValueError(f"augmentation scale_fraction must be < 1, got {self.scale_fraction}")
        if not self.elastic_spacing >= 2:
            raise ValueError(f"augmentation elastic_spacing must be >= 2 pixels, got {self.elastic_spacing}")

    @classmethod
    def none(cls, **enabled) -> AugmentParams:
        """Everything off, except the settings given as keyword arguments."""
        off = dict(reflection=False, rotation=False, jitter_fraction=0.0, scale_fraction=0.0, noise_fraction=0.0,
                   blur_max_sigma=0.0, intensity_fraction=0.0, gamma_fraction=0.0, elastic_sigma=0.0)
        return cls(**{**off, **enabled})

    def replace(self, **changes) -> AugmentParams:
        return dataclasses.replace(self, **changes)


# ---- Geometry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """A sampled spatial transform from crop (output) pixels to record (input) pixels.

    For output pixel ``p`` (x, y) of a crop of size ``out_hw`` with centre ``c_out``,
    and the crop's centre ``c_in`` in the record::

        input(p) = c_in + linear @ (p - c_out) + shift + displacement[:, y, x]

    ``displacement`` is None without elastic deformation, else (2, H, W) float32 (dx, dy).
    """

    out_hw: tuple[int, int]
    linear: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(2))
    shift: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    displacement: np.ndarray | None = None

    @property
    def is_identity(self) -> bool:
        return self.displacement is None and np.array_equal(self.linear, np.eye(2)) and not np.any(self.shift)

    @functools.cached_property  # a frozen dataclass still has an instance __dict__ for the cache
    def extent(self) -> tuple[float, float, float, float]:
        """(y_min, y_max, x_min, x_max) of the sampled input positions, relative to ``c_in`` (cached)."""
        h, w = self.out_hw
        half_x, half_y = (w - 1) / 2, (h - 1) / 2
        corners = np.array([[-half_x, -half_x, half_x, half_x], [-half_y, half_y, -half_y, half_y]])
        mapped = self.linear @ corners + self.shift[:, None]
        lo, hi = mapped.min(axis=1), mapped.max(axis=1)
        if self.displacement is not None:
            reach = np.abs(self.displacement).reshape(2, -1).max(axis=1)
            lo, hi = lo - reach, hi + reach
        return float(lo[1]), float(hi[1]), float(lo[0]), float(hi[0])


def affine_matrix(reflect_xy=(1.0, 1.0), angle: float = 0.0, scale_xy=(1.0, 1.0)) -> np.ndarray:
    """The 2x2 output->input matrix: rotation(angle) @ zoom(1/scale) @ reflection (x, y order)."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return rotation @ np.diag([reflect_xy[0] / scale_xy[0], reflect_xy[1] / scale_xy[1]])


@functools.lru_cache(maxsize=32)
def _upsampling_matrix(size: int, points: int) -> np.ndarray:
    """(size, points) float32 weights of OpenCV's bicubic resize from ``points`` to ``size`` samples.

    Resizing is linear and separable, so resize(grid) == Wy @ grid @ Wx.T: two tiny matrix products
    instead of a full-resolution bicubic pass (7x faster for a 256x256 field).
    """
    eye = np.eye(points, dtype=np.float32)
    return cv2.resize(eye, (points, size), interpolation=cv2.INTER_CUBIC)


def elastic_displacement(rng: np.random.Generator, out_hw: tuple[int, int], sigma: float,
                         spacing: float) -> np.ndarray:
    """A smooth random (2, H, W) float32 displacement: Gaussian values on a coarse control grid
    (one point every ``spacing`` pixels, at least 2x2), upsampled bicubically."""
    h, w = out_hw
    grid = (max(2, math.ceil(h / spacing) + 1), max(2, math.ceil(w / spacing) + 1))
    control = rng.normal(0.0, sigma, size=(2,) + grid).astype(np.float32)
    return _upsampling_matrix(h, grid[0]) @ control @ _upsampling_matrix(w, grid[1]).T


def sample_geometry(rng: np.random.Generator, out_hw: tuple[int, int], params: AugmentParams) -> Geometry:
    """Draw one fused spatial transform for a crop of size ``out_hw``."""
    h, w = out_hw
    flips = (1.0, 1.0)
    if params.reflection:
        flips = tuple(float(v) for v in np.where(rng.random(2) < 0.5, -1.0, 1.0))
    angle = float(rng.uniform(0.0, 2 * math.pi)) if params.rotation else 0.0
    scales = (1.0, 1.0)
    if params.scale_fraction > 0:
        scales = tuple(rng.uniform(1 - params.scale_fraction, 1 + params.scale_fraction, size=2))
    shift = np.zeros(2)
    if params.jitter_fraction > 0:
        shift = rng.uniform(-params.jitter_fraction, params.jitter_fraction, size=2) * np.array([w, h])
    displacement = None
    if params.elastic_sigma > 0:
        displacement = elastic_displacement(rng, out_hw, params.elastic_sigma, params.elastic_spacing)
    return Geometry((int(h), int(w)), affine_matrix(flips, angle, scales), shift, displacement)


def _pick_axis(rng: np.random.Generator, size: int, out: int, lo: float, hi: float) -> int:
    """Crop start along one axis: context first (samples stay in [0, size-1]), else mirror fallback."""
    centre = (out - 1) / 2
    first = math.ceil(-(centre + lo) + _SAFETY)
    last = math.floor(size - 1 - centre - hi - _SAFETY)
    if first > last:  # record too small for this transform: mirror reflection fills the rest
        first, last = sorted((0, size - out))
    return int(rng.integers(first, last + 1))


def choose_origin(rng: np.random.Generator, record_hw: tuple[int, int], geometry: Geometry) -> tuple[int, int]:
    """Top-left (y, x) of the crop in the record, uniform among placements where the warp samples only
    real data; when the record is too small for that (per axis), uniform among placements where the
    untransformed crop lies inside the record (or the record inside the crop)."""
    y_min, y_max, x_min, x_max = geometry.extent
    oy = _pick_axis(rng, record_hw[0], geometry.out_hw[0], y_min, y_max)
    ox = _pick_axis(rng, record_hw[1], geometry.out_hw[1], x_min, x_max)
    return oy, ox


# ---- Resampling ----------------------------------------------------------------------------------

def channel_groups(channels: int) -> list[tuple[int, int]]:
    """[start, stop) channel groups of at most 4 for OpenCV, never of size 2.

    OpenCV 5 interpolates 1-, 3- and 4-channel images in exact floating point but 2-channel images with
    1/32-pixel fixed-point weights; without 2-channel groups every channel takes the same path.
    """
    sizes = [CV_MAX_CHANNELS] * (channels // CV_MAX_CHANNELS)
    rest = channels % CV_MAX_CHANNELS
    if rest == 2:
        sizes = sizes[:-1] + [3, 3] if sizes else [1, 1]
    elif rest:
        sizes.append(rest)
    bounds = np.cumsum([0] + sizes)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _grouped(fn, image_hwc: np.ndarray) -> np.ndarray:
    """Apply an OpenCV function to channel groups (see :func:`channel_groups`); returns HWC."""
    groups = channel_groups(image_hwc.shape[2])
    parts = []
    for start, stop in groups:
        part = fn(image_hwc if len(groups) == 1 else np.ascontiguousarray(image_hwc[:, :, start:stop]))
        parts.append(part.reshape(part.shape[0], part.shape[1], -1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def _nearest(fn, mask_hw: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label map of any dtype; values stay a subset of the input's."""
    if mask_hw.dtype in _NEAREST_SAFE:  # OpenCV reads strided rows itself: only a strided last axis is copied
        return fn(mask_hw if mask_hw.strides[-1] == mask_hw.itemsize else np.ascontiguousarray(mask_hw))
    values, labels = np.unique(mask_hw, return_inverse=True)  # e.g. uint32/int64/bool: warp label indices
    return values[fn(labels.reshape(mask_hw.shape).astype(np.int32))]


def _crop_region(array: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """array[y0:y1, x0:x1] where the window may leave the array: the outside is mirror-padded."""
    h, w = array.shape[:2]
    inner = array[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
    return image_io.mirror_pad(inner, (max(-y0, 0), max(y1 - h, 0)), (max(-x0, 0), max(x1 - w, 0)))


def warp(image_hwc: np.ndarray, mask_hw: np.ndarray, geometry: Geometry, origin_yx: tuple[int, int],
         float_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Resample the crop at ``origin_yx`` through ``geometry`` ONCE.

    Returns (crop_hwc in ``float_dtype``, crop_hw in the mask's dtype). Only the region the
    transform samples is read and converted; outside the record it is mirror-reflected.
    """
    h, w = geometry.out_hw
    oy, ox = origin_yx
    if geometry.is_identity:
        image = _crop_region(image_hwc, oy, oy + h, ox, ox + w).astype(float_dtype)
        return image, np.array(_crop_region(mask_hw, oy, oy + h, ox, ox + w))
    rec_h, rec_w = image_hwc.shape[:2]
    cy, cx = oy + (h - 1) / 2, ox + (w - 1) / 2
    y_min, y_max, x_min, x_max = geometry.extent
    # The sampled bounding box plus one pixel for interpolation, clipped to the record: a clipped side is
    # a record border, so OpenCV's reflection there IS mirror padding of the record.
    y0, y1 = _clip_span(math.floor(cy + y_min) - 1, math.ceil(cy + y_max) + 2, rec_h)
    x0, x1 = _clip_span(math.floor(cx + x_min) - 1, math.ceil(cx + x_max) + 2, rec_w)
    region = image_hwc[y0:y1, x0:x1].astype(float_dtype)
    region_mask = mask_hw[y0:y1, x0:x1]
    matrix = np.empty((2, 3))
    matrix[:, :2] = geometry.linear
    matrix[:, 2] = np.array([cx - x0, cy - y0]) + geometry.shift - geometry.linear @ np.array([(w - 1) / 2, (h - 1) / 2])
    border = dict(borderMode=cv2.BORDER_REFLECT_101)
    if geometry.displacement is None:
        def resample(array, interpolation):
            return cv2.warpAffine(array, matrix, (w, h), flags=interpolation | cv2.WARP_INVERSE_MAP, **border)
    else:
        xs = np.arange(w, dtype=np.float32)[None, :]
        ys = np.arange(h, dtype=np.float32)[:, None]
        m = matrix.astype(np.float32)
        map_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2] + geometry.displacement[0]
        map_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2] + geometry.displacement[1]

        def resample(array, interpolation):
            return cv2.remap(array, map_x, map_y, interpolation, **border)
    image = _grouped(lambda a: resample(a, cv2.INTER_LINEAR), region)
    mask = _nearest(lambda a: resample(a, cv2.INTER_NEAREST), region_mask)
    return image, mask


def _clip_span(start: int, stop: int, size: int) -> tuple[int, int]:
    start, stop = max(start, 0), min(stop, size)
    return (start, stop) if start < stop else (0, size)


# ---- Intensity (in place on a float working copy) ------------------------------------------------

# numpy is slow when the innermost broadcast or reduced axis is the channel axis (length 1-4): these
# helpers work on the (H, W*C) row view instead, with per-channel values tiled along the row.

def _rows(image_hwc: np.ndarray) -> np.ndarray:
    return image_hwc.reshape(image_hwc.shape[0], -1)


def _tiled(per_channel: np.ndarray, image_hwc: np.ndarray) -> np.ndarray:
    return np.tile(np.asarray(per_channel, image_hwc.dtype), image_hwc.shape[1])


def _dynamic_range(image_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max - min) of the crop; the range is guarded against 0."""
    channels = image_hwc.shape[2]
    rows = _rows(image_hwc)
    lo = rows.min(axis=0).reshape(-1, channels).min(axis=0)
    span = rows.max(axis=0).reshape(-1, channels).max(axis=0) - lo
    return lo, np.where(span > 0, span, 1.0).astype(image_hwc.dtype)


def _gamma_inplace(image, rng, fraction, lo, span):
    gamma = math.exp(rng.uniform(-math.log1p(fraction), math.log1p(fraction)))
    rows = _rows(image)
    rows -= _tiled(lo, image)
    rows /= _tiled(span, image)
    np.clip(rows, 0, 1, out=rows)
    np.power(rows, gamma, out=rows)
    rows *= _tiled(span, image)
    rows += _tiled(lo, image)


def _blur(image, rng, max_sigma):
    sigma = float(rng.uniform(0.0, max_sigma))
    if sigma < MIN_BLUR_SIGMA:
        return image
    ksize = 2 * math.ceil(3 * sigma) + 1
    return _grouped(lambda a: cv2.GaussianBlur(a, (ksize, ksize), sigma, sigmaY=sigma,
                                               borderType=cv2.BORDER_REFLECT_101), image)


def _noise_inplace(image, rng, fraction, span, standard_normal=None):
    """Gaussian noise on a float HWC image in place, sigma drawn from [0, fraction] x span per channel.
    ``standard_normal(rng, count)``: where the unit values come from (volumes: ``augment3d``'s bank);
    None draws them fresh."""
    sigma = rng.uniform(0.0, fraction) * span  # per channel
    rows = _rows(image)
    if standard_normal is not None:
        unit = standard_normal(rng, rows.size).reshape(rows.shape)
        if sigma.size == 1 and unit.dtype == rows.dtype:
            cv2.scaleAdd(unit, float(sigma[0]), rows, dst=rows)  # sigma * unit + image in one pass
        else:
            rows += unit * _tiled(sigma, image)
        return
    noise = np.empty(rows.shape, image.dtype)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    if sigma.size == 1:
        cv2.randn(noise, 0.0, float(sigma[0]))
    else:
        cv2.randn(noise, 0.0, 1.0)
        noise *= _tiled(sigma, image)
    _rows(image)[...] += noise


def apply_intensity(image_hwc: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Gamma, intensity shift, spatial blur, then noise, on a float HWC working image (modified in place
    where possible; use the returned array)."""
    if not (params.gamma_fraction or params.intensity_fraction or params.blur_max_sigma or params.noise_fraction):
        return image_hwc
    image_hwc = np.ascontiguousarray(image_hwc)  # the row views below must be views
    lo, span = _dynamic_range(image_hwc)
    if params.gamma_fraction > 0:
        _gamma_inplace(image_hwc, rng, params.gamma_fraction, lo, span)
    if params.intensity_fraction > 0:
        _rows(image_hwc)[...] += _tiled(rng.uniform(-params.intensity_fraction, params.intensity_fraction) * span, image_hwc)
    if params.blur_max_sigma > 0:
        image_hwc = _blur(image_hwc, rng, params.blur_max_sigma)
    if params.noise_fraction > 0:
        _noise_inplace(image_hwc, rng, params.noise_fraction, span)
    return image_hwc


# ---- The sample pipeline and the public pure transforms -----------------------------------------

def make_sample(image_hwc: np.ndarray, mask_hw: np.ndarray, rng: np.random.Generator, out_hw: tuple[int, int],
                params: AugmentParams | None = None, float_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One training crop of size ``out_hw`` from a record of any size (the reader's path).

    Draws the geometry, places the crop (context first, mirror fallback), warps once, then applies the
    intensity transforms. Returns (crop_hwc in ``float_dtype`` with RAW values -- normalize afterwards,
    crop_hw in the mask's dtype). ``params=None`` uses the module defaults; ``AugmentParams.none()`` gives
    a plain random crop.
    """
    params = AugmentParams() if params is None else params
    geometry = sample_geometry(rng, out_hw, params)
    origin = choose_origin(rng, image_hwc.shape[:2], geometry)
    image, mask = warp(image_hwc, mask_hw, geometry, origin, float_dtype)
    return apply_intensity(image, rng, params), mask


def _to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


def augment(image: np.ndarray, mask_hw: np.ndarray, rng: np.random.Generator, params: AugmentParams | None = None,
            out_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment one sample (HW or HWC image, HW mask); returns new arrays of the input's dtype and layout.

    ``out_hw`` defaults to the input's size; a larger input is used as context (see :func:`make_sample`).
    Integer images are rounded and clipped to their dtype's range at the end.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or mask_hw.shape != image.shape[:2]:
        raise ValueError(f"expected an HW or HWC image and an HW mask of the same size, got {image.shape} and {mask_hw.shape}")
    image_hwc = image[:, :, None] if image.ndim == 2 else image
    float_dtype = np.float64 if image.dtype.itemsize > 4 or image.dtype.kind in "ui" and image.dtype.itemsize == 4 else np.float32
    out_hw = tuple(image.shape[:2]) if out_hw is None else tuple(out_hw)
    out, mask = make_sample(image_hwc, mask_hw, rng, out_hw, params, float_dtype)
    out = _to_dtype(out, image.dtype)
    return (out[:, :, 0] if image.ndim == 2 else out), mask


def reflect(image, mask_hw, rng):
    """Mirror along x and along y, each with probability 0.5."""
    return augment(image, mask_hw, rng, AugmentParams.none(reflection=True))


def rotate(image, mask_hw, rng):
    """Rotate by a uniform angle in [0, 360) degrees about the centre."""
    return augment(image, mask_hw, rng, AugmentParams.none(rotation=True))


def scale(image, mask_hw, rng, fraction: float = SCALE_FRACTION):
    """Zoom by a factor uniform in [1 - fraction, 1 + fraction], per axis."""
    return augment(image, mask_hw, rng, AugmentParams.none(scale_fraction=fraction))


def jitter(image, mask_hw, rng, fraction: float = JITTER_FRACTION):
    """Shift by up to +-fraction of the field of view, per axis."""
    return augment(image, mask_hw, rng, AugmentParams.none(jitter_fraction=fraction))


def elastic(image, mask_hw, rng, sigma: float = ELASTIC_SIGMA or 3.0, spacing: float = ELASTIC_SPACING):
    """Smooth elastic deformation: N(0, sigma) displacements on a control grid of the given spacing."""
    return augment(image, mask_hw, rng, AugmentParams.none(elastic_sigma=sigma, elastic_spacing=spacing))


def blur(image, mask_hw, rng, max_sigma: float = BLUR_MAX_SIGMA):
    """Gaussian blur of the spatial axes only, sigma uniform in [0, max_sigma]."""
    return augment(image, mask_hw, rng, AugmentParams.none(blur_max_sigma=max_sigma))


def add_noise(image, mask_hw, rng, fraction: float = NOISE_FRACTION):
    """Additive Gaussian noise, sigma uniform in [0, fraction] x the per-channel dynamic range."""
    return augment(image, mask_hw, rng, AugmentParams.none(noise_fraction=fraction))


def shift_intensity(image, mask_hw, rng, fraction: float = INTENSITY_FRACTION or 0.05):
    """Additive shift uniform in +-fraction x the per-channel dynamic range."""
    return augment(image, mask_hw, rng, AugmentParams.none(intensity_fraction=fraction))


def adjust_gamma(image, mask_hw, rng, fraction: float = GAMMA_FRACTION or 0.2):
    """Gamma correction within the per-channel range, gamma log-uniform in [1/(1+fraction), 1+fraction]."""
    return augment(image, mask_hw, rng, AugmentParams.none(gamma_fraction=fraction))
