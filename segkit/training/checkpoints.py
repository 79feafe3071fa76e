"""What a run keeps on disk between steps: RunState, the checkpoint folders, metrics.csv, and the resume checks.

README.md, "Stage 2" (Outputs, Resume), says what users see. No TensorFlow is imported here: the
checkpoint object is handed in by the trainer.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segkit import cliutil
from segkit.training.config import CONFIG_FILENAME, RunConfig

log = logging.getLogger("segkit.training.checkpoints")

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
    train_seconds: float = 0.0  # steps and test passes so far, over every invocation (--max_minutes counts them)

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
    def from_json(cls, text: str, source: str = "state.json") -> RunState:
        """Parse and check every field; InputError naming ``source`` and the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _corrupt(source, f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise _corrupt(source, "expected a JSON object")
        for name, test, want in _STATE_FIELDS:
            if name not in data:
                raise _corrupt(source, f"the field '{name}' is missing")
            if not _passes(test, data[name]):
                raise _corrupt(source, f"the field '{name}' must be {want}, got {json.dumps(data[name])[:40]}")
        for name, test, want, _ in _OPTIONAL_STATE_FIELDS:
            if name in data and not _passes(test, data[name]):
                raise _corrupt(source, f"the field '{name}' must be {want}, got {json.dumps(data[name])[:40]}")
        data = {**{name: data.get(name, default) for name, _, _, default in _OPTIONAL_STATE_FIELDS},
                **{name: data[name] for name, _, _ in _STATE_FIELDS}}
        data["best_loss"] = float(data["best_loss"])
        return cls(**data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


_STATE_FIELDS = (  # name, test, what it must be
    ("step", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("best_loss", lambda v: _is_number(v) and not math.isnan(v) and v >= 0, "a number >= 0 (Infinity before a test pass)"),
    ("best_step", lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    ("best_metrics", lambda v: isinstance(v, dict), "a JSON object"),
    ("evals_without_improvement", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("history", lambda v: isinstance(v, list) and all(
        isinstance(h, dict) and _is_int(h.get("step")) and _is_number(h.get("test_loss")) for h in v),
     'a list of {"step": integer, "test_loss": number}'),
)

_OPTIONAL_STATE_FIELDS = (  # name, test, what it must be, value in a state.json written before the field existed
    ("train_seconds", lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a number >= 0", 0.0),
)


def _passes(test, value) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError, AttributeError):
        return False


def _corrupt(path: str, problem: str) -> cliutil.InputError:
    return cliutil.InputError(f"{path}: {problem}; the run's saved state is damaged: restore the file, move the "
                              "folder aside or use a new --output_dir")


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


CHECKPOINT_NAME = re.compile(r"^ckpt-\d{9}(-\d+)?$")


def read_pointer(output_dir: str) -> dict[str, Any] | None:
    """The checkpoint pointer ({"latest": dir name, "best": dir name or null, "step": int}) or None when there is
    none; every field checked (InputError naming the file and the field)."""
    return _pointer_in(checkpoint_dir(output_dir))


def _pointer_in(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, CHECKPOINT_POINTER)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise _corrupt(path, "expected a JSON object")
    for key, optional in (("latest", False), ("best", True)):
        name = data.get(key)
        if name is None and optional:
            continue
        if not isinstance(name, str) or not CHECKPOINT_NAME.match(name):
            raise _corrupt(path, f"the field '{key}' must name a checkpoint folder (ckpt-NNNNNNNNN), got "
                                 f"{json.dumps(name)[:40]}")
        if not os.path.isfile(os.path.join(folder, name, "state.json")):
            raise _corrupt(path, f"the field '{key}' names {name}, which is missing or incomplete in {folder}")
    if not _is_int(data.get("step")) or data["step"] < 0:
        raise _corrupt(path, f"the field 'step' must be an integer >= 0, got {json.dumps(data.get('step'))[:40]}")
    return data


# ---------------------------------------------------------------------------- resume checks

def keep_chosen_settings(config: RunConfig) -> RunConfig:
    """A run being continued keeps, for every setting this version would choose (the user did not pass it), the
    value it started with (config.json), where this version or machine would choose otherwise (a changed default
    after an update, another machine's batch): the same command resumes it. Settings the user passes are not
    touched (check_resume compares them)."""
    path = os.path.join(config.output_dir, CONFIG_FILENAME)
    try:
        if read_pointer(config.output_dir) is None or not os.path.isfile(path):
            return config
        saved = RunConfig.load(path)
    except cliutil.InputError:  # check_resume reports a broken pointer or config.json
        return config
    # A chosen model setting (--base_filters) lives in model_config, the others are fields of their own.
    old = {**saved.model_config, **saved.to_dict()}
    new = {**config.model_config, **config.to_dict()}
    kept = {name: old[name] for name in config.origins
            if old.get(name) is not None and old.get(name) != new.get(name)}
    if not kept:
        return config
    why = {name: saved.origins.get(name, "a flag or the default of the version that started it") for name in kept}
    for name in kept:
        log.info("continuing the run in %s: keeping --%s %s from its start (%s), not %s", config.output_dir, name,
                 _short(old[name]), why[name], _short(new[name]))
    origins = dict(config.origins, **{name: f"kept from the run's start: {why[name]}" for name in kept})
    field_names = {f.name for f in dataclasses.fields(config)}
    model_kept = {name: kept.pop(name) for name in list(kept) if name not in field_names}
    fields = {name: getattr(saved, name) for name in kept}
    if model_kept:
        fields["model_config"] = dict(config.model_config, **model_kept)
    return dataclasses.replace(config, **fields, origins=origins)


def check_resume(config: RunConfig, require: bool) -> bool:
    """True when output_dir holds a checkpoint of this configuration; InputError when it is another's."""
    output_dir = config.output_dir
    if read_pointer(output_dir) is None:
        if require:
            raise cliutil.InputError(f"--resume 1: {output_dir} holds no checkpoint to continue; drop --resume to start "
                                     "a new run")
        return False
    config_path = os.path.join(output_dir, CONFIG_FILENAME)
    if not os.path.isfile(config_path):
        raise cliutil.InputError(f"{output_dir} holds a checkpoint but no readable config.json; use a new --output_dir")
    saved, new = RunConfig.load(config_path).to_dict(), config.to_dict()
    part = "3d" if len(config.crop_size) == 3 else "2d"  # only the augmentation of this run's rank is compared
    for record in (saved, new):
        if isinstance(record.get("augmentation"), dict):
            record["augmentation"] = record["augmentation"].get(part)
    # A run-defining field an older config.json did not record (None) cannot be compared: it is accepted.
    differing = [k for k in config.run_defining() if saved.get(k) != new.get(k) and saved.get(k) is not None]
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
        return _pointer_in(self.folder)

    def prefix(self, name: str) -> str:
        return os.path.join(self.folder, name, "ckpt")

    def save(self, checkpoint, state: RunState, best: bool) -> str:
        """Write the checkpoint of ``state.step``; it becomes 'latest' (and 'best' when ``best``).

        Order: the new folder complete and renamed in, then the pointer switched (atomically), then the
        folders no longer named removed; every rename fsynced. A full disk: FaultError, the previous
        checkpoint kept and named."""
        name = self._free_name(f"ckpt-{state.step:09d}")
        final = os.path.join(self.folder, name)
        with cliutil.disk_space_guard(self.folder, "a checkpoint", self._size_estimate,
                                      f"the last complete checkpoint (step {self._saved_step()}) is kept"):
            tmp = cliutil.make_temp(final, directory=True)
            try:
                self._write(checkpoint, tmp, state)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            cliutil.fsync_path(self.folder)
            old = self.pointer() or {}
            pointer = {"latest": name, "best": name if best else old.get("best"), "step": state.step}
            cliutil.atomic_write_text(os.path.join(self.folder, CHECKPOINT_POINTER), json.dumps(pointer, indent=1))
        self.collect_garbage()
        if not self.is_chief:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder, exist_ok=True)
        return final

    @staticmethod
    def _write(checkpoint, tmp: str, state: RunState) -> None:
        checkpoint.write(os.path.join(tmp, "ckpt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
            fh.write(state.to_json())
        for entry in os.listdir(tmp):
            cliutil.fsync_path(os.path.join(tmp, entry))
        cliutil.fsync_path(tmp)

    def _free_name(self, name: str) -> str:
        """``name``, or ``name-K`` when a folder of that step exists already (the same step saved again, e.g.
        the final pass after a resume): the pointer may still name the existing one."""
        candidate, k = name, 0
        while os.path.lexists(os.path.join(self.folder, candidate)):
            k += 1
            candidate = f"{name}-{k}"
        return candidate

    def _saved_step(self) -> str:
        try:
            pointer = self.pointer()
        except cliutil.InputError:
            pointer = None
        return str(pointer["step"]) if pointer else "none yet"

    def _size_estimate(self) -> float:
        """Bytes a checkpoint needs: the size of the newest complete one (an estimate before the first)."""
        sizes = [sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(self.folder, d))
                     for f in files) for d in os.listdir(self.folder) if CHECKPOINT_NAME.match(d)]
        return max(sizes, default=0)

    def collect_garbage(self) -> None:
        """Remove checkpoint folders the pointer names no longer (never temporaries: another process's)."""
        keep = {v for k, v in (self.pointer() or {}).items() if k in ("latest", "best") and v}
        for entry in os.listdir(self.folder):
            path = os.path.join(self.folder, entry)
            if CHECKPOINT_NAME.match(entry) and os.path.isdir(path) and entry not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load_state(self, name: str) -> RunState:
        path = os.path.join(self.folder, name, "state.json")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise _corrupt(path, f"unreadable ({exc})") from None
        return RunState.from_json(text, source=path)


class MetricsCsv:
    """metrics.csv: one row per test pass, the whole file rewritten atomically each time."""

    def __init__(self, path: str, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and os.path.exists(path):
            try:
                with open(path, newline="", encoding="utf-8") as fh:
                    self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError, csv.Error) as exc:
                raise _corrupt(path, f"unreadable as the run's metrics table ({type(exc).__name__}: {exc})") from None

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
