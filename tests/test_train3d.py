"""train_unet.py on volume databases (issue #15): unet3d by default, planned from the voxel size; 3-D crops chosen
by autoconfig; export serving NDHWC in bare TensorFlow; resume; a 2-D model on volumes refused in one line."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
from lmdb_helpers import write_database

import train_unet
from segkit import cliutil, lmdb_format
from segkit.training import autoconfig, resolve
from segkit.training.resolve import resolve_config
from segkit.training.summaries import middle_sections

ANISOTROPIC = [0.04, 0.004, 0.004]
TINY = ["--depth", "2", "--base_filters", "4", "--crop_size", "16", "--batch_size", "2", "--seed", "1",
        "--reader_count", "1"]


def blob_volumes(count, shape_zyx=(16, 32, 32), seed=0):
    """Volumes with a bright ball (class 1) on a dark, noisy background (class 0): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx)
    out = []
    for _ in range(count):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape_zyx)
        mask = (((z - centre[0]) / 5) ** 2 + ((y - centre[1]) / 9) ** 2 + ((x - centre[2]) / 9) ** 2 < 1).astype(np.uint8)
        image = (100 + 50 * mask + rng.normal(0, 5, shape_zyx)).astype(np.float32)[..., None]
        out.append((image, mask))
    return out


def set_metadata(path, **fields):
    """Add keys to a database's metadata record (what build_lmdb.py writes for volumes, e.g. voxel_size)."""
    env = lmdb.open(path, subdir=True)
    with env.begin(write=True) as txn:
        meta = lmdb_format.decode_metadata(txn.get(lmdb_format.META_KEY))
        txn.put(lmdb_format.META_KEY, lmdb_format.encode_metadata({**meta, **fields}))
    env.close()


@pytest.fixture(scope="module")
def volume_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    dbs = {}
    for name, voxel in (("aniso", ANISOTROPIC), ("plain", [0.01, 0.01, 0.01]), ("novoxel", None)):
        train = write_database(str(root / f"train-{name}.lmdb"), blob_volumes(4, seed=1))
        test = write_database(str(root / f"test-{name}.lmdb"), blob_volumes(2, seed=2))
        if voxel:
            for path in (train, test):
                set_metadata(path, spatial_rank=3, voxel_size_zyx_um=voxel)
        dbs[name] = (train, test)
    flat = write_database(str(root / "flat.lmdb"), [(np.zeros((32, 32, 1), np.float32), np.zeros((32, 32), np.uint8))])
    dbs["flat"] = (flat, flat)
    return dbs


def argv(dbs, out, *extra, kind="aniso"):
    train, test = dbs[kind]
    return ["--train_database", train, "--test_database", test, "--output_dir", str(out), "--number_classes", "2",
            *TINY, *map(str, extra)]


