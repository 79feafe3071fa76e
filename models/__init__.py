"""Model registry: UNet and FC-DenseNet 56/67/103 (2D) and UNet3D (volumes) by name. No file I/O here.

    build_model(name, channels, number_classes, **config) -> keras.Model
        NHWC float32 images (any H, W that are multiples of the size factor)
        -> NHWC logits, float32 also under a mixed-precision policy.
    model_config(name, **config)        -> the full config (defaults filled in, validated);
        build_model(name, C, K, **model_config(name, **cfg)) rebuilds the same architecture.
    size_factor(name, **config)         -> input H and W must be multiples of this.
    receptive_field_radius(name, **config)
        -> theoretical radius in pixels, from a walk of the built layer graph
           (see ``models.receptive_field``); cached per config.
    spatial_rank(name) -> 2, or 3 for the volume models (VOLUME_MODEL_NAMES: NDHWC in and out).
    size_factors(name, **config) / receptive_field_radii(name, **config) -> one value per spatial axis
        ((z, y, x) for volumes); size_factor / receptive_field_radius give their maximum.

Configs are plain JSON-able dicts, so they go into config.json and the
SavedModel metadata unchanged. Keras/TensorFlow are imported only when a
model is built, so size factors and configs are available to argument
validation before TensorFlow loads.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from . import fcdensenet, unet, unet3d

MODEL_NAMES = ("unet", "fcdensenet56", "fcdensenet67", "fcdensenet103")  # 2-D: NHWC
VOLUME_MODEL_NAMES = ("unet3d",)  # 3-D: NDHWC
ALL_MODEL_NAMES = MODEL_NAMES + VOLUME_MODEL_NAMES
DEFAULT_MODEL = "unet"
DEFAULT_VOLUME_MODEL = "unet3d"


def _defaults(name: str) -> dict[str, Any]:
    if name == "unet":
        return dict(unet.DEFAULTS)
    if name == "unet3d":
        return dict(unet3d.DEFAULTS)
    if name in fcdensenet.VARIANTS:
        return fcdensenet.defaults(name)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALL_MODEL_NAMES)}")


def spatial_rank(name: str) -> int:
    """Spatial axes of the model's images: 3 for VOLUME_MODEL_NAMES, else 2."""
    _defaults(name)  # unknown names raise
    return 3 if name in VOLUME_MODEL_NAMES else 2


def model_config(name: str, **config: Any) -> dict[str, Any]:
    """Defaults of ``name`` updated with ``config``; unknown keys or bad values raise ValueError."""
    full = _defaults(name)
    unknown = sorted(set(config) - set(full))
    if unknown:
        raise ValueError(f"model {name} has no setting(s) {', '.join(unknown)}; known: {', '.join(sorted(full))}")
    full.update({k: v for k, v in config.items() if v is not None})
    if name == "unet":
        full = {"depth": int(full["depth"]), "base_filters": int(full["base_filters"]),
                "batch_norm": bool(full["batch_norm"]), "dropout": float(full["dropout"])}
        unet.check_config(**full)
    elif name == "unet3d":
        full = unet3d.normalized(full)
    else:
        full["layers_per_block"] = [int(n) for n in full["layers_per_block"]]
        for key in ("growth_rate", "first_filters"):
            full[key] = int(full[key])
        for key in ("dropout", "weight_decay", "bn_momentum"):
            full[key] = float(full[key])
        fcdensenet.check_config(**full)
    return full


def size_factors(name: str, **config: Any) -> tuple[int, ...]:
    """Input size along each spatial axis must be a multiple of this ((z, y, x) for volumes)."""
    full = model_config(name, **config)
    if name == "unet3d":
        return unet3d.size_factors(**full)
    factor = unet.size_factor(**full) if name == "unet" else fcdensenet.size_factor(**full)
    return (factor, factor)


def size_factor(name: str, **config: Any) -> int:
    """The largest per-axis size factor (a multiple of every axis's: they are powers of 2)."""
    return max(size_factors(name, **config))


def build_model(name: str, channels: int, number_classes: int, **config: Any):
    """Build a fresh (randomly initialized) model; see the module docstring."""
    if int(channels) < 1 or int(number_classes) < 2:
        raise ValueError(f"need channels >= 1 and number_classes >= 2, got {channels}, {number_classes}")
    full = model_config(name, **config)
    module = {"unet": unet, "unet3d": unet3d}.get(name, fcdensenet)
    return module.build(int(channels), int(number_classes), name=name, **full)


@functools.lru_cache(maxsize=32)
def _radii_cached(name: str, config_json: str) -> tuple[int, ...]:
    from .receptive_field import receptive_field_radii as walk

    # Channels and classes do not change the spatial graph; build the smallest model.
    return walk(build_model(name, 1, 2, **json.loads(config_json)))


def receptive_field_radii(name: str, **config: Any) -> tuple[int, ...]:
    """Theoretical receptive-field radius along each spatial axis ((z, y, x) for volumes), in pixels."""
    return _radii_cached(name, json.dumps(model_config(name, **config), sort_keys=True))


def receptive_field_radius(name: str, **config: Any) -> int:
    """Theoretical receptive-field radius in pixels (exact worst case over output positions and axes)."""
    return max(receptive_field_radii(name, **config))
