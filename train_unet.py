#!/usr/bin/env python
"""Stage 2: train a segmentation model on LMDB databases and export a self-describing SavedModel.

    python train_unet.py --train_database train-x.lmdb --test_database test-x.lmdb --output_dir runs/x \\
        --batch_size 4 --number_classes 2 --learning_rate 1e-4 --test_every_n_steps 1000

Schedule (as in the original toolkit): warm-up at learning_rate/10 for min(1000, test_every_n_steps)
steps, then learning_rate (Adam; --lr_schedule cosine instead decays it to a hundredth along a
half cosine from the end of warm-up to --max_steps); every test_every_n_steps a full test pass
(each record once) of the moving average of the weights (--ema_decay; 0 = the raw weights, as the
original): loss, pixel accuracy, per-class IoU and Dice; early stopping after
--early_stopping test passes without an improvement of the test loss by more than 1e-4; also stops
at --max_steps.

Outputs in --output_dir: config.json (every resolved setting), metrics.csv (one row per test pass),
logs/ (TensorBoard: train/ and test/ scalars, test images with prediction overlays),
checkpoints/ (latest and best, switched atomically by checkpoints/checkpoint.json), saved_model/
(best weights; serving_default: "images" float32 NHWC -> "probabilities" float32 NHWC, plus
assets/segmentation_metadata.json, see segkit/model_metadata.py).

Resume: rerun the same command. A checkpoint in --output_dir whose run-defining settings equal the
new ones is continued from its step with its best-loss history; different settings are refused
(exit 2) with the differing fields named. --resume 1 additionally requires a checkpoint to exist.

Distribution: MirroredStrategy over all visible GPUs (one replica on CPU); global batch = batch_size x
replicas; reader processes = reader_count x replicas. With TF_CONFIG set, or a Slurm allocation of
several nodes, MultiWorkerMirroredStrategy (TensorFlow's cluster resolvers); every worker reads its
own shard of the sample stream; only the chief writes outputs.

Exit codes: 0 done, 1 a reader process failed, 2 bad input (one line on stderr, nothing written), 3 the loss became NaN/Inf
(the last good checkpoint is kept), 130 interrupted (Ctrl-C / SIGTERM: training stops after the step in flight, saves
it as the latest checkpoint on a single machine and shuts the readers down; a second signal stops at once).
TensorFlow is imported only after the arguments and databases have been checked.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from segkit import cliutil
from segkit import image_io
from segkit import lmdb_format
from segkit import metrics
from segkit import model_metadata
import models

log = logging.getLogger("train_unet")
logging.getLogger("absl").setLevel(logging.WARNING)  # per-checkpoint "Sharding callback" chatter

EXIT_DIVERGED = 3
IMPROVEMENT_TOLERANCE = 1e-4
WARMUP_MAX_STEPS = 1000
LOSSES = ("ce", "dice", "ce+dice", "focal")
LR_SCHEDULES = ("constant", "cosine")
COSINE_FINAL_FRACTION = 0.01  # --lr_schedule cosine ends at learning_rate / 100
EMA_DEFAULT_DECAY = 0.999
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0
OVERLAY_IMAGES = 3
# Settings that define a run: a checkpoint is resumed only when all of these are unchanged.
RUN_DEFINING_FIELDS = ("model", "model_config", "channels", "number_classes", "loss", "class_weight_values",
                       "learning_rate", "lr_schedule", "ema_decay", "batch_size", "crop_size", "test_every_n_steps",
                       "balance_classes", "use_augmentation", "mixed_precision", "seed", "train_data", "test_data")
CHECKPOINT_POINTER = "checkpoint.json"


class TrainingDiverged(RuntimeError):
    """The loss (or a gradient) became NaN/Inf."""


# ============================================================================ arguments

def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description="Train a UNet / FC-DenseNet on LMDB databases built by build_lmdb.py; "
                               "export the best model as a SavedModel with its metadata.")
    p.add_argument("--train_database", nargs="+", required=True, help="one or more training databases (*.lmdb)")
    p.add_argument("--test_database", required=True, help="test database (*.lmdb); one full pass per evaluation")
    p.add_argument("--output_dir", required=True, help="checkpoints, logs, metrics.csv, config.json and saved_model/ go here")
    p.add_argument("--batch_size", type=int, default=4, help="samples per replica (GPU); global batch = batch_size x replicas")
    p.add_argument("--number_classes", type=int, default=2, help="classes the model predicts (mask values 0..N-1)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate (warm-up at a tenth of it)")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                   help="after warm-up: 'constant' (the original's) or 'cosine' (decay to a hundredth at --max_steps)")
    p.add_argument("--ema_decay", type=float, default=EMA_DEFAULT_DECAY,
                   help="test, keep and export an exponential moving average of the weights with this decay "
                        "(ramped up as min(decay, (1+step)/(10+step))); 0 = the raw weights, as the original")
    p.add_argument("--test_every_n_steps", type=int, default=1000, help="steps between test passes (an 'epoch')")
    p.add_argument("--balance_classes", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="1 = sample a class uniformly, then a record containing it")
    p.add_argument("--use_augmentation", type=cliutil.str2bool, default=True, metavar="0/1", help="augment training samples")
    p.add_argument("--early_stopping", type=int, default=10,
                   help="stop after this many test passes without test-loss improvement (> 1e-4); 0 = never")
    p.add_argument("--reader_count", type=int, default=1, help="reader processes per replica")
    p.add_argument("--model", choices=models.MODEL_NAMES, default=models.DEFAULT_MODEL, help="architecture")
    p.add_argument("--depth", type=int, default=None, help=f"unet only: poolings (default {models.unet.DEFAULTS['depth']})")
    p.add_argument("--base_filters", type=int, default=None,
                   help=f"unet only: filters of the first level (default {models.unet.DEFAULTS['base_filters']})")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the model's, unet 0, fcdensenet 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights initialization and of the sample stream")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (default: early stopping only)")
    p.add_argument("--mixed_precision", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="mixed_float16 on GPUs (ignored with a notice on CPU)")
    p.add_argument("--loss", choices=LOSSES, default="ce", help="cross-entropy, soft Dice, both, or focal (gamma 2)")
    p.add_argument("--class_weights", default="none",
                   help="'none', 'auto' (inverse class frequency of the training databases) or w0,w1,...")
    p.add_argument("--crop_size", type=int, default=None,
                   help="training crop edge, a multiple of the model's size factor (default: the records' tile size)")
    p.add_argument("--resume", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="require a checkpoint to continue (a matching one is continued automatically anyway)")
    p.add_argument("--verbose", type=cliutil.str2bool, default=False, metavar="0/1", help="debug logging")
    return p


# ============================================================================ validation (no TensorFlow)

def _read_database(path: str) -> dict[str, Any]:
    try:
        return lmdb_format.read_metadata(path)
    except ValueError as exc:
        raise cliutil.InputError(str(exc)) from None
    except OSError as exc:
        raise cliutil.InputError(f"{path}: cannot read the database ({exc}); check the path and permissions") from None


def _fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a database's content independent of where it lies (copies to node-local disk resume)."""
    return {"num_records": meta["num_records"], "channels": meta["channels"], "tile_size": meta.get("tile_size"),
            "class_pixel_counts": {str(c): n for c, n in sorted(meta["class_pixel_counts"].items())}}


