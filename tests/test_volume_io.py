"""segkit.volume_io: tiny files of each kind, read back with their axes and voxel size."""
import h5py
import numpy as np
import pytest
import tifffile
import zarr

from segkit import volume_io
from segkit.cliutil import InputError


def _volume(shape=(5, 6, 7), channels=None, seed=0):
    rng = np.random.default_rng(seed)
    full = shape + ((channels,) if channels else ())
    return rng.integers(0, 60000, size=full).astype(np.uint16)


def test_imagej_hyperstack_axes_and_spacing(tmp_path):
    zcyx = _volume((4, 2, 6, 7))
    path = str(tmp_path / "stack.tif")
    tifffile.imwrite(path, zcyx, imagej=True, resolution=(1 / 0.05, 1 / 0.06),
                     metadata={"spacing": 0.3, "unit": "um", "axes": "ZCYX"})
    volume = volume_io.open_volume(path)
    assert volume.axes == "ZCYX"
    np.testing.assert_array_equal(volume.data_zyxc, np.moveaxis(zcyx, 1, 3))
    np.testing.assert_allclose(volume.spacing_zyx_um, (0.3, 0.06, 0.05), rtol=1e-6)
    assert "ImageJ" in volume.description


def test_imagej_nanometre_unit_is_converted(tmp_path):
    path = str(tmp_path / "em.tif")
    tifffile.imwrite(path, _volume((3, 8, 8)).astype(np.uint8), imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"spacing": 40.0, "unit": "nm", "axes": "ZYX"})
    volume = volume_io.open_volume(path)
    assert volume.shape_zyxc == (3, 8, 8, 1)
    np.testing.assert_allclose(volume.spacing_zyx_um, (0.04, 0.004, 0.004), rtol=1e-6)


def test_ome_tiff_physical_size_with_units(tmp_path):
    zyxs = _volume((4, 8, 9), channels=3).astype(np.uint8)
    path = str(tmp_path / "cells.ome.tif")
    tifffile.imwrite(path, zyxs, ome=True, photometric="rgb",
                     metadata={"axes": "ZYXS", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.2,
                               "PhysicalSizeZ": 500.0, "PhysicalSizeZUnit": "nm"})
    volume = volume_io.open_volume(path)
    np.testing.assert_array_equal(volume.data_zyxc, zyxs)
    np.testing.assert_allclose(volume.spacing_zyx_um, (0.5, 0.2, 0.1))
    assert "OME" in volume.description


def test_plain_multipage_tiff_pages_are_z_and_voxel_size_unknown(tmp_path):
    zyx = _volume()
    path = str(tmp_path / "plain.tif")
    tifffile.imwrite(path, zyx, photometric="minisblack", metadata=None)
    volume = volume_io.open_volume(path)
    np.testing.assert_array_equal(volume.data_zyxc[:, :, :, 0], zyx)
    assert volume.spacing_zyx_um is None
    assert "pages is taken as z" in volume.description
    given = volume_io.open_volume(path, voxel_size_zyx_um=(1.0, 0.5, 0.5))
    assert given.spacing_zyx_um == (1.0, 0.5, 0.5)


def test_2d_tiff_where_a_volume_is_expected_is_one_line_error(tmp_path):
    path = str(tmp_path / "flat.tif")
    tifffile.imwrite(path, np.zeros((8, 9), np.uint8), imagej=True)
    with pytest.raises(InputError, match="2D data .* a volume"):
        volume_io.open_volume(path)


def test_time_axis_is_refused(tmp_path):
    path = str(tmp_path / "movie.tif")
    tifffile.imwrite(path, np.zeros((3, 4, 8, 9), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(InputError, match="axis T has length 3"):
        volume_io.open_volume(path)


def _write_ome_zarr(path, czyx, scale_czyx, unit="micrometer"):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=czyx.shape, dtype=czyx.dtype, chunks=(1, 2, 4, 4))[...] = czyx
    group.create_array("1", shape=czyx[:, :, ::2, ::2].shape, dtype=czyx.dtype)[...] = czyx[:, :, ::2, ::2]
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": unit} for a in "zyx"]
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale_czyx)}]},
                     {"path": "1", "coordinateTransformations": [
                         {"type": "scale", "scale": [scale_czyx[0], scale_czyx[1], 2 * scale_czyx[2], 2 * scale_czyx[3]]}]}],
    }]


