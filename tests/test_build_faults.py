"""build_lmdb.py under faults (issue #17) and its split file (#18): database paths that are files or
symlinks, unwritable outputs, a full disk, killed workers and a killed main process, odd inputs."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile
from conftest import ROOT, one_error_line, signal_group_when_ready
from lmdb_helpers import read_db
from test_build_lmdb import PY, cli, make_pairs, write

import build_lmdb
from segkit import cliutil, lmdb_store


def leftovers(out):
    return sorted(n for n in os.listdir(out) if n.startswith(".")) if os.path.isdir(out) else []


# ----------------------------------------------------------------------------- 1. database path is a file / link


@pytest.mark.parametrize("kind", ["file", "symlink to a folder", "dangling symlink"])
def test_overwrite_refuses_a_database_path_that_is_a_file_or_link(tmp_path, capsys, kind):
    images, masks = make_pairs(str(tmp_path))
    out = tmp_path / "out"
    assert cli(images, masks, out) == 0
    test_before = read_db(str(out / "test-ds.lmdb"))[0]["build"]["id"]
    train = out / "train-ds.lmdb"
    os.rename(train, tmp_path / "moved.lmdb")
    if kind == "file":
        train.write_text("not a database")
    else:
        os.symlink(tmp_path / ("moved.lmdb" if kind == "symlink to a folder" else "nowhere"), train)
    assert cli(images, masks, out, "--overwrite", "1") == 2
    line = one_error_line(capsys)
    assert f"{train} is a {'file' if kind == 'file' else 'symbolic link'}, not a database folder" in line
    assert read_db(str(out / "test-ds.lmdb"))[0]["build"]["id"] == test_before  # neither database replaced
    assert (train.read_text() == "not a database") if kind == "file" else os.path.islink(train)
    assert leftovers(out) == []


def test_stale_temporary_that_is_a_file_is_removed(tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    stale = out / f".train-ds.lmdb.tmp-{lmdb_store.socket.gethostname()}-{proc.pid}"
    stale.write_text("the user's file, exchanged in by an old build")
    lmdb_store.clean_stale_temporaries(str(out), list(lmdb_store.database_paths(str(out), "ds").values()))
    assert not stale.exists() and "removed" in caplog.text


# ----------------------------------------------------------------------------- 2. kill -9 of the main process

LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    def children(pid):
        found = []
        for entry in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except (OSError, ValueError):
                continue
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        return found
    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    build = subprocess.Popen(sys.argv[1:], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def kill_build(signum, frame):
        workers = children(build.pid)
        os.kill(build.pid, signal.SIGKILL)  # no build.wait() here: the main loop may hold Popen's wait lock
        deadline = time.time() + 10
        while time.time() < deadline and alive(build.pid):
            time.sleep(0.05)
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.05)
        left = [w for w in workers if alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
        print(f"workers {len(workers)} left {len(left)}", file=sys.stderr)
        sys.exit(0)
    signal.signal(signal.SIGTERM, kill_build)
    while build.poll() is None:
        time.sleep(0.05)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_main_process(tmp_path):
    """kill -9 of build_lmdb.py (only the main process, as the OOM killer does): its pool workers used to be
    re-parented and block forever on the task queue. A launcher in the signalled group kills the build,
    which runs in a session of its own, and counts the workers still alive 10 s later."""
    images, masks = make_pairs(str(tmp_path), n=8)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [PY, "-c", LAUNCHER, PY, os.path.join(ROOT, "build_lmdb.py"), "--image_folder", images, "--mask_folder",
           masks, "--output_folder", str(out), "--dataset_name", "ds", "--workers", "2"]
    proc, err = signal_group_when_ready(
        cmd, lambda p: any(n.startswith(".train-ds.lmdb.tmp-") for n in os.listdir(out)), timeout=30, settle=0.5,
        stop_timeout=30, env=dict(os.environ, **{build_lmdb.TEST_DELAY_ENV: "1"}))
    assert proc.returncode == 0, err
    assert "workers 2 left 0" in err, err


WATCHED_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from segkit import cliutil
    sys.platform = "darwin"  # no prctl: the portable watchdog thread
    cliutil.die_with_parent(os.getppid())
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_die_with_parent_watchdog_fallback(tmp_path):
    """Where prctl is missing, a watchdog thread ends the worker once its parent is gone: the parent (the
    signalled group) starts a child in a session of its own and is killed; the child must follow."""
    marker = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {WATCHED_CHILD!r}, {ROOT!r}, {str(marker)!r}], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(120)
    """)
    signal_group_when_ready([PY, "-c", parent], lambda p: marker.exists() and marker.read_text(), sig=signal.SIGKILL)
    child = int(marker.read_text())
    try:
        deadline = time.time() + 10
        while time.time() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- 3. unwritable output