def parse_class_weights(text: str, number_classes: int, class_pixel_counts: dict[int, int]) -> list[float]:
    """'none' -> ones; 'auto' -> total / (classes present x count_c), pixel-weighted mean 1; or explicit list."""
    text = text.strip().lower()
    if text == "none":
        return [1.0] * number_classes
    if text == "auto":
        present = {c: n for c, n in class_pixel_counts.items() if n > 0 and c < number_classes}
        total = sum(present.values())
        return [total / (len(present) * present[c]) if c in present else 1.0 for c in range(number_classes)]
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        raise cliutil.InputError(f"--class_weights {text!r}: expected 'none', 'auto' or {number_classes} numbers like 1,5") from None
    if len(weights) != number_classes or min(weights) < 0 or max(weights) <= 0 or not all(map(math.isfinite, weights)):
        raise cliutil.InputError(f"--class_weights {text!r}: need {number_classes} non-negative numbers (one per class, "
                                 "not all zero), e.g. " + ",".join(["1"] * number_classes))
    return weights


def _check_numbers(args) -> None:
    checks = [(args.batch_size >= 1, "--batch_size must be >= 1"),
              (args.number_classes >= 2, "--number_classes must be >= 2"),
              (args.learning_rate > 0 and math.isfinite(args.learning_rate), "--learning_rate must be a positive number"),
              (0.0 <= args.ema_decay < 1.0, "--ema_decay must be in [0, 1) (0 = no moving average)"),
              (args.test_every_n_steps >= 1, "--test_every_n_steps must be >= 1"),
              (args.early_stopping >= 0, "--early_stopping must be >= 0 (0 = never stop early)"),
              (args.reader_count >= 1, "--reader_count must be >= 1"),
              (args.max_steps is None or args.max_steps >= 1, "--max_steps must be >= 1"),
              (args.lr_schedule != "cosine" or args.max_steps is not None,
               "--lr_schedule cosine decays to --max_steps; pass --max_steps N")]
    for ok, message in checks:
        if not ok:
            raise cliutil.InputError(message)


def _model_settings(args) -> tuple[dict[str, Any], int]:
    overrides = {"dropout": args.dropout}
    if args.model == "unet":
        overrides.update(depth=args.depth, base_filters=args.base_filters)
    elif args.depth is not None or args.base_filters is not None:
        raise cliutil.InputError(f"--depth and --base_filters apply to --model unet only, not {args.model}")
    try:
        config = models.model_config(args.model, **overrides)
    except ValueError as exc:
        raise cliutil.InputError(f"--model {args.model}: {exc}") from None
    return config, models.size_factor(args.model, **config)


def _check_databases(train_meta: list[dict], test_meta: dict, args) -> int:
    """Channels equal everywhere, classes seen within --number_classes; returns the channel count."""
    real = [os.path.realpath(p) for p in args.train_database]
    for path in args.train_database:
        if real.count(os.path.realpath(path)) > 1:
            raise cliutil.InputError(f"--train_database lists {path} more than once; pass each database once")
    named = list(zip(args.train_database, train_meta)) + [(args.test_database, test_meta)]
    channels = {m["channels"] for _, m in named}
    if len(channels) > 1:
        listing = ", ".join(f"{p}: {m['channels']}" for p, m in named)
        raise cliutil.InputError(f"the databases have different channel counts ({listing}); train and test on images with the same channels")
    for path, meta in named:
        seen = meta.get("classes_seen") or [c for c, n in meta["class_pixel_counts"].items() if n > 0]
        if seen and max(seen) >= args.number_classes:
            raise cliutil.InputError(f"{path}: masks contain class {max(seen)} but --number_classes is {args.number_classes}; "
                                     f"pass --number_classes {max(seen) + 1} (or remap the masks with build_lmdb.py --mask_map)")
    return channels.pop()


def _resolve_crop(args, size_factor: int) -> list[int]:
    """Let the reader (without starting it) resolve the crop and check both databases' records."""
    from imagereader import ImageReader

    try:
        train = ImageReader(args.train_database, batch_size=args.batch_size, crop_size=args.crop_size,
                            size_factor=size_factor, sampling="balanced" if args.balance_classes else "shuffle")
        ImageReader(args.test_database, batch_size=args.batch_size, mode="eval", size_factor=size_factor).close()
    except ValueError as exc:
        raise cliutil.InputError(str(exc)) from None
    train.close()
    return list(train.crop_hw)


