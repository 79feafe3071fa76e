"""One volume across shards, block by block (issue #21): shards == one process (exactly; instances up to
renumbering), restarts after a crash or a kill, two processes on the same shard, the closing step's refusals.

Fast tests use the pointwise numpy "model" of test_inference_instances (metadata-only SavedModel, predictor
passed in); the slow ones run the CLI in concurrent processes with the tiny untrained 3-D UNet of
test_inference_volumes.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from conftest import ROOT, signal_group_when_ready
from test_inference_instances import fake_model, image_1channel, intensity_predict, same_up_to_renumbering, touching_objects
from test_inference_volumes import ISOTROPIC, blob_volume, export_unet3d, write_tiff_stack

import inference_unet as inf
from segkit.cliutil import InputError
from segkit.inference import block_labels, blocks, folder

SHAPE = (24, 64, 64)
TILE = "8,16,16"  # 3 x 4 x 4 = 48 blocks
OUTPUTS = ("mask.zarr", "probabilities/vol.zarr")


@pytest.fixture(scope="module")
def volume():
    labels = touching_objects(SHAPE, seed=4, count=14)
    return image_1channel(labels)


def write_input(tmp_path, volume):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    write_tiff_stack(images / "vol.tif", volume, spacing=ISOTROPIC)
    return images


def segment(model, images, out, volume, **kw):
    kw = {"tile_size": TILE, "output_format": "zarr", "save_probabilities": True, **kw}
    return folder.segment_folder(saved_model_filepath=model, image_folder=str(images), output_folder=str(out),
                                 predict_fn=intensity_predict(volume[..., None]), **kw)


def level0(path):
    return zarr.open_array(os.path.join(str(path), "0"), mode="r")[...]


def assert_same_outputs(a, b, labels=True):
    for kind in ("vol.zarr", "probabilities/vol.zarr"):
        np.testing.assert_array_equal(level0(a / kind), level0(b / kind))
        assert zarr.open_group(str(b / kind), mode="r").attrs["multiscales"] == \
            zarr.open_group(str(a / kind), mode="r").attrs["multiscales"]
    if labels:
        assert same_up_to_renumbering(level0(a / "labels" / "vol.zarr"), level0(b / "labels" / "vol.zarr"))


def temporaries(folder_path):
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder_path) for n in dirs + files if ".tmp-" in n]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, volume):
    root = tmp_path_factory.mktemp("single")
    model = fake_model(root / "m", rank=3, channels=1, classes=3)
    images = write_input(root, volume)
    summary = segment(model, images, root / "out", volume)
    assert not summary.failed and summary.segmented == ["vol.tif"]
    return model, images, root / "out"


def test_four_shards_equal_one_process_and_instances_up_to_renumbering(single_run, tmp_path, volume, monkeypatch):
    model, images, single = single_run
    out = tmp_path / "out"
    labelled, closing = [], []  # which blocks were labelled by a shard itself, which by the closing step
    real_label, real_write = block_labels.label_block, block_labels.write_labels
    monkeypatch.setattr(block_labels, "label_block", lambda job, zone, s: (labelled.append((zone.index, bool(
        closing))), real_label(job, zone, s))[1])
    monkeypatch.setattr(block_labels, "write_labels", lambda job, s: (closing.append(1), real_write(job, s))[1])
    for index in range(4):
        summary = segment(model, images, out, volume, shard_index=index, shard_count=4)
        assert not summary.failed, summary.failed
    # shard 3 (blocks 36-47, the last z layer's rows 1-3: contiguous ownership) labelled its own blocks once
    # their neighbourhood was predicted; the closing step labelled the others, each block once
    assert sorted(index for index, late in labelled if not late) == [(2, y, x) for y in (1, 2, 3) for x in range(4)]
    assert len(labelled) == 48 and len(set(labelled)) == 48
    assert os.path.exists(out / "vol.zarr" / blocks.BLOCKS_FOLDER / blocks.FINAL_FILE)  # the last shard closed it
    assert len([n for n in os.listdir(out / "vol.zarr" / ".blocks") if n.endswith(".done")]) == 48
    assert not os.path.exists(out / "vol.zarr" / ".blocks" / blocks.PROBS_ARRAY)  # labelled, then removed
    assert_same_outputs(single, out)
    assert temporaries(out) == []
    labels = level0(out / "labels" / "vol.zarr")
    assert labels.max() >= 10 and len(np.unique(level0(out / "vol.zarr"))) == 3  # objects across seams, 3 classes
    # A later run (shard or plain) skips the finished output; --finalize 1 writes the tables over every input.
    again = segment(model, images, out, volume, shard_index=1, shard_count=4)
    assert again.skipped == ["vol.tif"]
    closing = segment(model, images, out, volume, finalize=True)
    assert not closing.failed and os.path.exists(out / "objects.csv")


def _shard_process(model, images, out, volume, index, count):
    """One shard in a forked process (the injected predictor needs no TensorFlow); exit 0 when it succeeded."""
    try:
        summary = segment(model, images, out, volume, shard_index=index, shard_count=count)
        os._exit(0 if not summary.failed else 1)
    except BaseException:
        os._exit(2)


def test_four_concurrent_shard_processes_give_instances_up_to_renumbering(single_run, tmp_path, volume):
    """4 shard processes at once on one volume with an instance model: semantic outputs byte-identical to one
    process, labels equal up to renumbering (whichever shard finishes last merges them)."""
    import multiprocessing

    model, images, single = single_run
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_shard_process, args=(model, images, out, volume, i, 4)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    closing = segment(model, images, out, volume, finalize=True)
    assert not closing.failed
    assert_same_outputs(single, out)  # mask and probabilities exactly, labels up to renumbering
    assert temporaries(out) == []
    assert len([n for n in os.listdir(out / "vol.zarr" / ".blocks") if n.endswith(".done")]) == 48


def test_a_shard_labels_the_blocks_inside_its_slab_itself(tmp_path, volume):
    model = fake_model(tmp_path / "m", rank=3, channels=1, classes=3, halo=8)  # a seam halo of one block in z
    images = write_input(tmp_path, volume)
    out = tmp_path / "out"
    assert not segment(model, images, out, volume, shard_index=0, shard_count=2).failed
    seams = sorted(n for n in os.listdir(out / "vol.zarr" / ".blocks") if n.endswith(".seams.npz"))
    # shard 0 owns z layer 0 and rows 0-1 of z layer 1: only row 0 of layer 0 has its whole neighbourhood
    assert seams == [f"0.0.{x}.seams.npz" for x in range(4)]
    assert not segment(model, images, out, volume, shard_index=1, shard_count=2).failed
    assert not blocks.unfinished(str(out / "vol.zarr")) and level0(out / "labels" / "vol.zarr").max() >= 10


def test_finalize_names_the_missing_blocks_and_their_shard(single_run, tmp_path, volume, caplog):
    model, images, single = single_run
    out = tmp_path / "out"
    for index in (0, 1, 3):
        assert not segment(model, images, out, volume, shard_index=index, shard_count=4).failed
    assert blocks.unfinished(str(out / "vol.zarr"))
    assert inf.main(["--saved_model_filepath", model, "--image_folder", str(images), "--output_folder", str(out),
                     "--output_format", "zarr", "--tile_size", TILE, "--save_probabilities", "1",
                     "--finalize", "1"]) == inf.EXIT_IMAGES_FAILED
    line = next(r.getMessage() for r in caplog.records if "not done" in r.getMessage())
    assert "12 of 48 block(s) not done" in line and "(shard 2)" in line and "rerun shard(s) 2 of --shard_count 4" in line
    # a plain run (no shard flags) finishes the remaining blocks itself and closes the output
    assert not segment(model, images, out, volume).failed
    assert_same_outputs(single, out)


def test_crash_mid_block_and_a_killed_runs_temporaries_leave_the_same_result(single_run, tmp_path, volume,
                                                                             monkeypatch):
    model, images, single = single_run
    out = tmp_path / "out"
    real, calls = blocks.put_chunks, []

    def crash_after_some_chunks(array_dir, key, data):  # the 6th block: its mask chunk written, then a crash
        calls.append(array_dir)
        if len(calls) == 3 * 5 + 1 + 1:
            raise OSError("simulated crash inside a block")
        real(array_dir, key, data)

    monkeypatch.setattr(blocks, "put_chunks", crash_after_some_chunks)
    summary = segment(model, images, out, volume, shard_index=0, shard_count=2)
    assert summary.failed and "simulated crash" in summary.failed[0][1]
    done = [n for n in os.listdir(out / "vol.zarr" / ".blocks") if n.endswith(".done")]
    assert "0.1.1.done" not in done and 5 <= len(done) <= 5 + blocks.WRITE_QUEUE_BLOCKS  # the writer ran ahead
    monkeypatch.setattr(blocks, "put_chunks", real)
    # what SIGKILL leaves: a temporary array of a dead process beside the chunks, with a partial chunk in it
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = out / "vol.zarr" / "0" / f".block.tmp-{socket.gethostname()}-{finished.pid}-abcdefgh"
    os.makedirs(stale / "0" / "0")
    (stale / "0" / "0" / "0").write_bytes(b"half")
    for index in (0, 1):
        assert not segment(model, images, out, volume, shard_index=index, shard_count=2).failed
    assert_same_outputs(single, out)
    assert temporaries(out) == []


_SAME_SHARD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
    import tifffile
    from test_inference_instances import intensity_predict
    from segkit.inference import folder
    kw = json.loads(sys.argv[2])
    volume = tifffile.imread(kw["image_folder"] + "/vol.tif")
    summary = folder.segment_folder(predict_fn=intensity_predict(volume[..., None]), **kw)
    sys.exit(1 if summary.failed else 0)
""")


