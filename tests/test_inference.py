"""inference_unet.py: SavedModels through the CLI -- tiled == untiled, out-of-core, restart, faults, shards.

Models are the tiny SavedModels of tests/savedmodel_helpers.py, exported once per session.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from conftest import ROOT, signal_group_when_ready
from savedmodel_helpers import (
    TINY_UNET_SIZE_FACTOR,
    build_tiny_unet,
    chain_numpy,
    chain_radius,
    export_chain,
    export_keras,
    export_pointwise,
    export_savedmodel,
    tiny_unet_radius,
    train_steps,
)

import inference_unet as inf
from segkit import image_io, metrics, model_metadata, tiling
from segkit.inference import regions

CHAIN = [("conv", 3), ("pool", 2), ("conv", 3), ("pool", 2), ("conv", 3), ("up", 2), ("conv", 3), ("up", 2),
         ("conv", 3)]
SIZES = [(37, 50), (64, 64), (130, 75), (20, 300)]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("savedmodels")
    return {
        "pointwise": export_pointwise(str(root / "pointwise"), channels=1, number_classes=2, size_factor=8),
        "chain": export_chain(str(root / "chain"), CHAIN),
        "unet": export_keras(str(root / "unet"), build_tiny_unet(1, 3, seed=1), size_factor=TINY_UNET_SIZE_FACTOR,
                             radius=tiny_unet_radius()),
    }


def _write_images(folder, sizes=SIZES, channels=1, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[:h, :w]
        image = 2000 + 800 * np.sin(yy / 5.0) * np.cos(xx / 7.0) + rng.normal(0, 100, (h, w))
        image = np.repeat(image[..., None], channels, axis=2) if channels > 1 else image
        name = f"img{i}.tif"
        tifffile.imwrite(os.path.join(folder, name), image.astype(np.uint16))
        names.append(name)
    return names


def _run(model, images, out, *extra):
    return inf.main(["--saved_model_filepath", model, "--image_folder", str(images), "--output_folder", str(out),
                     *map(str, extra)])


def _read_probs(path):
    """A probabilities TIFF, stored channel-first (K, H, W) for Fiji, as (H, W, K)."""
    return np.moveaxis(tifffile.imread(path), 0, -1)


def _near_tie(probs, tie=1e-4):
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) < tie


# --- tiled == untiled through the CLI ----------------------------------------------------------


@pytest.mark.parametrize("border", ["zero", "mirror"])
@pytest.mark.parametrize("model", ["pointwise", "chain", "unet"])
def test_cli_tiled_equals_untiled(models, tmp_path, model, border):
    names = _write_images(tmp_path / "images")
    common = ["--save_probabilities", "1", "--border", border]
    assert _run(models[model], tmp_path / "images", tmp_path / "tiled", "--tile_size", 16, "--batch_size", 3, *common) == 0
    assert _run(models[model], tmp_path / "images", tmp_path / "whole", "--tile_size", 4096, *common) == 0
    for name in names:
        tiled = tifffile.imread(tmp_path / "tiled" / name)
        whole = tifffile.imread(tmp_path / "whole" / name)
        p_tiled = _read_probs(tmp_path / "tiled" / "probabilities" / name)
        p_whole = _read_probs(tmp_path / "whole" / "probabilities" / name)
        assert tiled.dtype == np.uint8 and tiled.shape == p_tiled.shape[:2] == tifffile.imread(tmp_path / "images" / name).shape
        # Same arithmetic, but oneDNN picks its kernel blocking by input shape, so the last bit of a
        # float32 sum can differ between a 16-pixel tile and the whole image (seen on AMD EPYC for the
        # pointwise model): equality up to float rounding, classes equal away from near-ties.
        np.testing.assert_allclose(p_tiled, p_whole, atol=1e-6 if model == "pointwise" else 2e-5, rtol=0)
        ties = _near_tie(p_whole)
        assert np.array_equal(tiled[~ties], whole[~ties])


@pytest.mark.parametrize("border", ["zero", "mirror", None])
def test_savedmodel_matches_its_numpy_twin_on_the_whole_image(models, tmp_path, border):
    """The CLI's tiled result is the model applied to the whole-image-normalized image: by default
    (None) the original's np.pad((0, 3), (0, 3)), mode='reflect') to the size factor, the model's zero
    padding beyond; with --border mirror, the image's mirror extension by the halo."""
    names = _write_images(tmp_path / "images", sizes=[(45, 61)])
    flags = [] if border is None else ["--border", border]
    assert _run(models["chain"], tmp_path / "images", tmp_path / "out", "--tile_size", 16, "--save_probabilities", 1,
                *flags) == 0
    image = tifffile.imread(tmp_path / "images" / names[0])[..., None]
    mean, std = image_io.image_stats(image)
    normalized = image_io.normalize(image, mean, std)
    halo = 16  # chain radius 13, rounded up to the size factor 4
    assert chain_radius(CHAIN) == 13
    if border == "mirror":
        padded = image_io.mirror_pad(normalized, (halo, halo + 3), (halo, halo + 3))
        expected = chain_numpy(CHAIN)(padded[None])[0, halo : halo + 45, halo : halo + 61]
    else:
        padded = np.pad(normalized, ((0, 3), (0, 3), (0, 0)), mode="reflect")
        expected = chain_numpy(CHAIN)(padded[None])[0, :45, :61]
    np.testing.assert_allclose(_read_probs(tmp_path / "out" / "probabilities" / names[0]), expected, atol=2e-5)


