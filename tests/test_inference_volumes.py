"""inference_unet.py on volumes (issue #15): a tiny untrained 3D UNet exported through the project's serving
module; tiled == whole-volume, out of core with bounded memory, TIFF stack / HDF5 / OME-Zarr inputs, a 2-D model
section by section, the voxel size carried to the outputs, volume metrics, bad inputs in one line."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from conftest import ROOT
from savedmodel_helpers import TINY_UNET_SIZE_FACTOR, build_tiny_unet, export_keras, tiny_unet_radius

import inference_unet as inf
from segkit import image_io, metrics, volume_io

ANISOTROPIC = (0.04, 0.004, 0.004)
ISOTROPIC = (0.01, 0.01, 0.01)


def export_unet3d(export_dir, voxel_size, depth, classes=2, seed=0):
    """An untrained unet3d, exported as train_unet.py does (training.export's serving module, metadata per axis)."""
    from segkit.training.export import export_untrained_volume_model

    return export_untrained_volume_model(export_dir, dict(depth=depth, base_filters=4, voxel_size=list(voxel_size)),
                                         classes, seed, training_tile_size=(16, 16, 16))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("volume_models")
    return {
        "aniso": export_unet3d(str(root / "aniso"), ANISOTROPIC, depth=2),
        "iso": export_unet3d(str(root / "iso"), ISOTROPIC, depth=1),
        "2d": export_keras(str(root / "2d"), build_tiny_unet(1, 2, seed=3), size_factor=TINY_UNET_SIZE_FACTOR,
                           radius=tiny_unet_radius()),
    }


def blob_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    volume = 100 + 60 * np.sin(z / 3.0) * np.cos(y / 7.0) * np.sin(x / 5.0) + rng.normal(0, 8, shape)
    return np.clip(volume, 0, 255).astype(np.uint8)


def write_tiff_stack(path, volume, spacing=ANISOTROPIC):
    tifffile.imwrite(path, volume, imagej=True, resolution=(1 / spacing[2], 1 / spacing[1]),
                     metadata={"axes": "ZYX", "spacing": spacing[0], "unit": "micron"})


def write_ome_zarr(path, volume, spacing=ANISOTROPIC, chunks=(8, 32, 32)):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=volume, chunks=chunks)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"}
                                                             for a in "zyx"],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": list(spacing)}]}]}]


def write_h5(path, volume, spacing=ANISOTROPIC, name="raw"):
    with h5py.File(path, "w") as fh:
        fh.create_dataset(name, data=volume, chunks=(4, 32, 32)).attrs["element_size_um"] = spacing


def run(model, images, out, *extra):
    return inf.main(["--saved_model_filepath", model, "--image_folder", str(images), "--output_folder", str(out),
                     *map(str, extra)])


def read_volume(path):
    with volume_io.open_volume(str(path)) as volume:
        return np.asarray(volume.data_zyxc), volume.spacing_zyx_um


# --- tiled == whole volume ------------------------------------------------------------------------

_EXACT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import inference_unet
    for argv in json.loads(sys.argv[2]):
        assert inference_unet.main(argv) == 0, argv
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind,shape,tile", [
    ("aniso", (12, 96, 80), "4,16,16"),   # z radius 0: z tiles without halo; y, x halo 24 on interior edges
    ("iso", (40, 48, 44), "8,16,16"),     # halo in every axis; tiles inside, at and clipped to each border
])
def test_tiled_equals_whole_volume_exactly(saved, tmp_path, kind, shape, tile):
    """Bit for bit under oneDNN, whose per-voxel sums do not depend on the tile shape (TensorFlow's Eigen
    convolutions re-block with the shape: there tiles differ from the whole by float rounding, < 1e-6)."""
    os.makedirs(tmp_path / "images")
    write_tiff_stack(tmp_path / "images" / "vol.tif", blob_volume(shape))
    runs = {"whole": "1024", "tiled": tile}
    argvs = [["--saved_model_filepath", saved[kind], "--image_folder", str(tmp_path / "images"), "--output_folder",
              str(tmp_path / name), "--tile_size", size, "--save_probabilities", "1", "--batch_size", "2"]
             for name, size in runs.items()]
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", _EXACT, ROOT, json.dumps(argvs)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = tifffile.imread(tmp_path / "whole" / "probabilities" / "vol.tif")
    tiled = tifffile.imread(tmp_path / "tiled" / "probabilities" / "vol.tif")
    assert whole.shape == (shape[0], 2, shape[1], shape[2])  # ZCYX
    assert np.array_equal(tiled, whole)
    assert "1 tile(s)" in result.stderr and "tile(s) of" in result.stderr
    assert np.array_equal(tifffile.imread(tmp_path / "tiled" / "vol.tif"), tifffile.imread(tmp_path / "whole" / "vol.tif"))


