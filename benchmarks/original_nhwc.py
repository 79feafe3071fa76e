#!/usr/bin/env python3
"""The original NIST inference with its layout turned channels-last: a fair measuring stick on a CPU.

The original ``inference.py`` / ``model.py`` (``../shared/anchors/nist-fc-densenet``) build FC-DenseNet56 in
NCHW. TensorFlow 2.21's CPU kernels refuse NCHW convolutions unless oneDNN is on, and with oneDNN they run
the NCHW graph through slow reference paths on this machine (README, "Benchmarks": a 64x64 forward pass
takes ~25 s). Measured as shipped, the original is then two orders of magnitude slower than its algorithm
is; comparing against that would flatter us. This script runs the original's own code, read from the anchor
folder at run time (nothing copied into this project), with four mechanical edits and nothing else:

- ``data_format='channels_first'`` -> ``'channels_last'``; ``axis=1`` (BatchNormalization, concatenate) -> ``axis=-1``;
- the input ``shape=(channels, None, None)`` -> ``(None, None, channels)`` and the final ``Permute`` removed;
- the effective-radius probe's noise image and ``inference.py``'s HWC -> CHW transposes dropped.

The algorithm is the original's: whole-image z-score normalisation, images up to 832 px run whole (reflect-
padded to the size factor 32), larger ones tiled at 832 with the probed radius, eager Keras calls, argmax, TIFF
written with ``skimage.io.imsave``. The variables are the same (a checkpoint of the NCHW model loads).

    python benchmarks/original_nhwc.py checkpoint CKPT_PREFIX        # a random FC-DenseNet56 checkpoint
    python benchmarks/original_nhwc.py infer CKPT IMAGES OUT          # prints 'original-nhwc infer: S s wall'
"""
from __future__ import annotations

import os
import re
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def anchor_folder() -> str:
    from bench_inference import _shared

    return _shared("anchors", "nist-fc-densenet")


def _edit(text: str, old: str, new: str, count: int | None = None) -> str:
    """``text.replace(old, new)``; the anchor changed when ``old`` does not occur (``count`` times)."""
    found = text.count(old)
    if found == 0 or (count is not None and found != count):
        raise SystemExit(f"original_nhwc: the anchor's code changed ({old!r} found {found} times); update this script")
    return text.replace(old, new)


def channels_last_sources(folder: str) -> tuple[str, str]:
    """(model.py, inference.py) source of the anchor with the layout edits of the module docstring."""
    with open(os.path.join(folder, "model.py")) as fh:
        model = fh.read()
    with open(os.path.join(folder, "inference.py")) as fh:
        inference = fh.read()
    model = _edit(model, "data_format='channels_first'", "data_format='channels_last'")
    model, n = re.subn(r"axis=1\b", "axis=-1", model)
    if n < 5:
        raise SystemExit(f"original_nhwc: the anchor's code changed (axis=1 found {n} times); update this script")
    model = _edit(model, "shape=(self.number_channels, None, None)", "shape=(None, None, self.number_channels)", 1)
    model = _edit(model, "x = tf.keras.layers.Permute((2, 3, 1))(x)", "pass", 1)
    model = _edit(model, "size=(1, self.number_channels, M, N)", "size=(1, M, N, self.number_channels)", 1)
    inference = _edit(inference, "tile.transpose((2, 0, 1))", "tile", 1)
    inference = _edit(inference, "img.transpose((2, 0, 1))", "img", 1)
    return model, inference


def load_modules() -> types.ModuleType:
    """Import the edited ``model`` and ``inference`` modules (the anchor's ``imagereader`` as is)."""
    folder = anchor_folder()
    sys.path.insert(0, folder)
    model_src, inference_src = channels_last_sources(folder)
    for name, source in (("model", model_src), ("inference", inference_src)):
        module = types.ModuleType(name)
        module.__file__ = os.path.join(folder, f"{name}.py")
        sys.modules[name] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    return sys.modules["inference"]


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if len(sys.argv) == 3 and sys.argv[1] == "checkpoint":
        load_modules()
        import tensorflow as tf

        tf.keras.utils.set_random_seed(0)
        m = sys.modules["model"].FCDensenet(2, 1, 1, 1e-4)
        print(tf.train.Checkpoint(optimizer=m.get_optimizer(), model=m.get_keras_model()).write(sys.argv[2]))
        return
    if len(sys.argv) == 5 and sys.argv[1] == "infer":
        start = time.perf_counter()  # the process is already running: add the interpreter start-up the caller saw
        inference = load_modules()
        _, checkpoint, images, out = sys.argv[1:]
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            inference.inference(checkpoint, os.path.abspath(images), os.path.abspath(out), 2, 1, "tif")
        print(f"original-nhwc infer: {time.perf_counter() - start:.2f} s (after interpreter start-up)")
        return
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
