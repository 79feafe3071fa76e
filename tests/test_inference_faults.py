"""inference_unet.py under faults (issue #17, inference part): unwritable outputs, a full disk, writer errors,
a model whose metadata disagree with its graph, damaged models, absurd flags, odd input files, threads that
must end before an image's source closes. docs/faults.md, "Stage 3", lists what each test guarantees.

Models are tests/savedmodel_helpers.py's tiny SavedModels, exported once per session; most tests run the
pointwise model's numpy twin (``predict_fn``) or the CLI in process.
"""
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading

import numpy as np
import pytest
import tifffile
from conftest import ROOT, UNWRITABLE_KINDS, one_error_line, signal_group_when_ready, unwritable_output
from savedmodel_helpers import (
    TINY_UNET_SIZE_FACTOR,
    build_tiny_unet,
    export_keras,
    export_pointwise,
    pointwise_numpy,
    tiny_unet_radius,
)

import inference_unet as inf
from segkit import cliutil, model_metadata
from segkit.inference import folder, regions, writers

OUR_THREADS = ("tile-prefetch", "_TiffTileOutput", "_ZarrOutput")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_models")
    return {
        "pointwise": export_pointwise(str(root / "pointwise"), channels=1, number_classes=2, size_factor=8),
        "unet": export_keras(str(root / "unet"), build_tiny_unet(1, 2, seed=3), size_factor=TINY_UNET_SIZE_FACTOR,
                             radius=tiny_unet_radius()),
    }


def write_images(folder, sizes=((24, 24), (30, 20), (20, 28)), channels=1):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate(sizes):
        shape = (h, w, channels) if channels > 1 else (h, w)
        name = f"img{i}.tif"
        tifffile.imwrite(os.path.join(folder, name), (1000 + 500 * rng.random(shape)).astype(np.uint16))
        names.append(name)
    return names


def run(model, images, out, *extra):
    return inf.main(["--saved_model_filepath", str(model), "--image_folder", str(images), "--output_folder", str(out),
                     *map(str, extra)])


def hidden(folder):
    """Temporaries (hidden names) in an output folder and its probabilities/ and overlays/."""
    found = []
    for sub in ("", "probabilities", "overlays"):
        path = os.path.join(folder, sub)
        found += [os.path.join(path, n) for n in (os.listdir(path) if os.path.isdir(path) else []) if n.startswith(".")]
    return found


def copy_model(model, tmp_path, edit=None):
    copy = str(tmp_path / "model")
    shutil.copytree(model, copy)
    if edit is not None:
        path = model_metadata.metadata_path(copy)
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        edit(meta)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
    return copy


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if TensorFlow / the model would be loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(folder, "SavedModelPredictor", refuse)


# ----------------------------------------------------------------------------- 1. unwritable output locations


@pytest.mark.parametrize("kind", UNWRITABLE_KINDS)
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(models, tmp_path, capsys,
                                                                                   no_model_load, kind):
    write_images(tmp_path / "images")
    out, expected = unwritable_output(tmp_path, kind, "masks")
    assert run(models["pointwise"], tmp_path / "images", out) == 2
    line = one_error_line(capsys)
    assert "--output_folder" in line and expected in line
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "afile").read_text() == "x"