def test_tiled_volume_matches_whole_in_process(saved, tmp_path):
    """The same in this process, whatever convolution backend TensorFlow chose: equal to float rounding."""
    os.makedirs(tmp_path / "images")
    write_tiff_stack(tmp_path / "images" / "vol.tif", blob_volume((12, 72, 64)))
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "whole", "--save_probabilities", 1) == 0
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "tiled", "--tile_size", "4,16,32",
               "--save_probabilities", 1) == 0
    whole = tifffile.imread(tmp_path / "whole" / "probabilities" / "vol.tif")
    tiled = tifffile.imread(tmp_path / "tiled" / "probabilities" / "vol.tif")
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)


def test_tta_on_a_volume_is_the_mean_of_the_eight_mirrorings_and_tiling_keeps_it(saved, tmp_path):
    """--tta 1 on a volume model: the mean over the 8 mirrorings of z, y, x of the mirrored model's
    prediction (checked against the SavedModel called directly), and tiled equals whole as without TTA."""
    volume = blob_volume((12, 48, 40))
    os.makedirs(tmp_path / "images")
    write_tiff_stack(tmp_path / "images" / "vol.tif", volume)
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "whole", "--save_probabilities", 1, "--tta", 1) == 0
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "tiled", "--save_probabilities", 1, "--tta", 1,
               "--tile_size", "4,16,16") == 0
    whole = tifffile.imread(tmp_path / "whole" / "probabilities" / "vol.tif")  # ZCYX
    tiled = tifffile.imread(tmp_path / "tiled" / "probabilities" / "vol.tif")
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)

    from segkit.inference.predictor import MIRRORS_3D, SavedModelPredictor

    predictor = SavedModelPredictor(saved["aniso"])
    x = image_io.normalize(volume[..., None].astype(np.float32), *image_io.image_stats(volume[..., None]))[None]
    expected = np.mean([np.flip(predictor(np.ascontiguousarray(np.flip(x, axes))), axes) for axes in MIRRORS_3D], axis=0)
    assert len(set(MIRRORS_3D)) == 8
    np.testing.assert_allclose(np.moveaxis(whole, 1, -1), expected[0], atol=1e-5, rtol=0)
    plain = predictor(x)[0]
    assert np.abs(plain - expected[0]).max() > 1e-3  # the mirrorings of a random-weight model do disagree


# --- formats, voxel size ------------------------------------------------------------------------------


