"""The model behind inference: a SavedModel's serving signature as a numpy callable, and test-time augmentation."""
from __future__ import annotations

import contextlib
from typing import Callable, MutableMapping

import numpy as np

from segkit import model_metadata
from segkit.cliutil import InputError

# TensorFlow 2.21 leaves oneDNN off on CPUs without AVX-512 VNNI (the AMD EPYC development machine). When
# this is "0" or "1", inference sets TF_ENABLE_ONEDNN_OPTS to it unless the user set the variable; None keeps
# TensorFlow's own choice. Chosen from measurements (README.md, "Inference speed"): for 2-D models oneDNN was
# slower (it runs a single image 15x slower per pixel than a batch of two); for volume models it is 2.7-3.2x
# faster per voxel (unet3d, 64x128x128 and 96^3) and tiled output equals whole-volume output bit for bit.
ONEDNN_DEFAULT: str | None = None
ONEDNN_VOLUMES: str | None = "1"


MISMATCH = "the model's metadata and graph disagree"  # how a ModelMismatchError's message starts


class ModelMismatchError(ValueError):
    """The SavedModel's graph refused an input its metadata promise, or returned another shape (e.g. the
    ``channels`` of ``segmentation_metadata.json`` edited): one image fails, in one line."""


def default_onednn(environ: MutableMapping[str, str] | None = None, spatial_rank: int = 2) -> bool:
    """Set TF_ENABLE_ONEDNN_OPTS to :data:`ONEDNN_DEFAULT` (volume models: :data:`ONEDNN_VOLUMES`) unless
    the user set it (before TensorFlow's import)."""
    from segkit import tfquiet

    return tfquiet.default_onednn(ONEDNN_VOLUMES if spatial_rank == 3 else ONEDNN_DEFAULT, environ)


class SavedModelPredictor:
    """``batch_nhwc`` float32 -> ``probabilities_nhwk`` through the SavedModel's serving signature.

    The signature is a concrete function: calling it never retraces, and every tile of an
    image has the same shape, so TensorFlow reuses its shape-specialized kernels.
    """

    def __init__(self, saved_model_dir: str):
        from segkit import tfquiet

        self.meta = model_metadata.load(saved_model_dir)  # first: the CPU kernels depend on the model's rank
        default_onednn(spatial_rank=self.meta.spatial_rank)

        tf = tfquiet.import_tensorflow()  # without TensorFlow's start-up noise unless --verbose 1
        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # already initialized
                tf.config.experimental.set_memory_growth(gpu, True)
        self._tf = tf
        try:
            self._loaded = tf.saved_model.load(saved_model_dir)  # keeps the variables alive
        except Exception as exc:  # NotFoundError, DataLossError, IndexError ...: TensorFlow's own types
            raise InputError(f"{saved_model_dir}: the SavedModel cannot be loaded, its graph or variables/ files are "
                             f"missing or damaged ({type(exc).__name__}: {_first_line(exc)}); copy or export the "
                             "model again with train_unet.py") from None
        sig = model_metadata.SIGNATURE
        if sig["name"] not in self._loaded.signatures:
            raise InputError(f"{saved_model_dir}: SavedModel has no {sig['name']!r} signature "
                             f"(has {', '.join(self._loaded.signatures) or 'none'}); re-export it with train_unet.py")
        self._fn = self._loaded.signatures[sig["name"]]
        inputs = self._fn.structured_input_signature[1]
        if sig["input"] not in inputs or sig["output"] not in self._fn.structured_outputs:
            raise InputError(f"{saved_model_dir}: signature {sig['name']} must map {sig['input']!r} to "
                             f"{sig['output']!r}, has {sorted(inputs)} -> {sorted(self._fn.structured_outputs)}")
        self._input, self._output, self._dir = sig["input"], sig["output"], saved_model_dir

    def __call__(self, batch_nhwc: np.ndarray) -> np.ndarray:
        try:
            out = self._fn(**{self._input: self._tf.constant(batch_nhwc, self._tf.float32)})[self._output].numpy()
        except (self._tf.errors.OpError, TypeError, ValueError) as exc:  # the graph refused the batch
            raise ModelMismatchError(self._mismatch(f"its graph refused a batch of shape {batch_nhwc.shape} "
                                                    f"({type(exc).__name__}: {_first_line(exc)})")) from None
        expected = tuple(batch_nhwc.shape[:-1]) + (self.meta.number_classes,)
        if out.shape != expected:
            raise ModelMismatchError(self._mismatch(f"its graph returned shape {out.shape} for a batch of shape "
                                                    f"{batch_nhwc.shape}, expected {expected}"))
        return out

    def _mismatch(self, what: str) -> str:
        return (f"{MISMATCH}: {what}; the metadata "
                f"({model_metadata.metadata_path(self._dir)}) say channels {self.meta.channels}, number_classes "
                f"{self.meta.number_classes}: restore the file train_unet.py exported, or export the model again")


_TF_NOISE = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Traceback")


def _first_line(exc: BaseException) -> str:
    """The first telling line of an exception's text (TensorFlow's run to pages of stack and tensor dumps)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_TF_NOISE)] or lines
    return lines[0][:300] if lines else type(exc).__name__


# The 8 symmetries of the square: rot90 k times, optionally after a left-right flip.
D4 = tuple((k, flip) for flip in (False, True) for k in range(4))
# Volumes: the 8 mirrorings of the z, y, x axes (nnU-Net's test-time mirroring); a rot90 in y, x would
# also be valid only for square in-plane size factors, and z is never rotated into the plane.
MIRRORS_3D = tuple(tuple(axis for axis, bit in zip((1, 2, 3), bits) if bit)
                   for bits in ((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)))


def with_tta(predict_fn: Callable[[np.ndarray], np.ndarray], spatial_rank: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: mean of the 8 flip/rot90 predictions (volumes: the 8 mirrorings of z, y, x),
    in probability space.

    Tiles are multiples of the size factor on every axis, so each transformed tile keeps the pooling grid
    of the transformed whole image: tiled == untiled holds for every transform, hence for the mean.
    """
    if spatial_rank == 3:
        return _with_mirrors_3d(predict_fn)

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


def _with_mirrors_3d(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def predict(batch_ndhwc: np.ndarray) -> np.ndarray:
        total = None
        for axes in MIRRORS_3D:
            p = np.asarray(predict_fn(np.ascontiguousarray(np.flip(batch_ndhwc, axes) if axes else batch_ndhwc)))
            p = np.flip(p, axes) if axes else p
            total = p.astype(np.float32) if total is None else total + p
        return total / len(MIRRORS_3D)

    return predict