def test_an_unwritable_output_folder_is_refused_without_importing_tensorflow(models, tmp_path):
    import subprocess
    import textwrap

    write_images(tmp_path / "images")
    (tmp_path / "afile").write_text("x")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import inference_unet
        code = inference_unet.main(["--saved_model_filepath", {models['pointwise']!r}, "--image_folder",
                                    {str(tmp_path / 'images')!r}, "--output_folder", {str(tmp_path / 'afile' / 'm')!r}])
        print(code, "tensorflow" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.startswith("error: --output_folder") and len(result.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- 2. full disk


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def full_on(names, call):
    """``call``, except that it fails with ENOSPC (after writing a partial file) for an image in ``names``."""
    def write(path, *args, **kwargs):
        if any(os.path.basename(path).startswith(f".{os.path.splitext(n)[0]}") for n in names):
            with open(path, "wb") as fh:
                fh.write(b"partial")
            enospc()
        return call(path, *args, **kwargs)

    return write


@pytest.mark.parametrize("what", ["mask", "probabilities out of core", "overlay", "metrics.csv"])
def test_a_full_disk_keeps_the_finished_images_stops_cleanly_and_a_rerun_finishes(models, tmp_path, capsys, monkeypatch, what):
    names = write_images(tmp_path / "images")
    truth = tmp_path / "truth"
    write_images(truth)
    out = tmp_path / "out"
    extra = {"mask": {}, "probabilities out of core": {"save_probabilities": True, "memory_limit_mb": 1e-4},
             "overlay": {"overlay": True}, "metrics.csv": {"mask_folder": str(truth)}}[what]
    if what == "mask":
        monkeypatch.setattr(writers, "write_whole", full_on(["img1"], writers.write_whole))
    elif what == "probabilities out of core":
        original = writers._TiffTileOutput.consume

        def consume(self, items):
            if self.channels and "img1" in self.tmp_path:
                next(items)
                enospc()
            original(self, items)

        monkeypatch.setattr(writers._TiffTileOutput, "consume", consume)
    elif what == "overlay":
        import imageio.v3 as iio

        monkeypatch.setattr(iio, "imwrite", full_on(["img1"], iio.imwrite))
    else:
        monkeypatch.setattr(cliutil, "atomic_write_text", enospc)
    with pytest.raises(cliutil.FaultError) as caught:
        folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                              image_folder=str(tmp_path / "images"), output_folder=str(out), **extra)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("no space left on ")
    assert "needed about " in message and " MB free" in message and "free space and rerun" in message
    assert hidden(out) == []  # no partial file visible, no temporary left
    if what == "metrics.csv":
        assert "writing metrics.csv" in message and sorted(n for n in os.listdir(out)) == sorted(names)
        return
    assert {"mask": "writing the mask img1.tif", "overlay": "writing the overlay overlays/img1.png",
            "probabilities out of core": "the probabilities probabilities/img1.tif"}[what] in message
    assert "1 image(s) segmented before are kept" in message
    assert caught.value.summary.failed == [("img1.tif", "no space left")]
    assert os.path.exists(out / "img0.tif") and not os.path.exists(out / "img2.tif")  # stopped at img1
    monkeypatch.undo()  # space freed: the same command finishes the folder
    summary = folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                                    image_folder=str(tmp_path / "images"), output_folder=str(out), **extra)
    assert not summary.failed and "img0.tif" in summary.skipped + summary.segmented
    assert all(os.path.exists(out / n) for n in names) and hidden(out) == []


def test_a_full_disk_through_the_cli_is_one_line_exit_1(models, tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "images")
    monkeypatch.setattr(writers, "write_whole", full_on(["img0"], writers.write_whole))
    assert run(models["pointwise"], tmp_path / "images", tmp_path / "out") == 1
    assert one_error_line(capsys).startswith("error: no space left on ")
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- 3. metadata disagree with the graph


@pytest.mark.parametrize("field, value, images_channels, expected", [
    ("channels", 2, 2, "its graph refused a batch of shape"),
    ("number_classes", 3, 1, "its graph returned shape"),
])
def test_a_model_whose_metadata_disagree_with_its_graph_skips_each_image_then_says_so_once(
        models, tmp_path, capsys, caplog, field, value, images_channels, expected):
    model = copy_model(models["pointwise"], tmp_path, lambda meta: meta.update({field: value}))
    names = write_images(tmp_path / "images", channels=images_channels)
    assert run(model, tmp_path / "images", tmp_path / "out") == 2
    skipped = [r.getMessage() for r in caplog.records if ": skipped: " in r.getMessage()]
    assert len(skipped) == len(names) and all(expected in m and "\n" not in m for m in skipped)
    line = one_error_line(capsys)
    assert line.startswith("error: every image failed the same way: the model's metadata and graph disagree")
    assert "segmentation_metadata.json" in line
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- 4. numeric flags