def read_steps(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    x = np.random.default_rng(0).normal(size=(1, 8, 24, 16, 1)).astype(np.float32)
    probs = serve(images=tf.constant(x))["probabilities"].numpy()
    project = [m for m in ("models", "train_unet", "imagereader") if m in sys.modules]
    print(json.dumps({"shape": probs.shape, "sum_err": float(abs(probs.sum(-1) - 1).max()), "project": project}))
""")


def test_volumes_train_unet3d_planned_from_the_voxel_size_and_export_ndhwc(volume_dbs, tmp_path):
    out = tmp_path / "run"
    assert train_unet.main(argv(volume_dbs, out, "--max_steps", 4, "--test_every_n_steps", 2)) == 0
    assert read_steps(out) == [2, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "unet3d" and config["crop_size"] == [16, 16, 16]
    assert config["model_config"]["voxel_size"] == ANISOTROPIC
    assert config["model_config"]["pool_sizes"] == [[1, 2, 2], [1, 2, 2]]
    meta = json.loads((out / "saved_model" / "assets" / "segmentation_metadata.json").read_text())
    assert meta["spatial_rank"] == 3 and meta["voxel_size_um"] == ANISOTROPIC
    assert meta["size_factor"] == [1, 4, 4] and meta["receptive_field_radius"] == [0, 23, 23]
    assert meta["training_tile_size"] == [16, 16, 16]
    assert os.listdir(out / "logs" / "test")  # the middle-section overlays and scores were written
    served = subprocess.run([sys.executable, "-c", SERVE, str(out / "saved_model")], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    result = json.loads(served.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 8, 24, 16, 2] and result["sum_err"] < 1e-4 and result["project"] == []


def test_a_3d_run_resumes_from_its_checkpoint(volume_dbs, tmp_path):
    out = tmp_path / "run"
    assert train_unet.main(argv(volume_dbs, out, "--max_steps", 2, "--test_every_n_steps", 2, kind="plain")) == 0
    with open(out / "checkpoints" / "checkpoint.json") as fh:
        assert json.load(fh)["latest"] == "ckpt-000000002"
    assert train_unet.main(argv(volume_dbs, out, "--max_steps", 4, "--test_every_n_steps", 2, "--resume", 1,
                                kind="plain")) == 0
    assert read_steps(out) == [2, 4]  # continued at step 2, not restarted
    with open(out / "checkpoints" / "checkpoint.json") as fh:
        assert json.load(fh)["latest"] == "ckpt-000000004"


def test_isotropic_volumes_pool_every_axis(volume_dbs, tmp_path):
    config = resolve_config(train_unet.build_parser().parse_args(argv(volume_dbs, tmp_path / "run", kind="plain")))
    assert config.model == "unet3d" and config.model_config["voxel_size"] == [0.01, 0.01, 0.01]
    assert config.model_config["pool_sizes"] == [[2, 2, 2], [2, 2, 2]]


def test_a_volume_database_without_a_voxel_size_is_refused(volume_dbs, tmp_path):
    """Anisotropy is read from the voxel size, never assumed (issue #14): no silent isotropic guess."""
    args = train_unet.build_parser().parse_args(argv(volume_dbs, tmp_path / "run", kind="novoxel"))
    with pytest.raises(cliutil.InputError, match="without a voxel size.*--voxel_size z,y,x"):
        resolve_config(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,kind,message", [
    ("unet", "aniso", "--model unet is a 2-D model but"),
    ("fcdensenet56", "aniso", "pass --model unet3d"),
    ("unet3d", "flat", "--model unet3d is a 3-D model but"),
])
def test_a_model_of_the_wrong_rank_is_refused_in_one_line(volume_dbs, tmp_path, capsys, model, kind, message):
    train, test = volume_dbs[kind]
    args = ["--train_database", train, "--test_database", test, "--output_dir", str(tmp_path / "run"),
            "--model", model, "--crop_size", "16", "--batch_size", "2"]
    assert train_unet.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("record,factors,gpus,crop", [
    ((16, 32, 32), (1, 4, 4), 0, (16, 32, 32)),         # small records: the record itself
    ((40, 512, 512), (1, 4, 4), 0, (40, 56, 56)),        # the largest axis shrinks first, by one factor a time
    ((37, 300, 301), (2, 8, 8), 0, (36, 64, 56)),        # multiples of the per-axis factor
    ((200, 200, 200), (4, 4, 4), 0, (52, 52, 48)),       # 131072 voxels on a CPU
    ((200, 200, 200), (4, 4, 4), 1, (128, 128, 128)),    # GPU budget 128^3
    ((3, 5, 5), (4, 4, 4), 0, (4, 4, 4)),                # never below one factor
])
def test_autoconfig_chooses_3d_crops_within_a_voxel_budget(record, factors, gpus, crop):
    data = autoconfig.DataSummary(record_shape=record, records=10)
    user = dict.fromkeys(("crop_size", "batch_size", "learning_rate", "test_every_n_steps", "max_steps",
                          "max_minutes"))
    chosen = autoconfig.choose(user, data, factors, gpus)
    kind = "gpu" if gpus else "cpu"
    assert chosen["crop_size"].value == crop
    assert all(c % f == 0 and c <= max(r // f * f, f) for c, f, r in zip(crop, factors, record))
    assert np.prod(crop) <= max(autoconfig.CROP_VOXELS[kind], np.prod(factors))
    expected_batch = min(max(round(autoconfig.BATCH_VOXELS[kind] / np.prod(crop)), 2), 64)
    assert chosen["batch_size"].value == expected_batch and "voxels" in chosen["batch_size"].reason


def test_autoconfig_shrinks_the_longest_axis_in_micrometres_first_and_keeps_per_axis_factors():
    # FIB-SEM every 5th section (10 x 10 x 50 nm): z pools twice (factor 4), y and x four times (16)
    user = {"crop_size": None, "batch_size": None}
    aniso = autoconfig.DataSummary(record_shape=(40, 250, 250), records=1, voxel_size=(0.05, 0.01, 0.01))
    crop = autoconfig.choose(user, aniso, (4, 16, 16), 0)["crop_size"]
    assert crop.value == (16, 96, 80) and "micrometres" in crop.reason and "4x16x16" in crop.reason
    extents = [c * v for c, v in zip(crop.value, aniso.voxel_size)]
    assert max(extents) / min(extents) < 1.25  # about a cube in micrometres: 0.8 x 0.96 x 0.8
    # in voxels the same record would keep every section and give up y and x instead
    voxels = autoconfig.choose(user, autoconfig.DataSummary((40, 250, 250), 1), (4, 16, 16), 0)["crop_size"].value
    assert voxels == (40, 64, 48)
    iso = autoconfig.DataSummary(record_shape=(200, 250, 250), records=1, voxel_size=(0.01, 0.01, 0.01))
    assert autoconfig.choose(user, iso, (16, 16, 16), 0)["crop_size"].value == (48, 48, 48)


def test_data_summary_takes_the_voxel_size_resolve_read_from_the_databases():
    """resolve reads and checks the volumes' voxel size once (present, every database the same) and the crop rule
    gets that one; images have none."""
    meta = {"num_records": 2, "tile_size": [8, 32, 32], "voxel_size_zyx_um": [0.04, 0.004, 0.004]}
    assert autoconfig.DataSummary.from_metadata([meta], [0.04, 0.004, 0.004]).voxel_size == (0.04, 0.004, 0.004)
    assert autoconfig.DataSummary.from_metadata([{"num_records": 1, "tile_size": 64}]).voxel_size is None
    args = SimpleNamespace(model="unet3d", train_database=["a.lmdb", "b.lmdb"])
    assert resolve._voxel_size(args, [meta, meta]) == [0.04, 0.004, 0.004]
    with pytest.raises(cliutil.InputError, match="different voxel sizes"):
        resolve._voxel_size(args, [meta, {**meta, "voxel_size_zyx_um": [0.05, 0.004, 0.004]}])
    # and the crop rule sees it: 40x250x250 sections of 10x10x50 nm shrink y and x less than in voxels
    big = {"num_records": 1, "tile_size": [40, 250, 250], "voxel_size_zyx_um": [0.05, 0.01, 0.01]}
    flags = train_unet.build_parser().parse_args(["--train_database", "t.lmdb", "--test_database", "s.lmdb",
                                                  "--output_dir", "o", "--model", "unet3d"])
    chosen, _ = resolve._self_configure(flags, [big], (4, 16, 16), resolve._voxel_size(flags, [big]))
    assert chosen.crop_size == (16, 96, 80)


def test_tensorboard_shows_the_middle_z_section_of_volumes():
    images = np.arange(2 * 5 * 4 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 4, 1)
    truth = np.arange(2 * 5 * 4 * 4).reshape(2, 5, 4, 4) % 3
    shown = middle_sections(images, truth, truth + 1)
    np.testing.assert_array_equal(shown[0], images[:, 2])
    np.testing.assert_array_equal(shown[1], truth[:, 2]) and np.testing.assert_array_equal(shown[2], truth[:, 2] + 1)
    flat = middle_sections(images[:, 0], truth[:, 0], truth[:, 0])
    assert flat[0] is not None and flat[0].shape == (2, 4, 4, 1)
