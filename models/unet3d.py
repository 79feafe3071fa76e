"""3D UNet whose pooling and kernels follow the voxel size (nnU-Net's rule), channels-last NDHWC.

Input ``(None, None, None, C)`` float32 (z, y, x, channels), output logits of the same spatial shape
(float32, also under a mixed-precision policy). Per level: two convolutions (optionally BatchNorm) with
ReLU, max pooling by the level's ``pool_sizes``; up: a transposed convolution of kernel = stride = that
pool size, concatenation with the skip, two convolutions. :func:`plan` derives the per-level pool and
kernel sizes from ``voxel_size`` (z, y, x): an axis is pooled, and mixed by a 3-wide kernel, only while
its current spacing is within ``ANISOTROPY_RATIO`` of the finest, e.g. (1, 2, 2) for 4x4x40 nm. The
plan is stored in the config, so a saved config rebuilds the exact architecture. README.md, "Stage 2" (Volumes).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

ANISOTROPY_RATIO = 2.0  # an axis joins pooling / 3-wide kernels once its spacing is within 2x of the finest
DEFAULTS: dict[str, Any] = {"depth": 4, "base_filters": 8, "batch_norm": True, "dropout": 0.0,
                            "voxel_size": [1.0, 1.0, 1.0], "pool_sizes": None, "kernel_sizes": None}


def plan(voxel_size: Sequence[float], depth: int) -> tuple[list[list[int]], list[list[int]]]:
    """(pool_sizes per level, kernel_sizes per level and the bottleneck) for spacing ``voxel_size`` (z, y, x)."""
    spacing = [float(v) for v in voxel_size]
    pools, kernels = [], []
    for _ in range(int(depth) + 1):
        finest = min(spacing)
        fine = [s <= ANISOTROPY_RATIO * finest * (1 + 1e-9) for s in spacing]
        kernels.append([3 if f else 1 for f in fine])
        pools.append([2 if f else 1 for f in fine])
        spacing = [s * p for s, p in zip(spacing, pools[-1])]
    return pools[:-1], kernels


def size_factors(pool_sizes: Sequence[Sequence[int]], **_: Any) -> tuple[int, ...]:
    """Per-axis (z, y, x) size factor: the product of the pool sizes along each axis."""
    return tuple(math.prod(int(level[a]) for level in pool_sizes) for a in range(3))


def normalized(config: dict[str, Any]) -> dict[str, Any]:
    """Typed config with the plan filled in from the voxel size where not given; ValueError when invalid."""
    full = {"depth": int(config["depth"]), "base_filters": int(config["base_filters"]),
            "batch_norm": bool(config["batch_norm"]), "dropout": float(config["dropout"]),
            "voxel_size": [float(v) for v in config["voxel_size"]]}
    if len(full["voxel_size"]) != 3 or not all(math.isfinite(v) and v > 0 for v in full["voxel_size"]):
        raise ValueError(f"unet3d voxel_size must be three positive numbers (z, y, x), got {config['voxel_size']}")
    if not 1 <= full["depth"] <= 8:
        raise ValueError(f"unet3d depth must be in [1, 8], got {full['depth']}")
    pools, kernels = plan(full["voxel_size"], full["depth"])
    full["pool_sizes"] = _sizes(config.get("pool_sizes") or pools, full["depth"], (1, 2), "pool_sizes")
    full["kernel_sizes"] = _sizes(config.get("kernel_sizes") or kernels, full["depth"] + 1, (1, 3), "kernel_sizes")
    if full["base_filters"] < 1:
        raise ValueError(f"unet3d base_filters must be >= 1, got {full['base_filters']}")
    if not 0.0 <= full["dropout"] < 1.0:
        raise ValueError(f"unet3d dropout must be in [0, 1), got {full['dropout']}")
    return full


def _sizes(value, levels: int, allowed: tuple[int, ...], name: str) -> list[list[int]]:
    sizes = [[int(v) for v in level] for level in value]
    if len(sizes) != levels or any(len(level) != 3 or set(level) - set(allowed) for level in sizes):
        raise ValueError(f"unet3d {name} must be {levels} triples of {' or '.join(map(str, allowed))}, got {value}")
    return sizes


def build(channels: int, number_classes: int, *, depth: int, base_filters: int, batch_norm: bool, dropout: float,
          voxel_size: Sequence[float], pool_sizes, kernel_sizes, name: str = "unet3d"):
    """Build the 3D UNet as a Keras functional model (images_ndhwc -> logits_ndhwc)."""
    import keras
    from keras import layers

    from .layers import FusedBatchNormalization

    def conv_block(x, filters: int, kernel: Sequence[int], prefix: str):
        for i in (1, 2):
            x = layers.Conv3D(filters, tuple(kernel), padding="same", use_bias=not batch_norm,
                              kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
            if batch_norm:
                x = FusedBatchNormalization(name=f"{prefix}_bn{i}")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        return x

    inputs = keras.Input(shape=(None, None, None, channels), name="images")
    x, skips = inputs, []
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, kernel_sizes[level], f"down{level}")
        skips.append(x)
        x = layers.MaxPooling3D(tuple(pool_sizes[level]), name=f"down{level}_pool")(x)
    x = conv_block(x, base_filters * 2**depth, kernel_sizes[depth], "bottleneck")
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        pool = tuple(pool_sizes[level])
        x = layers.Conv3DTranspose(base_filters * 2**level, pool, strides=pool, padding="same",
                                   kernel_initializer="he_normal", name=f"up{level}_upconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = conv_block(x, base_filters * 2**level, kernel_sizes[level], f"up{level}")
    logits = layers.Conv3D(number_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