def resolve_config(args) -> dict[str, Any]:
    """Check every argument and database; return the JSON-able run configuration. Raises InputError."""
    _check_numbers(args)
    train_meta = [_read_database(p) for p in args.train_database]
    test_meta = _read_database(args.test_database)
    model_config, size_factor = _model_settings(args)
    channels = _check_databases(train_meta, test_meta, args)
    counts: dict[int, int] = {}
    for meta in train_meta:
        for c, n in meta["class_pixel_counts"].items():
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    config = {
        "model": args.model, "model_config": model_config, "size_factor": size_factor,
        "channels": channels, "number_classes": args.number_classes,
        "image_dtype": train_meta[0]["image_dtype"],
        "train_database": [os.path.abspath(p) for p in args.train_database],
        "test_database": os.path.abspath(args.test_database), "output_dir": os.path.abspath(args.output_dir),
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "lr_schedule": args.lr_schedule,
        "ema_decay": args.ema_decay,
        "test_every_n_steps": args.test_every_n_steps,
        "warmup_steps": min(WARMUP_MAX_STEPS, args.test_every_n_steps),
        "balance_classes": bool(args.balance_classes), "use_augmentation": bool(args.use_augmentation),
        "early_stopping": args.early_stopping, "reader_count": args.reader_count, "seed": args.seed,
        "max_steps": args.max_steps, "mixed_precision": bool(args.mixed_precision), "loss": args.loss,
        "class_weights": args.class_weights,
        "class_weight_values": parse_class_weights(args.class_weights, args.number_classes, counts),
        "crop_size": _resolve_crop(args, size_factor),
        "train_data": [_fingerprint(m) for m in train_meta], "test_data": _fingerprint(test_meta),
        "mask_map": _training_mask_map(train_meta),
    }
    _check_output_dir(config["output_dir"])
    return config


