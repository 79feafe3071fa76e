"""build_lmdb.py with volumes (TIFF stacks, OME-Zarr, HDF5) and --mask_type instances (issue #14)."""
import os

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from lmdb_helpers import read_db

import build_lmdb
from segkit import lmdb_format

FIB = "/work/shared/data/neuroproof-fib-sample"
SPACING = [0.04, 0.01, 0.01]


def volume_pair(seed, shape=(6, 20, 24)):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[:, 4:12, 5:15] = 1
    mask[2:5, 14:18, 16:22] = 2
    return rng.integers(0, 4000, shape).astype(np.uint16), mask


def build(tmp_path, images, masks, **kwargs):
    kwargs = {"train_fraction": 0.5, "workers": 1, "progress": False, **kwargs}
    return build_lmdb.build_databases(image_folder=str(images), mask_folder=str(masks),
                                      output_folder=str(tmp_path / "out"), dataset_name="ds", **kwargs)


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def write_tiff_stacks(root, count=2, imagej=True):
    os.makedirs(root / "images"), os.makedirs(root / "masks")
    pairs = [volume_pair(i) for i in range(count)]
    for i, (image, mask) in enumerate(pairs):
        extra = {"imagej": True, "resolution": (1 / SPACING[2], 1 / SPACING[1]),
                 "metadata": {"axes": "ZYX", "spacing": SPACING[0], "unit": "um"}} if imagej else {"metadata": {"axes": "ZYX"}}
        tifffile.imwrite(root / "images" / f"v{i}.tif", image, **extra)
        tifffile.imwrite(root / "masks" / f"v{i}.tif", mask, metadata={"axes": "ZYX"})
    return root / "images", root / "masks", pairs


def check_volume_databases(tmp_path, pairs, spacing=SPACING):
    seen = {}
    for split in ("train", "test"):
        meta, recs = read_db(str(tmp_path / "out" / f"{split}-ds.lmdb"))
        assert meta["spatial_rank"] == 3 and meta["voxel_size_zyx_um"] == pytest.approx(spacing)
        assert meta["sources"][0]["depth"] == 6 and meta["number_classes"] == 3
        for record in recs:
            assert record.image_hwc.ndim == 4 and record.mask_hw.ndim == 3 and len(record.origin) == 3
            seen[record.image_hwc.tobytes()] = record.mask_hw
    for image, mask in pairs:  # stored whole, voxel for voxel
        np.testing.assert_array_equal(seen[image[..., None].tobytes()], mask)


def test_tiff_stacks_build_as_volumes_with_the_imagej_voxel_size(tmp_path):
    images, masks, pairs = write_tiff_stacks(tmp_path)
    summary = build(tmp_path, images, masks)
    check_volume_databases(tmp_path, pairs)
    assert "voxel size z,y,x = 0.04, 0.01, 0.01 um" in summary.format()


def test_stack_without_voxel_size_is_refused_naming_the_flag_then_built_with_it(tmp_path, capsys):
    images, masks, pairs = write_tiff_stacks(tmp_path, imagej=False)
    argv = ["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder", str(tmp_path / "out"),
            "--dataset_name", "ds", "--workers", "1"]
    assert build_lmdb.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "no voxel size" in err[0] and "--voxel_size z,y,x" in err[0], err
    assert build_lmdb.main(argv + ["--voxel_size", "0.04,0.01,0.01"]) == 0
    check_volume_databases(tmp_path, pairs)


def test_volume_tiles_per_axis(tmp_path):
    images, masks, pairs = write_tiff_stacks(tmp_path)
    build(tmp_path, images, masks, use_tiling=True, tile_size="4,16,16")
    meta, recs = read_db(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["tile_size"] == [4, 16, 16] and len(recs) == 2 * 2 * 2  # z 6 -> 0,2; y 20 -> 0,4; x 24 -> 0,8
    assert {r.mask_hw.shape for r in recs} == {(4, 16, 16)}
    assert sorted(int(i) for i in meta["class_records"][2]) == sorted(
        i for i, r in enumerate(recs) if (r.mask_hw == 2).any())


def write_ome_zarr(path, czyx, scale_czyx):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=czyx.shape, dtype=czyx.dtype)[...] = czyx
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale_czyx)}]}]}]


def test_ome_zarr_images_with_plain_zarr_masks(tmp_path):
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    pairs = [volume_pair(i) for i in range(2)]
    for i, (image, mask) in enumerate(pairs):
        write_ome_zarr(tmp_path / "images" / f"v{i}.zarr", image[None], [1.0] + SPACING)
        zarr.open_array(str(tmp_path / "masks" / f"v{i}.zarr"), mode="w", shape=mask.shape, dtype=mask.dtype,
                        dimension_names=["z", "y", "x"])[...] = mask
    build(tmp_path, tmp_path / "images", tmp_path / "masks", image_format="zarr")
    check_volume_databases(tmp_path, pairs)


def test_hdf5_raw_and_labels_in_one_file_by_default_or_named_datasets(tmp_path):
    os.makedirs(tmp_path / "vols")
    pairs = [volume_pair(i) for i in range(2)]
    for i, (image, mask) in enumerate(pairs):
        with h5py.File(tmp_path / "vols" / f"v{i}.h5", "w") as handle:
            handle.create_dataset("raw", data=image).attrs["element_size_um"] = SPACING
            handle.create_dataset("labels", data=mask)
            handle.create_dataset("other/seg", data=mask)
    build(tmp_path, tmp_path / "vols", tmp_path / "vols", image_format="h5")
    check_volume_databases(tmp_path, pairs)
    build(tmp_path, tmp_path / "vols", tmp_path / "vols", image_format="h5", image_dataset="raw",
          mask_dataset="other/seg", overwrite=True, voxel_size="0.05,0.01,0.01")
    check_volume_databases(tmp_path, pairs, [0.05, 0.01, 0.01])


