"""The quality benchmark without the shared data: its bookkeeping (one run per (data set, seed), a
mean +- sd row per data set) with the stages replaced by stand-ins returning fixed figures, and its
data preparation (dsb foreground masks, fib2d membrane sections) on tiny synthetic stand-ins.
"""
import csv
import importlib.util
import os
import sys

import numpy as np
import pytest
import tifffile
from conftest import ROOT
from skimage.segmentation import find_boundaries

from segkit import cliutil


def load_bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", os.path.join(ROOT, "benchmarks", "bench_quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench():
    return load_bench_quality()


def fake_stages(bench, monkeypatch, result):
    """Replace preparation, build_lmdb and the (train, infer) runs; returns the list of runs made."""
    calls = []

    def fake_prepare(name, data_root, folder):
        return bench.Prepared(name, "images", "masks", "test.txt", "test_images")

    def fake_run_seed(data, seed, args, train_db, test_db):
        calls.append((data.name, seed, train_db))
        return result(data.name, seed, args)

    monkeypatch.setattr(bench, "prepare", fake_prepare)
    monkeypatch.setattr(bench, "build", lambda data, folder: (f"train-{data.name}.lmdb", f"test-{data.name}.lmdb"))
    monkeypatch.setattr(bench, "run_seed", fake_run_seed)
    return calls


def test_every_dataset_and_seed_runs_and_gets_a_mean_sd_row(bench, tmp_path, monkeypatch, capsys):
    iou = {0: 0.949, 1: 0.953, 2: 0.951}

    def result(name, seed, args):
        return {"steps": 1000 + seed, "train_s": 60 * args.max_minutes + seed, "iou_fg": iou[seed] - (name == "dsb"),
                "dice_fg": 0.97, "pixel_accuracy": 0.98, "iou_fg_tta": 0.955, "dice_fg_tta": 0.977,
                "iou_fg_mirror": 0.94}

    calls = fake_stages(bench, monkeypatch, result)
    out = tmp_path / "out"
    assert bench.main(["--output_dir", str(out), "--datasets", "nist", "dsb", "--seeds", "0", "1", "2",
                       "--max_minutes", "10"]) == 0
    assert calls == [("nist", 0, "train-nist.lmdb"), ("nist", 1, "train-nist.lmdb"), ("nist", 2, "train-nist.lmdb"),
                     ("dsb", 0, "train-dsb.lmdb"), ("dsb", 1, "train-dsb.lmdb"), ("dsb", 2, "train-dsb.lmdb")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine at start: ") and "cores, load average" in lines[0]
    assert any(line.startswith("machine at end: ") for line in lines)
    mean_rows = [line.split() for line in lines if line.split()[1:2] == ["mean"]]
    assert [row[0] for row in mean_rows] == ["nist", "dsb"]
    # dataset, "mean", steps, train s, IoU, Dice, accuracy, IoU tta, Dice tta: each "mean+-sd"
    nist = mean_rows[0]
    assert nist[2] == "1001" and nist[3] == "601+-1"
    iou_mean, iou_sd = map(float, nist[4].split("+-"))
    assert iou_mean == pytest.approx(0.951) and iou_sd == pytest.approx(0.002, abs=1e-4)
    assert float(mean_rows[1][4].split("+-")[0]) == pytest.approx(-0.049)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["seed"]) for r in rows] == [
        ("nist", "0"), ("nist", "1"), ("nist", "2"), ("nist", "mean"), ("nist", "sd"),
        ("dsb", "0"), ("dsb", "1"), ("dsb", "2"), ("dsb", "mean"), ("dsb", "sd")]
    assert float(rows[1]["iou_fg"]) == 0.953 and float(rows[3]["iou_fg"]) == pytest.approx(0.951)
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_one_seed_prints_no_mean_row_and_all_datasets_by_default(bench, tmp_path, monkeypatch, capsys):
    calls = fake_stages(bench, monkeypatch, lambda name, seed, args: {
        "steps": 5, "train_s": 1.0, "iou_fg": 0.5, "dice_fg": 0.6, "pixel_accuracy": 0.7,
        "iou_fg_tta": float("nan"), "dice_fg_tta": float("nan"), "iou_fg_mirror": float("nan")})
    assert bench.main(["--output_dir", str(tmp_path / "o"), "--seeds", "3"]) == 0
    assert [c[:2] for c in calls] == [("nist", 3), ("dsb", 3), ("fib2d", 3)]
    out = capsys.readouterr().out
    assert " mean " not in out and "fib2d" in out