@pytest.mark.parametrize("border", ["zero", "mirror"])
@pytest.mark.parametrize("size", [(9, 13), (100, 37), (64, 64)])
def test_unet_predict_fn_tiled_equals_untiled(models, size, border):
    """Many tile sizes and halos >= the radius, the SavedModel's forward pass called directly."""
    predict = inf.SavedModelPredictor(models["unet"])
    image = np.random.default_rng(3).normal(size=size + (1,)).astype(np.float32)
    halo = -(-tiny_unet_radius() // 4) * 4
    untiled = tiling.predict_tiled(image, predict, 256, halo, 4, border=border)
    ties = _near_tie(untiled)
    for tile, extra in [(4, 0), (8, 4), (16, 0), (32, 8)]:
        tiled = tiling.predict_tiled(image, predict, tile, halo + extra, 4, batch_size=4, border=border)
        np.testing.assert_allclose(tiled, untiled, atol=2e-5)
        assert np.array_equal(tiled.argmax(-1)[~ties], untiled.argmax(-1)[~ties])


def test_tta_is_exact_for_an_equivariant_model_and_tiles_exactly(models):
    image = np.random.default_rng(4).normal(size=(40, 52, 1)).astype(np.float32)
    pointwise = inf.SavedModelPredictor(models["pointwise"])
    plain = tiling.predict_tiled(image, pointwise, 64, 0, 8)
    np.testing.assert_allclose(tiling.predict_tiled(image, inf.with_tta(pointwise), 16, 0, 8), plain, atol=1e-6)
    chain = inf.with_tta(inf.SavedModelPredictor(models["chain"]))
    untiled = tiling.predict_tiled(image, chain, 64, 16, 4)
    np.testing.assert_allclose(tiling.predict_tiled(image, chain, 8, 16, 4, batch_size=2), untiled, atol=2e-5)
    without = tiling.predict_tiled(image, inf.SavedModelPredictor(models["chain"]), 64, 16, 4)
    assert np.abs(untiled - without).max() > 1e-3  # the chain is not flip-invariant: TTA did something


@pytest.mark.slow
def test_tiny_trained_unet_same_masks_tiled_and_untiled(tmp_path):
    """Train a tiny UNet a few steps on generated blobs, export it, segment tiled and untiled."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    images, masks = [], []
    for _ in range(32):
        cy, cx, r = rng.uniform(8, 24, 2).tolist() + [rng.uniform(4, 9)]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.int32)
        image = (mask * 1.5 + rng.normal(0, 0.5, (32, 32)))[..., None]
        images.append(image_io.normalize(image, *image_io.image_stats(image)))  # as inference will
        masks.append(mask)
    model = build_tiny_unet(1, 2, seed=0)
    losses = train_steps(model, np.array(images), np.array(masks), steps=24, learning_rate=3e-3)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    saved = export_keras(str(tmp_path / "trained"), model, size_factor=TINY_UNET_SIZE_FACTOR, radius=tiny_unet_radius())
    # a larger test image with many blobs
    big = np.zeros((150, 170))
    for _ in range(25):
        cy, cx, r = rng.uniform(0, 150), rng.uniform(0, 170), rng.uniform(4, 9)
        big[(np.mgrid[:150, :170][0] - cy) ** 2 + (np.mgrid[:150, :170][1] - cx) ** 2 < r**2] = 1
    os.makedirs(tmp_path / "images")
    tifffile.imwrite(tmp_path / "images" / "blobs.tif", (1000 + 300 * big + rng.normal(0, 100, big.shape)).astype(np.uint16))
    assert _run(saved, tmp_path / "images", tmp_path / "tiled", "--tile_size", 32, "--save_probabilities", 1) == 0
    assert _run(saved, tmp_path / "images", tmp_path / "whole", "--tile_size", 1024) == 0
    tiled = tifffile.imread(tmp_path / "tiled" / "blobs.tif")
    whole = tifffile.imread(tmp_path / "whole" / "blobs.tif")
    ties = _near_tie(_read_probs(tmp_path / "tiled" / "probabilities" / "blobs.tif"))
    assert np.array_equal(tiled[~ties], whole[~ties])
    assert ties.mean() < 0.01
    assert metrics.scores(metrics.confusion_matrix(big, whole, 2))["iou"][1] > 0.5  # it did learn the blobs


# --- out of core ------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import inference_unet
    model, small, big, out = sys.argv[2:6]

    def status_kb(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key))

    def run(folder, limit_mb):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = status_kb("VmRSS:")
        code = inference_unet.main(["--saved_model_filepath", model, "--image_folder", big, "--output_folder", folder,
                                    "--memory_limit_mb", limit_mb, "--tile_size", "512"])
        return {"code": code, "grew_kb": status_kb("VmHWM:") - before}

    # warm up: TensorFlow, the model and both paths' libraries loaded (a small image in memory and out of core)
    for limit in ("100000", "0.001"):
        assert inference_unet.main(["--saved_model_filepath", model, "--image_folder", small, "--output_folder",
                                    out + "-warm" + limit, "--memory_limit_mb", limit]) == 0
    print(json.dumps({"out_of_core": run(out, "64"), "in_memory": run(out + "-mem", "100000")}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_out_of_core_6000x6000_bounded_memory(models, tmp_path):
    height = width = 6000
    os.makedirs(tmp_path / "big")
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    image = (30000 + 20000 * np.sin(yy / 97.0) * np.cos(xx / 131.0)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big" / "big.tif", image, tile=(512, 512), compression="zlib")
    _write_images(tmp_path / "small", sizes=[(64, 64)])
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, ROOT, models["pointwise"], str(tmp_path / "small"),
                             str(tmp_path / "big"), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["out_of_core"]["code"] == 0 and figures["in_memory"]["code"] == 0
    assert "out of core" in result.stderr and "in memory" in result.stderr
    working_set = inf.working_set_bytes(height, width, 1, 2)  # 432 MB of float32 image + probabilities
    ooc, mem = (figures[k]["grew_kb"] * 1024 for k in ("out_of_core", "in_memory"))
    message = f"peak RSS grew {ooc / 2**20:.0f} MB out of core, {mem / 2**20:.0f} MB in memory"
    assert ooc < working_set / 3 and ooc < mem / 2, message
    with tifffile.TiffFile(tmp_path / "out" / "big.tif") as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].compression == 8  # zlib
        mask = tif.asarray()
    assert np.array_equal(mask, tifffile.imread(tmp_path / "out-mem" / "big.tif"))
    mean, std = image_io.image_stats(image[..., None])
    # the pointwise model's class 1 is "brighter than the whole image's mean"
    expected = image_io.normalize(image[..., None], mean, std)[..., 0] > 0
    assert mask.shape == (height, width) and np.array_equal(mask.astype(bool), expected)


def test_lazy_view_layout_matches_to_hwc():
    for shape in [(5, 7), (5, 7, 3), (3, 5, 7), (1, 5, 7), (5, 7, 1), (1, 1, 5, 7), (2, 5, 7), (6, 5, 7)]:
        array = np.arange(np.prod(shape)).reshape(shape)
        view = inf.LazyHWC(array, "x.tif")
        expected = image_io.to_hwc(array)
        assert view.shape == expected.shape, shape
        assert np.array_equal(view[1:4, 2:6], expected[1:4, 2:6]) and np.array_equal(view[::2, ::3], expected[::2, ::3])


@pytest.mark.parametrize("output_format", ["tif", "zarr"])
def test_out_of_core_writers_equal_in_memory(models, tmp_path, output_format):
    names = _write_images(tmp_path / "images", sizes=[(70, 90)], channels=1)
    assert _run(models["chain"], tmp_path / "images", tmp_path / "mem", "--tile_size", 16, "--save_probabilities", 1,
                "--probability_dtype", "uint8") == 0
    assert _run(models["chain"], tmp_path / "images", tmp_path / "ooc", "--tile_size", 16, "--save_probabilities", 1,
                "--probability_dtype", "uint8", "--memory_limit_mb", 0.001, "--output_format", output_format) == 0
    mem = tifffile.imread(tmp_path / "mem" / names[0])
    probs = _read_probs(tmp_path / "mem" / "probabilities" / names[0])
    assert probs.dtype == np.uint8 and probs.shape == (70, 90, 2)
    view, close = inf.open_any(str(tmp_path / "ooc" / (names[0] if output_format == "tif" else "img0.zarr")))
    ooc_probs, close_p = inf.open_any(str(tmp_path / "ooc" / "probabilities" / ("img0." + output_format)))
    try:
        assert np.array_equal(view[:, :][..., 0], mem)
        assert np.array_equal(ooc_probs[:, :], probs)
    finally:
        close()
        close_p()


# --- restart, faults, shards --------------------------------------------------------------------


def test_restart_skips_finished_outputs(models, tmp_path):
    names = _write_images(tmp_path / "images")
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "out", "--overlay", 1) == 0
    paths = [tmp_path / "out" / n for n in names] + [tmp_path / "out" / "overlays" / (n[:-4] + ".png") for n in names]
    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    os.remove(paths[1])  # as if the job died before this image
    summary = inf.segment_folder(saved_model_filepath=models["pointwise"], image_folder=str(tmp_path / "images"),
                                 output_folder=str(tmp_path / "out"), overlay=True)
    assert summary.segmented == [names[1]] and sorted(summary.skipped) == sorted(set(names) - {names[1]})
    assert all(os.stat(p).st_mtime_ns == stamps[p] for p in paths if p != paths[1])
    summary = inf.segment_folder(saved_model_filepath=models["pointwise"], image_folder=str(tmp_path / "images"),
                                 output_folder=str(tmp_path / "out"), overwrite=True)
    assert sorted(summary.segmented) == sorted(names)
    assert all(os.stat(tmp_path / "out" / n).st_mtime_ns != stamps[tmp_path / "out" / n] for n in names if n != names[1])
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # no temporaries left


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(models, tmp_path):
    names = _write_images(tmp_path / "images", sizes=[(20, 20)])
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [out / f".img0.tif.tmp-{host}-{dead.pid}-abcdefgh.tif",  # what kill -9 mid-image leaves
             out / "overlays" / f".img0.png.tmp-{host}-{dead.pid}-abcdefgh.png"]
    elsewhere = out / f".img9.tif.tmp-{host}-elsewhere-{dead.pid}-abcdefgh.tif"  # another machine's: may be live
    for path in [*stale, elsewhere]:
        path.write_bytes(b"partial")
    assert _run(models["pointwise"], tmp_path / "images", out, "--overlay", 1) == 0
    assert sorted(os.listdir(out)) == sorted([elsewhere.name, "overlays", *names])
    assert os.listdir(out / "overlays") == ["img0.png"]


@pytest.mark.slow
def test_sigterm_mid_image_exits_130_removes_its_temporary_and_a_rerun_finishes(models, tmp_path):
    """Slurm's SIGTERM (time limit, pre-emption, scancel) while a large image is written out of core."""
    _write_images(tmp_path / "images", sizes=[(64, 64)])
    os.rename(tmp_path / "images" / "img0.tif", tmp_path / "images" / "a_small.tif")
    yy, xx = np.mgrid[:3000, :3000]
    tifffile.imwrite(tmp_path / "images" / "b_big.tif", (2000 + 800 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint16))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "inference_unet.py"), "--saved_model_filepath", models["unet"],
           "--image_folder", str(tmp_path / "images"), "--output_folder", str(out), "--tile_size", "128",
           "--tta", "1", "--memory_limit_mb", "16"]  # out of core: the mask temporary grows tile by tile
    big_started = lambda proc: os.path.isdir(out) and any(n.startswith(".b_big.tif.") for n in os.listdir(out))  # noqa: E731
    proc, err = signal_group_when_ready(cmd, big_started, settle=0.3, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert sorted(os.listdir(out)) == ["a_small.tif"]  # the finished image stays; no temporary is left
    summary = inf.segment_folder(saved_model_filepath=models["unet"], image_folder=str(tmp_path / "images"),
                                 output_folder=str(out), tile_size=128)
    assert summary.segmented == ["b_big.tif"] and summary.skipped == ["a_small.tif"]
    assert tifffile.imread(out / "b_big.tif").shape == (3000, 3000)


def test_corrupt_and_wrong_channel_images_are_reported_and_skipped(models, tmp_path, caplog):
    names = _write_images(tmp_path / "images", sizes=[(40, 40), (50, 30)])
    (tmp_path / "images" / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    tifffile.imwrite(tmp_path / "images" / "rgb.tif", np.zeros((20, 20, 3), np.uint16))
    code = _run(models["pointwise"], tmp_path / "images", tmp_path / "out")
    assert code == inf.EXIT_IMAGES_FAILED
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len([m for m in errors if m.startswith("broken.tif")]) == 1
    assert any(m.startswith("rgb.tif") and "3 channel(s)" in m for m in errors)
    assert all("\n" not in m for m in errors)
    assert "2 segmented" in errors[-1] and "2 failed" in errors[-1]


def test_ground_truth_mask_map_from_the_flag_or_the_models_metadata(models, tmp_path, caplog):
    """0/255 ground truth: remapped by --mask_map 255:1, or by default with the map in the model's metadata."""
    names = _write_images(tmp_path / "images", sizes=[(40, 48), (33, 20)])
    os.makedirs(tmp_path / "truth01")
    os.makedirs(tmp_path / "truth255")
    rng = np.random.default_rng(3)
    for name in names:
        h, w = tifffile.imread(tmp_path / "images" / name).shape
        truth = rng.integers(0, 2, (h, w)).astype(np.uint8)
        tifffile.imwrite(tmp_path / "truth01" / name, truth)
        tifffile.imwrite(tmp_path / "truth255" / name, truth * 255)

    def scores(model, truth, *extra):
        out = tmp_path / f"out-{len(os.listdir(tmp_path))}"
        assert _run(model, tmp_path / "images", out, "--mask_folder", tmp_path / truth, *extra) == 0
        with open(out / "metrics.csv") as fh:
            return fh.read()

    reference = scores(models["pointwise"], "truth01")
    caplog.clear()
    assert scores(models["pointwise"], "truth255", "--mask_map", "255:1") == reference
    unmapped = scores(models["pointwise"], "truth255")
    assert unmapped != reference
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("outside 0..1 (255) and are not scored" in m and "use --mask_map 255:1" in m for m in warnings), warnings
    # A model trained on databases built with --mask_map 255:1 carries the map and applies it by default.
    mapped_model = tmp_path / "model_255"
    shutil.copytree(models["pointwise"], mapped_model)
    meta_path = model_metadata.metadata_path(str(mapped_model))
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["mask_map"] = {"255": 1}
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    assert scores(str(mapped_model), "truth255") == reference
    assert scores(str(mapped_model), "truth255", "--mask_map", "none") == unmapped
    assert _run(str(mapped_model), tmp_path / "images", tmp_path / "bad", "--mask_folder", tmp_path / "truth255",
                "--mask_map", "255=1") == 2


def test_shards_split_a_folder_without_overlap_or_gaps(models, tmp_path, monkeypatch):
    names = _write_images(tmp_path / "images", sizes=[(16 + i, 20) for i in range(7)])
    done = []
    for index in range(3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(10 + index))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        summary = inf.segment_folder(saved_model_filepath=models["pointwise"], image_folder=str(tmp_path / "images"),
                                     output_folder=str(tmp_path / "out"))
        assert summary.skipped == [] and summary.failed == []
        done.append(summary.segmented)
    assert sorted(sum(done, [])) == sorted(names)  # each image exactly once
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)


@pytest.mark.parametrize("index,count", [(0, 1), (0, 4), (3, 4), (2, 5)])
def test_shard_names_partition(index, count):
    names = [f"{i:03d}.tif" for i in range(23)]
    parts = [inf.shard_names(names, i, count) for i in range(count)]
    assert sorted(sum(parts, [])) == names
    assert inf.shard_names(names, index, count) == parts[index]


def test_resolve_shard_from_slurm_environment():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    assert inf.resolve_shard(None, None, env) == (3, 4)
    assert inf.resolve_shard(1, 2, env) == (1, 2)
    assert inf.resolve_shard(None, None, {}) == (0, 1)
    with pytest.raises(inf.InputError, match="shard index 4"):
        inf.resolve_shard(4, 4, {})


# --- outputs: metrics, overlay, names -------------------------------------------------------------


def test_metrics_csv_matches_metrics_module(models, tmp_path):
    names = _write_images(tmp_path / "images", sizes=[(30, 40), (25, 25), (12, 60)])
    os.makedirs(tmp_path / "truth")
    rng = np.random.default_rng(5)
    truths = {}
    for name in names[:2]:  # the third image has no ground truth: warned, not scored
        image = tifffile.imread(tmp_path / "images" / name)
        truths[name] = (rng.random(image.shape) < 0.5).astype(np.uint8)
        # a PNG mask pairs with a TIFF image by stem
        import imageio.v3 as iio

        iio.imwrite(tmp_path / "truth" / (name[:-4] + ".png"), truths[name])
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "out", "--mask_folder", tmp_path / "truth") == 0
    lines = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["image", "pixel_accuracy", "mean_iou", "mean_dice"] and "dice_1" in header
    rows = {line.split(",")[0]: dict(zip(header, line.split(","))) for line in lines[1:]}
    assert sorted(rows) == sorted(names[:2] + ["ALL"])
    total = np.zeros((2, 2), np.int64)
    for name, truth in truths.items():
        cm = metrics.confusion_matrix(truth, tifffile.imread(tmp_path / "out" / name), 2)
        total += cm
        assert float(rows[name]["mean_iou"]) == pytest.approx(metrics.scores(cm)["mean_iou"])
    assert float(rows["ALL"]["pixel_accuracy"]) == pytest.approx(metrics.scores(total)["pixel_accuracy"])


