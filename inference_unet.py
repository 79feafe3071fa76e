"""Stage 3: segment a folder of images with a trained SavedModel -- any image size, tiled exactly.

    python inference_unet.py --saved_model_filepath RUN/saved_model --image_folder IMAGES \\
        --output_folder MASKS [--image_format tif]

The command line only: flags, then :func:`segkit.inference.folder.segment_folder`. Channels, classes,
normalization, size factor and halo come from the SavedModel's metadata. Outputs, tiling, out-of-core
images, restarts and sharding: README.md, "Stage 3". The names below are re-exported for scripts and
tests that use ``inference_unet.X``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from segkit import cliutil, model_metadata, tfquiet
from segkit.cliutil import InputError
from segkit.inference.folder import OVERLAY_MAX_SIDE, Summary, confusion_from_files, predict_image, segment_folder, write_overlay
from segkit.inference.predictor import D4, SavedModelPredictor, with_tta
from segkit.inference.regions import MAX_BLOCK_BYTES, LazyHWC, Source, open_any, open_lazy, open_source, opened, working_set_bytes
from segkit.inference.settings import (
    BORDERS,
    DEFAULT_BORDER,
    DEFAULT_MEMORY_LIMIT_MB,
    DEFAULT_TILE_SIZE,
    DEFAULT_VOLUME_TILE_SIZE,
    OUTPUT_FORMATS,
    PROBABILITY_DTYPES,
    OutputPaths,
    Settings,
    output_paths,
    pair_masks,
    resolve_halo,
    resolve_mask_map,
    resolve_settings,
    resolve_shard,
    resolve_tile_size,
    shard_names,
)
from segkit.inference.writers import atomic_dir

__all__ = [
    "BORDERS", "D4", "DEFAULT_BORDER", "DEFAULT_MEMORY_LIMIT_MB", "DEFAULT_TILE_SIZE", "EXIT_IMAGES_FAILED", "InputError",
    "LazyHWC",
    "MAX_BLOCK_BYTES", "OUTPUT_FORMATS", "OVERLAY_MAX_SIDE", "OutputPaths", "PROBABILITY_DTYPES",
    "SavedModelPredictor", "Settings", "Source", "Summary", "atomic_dir", "build_parser", "check_original_flags",
    "confusion_from_files",
    "main", "open_any", "open_lazy", "open_source", "opened", "output_paths", "pair_masks", "predict_image",
    "resolve_halo", "resolve_mask_map", "resolve_settings", "resolve_shard", "resolve_tile_size",
    "segment_folder", "shard_names", "with_tta", "working_set_bytes", "write_overlay",
]

EXIT_IMAGES_FAILED = 1


# --- command line ------------------------------------------------------------------------------


def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saved_model_filepath", default=None,
                   help="required: the saved_model/ folder train_unet.py wrote (the original's --checkpoint_filepath)")
    p.add_argument("--image_folder", required=True, help="folder of images to segment")
    p.add_argument("--output_folder", required=True, help="where masks (and the extras) go")
    p.add_argument("--image_format", default="tif", help="file extension of the images (tif also matches tiff)")
    p.add_argument("--tile_size", default=None,
                   help=f"zone of responsibility per tile, in pixels (the tile adds the halo on interior sides): one "
                        f"number, or z,y,x for volume models; rounded up to a multiple of the size factor (and of 16 "
                        f"in y, x). Changes speed and memory, not the result. Default {DEFAULT_TILE_SIZE}, volume "
                        f"models {DEFAULT_VOLUME_TILE_SIZE} per axis")
    p.add_argument("--halo", default="exact",
                   help="context around each zone: 'exact' = the model's theoretical receptive-field radius (tiled == "
                        "whole-image prediction), 'erf' = the measured effective radius (faster, near-identical), or pixels")
    p.add_argument("--border", choices=BORDERS, default=DEFAULT_BORDER,
                   help="beyond the image border: 'zero' = the original's whole-image prediction (reflect-pad to the "
                        "size factor at the end of each axis, the network's zero padding beyond; tiles add the halo "
                        "on interior edges only), 'mirror' = mirror-extended context on every side")
    p.add_argument("--batch_size", type=int, default=1, help="tiles per forward pass")
    p.add_argument("--save_probabilities", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="1 = also write per-class probabilities to probabilities/")
    p.add_argument("--probability_dtype", choices=PROBABILITY_DTYPES, default="float32",
                   help="float32, or uint8 = round(255 * p)")
    p.add_argument("--tta", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="1 = average the 8 flip/rot90 predictions (8x slower)")
    p.add_argument("--mask_folder", default=None,
                   help="ground-truth masks (paired by file stem): write metrics.csv (default: no scoring)")
    p.add_argument("--mask_map", default=None,
                   help="ground-truth value -> class before scoring, e.g. 255:1 (build_lmdb.py's syntax); default: "
                        "the map the model's training databases were built with; none = score values as they are")
    p.add_argument("--overlay", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="1 = write overlays/STEM.png, the mask over the image")
    p.add_argument("--shard_index", type=int, default=None,
                   help="process every shard_count-th image, starting at this one (default: the Slurm "
                        "array task, SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0); with --output_format zarr, "
                        "its contiguous share of the blocks of every image instead")
    p.add_argument("--shard_count", type=int, default=None,
                   help="number of shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--finalize", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="1 = the closing step of OME-Zarr outputs split into blocks by shards: check every block is "
                        "done (else name the missing ones and their shards, exit 1), write the multiscale levels, "
                        "instance labels, metrics (README: One volume across a cluster)")
    p.add_argument("--overwrite", type=cliutil.str2bool, nargs="?", const=True, default=False, metavar="0/1",
                   help="1 = redo images whose outputs exist; 0 = skip them (restart after a failure)")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="tif",
                   help="tif = masks under the image's file name; zarr = OME-Zarr folders")
    p.add_argument("--memory_limit_mb", type=float, default=DEFAULT_MEMORY_LIMIT_MB,
                   help="images whose float32 working set (H*W*(channels+classes)*4 bytes; volumes Z*Y*X*...) exceeds "
                        "this, or a quarter of the available memory, are processed out of core (TIFF, zarr, HDF5)")
    p.add_argument("--image_dataset", default=None,
                   help="dataset inside .zarr / .h5 volumes (default: 'raw' if present, else the only one or the "
                        "OME-Zarr image), as build_lmdb.py")
    p.add_argument("--mask_dataset", default=None,
                   help="the same for --mask_folder volumes (default: 'labels' if present)")
    p.add_argument("--slice_wise", type=cliutil.str2bool, nargs="?", const=True, default=None, metavar="0/1",
                   help="1 = a 2-D model segments volumes section by section (default: automatic for a 2-D model "
                        "given volumes; 0 refuses them)")
    p.add_argument("--instances", type=cliutil.str2bool, nargs="?", const=True, default=None, metavar="0/1",
                   help="1 = also write instance labels (labels/STEM.tif, or .zarr) and objects.csv (one row per "
                        "object: size, centroid, bounding box, mean intensity); with --mask_folder holding instance "
                        "labels, instance_metrics.csv (AP, F1, PQ at IoU 0.5..0.9, adapted Rand, VI). Default: on "
                        "for models trained on instance targets (build_lmdb.py --mask_type instances); 0 = off")
    p.add_argument("--min_object_size", type=int, default=None,
                   help="--instances: seeds (and seedless objects) smaller than this many pixels are dropped "
                        "(default: the model's metadata)")
    p.add_argument("--seed_threshold", type=float, default=None,
                   help="--instances: a pixel seeds an object where p(interior) > this (boundary target: "
                        "1 - p(boundary)); raise it to split touching objects (default: the model's metadata)")
    p.add_argument("--foreground_threshold", type=float, default=None,
                   help="--instances, three_class target: seeds grow over pixels where p(interior) + p(boundary) > "
                        "this; lower it for larger objects (default: the model's metadata)")
    p.add_argument("--seed_dynamic", type=float, default=None,
                   help="--instances, distance target: one seed per peak of the depth that rises at least this much "
                        "(0-1) above the saddle to a higher peak, so touching objects get a seed each; 0 = one seed "
                        "per component of depth > --seed_threshold (default: the model's metadata)")
    p.add_argument("--seam_halo", type=int, default=None,
                   help="--instances out of core: context in pixels around each zone when labelling zone by zone; "
                        "objects up to this size get one id across seams (default: the model's metadata)")
    p.add_argument("--object_diameter", default="auto",
                   help="--instances, 2-D models: auto = where an image's median object is over 1.3x smaller than "
                        "the training objects (their diameter is in the model's metadata), label it again enlarged "
                        "to their size; a number = your objects' diameter in pixels (the image is resized once by "
                        "training diameter / this); 0 = label at the image's own scale. Images in memory only")
    p.add_argument("--number_classes", type=int, default=None,
                   help="the original's flag: checked against the model's metadata (default: the model's)")
    p.add_argument("--number_channels", type=int, default=None,
                   help="the original's flag: checked against the model's metadata (default: the model's)")
    p.add_argument("--checkpoint_filepath", default=None, help=argparse.SUPPRESS)  # the original's; see _main
    cliutil.add_verbose_flag(p)
    return p


def check_original_flags(saved_model_filepath: str | None, checkpoint_filepath: str | None,
                         number_classes: int | None, number_channels: int | None) -> None:
    """The original toolkit's inference flags: ``--checkpoint_filepath`` points to ``--saved_model_filepath``;
    ``--number_classes`` / ``--number_channels`` must agree with the SavedModel's metadata. Raises InputError."""
    if checkpoint_filepath is not None:
        raise InputError(f"--checkpoint_filepath {checkpoint_filepath}: this toolkit loads the exported model; pass "
                         "--saved_model_filepath OUTPUT_DIR/saved_model (the folder train_unet.py wrote) instead")
    if saved_model_filepath is None:
        raise InputError("--saved_model_filepath is required: the saved_model/ folder train_unet.py wrote")
    if number_classes is None and number_channels is None:
        return
    try:
        meta = model_metadata.load(saved_model_filepath)
    except ValueError as exc:
        raise InputError(f"--saved_model_filepath: {exc}") from None
    for flag, given, known in (("--number_classes", number_classes, meta.number_classes),
                               ("--number_channels", number_channels, meta.channels)):
        if given is not None and given != known:
            raise InputError(f"{flag} {given} does not match the model in {saved_model_filepath}, which has {known}; "
                             f"drop {flag} (the model knows it) or pass the model trained for {given}")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args)
    verbose = options.pop("verbose")
    cliutil.setup_logging(verbose)
    tfquiet.configure(verbose)
    check_original_flags(options["saved_model_filepath"], options.pop("checkpoint_filepath"),
                         options.pop("number_classes"), options.pop("number_channels"))
    summary = segment_folder(**options)
    return EXIT_IMAGES_FAILED if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
