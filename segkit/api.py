"""Segment NumPy arrays in memory with a trained SavedModel, from Python (README.md, "Python API").

    import sys; sys.path.insert(0, "/path/to/toolkit")     # or PYTHONPATH=/path/to/toolkit
    from segkit.api import Segmenter
    seg = Segmenter("runs/x/model/saved_model")            # loads TensorFlow and the model once
    mask = seg.segment(image_hw)                            # or image_hwc
    mask, probs_hwk = seg.segment(image_hwc, probabilities=True)

The same steps as ``inference_unet.py`` (settings checks, whole-image normalization, exact tiling with
the model's halo, the predictor, TTA, the stored mask / probability encodings), so a file segmented by
the CLI and the same pixels segmented here give identical masks and probabilities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from segkit import image_io, tiling
from segkit.cliutil import InputError
from segkit.inference.predictor import SavedModelPredictor, with_tta
from segkit.inference.settings import DEFAULT_TILE_SIZE, PROBABILITY_DTYPES, load_model_metadata, resolve_halo, resolve_tile_size
from segkit.inference.writers import encoder


class Segmenter:
    """A loaded SavedModel that segments in-memory images; flags as ``inference_unet.py``'s."""

    def __init__(self, saved_model_filepath: str, *, tile_size: int = DEFAULT_TILE_SIZE, halo: str | int = "exact",
                 batch_size: int = 1, tta: bool = False, probability_dtype: str = "float32",
                 predict_fn: Callable[[np.ndarray], np.ndarray] | None = None):
        """Raises InputError (a one-line message) for a bad model folder or setting.

        ``predict_fn``: an already loaded :class:`SavedModelPredictor` of the same model (default: load it).
        """
        self.meta = load_model_metadata(saved_model_filepath)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if probability_dtype not in PROBABILITY_DTYPES:
            raise InputError(f"probability_dtype must be one of {', '.join(PROBABILITY_DTYPES)}, "
                             f"got {probability_dtype!r}")
        self.tile_size = resolve_tile_size(tile_size, self.meta.size_factor)
        self.halo = resolve_halo(halo, self.meta)
        self.batch_size, self.probability_dtype = int(batch_size), probability_dtype
        predictor = predict_fn or SavedModelPredictor(saved_model_filepath)
        self.predict_fn = with_tta(predictor) if tta else predictor

    @property
    def number_classes(self) -> int:
        return self.meta.number_classes

    @property
    def channels(self) -> int:
        return self.meta.channels

    def segment(self, image: np.ndarray, *, probabilities: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The class-index mask of ``image`` (H, W) or (H, W, C), in the smallest unsigned type that holds
        the classes; with ``probabilities`` also the per-class probabilities (H, W, K) (float32, or uint8 =
        round(255 p) with ``probability_dtype='uint8'``). Raises ValueError for a wrong channel count,
        pixel type or NaN pixels. Spatial axes come first and channels last, so volumes ((Z, Y, X, C))
        take the same path once a model for them exists.
        """
        image_hwc = self._channels_last(np.asarray(image))
        probs = self.predict_probabilities(image_hwc)
        encode_mask, _ = encoder("mask", self.number_classes)
        mask = encode_mask(probs)
        if not probabilities:
            return mask
        encode_probs, _ = encoder("probabilities", self.number_classes, self.probability_dtype)
        return mask, encode_probs(probs)

    def predict_probabilities(self, image_hwc: np.ndarray) -> np.ndarray:
        """float32 (H, W, K) probabilities of a channels-last image: whole-image statistics, exact tiling."""
        mean, std = image_io.image_stats(image_hwc)
        if not np.all(np.isfinite(np.asarray(mean) + np.asarray(std))):
            raise ValueError("image contains NaN or infinite pixels; replace them first")
        return tiling.predict_tiled(image_hwc, self.predict_fn, self.tile_size, self.halo, self.meta.size_factor,
                                    batch_size=self.batch_size,
                                    preprocess=lambda t: image_io.normalize(t, mean, std))

    def _channels_last(self, image: np.ndarray) -> np.ndarray:
        spatial = 2  # the models are 2-D; a volume model would set 3 here
        if image.ndim == spatial:
            image = image[..., None]
        if image.ndim != spatial + 1:
            raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {image.shape}")
        image_io.check_dtype(image, "image")
        if image.shape[-1] != self.channels:
            raise ValueError(f"image has {image.shape[-1]} channel(s) but the model expects {self.channels} "
                             "(channels last: (H, W, C))")
        if min(image.shape[:-1]) < 1:
            raise ValueError(f"image has no pixels (shape {image.shape})")
        return image


