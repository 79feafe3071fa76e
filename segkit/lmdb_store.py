"""Crash-safe LMDB databases on disk, for build_lmdb.py: one home for where a build may write, how a
database is written under a temporary name and installed (or swapped in) atomically, how a later run
cleans up after a killed one, and how a write fault (a full disk) is told in one line.
See the README (build section, troubleshooting). Never imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import sys
from typing import Any, Sequence

from segkit import cliutil, lmdb_format
from segkit.cliutil import InputError

log = logging.getLogger("build_lmdb")

SPLITS = ("train", "test")
INITIAL_MAP_SIZE = 64 << 20
_TEMP_RE = re.compile(r"^\.(?P<base>.+\.lmdb)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")


# ----------------------------------------------------------------------------- where a build may write


def check_output_folder(output_folder: str) -> None:
    """Refuse, in one line, an output folder that cannot hold the databases (checked before any work):
    :func:`cliutil.check_output_folder`."""
    cliutil.check_output_folder(output_folder, "--output_folder")


def check_database_paths(finals: dict[str, str], overwrite: bool) -> None:
    """Both databases are replaceable (or absent) before any work: never one installed and not the other."""
    for path in finals.values():
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            what = "a symbolic link" if os.path.islink(path) else "a file"
            raise InputError(f"{path} is {what}, not a database folder; remove it or use another --dataset_name")
        if overwrite and os.path.isdir(path) and not os.path.exists(os.path.join(path, "data.mdb")):
            raise InputError(f"{path} is a folder but not an LMDB database; --overwrite only replaces databases: "
                             "move it away or use another --dataset_name")


# ----------------------------------------------------------------------------- databases


def database_paths(output_folder: str, dataset_name: str) -> dict[str, str]:
    return {s: os.path.join(output_folder, f"{s}-{dataset_name}.lmdb") for s in SPLITS}


def _temp_name(final_path: str, kind: str) -> str:
    folder, base = os.path.split(final_path)
    return os.path.join(folder, f".{base}.{kind}-{socket.gethostname()}-{os.getpid()}")


def clean_stale_temporaries(output_folder: str, final_paths: Sequence[str]) -> None:
    """Remove temporaries of killed builds of these databases; restore an old one lost mid-swap."""
    if not os.path.isdir(output_folder):
        return
    finals = {os.path.basename(p): p for p in final_paths}
    host = socket.gethostname()
    for entry in sorted(os.listdir(output_folder)):
        match = _TEMP_RE.match(entry)
        if not match or match["base"] not in finals:
            continue
        path, final = os.path.join(output_folder, entry), finals[match["base"]]
        if match["host"] != host:
            log.warning("%s was left by a build on host %s; delete it if no build is running there", path, match["host"])
        elif int(match["pid"]) != os.getpid() and cliutil.pid_alive(int(match["pid"])):
            log.warning("%s belongs to a running build (pid %s); leaving it alone", path, match["pid"])
        elif match["kind"] == "old" and not os.path.exists(final):
            os.rename(path, final)
            log.warning("restored %s from %s (a previous build was killed while swapping databases)", final, path)
        else:
            _remove(path)
            if os.path.lexists(path):
                log.warning("could not remove %s (temporary of an interrupted build); delete it by hand", path)
            else:
                log.info("removed %s (temporary of an interrupted build)", path)


def _remove(path: str) -> None:
    """Remove a folder, a file or a symbolic link; errors are left to the caller to notice."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


class TempDatabase:
    """An LMDB environment under a temporary name, grown on demand, renamed into place by install()."""

    def __init__(self, final_path: str):
        import lmdb

        self.final_path = final_path
        self.path = _temp_name(final_path, "tmp")
        os.mkdir(self.path)
        self.map_size = INITIAL_MAP_SIZE
        # No fsync per commit: the temporary is worthless until finish() syncs it once.
        self.env = lmdb.open(self.path, map_size=self.map_size, subdir=True, sync=False, metasync=False,
                             readahead=False, meminit=False)
        self.num_records = 0
        self.nbytes = 0

    def append(self, values: Sequence[bytes]) -> int:
        """Write records with the next indices; returns the first index."""
        import lmdb

        first = self.num_records
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for offset, value in enumerate(values):
                        txn.put(lmdb_format.record_key(first + offset), value, append=True)
                break
            except lmdb.MapFullError:  # the aborted transaction left nothing; grow and retry
                need = sum(len(v) for v in values)
                self.map_size = max(2 * self.map_size, self.map_size + 2 * need)
                self.env.set_mapsize(self.map_size)
        self.num_records += len(values)
        self.nbytes += sum(len(v) for v in values)
        return first

    def finish(self, metadata: dict[str, Any]) -> None:
        import lmdb

        value = lmdb_format.encode_metadata(metadata)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(lmdb_format.META_KEY, value)
                break
            except lmdb.MapFullError:
                self.map_size += 2 * len(value) + (1 << 20)
                self.env.set_mapsize(self.map_size)
        self.env.sync(True)
        self.env.close()
        self.env = None

    def discard(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        shutil.rmtree(self.path, ignore_errors=True)


def _exchange(path_a: str, path_b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(path_a), at_fdcwd, os.fsencode(path_b), rename_exchange)
    return result == 0


def install(temp_path: str, final_path: str, overwrite: bool) -> None:
    """Move a complete database into place; the old one (if any) is removed only afterwards."""
    if not os.path.exists(final_path):
        os.rename(temp_path, final_path)  # fails (directory not empty) if one appeared meanwhile
    elif not overwrite:
        raise InputError(f"{final_path} appeared while building; rerun with --overwrite to replace it")
    else:
        if not _exchange(temp_path, final_path):
            aside = _temp_name(final_path, "old")
            os.rename(final_path, aside)  # a kill -9 right here: the next run restores `aside`
            os.rename(temp_path, final_path)
            temp_path = aside
        shutil.rmtree(temp_path)  # now the old database
    cliutil.fsync_path(os.path.dirname(os.path.abspath(final_path)))


# ----------------------------------------------------------------------------- faults


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    device = os.stat(path).st_dev
    while path != os.path.dirname(path) and os.stat(os.path.dirname(path)).st_dev == device:
        path = os.path.dirname(path)
    return path


def write_fault(exc: BaseException, output_folder: str, source_paths: Sequence[str], written: int) -> Exception | None:
    """A one-line error for a full disk (ENOSPC / EDQUOT, or LMDB's bare I/O error), else None.

    ``written``: bytes written so far; ``source_paths``: the input files (the estimate when little was written).
    """
    import lmdb

    space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    io_error = isinstance(exc, lmdb.Error) and ("Input/output error" in text or "No space" in text)
    if not (space or io_error) or not os.path.isdir(output_folder):
        return None
    sources = sum(os.path.getsize(p) for p in source_paths if os.path.exists(p))
    needed = max(written, sources) * 1.1 / 1e6
    free = shutil.disk_usage(output_folder).free / 1e6
    if space or "No space" in text or free < needed:
        return cliutil.FaultError(f"no space left on {_mount_point(output_folder)} (writing {output_folder}; needed "
                                  f"about {needed:.0f} MB, {free:.0f} MB free): free space or use another "
                                  "--output_folder; nothing was installed")
    return cliutil.FaultError(f"cannot write the databases in {output_folder} ({' '.join(text.split())}): the disk "
                              "may be full or failing; nothing was installed")