def test_training_gets_only_the_defaults_budget_and_seed(bench, tmp_path, monkeypatch):
    """train_unet.py sees --number_classes 2, --seed, --max_minutes and nothing else unless --extra."""
    commands = []

    def fake_run(cmd, log_path):
        commands.append(cmd)
        if "train_unet.py" in cmd[1]:
            model = cmd[cmd.index("--output_dir") + 1]
            os.makedirs(model)
            (tmp_path / "m.csv").write_text("step,test_loss\n50,0.3\n120,0.2\n")
            os.replace(tmp_path / "m.csv", os.path.join(model, "metrics.csv"))
        else:
            folder = cmd[cmd.index("--output_folder") + 1]
            os.makedirs(folder)
            with open(os.path.join(folder, "metrics.csv"), "w") as fh:
                fh.write("image,pixel_accuracy,iou_1,dice_1\na,0.9,0.8,0.85\nALL,0.91,0.81,0.86\n")
        return 12.0

    monkeypatch.setattr(bench, "run", fake_run)
    data = bench.Prepared("dsb", "i", "m", "t.txt", "ti")
    args = bench.parse_args(["--output_dir", str(tmp_path), "--max_minutes", "0.5"])
    result = bench.run_seed(data, 1, args, "train.lmdb", "test.lmdb")
    assert result == {"steps": 120, "train_s": 12.0, "iou_fg": 0.81, "dice_fg": 0.86, "pixel_accuracy": 0.91,
                      "iou_fg_tta": 0.81, "dice_fg_tta": 0.86, "iou_fg_mirror": 0.81}
    train = commands[0]
    flags = [a for a in train[2:] if a.startswith("--")]
    assert flags == ["--train_database", "--test_database", "--output_dir", "--number_classes", "--seed", "--max_minutes"]
    assert train[train.index("--max_minutes") + 1] == "0.5" and train[train.index("--seed") + 1] == "1"
    assert "--tta" in commands[2] and commands[3][-2:] == ["--border", "mirror"]
    assert all(c[c.index("--mask_folder") + 1] == "m" for c in commands[1:])

    commands.clear()
    args = bench.parse_args(["--output_dir", str(tmp_path), "--extra", "--batch_size 8 --loss ce+dice", "--tta", "0",
                             "--mirror", "0"])
    result = bench.run_seed(data, 0, args, "train.lmdb", "test.lmdb")
    assert commands[0][-4:] == ["--batch_size", "8", "--loss", "ce+dice"]
    assert len(commands) == 2 and np.isnan(result["iou_fg_tta"]) and np.isnan(result["iou_fg_mirror"])


# ----------------------------------------------------------------------------- data preparation