@pytest.mark.slow
def test_two_processes_claiming_the_same_shard_do_not_corrupt_it(single_run, tmp_path, volume):
    model, images, single = single_run
    out = tmp_path / "out"
    kw = {"saved_model_filepath": model, "image_folder": str(images), "output_folder": str(out), "tile_size": TILE,
          "output_format": "zarr", "save_probabilities": True, "shard_index": 0, "shard_count": 2}
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_SHARD, ROOT, json.dumps(kw)], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert segment(model, images, out, volume, shard_index=1, shard_count=2).failed == []
    assert_same_outputs(single, out)
    assert temporaries(out) == []


def test_one_large_2d_image_split_across_shards_equals_one_process(tmp_path):
    import tifffile
    from test_inference_instances import image_3channel, one_hot_predict

    model = fake_model(tmp_path / "m", rank=2, channels=3, classes=3)
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "big.tif", image_3channel(touching_objects((64, 1040), seed=2)))  # 2 levels
    kw = {"saved_model_filepath": model, "image_folder": str(images), "tile_size": 64, "output_format": "zarr",
          "predict_fn": one_hot_predict}
    assert not folder.segment_folder(output_folder=str(tmp_path / "single"), **kw).failed
    for index in range(3):
        assert not folder.segment_folder(output_folder=str(tmp_path / "out"), shard_index=index, shard_count=3,
                                         **kw).failed
    np.testing.assert_array_equal(level0(tmp_path / "single" / "big.zarr"), level0(tmp_path / "out" / "big.zarr"))
    assert same_up_to_renumbering(level0(tmp_path / "single" / "labels" / "big.zarr"),
                                  level0(tmp_path / "out" / "labels" / "big.zarr"))
    assert len([n for n in os.listdir(tmp_path / "out" / "big.zarr" / ".blocks") if n.endswith(".done")]) == 17
    single, split = (zarr.open_group(str(tmp_path / run / "big.zarr"), mode="r") for run in ("single", "out"))
    assert split.attrs["multiscales"] == single.attrs["multiscales"] and len(single.attrs["multiscales"][0]["datasets"]) == 2
    np.testing.assert_array_equal(split["1"][...], single["1"][...])


