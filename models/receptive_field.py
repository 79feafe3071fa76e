"""Theoretical receptive field of a Keras functional model, by walking its layer graph.

For every tensor we track, in input pixels, the jump ``J`` (input pixels per
feature-map pixel) and the offsets ``[lo, hi]`` such that feature-map pixel
``p`` depends on input pixels ``p*J + lo .. p*J + hi`` along each spatial
axis (rows and columns behave alike for square kernels). The model's
receptive-field radius is ``max(-lo, hi)`` at the output: the farthest input
pixel, in the worst case over output positions, that can change an output
pixel. This is exact for the layer types below (TensorFlow 'same' padding:
``pad_before = max(k_eff - stride, 0) // 2``); unknown spatial layers raise.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

# Layers that act on each pixel independently (no spatial extent).
_POINTWISE = {
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "BatchNormalization", "LayerNormalization",
    "GroupNormalization", "FusedBatchNormalization", "Dropout", "GaussianNoise", "GaussianDropout", "SpatialDropout2D",
    "SpatialDropout3D", "Identity",
    "Rescaling", "Normalization", "InputLayer",
}
_MERGE = {"Concatenate", "Add", "Multiply", "Average", "Maximum", "Minimum", "Subtract"}


@dataclass(frozen=True)
class Extent:
    jump: Fraction
    lo: Fraction
    hi: Fraction

    @property
    def radius(self) -> int:
        return int(max(-self.lo, self.hi))


def _pair(value, axis: int | None = None) -> int:
    """The size along spatial ``axis``; with ``axis`` None (2-D models) the sizes must be equal."""
    values = value if isinstance(value, (tuple, list)) else (value, value)
    if axis is not None:
        return int(values[axis]) if isinstance(value, (tuple, list)) else int(value)
    if values[0] != values[1]:
        raise ValueError(f"non-square kernel/stride {values} is not supported by the receptive-field walk")
    return int(values[0])


def _window(e: Extent, kernel: int, stride: int, dilation: int, padding: str) -> Extent:
    """Convolution or pooling window: output p reads input p*s - pad_before + t*d, t in [0, k)."""
    k_eff = dilation * (kernel - 1) + 1
    if padding == "same":
        pad_before = max(k_eff - stride, 0) // 2
    elif kernel == 1 or (padding == "valid" and kernel == stride):
        pad_before = 0  # pooling-like tiling: no shift of the grid
    else:
        raise ValueError("only 'same' padding (or valid pooling with kernel == stride) is supported")
    return Extent(e.jump * stride, e.lo - pad_before * e.jump, e.hi + (k_eff - 1 - pad_before) * e.jump)


def _transposed(e: Extent, kernel: int, stride: int, padding: str) -> Extent:
    """Transposed conv ('same'): output x reads inputs i with x = i*s - pad_before + t, t in [0, k)."""
    if padding != "same":
        raise ValueError("only 'same' padding is supported for transposed convolutions")
    pad_before = max(kernel - stride, 0) // 2
    jump = e.jump / stride
    return Extent(jump, e.lo + (pad_before - kernel + 1) * jump, e.hi + pad_before * jump)


def _layer_extent(layer, inputs: list[Extent], axis: int | None = None) -> Extent:
    """``layer``'s output extent along spatial ``axis`` (None: 2-D layers with square windows)."""
    kind = type(layer).__name__
    cfg = layer.get_config()

    def size(key: str) -> int:
        return _pair(cfg[key], axis)

    if kind in _POINTWISE:
        return inputs[0]
    if kind in _MERGE:
        if len({e.jump for e in inputs}) != 1:
            raise ValueError(f"{layer.name}: merging tensors of different resolutions")
        return Extent(inputs[0].jump, min(e.lo for e in inputs), max(e.hi for e in inputs))
    if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv3D"):
        return _window(inputs[0], size("kernel_size"), size("strides"), size("dilation_rate"), cfg["padding"])
    if kind in ("MaxPooling2D", "AveragePooling2D", "MaxPooling3D", "AveragePooling3D"):
        return _window(inputs[0], size("pool_size"), size("strides"), 1, cfg["padding"])
    if kind in ("Conv2DTranspose", "Conv3DTranspose"):
        if size("dilation_rate") != 1:
            raise ValueError(f"{layer.name}: dilated transposed convolutions are not supported")
        return _transposed(inputs[0], size("kernel_size"), size("strides"), cfg["padding"])
    if kind in ("UpSampling2D", "UpSampling3D") and cfg.get("interpolation", "nearest") == "nearest":
        factor = size("size")
        jump = inputs[0].jump / factor
        return Extent(jump, inputs[0].lo - (factor - 1) * jump, inputs[0].hi)
    raise ValueError(f"{layer.name}: layer type {kind} is not known to the receptive-field walk")


