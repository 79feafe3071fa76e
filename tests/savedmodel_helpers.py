"""Small SavedModels for the inference tests, exported per ``model_metadata``'s contract.

Three families, each with a numpy twin for fast many-size sweeps of ``tiling.predict_tiled``:

* pointwise ("identity-like"): probabilities = softmax of a fixed per-pixel linear function
  of the input channels; receptive-field radius 0, so tiling must be exact to the bit.
* chain: a fixed stack of average-pool / 3x3 convolution (zero 'same' padding, tanh) /
  nearest upsample layers with known radius (:func:`chain_radius`); wrong halos give seams.
* tiny UNet: a random-weight (or briefly trained) Keras conv/pool/upsample/skip model.

``export_savedmodel`` writes the serving signature ``images`` -> ``probabilities`` and the
metadata JSON into ``saved_model/assets/``. TensorFlow is imported inside the functions.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from segkit import model_metadata

# --- metadata -----------------------------------------------------------------


def metadata(*, channels: int, number_classes: int, size_factor: int, radius: int,
             erf_radius: int | None = None, model: str = "test") -> dict[str, Any]:
    return {
        "format": model_metadata.FORMAT,
        "format_version": model_metadata.FORMAT_VERSION,
        "model": model,
        "model_config": {},
        "channels": channels,
        "number_classes": number_classes,
        "image_dtype": "uint16",
        "normalization": {"method": "zscore_per_channel_whole_image", "epsilon": 1e-6},
        "size_factor": size_factor,
        "receptive_field_radius": radius,
        "effective_receptive_field_radius": radius if erf_radius is None else erf_radius,
        "training_tile_size": [64, 64],
        "final_metrics": {},
        "signature": dict(model_metadata.SIGNATURE),
    }


def export_savedmodel(export_dir: str, forward: Callable, *, channels: int, number_classes: int,
                      size_factor: int, radius: int, erf_radius: int | None = None,
                      track: Any = None) -> str:
    """Save ``forward`` (tf: images_nhwc -> probabilities_nhwk) as a SavedModel with metadata.

    ``track``: an object holding variables ``forward`` uses (e.g. a Keras model).
    """
    import tensorflow as tf

    module = tf.Module()
    module.tracked = track

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="images")])
    def serve(images):
        return {"probabilities": forward(images)}

    module.serve = serve
    tf.saved_model.save(module, export_dir, signatures={"serving_default": serve})
    meta = metadata(channels=channels, number_classes=number_classes, size_factor=size_factor,
                    radius=radius, erf_radius=erf_radius)
    os.makedirs(os.path.join(export_dir, "assets"), exist_ok=True)
    with open(model_metadata.metadata_path(export_dir), "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    return export_dir


# --- pointwise model ------------------------------------------------------------


def pointwise_weights(channels: int, number_classes: int) -> tuple[np.ndarray, np.ndarray]:
    weights = np.linspace(-1.5, 1.5, channels * number_classes, dtype=np.float32).reshape(channels, number_classes)
    weights[:, 0] = 0.0  # class 0 logit is 0: class 1 wins where the weighted input is positive
    bias = np.zeros(number_classes, np.float32)
    return weights, bias


def pointwise_numpy(channels: int, number_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    weights, bias = pointwise_weights(channels, number_classes)

    def predict(batch_nhwc: np.ndarray) -> np.ndarray:
        logits = batch_nhwc @ weights + bias
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    return predict


def export_pointwise(export_dir: str, *, channels: int = 1, number_classes: int = 2, size_factor: int = 8) -> str:
    import tensorflow as tf

    weights, bias = pointwise_weights(channels, number_classes)

    def forward(images):
        return tf.nn.softmax(tf.einsum("nhwc,ck->nhwk", images, tf.constant(weights)) + bias, axis=-1)

    return export_savedmodel(export_dir, forward, channels=channels, number_classes=number_classes,
                             size_factor=size_factor, radius=0)


# --- fixed chain of pool / conv / upsample ------------------------------------------


def chain_radius(layers: Sequence[tuple[str, int]]) -> int:
    """Exact receptive-field radius of a chain of ('pool', s), ('conv', k), ('up', s) layers.

    Walks back from each output phase: conv k widens [lo, hi] by (k-1)/2, nearest
    upsampling maps pixel p to p // s, a pool of s maps cell c to c*s .. c*s+s-1.
    """
    factor = int(np.prod([s for kind, s in layers if kind == "pool"])) or 1
    worst = 0
    for p in range(factor * 2):
        lo = hi = p
        for kind, size in reversed(layers):
            if kind == "conv":
                lo, hi = lo - size // 2, hi + size // 2
            elif kind == "up":
                lo, hi = lo // size, hi // size
            elif kind == "pool":
                lo, hi = lo * size, hi * size + size - 1
        worst = max(worst, p - lo, hi - p)
    return worst


def chain_size_factor(layers: Sequence[tuple[str, int]]) -> int:
    return int(np.prod([s for kind, s in layers if kind == "pool"])) or 1


def _kernel(index: int) -> np.ndarray:
    rng = np.random.default_rng(100 + index)
    return (rng.random((3, 3)) + 0.2).astype(np.float32) / 4.0  # positive: no cancelling dependencies


def chain_numpy(layers: Sequence[tuple[str, int]], channels: int = 1,
                number_classes: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """Numpy twin of :func:`export_chain` (same weights; float32 throughout)."""
    mix = np.linspace(0.5, 1.0, channels, dtype=np.float32)
    scale = np.linspace(-2.0, 2.0, number_classes, dtype=np.float32)

    def conv3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        h, w = x.shape[1:]
        out = np.zeros_like(x)
        for dy in range(3):
            for dx in range(3):
                out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
        return np.tanh(out)

    def predict(batch_nhwc: np.ndarray) -> np.ndarray:
        x = (batch_nhwc @ mix).astype(np.float32)  # N, H, W
        for i, (kind, size) in enumerate(layers):
            if kind == "pool":
                n, h, w = x.shape
                x = x.reshape(n, h // size, size, w // size, size).mean(axis=(2, 4))
            elif kind == "up":
                x = np.repeat(np.repeat(x, size, axis=1), size, axis=2)
            else:
                x = conv3(x, _kernel(i))
        logits = x[..., None] * scale
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    return predict


def export_chain(export_dir: str, layers: Sequence[tuple[str, int]], *, channels: int = 1,
                 number_classes: int = 2) -> str:
    import tensorflow as tf

    mix = np.linspace(0.5, 1.0, channels, dtype=np.float32)
    scale = np.linspace(-2.0, 2.0, number_classes, dtype=np.float32)

    def forward(images):
        x = tf.einsum("nhwc,c->nhw", images, tf.constant(mix))[..., None]
        for i, (kind, size) in enumerate(layers):
            if kind == "pool":
                x = tf.nn.avg_pool2d(x, size, size, "VALID")
            elif kind == "up":
                x = tf.repeat(tf.repeat(x, size, axis=1), size, axis=2)
            else:
                x = tf.tanh(tf.nn.conv2d(x, tf.constant(_kernel(i))[:, :, None, None], 1, "SAME"))
        return tf.nn.softmax(x * scale, axis=-1)

    return export_savedmodel(export_dir, forward, channels=channels, number_classes=number_classes,
                             size_factor=chain_size_factor(layers), radius=chain_radius(layers))


# --- tiny Keras UNet --------------------------------------------------------------

TINY_UNET_PATHS = (  # every input-to-output path, as chains, for the radius
    [("conv", 3), ("conv", 3), ("pool", 2), ("conv", 3), ("pool", 2), ("conv", 3), ("up", 2), ("conv", 3),
     ("up", 2), ("conv", 3)],
    [("conv", 3), ("conv", 3), ("pool", 2), ("conv", 3), ("conv", 3), ("up", 2), ("conv", 3)],
    [("conv", 3), ("conv", 3), ("conv", 3)],
)
TINY_UNET_SIZE_FACTOR = 4


def tiny_unet_radius() -> int:
    return max(chain_radius(p) for p in TINY_UNET_PATHS)


def build_tiny_unet(channels: int = 1, number_classes: int = 2, seed: int = 0):
    """conv-conv-pool-conv-pool-conv-up-cat-conv-up-cat-conv-1x1 softmax; size factor 4."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input((None, None, channels))
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(c1)
    c2 = layers.Conv2D(12, 3, padding="same", activation="relu")(layers.MaxPooling2D(2)(c1))
    c3 = layers.Conv2D(12, 3, padding="same", activation="relu")(layers.MaxPooling2D(2)(c2))
    u2 = layers.Concatenate()([layers.UpSampling2D(2)(c3), c2])
    c4 = layers.Conv2D(12, 3, padding="same", activation="relu")(u2)
    u1 = layers.Concatenate()([layers.UpSampling2D(2)(c4), c1])
    c5 = layers.Conv2D(8, 3, padding="same", activation="relu")(u1)
    out = layers.Conv2D(number_classes, 1, activation="softmax")(c5)
    return keras.Model(inp, out)


def export_keras(export_dir: str, model, *, size_factor: int, radius: int) -> str:
    channels = int(model.input_shape[-1])
    number_classes = int(model.output_shape[-1])
    return export_savedmodel(export_dir, lambda images: model(images, training=False), channels=channels,
                             number_classes=number_classes, size_factor=size_factor, radius=radius, track=model)


def train_steps(model, images_nhwc: np.ndarray, masks_nhw: np.ndarray, *, steps: int, batch_size: int = 8,
                learning_rate: float = 1e-2, from_logits: bool = False) -> list[float]:
    """A few eager Adam steps (no tracing: faster than ``fit`` for a handful of steps); returns the losses."""
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.Adam(learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    losses = []
    for step in range(steps):
        first = (step * batch_size) % len(images_nhwc)
        batch = slice(first, first + batch_size)
        with tf.GradientTape() as tape:
            loss = loss_fn(masks_nhw[batch], model(images_nhwc[batch], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    return losses