def test_the_closing_step_scores_the_whole_volume_as_one_process(tmp_path, volume):
    from test_inference_instances import touching_objects as objects

    from segkit import instance_targets

    model = fake_model(tmp_path / "m", instances=False, rank=3, channels=1, classes=3)
    images = write_input(tmp_path, volume)
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = instance_targets.make_target(objects(SHAPE, seed=4, count=14), "three_class").astype(np.uint8)
    truth[:, :8, :8] = 0  # a few errors, so the scores are not all 1
    write_tiff_stack(masks / "vol.tif", truth, spacing=ISOTROPIC)
    assert not segment(model, images, tmp_path / "single", volume, mask_folder=str(masks)).failed
    for index in (0, 1):
        assert not segment(model, images, tmp_path / "out", volume, shard_index=index, shard_count=2).failed
    closing = segment(model, images, tmp_path / "out", volume, mask_folder=str(masks), finalize=True)
    assert not closing.failed and closing.skipped == ["vol.tif"]  # closed by the last shard already
    single_csv, split_csv = ((tmp_path / run / "metrics.csv").read_text() for run in ("single", "out"))
    assert split_csv == single_csv and "vol.tif" in split_csv


def test_an_output_of_another_geometry_is_refused_in_one_line(single_run, tmp_path, volume):
    model, images, _ = single_run
    out = tmp_path / "out"
    assert not segment(model, images, out, volume, shard_index=0, shard_count=3).failed
    with pytest.raises(InputError, match=r"vol.zarr: started with a different tile .*same flags"):
        segment(model, images, out, volume, shard_index=1, shard_count=3, tile_size="8,32,32")
    with pytest.raises(InputError, match=r"vol.zarr: started with a different outputs"):
        segment(model, images, out, volume, shard_index=1, shard_count=3, save_probabilities=False)


@pytest.mark.parametrize("flags,expected", [
    ({"finalize": True, "output_format": "tif"}, "--finalize 1 closes outputs split into blocks"),
    ({"shard_count": 2, "overwrite": True}, "--overwrite 1 with shards writing one OME-Zarr"),
])
def test_block_flags_refused_in_one_line(single_run, tmp_path, volume, flags, expected):
    model, images, _ = single_run
    with pytest.raises(InputError, match=expected):
        segment(model, images, tmp_path / "out", volume, **flags)


