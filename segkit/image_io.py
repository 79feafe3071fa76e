"""Image reading and normalization: one home for both, used by every stage.

Axis order: spatial axes, then channels last (HWC for 2-D images, ZYXC for
volumes); statistics, normalization and mirror padding are written once for
any number of spatial axes. The one conversion of a 2-D file to HWC is :func:`to_hwc`.
Normalization is per-channel z-score with statistics over the WHOLE source
image, so training (which stores the statistics in the LMDB metadata) and
inference (which computes them on the image it segments) agree exactly.
No TensorFlow here.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterable, Iterator, Sequence

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
        if ext in TIFF_EXTENSIONS and _looks_truncated(path, exc):
            raise ImageReadError(f"{path}: cannot read image: the TIFF file is truncated or corrupt ({_one_line(exc)})") from exc
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})") from exc


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _looks_truncated(path: str, exc: Exception) -> bool:
    """Whether a TIFF decoder error means missing bytes (tifffile raises IndexError, ValueError
    'failed to read', or TiffFileError 'corrupted IFD' for a cut-off file)."""
    text = str(exc).lower()
    return isinstance(exc, (IndexError, EOFError)) or "failed to read" in text or "corrupt" in text


STACK_AXES = ("Z", "I", "T")  # tifffile's depth, ImageJ's image-sequence and time axes
MAX_PLAIN_CHANNELS = 16


def tiff_stack_hint(path: str, image: np.ndarray) -> str | None:
    """Why a 3-D TIFF looks like a z-stack rather than a multichannel image, else None.

    Reads the series axes: an explicit Z / I / T axis, or several YX pages that :func:`to_hwc`
    would turn into more than ``MAX_PLAIN_CHANNELS`` channels (the pages' width).
    """
    if os.path.splitext(path)[1].lower() not in TIFF_EXTENSIONS or image.ndim != 3:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes, pages = tif.series[0].axes, len(tif.pages)
    except Exception:  # read_image already succeeded; no axes, no hint
        return None
    hwc_channels = to_hwc(image).shape[-1]
    explicit = axes[:1] in STACK_AXES
    if explicit or (pages == image.shape[0] > 1 and hwc_channels > max(MAX_PLAIN_CHANNELS, pages)):
        return (f"this looks like a z-stack (TIFF axes {axes}, {image.shape[0]} slices of "
                f"{image.shape[1]}x{image.shape[2]}), not a {hwc_channels}-channel image")
    return None


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


def _stat_blocks(image: np.ndarray, rows_per_chunk: int, cols_per_chunk: int | None,
                 block_shape: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Blocks of ``block_shape`` over the leading (spatial) axes, every later axis whole; without it,
    ``rows_per_chunk`` along the first axis (and ``cols_per_chunk`` along the second when the image has two
    spatial axes or more). Indexes with a tuple of slices only, so lazy readers (inference's out-of-core
    images and volumes) work too."""
    if block_shape is None:
        rows = max(1, rows_per_chunk)
        if image.ndim < 3 or cols_per_chunk is None:
            block_shape = (rows,)
        else:
            block_shape = (rows, max(1, cols_per_chunk))
    steps = [max(1, int(b)) for b in block_shape]
    starts = itertools.product(*(range(0, n, step) for n, step in zip(image.shape, steps)))
    for start in starts:
        yield image[tuple(slice(s, s + step) for s, step in zip(start, steps))]


def image_stats(image: np.ndarray, rows_per_chunk: int = 1024, cols_per_chunk: int | None = None,
                block_shape: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every spatial axis (``image``: spatial axes, then
    channels last: HWC, ZYXC, ...). ``block_shape``: one block size per leading spatial axis (e.g. an
    on-disk volume's chunks); default ``rows_per_chunk`` (x ``cols_per_chunk``) blocks.

    Walks blocks (:func:`_stat_blocks`) in float64, so peak memory depends on the block, not the image
    (in-memory, memory-mapped and zarr-backed arrays alike). Numerically stable: each block's mean and
    sum of squared deviations are merged with Chan et al.'s pairwise update, so int32 data near 1e9
    keeps its small spread (the sum-of-squares formula lost it to cancellation).
    """
    channels = image.shape[-1]
    count, mean, m2 = 0, np.zeros(channels, np.float64), np.zeros(channels, np.float64)
    for block in _stat_blocks(image, rows_per_chunk, cols_per_chunk, block_shape):
        block = np.asarray(block, dtype=np.float64).reshape(-1, channels)
        n = block.shape[0]
        if n == 0:
            continue
        block_mean = block.mean(axis=0)
        block_m2 = np.square(block - block_mean).sum(axis=0)
        total = count + n
        delta = block_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + np.square(delta) * (count * n / total)
        count = total
    std = np.sqrt(m2 / max(count, 1))
    return [float(m) for m in mean], [float(s) for s in std]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel z-score: (x - mean) / max(std, epsilon), as float32; ``image``: spatial axes then
    channels last (HWC, ZYXC, ...).

    The original divided only when std > 1; that silently skipped scaling for
    float images in [0, 1]. Here every channel is divided, with an epsilon
    guard for constant channels.
    """
    mean_arr = np.asarray(mean, np.float32).reshape(-1)
    std_arr = np.maximum(np.asarray(std, np.float32), NORMALIZATION_EPSILON).reshape(-1)
    out = image.astype(np.float32, copy=True)
    if out.size == 0:
        return out
    # Broadcast over (first axis, rest*C) rows: numpy is ~5x slower when the innermost broadcast axis is C (e.g. 3).
    rows = out.reshape(out.shape[0], -1)
    width = rows.shape[1] // max(mean_arr.size, 1)
    rows -= np.tile(mean_arr, width)
    rows /= np.tile(std_arr, width)
    return out


Pad = tuple[int, int]


def _pad_pairs(pads: tuple) -> list[Pad]:
    """``(pad_y, pad_x)`` (one pair per argument) or ``([pad_z, pad_y, pad_x],)`` (one sequence) -> pairs."""
    if len(pads) == 1 and len(pads[0]) and not np.isscalar(pads[0][0]):
        pads = tuple(pads[0])
    pairs = [(int(before), int(after)) for before, after in pads]
    if any(before < 0 or after < 0 for before, after in pairs):
        raise ValueError(f"mirror_pad widths must be >= 0, got {pairs}")
    return pairs


def mirror_pad(array: np.ndarray, *pads) -> np.ndarray:
    """Mirror-pad the leading spatial axes: reflect without repeating the edge (``np.pad(mode="reflect")``).

    ``pads``: one (before, after) pair per leading axis, as arguments (``mirror_pad(a, pad_y, pad_x)``,
    the 2-D form) or as one sequence (``mirror_pad(a, [pad_z, pad_y, pad_x])``); later axes (channels)
    are not padded. Any pad size works: beyond the array the reflection repeats, and a 1-pixel axis
    repeats its pixel, exactly as ``tiling.reflect_index`` maps positions on the infinite mirror extension.
    """
    pairs = _pad_pairs(pads)
    if len(pairs) > array.ndim:
        raise ValueError(f"mirror_pad got {len(pairs)} pad pairs for an array of shape {array.shape}")
    if all(before == 0 and after == 0 for before, after in pairs):
        return array
    sizes = array.shape[: len(pairs)]
    if all(size > 1 and max(pad) < size for size, pad in zip(sizes, pairs)):  # numpy's own reflect covers it
        return np.pad(array, pairs + [(0, 0)] * (array.ndim - len(pairs)), mode="reflect")
    from segkit.tiling import reflect_index

    out = array
    for axis, (size, (before, after)) in enumerate(zip(sizes, pairs)):
        if before or after:
            out = np.take(out, reflect_index(np.arange(-before, size + after), size), axis=axis)
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
        lut = np.arange(top + 1, dtype=np.int64)  # a table up to the mask's top: a key of 2**31 costs nothing
        for k, v in mask_map.items():
            if k <= top:
                lut[k] = v
        end = max(top, max(mask_map))  # the output type stays that of a table running to the largest key
        while end in mask_map:
            end -= 1
        return lut.astype(dtype_for_classes(max(end, *mask_map.values()) + 1))[mask]
    values, inverse = np.unique(mask, return_inverse=True)
    mapped = np.array([mask_map.get(int(v), int(v)) for v in values], np.int64)
    return mapped[inverse].reshape(mask.shape)


GREY_LEVEL_MAXIMA = (255, 65535)  # a mask whose top value is one of these was saved for display
MAX_HINTED_VALUES = 8


def mask_values_hint(values: Iterable[int]) -> str | None:
    """The ``--mask_map`` fix for masks saved as display grey levels, else None.

    {0, 255} -> ``255:1``; several levels such as {0, 128, 255} (top value 255 or 65535, or evenly
    spaced like 0/50/100) -> ``128:1,255:2``: the nonzero values, in order, become classes 1, 2, ...
    Values that already count 0, 1, 2, ... get no hint.
    """
    found = sorted(set(int(v) for v in values))
    levels = [v for v in found if v != 0]
    if not levels or 0 not in found or levels == list(range(1, len(levels) + 1)) or len(levels) > MAX_HINTED_VALUES:
        return None
    fix = format_mask_map({v: c for c, v in enumerate(levels, start=1)})
    if found == [0, 255]:
        return f"the values are exactly {{0, 255}}: a binary mask saved as 0/255, use --mask_map {fix}"
    evenly_spaced = len(levels) > 1 and all(v == levels[0] * (i + 1) for i, v in enumerate(levels))
    if levels[-1] in GREY_LEVEL_MAXIMA or evenly_spaced:
        shown = ", ".join(map(str, found))
        return f"the values are {{{shown}}}: classes saved as grey levels, use --mask_map {fix}"
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