def test_tiff_stack_hdf5_and_ome_zarr_inputs_give_one_result_with_the_voxel_size(saved, tmp_path):
    volume = blob_volume((8, 48, 40), seed=1)
    for folder, write, name in (("tif", write_tiff_stack, "vol.tif"), ("h5", write_h5, "vol.h5"),
                                ("zarr", write_ome_zarr, "vol.ome.zarr")):
        os.makedirs(tmp_path / folder)
        write(tmp_path / folder / name, volume)
        assert run(saved["aniso"], tmp_path / folder, tmp_path / f"out-{folder}", "--image_format", folder,
                   "--save_probabilities", 1, "--overlay", 1) == 0
    masks = {f: tifffile.imread(tmp_path / f"out-{f}" / "vol.tif") for f in ("tif", "h5", "zarr")}
    probs = {f: tifffile.imread(tmp_path / f"out-{f}" / "probabilities" / "vol.tif") for f in masks}
    assert masks["tif"].shape == (8, 48, 40) and probs["tif"].shape == (8, 2, 48, 40)
    for f in ("h5", "zarr"):
        assert np.array_equal(masks[f], masks["tif"]) and np.array_equal(probs[f], probs["tif"])
    for f in masks:  # the ImageJ hyperstack carries the voxel size: z spacing, y/x resolution, unit
        data, spacing = read_volume(tmp_path / f"out-{f}" / "vol.tif")
        assert np.allclose(spacing, ANISOTROPIC) and data.shape == (8, 48, 40, 1)
        assert os.path.isfile(tmp_path / f"out-{f}" / "overlays" / "vol.png")


def test_ome_zarr_output_carries_the_voxel_size(saved, tmp_path):
    os.makedirs(tmp_path / "images")
    write_h5(tmp_path / "images" / "vol.h5", blob_volume((6, 40, 32)))
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "out", "--image_format", "h5", "--output_format", "zarr",
               "--save_probabilities", 1) == 0
    for path, axes in ((tmp_path / "out" / "vol.zarr", "zyx"), (tmp_path / "out" / "probabilities" / "vol.zarr", "czyx")):
        multiscales = zarr.open_group(str(path), mode="r").attrs["multiscales"][0]
        assert "".join(a["name"] for a in multiscales["axes"]) == axes
        scale = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"]
        assert np.allclose(scale[-3:], ANISOTROPIC) and multiscales["axes"][-1]["unit"] == "micrometer"
    mask, spacing = read_volume(tmp_path / "out" / "vol.zarr")
    assert mask.shape == (6, 40, 32, 1) and np.allclose(spacing, ANISOTROPIC)


# --- a 2-D model on a stack -------------------------------------------------------------------------


def test_a_2d_model_on_a_stack_equals_the_2d_model_on_each_section(saved, tmp_path, caplog):
    volume = blob_volume((5, 40, 44), seed=2)
    os.makedirs(tmp_path / "stack")
    os.makedirs(tmp_path / "sections")
    write_tiff_stack(tmp_path / "stack" / "vol.tif", volume)
    for z, section in enumerate(volume):
        tifffile.imwrite(tmp_path / "sections" / f"s{z}.tif", section)
    caplog.set_level("INFO")
    assert run(saved["2d"], tmp_path / "stack", tmp_path / "out", "--save_probabilities", 1) == 0
    assert "section by section" in caplog.text
    # the sections, normalized with the whole stack's statistics as the stack is
    mean, std = image_io.image_stats(volume[..., None])
    predict = inf.SavedModelPredictor(saved["2d"])
    from segkit import tiling

    sections = [tiling.predict_tiled(section[..., None], predict, 1024, 16, TINY_UNET_SIZE_FACTOR,
                                     preprocess=lambda t: image_io.normalize(t, mean, std)) for section in volume]
    probs = np.moveaxis(tifffile.imread(tmp_path / "out" / "probabilities" / "vol.tif"), 1, -1)
    assert np.array_equal(probs, np.stack(sections))
    assert run(saved["2d"], tmp_path / "stack", tmp_path / "refused", "--slice_wise", 0) == 2


# --- out of core ---------------------------------------------------------------------------------------

_PEAK = textwrap.dedent("""
    import json, resource, subprocess, sys
    child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import inference_unet; "
                            "sys.exit(inference_unet.main(sys.argv[2:]))", *sys.argv[1:]], capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"code": child.returncode, "peak_kb": peak_kb, "stderr": child.stderr[-3000:]}))
""")


def _peak_run(model, images, out, *extra):
    argv = [ROOT, "--saved_model_filepath", model, "--image_folder", str(images), "--output_folder", str(out),
            "--image_format", "zarr", "--output_format", "zarr", "--save_probabilities", "1", *map(str, extra)]
    result = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0, figures["stderr"]
    return figures


