"""The metadata a trained SavedModel carries, so inference needs nothing else.

Written by ``train_unet.py`` into ``saved_model/assets/`` (a tracked
``tf.saved_model.Asset``, so copies of the folder keep it) and read here
without importing TensorFlow. Keys (all required unless noted)::

    format              "segmentation-savedmodel"
    format_version      1
    model               registry name, e.g. "unet", "fcdensenet56"
    model_config        the model's get_config()-style dict
    channels            input channels C
    number_classes      output classes K
    image_dtype         pixel type of the training images (informational)
    normalization       {"method": "zscore_per_channel_whole_image", "epsilon": 1e-6}
    size_factor         input H and W must be multiples of this
    receptive_field_radius            theoretical radius in pixels (exact halo)
    effective_receptive_field_radius  measured by a gradient probe (pixels)
    training_tile_size  [H, W] of the training crops
    final_metrics       best test-pass metrics (dict)
    mask_map            optional: {"VALUE": CLASS} the training masks were remapped with
                        (build_lmdb.py --mask_map; {} none, null when the databases disagreed);
                        inference applies it to --mask_folder ground truth unless told otherwise
    signature           {"name": "serving_default", "input": "images", "output": "probabilities"}

The serving signature takes float32 NHWC images, already normalized with the
method above (statistics of the WHOLE image, see ``image_io``), with H and W
multiples of ``size_factor``, and returns float32 NHWC per-class probabilities.
"""
from __future__ import annotations

import json
import os
from typing import Any

FORMAT = "segmentation-savedmodel"
FORMAT_VERSION = 1
METADATA_FILENAME = "segmentation_metadata.json"
SIGNATURE = {"name": "serving_default", "input": "images", "output": "probabilities"}
REQUIRED_KEYS = ("model", "channels", "number_classes", "normalization", "size_factor", "receptive_field_radius")


def metadata_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, "assets", METADATA_FILENAME)


def read_metadata(saved_model_dir: str) -> dict[str, Any]:
    """Read and check a SavedModel's metadata; raises ValueError with a user-facing message."""
    if not os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb")):
        raise ValueError(f"{saved_model_dir}: not a SavedModel folder (no saved_model.pb); pass the saved_model/ folder that train_unet.py wrote")
    path = metadata_path(saved_model_dir)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"{saved_model_dir}: SavedModel has no {METADATA_FILENAME}; export it with train_unet.py of this toolkit") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata is not valid JSON ({exc}); re-export the model") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported metadata format {meta.get('format')!r} v{meta.get('format_version')}; re-export the model")
    check_required(meta, f"{path}: ", "; re-export the model")
    return meta


def check_required(meta: dict[str, Any], where: str = "", fix: str = "") -> None:
    """ValueError naming the REQUIRED_KEYS that ``meta`` lacks."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{where}metadata lacks {', '.join(missing)}{fix}")


def make_metadata(**fields: Any) -> dict[str, Any]:
    """A complete metadata dict: ``fields`` plus format, version and signature; checks the required keys.

    Extra keys are kept (readers ignore what they do not know).
    """
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "signature": dict(SIGNATURE), **fields}
    check_required(meta)
    return meta
