"""Image reading and normalization: one home for both, used by every stage.

Axis order: images are handled as HWC (``image_hwc``) everywhere; the one
conversion from whatever the file holds happens in :func:`to_hwc`.
Normalization is per-channel z-score with statistics over the WHOLE source
image, so training (which stores the statistics in the LMDB metadata) and
inference (which computes them on the image it segments) agree exactly.
No TensorFlow here.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

SUPPORTED_IMAGE_DTYPES = ("uint8", "uint16", "int32", "float32")
NORMALIZATION_METHOD = "zscore_per_channel_whole_image"
NORMALIZATION_EPSILON = 1e-6
TIFF_EXTENSIONS = (".tif", ".tiff")


class ImageReadError(Exception):
    """A file could not be read as an image (missing, corrupt, unknown format)."""


def normalize_extension(image_format: str) -> str:
    ext = image_format.strip().lower()
    return ext if ext.startswith(".") else "." + ext


def list_images(folder: str, image_format: str | None = None) -> list[str]:
    """Sorted file names in ``folder`` with the given extension (tif also matches tiff)."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    if image_format is None:
        return names
    ext = normalize_extension(image_format)
    accept = TIFF_EXTENSIONS if ext in TIFF_EXTENSIONS else (ext,)
    return [n for n in names if os.path.splitext(n)[1].lower() in accept]


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def group_by_stem(names: Iterable[str]) -> dict[str, list[str]]:
    """File names grouped by stem (``a.png`` and ``a.tif`` share ``a``), in input order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(stem(name), []).append(name)
    return groups


def stem_clashes(names: Iterable[str]) -> list[str]:
    """``"a.png / a.tif"`` for every stem that several of ``names`` share (pairing by stem is then ambiguous)."""
    return [" / ".join(group) for group in group_by_stem(names).values() if len(group) > 1]


def no_images_message(folder: str, image_format: str) -> str:
    """The one-line error for a folder without images of ``image_format``, naming the extensions it has."""
    others = sorted({os.path.splitext(n)[1] for n in list_images(folder)} - {""})
    hint = f" (found {', '.join(others)} files: set --image_format)" if others else ""
    return f"{folder}: no *{normalize_extension(image_format)} images{hint}"


def read_image(path: str) -> np.ndarray:
    """Read an image file as stored (HW, HWC or CHW); raises ImageReadError."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in TIFF_EXTENSIONS:
            import tifffile

            return np.asarray(tifffile.imread(path))
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: file not found") from exc
    except Exception as exc:  # every decoder raises its own types
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def to_hwc(image: np.ndarray) -> np.ndarray:
    """Return the image as HWC. HW gets a channel axis; CHW (C<=4 first, large last) is transposed."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3:
        if image.shape[0] <= 4 and image.shape[2] > 4:
            return np.ascontiguousarray(np.moveaxis(image, 0, -1))
        return image
    squeezed = np.squeeze(image)
    if squeezed.ndim in (2, 3) and squeezed.ndim < image.ndim:
        return to_hwc(squeezed)
    raise ValueError(f"expected a 2-D image (HW or HWC), got shape {image.shape}")


def image_stats(image_hwc: np.ndarray, rows_per_chunk: int = 1024,
                cols_per_chunk: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the whole image.

    Works on in-memory arrays and on memory-mapped / zarr-backed arrays alike:
    it walks ``rows_per_chunk`` rows at a time in float64, so peak memory does
    not depend on the image height. With ``cols_per_chunk`` it walks blocks of
    rows x columns, so it depends on neither height nor width (out-of-core
    inference); without it the result is bit-identical to the row walk.
    """
    height, width, channels = image_hwc.shape[0], image_hwc.shape[1], image_hwc.shape[2]
    cols = max(1, width if cols_per_chunk is None else cols_per_chunk)
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    count = 0
    for y in range(0, height, rows_per_chunk):
        for x in range(0, width, cols):
            block = np.asarray(image_hwc[y : y + rows_per_chunk, x : x + cols], dtype=np.float64).reshape(-1, channels)
            total += block.sum(axis=0)
            total_sq += np.square(block).sum(axis=0)
            count += block.shape[0]
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - np.square(mean), 0.0)
    return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]


