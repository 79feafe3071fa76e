"""Inference settings: every flag resolved and checked before an image is read or TensorFlow loads.

Also where each image's outputs go (:func:`output_paths`). See README.md, "Stage 3".
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from segkit import cliutil, image_io, model_metadata
from segkit.cliutil import InputError
from segkit.model_metadata import ModelMetadata

log = logging.getLogger("inference_unet.settings")

DEFAULT_TILE_SIZE = 1024
BORDERS = ("zero", "mirror")  # tiling.BORDERS; see README "Exact tiling"
DEFAULT_BORDER = "zero"
DEFAULT_MEMORY_LIMIT_MB = 2048
TIFF_TILE_MULTIPLE = 16  # TIFF tiles must be multiples of 16 pixels
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
PROBABILITY_DTYPES = ("float32", "uint8")
OUTPUT_FORMATS = ("tif", "zarr")
PROBABILITIES_FOLDER, OVERLAYS_FOLDER = "probabilities", "overlays"  # under --output_folder
OUTPUT_SUBFOLDERS = (PROBABILITIES_FOLDER, OVERLAYS_FOLDER)
# Upper bounds of the numeric flags: beyond them a value is a typo, not a setting (issue #17).
MAX_TILE_SIZE = 65536          # px; a tile larger than the image is the whole image anyway
MAX_HALO = 8192                # px; FC-DenseNet103's radius is about 1120
MAX_BATCH_SIZE = 1024          # tiles per forward pass
MAX_MEMORY_LIMIT_MB = 2**30    # 1 PB
MAX_SHARD_COUNT = 10**6        # Slurm's largest job array is 4 000 001 tasks; a million shards of one image each
MAX_MASK_VALUE = 2**31 - 1     # int32, the widest mask type


@dataclass(frozen=True)
class Settings:
    saved_model_filepath: str
    image_folder: str
    output_folder: str
    names: tuple[str, ...]                 # this shard's images
    meta: ModelMetadata
    tile_size: int
    halo: int
    border: str                            # what the model sees beyond the image border: tiling.BORDERS
    batch_size: int
    save_probabilities: bool
    probability_dtype: str
    tta: bool
    masks: dict[str, str] | None          # image name -> ground-truth mask path
    mask_map: dict[int, int]              # ground-truth value -> class id before scoring ({} = as is)
    overlay: bool
    overwrite: bool
    output_format: str
    working_set_limit: int                # bytes
    shard: tuple[int, int]

    @property
    def size_factor(self) -> int:
        return self.meta.size_factor

    @property
    def number_classes(self) -> int:
        return self.meta.number_classes


def resolve_halo(halo: str | int | None, meta: ModelMetadata | Mapping[str, Any]) -> int:
    """'exact' (default): theoretical radius; 'erf': measured effective radius; or pixels.

    Rounded up to a multiple of the size factor so tiles align with the model's pooling grid.
    """
    factor = int(meta["size_factor"])
    radius = int(math.ceil(float(meta["receptive_field_radius"])))
    spec = "exact" if halo is None else str(halo).strip().lower()
    if spec == "exact":
        pixels = radius
    elif spec == "erf":
        if meta.get("effective_receptive_field_radius") is None:
            raise InputError("--halo erf: the SavedModel's metadata has no effective_receptive_field_radius; "
                             "use --halo exact or a number of pixels")
        pixels = int(math.ceil(float(meta["effective_receptive_field_radius"])))
    else:
        try:
            pixels = int(spec)
        except ValueError:
            raise InputError(f"--halo must be 'exact', 'erf' or a number of pixels >= 0, got {halo!r}") from None
        if not 0 <= pixels <= MAX_HALO:
            raise InputError(f"--halo must be between 0 and {MAX_HALO} pixels, got {pixels}")
    rounded = -(-pixels // factor) * factor
    if rounded < radius:
        log.warning("halo %d px is below the model's receptive-field radius %d px: tiled masks can differ from "
                    "whole-image prediction near tile borders (use --halo exact for identical results)", rounded, radius)
    return rounded


def resolve_tile_size(tile_size: int, size_factor: int) -> int:
    """Round the zone size up to a multiple of the size factor and of 16 (TIFF tiles)."""
    tile = checked_number("--tile_size", tile_size, 1, MAX_TILE_SIZE, "pixels", integer=True)
    step = math.lcm(size_factor, TIFF_TILE_MULTIPLE)
    return -(-int(tile) // step) * step


def checked_number(flag: str, value: Any, low: float, high: float, unit: str = "", integer: bool = False) -> float:
    """``value`` when it is a finite number (an integer when ``integer``) in [low, high]; else InputError
    naming ``flag``. Catches NaN, infinity and sizes no machine holds before any work starts."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    whole = math.isfinite(number) and number == int(number)
    if not (math.isfinite(number) and low <= number <= high) or (integer and not whole):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{flag} must be {kind} from {low:g} to {high:g}{' ' + unit if unit else ''}, got {value!r}")
    return int(number) if integer else number