def _training_mask_map(train_meta: list[dict]) -> dict[str, int] | None:
    """The mask value -> class map the training databases were built with (``build_lmdb.py --mask_map``),
    JSON-style ({"255": 1}; {} = none); None when the databases disagree. Exported with the model, so
    inference scores ground truth in the same encoding without being told."""
    maps = [(meta.get("build") or {}).get("mask_map") or {} for meta in train_meta]
    return maps[0] if all(m == maps[0] for m in maps) else None


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise cliutil.InputError(f"--output_dir {path} is a file; pass a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise cliutil.InputError(f"--output_dir {path}: {parent} is not writable; choose another folder")


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


def check_resume(config: dict[str, Any], require: bool) -> bool:
    """True when output_dir holds a checkpoint of this configuration; InputError when it is another's."""
    output_dir = config["output_dir"]
    if read_pointer(output_dir) is None:
        if require:
            raise cliutil.InputError(f"--resume 1: {output_dir} holds no checkpoint to continue; drop --resume to start a new run")
        return False
    config_path = os.path.join(output_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, json.JSONDecodeError):
        raise cliutil.InputError(f"{output_dir} holds a checkpoint but no readable config.json; "
                                 "use a new --output_dir") from None
    fields = RUN_DEFINING_FIELDS + (("max_steps",) if config["lr_schedule"] == "cosine" else ())
    saved.setdefault("lr_schedule", "constant")  # config.json written before these options existed
    saved.setdefault("ema_decay", 0.0)
    differing = [k for k in fields if saved.get(k) != config.get(k)]
    if differing:
        details = "; ".join(_difference(k, saved.get(k), config.get(k)) for k in differing)
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


# ============================================================================ run state, checkpoints, CSV

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
        return json.dumps(asdict(self), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        data = json.loads(text)
        data["best_loss"] = float(data["best_loss"])
        return cls(**data)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


def stop_reason(state: RunState, config: dict[str, Any]) -> str | None:
    if config["max_steps"] is not None and state.step >= config["max_steps"]:
        return f"reached --max_steps {config['max_steps']}"
    if config["early_stopping"] and state.evals_without_improvement >= config["early_stopping"]:
        return (f"early stopping: no test-loss improvement in {state.evals_without_improvement} test passes "
                f"(best {state.best_loss:.5f} at step {state.best_step})")
    return None


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


# ============================================================================ TensorFlow parts

def make_strategy():
    """(strategy, worker_index, worker_count, is_chief); MultiWorker when TF_CONFIG / multi-node Slurm."""
    import tensorflow as tf

    resolver = None
    if os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    elif int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1) > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    if resolver is None or len(_workers(resolver)) <= 1:
        strategy = tf.distribute.MirroredStrategy()
        return strategy, 0, 1, True
    workers = _workers(resolver)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    me = f"{resolver.task_type}:{resolver.task_id}"
    index = workers.index(me)
    return strategy, index, len(workers), index == 0


def _workers(resolver) -> list[str]:
    """'chief:0' first, then 'worker:i' in order (TensorFlow's chief convention)."""
    spec = resolver.cluster_spec().as_dict()
    names = [f"chief:{i}" for i in range(len(spec.get("chief", [])))]
    return names + [f"worker:{i}" for i in range(len(spec.get("worker", [])))]


def set_precision(requested: bool) -> bool:
    """mixed_float16 when requested and a GPU is visible; returns whether it is active."""
    import keras
    import tensorflow as tf

    if requested and not tf.config.list_physical_devices("GPU"):
        log.info("--mixed_precision 1 is ignored on CPU (no GPU visible); training in float32")
        requested = False
    keras.mixed_precision.set_global_policy("mixed_float16" if requested else "float32")
    return requested


def batch_statistics(labels, logits, loss: str, class_weights, number_classes: int) -> dict:
    """Sums over the batch from which :func:`loss_from_statistics` computes the loss (sum across replicas/batches)."""
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    stats = {"pixels": tf.cast(tf.size(labels), tf.float32)}
    if loss in ("ce", "ce+dice", "focal"):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        weight = tf.gather(class_weights, labels)
        if loss == "focal":
            ce = (1.0 - tf.exp(-ce)) ** FOCAL_GAMMA * ce
        stats["ce_sum"] = tf.reduce_sum(weight * ce)
    if loss in ("dice", "ce+dice"):
        probs = tf.nn.softmax(logits, axis=-1)
        truth = tf.one_hot(labels, number_classes, dtype=tf.float32)
        axes = tf.range(tf.rank(truth) - 1)
        stats["intersection"] = tf.reduce_sum(probs * truth, axis=axes)
        stats["prob_sum"] = tf.reduce_sum(probs, axis=axes)
        stats["true_sum"] = tf.reduce_sum(truth, axis=axes)
    return stats


def loss_from_statistics(stats: dict, loss: str, class_weights):
    """Weighted mean cross-entropy (or focal) per pixel, plus 1 - weighted mean soft Dice over classes."""
    import tensorflow as tf

    total = tf.constant(0.0)
    if "ce_sum" in stats:
        total += stats["ce_sum"] / tf.maximum(stats["pixels"], 1.0)
    if loss in ("dice", "ce+dice"):
        dice = (2.0 * stats["intersection"] + DICE_SMOOTH) / (stats["prob_sum"] + stats["true_sum"] + DICE_SMOOTH)
        total += 1.0 - tf.reduce_sum(class_weights * dice) / tf.reduce_sum(class_weights)
    return total


def learning_rate_at(step: int, config: dict[str, Any]) -> float:
    """LR for the update that makes step ``step + 1``: a tenth during warm-up, then constant or cosine decay."""
    lr, warmup = config["learning_rate"], config["warmup_steps"]
    if step < warmup:
        return lr / 10.0
    if config["lr_schedule"] == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, config["max_steps"] - warmup))
    return lr * (COSINE_FINAL_FRACTION + (1.0 - COSINE_FINAL_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Trainer:
    """Model, optimizer and the distributed train / eval steps."""

    def __init__(self, config: dict[str, Any], strategy, mixed: bool):
        import keras
        import tensorflow as tf

        self.config, self.strategy, self.mixed = config, strategy, mixed
        self.replicas = strategy.num_replicas_in_sync
        self.K = config["number_classes"]
        with strategy.scope():
            keras.utils.set_random_seed(config["seed"])
            self.model = models.build_model(config["model"], config["channels"], self.K, **config["model_config"])
            optimizer = keras.optimizers.Adam(learning_rate=config["learning_rate"])
            self.optimizer = keras.optimizers.LossScaleOptimizer(optimizer) if mixed else optimizer
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.ema_model = self._build_ema_model() if evaluated_weights(config) == "ema_model" else None
        # Test passes, the 'best' choice, overlays and the export all use the averaged weights when there are some.
        self.eval_model = self.ema_model or self.model
        self.class_weights = tf.constant(config["class_weight_values"], tf.float32)
        tracked = {"ema_model": self.ema_model} if self.ema_model is not None else {}
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step, **tracked)
        # autograph=False: the steps have no tensor-dependent Python control flow, and autograph would
        # re-read this file's source when it first traces (e.g. at the first test pass, hours in).
        self.train_step = tf.function(self._train_step, autograph=False)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True, autograph=False)
        self.predict = tf.function(lambda images: tf.argmax(self.eval_model(images, training=False), axis=-1,
                                                            output_type=tf.int32), reduce_retracing=True,
                                   autograph=False)

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate = value

    def _build_ema_model(self):
        """A second model of the same architecture holding the moving average of every weight (BatchNorm
        statistics included), starting from the initial weights."""
        config = self.config
        ema = models.build_model(config["model"], config["channels"], self.K, **config["model_config"])
        if [w.shape for w in ema.weights] != [w.shape for w in self.model.weights]:
            raise RuntimeError("the moving-average model's weights do not line up with the model's")
        for average, weight in zip(ema.weights, self.model.weights):
            average.assign(weight)
        return ema

    def _update_ema(self) -> None:
        """average <- d * average + (1 - d) * weight on every replica, d = min(decay, (1 + t) / (10 + t)) with
        t the steps done before this one (TensorFlow's ExponentialMovingAverage num_updates ramp)."""
        import tensorflow as tf

        t = tf.cast(self.step, tf.float32)
        decay = tf.minimum(tf.constant(self.config["ema_decay"], tf.float32), (1.0 + t) / (10.0 + t))

        def update(average, weight):
            return average.assign(decay * average + (1.0 - decay) * tf.cast(weight, average.dtype))

        for average, weight in zip(self.ema_model.weights, self.model.weights):
            self.strategy.extended.update(average.value, update, args=(weight.value,), group=False)

    def _replica_train(self, images, labels):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            stats = batch_statistics(labels, logits, self.config["loss"], self.class_weights, self.K)
            data_loss = loss_from_statistics(stats, self.config["loss"], self.class_weights)
            regularization = tf.add_n(self.model.losses) if self.model.losses else tf.constant(0.0)
            scaled = (data_loss + tf.cast(regularization, tf.float32)) / self.replicas
            if self.mixed:
                scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        grad_norm = tf.linalg.global_norm(grads)
        self.optimizer.apply(grads, self.model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        finite_grads = tf.constant(1.0) if self.mixed else tf.cast(tf.math.is_finite(grad_norm), tf.float32)
        return {"loss": data_loss / self.replicas, "correct": correct, "pixels": stats["pixels"],
                "finite_grads": finite_grads / self.replicas}

    def _train_step(self, batch):
        import tensorflow as tf

        images, labels = batch
        out = self.strategy.run(self._replica_train, args=(images, labels))
        if self.ema_model is not None:
            self._update_ema()
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    def _replica_eval(self, images, labels):
        """Statistics of one batch; zeros for the empty batch a replica gets when a pass ends unevenly."""
        import tensorflow as tf

        def compute():
            logits = self.eval_model(images, training=False)
            stats = batch_statistics(labels, logits, self.config["loss"], self.class_weights, self.K)
            pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
            stats["confusion"] = tf.cast(tf.math.confusion_matrix(tf.reshape(labels, [-1]), tf.reshape(pred, [-1]),
                                                                  num_classes=self.K, dtype=tf.int32), tf.float64)
            return stats

        def empty():  # the model's kernels reject a batch of 0 images
            shapes = {"pixels": [], "ce_sum": [], "intersection": [self.K], "prob_sum": [self.K], "true_sum": [self.K]}
            zeros = {k: tf.zeros(shape) for k, shape in shapes.items() if k in template}
            return dict(zeros, confusion=tf.zeros([self.K, self.K], tf.float64))

        template = batch_statistics(tf.zeros([1, 1, 1], tf.int32), tf.zeros([1, 1, 1, self.K]), self.config["loss"],
                                    self.class_weights, self.K)
        return tf.cond(tf.shape(images)[0] > 0, compute, empty)

    def _eval_step(self, batch):
        import tensorflow as tf

        images, labels = batch
        out = self.strategy.run(self._replica_eval, args=(images, labels))
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    def evaluate(self, dataset) -> tuple[float, dict[str, Any], tuple | None]:
        """One full pass: (test loss, metrics.scores of the confusion matrix, first local batch for overlays)."""
        import tensorflow as tf

        totals: dict[str, np.ndarray] = {}
        first = None
        for batch in dataset:
            if first is None:
                first = tuple(self.strategy.experimental_local_results(t)[0] for t in batch)
            for k, v in self.eval_step(batch).items():
                totals[k] = totals.get(k, 0) + v.numpy().astype(np.float64)
        if not totals:
            raise RuntimeError("the test pass produced no batches")
        cm = totals.pop("confusion").round().astype(np.int64)
        loss = float(loss_from_statistics({k: tf.constant(v, tf.float32) for k, v in totals.items()},
                                          self.config["loss"], self.class_weights))
        return loss, dict(metrics.scores(cm), pixels=int(cm.sum())), first


def make_readers(config: dict[str, Any], replicas: int, worker_index: int, worker_count: int, start_step: int,
                 reader_factory=None):
    """Train reader (reader_count x this machine's replicas processes, own shard) and eval reader."""
    from imagereader import ImageReader

    factory = reader_factory or ImageReader
    seed = config["seed"] if start_step == 0 else int(np.random.SeedSequence([config["seed"], start_step]).generate_state(1)[0])
    train = factory(config["train_database"], batch_size=config["batch_size"], mode="train",
                    workers=config["reader_count"] * replicas,
                    sampling="balanced" if config["balance_classes"] else "shuffle",
                    augment=config["use_augmentation"], crop_size=tuple(config["crop_size"]),
                    size_factor=config["size_factor"], seed=seed, shard_index=worker_index, shard_count=worker_count)
    try:
        test = factory(config["test_database"], batch_size=config["batch_size"], mode="eval",
                       workers=config["reader_count"], size_factor=config["size_factor"],
                       shard_index=worker_index, shard_count=worker_count)
    except BaseException:
        train.close()
        raise
    return train, test


def distribute(strategy, reader):
    """The reader's tf.data pipeline, one batch per replica per step (sharding is done by the reader)."""
    import tensorflow as tf

    def dataset_fn(_context):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return reader.dataset().with_options(options).prefetch(2)

    return strategy.distribute_datasets_from_function(dataset_fn)


# ============================================================================ TensorBoard

def _plugin_metadata(plugin: str, content: bytes = b""):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=content))


