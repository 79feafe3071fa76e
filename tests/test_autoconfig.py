"""Self-configuration (segkit.training.autoconfig): unset training flags follow the data; flags always win."""
import json
import os

import numpy as np
import pytest
import tifffile

import build_lmdb
import train_unet
from segkit.training import autoconfig, checkpoints
from segkit.training.resolve import resolve_config


def _meta(shape, records, tile=None):
    sources = [{"height": shape[0], "width": shape[1]}] * records
    return {"tile_size": tile, "num_records": records, "sources": sources}


def test_small_images_get_small_crops_and_large_batches_large_images_the_reverse():
    small = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((64, 64), 40)]), 16, gpus=0)
    large = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((1024, 1024), 40)]), 16, gpus=0)
    assert small["crop_size"].value == (64, 64) and large["crop_size"].value == (256, 256)
    assert small["batch_size"].value > large["batch_size"].value == 8
    assert "median training record 64x64" in small["crop_size"].reason
    on_gpu = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((1024, 1024), 40)]), 16, gpus=2)
    assert on_gpu["crop_size"].value == (512, 512) and on_gpu["batch_size"].value == 4


def test_crop_follows_rectangular_records_and_the_size_factor():
    chosen = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((100, 700), 3)]), 32, gpus=0)
    assert chosen["crop_size"].value == (96, 256)  # floor to the size factor, capped per axis
    tiny = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((20, 20), 3)]), 32, gpus=0)
    assert tiny["crop_size"].value == (32, 32)  # never below one size factor (the reader mirror-pads)


def test_whole_volumes_are_summarized_by_depth_height_and_width():
    """A volume database built without tiles describes each source by depth, height and width (build_lmdb.py):
    the summary has 3 axes, so the crop is a 3D one."""
    meta = {"tile_size": None, "num_records": 1, "sources": [{"depth": 40, "height": 250, "width": 250}]}
    data = autoconfig.DataSummary.from_metadata([meta])
    assert data.record_shape == (40, 250, 250)
    crop = autoconfig.choose({}, data, (4, 16, 16), gpus=0)["crop_size"].value
    assert len(crop) == 3 and all(c % f == 0 for c, f in zip(crop, (4, 16, 16)))


def test_tiled_databases_use_the_tile_size_and_the_median_over_databases():
    data = autoconfig.DataSummary.from_metadata([_meta((512, 512), 10, tile=128), _meta((64, 64), 1)])
    assert data.record_shape == (128, 128) and data.records == 11


def test_test_interval_and_budget_follow_the_record_count():
    few = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((256, 256), 80)]), 16, gpus=0)
    many = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([_meta((256, 256), 50000)]), 16, gpus=0)
    assert few["test_every_n_steps"].value == 100  # 10 passes over 80 records at batch 8
    assert many["test_every_n_steps"].value == 1000  # capped at the original's interval
    assert few["max_steps"].value == 2000 and many["max_steps"].value == 20000
    assert few["learning_rate"].value == 1e-3


def test_a_pass_over_the_data_counts_the_crops_a_large_record_holds():
    """One volume stored whole is one record but many crops: its test interval is 10 passes of crops, not the
    50-step floor of 10 one-step passes (a test pass every few seconds would eat the budget)."""
    meta = {"tile_size": None, "num_records": 1, "sources": [{"depth": 200, "height": 250, "width": 250}]}
    chosen = autoconfig.choose({}, autoconfig.DataSummary.from_metadata([meta]), (16, 16, 16), gpus=0)
    crop, batch = chosen["crop_size"].value, chosen["batch_size"].value
    crops = 200 * 250 * 250 / np.prod(crop)
    assert chosen["test_every_n_steps"].value == int(10 * np.ceil(crops / batch)) // 10 * 10
    assert f"{crops:.3g} crops each" in chosen["test_every_n_steps"].reason


