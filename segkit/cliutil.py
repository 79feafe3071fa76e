"""Small helpers shared by the three command-line stages.

One home for: the user-facing error types and their exit codes (bad input 2, a fault 1), the original
toolkit's 0/1 boolean flags, logging setup, signals (SIGTERM as Ctrl-C; workers
that ignore both and die with their parent), and atomic file writes with temporaries a later run can clean up.
No TensorFlow here.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

EXIT_BAD_INPUT = 2
EXIT_FAULT = 1
log = logging.getLogger(__name__)
_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class InputError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2, no traceback.

    The message should say what is wrong, which file, and how to fix it.
    """


class FaultError(Exception):
    """The run failed for a reason outside the input (a worker killed for lack of memory, a full disk):
    reported as one line on stderr, exit code 1, no traceback. The message says what to do."""


def str2bool(value: str) -> bool:
    """Parse the original toolkit's 0/1 flags (also true/false, yes/no)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once, only where there is a default to show: not on required flags, not
    for None, not when the help text already says its default; booleans as the original's 0/1."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or default is None or default is argparse.SUPPRESS or "default" in text
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        shown = int(default) if isinstance(default, bool) else default
        if isinstance(shown, (list, tuple)):
            shown = " ".join(map(str, shown))
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help (:class:`HelpFormatter`) and exit code 2 on bad flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose 0/1`` (a bare ``--verbose`` means 1): debug logging and TensorFlow's start-up messages."""
    parser.add_argument("--verbose", type=str2bool, nargs="?", const=True, default=False, metavar="0/1",
                        help="1 = debug logging, and TensorFlow/CUDA start-up messages (silenced otherwise)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; Slurm's pre-emption, time limit and scancel


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def signals_handled(handler, signums: Sequence[int] = INTERRUPTS) -> Iterator[None]:
    """Within the block ``handler`` (a function, or ``signal.SIG_IGN``) handles ``signums``; the previous
    handlers come back after it. Outside the main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does.

    SIGTERM is what Slurm sends on pre-emption, at the time limit (SIGKILL follows after its
    KillWait, 30 s by default) and on ``scancel``; Python's default would end the process on
    the spot, skipping the ``finally`` blocks that close readers and remove temporaries.
    """
    return signals_handled(_raise_interrupt, (signal.SIGTERM,))


def ignore_interrupts() -> None:
    """For worker processes: ignore SIGINT and SIGTERM; the parent handles both and ends its workers.

    A terminal's Ctrl-C and Slurm's SIGTERM reach every process of the job, workers included;
    workers that died of them first would turn a clean interrupt into a worker failure.
    """
    for signum in INTERRUPTS:
        signal.signal(signum, signal.SIG_IGN)


def interrupts_ignored():
    """Ignore SIGINT and SIGTERM in this process for the block (main thread only; else no effect).

    Start worker processes inside it: they inherit the ignored dispositions from their first
    instruction (Python keeps an inherited SIG_IGN for SIGINT), so a Ctrl-C while a spawned
    worker still imports cannot kill it with a traceback. A signal during the block is lost;
    keep the block short.
    """
    return signals_handled(signal.SIG_IGN)


def run_cli(main_fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stage's main, turning InputError into one line on stderr and exit 2.

    KeyboardInterrupt -- Ctrl-C, or SIGTERM (:func:`sigterm_as_interrupt`) -- exits 130 without
    a traceback; the stage's own ``finally`` blocks have already closed readers and removed
    temporaries.
    """
    try:
        with sigterm_as_interrupt():
            return int(main_fn(argv) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FaultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def end_progress_line(stream=None) -> None:
    """End a progress bar's unfinished line in a log (not a terminal), so what follows -- an ``error:``
    line -- starts on a fresh line. tqdm redraws with carriage returns and never ends its line."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        stream.write("\n")
        stream.flush()


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_SECONDS = 1.0


def die_with_parent(parent_pid: int) -> None:
    """For worker processes: end this process when ``parent_pid`` dies (kill -9, out-of-memory killer),
    instead of blocking forever on a queue nobody writes to any more.

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere, or
    if prctl fails, a daemon thread checks every second whether the process was re-parented.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        threading.Event().wait(WATCHDOG_SECONDS)
    os._exit(1)


# Temporaries are named ".BASE.tmp-HOST-PID-RANDOM[SUFFIX]": whoever finds one can tell which process
# on which machine writes it, so a later run can remove those of processes that no longer exist.
_TEMP_NAME = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}(?:\.[^.]+)?$")


def owner_tag() -> str:
    """``HOST-PID`` of this process, as it appears in the names of its temporaries."""
    return f"{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a process we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_temp(final_path: str, suffix: str = "", directory: bool = False) -> str:
    """Create a hidden temporary file (or folder) beside ``final_path``, named after this process.

    Same folder, so a rename into place is atomic; permissions as a plain create would give
    (mkstemp/mkdtemp make 0600/0700).
    """
    folder = os.path.dirname(os.path.abspath(final_path)) or "."
    prefix = f".{os.path.basename(final_path)}.tmp-{owner_tag()}-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder)
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
    return tmp


def remove_stale_temporaries(*folders: str) -> list[str]:
    """Remove the temporaries (:func:`make_temp`'s names) in ``folders`` of processes that died on this
    machine without cleaning up (kill -9, out of memory); logs and returns their paths.

    Temporaries of live processes, and of other machines (a job array writing one shared folder),
    are left alone: from here it cannot be told whether those still write.
    """
    removed = []
    host = socket.gethostname()
    for folder in folders:
        try:
            entries = sorted(os.listdir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            match = _TEMP_NAME.match(entry)
            if not match or match["host"] != host or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
                continue
            path = os.path.join(folder, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            log.info("removed %s (temporary of a run that was killed)", path)
            removed.append(path)
    return removed


@contextmanager
def atomic_path(final_path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``final_path`` (:func:`make_temp`); rename it into place on success.

    On any exception the temporary is removed and ``final_path`` is untouched.
    """
    tmp = make_temp(final_path, suffix=suffix)
    try:
        yield tmp
        os.replace(tmp, final_path)
        fsync_path(os.path.dirname(os.path.abspath(final_path)))  # the rename itself survives a crash
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(final_path: str, text: str) -> None:
    with atomic_path(final_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------- output folder lock and disk faults

LOCK_FILENAME = ".lock"


class FolderLock:
    """An advisory lock on an output folder: ``fcntl.flock`` on ``FOLDER/.lock``, whose text names the holder
    (``HOST PID``) so a refused run can say who holds it.

    The kernel drops a flock when its holder dies, so a lock file left by a killed run (its pid dead) is
    simply taken over. Where flock is unsupported (some network file systems) the text decides: a lock
    naming a live process, or one on another machine, refuses; one naming a dead process of this machine
    is stale and taken over. :meth:`acquire` raises InputError when the folder is in use.
    """

    def __init__(self, folder: str, what: str = "--output_dir"):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_FILENAME)
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(self._busy_message(self._holder() or "another process")) from None
        except OSError:  # no flock here: the holder's text decides
            holder = self._holder()
            if holder and not self._stale(holder):
                os.close(fd)
                raise InputError(self._busy_message(holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _busy_message(self, holder: str) -> str:
        return (f"{self.what} {self.folder} is in use by {holder} (lock {self.path}); wait for that run to end, "
                "stop it, or choose another folder")

    def _holder(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                parts = fh.read().split()
        except OSError:
            return None
        return f"process {parts[1]} on {parts[0]}" if len(parts) == 2 and parts[1].isdigit() else None

    @staticmethod
    def _stale(holder: str) -> bool:
        _, pid, _, host = holder.split(" ", 3)
        return host == socket.gethostname() and not pid_alive(int(pid))

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def mount_point(path: str) -> str:
    """The mount point of the file system holding ``path`` (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    device = os.stat(path).st_dev
    while path != os.path.dirname(path) and os.stat(os.path.dirname(path)).st_dev == device:
        path = os.path.dirname(path)
    return path


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or quota: OSError ENOSPC / EDQUOT, or TensorFlow's
    ResourceExhausted / other errors whose text says "No space left" (TF raises no errno)."""
    import errno

    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and ("No space left" in str(e) or "Disk quota exceeded" in str(e)):
            return True
    return False


@contextmanager
def disk_space_guard(folder: str, what: str, needed_bytes: Callable[[], float], keeps: str) -> Iterator[None]:
    """Within the block a full disk becomes one FaultError line: "no space left on MOUNT (writing WHAT in
    FOLDER; needed about N MB, M MB free): KEEPS; free space ...". ``needed_bytes``: the estimate, computed
    only on failure. Other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        try:
            needed = float(needed_bytes())
        except Exception:  # an estimate must not hide the fault
            needed = None
        raise FaultError(disk_full_message(folder, what, needed, keeps)) from None


def check_output_folder(path: str, flag: str) -> None:
    """Refuse, with one InputError line naming ``flag``, an output folder that cannot be written: a file, a
    path under a file, a dangling symbolic link (or one on the way), a folder this process cannot write in.

    Writability is tried with a probe file (``os.access`` says yes to root on a read-only file system).
    Nothing is created; a missing folder passes when its nearest existing ancestor can be written.
    """
    where = f"{flag} {path}"
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{where} is a symbolic link to {os.readlink(path)}, which does not exist; create its "
                         "target, remove the link or choose another folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{where} is a file, not a folder; choose a folder (it is created if missing)")
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if os.path.islink(parent) and not os.path.exists(parent):
        raise InputError(f"{where}: {parent} is a symbolic link to {os.readlink(parent)}, which does not exist; "
                         "remove the link or choose another folder")
    if not os.path.isdir(parent):
        raise InputError(f"{where}: {parent} is a file, so no folder can be created under it; choose another folder")
    try:
        os.remove(make_temp(os.path.join(parent, "write-test")))
    except OSError as exc:
        raise InputError(f"{where}: cannot write in {parent} ({exc.strerror}); choose another folder or fix its "
                         "permissions") from None


def disk_full_message(folder: str, what: str, needed_bytes: float | None, keeps: str) -> str:
    """The one line for a full disk or quota: "no space left on MOUNT (writing WHAT in FOLDER; needed about
    N MB, M MB free): KEEPS; free space and rerun the same command" (:func:`disk_space_guard`'s wording)."""
    needed = "?" if needed_bytes is None else f"{needed_bytes / 1e6:{'.0f' if needed_bytes >= 1e7 else '.2g'}}"
    mount = mount_point(folder)
    free = shutil.disk_usage(mount).free / 1e6
    return (f"no space left on {mount} (writing {what} in {folder}; needed about {needed} MB, {free:.0f} MB free): "
            f"{keeps}; free space and rerun the same command")
