"""build_lmdb.py: bad input, crash safety, record round trip, tiling coverage, splits."""
import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import ROOT, SHARED_DATA, signal_group_when_ready
from lmdb_helpers import read_db

import build_lmdb
from segkit import cliutil, image_io, lmdb_format, lmdb_store

EXAMPLE = os.path.join(ROOT, "data")
PY = sys.executable


# ----------------------------------------------------------------------------- helpers


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith((".tif", ".tiff")):
        tifffile.imwrite(path, array)
    else:
        import imageio.v3 as iio

        iio.imwrite(path, array)


def make_pairs(root, n=4, shape=(48, 64), mask_ext=".tif", classes=3, seed=0):
    """n random uint16 image / uint8 mask pairs under root/images, root/masks."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        write(os.path.join(root, "images", f"img_{i}.tif"), rng.integers(0, 4000, shape, dtype=np.uint16))
        write(os.path.join(root, "masks", f"img_{i}{mask_ext}"), rng.integers(0, classes, shape[:2], dtype=np.uint8))
    return os.path.join(root, "images"), os.path.join(root, "masks")


def cli(images, masks, out, *extra, name="ds"):
    argv = ["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder", str(out),
            "--dataset_name", name, "--workers", "1", *map(str, extra)]
    return cliutil.run_cli(build_lmdb.main, argv)


def source_arrays(folder_images, folder_masks, meta, index):
    src = meta["sources"][index]
    image = image_io.to_hwc(image_io.read_image(os.path.join(folder_images, src["file"])))
    mask = image_io.read_image(os.path.join(folder_masks, src["mask"]))
    return image, mask


def assert_no_database(out):
    leftovers = [n for n in os.listdir(out) if ".lmdb" in n] if os.path.isdir(out) else []
    assert leftovers == []


def build(tmp_path, images, masks, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return build_lmdb.build_databases(image_folder=str(images), mask_folder=str(masks),
                                      output_folder=str(tmp_path / "out"), dataset_name="ds", **kw)


def coverage_check(images_dir, masks_dir, db_path, tile):
    """Every pixel of every source lies in a tile; tile content equals the source where in bounds."""
    meta, records = read_db(db_path)
    covered = {i: np.zeros((s["height"], s["width"]), bool) for i, s in enumerate(meta["sources"])}
    cache = {}
    for rec in records:
        if rec.source_index not in cache:
            cache[rec.source_index] = source_arrays(images_dir, masks_dir, meta, rec.source_index)
        image, mask = cache[rec.source_index]
        assert rec.image_hwc.shape[:2] == (tile, tile)
        oy, ox = rec.origin
        y0, x0 = max(oy, 0), max(ox, 0)
        y1, x1 = min(oy + tile, image.shape[0]), min(ox + tile, image.shape[1])
        covered[rec.source_index][y0:y1, x0:x1] = True
        np.testing.assert_array_equal(rec.image_hwc[y0 - oy : y1 - oy, x0 - ox : x1 - ox], image[y0:y1, x0:x1])
        np.testing.assert_array_equal(rec.mask_hw[y0 - oy : y1 - oy, x0 - ox : x1 - ox], mask[y0:y1, x0:x1])
    assert all(c.all() for c in covered.values())
    return meta, records


# ----------------------------------------------------------------------------- bad input


def _unpaired_image(root):
    os.remove(os.path.join(root, "masks", "img_2.tif"))


def _unpaired_mask(root):
    write(os.path.join(root, "masks", "extra.png"), np.zeros((48, 64), np.uint8))


def _size_mismatch(root):
    write(os.path.join(root, "masks", "img_1.tif"), np.zeros((48, 60), np.uint8))


def _corrupt_image(root):
    with open(os.path.join(root, "images", "img_3.tif"), "wb") as fh:
        fh.write(b"II*\x00 this is not a tiff")


def _corrupt_mask(root):
    with open(os.path.join(root, "masks", "img_0.tif"), "wb") as fh:
        fh.write(b"\x00" * 100)


def _float_mask(root):
    write(os.path.join(root, "masks", "img_1.tif"), np.full((48, 64), 0.5, np.float32))


def _negative_mask(root):
    write(os.path.join(root, "masks", "img_1.tif"), np.full((48, 64), -1, np.int32))


def _too_many_classes(root):
    write(os.path.join(root, "masks", "img_2.tif"), np.full((48, 64), 7, np.uint8))


def _mask_0_255(root):
    m = np.zeros((48, 64), np.uint8)
    m[10:20] = 255
    write(os.path.join(root, "masks", "img_2.tif"), m)


def _float64_image(root):
    write(os.path.join(root, "images", "img_0.tif"), np.zeros((48, 64), np.float64))


def _nan_image(root):
    write(os.path.join(root, "images", "img_0.tif"), np.full((48, 64), np.nan, np.float32))


def _mixed_channels(root):
    write(os.path.join(root, "images", "img_3.tif"), np.zeros((48, 64, 3), np.uint16))


def _mixed_dtypes(root):
    write(os.path.join(root, "images", "img_3.tif"), np.zeros((48, 64), np.uint8))


def _empty_image_folder(root):
    for n in os.listdir(os.path.join(root, "images")):
        os.remove(os.path.join(root, "images", n))


def _ambiguous_mask(root):
    write(os.path.join(root, "masks", "img_0.png"), np.zeros((48, 64), np.uint8))


def _rgb_mask(root):
    write(os.path.join(root, "masks", "img_0.png"), np.zeros((48, 64, 3), np.uint8))
    os.remove(os.path.join(root, "masks", "img_0.tif"))


def _nothing(root):
    pass


BAD_INPUTS = [
    # (id, change to a valid data set, extra flags, expected message fragment)
    ("unpaired image", _unpaired_image, [], "have no mask: img_2.tif"),
    ("unpaired mask", _unpaired_mask, [], "have no image: extra.png"),
    ("size mismatch", _size_mismatch, [], "mask is 48x60 but its image is 48x64"),
    ("corrupt image", _corrupt_image, [], "img_3.tif: cannot read image"),
    ("corrupt mask", _corrupt_mask, [], "img_0.tif: cannot read image"),
    ("non-integer mask", _float_mask, [], "not an integer type"),
    ("negative mask", _negative_mask, [], "negative values"),
    ("mask >= number_classes", _too_many_classes, ["--number_classes", "3"], "mask value 7 is >= --number_classes 3"),
    ("mask 0/255", _mask_0_255, ["--number_classes", "3"],
     "exactly {0, 255}: a binary mask saved as 0/255, use --mask_map 255:1"),
    ("unsupported dtype", _float64_image, [], "pixel type float64 is not supported"),
    ("non-finite image", _nan_image, [], "NaN or infinite"),
    ("mixed channels", _mixed_channels, [], "channels 3 differs"),
    ("mixed pixel types", _mixed_dtypes, [], "all images of a data set need the same pixel type"),
    ("rgb mask", _rgb_mask, [], "masks must be single-channel"),
    ("ambiguous stems", _ambiguous_mask, [], "several files share a stem"),
    ("empty folder", _empty_image_folder, [], "no *.tif images"),
    ("wrong image format", _nothing, ["--image_format", "png"], "no *.png images (found .tif files: set --image_format)"),
    ("tile not multiple of 32", _nothing, ["--use_tiling", "1", "--tile_size", "100"], "multiple of 32"),
    ("tile larger than every image", _nothing, ["--use_tiling", "1", "--tile_size", "128"],
     "larger than every image (largest is 48x64); use --tile_size 64 or smaller"),
    ("train fraction 0", _nothing, ["--train_fraction", "0"], "--train_fraction must be > 0 and < 1"),
    ("train fraction 1", _nothing, ["--train_fraction", "1"], "--train_fraction must be > 0 and < 1"),
    ("train fraction 1.5", _nothing, ["--train_fraction", "1.5"], "--train_fraction must be > 0 and < 1"),
    ("bad mask map", _nothing, ["--mask_map", "255=1"], "VALUE:CLASS pairs"),
    ("stride without tiling", _nothing, ["--tile_stride", "16"], "--tile_stride only applies with --use_tiling 1"),
    ("stride above tile", _nothing, ["--use_tiling", "1", "--tile_size", "32", "--tile_stride", "33"],
     "--tile_stride must be between 1"),
    ("mask format excludes masks", _nothing, ["--mask_format", "png"], "no mask files found"),
]


@pytest.mark.parametrize("change,flags,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, change, flags, message):
    images, masks = make_pairs(str(tmp_path))
    change(str(tmp_path))
    out = tmp_path / "out"
    assert cli(images, masks, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()  # the folder it created is removed again, with everything in it


def test_bad_file_found_late_in_parallel_pass_leaves_no_temporaries(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path), n=12)
    write(os.path.join(masks, "img_9.tif"), np.full((48, 64), 9, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    code = cliutil.run_cli(build_lmdb.main, ["--image_folder", images, "--mask_folder", masks, "--output_folder",
                                             str(out), "--dataset_name", "ds", "--workers", "2", "--number_classes", "3"])
    assert code == 2 and "img_9.tif: mask value 9" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_single_image_split_is_refused(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path), n=1)
    assert cli(images, masks, tmp_path / "out") == 2
    assert "only 1 image pair found: a train/test split needs at least 2 images" in capsys.readouterr().err
    assert_no_database(tmp_path / "out")


def test_tiny_split_is_clamped_with_a_warning(tmp_path, caplog):
    images, masks = make_pairs(str(tmp_path), n=3)
    summary = build(tmp_path, images, masks, train_fraction=0.9)
    assert (summary.splits["train"].images, summary.splits["test"].images) == (2, 1)
    assert "would leave the test split empty" in caplog.text


def test_existing_database_is_refused_without_overwrite(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path))
    build(tmp_path, images, masks)
    before = hashlib.sha256(open(tmp_path / "out" / "train-ds.lmdb" / "data.mdb", "rb").read()).hexdigest()
    assert cli(images, masks, tmp_path / "out") == 2
    assert "already exist(s); use --overwrite" in capsys.readouterr().err
    after = hashlib.sha256(open(tmp_path / "out" / "train-ds.lmdb" / "data.mdb", "rb").read()).hexdigest()
    assert before == after
    assert cli(images, masks, tmp_path / "out", "--overwrite", "1") == 0


@pytest.mark.parametrize("test_names,message", [(["nope.tif"], "match no image"), ([], "leaves the test split empty"),
                                                (["img_0", "img_1", "img_2", "img_3"], "leaves the train split empty")])
def test_bad_test_list(tmp_path, capsys, test_names, message):
    images, masks = make_pairs(str(tmp_path))
    listing = tmp_path / "test.txt"
    listing.write_text("\n".join(test_names) + "\n")
    assert cli(images, masks, tmp_path / "out", "--test_list", listing) == 2
    assert message in capsys.readouterr().err
    assert_no_database(tmp_path / "out")


# ----------------------------------------------------------------------------- content


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_whole_images(tmp_path, workers):
    """Example data (png and tif masks paired by stem): every record is its source, byte for byte."""
    images, masks = os.path.join(EXAMPLE, "images"), os.path.join(EXAMPLE, "masks")
    summary = build(tmp_path, images, masks, workers=workers, number_classes=3)
    seen = []
    for split in ("train", "test"):
        meta, records = read_db(summary.splits[split].path)
        assert meta["channels"] == 1 and meta["image_dtype"] == "uint16" and meta["number_classes"] == 3
        assert meta["tile_size"] is None and len(records) == len(meta["sources"])
        for index, rec in enumerate(records):
            assert rec.source_index == index and tuple(rec.origin) == (0, 0)
            image, mask = source_arrays(images, masks, meta, index)
            assert rec.image_hwc.dtype == image.dtype and rec.image_hwc.shape == image.shape
            assert rec.image_hwc.tobytes() == image.tobytes()
            assert rec.mask_hw.dtype == mask.dtype == np.uint8 and rec.mask_hw.tobytes() == mask.tobytes()
            assert rec.classes == sorted(np.unique(mask).tolist())
            mean, std = image_io.image_stats(image)
            assert meta["sources"][index]["mean"] == mean and meta["sources"][index]["std"] == std
            for c in rec.classes:
                assert index in meta["class_records"][c]
            seen.append(meta["sources"][index]["file"])
        counts = np.bincount(np.concatenate([r.mask_hw.ravel() for r in records]), minlength=3)
        assert meta["class_pixel_counts"] == {c: int(n) for c, n in enumerate(counts) if n}
    assert sorted(seen) == image_io.list_images(images, "tif")


@pytest.mark.parametrize("tile,stride", [(128, None), (128, 96), (96, 40)])
def test_tiling_covers_every_pixel(tmp_path, tile, stride):
    images, masks = os.path.join(EXAMPLE, "images"), os.path.join(EXAMPLE, "masks")
    summary = build(tmp_path, images, masks, use_tiling=True, tile_size=tile, tile_stride=stride)
    for split in ("train", "test"):
        meta, _ = coverage_check(images, masks, summary.splits[split].path, tile)
        assert meta["tile_size"] == tile and meta["tile_stride"] == (stride or tile)


def test_small_images_are_mirror_padded_image_and_mask_alike(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=2, shape=(40, 100))
    summary = build(tmp_path, images, masks, use_tiling=True, tile_size=64, train_fraction=0.5)
    for split in ("train", "test"):
        meta, records = coverage_check(images, masks, summary.splits[split].path, 64)
        image, mask = source_arrays(images, masks, meta, 0)
        padded_image = image_io.mirror_pad(image, (12, 12), (0, 0))
        padded_mask = image_io.mirror_pad(mask, (12, 12), (0, 0))
        assert [tuple(r.origin) for r in records] == [(-12, 0), (-12, 36)]
        for rec in records:
            x = rec.origin[1]
            np.testing.assert_array_equal(rec.image_hwc, padded_image[:, x : x + 64])
            np.testing.assert_array_equal(rec.mask_hw, padded_mask[:, x : x + 64])


def test_three_channel_images(tmp_path):
    images, masks = os.path.join(EXAMPLE, "rgb", "images"), os.path.join(EXAMPLE, "rgb", "masks")
    summary = build(tmp_path, images, masks, train_fraction=0.5, number_classes=3)
    assert summary.channels == 3 and summary.image_dtype == "uint8"
    for split in ("train", "test"):
        meta, records = read_db(summary.splits[split].path)
        assert meta["channels"] == 3 and len(meta["sources"][0]["mean"]) == 3
        image, mask = source_arrays(images, masks, meta, 0)
        assert records[0].image_hwc.shape == image.shape and image.shape[2] == 3
        assert records[0].image_hwc.tobytes() == image.tobytes()
        assert np.array_equal(records[0].mask_hw, mask)


def test_mask_map_turns_0_255_into_classes(tmp_path):
    images, masks = make_pairs(str(tmp_path), classes=2)
    for name in os.listdir(masks):
        m = image_io.read_image(os.path.join(masks, name))
        write(os.path.join(masks, name), (m * 255).astype(np.uint8))
    summary = build(tmp_path, images, masks, mask_map="255:1", number_classes=2)
    meta, records = read_db(summary.splits["train"].path)
    assert set(np.unique(np.concatenate([r.mask_hw.ravel() for r in records]))) == {0, 1}
    assert meta["build"]["mask_map"] == {"255": 1}


def test_wide_int32_masks_are_stored_small(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=2)
    for name in os.listdir(masks):
        m = image_io.read_image(os.path.join(masks, name)).astype(np.int32)
        write(os.path.join(masks, name), m)
    summary = build(tmp_path, images, masks, train_fraction=0.5)
    _, records = read_db(summary.splits["train"].path)
    assert records[0].mask_hw.dtype == np.uint8


def test_test_list_and_seeded_split(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=10)
    listing = tmp_path / "test.txt"
    listing.write_text("# held out\nimg_3.tif\nimg_7\n\n")
    summary = build(tmp_path, images, masks, test_list=str(listing))
    meta, _ = read_db(summary.splits["test"].path)
    assert [s["file"] for s in meta["sources"]] == ["img_3.tif", "img_7.tif"] and meta["seed"] is None

    def train_files(seed, out):
        s = build_lmdb.build_databases(image_folder=images, mask_folder=masks, output_folder=str(tmp_path / out),
                                       dataset_name="ds", seed=seed, workers=1, progress=False)
        return [src["file"] for src in read_db(s.splits["train"].path)[0]["sources"]]

    first, again = train_files(5, "a"), train_files(5, "b")
    assert first == again and len(first) == 8
    assert any(train_files(seed, f"c{seed}") != first for seed in (6, 7))


# ----------------------------------------------------------------------------- crash safety


def _sha(path):
    return hashlib.sha256(open(os.path.join(path, "data.mdb"), "rb").read()).hexdigest()


def _dead_pid():
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def _signal_slow_overwrite(images, masks, out, sig):
    """An --overwrite build slowed down (BUILD_LMDB_TEST_DELAY), signalled as a group once records are being
    written to its temporary database; returns (proc, stderr)."""
    cmd = [PY, os.path.join(ROOT, "build_lmdb.py"), "--image_folder", images, "--mask_folder", masks,
           "--output_folder", str(out), "--dataset_name", "ds", "--overwrite", "1", "--workers", "2"]
    return signal_group_when_ready(
        cmd, lambda proc: any(n.startswith(".train-ds.lmdb.tmp-") for n in os.listdir(out)), sig=sig, timeout=20,
        settle=0.7, stop_timeout=30, env=dict(os.environ, **{build_lmdb.TEST_DELAY_ENV: "0.5"}))  # settle: some records


def test_kill_9_mid_build_leaves_old_database_intact(tmp_path):
    images, masks = os.path.join(EXAMPLE, "images"), os.path.join(EXAMPLE, "masks")
    out = tmp_path / "out"
    build(tmp_path, images, masks)
    old = {s: str(out / f"{s}-ds.lmdb") for s in ("train", "test")}
    old_sha = {s: _sha(p) for s, p in old.items()}
    old_id = lmdb_format.read_metadata(old["train"])["build"]["id"]
    proc, _ = _signal_slow_overwrite(images, masks, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    for split, path in old.items():
        assert _sha(path) == old_sha[split]
        meta, records = read_db(path)
        assert len(records) == meta["num_records"] and meta["build"]["id"] == old_id
    stale = [n for n in os.listdir(out) if ".tmp-" in n]
    assert stale  # the killed build's temporary is still there ...
    build(tmp_path, images, masks, overwrite=True)
    assert sorted(os.listdir(out)) == ["split-ds.csv", "test-ds.lmdb", "train-ds.lmdb"]  # ... until the next run removes it
    assert lmdb_format.read_metadata(old["train"])["build"]["id"] != old_id


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwrite_replaces_only_complete_database(tmp_path, monkeypatch, exchange):
    images, masks = make_pairs(str(tmp_path), n=4)
    build(tmp_path, images, masks)
    first = lmdb_format.read_metadata(str(tmp_path / "out" / "train-ds.lmdb"))["build"]["id"]
    if not exchange:
        monkeypatch.setattr(lmdb_store, "_exchange", lambda a, b: False)
    build(tmp_path, images, masks, overwrite=True, use_tiling=True, tile_size=32)
    meta = lmdb_format.read_metadata(str(tmp_path / "out" / "train-ds.lmdb"))
    assert meta["build"]["id"] != first and meta["tile_size"] == 32
    assert sorted(os.listdir(tmp_path / "out")) == ["split-ds.csv", "test-ds.lmdb", "train-ds.lmdb"]


def test_sigterm_mid_build_exits_130_and_leaves_no_temporaries(tmp_path):
    """Slurm's SIGTERM to every process of the job (main and encoder workers): a clean stop."""
    images, masks = os.path.join(EXAMPLE, "images"), os.path.join(EXAMPLE, "masks")
    out = tmp_path / "out"
    build(tmp_path, images, masks)
    old_sha = {s: _sha(str(out / f"{s}-ds.lmdb")) for s in ("train", "test")}
    proc, err = _signal_slow_overwrite(images, masks, out, signal.SIGTERM)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err, err
    assert sorted(os.listdir(out)) == ["split-ds.csv", "test-ds.lmdb", "train-ds.lmdb"]  # removed on the spot, not by a next run
    assert {s: _sha(str(out / f"{s}-ds.lmdb")) for s in ("train", "test")} == old_sha


