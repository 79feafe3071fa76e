"""FC-DenseNet ("The One Hundred Layers Tiramisu", Jegou et al. 2017), channels-last.

Input ``(None, None, C)`` NHWC float32, output NHWC logits (float32, also under
a mixed-precision policy). H and W must be multiples of 32 (five poolings).

Architecture as in the paper (Table 1) and its reference implementation:

* first layer: 3x3 convolution, 48 filters (no BN/ReLU before it);
* dense layer: BN - ReLU - 3x3 conv (growth-rate filters) - Dropout(0.2);
  a dense block concatenates each layer's output to its input;
* down path: dense block, skip = block output (input + new maps), then
  transition down: BN - ReLU - 1x1 conv (same filters) - Dropout(0.2) - 2x2 max pool;
* bottleneck dense block; up path: transition up = 3x3 transposed conv,
  stride 2, applied to ONLY the new feature maps of the previous block
  (filters = their count), concatenated with the skip, then a dense block;
* last layer: 1x1 convolution to the classes on the full final stack.

BatchNorm momentum 0.9 (Keras: moving = 0.9 * moving + 0.1 * batch), L2 weight
decay 1e-4 on every kernel (Keras ``L2(1e-4)`` = 1e-4 * sum(w**2), the
reference's ``weight_decay * l2``), He-uniform initialization.
"""
from __future__ import annotations

from typing import Any, Sequence

N_POOL = 5

VARIANTS: dict[str, dict[str, Any]] = {
    "fcdensenet56": {"layers_per_block": [4] * 11, "growth_rate": 12},
    "fcdensenet67": {"layers_per_block": [5] * 11, "growth_rate": 16},
    "fcdensenet103": {"layers_per_block": [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4], "growth_rate": 16},
}
COMMON_DEFAULTS: dict[str, Any] = {"first_filters": 48, "dropout": 0.2, "weight_decay": 1e-4, "bn_momentum": 0.9}


def defaults(variant: str) -> dict[str, Any]:
    return {**VARIANTS[variant], **COMMON_DEFAULTS}


def size_factor(**_: Any) -> int:
    return 2**N_POOL


def check_config(layers_per_block: Sequence[int], growth_rate: int, first_filters: int, dropout: float,
                 weight_decay: float, bn_momentum: float) -> None:
    if len(layers_per_block) != 2 * N_POOL + 1 or min(layers_per_block) < 1:
        raise ValueError(f"layers_per_block needs {2 * N_POOL + 1} positive counts (down, bottleneck, up), got "
                         f"{list(layers_per_block)}")
    if growth_rate < 1 or first_filters < 1:
        raise ValueError(f"growth_rate and first_filters must be >= 1, got {growth_rate}, {first_filters}")
    if not 0.0 <= dropout < 1.0 or weight_decay < 0 or not 0.0 < bn_momentum < 1.0:
        raise ValueError(f"need 0 <= dropout < 1, weight_decay >= 0, 0 < bn_momentum < 1; got {dropout}, "
                         f"{weight_decay}, {bn_momentum}")


class _Builder:
    """Layer helpers sharing the regularization settings; names follow the paper's blocks."""

    def __init__(self, growth_rate: int, dropout: float, weight_decay: float, bn_momentum: float):
        import keras

        from .layers import FusedBatchNormalization

        self.keras = keras
        self.batch_norm = FusedBatchNormalization
        self.layers = keras.layers
        self.growth_rate = growth_rate
        self.dropout = dropout
        self.regularizer = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
        self.bn_momentum = bn_momentum

    def conv(self, x, filters: int, kernel: int, name: str, **kwargs):
        return self.layers.Conv2D(filters, kernel, padding="same", kernel_initializer="he_uniform",
                                  kernel_regularizer=self.regularizer, name=name, **kwargs)(x)

    def bn_relu_conv(self, x, filters: int, kernel: int, name: str):
        x = self.batch_norm(momentum=self.bn_momentum, name=f"{name}_bn")(x)
        x = self.layers.Activation("relu", name=f"{name}_relu")(x)
        x = self.conv(x, filters, kernel, f"{name}_conv")
        if self.dropout > 0:
            x = self.layers.Dropout(self.dropout, name=f"{name}_dropout")(x)
        return x

    def dense_block(self, stack, n_layers: int, name: str):
        """Return (stack + new maps, new maps only)."""
        new_maps = []
        for i in range(n_layers):
            layer = self.bn_relu_conv(stack, self.growth_rate, 3, f"{name}_layer{i}")
            new_maps.append(layer)
            stack = self.layers.Concatenate(name=f"{name}_concat{i}")([stack, layer])
        new = new_maps[0] if n_layers == 1 else self.layers.Concatenate(name=f"{name}_new")(new_maps)
        return stack, new

    def transition_down(self, x, filters: int, name: str):
        x = self.bn_relu_conv(x, filters, 1, name)
        return self.layers.MaxPooling2D(2, name=f"{name}_pool")(x)

    def transition_up(self, skip, new_maps, filters: int, name: str):
        x = self.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", kernel_initializer="he_uniform",
                                        kernel_regularizer=self.regularizer, name=f"{name}_upconv")(new_maps)
        return self.layers.Concatenate(name=f"{name}_concat")([x, skip])


def build(channels: int, number_classes: int, *, layers_per_block: Sequence[int], growth_rate: int,
          first_filters: int, dropout: float, weight_decay: float, bn_momentum: float, name: str = "fcdensenet"):
    """Build an FC-DenseNet as a Keras functional model (images_nhwc -> logits_nhwc)."""
    layers_per_block = [int(n) for n in layers_per_block]
    check_config(layers_per_block, growth_rate, first_filters, dropout, weight_decay, bn_momentum)
    b = _Builder(growth_rate, dropout, weight_decay, bn_momentum)

    inputs = b.keras.Input(shape=(None, None, channels), name="images")
    stack = b.conv(inputs, first_filters, 3, "first_conv")
    filters = first_filters
    skips = []
    for i in range(N_POOL):
        stack, _ = b.dense_block(stack, layers_per_block[i], f"down{i}")
        filters += growth_rate * layers_per_block[i]
        skips.append(stack)
        stack = b.transition_down(stack, filters, f"td{i}")
    _, new_maps = b.dense_block(stack, layers_per_block[N_POOL], "bottleneck")
    for i in range(N_POOL):
        kept = growth_rate * layers_per_block[N_POOL + i]
        stack = b.transition_up(skips[N_POOL - 1 - i], new_maps, kept, f"tu{i}")
        stack, new_maps = b.dense_block(stack, layers_per_block[N_POOL + 1 + i], f"up{i}")
    # float32 logits even under mixed_float16: the softmax/loss need the range.
    logits = b.conv(stack, number_classes, 1, "logits", dtype="float32")
    return b.keras.Model(inputs, logits, name=name)