def test_overlay_png_and_lossy_input_gets_png_mask(models, tmp_path):
    import imageio.v3 as iio

    os.makedirs(tmp_path / "images")
    image = (np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "images" / "photo.jpg", image)
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "out", "--image_format", "jpg", "--overlay", 1) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["overlays", "photo.png"]
    overlay = iio.imread(tmp_path / "out" / "overlays" / "photo.png")
    assert overlay.shape == (40, 30, 3) and overlay.dtype == np.uint8
    mask = iio.imread(tmp_path / "out" / "photo.png")
    assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("extra,match", [
    (["--halo", "wide"], "--halo must be"),
    (["--tile_size", "0"], "--tile_size must be"),
    (["--batch_size", "0"], "--batch_size must be"),
    (["--shard_index", "3", "--shard_count", "2"], "shard index 3"),
    (["--image_format", "png"], "no \\*.png images"),
])
def test_bad_input_exits_2_and_writes_nothing(models, tmp_path, capsys, extra, match):
    _write_images(tmp_path / "images", sizes=[(20, 20)])
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(match, err)
    assert not (tmp_path / "out").exists()


def test_bad_model_and_same_folder_exit_2(models, tmp_path, capsys):
    _write_images(tmp_path / "images", sizes=[(20, 20)])
    assert _run(str(tmp_path), tmp_path / "images", tmp_path / "out") == 2
    assert "not a SavedModel folder" in capsys.readouterr().err
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "images") == 2
    assert "masks would replace the images" in capsys.readouterr().err


