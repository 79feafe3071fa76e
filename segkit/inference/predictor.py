"""The model behind inference: a SavedModel's serving signature as a numpy callable, and test-time augmentation."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, MutableMapping

import numpy as np

from segkit import model_metadata
from segkit.cliutil import InputError

# TensorFlow 2.21 leaves oneDNN off on some CPUs (AMD EPYC here). When this is "0" or "1", inference sets
# TF_ENABLE_ONEDNN_OPTS to it unless the user set the variable; None keeps TensorFlow's own choice.
# Chosen from measurements: README.md, "Inference speed".
ONEDNN_DEFAULT: str | None = None


def default_onednn(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set TF_ENABLE_ONEDNN_OPTS to :data:`ONEDNN_DEFAULT` unless the user set it.

    Only effective before TensorFlow is imported (then returns True); a no-op afterwards.
    """
    environ = os.environ if environ is None else environ
    if ONEDNN_DEFAULT is None or "tensorflow" in sys.modules or environ.get("TF_ENABLE_ONEDNN_OPTS", "") != "":
        return False
    environ["TF_ENABLE_ONEDNN_OPTS"] = ONEDNN_DEFAULT
    return True


class SavedModelPredictor:
    """``batch_nhwc`` float32 -> ``probabilities_nhwk`` through the SavedModel's serving signature.

    The signature is a concrete function: calling it never retraces, and every tile of an
    image has the same shape, so TensorFlow reuses its shape-specialized kernels.
    """

    def __init__(self, saved_model_dir: str):
        from segkit import tfquiet

        default_onednn()

        tf = tfquiet.import_tensorflow()  # without TensorFlow's start-up noise unless --verbose 1
        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # already initialized
                tf.config.experimental.set_memory_growth(gpu, True)
        self._tf = tf
        self._loaded = tf.saved_model.load(saved_model_dir)  # keeps the variables alive
        sig = model_metadata.SIGNATURE
        if sig["name"] not in self._loaded.signatures:
            raise InputError(f"{saved_model_dir}: SavedModel has no {sig['name']!r} signature "
                             f"(has {', '.join(self._loaded.signatures) or 'none'}); re-export it with train_unet.py")
        self._fn = self._loaded.signatures[sig["name"]]
        inputs = self._fn.structured_input_signature[1]
        if sig["input"] not in inputs or sig["output"] not in self._fn.structured_outputs:
            raise InputError(f"{saved_model_dir}: signature {sig['name']} must map {sig['input']!r} to "
                             f"{sig['output']!r}, has {sorted(inputs)} -> {sorted(self._fn.structured_outputs)}")
        self._input, self._output = sig["input"], sig["output"]

    def __call__(self, batch_nhwc: np.ndarray) -> np.ndarray:
        out = self._fn(**{self._input: self._tf.constant(batch_nhwc, self._tf.float32)})
        return out[self._output].numpy()


# The 8 symmetries of the square: rot90 k times, optionally after a left-right flip.
D4 = tuple((k, flip) for flip in (False, True) for k in range(4))


def with_tta(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: mean of the 8 flip/rot90 predictions, in probability space.

    Tiles are multiples of the size factor, so each transformed tile keeps the pooling grid
    of the transformed whole image: tiled == untiled holds for every transform, hence for the mean.
    """

    def predict(batch_nhwc: np.ndarray) -> np.ndarray:
        total = None
        for k, flip in D4:
            x = batch_nhwc[:, :, ::-1] if flip else batch_nhwc
            p = np.asarray(predict_fn(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))))
            p = np.rot90(p, -k, axes=(1, 2))
            p = p[:, :, ::-1] if flip else p
            total = p.astype(np.float32) if total is None else total + p
        return total / len(D4)

    return predict
