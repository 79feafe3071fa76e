"""Issue #18: the original flags of every stage, consistent --help, the missing-GPU warning, the training
progress bar and TensorFlow's start-up noise."""
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import ROOT
from savedmodel_helpers import export_pointwise

import build_lmdb
import inference_unet
import train_unet
from segkit import cliutil, tfquiet
from segkit.training import loop, trainer

PARSERS = {"build_lmdb": build_lmdb.build_parser, "train_unet": train_unet.build_parser,
           "inference_unet": inference_unet.build_parser}


@pytest.fixture(scope="module")
def pointwise(tmp_path_factory):
    return export_pointwise(str(tmp_path_factory.mktemp("model") / "pointwise"), channels=1, number_classes=2)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.random.default_rng(0).integers(0, 4000, (40, 56)).astype(np.uint16))
    return folder


def _infer(model, images, out, *extra):
    return inference_unet.main(["--saved_model_filepath", model, "--image_folder", str(images),
                                "--output_folder", str(out), *map(str, extra)])


# --- inference_unet.py: --number_classes / --number_channels / --checkpoint_filepath ----------------


def test_matching_number_classes_and_channels_are_accepted(pointwise, images, tmp_path):
    assert _infer(pointwise, images, tmp_path / "out", "--number_classes", 2, "--number_channels", 1) == 0
    assert (tmp_path / "out" / "a.tif").exists()


@pytest.mark.parametrize("flag, value, known", [("--number_classes", 3, 2), ("--number_channels", 3, 1)])
def test_mismatched_original_flag_exits_2_with_one_line(pointwise, images, tmp_path, capsys, flag, value, known):
    assert _infer(pointwise, images, tmp_path / "out", flag, value) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{flag} {value} does not match" in err and f"which has {known}" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_filepath_points_to_saved_model_filepath(images, tmp_path, capsys):
    code = inference_unet.main(["--checkpoint_filepath", "model.ckpt", "--image_folder", str(images),
                                "--output_folder", str(tmp_path / "out"), "--number_classes", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--saved_model_filepath" in err and "model.ckpt" in err


def test_saved_model_filepath_is_still_required(images, tmp_path, capsys):
    code = inference_unet.main(["--image_folder", str(images), "--output_folder", str(tmp_path / "out")])
    assert code == 2 and "--saved_model_filepath is required" in capsys.readouterr().err


# --- --help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(PARSERS))
def test_help_has_no_none_defaults_and_no_doubled_defaults(stage):
    text = PARSERS[stage]().format_help()
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    for chunk in flat.split("--")[1:]:  # one flag's help each
        assert chunk.count("default") <= 1, chunk
    assert "--verbose [0/1]" in text
    assert "(default: False)" not in text and "(default: True)" not in text  # 0/1, as the flags take


def test_help_of_required_flags_shows_no_default():
    text = " ".join(train_unet.build_parser().format_help().split())
    assert "--output_dir OUTPUT_DIR checkpoints, logs, metrics.csv, config.json and saved_model/ go here --" in text


@pytest.mark.parametrize("argv, expected", [([], False), (["--verbose"], True), (["--verbose", "1"], True),
                                            (["--verbose", "0"], False)])
def test_verbose_accepts_0_1_and_bare(argv, expected):
    parser = cliutil.ArgumentParser()
    cliutil.add_verbose_flag(parser)
    assert parser.parse_args(argv).verbose is expected


# --- missing GPU ----------------------------------------------------------------------------------


def test_make_strategy_warns_when_slurm_promised_a_gpu_but_tensorflow_sees_none(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")
    for key in ("TF_CONFIG", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    tf = tfquiet.import_tensorflow()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    with caplog.at_level(logging.WARNING, logger=trainer.log.name):
        strategy, index, count, chief = trainer.make_strategy()
    assert (index, count, chief) == (0, 1, True)
    lines = [r for r in caplog.records if r.levelno == logging.WARNING and "NO GPU VISIBLE" in r.getMessage()]
    assert len(lines) == 1 and "SLURM_JOB_GPUS=0,1" in lines[0].getMessage()


def test_no_warning_without_a_gpu_promise_or_with_a_gpu(monkeypatch, caplog):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GRES", "SBATCH_GRES", *trainer.devices.SLURM_GPU_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level(logging.WARNING):
        assert trainer.warn_if_gpu_missing(0) is None
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        assert trainer.warn_if_gpu_missing(1) is None
        assert "CUDA_VISIBLE_DEVICES=0" in trainer.warn_if_gpu_missing(0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


# --- progress bar ------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_training_bar_on_a_terminal_shows_eta_and_is_off_in_log_files():
    terminal = _Terminal()
    with loop.progress_bar(10, 40, stream=terminal) as bar:
        assert not bar.disable
        for _ in range(5):
            bar.update(1)
        bar.refresh()
    text = terminal.getvalue()
    assert "15/40" in text and "<" in text  # n/total and tqdm's [elapsed<remaining] ETA
    log_file = io.StringIO()
    with loop.progress_bar(0, 40, stream=log_file) as bar:
        bar.update(3)
    assert bar.disable and log_file.getvalue() == ""


# --- TensorFlow start-up noise ---------------------------------------------------------------------

NOISY = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from segkit import tfquiet
with tfquiet.native_stderr_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1795967093.468527   21454 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"E0000 00:00:1795967103.281390   21454 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
    os.write(2, b"I0000 00:00:1.5 7 port.cc:153] oneDNN custom operations are on. You may see ...\n")
    os.write(2, b"Traceback (most recent call last): a real problem\n")
    print("python stderr line", file=sys.stderr)
"""


def test_noise_filter_drops_native_start_up_lines_and_keeps_the_rest():
    result = subprocess.run([sys.executable, "-c", NOISY, ROOT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr.splitlines() == ["Traceback (most recent call last): a real problem", "python stderr line"]


@pytest.mark.slow
def test_training_run_stderr_has_no_cuda_or_absl_noise(tmp_path):
    data = os.path.join(ROOT, "data")
    assert build_lmdb.main(["--image_folder", os.path.join(data, "images"), "--mask_folder",
                            os.path.join(data, "masks"), "--output_folder", str(tmp_path), "--dataset_name", "d",
                            "--use_tiling", "1", "--tile_size", "64", "--number_classes", "3"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cmd = [sys.executable, os.path.join(ROOT, "train_unet.py"), "--train_database", str(tmp_path / "train-d.lmdb"),
           "--test_database", str(tmp_path / "test-d.lmdb"), "--output_dir", str(tmp_path / "run"),
           "--number_classes", "3", "--depth", "2", "--base_filters", "4", "--crop_size", "32", "--batch_size", "2",
           "--max_steps", "2", "--test_every_n_steps", "2"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("cuInit", "cudart", "absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr
    assert "test pass at step 2" in result.stderr  # our own log lines still come through