# --- the CLI in concurrent processes, a real convolutional model ---------------------------------------------


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet3d")
    images = root / "images"
    images.mkdir()
    write_tiff_stack(images / "vol.tif", blob_volume(SHAPE), spacing=ISOTROPIC)
    model = export_unet3d(str(root / "iso"), ISOTROPIC, depth=1)
    single = subprocess.run(cli(model, images, root / "single"), env=env_one_thread(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    return model, images, root / "single"


def cli(model, images, out, *extra):
    return [sys.executable, os.path.join(ROOT, "inference_unet.py"), "--saved_model_filepath", model,
            "--image_folder", str(images), "--output_folder", str(out), "--output_format", "zarr",
            "--tile_size", TILE, "--save_probabilities", "1", *map(str, extra)]


def env_one_thread():
    return {**os.environ, "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow
def test_four_concurrent_shard_processes_equal_one_process_exactly(unet, tmp_path):
    model, images, single = unet
    procs = [subprocess.Popen(cli(model, images, tmp_path / "out", "--shard_index", i, "--shard_count", 4),
                              env=env_one_thread(), stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    closing = subprocess.run(cli(model, images, tmp_path / "out", "--finalize", "1"), env=env_one_thread(),
                             capture_output=True, text=True)
    assert closing.returncode == 0, closing.stderr
    assert_same_outputs(single, tmp_path / "out", labels=False)
    assert temporaries(tmp_path / "out") == []


def assert_visible_chunks_whole(expected_zarr, written_zarr):
    """Every chunk file of level 0 decodes to the chunk of the one-process run (no half-written chunk)."""
    expected = zarr.open_array(os.path.join(str(expected_zarr), "0"), mode="r")
    written = zarr.open_array(os.path.join(str(written_zarr), "0"), mode="r")
    root = os.path.join(str(written_zarr), "0")
    chunk_files = [os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                   for f in files if not f.startswith(".") and "/." not in d[len(root):]]
    assert chunk_files
    for rel in chunk_files:
        index = [int(i) for i in rel.split(os.sep)]
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, written.chunks))
        np.testing.assert_array_equal(written[box], expected[box])


@pytest.mark.slow
def test_a_shard_killed_mid_run_and_rerun_gives_the_same_result(unet, tmp_path):
    model, images, single = unet
    out = tmp_path / "out"
    marks = out / "vol.zarr" / ".blocks"

    def some_blocks_done(_proc):
        return marks.is_dir() and sum(n.endswith(".done") for n in os.listdir(marks)) >= 3

    proc, _ = signal_group_when_ready(cli(model, images, out, "--shard_index", 0, "--shard_count", 2),
                                      some_blocks_done, sig=signal.SIGKILL, env=env_one_thread())
    assert proc.returncode == -signal.SIGKILL
    assert sum(n.endswith(".done") for n in os.listdir(marks)) < 24  # killed before its 24 blocks were done
    assert_visible_chunks_whole(single / "vol.zarr", out / "vol.zarr")
    rerun = subprocess.run(cli(model, images, out), env=env_one_thread(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr  # a plain run does the missing blocks (both shards') and closes
    assert not blocks.unfinished(str(out / "vol.zarr"))
    assert_same_outputs(single, out, labels=False)
    assert temporaries(out) == []


def test_slurm_script_submits_the_shards_then_the_closing_step_after_them(tmp_path):
    """scripts/slurm_volume_array.sh with a stand-in sbatch: an array of SHARDS tasks, then --finalize 1
    depending on it (afterok), both with flags inference_unet.py parses and the same for every step."""
    import shlex

    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "$CALLS"; echo "--" >> "$CALLS"\n'
                    'echo 4242\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "SHARDS": "3", "MODEL": "m dir/saved_model", "IMAGES": "vols", "OUTPUT": "seg"}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_volume_array.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [c.strip("\n").split("\n") for c in (tmp_path / "calls").read_text().split("--\n") if c.strip()]
    assert len(calls) == 2 and "--array=0-2" in calls[0] and "--dependency=afterok:4242" in calls[1]
    parsed = []
    for call in calls:
        wrap = next(a for a in call if a.startswith("--wrap="))
        argv = shlex.split(wrap.split("&& ", 1)[1])
        assert argv[:2] == ["python", "inference_unet.py"]
        parsed.append(vars(inf.build_parser().parse_args(argv[2:])))
    assert parsed[0]["saved_model_filepath"] == "m dir/saved_model" and parsed[0]["output_format"] == "zarr"
    assert not parsed[0]["finalize"] and parsed[1]["finalize"]
    assert {k: v for k, v in parsed[0].items() if k != "finalize"} == {k: v for k, v in parsed[1].items() if k != "finalize"}