def normalize(image_hwc: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel z-score: (x - mean) / max(std, epsilon), as float32.

    The original divided only when std > 1; that silently skipped scaling for
    float images in [0, 1]. Here every channel is divided, with an epsilon
    guard for constant channels.
    """
    mean_arr = np.asarray(mean, np.float32).reshape(-1)
    std_arr = np.maximum(np.asarray(std, np.float32), NORMALIZATION_EPSILON).reshape(-1)
    out = image_hwc.astype(np.float32, copy=True)
    if out.size == 0:
        return out
    # Broadcast over (H, W*C) rows: numpy is ~5x slower when the innermost broadcast axis is C (e.g. 3).
    rows = out.reshape(out.shape[0], -1)
    width = rows.shape[1] // max(mean_arr.size, 1)
    rows -= np.tile(mean_arr, width)
    rows /= np.tile(std_arr, width)
    return out


def mirror_pad(array: np.ndarray, pad_y: tuple[int, int], pad_x: tuple[int, int]) -> np.ndarray:
    """Mirror-pad the two spatial axes (reflect without repeating the edge).

    Works for any pad size, also larger than the array, by reflecting repeatedly.
    """
    widths = [pad_y, pad_x] + [(0, 0)] * (array.ndim - 2)
    if all(a == 0 and b == 0 for a, b in widths):
        return array
    out = array
    # numpy 'reflect' needs pad < size; pad in steps for tiny arrays.
    while any(a > 0 or b > 0 for a, b in widths[:2]):
        step = []
        for axis, (a, b) in enumerate(widths[:2]):
            limit = max(out.shape[axis] - 1, 0)
            if limit == 0:
                step.append((a, b))  # size-1 axis: edge == reflect
            else:
                step.append((min(a, limit), min(b, limit)))
        mode = "reflect" if all(out.shape[i] > 1 for i in range(2)) else "edge"
        out = np.pad(out, step + [(0, 0)] * (array.ndim - 2), mode=mode)
        widths = [(a - s[0], b - s[1]) for (a, b), s in zip(widths[:2], step)] + widths[2:]
    return out


def dtype_for_classes(number_classes: int) -> np.dtype:
    """Smallest unsigned dtype that holds class ids 0..number_classes-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if number_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def parse_mask_map(text: str | dict | None) -> dict[int, int]:
    """``"255:1,128:2"`` (or ``{"255": 1, "128": 2}``) -> ``{255: 1, 128: 2}``: mask value -> class id.

    Empty / None -> ``{}`` (no remapping). Raises ValueError with the user-facing message.
    """
    if not text:
        return {}
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        try:
            pairs = [tuple(int(v) for v in item.split(":")) for item in str(text).split(",") if item.strip()]
        except ValueError:
            pairs = [()]
    try:
        mapping = {int(k): int(v) for k, v in pairs}
    except (TypeError, ValueError):
        mapping = None
    if not pairs or mapping is None or any(k < 0 or v < 0 for k, v in mapping.items()):
        raise ValueError(f"--mask_map {text!r} is not a list of VALUE:CLASS pairs of non-negative integers; "
                         "write it like 255:1 or 255:1,128:2")
    return mapping


def format_mask_map(mask_map: dict[int, int]) -> str:
    """``{255: 1}`` -> ``"255:1"`` (the flag's syntax)."""
    return ",".join(f"{k}:{v}" for k, v in sorted(mask_map.items()))


def apply_mask_map(mask: np.ndarray, mask_map: dict[int, int]) -> np.ndarray:
    """Replace mask values by class ids (values not in the map stay); non-negative integer masks."""
    if not mask_map:
        return mask
    top = int(mask.max()) if mask.size else 0
    if top < (1 << 16):
        lut = np.arange(max(top, max(mask_map)) + 1, dtype=np.int64)
        for k, v in mask_map.items():
            lut[k] = v
        return lut.astype(dtype_for_classes(int(lut.max()) + 1))[mask]
    values, inverse = np.unique(mask, return_inverse=True)
    mapped = np.array([mask_map.get(int(v), int(v)) for v in values], np.int64)
    return mapped[inverse].reshape(mask.shape)


def mask_values_hint(values: Iterable[int]) -> str | None:
    """The fix for masks whose values are exactly {0, 255} (a binary mask saved for display), else None."""
    if set(int(v) for v in values) == {0, 255}:
        return "the values are exactly {0, 255}: a binary mask saved as 0/255, use --mask_map 255:1"
    return None


def check_dtype(image: np.ndarray, path: str, allowed: Iterable[str] = SUPPORTED_IMAGE_DTYPES) -> None:
    allowed = tuple(allowed)
    if image.dtype.name not in allowed:
        raise ValueError(
            f"{path}: pixel type {image.dtype.name} is not supported (supported: {', '.join(allowed)}); "
            "convert the file to one of these"
        )


# Display colours of classes 1, 2, ... (class 0, background, is left uncoloured).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], np.float32)
OVERLAY_ALPHA = 0.45


def tint(rgb: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """float RGB (..., 3) with each labelled pixel blended towards its class colour; class 0 unchanged."""
    labels = labels.astype(np.int64)
    colours = PALETTE[(labels - 1) % len(PALETTE)]
    return np.where((labels > 0)[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
