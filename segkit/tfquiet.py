"""TensorFlow's start-up noise, silenced unless ``--verbose 1`` (README: "Troubleshooting").

Importing TensorFlow and probing for GPUs prints native log lines (``cudart_stub``, ``failed call to
cuInit``, ``oneDNN custom operations``, absl's ``All log messages before absl::InitializeLog()``) that
``TF_CPP_MIN_LOG_LEVEL`` alone does not stop: absl writes them to stderr before any level applies. So
:func:`import_tensorflow` runs the import and the first GPU probe with file descriptor 2 captured,
then writes back every captured line that is not such noise (a Python traceback, a fatal line).
Training and inference import TensorFlow through it; call :func:`configure` once after parsing flags.

:func:`default_onednn` is the other choice that must come before the import: which CPU kernels run.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Iterator, MutableMapping

# Native glog-style lines ("I0000 00:00:1795.46 21454 cudart_stub.cc:31] ...") at info/warning/error
# level, absl's pre-initialization banner and the CPU-feature advice's second line.
NOISE = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"
                   r"|WARNING: All log messages before absl::InitializeLog\(\)"
                   r"|To enable the following instructions:"
                   r"|.*oneDNN custom operations are on)")

_state = {"verbose": False}


def configure(verbose: bool) -> None:
    """Before TensorFlow is imported: quiet (TF_CPP_MIN_LOG_LEVEL=3, absl at errors) unless ``verbose``."""
    _state["verbose"] = bool(verbose)
    if verbose:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with contextlib.suppress(ImportError):
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)


def default_onednn(value: str | None, environ: MutableMapping[str, str] | None = None) -> bool:
    """Set TF_ENABLE_ONEDNN_OPTS to ``value`` ("0" or "1") unless the user set it; None leaves TensorFlow's choice.

    TensorFlow 2.21 turns oneDNN on only on CPUs with AVX-512 VNNI or newer. Only effective before
    TensorFlow is imported (then returns True); a no-op afterwards. GPU kernels do not depend on it.
    """
    environ = os.environ if environ is None else environ
    if value is None or "tensorflow" in sys.modules or environ.get("TF_ENABLE_ONEDNN_OPTS", "") != "":
        return False
    environ["TF_ENABLE_ONEDNN_OPTS"] = value
    return True


def is_noise(line: str) -> bool:
    return bool(NOISE.match(line))


@contextlib.contextmanager
def native_stderr_filtered(enabled: bool = True) -> Iterator[None]:
    """Capture file descriptor 2 for the block; afterwards write back the lines that are not :data:`NOISE`."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow() -> Any:
    """``import tensorflow`` (and the first GPU probe, where cuInit fails on a CPU machine), quietly
    unless :func:`configure` was told verbose. Returns the module; later calls just return it."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with native_stderr_filtered(enabled=not _state["verbose"]):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf


def visible_gpus() -> int:
    """How many GPUs TensorFlow sees (imports it quietly)."""
    return len(import_tensorflow().config.list_physical_devices("GPU"))