@pytest.mark.slow
def test_a_volume_over_the_memory_limit_segments_out_of_core_with_bounded_rss(saved, tmp_path):
    small, large = (32, 128, 128), (96, 256, 256)  # the same tile shape (16 x 112 x 112 with the y, x halo)
    for name, shape in (("small", small), ("large", large)):
        os.makedirs(tmp_path / name)
        write_ome_zarr(tmp_path / name / "vol.zarr", blob_volume(shape), chunks=(16, 64, 64))
    ooc_small = _peak_run(saved["aniso"], tmp_path / "small", tmp_path / "ooc-small", "--memory_limit_mb", 1,
                          "--tile_size", "16,64,64")
    ooc_large = _peak_run(saved["aniso"], tmp_path / "large", tmp_path / "ooc-large", "--memory_limit_mb", 1,
                          "--tile_size", "16,64,64")
    mem_small = _peak_run(saved["aniso"], tmp_path / "small", tmp_path / "mem-small", "--tile_size", "16,64,64")
    assert "out of core" in ooc_large["stderr"] and "in memory" in mem_small["stderr"]
    for kind in ("vol.zarr", os.path.join("probabilities", "vol.zarr")):
        a, _ = read_volume(tmp_path / "ooc-small" / kind)
        b, _ = read_volume(tmp_path / "mem-small" / kind)
        assert np.array_equal(a, b), kind
    working_set = inf.working_set_bytes(*large, 1, 2)  # 75 MB of float32 volume + probabilities
    grew = (ooc_large["peak_kb"] - ooc_small["peak_kb"]) * 1024
    # measured on a loaded 2-core machine: +20 MB for 12x the voxels (allocator noise of 12x the tiles; the
    # image, the probabilities and the mask are never held whole)
    assert grew < working_set / 3, f"peak RSS grew {grew / 2**20:.0f} MB from {small} to {large} out of core"


# --- metrics, bad input ------------------------------------------------------------------------------


def test_metrics_over_volumes_from_volume_masks(saved, tmp_path):
    volume = blob_volume((6, 32, 40), seed=4)
    truth = (volume > 100).astype(np.uint8)
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    write_ome_zarr(tmp_path / "images" / "vol.zarr", volume)
    write_ome_zarr(tmp_path / "masks" / "vol.zarr", truth)
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "out", "--image_format", "zarr", "--mask_folder",
               tmp_path / "masks") == 0
    predicted = tifffile.imread(tmp_path / "out" / "vol.tif")
    expected = metrics.scores(metrics.confusion_matrix(truth, predicted, 2))
    with open(tmp_path / "out" / "metrics.csv", newline="") as fh:
        rows = {row["image"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"vol.zarr", "ALL"}
    expected_row = metrics.flat_row({"image": "vol.zarr"}, expected)
    for key in ("pixel_accuracy", "iou_0", "iou_1", "dice_0", "dice_1"):
        assert float(rows["vol.zarr"][key]) == pytest.approx(expected_row[key], abs=1e-9), key


@pytest.mark.parametrize("case,message", [
    ("2d_image", "a 2-D image, but the model segments volumes"),
    ("h5_two_datasets", "several datasets (datasets: a, b); address one as"),
    ("slice_wise_3d", "--slice_wise 1 applies a 2-D model"),
    ("tile_two_values", "--tile_size 16,16: give one number or 3"),
])
def test_bad_volume_inputs_give_one_line_and_exit_2(saved, tmp_path, capsys, case, message):
    os.makedirs(tmp_path / "images")
    extra = []
    if case == "2d_image":
        tifffile.imwrite(tmp_path / "images" / "flat.tif", blob_volume((1, 32, 32))[0])
    else:
        with h5py.File(tmp_path / "images" / "vol.h5", "w") as fh:
            fh["a"] = fh["b"] = blob_volume((4, 16, 16))
        extra = ["--image_format", "h5"]
    extra += {"slice_wise_3d": ["--slice_wise", 1], "tile_two_values": ["--tile_size", "16,16"]}.get(case, [])
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "out", *extra) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("images:")]  # tqdm
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("compression", [None, "zlib"])  # memory-mapped pages; tifffile's zarr store
def test_a_tiff_stack_out_of_core_writes_the_tiff_stack_of_in_memory(saved, tmp_path, compression):
    os.makedirs(tmp_path / "images")
    volume = blob_volume((6, 40, 48), seed=5)
    tifffile.imwrite(tmp_path / "images" / "vol.tif", volume, imagej=True, compression=compression,
                     resolution=(250.0, 250.0), metadata={"axes": "ZYX", "spacing": 0.04, "unit": "micron"})
    common = ["--tile_size", "2,16,16", "--save_probabilities", 1]
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "mem", *common) == 0
    assert run(saved["aniso"], tmp_path / "images", tmp_path / "ooc", *common, "--memory_limit_mb", 0.001) == 0
    for name in ("vol.tif", os.path.join("probabilities", "vol.tif")):
        ooc, spacing = read_volume(tmp_path / "ooc" / name)
        mem, _ = read_volume(tmp_path / "mem" / name)
        assert np.array_equal(ooc, mem) and np.allclose(spacing, ANISOTROPIC), name