@pytest.mark.parametrize("flag, value", [
    ("--memory_limit_mb", "nan"), ("--memory_limit_mb", "inf"), ("--memory_limit_mb", "-1"),
    ("--memory_limit_mb", "1e30"), ("--halo", "nan"), ("--halo", "inf"), ("--halo", "100000"), ("--halo", "-2"),
    ("--tile_size", "0"), ("--tile_size", str(10**9)), ("--batch_size", "0"), ("--batch_size", str(10**9)),
    ("--shard_index", "-1"), ("--shard_count", str(10**9)), ("--shard_count", "0"), ("--mask_map", "255:1e9"),
    ("--mask_map", f"255:{2**40}"), ("--mask_map", f"{2**40}:1"), ("--mask_map", "255:-1"),
])
def test_every_numeric_flag_is_checked_against_nan_infinity_and_absurd_sizes(models, tmp_path, capsys, no_model_load,
                                                                             flag, value):
    write_images(tmp_path / "images")
    extra = []
    if flag == "--mask_map":  # applies to ground truth
        write_images(tmp_path / "truth")
        extra = ["--mask_folder", str(tmp_path / "truth")]
    assert run(models["pointwise"], tmp_path / "images", tmp_path / "out", flag, value, *extra) == 2
    line = one_error_line(capsys)
    assert flag in line, line
    assert not (tmp_path / "out").exists()


def test_resolve_tile_size_refuses_nan_and_infinity_from_the_api():
    for bad in (float("nan"), float("inf"), 2.5):
        with pytest.raises(cliutil.InputError, match="--tile_size"):
            inf.resolve_tile_size(bad, 8)


# ----------------------------------------------------------------------------- 5. writer errors


@pytest.mark.parametrize("where", ["writer thread", "in memory"])
@pytest.mark.parametrize("error", [RuntimeError("tifffile: cannot encode tile"), OSError(errno.EIO, "I/O error")])
def test_a_writer_error_fails_that_image_only(models, tmp_path, monkeypatch, where, error):
    write_images(tmp_path / "images")
    if where == "writer thread":
        original = writers._ZarrOutput.consume

        def consume(self, items):
            if "img1" in self.tmp_dir:
                next(items)
                raise error
            original(self, items)

        monkeypatch.setattr(writers._ZarrOutput, "consume", consume)
        extra = {"output_format": "zarr"}
    else:
        original_write = writers.write_whole

        def write_whole(path, *args, **kwargs):
            if "img1" in os.path.basename(path):
                open(path, "wb").close()
                raise error
            original_write(path, *args, **kwargs)

        monkeypatch.setattr(writers, "write_whole", write_whole)
        extra = {}
    out = tmp_path / "out"
    summary = folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                                    image_folder=str(tmp_path / "images"), output_folder=str(out), **extra)
    assert [name for name, _ in summary.failed] == ["img1.tif"] and sorted(summary.segmented) == ["img0.tif", "img2.tif"]
    assert str(error.args[-1]) in summary.failed[0][1] and "\n" not in summary.failed[0][1]
    assert len(os.listdir(out)) == 2 and hidden(out) == []
    assert not [t for t in threading.enumerate() if t.name in OUR_THREADS]


# ----------------------------------------------------------------------------- 6. threads end before the source closes