def test_every_flag_the_user_passes_wins():
    user = {"crop_size": 96, "batch_size": 3, "learning_rate": 1e-4, "test_every_n_steps": 1000, "max_steps": 7}
    assert autoconfig.choose(user, autoconfig.DataSummary.from_metadata([_meta((64, 64), 5)]), 16, gpus=0) == {}
    budget = autoconfig.choose({"max_minutes": 10}, autoconfig.DataSummary.from_metadata([_meta((64, 64), 5)]), 16, 0)
    assert "max_steps" not in budget  # a time budget replaces the step budget


def test_the_loss_follows_the_training_target_unless_passed():
    """Databases of the 3-class instance target train with cross-entropy + Dice (the thin boundary class
    separates touching objects), and so do the distance and the dense boundary targets and class masks (nnU-Net's
    default); --loss wins."""
    data = autoconfig.DataSummary.from_metadata([_meta((256, 256), 80)])
    assert autoconfig.choose({"loss": None}, data, 16, 0, "three_class")["loss"].value == "ce+dice"
    assert autoconfig.choose({"loss": None}, data, 16, 0, "boundary")["loss"].value == "ce+dice"
    assert autoconfig.choose({"loss": None}, data, 16, 0)["loss"].value == "ce+dice"
    assert "loss" not in autoconfig.choose({"loss": "focal"}, data, 16, 0, "three_class")


def test_gradients_are_clipped_unless_the_flag_says_otherwise():
    data = autoconfig.DataSummary.from_metadata([_meta((256, 256), 80)])
    assert autoconfig.choose({"clip_norm": None}, data, 16, 0)["clip_norm"].value == 1.0
    assert "clip_norm" not in autoconfig.choose({"clip_norm": 0.0}, data, 16, 0)


def test_the_unet_width_follows_the_device_unless_passed():
    """8 filters on a CPU (more steps in a time budget), nnU-Net's 32 on GPUs (16 for volumes, float32); a passed
    --base_filters wins, and FC-DenseNet has no width to choose."""
    assert autoconfig.choose_width("unet", None, gpus=0).value == 8
    assert autoconfig.choose_width("unet", None, gpus=2).value == 32
    assert autoconfig.choose_width("unet3d", None, gpus=0).value == 8
    assert autoconfig.choose_width("unet3d", None, gpus=1).value == 16
    assert "2 GPU(s)" in autoconfig.choose_width("unet", None, gpus=2).reason
    assert autoconfig.choose_width("unet", 12, gpus=2) is None
    assert autoconfig.choose_width("fcdensenet56", None, gpus=2) is None


def test_visible_gpus_without_a_driver_is_zero():
    if os.path.exists("/proc/driver/nvidia/gpus"):
        pytest.skip("an NVIDIA driver is present")
    assert autoconfig.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 0


@pytest.fixture(scope="module")
def two_databases(tmp_path_factory):
    """Databases of 64x64 and of 1024x1024 images (uint8, 2 classes)."""
    root = tmp_path_factory.mktemp("autodbs")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("small", 64), ("large", 1024)):
        images, masks = root / name / "images", root / name / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(4):
            tifffile.imwrite(images / f"im{i}.tif", rng.integers(0, 255, (size, size), dtype=np.uint8))
            tifffile.imwrite(masks / f"im{i}.tif", (rng.random((size, size)) > 0.5).astype(np.uint8))
        assert build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                                str(root / name), "--dataset_name", name, "--train_fraction", "0.5"]) == 0
        paths[name] = (str(root / name / f"train-{name}.lmdb"), str(root / name / f"test-{name}.lmdb"))
    return paths


def _resolve(paths, out, *flags):
    train, test = paths
    args = train_unet.build_parser().parse_args(["--train_database", train, "--test_database", test,
                                                 "--output_dir", str(out), *map(str, flags)])
    return resolve_config(args)