def label_image(seed, shape=(24, 30)):
    """A small instance label image: a few rectangles with ids 1.., background 0."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 5):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        labels[y:y + 6, x:x + 6] = i * 100
    return labels


def test_dsb_preparation_writes_foreground_masks_and_links_images(bench, tmp_path):
    source = tmp_path / "dsb2018-nuclei-100"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    labels = {f"n{i}.tif": label_image(i, (20 + 4 * i, 32)) for i in range(3)}  # sizes vary
    for name, lab in labels.items():
        tifffile.imwrite(source / "images" / name, (lab % 251).astype(np.uint8))
        tifffile.imwrite(source / "masks" / name, lab)
    (source / "test_files.txt").write_text("n2.tif\n")
    data = bench.prepare("dsb", str(tmp_path), str(tmp_path / "out"))
    assert data.name == "dsb" and data.mask_map is None and data.test_list == str(source / "test_files.txt")
    for name, lab in labels.items():
        mask = tifffile.imread(os.path.join(data.mask_folder, name))
        assert mask.dtype == np.uint8 and np.array_equal(mask, (lab > 0).astype(np.uint8))
        assert os.path.islink(os.path.join(data.image_folder, name))
        assert os.path.realpath(os.path.join(data.image_folder, name)) == str((source / "images" / name).resolve())
    assert sorted(os.listdir(data.test_images)) == ["n2.tif"]
    assert data.mask_folder.startswith(str(tmp_path / "out")) and sorted(os.listdir(source / "masks")) == sorted(labels)
    assert tifffile.imread(source / "masks" / "n0.tif").dtype == np.uint16  # the source is untouched


def test_fib2d_preparation_writes_sections_membranes_and_test_list(bench, tmp_path):
    source = tmp_path / "neuroproof-fib-sample"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    volumes = {"train_z000-003.tif": 4, "test_z004-005.tif": 2}
    labels_of = {}
    for name, depth in volumes.items():
        labels = np.stack([label_image(10 * depth + z) + 1 for z in range(depth)])  # no 0: dense bodies
        image = (labels * 7 % 256).astype(np.uint8)
        tifffile.imwrite(source / "images" / name, image, photometric="minisblack")
        tifffile.imwrite(source / "masks" / name, labels, photometric="minisblack")
        labels_of[name] = labels
    (source / "test_files.txt").write_text("test_z004-005.tif\n")
    data = bench.prepare("fib2d", str(tmp_path), str(tmp_path / "out"))
    assert sorted(os.listdir(data.image_folder)) == sorted(os.listdir(data.mask_folder)) == [
        "test_z004.tif", "test_z005.tif", "train_z000.tif", "train_z001.tif", "train_z002.tif", "train_z003.tif"]
    with open(data.test_list) as fh:
        assert fh.read().split() == ["test_z004.tif", "test_z005.tif"]
    assert sorted(os.listdir(data.test_images)) == ["test_z004.tif", "test_z005.tif"]
    for volume, start in (("train_z000-003.tif", 0), ("test_z004-005.tif", 4)):
        image_zyx = tifffile.imread(source / "images" / volume)
        for z, labels_yx in enumerate(labels_of[volume]):
            name = f"{volume.split('_')[0]}_z{start + z:03d}.tif"
            mask = tifffile.imread(os.path.join(data.mask_folder, name))
            expected = find_boundaries(labels_yx, mode="inner")
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
            assert np.array_equal(mask, expected.astype(np.uint8)) and 0 < mask.mean() < 0.5
            assert np.array_equal(tifffile.imread(os.path.join(data.image_folder, name)), image_zyx[z])
    assert data.mask_map is None


@pytest.mark.parametrize("name, every", [("fib3d", 1), ("fib3d-aniso", 5), ("fib2d-aniso", 5)])
def test_fib_volume_preparations_keep_the_voxel_size_and_score_the_same_membrane(bench, tmp_path, name, every):
    """fib3d: the volumes as ImageJ stacks with their voxel size (z x every), and labels for the build and for
    scoring, whose boundary target equals fib2d's section masks; the -aniso variants keep every 5th section."""
    source = tmp_path / "neuroproof-fib-sample"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    labels = np.stack([label_image(z) + 1 for z in range(10)]).astype(np.uint32)
    for volume in ("train_z000-009.tif", "test_z010-019.tif"):
        tifffile.imwrite(source / "images" / volume, (labels * 7 % 256).astype(np.uint8), imagej=True,
                         resolution=(100, 100), metadata={"axes": "ZYX", "spacing": 0.01, "unit": "um"})
        tifffile.imwrite(source / "masks" / volume, labels)
    (source / "test_files.txt").write_text("test_z010-019.tif\n")
    data = bench.prepare(name, str(tmp_path), str(tmp_path / "out"))
    kept = labels[::every]
    if name.startswith("fib2d"):
        assert sorted(os.listdir(data.test_images)) == [f"test_z{10 + z:03d}.tif" for z in range(len(kept))]
        return
    assert data.label_masks and not data.instances and sorted(os.listdir(data.test_images)) == ["test_z010-019.tif"]
    with tifffile.TiffFile(os.path.join(data.image_folder, "test_z010-019.tif")) as tif:
        assert tif.series[0].shape == kept.shape and tif.imagej_metadata["spacing"] == pytest.approx(0.01 * every)
    # inference is given the mask folder: the labels, whose own target is fib2d's membrane (no label 0 here)
    np.testing.assert_array_equal(tifffile.imread(os.path.join(data.mask_folder, "test_z010-019.tif")), kept)
    from segkit import instance_targets
    np.testing.assert_array_equal(instance_targets.make_target(kept, "boundary"),
                                  np.stack([find_boundaries(s, mode="inner") for s in kept]).astype(np.uint8))