def test_a_tile_larger_than_the_available_memory_is_warned_about(saved, tmp_path, monkeypatch, caplog):
    """The model's activations for a tile with its halo are estimated from the UNet's base filters; more than
    the memory available now gives one warning that names the fix (the run would otherwise be killed)."""
    import collections
    import logging

    import psutil

    from segkit.inference import settings

    os.makedirs(tmp_path / "images")
    write_tiff_stack(tmp_path / "images" / "vol.tif", blob_volume((4, 16, 16)))
    memory = collections.namedtuple("memory", "available")
    options = dict(saved_model_filepath=saved["iso"], image_folder=str(tmp_path / "images"),
                   output_folder=str(tmp_path / "out"), tile_size="64")
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**40))
    settings.resolve_settings(**options)
    assert "more than the" not in caplog.text
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**20))
    settings.resolve_settings(**options)
    warned = [r.getMessage() for r in caplog.records if "more than the" in r.getMessage()]
    assert len(warned) == 1 and "pass a smaller --tile_size" in warned[0] and "bytes per voxel" in warned[0]


def test_the_default_volume_tile_shrinks_to_fit_the_memory_available_and_a_flag_wins(saved, tmp_path, monkeypatch):
    """Without --tile_size a volume model's zone is DEFAULT_VOLUME_TILE_SIZE per axis when its working set
    (with the halo) fits half the free memory; with less memory the zone shrinks (multiples of the size
    factor) until it fits, giving up first the axis whose halo costs least; --tile_size always wins."""
    import collections

    import psutil

    from segkit.inference import settings

    os.makedirs(tmp_path / "images")
    write_tiff_stack(tmp_path / "images" / "vol.tif", blob_volume((4, 16, 16)))
    memory = collections.namedtuple("memory", "available")
    options = dict(saved_model_filepath=saved["aniso"], image_folder=str(tmp_path / "images"),
                   output_folder=str(tmp_path / "out"))
    full = (settings.DEFAULT_VOLUME_TILE_SIZE,) * 3
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**40))
    resolved = settings.resolve_settings(**options)
    assert resolved.tile_size == full
    halo = np.array(resolved.halo)
    need = float(settings._model_bytes(resolved.meta, np.prod(np.array(full) + 2 * halo)))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=int(need)))  # half of it is the budget
    zone = settings.resolve_settings(**options).tile_size
    factors = np.array(resolved.meta.size_factor)
    assert zone != full and all(np.array(zone) % factors == 0)
    assert settings._model_bytes(resolved.meta, np.prod(np.array(zone) + 2 * halo)) <= need / 2
    assert zone[0] <= min(zone[1:])  # this model's z halo is the smallest: z gives way first
    assert settings.resolve_settings(**options, tile_size="4,32,32").tile_size == (4, 32, 32)