def test_ome_zarr_ngff_04_lazy_axes_and_scale(tmp_path):
    czyx = _volume((2, 5, 8, 8))
    path = tmp_path / "vol.ome.zarr"
    _write_ome_zarr(path, czyx, (1.0, 0.8, 0.25, 0.25))
    volume = volume_io.open_volume(str(path))
    assert isinstance(volume.data_zyxc, volume_io.ZYXCView)  # lazy: nothing read yet
    assert volume.shape_zyxc == (5, 8, 8, 2)
    np.testing.assert_allclose(volume.spacing_zyx_um, (0.8, 0.25, 0.25))
    np.testing.assert_array_equal(volume.data_zyxc[1:3, 2:6, 3], np.moveaxis(czyx, 0, 3)[1:3, 2:6, 3])
    np.testing.assert_array_equal(np.asarray(volume.data_zyxc), np.moveaxis(czyx, 0, 3))


def test_ome_zarr_nanometre_units(tmp_path):
    path = tmp_path / "em.zarr"
    _write_ome_zarr(path, _volume((1, 3, 8, 8)), (1, 40, 4, 4), unit="nanometer")
    np.testing.assert_allclose(volume_io.open_volume(str(path)).spacing_zyx_um, (0.04, 0.004, 0.004))


def test_plain_zarr_array_with_dimension_names_and_attributes(tmp_path):
    yxz = _volume((6, 7, 5))
    path = tmp_path / "plain.zarr"
    array = zarr.open_array(str(path), mode="w", shape=yxz.shape, dtype=yxz.dtype, dimension_names=["y", "x", "z"])
    array[...] = yxz
    array.attrs["element_size_um"] = [0.5, 0.1, 0.1]
    volume = volume_io.open_volume(str(path))
    np.testing.assert_array_equal(volume.data_zyxc[:, :, :, 0], np.transpose(yxz, (2, 0, 1)))
    assert volume.spacing_zyx_um == (0.5, 0.1, 0.1)


def test_zarr_group_without_multiscales_names_its_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(InputError, match="arrays: raw"):
        volume_io.open_volume(str(tmp_path / "g.zarr"))
    assert volume_io.open_volume(str(tmp_path / "g.zarr/raw")).shape_zyxc == (2, 4, 4, 1)


def test_hdf5_dataset_path_and_element_size_um(tmp_path):
    zyx = _volume()
    path = tmp_path / "sample.h5"
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("volumes/raw", data=zyx)
        dataset.attrs["element_size_um"] = [0.04, 0.004, 0.004]
        handle.create_dataset("volumes/labels", data=zyx.astype(np.uint8))
    with volume_io.open_volume(f"{path}/volumes/raw") as volume:
        assert isinstance(volume.data_zyxc, volume_io.ZYXCView)
        np.testing.assert_array_equal(volume.data_zyxc[2:4, :, 1:3, 0], zyx[2:4, :, 1:3])
        assert volume.spacing_zyx_um == (0.04, 0.004, 0.004)


def test_hdf5_resolution_in_nanometres_and_axistags(tmp_path):
    xyzc = _volume((7, 6, 5), channels=2)
    path = tmp_path / "ilastik.h5"
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("data", data=xyzc)
        dataset.attrs["resolution"] = [40.0, 4.0, 4.0]
        dataset.attrs["axistags"] = '{"axes": [{"key": "x"}, {"key": "y"}, {"key": "z"}, {"key": "c"}]}'
    volume = volume_io.open_volume(str(path))  # the only dataset is found without its path
    np.testing.assert_array_equal(volume.data_zyxc[:], np.transpose(xyzc, (2, 1, 0, 3)))
    np.testing.assert_allclose(volume.spacing_zyx_um, (0.04, 0.004, 0.004))
    assert "nm" in volume.description
    volume.close()