@pytest.mark.parametrize("fault", ["writer raises", "model raises", "Ctrl-C in the model"])
def test_every_thread_is_joined_before_the_source_closes(models, tmp_path, monkeypatch, fault):
    """A 160x160 image in 16 px tiles out of core: the prefetch thread reads ahead from the lazy source and
    the writer thread writes behind; a fault mid-image must stop and join both before ``source.close()``."""
    os.makedirs(tmp_path / "images")
    tifffile.imwrite(tmp_path / "images" / "big.tif", (np.arange(160 * 160) % 997).reshape(160, 160).astype(np.uint16))
    alive_at_close = []
    original_open = regions.open_source

    def open_source(path, settings):
        source = original_open(path, settings)
        close = source.close
        source.close = lambda: (alive_at_close.append([t.name for t in threading.enumerate() if t.name in OUR_THREADS]),
                                close())
        return source

    monkeypatch.setattr(folder, "open_source", open_source)
    calls = []
    model = pointwise_numpy(1, 2)

    def predict(batch):
        calls.append(1)
        if fault != "writer raises" and len(calls) == 3:
            raise KeyboardInterrupt if fault == "Ctrl-C in the model" else ValueError("model failed")
        return model(batch)

    if fault == "writer raises":
        def consume(self, items):
            next(items)
            raise RuntimeError("tifffile failed")

        monkeypatch.setattr(writers._TiffTileOutput, "consume", consume)
    kwargs = dict(saved_model_filepath=models["pointwise"], predict_fn=predict, image_folder=str(tmp_path / "images"),
                  output_folder=str(tmp_path / "out"), tile_size=16, memory_limit_mb=1e-3)
    if fault == "Ctrl-C in the model":
        with pytest.raises(KeyboardInterrupt):
            folder.segment_folder(**kwargs)
    else:
        summary = folder.segment_folder(**kwargs)
        assert [name for name, _ in summary.failed] == ["big.tif"]
    assert alive_at_close == [[]]  # closed once, with no thread of ours still running
    assert not [t for t in threading.enumerate() if t.name in OUR_THREADS]
    assert os.listdir(tmp_path / "out") == []  # no temporary left


def test_the_writer_is_joined_even_when_ctrl_c_interrupts_the_join(monkeypatch):
    """Ctrl-C while the model thread waits for a failed image's writer: the writer is still stopped and
    joined (then KeyboardInterrupt goes on), so it never writes into a temporary already removed."""
    release = threading.Event()

    class SlowWriter(writers._ThreadedOutput):
        def consume(self, items):
            for _ in items:
                release.wait(5)

    writer = SlowWriter(lambda probs: probs)
    interrupted = []
    original_join = threading.Thread.join

    def join(self, *args, **kwargs):
        if self is writer._thread and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        release.set()
        original_join(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "join", join)
    with pytest.raises(KeyboardInterrupt):
        with writer:
            writer.put(None, np.zeros(1))
            raise ValueError("the model failed")
    assert interrupted and not writer._thread.is_alive()


# ----------------------------------------------------------------------------- 7. smaller ones


def test_dangling_symlinks_in_the_image_folder_are_warned_about(models, tmp_path, caplog):
    names = write_images(tmp_path / "images", sizes=[(20, 20)])
    os.symlink(tmp_path / "gone.tif", tmp_path / "images" / "lost.tif")
    summary = folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                                    image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"))
    assert summary.segmented == names
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 symbolic link(s) point to missing files" in m and "lost.tif" in m for m in warnings), warnings


def test_a_mask_folder_that_is_the_image_folder_through_a_link_is_refused(models, tmp_path, capsys, no_model_load):
    write_images(tmp_path / "images")
    os.symlink(tmp_path / "images", tmp_path / "masks")
    assert run(models["pointwise"], tmp_path / "images", tmp_path / "out", "--mask_folder", tmp_path / "masks") == 2
    assert "is the --image_folder" in one_error_line(capsys)