def test_stale_temporaries_are_cleaned_and_interrupted_swap_restored(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=4)
    build(tmp_path, images, masks)
    out = tmp_path / "out"
    host, pid = lmdb_store.socket.gethostname(), _dead_pid()
    # A swap killed between its two renames: the old test database sits aside, no final name.
    os.rename(out / "test-ds.lmdb", out / f".test-ds.lmdb.old-{host}-{pid}")
    (out / f".train-ds.lmdb.tmp-{host}-{pid}").mkdir()
    (out / f".other.lmdb.tmp-{host}-{pid}").mkdir()  # not ours: left alone
    lmdb_store.clean_stale_temporaries(str(out), list(lmdb_store.database_paths(str(out), "ds").values()))
    assert sorted(os.listdir(out)) == [f".other.lmdb.tmp-{host}-{pid}", "split-ds.csv", "test-ds.lmdb", "train-ds.lmdb"]
    assert read_db(str(out / "test-ds.lmdb"))[0]["split"] == "test"


# ----------------------------------------------------------------------------- command line


def test_cli_does_not_import_tensorflow_and_prints_summary(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=4)
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['build_lmdb.py', '--image_folder', {images!r}, '--mask_folder', {masks!r},"
        f" '--output_folder', {str(tmp_path / 'out')!r}, '--dataset_name', 'ds', '--use_tiling', '1', '--tile_size', '32']\n"
        "try:\n    runpy.run_path('build_lmdb.py', run_name='__main__')\n"
        "except SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "exit 0" in result.stdout and "tensorflow imported: False" in result.stdout, result.stderr
    assert "train     3 images ->     12 records" in result.stdout
    assert "class pixel fractions" in result.stdout


def test_cli_bad_input_is_one_stderr_line(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=2)
    result = subprocess.run([PY, os.path.join(ROOT, "build_lmdb.py"), "--image_folder", images, "--mask_folder", masks,
                             "--output_folder", str(tmp_path / "out"), "--dataset_name", "ds", "--train_fraction", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --train_fraction must be > 0 and < 1, got 2.0; e.g. 0.8 keeps 20% for test"]


# ----------------------------------------------------------------------------- the real data (Done when)

needs_shared = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "images")), reason="shared data absent")