def graph_extent(model, axis: int | None = None) -> Extent:
    """Walk a single-input, single-output functional model along spatial ``axis`` (None: a 2-D model with
    square windows); every layer used once."""
    known = {id(model.inputs[0]): Extent(Fraction(1), Fraction(0), Fraction(0))}
    pending = [op for op in model.operations if type(op).__name__ != "InputLayer"]
    while pending:
        progressed = False
        for op in list(pending):
            op_inputs = op.input if isinstance(op.input, (list, tuple)) else [op.input]
            if all(id(t) in known for t in op_inputs):
                known[id(op.output)] = _layer_extent(op, [known[id(t)] for t in op_inputs], axis)
                pending.remove(op)
                progressed = True
        if not progressed:
            raise ValueError("cannot order the model's layers (shared layers or several inputs?)")
    out = known[id(model.outputs[0])]
    if out.jump != 1:
        raise ValueError(f"model output is not at input resolution (jump {out.jump})")
    return out


def receptive_field_radius(model) -> int:
    """Theoretical receptive-field radius (pixels) of a functional model's output."""
    return graph_extent(model).radius


def receptive_field_radii(model) -> tuple[int, ...]:
    """Theoretical receptive-field radius along each spatial axis (z, y, x for a volume model)."""
    rank = len(model.input_shape) - 2
    return tuple(graph_extent(model, axis).radius for axis in range(rank))


def effective_receptive_field(model, *, size_factor: int, theoretical_radius: int, fraction: float = 0.99,
                              max_probe: int = 512, samples: int = 3, seed: int = 0) -> dict:
    """Measure the effective receptive field with a gradient probe (model in inference mode).

    Input: ``samples`` standard-normal noise images (what normalized images look like), square,
    ``2 * theoretical_radius + 1`` rounded up to the size factor but at most ``max_probe`` (memory:
    callers pass about the edge of one training batch's pixels). The probe differentiates the centre
    pixel's logit margin ``logit_0 - mean(other logits)`` (for two classes: the decision itself) and
    sums the gradient magnitude over channels and samples. The radius is the smallest Chebyshev distance from the
    centre whose square holds ``fraction`` of the total magnitude. ``truncated`` is True when the probe
    was smaller than the theoretical field (gradient beyond it is not seen).

    Returns ``{"radius": raw radius, "radius_rounded": rounded up to the size factor (at least one
    factor), "fraction", "probe_size", "truncated", "degenerate"}``; degenerate (no gradient reached the
    input at all) reports the theoretical radius.
    """
    import numpy as np
    import tensorflow as tf

    def round_up(v: int) -> int:
        return -(-int(v) // size_factor) * size_factor

    full = round_up(2 * theoretical_radius + 1)
    size = max(size_factor, min(full, max_probe // size_factor * size_factor))
    channels, classes = int(model.input_shape[-1]), int(model.output_shape[-1])
    rng = np.random.default_rng(seed)
    centre = size // 2
    margin = np.full(classes, -1.0 / max(classes - 1, 1), np.float32)
    margin[0] = 1.0
    magnitude = np.zeros((size, size))
    for _ in range(samples):  # one noise image per pass (memory); dead ReLUs at one input are averaged out
        images = tf.Variable(rng.standard_normal((1, size, size, channels)).astype(np.float32))
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=False), tf.float32)
            target = tf.reduce_sum(logits[0, centre, centre, :] * margin)
        magnitude += np.abs(tape.gradient(target, images).numpy()[0]).sum(axis=-1)
    if not magnitude.any():  # no gradient at all: report the theoretical field
        return {"radius": theoretical_radius, "radius_rounded": round_up(theoretical_radius), "fraction": fraction,
                "probe_size": size, "truncated": size < full, "degenerate": True}
    yy, xx = np.indices(magnitude.shape)
    distance = np.maximum(np.abs(yy - centre), np.abs(xx - centre)).ravel()
    mass = np.cumsum(np.bincount(distance, weights=magnitude.ravel()))
    radius = int(np.searchsorted(mass, fraction * mass[-1]))
    return {"radius": radius, "radius_rounded": round_up(max(radius, 1)), "fraction": fraction,
            "probe_size": size, "truncated": size < full, "degenerate": False}