def _env_int(environ: dict[str, str], key: str) -> int | None:
    value = environ.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {key}={value!r} is not an integer; unset it or pass "
                         "--shard_index/--shard_count") from None


def resolve_shard(shard_index: int | None, shard_count: int | None,
                  environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count), defaulting to the Slurm array task when the flags are not given."""
    environ = dict(os.environ) if environ is None else environ
    if shard_count is None:
        shard_count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT") or 1
    if shard_index is None:
        task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
        shard_index = 0 if task is None else (task - first) // step
    checked_number("--shard_count", shard_count, 1, MAX_SHARD_COUNT, integer=True)
    checked_number("--shard_index", shard_index, 0, MAX_SHARD_COUNT - 1, integer=True)
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise InputError(f"shard index {shard_index} is not in [0, shard count {shard_count}); check "
                         "--shard_index/--shard_count (or the Slurm array range)")
    return shard_index, shard_count


def shard_names(names: Sequence[str], index: int, count: int) -> list[str]:
    """Every ``count``-th name starting at ``index``: shards neither overlap nor leave gaps."""
    return list(names[index::count])


def _list_inputs(image_folder: str, image_format: str) -> list[str]:
    if not os.path.isdir(image_folder):
        raise InputError(f"--image_folder {image_folder}: not a folder")
    warn_dangling_links(image_folder, image_format)
    names = image_io.list_images(image_folder, image_format)
    if not names:
        raise InputError(image_io.no_images_message(image_folder, image_format))
    clashes = image_io.stem_clashes(names)
    if clashes:
        raise InputError(f"{image_folder}: images share a file stem ({', '.join(clashes[:5])}), so their outputs "
                         "would collide; rename or move one of each")
    return names


def warn_dangling_links(folder: str, image_format: str | None = None) -> list[str]:
    """Log (and return) the symbolic links in ``folder`` (with the images' extension) whose target is
    missing: they cannot be segmented, and a silent skip would look like a finished folder."""
    accept = None
    if image_format is not None:
        ext = image_io.normalize_extension(image_format)
        accept = image_io.TIFF_EXTENSIONS if ext in image_io.TIFF_EXTENSIONS else (ext,)
    dangling = sorted(n for n in os.listdir(folder) if os.path.islink(os.path.join(folder, n))
                      and not os.path.exists(os.path.join(folder, n))
                      and (accept is None or os.path.splitext(n)[1].lower() in accept))
    if dangling:
        log.warning("%s: %d symbolic link(s) point to missing files and are skipped: %s%s; fix or remove them",
                    folder, len(dangling), ", ".join(dangling[:5]), " ..." if len(dangling) > 5 else "")
    return dangling


def _check_mask_folder(mask_folder: str, image_folder: str, output_folder: str) -> None:
    """Ground truth must never be overwritten by predictions, nor scored against itself (also through links)."""
    truth = os.path.realpath(mask_folder)
    if truth == os.path.realpath(output_folder):
        raise InputError(f"--output_folder {output_folder} is the --mask_folder: the predictions would replace the "
                         "ground truth; choose another --output_folder")
    if truth == os.path.realpath(image_folder):
        raise InputError(f"--mask_folder {mask_folder} is the --image_folder: the images would be scored as ground "
                         "truth; pass the folder of the masks")


def pair_masks(names: Sequence[str], mask_folder: str) -> dict[str, str]:
    """Image name -> ground-truth mask path, paired by file stem (a.png scores a.tif)."""
    if not os.path.isdir(mask_folder):
        raise InputError(f"--mask_folder {mask_folder}: not a folder")
    warn_dangling_links(mask_folder)
    by_stem = image_io.group_by_stem(image_io.list_images(mask_folder))
    pairs = {}
    for name in names:
        found = by_stem.get(image_io.stem(name), [])
        if len(found) > 1:
            raise InputError(f"{mask_folder}: several masks share the stem of {name} ({', '.join(found)}); keep one")
        if found:
            pairs[name] = os.path.join(mask_folder, found[0])
    return pairs


def _working_set_limit(memory_limit_mb: float) -> int:
    memory_limit_mb = checked_number("--memory_limit_mb", memory_limit_mb, 0, MAX_MEMORY_LIMIT_MB, "MB")
    if memory_limit_mb <= 0:
        raise InputError(f"--memory_limit_mb must be > 0, got {memory_limit_mb}")
    limit = int(memory_limit_mb * 2**20)
    try:
        import psutil

        limit = min(limit, psutil.virtual_memory().available // 4)
    except ImportError:  # psutil is in requirements.txt; without it, the flag alone decides
        pass
    return limit


def load_model_metadata(saved_model_filepath: str, label: str | None = None) -> ModelMetadata:
    """The SavedModel's metadata, checked, and its normalization one this toolkit applies; InputError
    (prefixed with ``label``, default the path) otherwise. Shared by the CLI and segkit.api."""
    try:
        meta = model_metadata.load(saved_model_filepath)
    except ValueError as exc:
        raise InputError(f"{label or saved_model_filepath}: {exc}") from None
    method = meta.normalization.get("method")
    if method != image_io.NORMALIZATION_METHOD:
        raise InputError(f"{saved_model_filepath}: the model was trained with normalization {method!r}, this toolkit "
                         f"applies {image_io.NORMALIZATION_METHOD!r}; re-export the model with this toolkit")
    return meta


def resolve_settings(*, saved_model_filepath: str, image_folder: str, output_folder: str, image_format: str = "tif",
                     tile_size: int = DEFAULT_TILE_SIZE, halo: str | int | None = "exact",
                     border: str = DEFAULT_BORDER, batch_size: int = 1,
                     save_probabilities: bool = False, probability_dtype: str = "float32", tta: bool = False,
                     mask_folder: str | None = None, overlay: bool = False, shard_index: int | None = None,
                     shard_count: int | None = None, overwrite: bool = False, output_format: str = "tif",
                     memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB, mask_map: str | None = None) -> Settings:
    """Check every input and resolve the settings; raises InputError. Reads no image, no TensorFlow."""
    meta = load_model_metadata(saved_model_filepath, "--saved_model_filepath")
    batch_size = checked_number("--batch_size", batch_size, 1, MAX_BATCH_SIZE, "tiles", integer=True)
    working_set_limit = _working_set_limit(memory_limit_mb)
    if border not in BORDERS:
        raise InputError(f"--border must be one of {', '.join(BORDERS)}, got {border!r}")
    if probability_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"--probability_dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {probability_dtype!r}")
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    names = _list_inputs(image_folder, image_format)
    if os.path.realpath(output_folder) == os.path.realpath(image_folder):
        raise InputError(f"--output_folder {output_folder} is the image folder: masks would replace the images; "
                         "choose another folder")
    if mask_folder:
        _check_mask_folder(mask_folder, image_folder, output_folder)
    cliutil.check_output_folder(output_folder, "--output_folder")
    index, count = resolve_shard(shard_index, shard_count)
    mine = shard_names(names, index, count)
    masks = pair_masks(mine, mask_folder) if mask_folder else None
    truth_map = resolve_mask_map(mask_map, meta) if masks is not None else {}
    tile, halo_px = resolve_tile_size(tile_size, meta.size_factor), resolve_halo(halo, meta)
    overhead = ((tile + 2 * halo_px) / tile) ** 2
    if overhead > 4:
        log.warning("each %d px tile computes %.1fx its zone because of the %d px halo: a larger --tile_size is "
                    "faster if memory allows (the result does not change)", tile, overhead, halo_px)
    return Settings(
        saved_model_filepath=saved_model_filepath, image_folder=image_folder, output_folder=output_folder,
        names=tuple(mine), meta=meta, tile_size=tile, halo=halo_px, border=border, batch_size=int(batch_size),
            save_probabilities=bool(save_probabilities),
        probability_dtype=probability_dtype, tta=bool(tta), masks=masks, mask_map=truth_map, overlay=bool(overlay),
        overwrite=bool(overwrite), output_format=output_format,
        working_set_limit=working_set_limit, shard=(index, count))


def resolve_mask_map(mask_map: str | None, meta: ModelMetadata | Mapping[str, Any]) -> dict[int, int]:
    """The ground-truth value -> class map: ``--mask_map`` when given (``none`` = as is), else the one the
    model's training databases were built with (metadata ``mask_map``), else none."""
    if mask_map is not None:
        if str(mask_map).strip().lower() == "none":
            return {}
        try:
            mapping = image_io.parse_mask_map(mask_map)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        too_large = sorted(v for pair in mapping.items() for v in pair if v > MAX_MASK_VALUE)
        if too_large:
            raise InputError(f"--mask_map {mask_map}: {too_large[-1]} is larger than any mask value ({MAX_MASK_VALUE}, "
                             "int32); write it like 255:1")
        return mapping
    try:
        mapping = image_io.parse_mask_map(dict(meta.get("mask_map") or {}))
    except ValueError:
        raise InputError(f"the model's metadata has an invalid mask_map {meta.get('mask_map')!r}; pass --mask_map "
                         "yourself (e.g. 255:1, or none)") from None
    if mapping:
        log.info("ground-truth masks remapped with the model's --mask_map %s (from its training databases; "
                 "--mask_map none scores them as they are)", image_io.format_mask_map(mapping))
    return mapping


# --- output paths ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputPaths:
    mask: str
    probabilities: str | None
    overlay: str | None

    def todo(self, overwrite: bool) -> dict[str, str]:
        """Outputs to (re)write: all with ``overwrite``, else those that do not exist yet."""
        wanted = {"mask": self.mask, "probabilities": self.probabilities, "overlay": self.overlay}
        return {k: p for k, p in wanted.items() if p is not None and (overwrite or not os.path.exists(p))}


def output_paths(name: str, settings: Settings) -> OutputPaths:
    folder, base, ext = settings.output_folder, image_io.stem(name), os.path.splitext(name)[1]
    if settings.output_format == "zarr":
        mask = os.path.join(folder, base + ".zarr")
    else:
        mask = os.path.join(folder, base + ".png" if ext.lower() in LOSSY_EXTENSIONS else name)
    probs_ext = ".zarr" if settings.output_format == "zarr" else ".tif"
    return OutputPaths(
        mask=mask,
        probabilities=(os.path.join(folder, PROBABILITIES_FOLDER, base + probs_ext)
                       if settings.save_probabilities else None),
        overlay=os.path.join(folder, OVERLAYS_FOLDER, base + ".png") if settings.overlay else None,
    )
