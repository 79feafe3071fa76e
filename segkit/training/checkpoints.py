"""What a run keeps on disk between steps: RunState, the checkpoint folders, metrics.csv, and the resume checks.

README.md, "Stage 2" (Outputs, Resume), says what users see. No TensorFlow is imported here: the
checkpoint object is handed in by the trainer.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segkit import cliutil
from segkit.training.config import CONFIG_FILENAME, RunConfig

IMPROVEMENT_TOLERANCE = 1e-4
CHECKPOINT_POINTER = "checkpoint.json"


@dataclass
class RunState:
    """Host-side training state saved beside every checkpoint (state.json)."""

    step: int = 0
    best_loss: float = math.inf
    best_step: int = -1
    best_metrics: dict[str, Any] = field(default_factory=dict)
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "test_loss"} per test pass

    def record(self, step: int, test_loss: float, result: dict[str, Any]) -> bool:
        """Add a test pass; return True when it improves the best loss by more than the tolerance."""
        self.history.append({"step": step, "test_loss": test_loss})
        improved = test_loss < self.best_loss - IMPROVEMENT_TOLERANCE
        if improved:
            self.best_loss, self.best_step = test_loss, step
            self.best_metrics = {"step": step, "test_loss": test_loss, **result}
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return improved

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=json_default)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        data = json.loads(text)
        data["best_loss"] = float(data["best_loss"])
        return cls(**data)


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def read_pointer(output_dir: str) -> dict[str, Any] | None:
    """The checkpoint pointer ({"latest": dir name, "best": dir name}) or None when there is none."""
    path = os.path.join(checkpoint_dir(output_dir), CHECKPOINT_POINTER)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise cliutil.InputError(f"{path}: unreadable ({exc}); move the folder aside or use a new --output_dir") from None


# ---------------------------------------------------------------------------- resume checks

def check_resume(config: RunConfig, require: bool) -> bool:
    """True when output_dir holds a checkpoint of this configuration; InputError when it is another's."""
    output_dir = config.output_dir
    if read_pointer(output_dir) is None:
        if require:
            raise cliutil.InputError(f"--resume 1: {output_dir} holds no checkpoint to continue; drop --resume to start a new run")
        return False
    config_path = os.path.join(output_dir, CONFIG_FILENAME)
    if not os.path.isfile(config_path):
        raise cliutil.InputError(f"{output_dir} holds a checkpoint but no readable config.json; use a new --output_dir")
    saved, new = RunConfig.load(config_path).to_dict(), config.to_dict()
    differing = [k for k in config.run_defining() if saved[k] != new[k]]
    if differing:
        details = "; ".join(_difference(k, saved[k], new[k]) for k in differing)
        raise cliutil.InputError(f"{output_dir} holds a checkpoint of a different configuration ({details}); "
                                 "use a new --output_dir, or the original settings to continue that run")
    return True


def _difference(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):  # name the differing sub-settings
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{key}.{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys)
    return f"{key}: {_short(old)} -> {_short(new)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_precision(output_dir: str, mixed: bool) -> None:
    """A checkpoint written with mixed precision active holds the loss-scale optimizer's state, one written
    in float32 does not: each restores only with the same precision (InputError otherwise)."""
    path = os.path.join(output_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return
    was = RunConfig.load(path).mixed_precision_active  # None: written before the field existed
    if was is not None and bool(was) != mixed:
        how = lambda active: "mixed float16 (on a GPU)" if active else "float32"  # noqa: E731
        raise cliutil.InputError(
            f"{output_dir}: the checkpoint was trained in {how(was)} and this run would train in {how(mixed)} "
            f"({'no GPU is visible' if was else '--mixed_precision 1 with a GPU visible'}); continue it on "
            f"{'a GPU machine' if was else 'a machine without a GPU, or with CUDA_VISIBLE_DEVICES='}, "
            "or start a new --output_dir")


# ---------------------------------------------------------------------------- files

class CheckpointStore:
    """Checkpoint folders ``checkpoints/ckpt-STEP/`` switched by an atomically rewritten pointer file.

    A checkpoint is written into a temporary folder (TensorFlow checkpoint + state.json, fsynced),
    renamed into place, and only then named in ``checkpoint.json``; a SIGKILL at any moment leaves the
    previous pointer and its folders intact. Folders no longer named (not latest, not best) are deleted.
    """

    def __init__(self, output_dir: str, is_chief: bool):
        self.folder = checkpoint_dir(output_dir) if is_chief else tempfile.mkdtemp(prefix="train_unet_worker_")
        self.is_chief = is_chief
        os.makedirs(self.folder, exist_ok=True)
        if is_chief:  # temporaries of a killed run (checkpoint, pointer, export): see cliutil.make_temp
            cliutil.remove_stale_temporaries(self.folder, output_dir)

    def pointer(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.folder, CHECKPOINT_POINTER), encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def prefix(self, name: str) -> str:
        return os.path.join(self.folder, name, "ckpt")

    def save(self, checkpoint, state: RunState, best: bool) -> str:
        """Write the checkpoint of ``state.step``; it becomes 'latest' (and 'best' when ``best``)."""
        name = f"ckpt-{state.step:09d}"
        tmp = cliutil.make_temp(os.path.join(self.folder, name), directory=True)
        checkpoint.write(os.path.join(tmp, "ckpt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
            fh.write(state.to_json())
        for entry in os.listdir(tmp):
            cliutil.fsync_path(os.path.join(tmp, entry))
        final = os.path.join(self.folder, name)
        if os.path.exists(final):  # same step saved again (e.g. final pass after a resume)
            shutil.rmtree(final)
        os.rename(tmp, final)
        old = self.pointer() or {}
        pointer = {"latest": name, "best": name if best else old.get("best"), "step": state.step}
        cliutil.atomic_write_text(os.path.join(self.folder, CHECKPOINT_POINTER), json.dumps(pointer, indent=1))
        self.collect_garbage()
        if not self.is_chief:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder, exist_ok=True)
        return final

    def collect_garbage(self) -> None:
        keep = {v for k, v in (self.pointer() or {}).items() if k in ("latest", "best") and v}
        for entry in os.listdir(self.folder):
            path = os.path.join(self.folder, entry)
            if os.path.isdir(path) and entry not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load_state(self, name: str) -> RunState:
        with open(os.path.join(self.folder, name, "state.json"), encoding="utf-8") as fh:
            return RunState.from_json(fh.read())


class MetricsCsv:
    """metrics.csv: one row per test pass, the whole file rewritten atomically each time."""

    def __init__(self, path: str, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        cliutil.atomic_write_text(self.path, buffer.getvalue())