def summary_scalar(name: str, value: float) -> None:
    """tf.summary.scalar without the tensorboard package (same event format; step from the writer)."""
    import tensorflow as tf

    tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=_plugin_metadata("scalars"))


def summary_images(name: str, images_nhw3: np.ndarray) -> None:
    """tf.summary.image without the tensorboard package: [width, height, png, png, ...] strings."""
    import tensorflow as tf

    height, width = images_nhw3.shape[1:3]
    pngs = [tf.io.encode_png(image) for image in images_nhw3]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height))] + pngs)
    # ImagePluginData{max_images_per_step: n} as a protobuf: field 2, varint
    tf.summary.write(name, tensor, metadata=_plugin_metadata("images", bytes([0x10, len(pngs)])))


def overlay_panels(images_nhwc: np.ndarray, truth_nhw: np.ndarray, pred_nhw: np.ndarray) -> np.ndarray:
    """uint8 NHW3 panels [image | truth overlay | prediction overlay]; class 0 is left uncoloured."""
    image = images_nhwc[..., :3] if images_nhwc.shape[-1] >= 3 else np.repeat(images_nhwc[..., :1], 3, axis=-1)
    lo = image.min(axis=(1, 2, 3), keepdims=True)
    hi = image.max(axis=(1, 2, 3), keepdims=True)
    gray = (image - lo) / np.maximum(hi - lo, 1e-6) * 255.0
    panels = [gray, image_io.tint(gray, truth_nhw), image_io.tint(gray, pred_nhw)]
    return np.concatenate(panels, axis=2).clip(0, 255).astype(np.uint8)


# ============================================================================ export

def evaluated_weights(config: dict[str, Any]) -> str:
    """The checkpoint name of the weights that are tested, chosen as best and exported: the moving
    average (``ema_model``) when the run keeps one, else the trained ``model`` itself."""
    return "ema_model" if config["ema_decay"] > 0 else "model"


