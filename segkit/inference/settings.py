"""Inference settings: every flag resolved and checked before an image is read or TensorFlow loads.

Also where each image's outputs go (:func:`output_paths`). See README.md, "Stage 3".
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from segkit import build_volume, cliutil, image_io, model_metadata, tiling
from segkit.cliutil import InputError
from segkit.model_metadata import ModelMetadata
from segkit.tiling import PerAxis

log = logging.getLogger("inference_unet.settings")

DEFAULT_TILE_SIZE = 1024
DEFAULT_VOLUME_TILE_SIZE = 128  # per axis, for volume models: a 128^3 zone plus halo fits a CPU's memory
BORDERS = ("zero", "mirror")  # tiling.BORDERS; see README "Exact tiling"
DEFAULT_BORDER = "zero"
DEFAULT_MEMORY_LIMIT_MB = 2048
TIFF_TILE_MULTIPLE = 16  # TIFF tiles must be multiples of 16 pixels
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
PROBABILITY_DTYPES = ("float32", "uint8")
OUTPUT_FORMATS = ("tif", "zarr")
PROBABILITIES_FOLDER, OVERLAYS_FOLDER, LABELS_FOLDER = "probabilities", "overlays", "labels"  # under --output_folder
OUTPUT_SUBFOLDERS = (PROBABILITIES_FOLDER, OVERLAYS_FOLDER, LABELS_FOLDER)
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
    image_dataset: str | None = None      # dataset inside .zarr / .h5 images (build_volume.address's default)
    mask_dataset: str | None = None       # the same for --mask_folder volumes
    slice_wise: bool | None = None        # a 2-D model on volumes: section by section (None: automatic)
    instances: Any = None                 # instances_out.InstanceSettings: labels and objects.csv (None: off)
    blocks: bool = False                  # shards split each input's OME-Zarr into blocks (segkit.inference.blocks)
    finalize: bool = False                # --finalize 1: the closing step of block-split outputs

    @property
    def size_factor(self) -> int | tuple[int, ...]:
        return self.meta.size_factor

    @property
    def spatial_rank(self) -> int:
        return self.meta.spatial_rank

    def geometry(self, spatial_ndim: int) -> tuple[PerAxis, PerAxis, PerAxis]:
        """(tile, halo, size factor) for an input of ``spatial_ndim`` axes: the model's own, or for a 2-D
        model on a volume (slice-wise) one section per tile: z tile 1, z halo 0, z size factor 1."""
        if spatial_ndim == self.spatial_rank:
            return self.tile_size, self.halo, self.size_factor
        yx = [tiling.per_axis(v, 2, name) for v, name in ((self.tile_size, "tile"), (self.halo, "halo"),
                                                          (self.size_factor, "size_factor"))]
        return (1,) + yx[0], (0,) + yx[1], (1,) + yx[2]

    @property
    def number_classes(self) -> int:
        return self.meta.number_classes


def resolve_halo(halo: str | int | None, meta: ModelMetadata | Mapping[str, Any]) -> int | tuple[int, ...]:
    """'exact' (default): theoretical radius; 'erf': measured effective radius; or pixels.

    Rounded up to a multiple of the size factor so tiles align with the model's pooling grid. One value
    per spatial axis (a tuple) when the metadata give the size factor or radius per axis (volume models).
    """
    factors, radii = meta["size_factor"], meta["receptive_field_radius"]
    if not isinstance(factors, (list, tuple)) and not isinstance(radii, (list, tuple)):
        return _halo_pixels(halo, int(factors), float(radii), meta)
    ndim = len(factors) if isinstance(factors, (list, tuple)) else len(radii)
    factors = factors if isinstance(factors, (list, tuple)) else [factors] * ndim
    radii = radii if isinstance(radii, (list, tuple)) else [radii] * ndim
    return tuple(_halo_pixels(halo, int(f), float(r), meta) for f, r in zip(factors, radii))


def _halo_pixels(halo: str | int | None, factor: int, radius_px: float, meta: Mapping[str, Any]) -> int:
    radius = int(math.ceil(radius_px))
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


def parse_tile_size(tile_size: int | str | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """``--tile_size``: one number, or one per axis (``16,128,128``: z,y,x for volume models)."""
    if tile_size is None or isinstance(tile_size, int):
        return tile_size
    parts = str(tile_size).replace(",", " ").split() if isinstance(tile_size, str) else list(tile_size)
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) not in (1, 2, 3):
        raise InputError(f"--tile_size must be one number or one per axis (z,y,x for volumes), got {tile_size!r}")
    return values[0] if len(values) == 1 else tuple(values)


def resolve_tile_size(tile_size: int | Sequence[int], size_factor: int | Sequence[int]) -> int | tuple[int, ...]:
    """Round the zone size up to a multiple of the size factor and, on the last two (y, x) axes, of 16 (TIFF
    tiles). One int for one int and a scalar factor (2-D models); else one value per axis."""
    per_axis = isinstance(tile_size, (list, tuple)) or isinstance(size_factor, (list, tuple))
    ndim = len(size_factor) if isinstance(size_factor, (list, tuple)) else len(tile_size) if per_axis else 1
    given = tuple(tile_size) if isinstance(tile_size, (list, tuple)) else (tile_size,)
    given = tuple(checked_number("--tile_size", t, 1, MAX_TILE_SIZE, "pixels", integer=True) for t in given)
    try:
        tiles = tiling.per_axis(given if per_axis and len(given) > 1 else given[0], ndim, "tile")
    except ValueError:
        raise InputError(f"--tile_size must be one number or {ndim} (one per axis, z,y,x), got "
                         f"{','.join(map(str, given))}") from None
    factors = tiling.per_axis(size_factor, ndim, "size_factor")
    steps = [f if axis < ndim - 2 else math.lcm(f, TIFF_TILE_MULTIPLE) for axis, f in enumerate(factors)]
    rounded = tuple(-(-t // step) * step for t, step in zip(tiles, steps))
    return rounded if per_axis else rounded[0]


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
    if build_volume.is_container_format(image_format):  # .zarr stores (folders) or HDF5 files
        names = build_volume.list_containers(image_folder, image_format)
    else:
        names = image_io.list_images(image_folder, image_format)
    if not names:
        raise InputError(image_io.no_images_message(image_folder, image_format))
    clashes = [" / ".join(group) for group in _group_by_stem(names).values() if len(group) > 1]
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


def input_stem(name: str) -> str:
    """The stem outputs and masks pair by: ``image_io.stem``, and ``vol`` for ``vol.ome.zarr``."""
    base = image_io.stem(name)
    return base[: -len(".ome")] if name.lower().endswith(".ome.zarr") else base


def _group_by_stem(names: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(input_stem(name), []).append(name)
    return groups


def pair_masks(names: Sequence[str], mask_folder: str) -> dict[str, str]:
    """Image name -> ground-truth mask path, paired by file stem (a.png scores a.tif; a.zarr / a.h5
    volumes too)."""
    if not os.path.isdir(mask_folder):
        raise InputError(f"--mask_folder {mask_folder}: not a folder")
    warn_dangling_links(mask_folder)
    containers = [n for n in os.listdir(mask_folder) if not n.startswith(".")
                  and n.lower().endswith(build_volume.CONTAINER_EXTENSIONS) and os.path.isdir(os.path.join(mask_folder, n))]
    by_stem = _group_by_stem(image_io.list_images(mask_folder) + sorted(containers))
    pairs = {}
    for name in names:
        found = by_stem.get(input_stem(name), [])
        if len(found) > 1:
            raise InputError(f"{mask_folder}: several masks share the stem of {name} ({', '.join(found)}); keep one")
        if found:
            pairs[name] = os.path.join(mask_folder, found[0])
    return pairs


# Bytes a UNet's forward pass holds per voxel of a tile, per base filter: 175-195 B per voxel measured for
# the default unet3d (8 base filters, float32, CPU; 64^3 and 96^3 tiles, README "Volumes").
MODEL_BYTES_PER_VOXEL_PER_FILTER = 24


MODEL_MEMORY_FRACTION = 0.5  # a default volume tile's model working set stays within this share of free memory


def _model_bytes(meta: ModelMetadata, voxels):
    """Estimated bytes of the model's activations for tiles of ``voxels`` (with halo); None: not a UNet."""
    filters = (meta.model_config or {}).get("base_filters")
    if not isinstance(filters, int) or filters <= 0:
        return None
    return np.asarray(voxels, dtype=np.float64) * MODEL_BYTES_PER_VOXEL_PER_FILTER * filters