def test_section_names_without_a_z_range_count_from_zero(bench):
    assert bench.section_names("vol.tif", 2) == ["vol_z000.tif", "vol_z001.tif"]
    assert bench.section_names("train_z010-011.tiff", 2) == ["train_z010.tif", "train_z011.tif"]


@pytest.mark.parametrize("values, expected", [((0, 1), None), ((0, 255), "255:1"), ((0,), None), ((0, 1, 2), "error")])
def test_mask_map_only_where_the_masks_need_it(bench, tmp_path, values, expected):
    for i, v in enumerate(values):
        tifffile.imwrite(tmp_path / f"m{i}.tif", np.full((4, 4), v, np.uint8) if i else np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "all.tif", np.array(values, np.uint8).reshape(1, -1))
    if expected == "error":
        with pytest.raises(cliutil.InputError, match="not a binary mask"):
            bench.binary_mask_map(str(tmp_path))
    else:
        assert bench.binary_mask_map(str(tmp_path)) == expected


def test_a_missing_dataset_is_one_line_naming_the_flag(bench, tmp_path):
    with pytest.raises(cliutil.InputError, match="--data_root"):
        bench.prepare("nist", str(tmp_path), str(tmp_path / "out"))


def load_stardist_reference():
    path = os.path.join(ROOT, "benchmarks", "bench_stardist_reference.py")
    spec = importlib.util.spec_from_file_location("bench_stardist_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stardist_reference_splits_by_the_test_list_and_writes_a_row_per_seed(tmp_path, monkeypatch, capsys):
    """The StarDist measuring stick (run in its own environment) without StarDist: its split of the data set
    (every image not in test_files.txt trains) and its bookkeeping, with the training replaced."""
    ref = load_stardist_reference()
    data = tmp_path / "dsb"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for i in range(5):
        tifffile.imwrite(data / "images" / f"im{i}.tif", np.full((8, 8), i, np.uint8))
        tifffile.imwrite(data / "masks" / f"im{i}.tif", np.eye(8, dtype=np.uint16) * i)
    (data / "test_files.txt").write_text("im1.tif\nim3.tif\n")
    train, test, images, masks = ref.load(str(data))
    assert train == ["im0.tif", "im2.tif", "im4.tif"] and test == ["im1.tif", "im3.tif"]
    assert images["im2.tif"][0, 0] == 2 and masks["im3.tif"][1, 1] == 3

    seen = []

    def fake_run_seed(seed, args, train, test, images, masks):
        seen.append((seed, tuple(train), tuple(test)))
        return {"seed": seed, "steps": 10, "train_s": 60, "prob": 0.5, "nms": 0.4, "ap50": 0.7 + seed / 100,
                "ap75": 0.5, "pq50": 0.6, "stardist_accuracy50": 0.7 + seed / 100}

    monkeypatch.setattr(ref, "run_seed", fake_run_seed)
    out = tmp_path / "out"
    assert ref.main(["--data", str(data), "--seeds", "0", "2", "--output_dir", str(out)]) == 0
    assert seen == [(0, tuple(train), tuple(test)), (2, tuple(train), tuple(test))]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["seed"] for r in rows] == ["0", "2"] and float(rows[1]["ap50"]) == pytest.approx(0.72)
    assert "ap50: 0.7100 +- 0.0141" in capsys.readouterr().out
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_stardist_reference_refuses_a_budget_of_zero(capsys):
    ref = load_stardist_reference()
    with pytest.raises(SystemExit) as exit_info:
        ref.parse_args(["--max_minutes", "0", "--data", "."])
    assert exit_info.value.code == 2 and "--max_minutes must be > 0" in capsys.readouterr().err


def test_stardist_reference_names_a_missing_mask_in_one_line(tmp_path, capsys):
    ref = load_stardist_reference()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "test_files.txt").write_text("a.tif\n")
    assert cliutil.run_cli(ref.main, ["--data", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first: a.tif" in err[0] and "masks/NAME" in err[0]