def test_halo_and_tile_size_resolution():
    meta = {"size_factor": 16, "receptive_field_radius": 92, "effective_receptive_field_radius": 40}
    assert inf.resolve_halo("exact", meta) == 96
    assert inf.resolve_halo("erf", meta) == 48
    assert inf.resolve_halo("5", meta) == 16
    assert inf.resolve_halo(None, dict(meta, size_factor=1)) == 92
    assert inf.resolve_tile_size(1000, 32) == 1024 and inf.resolve_tile_size(100, 8) == 112


def test_cli_does_not_import_tensorflow_for_bad_input_or_finished_work(models, tmp_path):
    _write_images(tmp_path / "images", sizes=[(20, 20)])
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "out") == 0
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import inference_unet
        assert inference_unet.main(["--saved_model_filepath", {models['pointwise']!r}, "--image_folder",
                                    {str(tmp_path / 'images')!r}, "--output_folder", {str(tmp_path / 'out')!r}]) == 0
        assert inference_unet.main(["--saved_model_filepath", "nowhere", "--image_folder", "x", "--output_folder", "y"]) == 2
        print("tensorflow" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_huge_compressed_blocks_are_read_whole_not_per_tile(models, tmp_path, monkeypatch, caplog):
    """A TIFF stored as one compressed block cannot be read region by region: read it whole, same result."""
    caplog.set_level(logging.INFO, logger="inference_unet")
    os.makedirs(tmp_path / "images")
    image = (np.random.default_rng(2).random((100, 120)) * 3000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "images" / "strip.tif", image, compression="zlib", rowsperstrip=100)
    monkeypatch.setattr(regions, "MAX_BLOCK_BYTES", 1000)
    assert _run(models["chain"], tmp_path / "images", tmp_path / "out", "--tile_size", 16, "--memory_limit_mb", 0.001) == 0
    assert any("reading it whole" in r.getMessage() for r in caplog.records)
    assert any("in memory" in r.getMessage() for r in caplog.records)
    assert _run(models["chain"], tmp_path / "images", tmp_path / "whole", "--tile_size", 4096) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "strip.tif"), tifffile.imread(tmp_path / "whole" / "strip.tif"))