@pytest.mark.parametrize("inner, message", [("missing", "no dataset 'missing'"), ("", "several datasets")])
def test_hdf5_missing_dataset_lists_the_datasets(tmp_path, inner, message):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("a", data=np.zeros((2, 3, 3)))
        handle.create_dataset("b", data=np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match=f"{message}.*datasets: a, b"):
        volume_io.open_volume(f"{path}/{inner}" if inner else str(path))


def test_hdf5_4d_without_axes_is_unknown_axes(tmp_path):
    path = tmp_path / "four.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("d", data=np.zeros((2, 3, 3, 2)))
    with pytest.raises(InputError, match="unknown axes"):
        volume_io.open_volume(f"{path}/d")
    assert volume_io.open_volume(f"{path}/d", axes="zyxc").shape_zyxc == (2, 3, 3, 2)


@pytest.mark.parametrize("text, expected", [("0.04,0.004,0.004", (0.04, 0.004, 0.004)), ("1 0.5 0.5", (1.0, 0.5, 0.5))])
def test_parse_voxel_size(text, expected):
    assert volume_io.parse_voxel_size(text) == expected


@pytest.mark.parametrize("text", ["1,2", "1,2,3,4", "0,1,1", "-1,1,1", "nan,1,1", "inf,1,1", "a,b,c", ""])
def test_parse_voxel_size_rejects_bad_values_in_one_line(text):
    with pytest.raises(InputError, match="--voxel_size must be three positive numbers") as info:
        volume_io.parse_voxel_size(text)
    assert "\n" not in str(info.value)


def test_anisotropy_is_read_from_the_spacing():
    assert volume_io.is_anisotropic((0.04, 0.004, 0.004)) == (True, False, False)
    assert volume_io.is_anisotropic((0.01, 0.008, 0.008)) == (False, False, False)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not a volume format"):
        volume_io.open_volume(str(tmp_path / "x.png"))
    with pytest.raises(InputError, match="no such"):
        volume_io.open_volume(str(tmp_path / "x.tif"))


def test_lazy_hdf5_volume_feeds_3d_augmentation(tmp_path):
    import augment3d

    zyx = _volume((10, 30, 30))
    path = tmp_path / "pair.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("raw", data=zyx)
        handle.create_dataset("labels", data=(zyx % 3).astype(np.uint8))
    spacing = (0.04, 0.008, 0.008)
    with volume_io.open_volume(f"{path}/raw") as image, volume_io.open_volume(f"{path}/labels") as labels:
        mask_view = labels.data_zyxc.zyx(str(path))
        assert mask_view.shape == (10, 30, 30)
        np.testing.assert_array_equal(mask_view[3, 4:6], (zyx % 3)[3, 4:6])
        crop, mask = augment3d.make_sample_3d(image.data_zyxc, mask_view, np.random.default_rng(0), (4, 16, 16), spacing)
    assert crop.shape == (4, 16, 16, 1) and set(np.unique(mask)) <= {0, 1, 2}
    with pytest.raises(InputError, match="single-channel"):
        volume_io.ZYXCView(np.zeros((2, 3, 3, 2)), (0, 1, 2, 3)).zyx()


def test_zarr_missing_array_is_one_line_error(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("raw", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(InputError, match="cannot open Zarr"):
        volume_io.open_volume(str(tmp_path / "g.zarr/labels"))
    with pytest.raises(InputError, match="no such Zarr store"):
        volume_io.open_volume(str(tmp_path / "none.zarr"))


def test_2d_hdf5_and_zarr_datasets_are_refused(tmp_path):
    with h5py.File(tmp_path / "flat.h5", "w") as handle:
        handle.create_dataset("image", data=np.zeros((8, 8)))
    zarr.open_array(str(tmp_path / "flat.zarr"), mode="w", shape=(8, 8), dtype="uint8")
    for address in (f"{tmp_path}/flat.h5/image", str(tmp_path / "flat.zarr")):
        with pytest.raises(InputError, match="2D data"):
            volume_io.open_volume(address)
