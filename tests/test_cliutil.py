"""cliutil: exit codes, SIGTERM handled like Ctrl-C, workers that ignore interrupts from their first instruction,
temporaries named after their process so a later run can remove those of killed runs."""
import os
import signal
import socket
import subprocess
import sys
import time

from segkit import cliutil


def test_run_cli_turns_sigterm_into_exit_130_and_restores_the_handler(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted long before this ends
        return 0

    start = time.monotonic()
    assert cliutil.run_cli(main, []) == 130
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err.strip() == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_cli_bad_input_is_one_line_and_exit_2(capsys):
    def main(argv):
        raise cliutil.InputError("x.tif: mask is 3x4 but its image is 4x4; re-export the mask")

    assert cliutil.run_cli(main, []) == cliutil.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["error: x.tif: mask is 3x4 but its image is 4x4; re-export the mask"]


def test_processes_started_under_interrupts_ignored_survive_signals_from_their_start():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = "import time; print('up', flush=True); time.sleep(30)"
    with cliutil.interrupts_ignored():
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert {s: signal.getsignal(s) for s in before} == before  # restored in this process
        # Sent while the child interpreter is still starting up (before any code of its own runs).
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.stdout.readline().strip() == "up"
        time.sleep(0.3)
        assert proc.poll() is None, "the child died of a signal it should have ignored"
    finally:
        proc.kill()
        proc.wait()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_are_named_after_their_process_and_stale_ones_are_removed(tmp_path):
    final = tmp_path / "img.tif"
    tmp = cliutil.make_temp(str(final), suffix=".tif")
    folder = cliutil.make_temp(str(tmp_path / "img.zarr"), directory=True)
    host, me, dead = socket.gethostname(), os.getpid(), _dead_pid()
    assert os.path.basename(tmp).startswith(f".img.tif.tmp-{host}-{me}-") and tmp.endswith(".tif")
    assert os.path.isdir(folder) and oct(os.stat(folder).st_mode & 0o777) == oct(0o777 & ~cliutil._UMASK)
    stale_file = tmp_path / f".img2.tif.tmp-{host}-{dead}-abc_1234.tif"
    stale_dir = tmp_path / f".img3.zarr.tmp-{host}-{dead}-zzzzzzzz"
    stale_old = tmp_path / f".img3.zarr.tmp-{host}-{dead}-yyyyyyyy.old"
    other_host = tmp_path / f".img4.tif.tmp-{host}x.example.org-{dead}-abcdefgh.tif"  # may still be written there
    alive = tmp_path / f".img5.tif.tmp-{host}-{os.getppid()}-abcdefgh.tif"              # a live process's
    foreign = tmp_path / ".img6.tif.partial"                                            # not our naming
    stale_file.write_bytes(b"x")
    (stale_dir / "0").mkdir(parents=True)
    stale_old.mkdir()
    for path in (other_host, alive, foreign):
        path.write_bytes(b"x")
    removed = cliutil.remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(map(str, (stale_file, stale_dir, stale_old)))
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(str(p)) for p in (tmp, folder, other_host, alive, foreign))  # this process's own stay too
    assert cliutil.remove_stale_temporaries(str(tmp_path / "missing")) == []


def test_atomic_path_renames_on_success_and_removes_the_temporary_on_failure(tmp_path):
    final = tmp_path / "out.txt"
    cliutil.atomic_write_text(str(final), "one")
    try:
        with cliutil.atomic_path(str(final)) as tmp:
            open(tmp, "w").write("two")
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    assert final.read_text() == "one" and os.listdir(tmp_path) == ["out.txt"]


def test_run_cli_fault_is_one_line_and_exit_1(capsys):
    def main(argv):
        raise cliutil.FaultError("no space left on /data (needed about 12 MB)")

    assert cliutil.run_cli(main, []) == cliutil.EXIT_FAULT == 1
    assert capsys.readouterr().err == "error: no space left on /data (needed about 12 MB)\n"


def test_end_progress_line_only_in_logs():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log_file, terminal = io.StringIO(), Terminal()
    cliutil.end_progress_line(log_file)
    cliutil.end_progress_line(terminal)
    assert log_file.getvalue() == "\n" and terminal.getvalue() == ""