def test_tta_through_the_cli(models, tmp_path):
    names = _write_images(tmp_path / "images", sizes=[(33, 47)])
    for out, tile in (("tiled", 8), ("whole", 4096)):
        assert _run(models["chain"], tmp_path / "images", tmp_path / out, "--tile_size", tile, "--tta", "1",
                    "--save_probabilities", "1") == 0
    np.testing.assert_allclose(_read_probs(tmp_path / "tiled" / "probabilities" / names[0]),
                               _read_probs(tmp_path / "whole" / "probabilities" / names[0]), atol=2e-5)


@pytest.mark.slow
def test_registry_unet_trained_a_few_steps_same_masks_tiled_and_untiled(tmp_path):
    """The toolkit's own UNet (models/), trained a few steps, exported: tiled == untiled masks."""
    models = pytest.importorskip("models")
    import tensorflow as tf

    config = dict(depth=2, base_filters=4)
    factor, radius = models.size_factor("unet", **config), models.receptive_field_radius("unet", **config)
    net = models.build_model("unet", 1, 2, **config)  # logits
    rng = np.random.default_rng(1)
    images = rng.normal(size=(8, 32, 32, 1)).astype(np.float32)
    masks = (images[..., 0] > 0.3).astype(np.int32)
    losses = train_steps(net, images, masks, steps=6, batch_size=4, from_logits=True)
    assert losses[-1] < losses[0]

    saved = export_savedmodel(str(tmp_path / "unet"), lambda x: tf.nn.softmax(net(x, training=False), axis=-1),
                              channels=1, number_classes=2, size_factor=factor, radius=radius, track=net)
    _write_images(tmp_path / "images", sizes=[(90, 70)])
    assert _run(saved, tmp_path / "images", tmp_path / "tiled", "--tile_size", 16, "--save_probabilities", 1) == 0
    assert _run(saved, tmp_path / "images", tmp_path / "whole", "--tile_size", 1024, "--save_probabilities", 1) == 0
    p_tiled = _read_probs(tmp_path / "tiled" / "probabilities" / "img0.tif")
    p_whole = _read_probs(tmp_path / "whole" / "probabilities" / "img0.tif")
    np.testing.assert_allclose(p_tiled, p_whole, atol=2e-5)
    ties = _near_tie(p_whole)
    assert np.array_equal(tifffile.imread(tmp_path / "tiled" / "img0.tif")[~ties],
                          tifffile.imread(tmp_path / "whole" / "img0.tif")[~ties])


