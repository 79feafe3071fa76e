"""UNet (Ronneberger et al. 2015) with same-padding convolutions, channels-last.

Input ``(None, None, C)`` NHWC float32, output NHWC logits (float32, also under
a mixed-precision policy). H and W must be multiples of ``2**depth``.

Per level: two 3x3 convolutions (optionally BatchNorm) with ReLU, 2x2 max
pooling down; 2x2 stride-2 transposed convolution up, concatenation with the
skip, two 3x3 convolutions. Filters double with each level from
``base_filters``. Optional dropout after the bottleneck (as in the paper).
Keras is imported inside the builder so the registry's arithmetic works
before TensorFlow is loaded.
"""
from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {"depth": 4, "base_filters": 8, "batch_norm": True, "dropout": 0.0}


def size_factor(depth: int, **_: Any) -> int:
    return 2 ** int(depth)


def check_config(depth: int, base_filters: int, batch_norm: bool, dropout: float) -> None:
    if not 1 <= int(depth) <= 8:
        raise ValueError(f"unet depth must be in [1, 8], got {depth}")
    if int(base_filters) < 1:
        raise ValueError(f"unet base_filters must be >= 1, got {base_filters}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"unet dropout must be in [0, 1), got {dropout}")


def build(channels: int, number_classes: int, *, depth: int, base_filters: int, batch_norm: bool,
          dropout: float, name: str = "unet"):
    """Build the UNet as a Keras functional model (images_nhwc -> logits_nhwc)."""
    import keras
    from keras import layers

    from .layers import FusedBatchNormalization

    check_config(depth, base_filters, batch_norm, dropout)

    def conv_block(x, filters: int, prefix: str):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                              kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
            if batch_norm:
                x = FusedBatchNormalization(name=f"{prefix}_bn{i}")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        return x

    inputs = keras.Input(shape=(None, None, channels), name="images")
    x = inputs
    skips = []
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = conv_block(x, base_filters * 2**depth, "bottleneck")
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same",
                                   kernel_initializer="he_normal", name=f"up{level}_upconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = conv_block(x, base_filters * 2**level, f"up{level}")
    # float32 logits even under mixed_float16: the softmax/loss need the range.
    logits = layers.Conv2D(number_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