def export_saved_model(config: dict[str, Any], weights_prefix: str, output_dir: str, final_metrics: dict[str, Any]) -> str:
    """Export the weights at ``weights_prefix`` as saved_model/ (float32, serving_default + metadata asset)."""
    import keras
    import tensorflow as tf

    from models.receptive_field import effective_receptive_field

    keras.mixed_precision.set_global_policy("float32")
    model = models.build_model(config["model"], config["channels"], config["number_classes"], **config["model_config"])
    tracked = {evaluated_weights(config): model}
    status = tf.train.Checkpoint(**tracked).read(weights_prefix)
    status.assert_existing_objects_matched()  # never export initial weights because a name did not match
    status.expect_partial()  # the optimizer and the other model stay in the checkpoint
    radius = models.receptive_field_radius(config["model"], **config["model_config"])
    # Probe no larger than one training batch's pixels: export then needs no more memory than training.
    probe = int(math.sqrt(config["batch_size"] * config["crop_size"][0] * config["crop_size"][1]))
    erf = effective_receptive_field(model, size_factor=config["size_factor"], theoretical_radius=radius,
                                    max_probe=max(probe, 2 * config["size_factor"]))
    meta = model_metadata.make_metadata(
        model=config["model"], model_config=config["model_config"], channels=config["channels"],
        number_classes=config["number_classes"], image_dtype=config["image_dtype"],
        normalization={"method": image_io.NORMALIZATION_METHOD, "epsilon": image_io.NORMALIZATION_EPSILON},
        size_factor=config["size_factor"], receptive_field_radius=radius,
        effective_receptive_field_radius=erf["radius_rounded"], effective_receptive_field=erf,
        training_tile_size=list(config["crop_size"]), final_metrics=final_metrics, mask_map=config.get("mask_map"),
        training={k: config[k] for k in ("loss", "class_weight_values", "learning_rate", "lr_schedule", "ema_decay",
                                         "batch_size", "seed")})
    final = os.path.join(output_dir, "saved_model")
    staging = cliutil.make_temp(os.path.join(output_dir, "saved_model"), directory=True)
    try:
        asset_dir = os.path.join(staging, "asset_source")
        os.makedirs(asset_dir)
        with open(os.path.join(asset_dir, model_metadata.METADATA_FILENAME), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, default=_json_default)
        module = _serving_module(model, config["channels"], os.path.join(asset_dir, model_metadata.METADATA_FILENAME))
        tf.saved_model.save(module, os.path.join(staging, "saved_model"), signatures={"serving_default": module.serve})
        _swap_in(os.path.join(staging, "saved_model"), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (theoretical radius %d px, effective %d px)", final, radius, erf["radius_rounded"])
    return final


def _serving_module(model, channels: int, metadata_file: str):
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    module.metadata = tf.saved_model.Asset(metadata_file)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="images")],
                 autograph=False)
    def serve(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    module.serve = serve
    return module


def _swap_in(new_dir: str, final: str) -> None:
    """Replace folder ``final`` by ``new_dir``; at every moment one complete version exists on disk."""
    old = None
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
    os.rename(new_dir, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ============================================================================ the training loop

@dataclass
class Outcome:
    step: int
    stopped: str
    best_loss: float
    best_step: int
    saved_model: str | None
    history: list[dict[str, Any]]


class _Run:
    """One training run: wires trainer, readers, checkpoints, logs; :meth:`loop` does the steps."""

    def __init__(self, config, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory):
        import tensorflow as tf

        self.config, self.strategy, self.is_chief = config, strategy, is_chief
        out = config["output_dir"]
        self.trainer = Trainer(config, strategy, mixed)
        self.store = CheckpointStore(out, is_chief)
        self.state = RunState()
        if resume:
            self._restore(CheckpointStore(out, True))
        self.csv = MetricsCsv(os.path.join(out, "metrics.csv"), self.state.step if resume else None, is_chief)
        if is_chief:
            self.train_writer = tf.summary.create_file_writer(os.path.join(out, "logs", "train"))
            self.test_writer = tf.summary.create_file_writer(os.path.join(out, "logs", "test"))
        else:
            self.train_writer = self.test_writer = tf.summary.create_noop_writer()
        try:
            local_replicas = len(strategy.extended.worker_devices)  # this machine's share of the replicas
            self.readers = make_readers(config, local_replicas, worker_index, worker_count,
                                        self.state.step, reader_factory)
        except ValueError as exc:  # e.g. fewer test batches than workers
            raise cliutil.InputError(str(exc)) from None

    def _restore(self, chief_store: CheckpointStore) -> None:
        pointer = chief_store.pointer()
        self.trainer.checkpoint.read(chief_store.prefix(pointer["latest"])).assert_existing_objects_matched()
        self.state = chief_store.load_state(pointer["latest"])
        log.info("resuming from step %d (best test loss %.5f at step %d, %d test passes so far)",
                 self.state.step, self.state.best_loss, self.state.best_step, len(self.state.history))

    def close(self) -> None:
        for reader in getattr(self, "readers", ()):
            reader.close()
        for writer in (getattr(self, "train_writer", None), getattr(self, "test_writer", None)):
            if writer is not None:
                writer.flush()
        if not self.is_chief:
            shutil.rmtree(self.store.folder, ignore_errors=True)

    def release(self) -> None:
        """Drop the input pipelines so the closed readers (and their semaphores) are freed now, not at exit."""
        self.readers = ()
        self.test_data = None
        gc.collect()

    # ---- steps
    def loop(self, stop: "StopRequest | None" = None) -> str:
        """Train until a stop reason (or until ``stop`` is requested: checked between steps)."""
        self.started = time.perf_counter()
        train_reader, test_reader = self.readers
        self.test_data = distribute(self.strategy, test_reader)
        iterator = iter(distribute(self.strategy, train_reader))
        meter = _Meter(train_reader)
        lr = None
        while (reason := stop_reason(self.state, self.config)) is None:
            if stop is not None and stop.signal_name:
                return f"interrupted by {stop.signal_name}"
            if learning_rate_at(self.state.step, self.config) != lr:
                lr = learning_rate_at(self.state.step, self.config)
                self.trainer.set_learning_rate(lr)
            asked = time.perf_counter()
            batch = next(iterator)
            started = time.perf_counter()
            out = {k: float(v) for k, v in self.trainer.train_step(batch).items()}
            meter.add(out, started - asked, time.perf_counter() - started)
            self._check_finite(out)
            self.state.step += 1
            self.trainer.step.assign(self.state.step)
            if self.state.step % min(100, self.config["test_every_n_steps"]) == 0:
                self._log_train(meter, lr)
            if self.state.step % self.config["test_every_n_steps"] == 0 or self._last_step():
                self._test_pass(meter)
        return reason

    def save_interrupted(self, signal_name: str) -> None:
        """Ctrl-C / SIGTERM (pre-emption): keep the steps since the last test pass as the 'latest' checkpoint,
        so a resubmitted job loses nothing finished, not up to --test_every_n_steps. It is not a test pass:
        'best', the history and early stopping are unchanged. A second signal aborts it (the write is
        atomic; the previous checkpoint stays). Single worker only: under the multi-worker strategy a save
        is a collective step the other workers may never reach."""
        if self.config["workers"] > 1 or not self.is_chief or self.state.step == 0:
            return
        if (self.store.pointer() or {}).get("step") == self.state.step:
            return  # saved by the test pass of this very step
        self.trainer.step.assign(self.state.step)
        started = time.perf_counter()
        self.store.save(self.trainer.checkpoint, self.state, best=False)
        log.info("%s: saved the checkpoint of step %d (%.1f s); rerun the same command to continue",
                 signal_name, self.state.step, time.perf_counter() - started)

    def _last_step(self) -> bool:
        return self.config["max_steps"] is not None and self.state.step >= self.config["max_steps"]

    def _check_finite(self, out: dict[str, float]) -> None:
        if not math.isfinite(out["loss"]) or out["finite_grads"] < 0.999:
            what = "loss" if not math.isfinite(out["loss"]) else "gradient"
            raise TrainingDiverged(
                f"the training {what} became NaN/Inf at step {self.state.step + 1}; stopped without saving. "
                f"The last good checkpoint (step {self._last_saved_step()}) is kept in {self.store.folder}; "
                "lower --learning_rate, try --loss ce, or check the databases for NaN/Inf pixels")

    def _last_saved_step(self) -> str:
        pointer = self.store.pointer()
        return str(pointer["step"]) if pointer else "none yet"

    def _log_train(self, meter: "_Meter", lr: float) -> None:
        summary = meter.flush()
        with self.train_writer.as_default(step=self.state.step):
            summary_scalar("loss", summary["loss"])
            summary_scalar("pixel_accuracy", summary["accuracy"])
            summary_scalar("learning_rate", lr)
            summary_scalar("seconds_per_step", summary["step_seconds"])
            summary_scalar("input_fetch_seconds", summary["fetch_seconds"])
            summary_scalar("reader_starved_fraction", summary["starved_fraction"])
        log.info("step %d  loss %.4f  acc %.4f  lr %.2g  %.3f s/step (input %.1f ms)  reader starved on %.0f%% of batches",
                 self.state.step, summary["loss"], summary["accuracy"], lr, summary["step_seconds"],
                 1000 * summary["fetch_seconds"], 100 * summary["starved_fraction"])
        self.last_train_loss = summary["loss"]

    def _test_pass(self, meter: "_Meter") -> None:
        started = time.perf_counter()
        loss, result, first = self.trainer.evaluate(self.test_data)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the test loss became NaN/Inf at step {self.state.step}; stopped without saving. "
                                   f"The last good checkpoint (step {self._last_saved_step()}) is kept; lower --learning_rate")
        improved = self.state.record(self.state.step, loss, result)
        self.store.save(self.trainer.checkpoint, self.state, best=improved)
        row = metrics.flat_row({"step": self.state.step, "train_loss": getattr(self, "last_train_loss", float("nan")),
                                "test_loss": loss, "best": int(improved), "test_pixels": result["pixels"],
                                "elapsed_s": round(time.perf_counter() - self.started, 1)}, result)
        self.csv.append(row)
        self._summaries(loss, result, first)
        log.info("test pass at step %d: loss %.5f%s, pixel accuracy %.4f, IoU %s, Dice %s (%.1f s)",
                 self.state.step, loss, " (best)" if improved else f" (best {self.state.best_loss:.5f})",
                 result["pixel_accuracy"], _fmt(result["iou"]), _fmt(result["dice"]), time.perf_counter() - started)

    def _summaries(self, loss: float, result: dict[str, Any], first) -> None:
        with self.test_writer.as_default(step=self.state.step):
            summary_scalar("loss", loss)
            summary_scalar("pixel_accuracy", result["pixel_accuracy"])
            summary_scalar("mean_iou", result["mean_iou"])
            for c, (iou, dice) in enumerate(zip(result["iou"], result["dice"])):
                if math.isfinite(iou):
                    summary_scalar(f"iou_class_{c}", iou)
                    summary_scalar(f"dice_class_{c}", dice)
            if first is not None and self.is_chief:
                images, labels = (t[:OVERLAY_IMAGES] for t in first)
                pred = self.trainer.predict(images).numpy()
                summary_images("image_truth_prediction", overlay_panels(images.numpy(), labels.numpy(), pred))
        self.test_writer.flush()
        self.train_writer.flush()


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


class _Meter:
    """Running means between train log lines: loss, accuracy, seconds per step, input fetch time, and
    the fraction of the reader's batches that found no batch ready (its ``batches_starved`` counter)."""

    def __init__(self, reader=None):
        self.reader = reader
        self.reset()

    def _reader_counts(self) -> tuple[int, int]:
        return (getattr(self.reader, "batches_delivered", 0), getattr(self.reader, "batches_starved", 0))

    def reset(self):
        self.n = 0
        self.loss = self.correct = self.pixels = self.compute = self.fetch = 0.0
        self.counts = self._reader_counts()

    def add(self, out: dict[str, float], fetch: float, compute: float) -> None:
        self.n += 1
        self.loss += out["loss"]
        self.correct += out["correct"]
        self.pixels += out["pixels"]
        self.compute += compute + fetch
        self.fetch += fetch

    def flush(self) -> dict[str, float]:
        n = max(self.n, 1)
        delivered, starved = (now - before for now, before in zip(self._reader_counts(), self.counts))
        summary = {"loss": self.loss / n, "accuracy": self.correct / max(self.pixels, 1.0),
                   "step_seconds": self.compute / n, "fetch_seconds": self.fetch / n,
                   "starved_fraction": starved / max(delivered, 1)}
        self.reset()
        return summary


class StopRequest:
    """Ctrl-C / SIGTERM during training: the first one asks the loop to stop at the next step boundary
    (then the run saves, closes its readers and exits 130); a second one raises KeyboardInterrupt at once.

    Raising from a signal handler in the middle of a TensorFlow call can leave native state half
    updated (a crash in free() was seen); stopping between steps never does.
    """

    def __init__(self):
        self.signal_name: str | None = None

    def _handle(self, signum, frame):
        if self.signal_name:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after the current step (again to stop at once)", self.signal_name)

    def installed(self):
        """The block in which Ctrl-C / SIGTERM come here (cliutil.signals_handled)."""
        return cliutil.signals_handled(self._handle)


def _check_same_precision(output_dir: str, mixed: bool) -> None:
    """A checkpoint written with mixed precision active holds the loss-scale optimizer's state, one written
    in float32 does not: each restores only with the same precision (InputError otherwise)."""
    try:
        with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as fh:
            was = json.load(fh).get("mixed_precision_active")
    except (OSError, json.JSONDecodeError):
        return  # check_resume has vetted the file; an older one without the field is taken as it comes
    if was is not None and bool(was) != mixed:
        how = lambda active: "mixed float16 (on a GPU)" if active else "float32"  # noqa: E731
        raise cliutil.InputError(
            f"{output_dir}: the checkpoint was trained in {how(was)} and this run would train in {how(mixed)} "
            f"({'no GPU is visible' if was else '--mixed_precision 1 with a GPU visible'}); continue it on "
            f"{'a GPU machine' if was else 'a machine without a GPU, or with CUDA_VISIBLE_DEVICES='}, "
            "or start a new --output_dir")


def train(config: dict[str, Any], *, resume: bool, strategy=None, worker_index: int = 0, worker_count: int = 1,
          is_chief: bool = True, reader_factory=None) -> Outcome:
    """Train (or continue) the run described by ``config`` (see :func:`resolve_config`); export on success.

    ``strategy``: a tf.distribute strategy (default: :func:`make_strategy`). ``reader_factory``:
    ImageReader-compatible class (tests). Raises TrainingDiverged on NaN/Inf.
    """
    if strategy is None:
        strategy, worker_index, worker_count, is_chief = make_strategy()
    mixed = set_precision(config["mixed_precision"])
    config = dict(config, replicas=strategy.num_replicas_in_sync, workers=worker_count,
                  global_batch_size=config["batch_size"] * strategy.num_replicas_in_sync, mixed_precision_active=mixed)
    if resume:
        _check_same_precision(config["output_dir"], mixed)
    if is_chief:
        os.makedirs(config["output_dir"], exist_ok=True)
        cliutil.atomic_write_text(os.path.join(config["output_dir"], "config.json"), json.dumps(config, indent=1))
    log.info("%s on %d replica(s) x %d worker(s), global batch %d, crop %s", config["model"], config["replicas"],
             worker_count, config["global_batch_size"], config["crop_size"])
    run = _Run(config, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory)
    stop = StopRequest()
    try:
        with stop.installed():
            reason = run.loop(stop)
        if stop.signal_name:
            run.save_interrupted(stop.signal_name)
    finally:
        run.close()
    if stop.signal_name:
        raise KeyboardInterrupt  # exit 130 (cliutil.run_cli); nothing is exported
    run.release()
    log.info("stopped at step %d: %s", run.state.step, reason)
    saved = None
    pointer = run.store.pointer() if is_chief else None
    if pointer and pointer.get("best"):
        saved = export_saved_model(config, run.store.prefix(pointer["best"]), config["output_dir"],
                                   run.state.best_metrics)
    return Outcome(run.state.step, reason, run.state.best_loss, run.state.best_step, saved, run.state.history)


# ============================================================================ command line

def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cliutil.setup_logging(args.verbose)
    config = resolve_config(args)
    resume = check_resume(config, require=args.resume)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:  # Ctrl-C / SIGTERM: train() stops between steps, saves, raises KeyboardInterrupt (exit 130 in run_cli)
        outcome = train(config, resume=resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:
        if "ReaderWorkerError" not in f"{type(exc).__name__} {exc}":
            raise
        # tf.data wraps the reader's exception; show its own message and the worker's traceback tail
        text = str(exc)
        print("error: the image reader failed; training stopped (the last checkpoint is kept):\n"
              + text[text.find("ReaderWorkerError"):][:3000], file=sys.stderr)
        return 1
    print(f"done: {outcome.stopped}; best test loss {outcome.best_loss:.5f} at step {outcome.best_step}; "
          f"model: {outcome.saved_model}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run_cli(_run, argv)


if __name__ == "__main__":
    code = main()
    if code == 130:
        # Interrupted inside the input pipeline, TensorFlow's threads can deadlock interpreter shutdown;
        # everything that matters is on disk already (readers closed, checkpoints fsynced).
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