# --- registry models: tiled == the original's whole-image prediction ----------------------------

REGISTRY_CASES = [  # name, config (FC-DenseNet56 slimmed: same layers and radius, fewer filters), image, tile
    ("unet", {}, (100, 75), 1024),            # smaller than a tile: one tile at its own padded size
    ("unet", {}, (256, 256), 256),            # exactly one tile
    ("unet", {}, (512, 470), 64),             # several tiles each way; edges on the border in y, off in x
    ("unet", {}, (500, 512), 32),             # off in y, on in x
    ("fcdensenet56", {"growth_rate": 2, "first_filters": 4}, (90, 130), 1024),
    ("fcdensenet56", {"growth_rate": 2, "first_filters": 4}, (256, 256), 256),
    ("fcdensenet56", {"growth_rate": 2, "first_filters": 4}, (1024, 970), 32),  # 4 x 3 distinct tiles of 928
]


@pytest.mark.slow
@pytest.mark.parametrize("name,config,size,tile", REGISTRY_CASES)
def test_registry_model_tiled_equals_the_originals_whole_image(name, config, size, tile):
    """The registry's UNet and FC-DenseNet56 (random weights), exact halo: tiled == the image reflect-padded
    at the end of each axis to the size factor and predicted whole (the original's _inference)."""
    import tensorflow as tf

    import models

    model = models.build_model(name, 1, 2, **config)
    factor, radius = models.size_factor(name, **config), models.receptive_field_radius(name, **config)
    halo = -(-radius // factor) * factor
    forward = tf.function(lambda x: tf.nn.softmax(model(x, training=False), axis=-1), reduce_retracing=True)
    predict = lambda batch: forward(tf.constant(batch)).numpy()  # noqa: E731
    image = np.random.default_rng(5).normal(size=size + (1,)).astype(np.float32)
    pads = [(0, -n % factor) for n in size] + [(0, 0)]
    whole = predict(np.pad(image, pads, mode="reflect")[None])[0, : size[0], : size[1]]
    plan = tiling.plan_tiles(size, tile, halo, factor)
    tiled = tiling.predict_tiled(image, predict, tile, halo, factor, batch_size=2)
    np.testing.assert_allclose(tiled, whole, atol=2e-5)
    ties = _near_tie(whole)
    assert np.array_equal(tiled.argmax(-1)[~ties], whole.argmax(-1)[~ties])
    padded = tuple(-(-n // factor) * factor for n in size)
    if tile >= max(padded):
        assert plan.tile_shape == padded and len(tiling.tile_groups(plan)) == 1  # runs at its own size
    else:
        assert len(tiling.tile_groups(plan)) > 2 and all(t < p for t, p in zip(plan.tile_shape, padded))


def test_onednn_default_respects_the_users_setting(monkeypatch):
    from segkit.inference import predictor

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    user = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert not predictor.default_onednn(user) and user == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    unset: dict = {}
    assert predictor.default_onednn(unset) == (predictor.ONEDNN_DEFAULT is not None)
    volumes: dict = {}
    assert predictor.default_onednn(volumes, spatial_rank=3) and volumes == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    user = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert not predictor.default_onednn(user, spatial_rank=3) and user == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    monkeypatch.setitem(sys.modules, "tensorflow", object())  # already imported: too late, leave it
    late: dict = {}
    assert not predictor.default_onednn(late) and late == {}


@pytest.mark.parametrize("via_link", [False, True])
def test_the_ground_truth_folder_is_never_the_output(models, tmp_path, capsys, via_link):
    """Issue #17, data loss: --output_folder = --mask_folder overwrote the ground truth (and scored it 1.0)."""
    names = _write_images(tmp_path / "images")
    truth = tmp_path / "truth"
    truth.mkdir()
    for name in names:
        tifffile.imwrite(truth / name, np.ones(tifffile.imread(tmp_path / "images" / name).shape, np.uint8))
    before = {name: (truth / name).read_bytes() for name in names}
    out = truth
    if via_link:
        out = tmp_path / "link"
        out.symlink_to(truth)
    for overwrite in ("0", "1"):
        assert _run(models["pointwise"], tmp_path / "images", out, "--mask_folder", truth, "--overwrite", overwrite) == 2
        assert "is the --mask_folder" in capsys.readouterr().err
    assert {name: (truth / name).read_bytes() for name in names} == before
    assert sorted(os.listdir(truth)) == sorted(names)
    assert _run(models["pointwise"], tmp_path / "images", tmp_path / "o", "--mask_folder", tmp_path / "images") == 2
    assert "is the --image_folder" in capsys.readouterr().err