@pytest.mark.parametrize("layout", ["uncompressed", "tiled zlib", "header only"])
def test_a_truncated_tiff_is_one_line_naming_the_file(models, tmp_path, caplog, layout):
    names = write_images(tmp_path / "images", sizes=[(20, 20)])
    path = tmp_path / "images" / "cut.tif"
    image = (np.arange(128 * 128) % 3000).reshape(128, 128).astype(np.uint16)
    tifffile.imwrite(path, image, **({"compression": "zlib", "tile": (32, 32)} if layout == "tiled zlib" else {}))
    data = path.read_bytes()
    path.write_bytes(data[:12] if layout == "header only" else data[: len(data) // 2])
    summary = folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                                    image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"))
    assert summary.segmented == names and [name for name, _ in summary.failed] == ["cut.tif"]
    message = summary.failed[0][1]
    assert str(path) in message and "\n" not in message and not message.startswith("IndexError")
    assert os.listdir(tmp_path / "out") == names


@pytest.mark.parametrize("stack", ["7 pages", "ImageJ ZYX of 3"])
def test_a_z_stack_given_to_a_2d_model_is_segmented_section_by_section(models, tmp_path, stack):
    """Once a z-stack was refused as "N channels"; now a 2-D model segments it section by section (issue #15)."""
    os.makedirs(tmp_path / "images")
    path = tmp_path / "images" / "stack.tif"
    if stack == "7 pages":
        tifffile.imwrite(path, np.ones((7, 40, 40), np.uint16))
    else:
        tifffile.imwrite(path, np.ones((3, 40, 40), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    summary = folder.segment_folder(saved_model_filepath=models["pointwise"], predict_fn=pointwise_numpy(1, 2),
                                    image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"))
    assert summary.segmented == ["stack.tif"] and not summary.failed
    assert tifffile.imread(tmp_path / "out" / "stack.tif").shape == (7 if stack == "7 pages" else 3, 40, 40)


def test_an_error_line_starts_on_a_fresh_line_after_the_progress_bar(models, tmp_path, capsys):
    """A log file (not a terminal): the images bar never ends its line itself; the error line must not be
    glued to it (here: the model's variables are missing, found when the first image needs the model)."""
    model = copy_model(models["unet"], tmp_path)
    shutil.rmtree(os.path.join(model, "variables"))
    write_images(tmp_path / "images")
    assert run(model, tmp_path / "images", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert [line for line in err.splitlines() if "error: " in line][0].startswith("error: "), err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_exits_130_interrupted_last_keeps_finished_images(models, tmp_path, sig):
    write_images(tmp_path / "images", sizes=[(32, 32)])
    os.rename(tmp_path / "images" / "img0.tif", tmp_path / "images" / "a_small.tif")
    yy, xx = np.mgrid[:2000, :2000]
    tifffile.imwrite(tmp_path / "images" / "b_big.tif", (2000 + 800 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint16))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "inference_unet.py"), "--saved_model_filepath", models["unet"],
           "--image_folder", str(tmp_path / "images"), "--output_folder", str(out), "--tile_size", "64",
           "--tta", "1", "--memory_limit_mb", "8"]
    started = lambda proc: os.path.isdir(out) and any(n.startswith(".b_big.tif.") for n in os.listdir(out))  # noqa: E731
    proc, err = signal_group_when_ready(cmd, started, sig=sig, settle=0.3, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "leaked semaphore" not in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert sorted(os.listdir(out)) == ["a_small.tif"]


# ----------------------------------------------------------------------------- 8. damaged SavedModels


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m.update({"channels": "two"}), "metadata field channels must be an integer"),
    (lambda m: m.pop("number_classes"), "lacks number_classes"),
    (lambda m: m.update({"receptive_field_radius": float("nan")}), "receptive_field_radius must be"),
    (lambda m: m.update({"size_factor": 0}), "size_factor must be"),
    (lambda m: m.update({"normalization": [1, 2]}), "normalization must be a JSON object"),
    ("invalid JSON", "not valid JSON"),
])
def test_a_corrupt_metadata_file_is_one_line_naming_the_file_and_field(models, tmp_path, capsys, no_model_load,
                                                                        damage, expected):
    if damage == "invalid JSON":
        model = copy_model(models["pointwise"], tmp_path)
        with open(model_metadata.metadata_path(model), "a", encoding="utf-8") as fh:
            fh.write("{ cut off")
    else:
        model = copy_model(models["pointwise"], tmp_path, damage)
    write_images(tmp_path / "images")
    assert run(model, tmp_path / "images", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert model_metadata.metadata_path(model) in line and expected in line


@pytest.mark.parametrize("damage", ["variables/ missing", "variables truncated"])
def test_a_savedmodel_with_missing_or_damaged_variables_is_one_line(models, tmp_path, capsys, damage):
    model = copy_model(models["unet"], tmp_path)
    if damage == "variables/ missing":
        shutil.rmtree(os.path.join(model, "variables"))
    else:
        os.truncate(os.path.join(model, "variables", "variables.data-00000-of-00001"), 100)
    write_images(tmp_path / "images")
    assert run(model, tmp_path / "images", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{model}: the SavedModel cannot be loaded" in line
    assert os.listdir(tmp_path / "out") == []