def touching_nuclei():
    """Two touching square objects (ids 1, 2) and one apart (id 7) in a mostly empty image."""
    labels = np.zeros((40, 40), np.uint16)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2
    labels[25:35, 25:35] = 7
    return labels


def test_2d_instances_become_the_distance_target_by_default_and_three_class_on_request(tmp_path):
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    for i in range(2):
        tifffile.imwrite(tmp_path / "images" / f"n{i}.tif", np.full((40, 40), 100 + i, np.uint8))
        tifffile.imwrite(tmp_path / "masks" / f"n{i}.tif", touching_nuclei())
    summary = build(tmp_path, tmp_path / "images", tmp_path / "masks", mask_type="instances")
    meta, (record,) = read_db(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["mask_type"] == "instances" and meta["number_classes"] == 6 == summary.number_classes
    assert meta["instance_target"]["target"] == "distance" and "sparse" in meta["instance_target"]["reason"]
    target = record.mask_hw
    assert target[0, 0] == 0 and target[5, 10] == 1 and target[10, 14] == 1 and target[10, 15] == 1
    assert target[10, 10] == 5 and target[10, 20] == 5  # each object's deepest level, apart from the other's
    assert set(np.unique(target[6:14, 6:14])) <= {2, 3, 4, 5} and target[6, 10] < target[10, 10]  # deeper inside
    assert "distance target" in summary.format()

    summary = build(tmp_path, tmp_path / "images", tmp_path / "masks", mask_type="instances",
                    instance_target="three_class", overwrite=True)
    meta, (record,) = read_db(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["number_classes"] == 3 == summary.number_classes and meta["instance_target"]["target"] == "three_class"
    target = record.mask_hw
    assert target[10, 10] == 1 and target[5, 10] == 2 and target[0, 0] == 0
    assert target[10, 14] == 2 and target[10, 15] == 2  # the touching columns are boundary on both sides
    assert (target[5:15, 5:25] == 1).sum() == 8 * 8 * 2  # interiors stay apart
    assert "three_class target" in summary.format()


def test_dense_3d_labels_become_a_per_section_boundary_target(tmp_path):
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    z, y, x = np.indices((4, 16, 16))
    labels = (1 + y // 8 * 2 + x // 8 + 10 * (z // 2)).astype(np.uint16)  # dense: no background at all
    for i in range(2):
        tifffile.imwrite(tmp_path / "images" / f"d{i}.tif", np.zeros((4, 16, 16), np.uint8), imagej=True,
                         resolution=(100, 100), metadata={"axes": "ZYX", "spacing": 0.05, "unit": "um"})
        tifffile.imwrite(tmp_path / "masks" / f"d{i}.tif", labels, photometric="minisblack", metadata={"axes": "ZYX"})
    summary = build(tmp_path, tmp_path / "images", tmp_path / "masks", mask_type="instances")
    meta, (record,) = read_db(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["instance_target"]["target"] == "boundary" and summary.number_classes == 2
    section = np.zeros((16, 16), np.uint8)
    section[[7, 8], :] = 1
    section[:, [7, 8]] = 1
    for z_index in range(4):  # z changes of the label (between sections 1 and 2) do not mark a boundary
        np.testing.assert_array_equal(record.mask_hw[z_index], section)
    build(tmp_path, tmp_path / "images", tmp_path / "masks", mask_type="instances", instance_target="three_class",
          overwrite=True)
    assert lmdb_format.read_metadata(str(tmp_path / "out" / "train-ds.lmdb"))["instance_target"]["reason"] \
        == "--instance_target three_class"


@pytest.mark.parametrize("mask, message", [
    (np.full((40, 40), 1.5, np.float32), "not an integer type"),
    (np.full((40, 40), -3, np.int32), "negative ids"),
])
def test_bad_instance_masks_are_one_line_errors(tmp_path, capsys, mask, message):
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    for i in range(2):
        tifffile.imwrite(tmp_path / "images" / f"n{i}.tif", np.zeros((40, 40), np.uint8))
        tifffile.imwrite(tmp_path / "masks" / f"n{i}.tif", mask)
    argv = ["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"), "--output_folder",
            str(tmp_path / "out"), "--dataset_name", "ds", "--workers", "1", "--mask_type", "instances"]
    assert build_lmdb.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and message in err[0], err
    assert build_lmdb.main(argv[:-2] + ["--instance_target", "boundary"]) == 2
    assert "only applies with --mask_type instances" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FIB), reason="FIB-SEM sample not present")
def test_fib_sem_sample_builds_with_instance_masks(tmp_path):
    summary = build(tmp_path, f"{FIB}/images", f"{FIB}/masks", mask_type="instances",
                    test_list=f"{FIB}/test_files.txt", workers=2)
    meta, (record,) = read_db(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["spatial_rank"] == 3 and meta["voxel_size_zyx_um"] == pytest.approx([0.01] * 3)
    assert meta["instance_target"]["target"] == "boundary" and record.mask_hw.shape == (200, 250, 250)
    assert 0.05 < summary.splits["train"].fractions()[1] < 0.2  # membranes: about a tenth of the voxels
    assert [s["file"] for s in lmdb_format.read_metadata(str(tmp_path / "out" / "test-ds.lmdb"))["sources"]] \
        == ["test_z200-249.tif"]