def default_volume_tile(meta: ModelMetadata, halo: int | tuple[int, ...], available: int | None) -> tuple[int, ...]:
    """The default zone of a volume model's tiles: DEFAULT_VOLUME_TILE_SIZE per axis when the model's
    working set for it (with the halo) fits MODEL_MEMORY_FRACTION of the ``available`` bytes; else, of the
    zones whose axes are multiples of the size factor up to that size and that fit, the one that computes
    the least halo per zone voxel, the larger on a tie (so an anisotropic model gives up z before y and x).
    With nothing that fits, the smallest zone (the memory warning follows). Unknown memory or a model
    without an estimate: the full default."""
    rank = meta.spatial_rank
    full = (DEFAULT_VOLUME_TILE_SIZE,) * rank
    halos = np.array(tiling.per_axis(halo, rank, "halo"))
    factors = tiling.per_axis(meta.size_factor, rank, "size factor")
    if available is None or _model_bytes(meta, 1) is None:
        return full
    budget = available * MODEL_MEMORY_FRACTION
    full_need = float(_model_bytes(meta, np.prod(np.array(full) + 2 * halos)))
    if full_need <= budget:
        return full
    axes = [np.unique(np.linspace(f, max(f, DEFAULT_VOLUME_TILE_SIZE // f * f), 32) // f * f).astype(np.int64)
            for f in factors]  # up to 32 sizes per axis, multiples of the size factor
    zones = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, rank)
    with_halo = np.prod(zones + 2 * halos, axis=1).astype(np.float64)
    fits = _model_bytes(meta, with_halo) <= budget
    if not fits.any():
        best = int(np.argmin(with_halo))
    else:
        volume = np.prod(zones, axis=1).astype(np.float64)
        efficiency = np.where(fits, volume / with_halo, -1.0)
        best = int(np.lexsort((volume, efficiency))[-1])  # ties (an axis without halo): the larger zone
    zone = tuple(int(v) for v in zones[best])
    log.info("chose --tile_size %s: the model's working set for a %s tile with its halo (~%.2f GB) %s %.0f%% of "
             "the %.1f GB of memory available; %s would need ~%.1f GB", ",".join(map(str, zone)),
             "x".join(str(z + 2 * h) for z, h in zip(zone, halos)), float(_model_bytes(meta, with_halo[best])) / 2**30,
             "fits" if fits.any() else "is the smallest, yet over", 100 * MODEL_MEMORY_FRACTION,
             available / 2**30, ",".join(map(str, full)), full_need / 2**30)
    return zone


def _warn_if_tiles_outgrow_memory(meta: ModelMetadata, tile, halo) -> None:
    """Warn when the largest tile (zone + halo on both sides) would need more memory for the model's
    activations than is available now: the run would be killed by the system part way through."""
    rank = meta.spatial_rank
    voxels = float(np.prod([t + 2 * h for t, h in zip(tiling.per_axis(tile, rank, "tile"), tiling.per_axis(halo, rank, "halo"))]))
    need, available = _model_bytes(meta, voxels), _available_memory()
    if need is not None and available is not None and need > available:
        log.warning("a tile with its halo may need ~%.1f GB for the model (about %d bytes per voxel), more than the "
                    "%.1f GB available: pass a smaller --tile_size (images smaller than a tile are not affected)",
                    need / 2**30, round(float(_model_bytes(meta, 1))), available / 2**30)


def _working_set_limit(memory_limit_mb: float) -> int:
    memory_limit_mb = checked_number("--memory_limit_mb", memory_limit_mb, 0, MAX_MEMORY_LIMIT_MB, "MB")
    if memory_limit_mb <= 0:
        raise InputError(f"--memory_limit_mb must be > 0, got {memory_limit_mb}")
    limit = int(memory_limit_mb * 2**20)
    available = _available_memory()
    return limit if available is None else min(limit, available // 4)


def _available_memory() -> int | None:
    """Bytes of memory available now; None without psutil (it is in requirements.txt): the flags alone decide."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


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
                     tile_size: int | str | Sequence[int] | None = None, halo: str | int | None = "exact",
                     border: str = DEFAULT_BORDER, batch_size: int = 1,
                     save_probabilities: bool = False, probability_dtype: str = "float32", tta: bool = False,
                     mask_folder: str | None = None, overlay: bool = False, shard_index: int | None = None,
                     shard_count: int | None = None, overwrite: bool = False, output_format: str = "tif",
                     memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB, mask_map: str | None = None,
                     image_dataset: str | None = None, mask_dataset: str | None = None,
                     slice_wise: bool | None = None, instances: bool | None = None,
                     min_object_size: int | None = None, seed_threshold: float | None = None,
                     foreground_threshold: float | None = None, seed_dynamic: float | None = None,
                     seam_halo: int | None = None, object_diameter: str | float | None = None,
                     finalize: bool = False) -> Settings:
    """Check every input and resolve the settings; raises InputError. Reads no image, no TensorFlow."""
    meta = load_model_metadata(saved_model_filepath, "--saved_model_filepath")
    from segkit.inference.instances_out import resolve_instances

    instance_settings = resolve_instances(instances, meta, saved_model_filepath, min_object_size, seed_threshold,
                                          foreground_threshold, seed_dynamic, seam_halo, object_diameter)
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
    blocks = _block_mode(output_format, count, bool(finalize), bool(overwrite))
    if finalize:
        index, count = 0, 1  # the closing step covers every block and writes metrics.csv, not a shard's
    mine = list(names) if blocks else shard_names(names, index, count)
    masks = pair_masks(mine, mask_folder) if mask_folder else None
    truth_map = resolve_mask_map(mask_map, meta) if masks is not None else {}
    halo_px = resolve_halo(halo, meta)
    tile = _model_tile_size(tile_size, meta, halo_px)
    if slice_wise and meta.spatial_rank == 3:
        raise InputError("--slice_wise 1 applies a 2-D model section by section, but this model segments volumes "
                         "(spatial rank 3); drop --slice_wise")
    overhead = float(np.prod([(t + 2 * h) / t for t, h in zip(tiling.per_axis(tile, meta.spatial_rank, "tile"),
                                                              tiling.per_axis(halo_px, meta.spatial_rank, "halo"))]))
    if overhead > 4:
        sizes = [",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in (tile, halo_px)]
        log.warning("each %s px tile computes %.1fx its zone because of the %s px halo: a larger --tile_size is "
                    "faster if memory allows (the result does not change)", sizes[0], overhead, sizes[1])
    _warn_if_tiles_outgrow_memory(meta, tile, halo_px)
    return Settings(
        saved_model_filepath=saved_model_filepath, image_folder=image_folder, output_folder=output_folder,
        names=tuple(mine), meta=meta, tile_size=tile, halo=halo_px, border=border, batch_size=int(batch_size),
            save_probabilities=bool(save_probabilities),
        probability_dtype=probability_dtype, tta=bool(tta), masks=masks, mask_map=truth_map, overlay=bool(overlay),
        overwrite=bool(overwrite), output_format=output_format,
        working_set_limit=working_set_limit, shard=(index, count),
        image_dataset=image_dataset or None, mask_dataset=mask_dataset or None,
        slice_wise=None if slice_wise is None else bool(slice_wise), instances=instance_settings,
        blocks=blocks, finalize=bool(finalize))


def _block_mode(output_format: str, shard_count: int, finalize: bool, overwrite: bool) -> bool:
    """Whether shards split every input's OME-Zarr into blocks (README "One volume across a cluster") rather
    than the folder's files: with ``--output_format zarr`` and several shards, and for ``--finalize 1``."""
    if finalize and output_format != "zarr":
        raise InputError("--finalize 1 closes outputs split into blocks, which are OME-Zarr: add --output_format zarr "
                         "(as the shards were run)")
    blocks = finalize or (output_format == "zarr" and shard_count > 1)
    if blocks and overwrite:
        raise InputError("--overwrite 1 with shards writing one OME-Zarr: each shard would remove the others' blocks; "
                         "delete the outputs once, then run the shards without --overwrite")
    return blocks


def _model_tile_size(tile_size: int | str | Sequence[int] | None, meta: ModelMetadata,
                     halo: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """``--tile_size`` for the model: one number (2-D models: as before; volume models: a cube) or z,y,x
    (volume models only); default DEFAULT_TILE_SIZE, or for volume models the tile of
    :func:`default_volume_tile` (at most DEFAULT_VOLUME_TILE_SIZE per axis, within the memory available)."""
    tile = parse_tile_size(tile_size)
    rank = meta.spatial_rank
    if tile is None:
        tile = DEFAULT_TILE_SIZE if rank == 2 else default_volume_tile(meta, halo, _available_memory())
    if isinstance(tile, tuple) and len(tile) != rank:
        raise InputError(f"--tile_size {','.join(map(str, tile))}: give one number or {rank} (one per spatial axis"
                         f"{', z,y,x' if rank == 3 else ''}) for this {rank}-D model")
    if rank == 3 and not isinstance(tile, tuple):
        tile = (tile,) * 3
    return resolve_tile_size(tile, meta.size_factor)


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
    labels: str | None = None  # instance labels (--instances)

    def todo(self, overwrite: bool) -> dict[str, str]:
        """Outputs to (re)write: all with ``overwrite``, else those that do not exist yet."""
        wanted = {"mask": self.mask, "probabilities": self.probabilities, "overlay": self.overlay,
                  "labels": self.labels}
        return {k: p for k, p in wanted.items() if p is not None and (overwrite or not os.path.exists(p))}


def output_paths(name: str, settings: Settings) -> OutputPaths:
    folder, base, ext = settings.output_folder, input_stem(name), os.path.splitext(name)[1]
    if settings.output_format == "zarr":
        mask = os.path.join(folder, base + ".zarr")
    elif ext.lower() in build_volume.CONTAINER_EXTENSIONS:  # a .zarr / .h5 volume: a TIFF stack
        mask = os.path.join(folder, base + ".tif")
    else:
        mask = os.path.join(folder, base + ".png" if ext.lower() in LOSSY_EXTENSIONS else name)
    probs_ext = ".zarr" if settings.output_format == "zarr" else ".tif"
    return OutputPaths(
        mask=mask,
        probabilities=(os.path.join(folder, PROBABILITIES_FOLDER, base + probs_ext)
                       if settings.save_probabilities else None),
        overlay=os.path.join(folder, OVERLAYS_FOLDER, base + ".png") if settings.overlay else None,
        labels=(os.path.join(folder, LABELS_FOLDER, base + (".zarr" if settings.output_format == "zarr" else ".tif"))
                if settings.instances is not None else None),
    )
