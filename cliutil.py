"""Small helpers shared by the three command-line stages.

One home for: the user-facing error type and its exit code, the original
toolkit's 0/1 boolean flags, logging setup, and atomic file writes.
No TensorFlow here.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

EXIT_BAD_INPUT = 2
_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class InputError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2, no traceback.

    The message should say what is wrong, which file, and how to fix it.
    """


def str2bool(value: str) -> bool:
    """Parse the original toolkit's 0/1 flags (also true/false, yes/no)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and exit code 2 on bad flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(main_fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stage's main, turning InputError into one line on stderr and exit 2.

    KeyboardInterrupt exits 130 without a traceback; the stage's own
    ``finally`` blocks have already closed readers and removed temporaries.
    """
    try:
        return int(main_fn(argv) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def atomic_path(final_path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    The temporary lives in the same folder so the rename is atomic. On any
    exception the temporary is removed and ``final_path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(final_path)) or "."
    base = os.path.basename(final_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, final_path)
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