@needs_shared
def test_done_when_nist_80_20(tmp_path):
    images, masks = os.path.join(SHARED_DATA, "images"), os.path.join(SHARED_DATA, "masks")
    assert cli(images, masks, tmp_path / "out", "--train_fraction", "0.8", "--image_format", "tif", name="nist") == 0
    assert lmdb_format.read_metadata(str(tmp_path / "out" / "train-nist.lmdb"))["num_records"] == 80
    assert lmdb_format.read_metadata(str(tmp_path / "out" / "test-nist.lmdb"))["num_records"] == 20


@needs_shared
def test_done_when_nist_tiled_128_covers_every_pixel_and_test_list(tmp_path):
    images, masks = os.path.join(SHARED_DATA, "images"), os.path.join(SHARED_DATA, "masks")
    listing = os.path.join(SHARED_DATA, "test_files.txt")
    summary = build(tmp_path, images, masks, use_tiling=True, tile_size=128, test_list=listing, workers=2)
    for split in ("train", "test"):
        coverage_check(images, masks, summary.splits[split].path, 128)
    meta, _ = read_db(summary.splits["test"].path)
    listed = sorted(line.strip() for line in open(listing) if line.strip())
    assert [s["file"] for s in meta["sources"]] == listed
    assert summary.splits["train"].records == 80 * 4
