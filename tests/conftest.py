import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A shell starts background jobs (`make test &`, nohup ... &) with SIGINT ignored, and an ignored SIGINT is inherited
# through exec: the Ctrl-C tests' children would never see it. Handle it here, so children start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data", "nist-phase-contrast")


def signal_group_when_ready(cmd, ready, *, sig=None, timeout=120.0, settle=0.0, stop_timeout=60.0, **popen):
    """Start ``cmd`` in a session of its own (stderr captured), wait until ``ready(proc)`` (the process
    must still be running, within ``timeout`` s), let it run ``settle`` s more, then send ``sig``
    (default SIGTERM) to its whole process group, as Slurm and a terminal do; returns (proc, stderr).
    The group is SIGKILLed if anything on the way fails, so no test leaves processes behind."""
    import signal
    import subprocess
    import time

    sig = signal.SIGTERM if sig is None else sig
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)
    try:
        deadline = time.time() + timeout
        while not ready(proc):
            assert proc.poll() is None, f"{os.path.basename(cmd[1])} ended before it could be signalled"
            assert time.time() < deadline, f"{os.path.basename(cmd[1])} was not ready within {timeout} s"
            time.sleep(0.02)
        time.sleep(settle)
        assert proc.poll() is None, f"{os.path.basename(cmd[1])} ended before it could be signalled"
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=stop_timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, err


UNWRITABLE_KINDS = ["file", "under a file", "dangling symlink", "under a dangling symlink", "not writable"]


def unwritable_output(tmp_path, kind, leaf):
    """An output folder of ``kind`` (UNWRITABLE_KINDS) that cannot be written, and the text
    cliutil.check_output_folder's one line must hold; ``tmp_path/afile`` and ``tmp_path/link`` (dangling) are
    made. Skips "not writable" where /sys cannot stand in for a read-only folder."""
    import pytest

    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    if kind == "not writable" and os.access("/sys", os.W_OK) and not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys to stand in for a read-only folder")
    return {
        "file": (tmp_path / "afile", "is a file, not a folder"),
        "under a file": (tmp_path / "afile" / leaf, "afile is a file, so no folder can be created under it"),
        "dangling symlink": (tmp_path / "link", "is a symbolic link to"),
        "under a dangling symlink": (tmp_path / "link" / leaf, "is a symbolic link to"),
        "not writable": (f"/sys/segkit-{leaf}", "cannot write in /sys"),  # read-only even for root
    }[kind]


def one_error_line(capsys):
    """The one 'error: ...' line a stage printed to stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]