def _a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile"), "is a file, not a folder"


def _under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile" / "out"), "is a file, so no folder can be created under it"


def _dangling_link(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    return str(tmp_path / "link"), "which does not exist"


def _sysfs(tmp_path):
    folder = "/sys/segkit-build-faults-test"
    if not os.path.isdir("/sys") or os.path.exists(folder):
        pytest.skip("no sysfs here")
    return folder, "cannot write in /sys"


@pytest.mark.parametrize("where", [_a_file, _under_a_file, _dangling_link, _sysfs])
def test_unwritable_output_is_one_line_exit_2(tmp_path, capsys, where):
    images, masks = make_pairs(str(tmp_path))
    output, message = where(tmp_path)
    assert cli(images, masks, output) == 2
    assert message in one_error_line(capsys)


def test_output_folder_without_write_permission(tmp_path, capsys, monkeypatch):
    """A folder the probe file cannot be written in (tests run as root, so the refusal is emulated)."""
    images, masks = make_pairs(str(tmp_path))
    (tmp_path / "ro").mkdir()

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(cliutil, "make_temp", refuse)
    assert cli(images, masks, tmp_path / "ro" / "out") == 2
    line = one_error_line(capsys)
    assert "cannot write in" in line and "Permission denied" in line


# ----------------------------------------------------------------------------- 4. full disk


def _enospc(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


def _lmdb_eio(*_):
    import lmdb

    raise lmdb.Error("mdb_txn_commit: Input/output error")


@pytest.mark.parametrize("fault", [_enospc, _lmdb_eio], ids=["ENOSPC", "lmdb EIO"])
def test_full_disk_is_one_line_and_installs_nothing(tmp_path, capsys, monkeypatch, fault):
    images, masks = make_pairs(str(tmp_path), n=6)
    out = tmp_path / "out"
    assert cli(images, masks, out) == 0
    old = {s: read_db(str(out / f"{s}-ds.lmdb"))[0]["build"]["id"] for s in ("train", "test")}
    calls = []
    real_append = lmdb_store.TempDatabase.append

    def append(self, values):
        calls.append(1)
        return fault() if len(calls) == 3 else real_append(self, values)

    monkeypatch.setattr(lmdb_store.TempDatabase, "append", append)
    monkeypatch.setattr(lmdb_store.shutil, "disk_usage", lambda path: type("U", (), {"free": 10_000})())
    assert cli(images, masks, out, "--overwrite", "1") == cliutil.EXIT_FAULT
    line = one_error_line(capsys)
    assert "no space left on " in line and "needed about" in line and "MB" in line, line
    assert {s: read_db(str(out / f"{s}-ds.lmdb"))[0]["build"]["id"] for s in ("train", "test")} == old
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- 5. a worker killed


def test_killed_worker_names_the_file_and_workers_1(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=8)
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import build_lmdb
        real = build_lmdb.encode_pair
        def encode_pair(task):  # as the out-of-memory killer would
            if task.image_path.endswith("img_5.tif"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(task)
        build_lmdb.encode_pair = encode_pair
        sys.exit(build_lmdb.main(["--image_folder", {images!r}, "--mask_folder", {masks!r}, "--output_folder",
                                  {str(tmp_path / "out")!r}, "--dataset_name", "ds", "--workers", "2"]))
    """)
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == cliutil.EXIT_FAULT, result.stderr
    assert "Traceback" not in result.stderr and "BrokenProcessPool" not in result.stderr, result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "img_5.tif" in line[0] and "--workers 1" in line[0] and "memory" in line[0], result.stderr
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / "train-ds.lmdb").exists()


# ----------------------------------------------------------------------------- 6. main is wrapped


def test_main_returns_2_instead_of_raising(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path), n=2)
    assert build_lmdb.main(["--image_folder", images, "--mask_folder", masks, "--output_folder",
                            str(tmp_path / "out"), "--dataset_name", "ds", "--train_fraction", "7"]) == 2
    assert "--train_fraction must be > 0 and < 1" in one_error_line(capsys)


# ----------------------------------------------------------------------------- 7. odd inputs


@pytest.mark.parametrize("metadata", [None, {"axes": "ZYX"}], ids=["pages", "ZYX"])
def test_z_stack_is_named_as_such(tmp_path, capsys, metadata):
    images, masks = make_pairs(str(tmp_path), shape=(40, 50))
    tifffile.imwrite(os.path.join(images, "img_1.tif"), np.zeros((20, 40, 50), np.uint16), metadata=metadata)
    assert cli(images, masks, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "img_1.tif: this looks like a z-stack" in line and "20 slices of 40x50" in line, line


def test_multichannel_tiff_is_not_called_a_z_stack(tmp_path):
    images, masks = make_pairs(str(tmp_path), shape=(40, 50))
    for i in range(4):
        tifffile.imwrite(os.path.join(images, f"img_{i}.tif"), np.zeros((40, 50, 6), np.uint16))
    assert cli(images, masks, tmp_path / "out") == 0


def test_dangling_symlinks_are_warned_about(tmp_path, caplog):
    images, masks = make_pairs(str(tmp_path))
    os.symlink(tmp_path / "gone.tif", os.path.join(images, "img_9.tif"))
    assert cli(images, masks, tmp_path / "out") == 0
    assert "1 symbolic link(s) point to missing files and are skipped: img_9.tif" in caplog.text


def test_mask_folder_equal_to_image_folder_through_a_symlink(tmp_path, capsys):
    images, _ = make_pairs(str(tmp_path))
    os.symlink(images, tmp_path / "alias")
    assert cli(images, tmp_path / "alias", tmp_path / "out") == 2
    assert "--image_folder and --mask_folder are the same folder" in one_error_line(capsys)


@pytest.mark.parametrize("keep", [8, 0.5, -10])
def test_truncated_tiff_is_one_line(tmp_path, capsys, keep):
    images, masks = make_pairs(str(tmp_path))
    path = os.path.join(images, "img_2.tif")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    assert cli(images, masks, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "img_2.tif: cannot read image" in line and "IndexError" not in line, line


def test_error_starts_a_fresh_line_after_a_progress_bar_in_a_log(tmp_path):
    images, masks = make_pairs(str(tmp_path), n=6)
    write(os.path.join(masks, "img_5.tif"), np.full((48, 64), 9, np.uint8))
    result = subprocess.run([PY, os.path.join(ROOT, "build_lmdb.py"), "--image_folder", images, "--mask_folder", masks,
                             "--output_folder", str(tmp_path / "out"), "--dataset_name", "ds", "--workers", "1",
                             "--number_classes", "3"], capture_output=True, timeout=60)
    err = result.stderr.decode()  # not text=True: universal newlines would turn the bar's \r into line ends
    assert result.returncode == 2 and "build_lmdb:" in err  # the bar was drawn into the log
    assert any(line.startswith("error: ") and "img_5.tif" in line for line in err.split("\n")), repr(err)


@pytest.mark.parametrize("flags,message", [
    (["--train_fraction", "nan"], "--train_fraction must be > 0 and < 1"),
    (["--train_fraction", "inf"], "--train_fraction must be > 0 and < 1"),
    (["--use_tiling", "1", "--tile_size", str(2**40)], "--tile_size must be between 32 and 32768"),
    (["--workers", "100000"], "--workers must be between 1 and 256"),
    (["--workers", "0"], "--workers must be between 1 and 256"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--number_classes", str(2**40)], "--number_classes must be between 1"),
])
def test_absurd_numbers_are_refused_before_work(tmp_path, capsys, flags, message):
    images, masks = make_pairs(str(tmp_path), n=2)
    argv = ["--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"),
            "--dataset_name", "ds", *flags]
    assert build_lmdb.main(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- issue #18


def test_split_csv_lists_every_image_and_its_split(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path), n=5)
    out = tmp_path / "out"
    assert cli(images, masks, out) == 0
    assert f"split (file -> train/test): {out / 'split-ds.csv'}" in capsys.readouterr().out
    rows = [line.split(",") for line in (out / "split-ds.csv").read_text().splitlines()]
    assert rows[0] == ["file", "split"]
    by_split = {s: sorted(f for f, split in rows[1:] if split == s) for s in ("train", "test")}
    for split in ("train", "test"):
        assert by_split[split] == sorted(s["file"] for s in read_db(str(out / f"{split}-ds.lmdb"))[0]["sources"])


def test_grey_level_masks_get_the_mask_map_hint(tmp_path, capsys):
    images, masks = make_pairs(str(tmp_path))
    m = np.zeros((48, 64), np.uint8)
    m[10:20], m[30:40] = 128, 255
    write(os.path.join(masks, "img_1.tif"), m)
    assert cli(images, masks, tmp_path / "out", "--number_classes", "3") == 2
    assert "use --mask_map 128:1,255:2" in one_error_line(capsys)
