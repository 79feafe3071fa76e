"""The committed example data equals what data/make_example_data.py generates."""
import os

import numpy as np
from conftest import ROOT

from segkit import image_io

DATA = os.path.join(ROOT, "data")


def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example_data", os.path.join(DATA, "make_example_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    written = _load_generator().generate(str(tmp_path), seed=0)
    assert len(written) == 20
    for path in written:
        rel = os.path.relpath(path, tmp_path)
        committed = image_io.read_image(os.path.join(DATA, rel))
        fresh = image_io.read_image(path)
        assert fresh.dtype == committed.dtype and fresh.shape == committed.shape, rel
        assert np.array_equal(fresh, committed), rel


def test_example_data_has_the_promised_shape():
    images = image_io.list_images(os.path.join(DATA, "images"), "tif")
    sizes = [image_io.read_image(os.path.join(DATA, "images", n)).shape for n in images]
    assert any(min(s) > 512 for s in sizes)
    masks = image_io.list_images(os.path.join(DATA, "masks"))
    assert {os.path.splitext(m)[1] for m in masks} == {".png", ".tif"}
    for name in masks:
        mask = image_io.read_image(os.path.join(DATA, "masks", name))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
    rgb = image_io.read_image(os.path.join(DATA, "rgb", "images", "stain_00.tif"))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DATA) for f in fs)
    assert total < 2_000_000