def test_resolved_configuration_follows_the_databases_and_records_why(two_databases, tmp_path):
    small = _resolve(two_databases["small"], tmp_path / "s")
    large = _resolve(two_databases["large"], tmp_path / "l")
    assert small.crop_size[0] < large.crop_size[0] and small.crop_size == (64, 64)
    assert small.batch_size > large.batch_size
    assert set(small.origins) == {"base_filters", "number_classes", "crop_size", "batch_size", "learning_rate",
                                  "test_every_n_steps", "warmup_steps", "max_steps", "loss", "clip_norm"}
    assert small.clip_norm == autoconfig.CLIP_NORM == 1.0
    assert small.model_config["base_filters"] == 8 and small.origins["base_filters"].startswith("8 filters")
    assert small.loss == "ce+dice" and small.origins["loss"].startswith("the Dice term weighs each class alike")
    assert small.number_classes == 2 and "largest class id in the databases' masks is 1" in small.origins["number_classes"]
    assert small.warmup_steps == min(100, small.test_every_n_steps)  # the interval was chosen: at most 100
    saved = json.loads(small.to_json())
    assert saved["origins"]["crop_size"].startswith("median training record 64x64")


def test_resolved_configuration_keeps_explicit_flags_with_the_original_meaning(two_databases, tmp_path):
    config = _resolve(two_databases["large"], tmp_path / "o", "--crop_size", 64, "--batch_size", 4,
                      "--learning_rate", 1e-4, "--test_every_n_steps", 1000, "--max_steps", 50, "--number_classes", 3,
                      "--loss", "ce", "--base_filters", 12, "--clip_norm", 0)
    assert config.number_classes == 3 and config.model_config["base_filters"] == 12 and config.clip_norm == 0
    assert (config.crop_size, config.batch_size, config.learning_rate) == ((64, 64), 4, 1e-4)
    assert (config.test_every_n_steps, config.warmup_steps, config.max_steps) == (1000, 1000, 50)
    assert config.origins == {} and "origins" not in config.to_dict()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-3"])
def test_a_bad_time_budget_is_refused(two_databases, tmp_path, capsys, value):
    train, test = two_databases["small"]
    assert train_unet.main(["--train_database", train, "--test_database", test, "--output_dir",
                            str(tmp_path / "x"), "--max_minutes", value]) == 2
    assert "--max_minutes must be a positive number" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_a_time_budget_stops_the_run_tests_and_exports(two_databases, tmp_path):
    train, test = two_databases["small"]
    out = tmp_path / "budget"
    assert train_unet.main(["--train_database", train, "--test_database", test, "--output_dir", str(out),
                            "--depth", "2", "--base_filters", "4", "--test_every_n_steps", "100000",
                            "--max_minutes", "0.05"]) == 0
    with open(out / "metrics.csv") as fh:
        rows = fh.read().splitlines()
    assert len(rows) == 2  # the header and the final test pass the budget ended with
    assert os.path.exists(out / "saved_model" / "saved_model.pb")
    with open(out / "config.json") as fh:
        assert json.load(fh)["max_minutes"] == 0.05
    store = checkpoints.CheckpointStore(str(out), is_chief=True)
    spent = store.load_state(store.pointer()["latest"]).train_seconds
    assert spent >= 0.05 * 60 * 0.5  # the budget counts the steps and the test passes of the run
    # The same command again resumes; the budget covers every invocation, so it has nothing left to spend.
    assert train_unet.main(["--train_database", train, "--test_database", test, "--output_dir", str(out),
                            "--depth", "2", "--base_filters", "4", "--test_every_n_steps", "100000",
                            "--max_minutes", "0.05"]) == 0
    with open(out / "metrics.csv") as fh:
        assert fh.read().splitlines() == rows


def test_cosine_needs_an_end_steps_or_a_time_budget(two_databases, tmp_path, capsys):
    train, test = two_databases["small"]
    base = ["--train_database", train, "--test_database", test, "--lr_schedule", "cosine"]
    assert train_unet.main(base + ["--output_dir", str(tmp_path / "x")]) == 2
    assert "pass --max_steps N or --max_minutes M" in capsys.readouterr().err
    config = _resolve(two_databases["small"], tmp_path / "o", "--lr_schedule", "cosine", "--max_minutes", 5)
    assert config.max_steps is None and config.max_minutes == 5
    assert "max_minutes" in config.run_defining()  # the decay ends with the budget: another budget, another run
