"""Issue #18: outputs keep the input's calibration; probabilities are channel-first; OME-Zarr name and pyramid."""
import json
import os

import numpy as np
import pytest
import tifffile
from savedmodel_helpers import export_pointwise

import inference_unet
from segkit import calibration
from segkit.calibration import Calibration
from segkit.inference import writers

UM = 0.65


@pytest.fixture(scope="module")
def pointwise(tmp_path_factory):
    return export_pointwise(str(tmp_path_factory.mktemp("model") / "pointwise"), channels=1, number_classes=2)


def _imagej_image(folder, shape=(48, 70), name="cells.tif", size=UM):
    folder.mkdir(exist_ok=True)
    image = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    tifffile.imwrite(folder / name, image, imagej=True, resolution=(1 / size, 1 / size),
                     metadata={"unit": "micron", "axes": "YX"})
    return name


def _segment(model, images, out, *extra):
    return inference_unet.main(["--saved_model_filepath", model, "--image_folder", str(images), "--output_folder",
                                str(out), "--save_probabilities", "1", "--tile_size", "16", *map(str, extra)])


def _zattrs(path):
    with open(os.path.join(path, ".zattrs")) as fh:
        return json.load(fh)["multiscales"][0]


@pytest.mark.parametrize("out_of_core", [False, True])
def test_tiff_mask_and_probabilities_keep_065_um_per_pixel(pointwise, tmp_path, out_of_core):
    name = _imagej_image(tmp_path / "images")
    extra = ("--memory_limit_mb", 0.001) if out_of_core else ()
    assert _segment(pointwise, tmp_path / "images", tmp_path / "out", *extra) == 0
    for path in (tmp_path / "out" / name, tmp_path / "out" / "probabilities" / name):
        found = calibration.read_calibration(str(path))
        assert found is not None and found.unit == "micrometer", path
        np.testing.assert_allclose(found.pixel_size_yx, (UM, UM), rtol=1e-6)
    with tifffile.TiffFile(tmp_path / "out" / "probabilities" / name) as tif:
        series = tif.series[0]
        assert series.axes == "CYX" and series.shape == (2, 48, 70)
        if not out_of_core:  # an ImageJ hyperstack: Fiji opens the classes as channels
            assert tif.is_imagej and tif.imagej_metadata["channels"] == 2 and tif.imagej_metadata["unit"] == "micron"
        probs = series.asarray()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    mask = tifffile.imread(tmp_path / "out" / name)
    assert np.array_equal(mask, np.argmax(probs, axis=0))


def test_ome_zarr_scale_units_and_name(pointwise, tmp_path):
    name = _imagej_image(tmp_path / "images")
    assert _segment(pointwise, tmp_path / "images", tmp_path / "out", "--output_format", "zarr") == 0
    for path, axes in ((tmp_path / "out" / "cells.zarr", ["y", "x"]),
                       (tmp_path / "out" / "probabilities" / "cells.zarr", ["c", "y", "x"])):
        ms = _zattrs(path)
        assert ms["name"] == name and [a["name"] for a in ms["axes"]] == axes
        assert all(a.get("unit") == "micrometer" for a in ms["axes"] if a["type"] == "space")
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        np.testing.assert_allclose(scale[-2:], (UM, UM))
        assert len(ms["datasets"]) == 1  # small: one level


def test_uncalibrated_input_gives_unit_scale_and_no_unit(pointwise, tmp_path):
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.arange(40 * 50, dtype=np.uint16).reshape(40, 50))
    assert calibration.read_calibration(str(tmp_path / "images" / "a.tif")) is None
    assert _segment(pointwise, tmp_path / "images", tmp_path / "out", "--output_format", "zarr") == 0
    ms = _zattrs(tmp_path / "out" / "a.zarr")
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]
    assert "unit" not in ms["axes"][0]


def test_ome_tiff_physical_size_is_read(tmp_path):
    path = str(tmp_path / "x.ome.tif")
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), metadata={"axes": "YX", "PhysicalSizeX": 0.2,
                                                                 "PhysicalSizeY": 0.3, "PhysicalSizeXUnit": "nm"})
    found = calibration.read_calibration(path)
    assert found == Calibration((0.3, 0.2), "nanometer")


def test_large_zarr_output_gets_a_pyramid(tmp_path, monkeypatch):
    """Levels halve while the largest side exceeds the limit: nearest for masks, 2x2 mean for probabilities."""
    import zarr

    monkeypatch.setattr(writers, "PYRAMID_MAX_SIDE", 16)
    rng = np.random.default_rng(1)
    probs = rng.random((37, 50, 2)).astype(np.float32)
    mask = np.argmax(probs, axis=-1).astype(np.uint8)
    cal = Calibration((UM, UM), "micrometer")
    for channels, data, dtype in ((False, mask, np.uint8), (True, probs, np.float32)):
        folder = str(tmp_path / f"out{int(channels)}.zarr")
        os.makedirs(folder)
        out = writers._ZarrOutput(folder, data.shape, dtype, 16, lambda d: d, channels=channels, name="img.tif",
                                  calibration=cal)
        with out:
            out.put(_Zone((slice(0, 37), slice(0, 50))), data)
        group = zarr.open_group(folder, mode="r")
        ms = _zattrs(folder)
        assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]  # 50 -> 25 -> 13
        scales = [d["coordinateTransformations"][0]["scale"][-1] for d in ms["datasets"]]
        np.testing.assert_allclose(scales, [UM, 2 * UM, 4 * UM])
        level1 = np.asarray(group["1"])
        if channels:
            assert level1.shape == (2, 19, 25)
            np.testing.assert_allclose(level1[:, 3, 4], probs[6:8, 8:10].mean(axis=(0, 1)), rtol=1e-6)
            np.testing.assert_allclose(level1[:, 18, 0], probs[36, 0:2].mean(axis=0), rtol=1e-6)  # edge row replicated
        else:
            assert np.array_equal(level1, mask[::2, ::2]) and level1.dtype == np.uint8


class _Zone:
    def __init__(self, region):
        self._region = region

    def region(self):
        return self._region


def test_downsample2_of_a_volume_halves_z_y_x():
    volume = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    half = writers.downsample2(volume, 3, mean=True)
    assert half.shape == (2, 3, 4)
    assert half[0, 0, 0] == volume[:2, :2, :2].mean()
