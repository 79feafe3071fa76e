"""Command-line arguments and databases -> a validated RunConfig, before TensorFlow is imported.

Every check that can fail on user input is here, so a bad flag or database exits 2 with nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from typing import Any

import models
from segkit import cliutil, instance_targets, lmdb_format
from segkit.training import autoconfig
from segkit.training.config import MAX_SIZE, WARMUP_MAX_STEPS, RunConfig, augmentation_constants

log = logging.getLogger(__name__)

# Flags range-checked by their RunConfig field's rule, in this order (messages "--flag must be ...").
CHECKED_FLAGS = ("batch_size", "number_classes", "learning_rate", "ema_decay", "clip_norm", "test_every_n_steps",
                 "early_stopping", "reader_count", "max_steps", "max_minutes", "seed")
# Flags that are no RunConfig field of their own: (rule, text completing "--flag ...").
OTHER_FLAG_RULES = {
    "dropout": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (a rate; 0 = no dropout)"),
    "crop_size": (lambda v: 1 <= v <= MAX_SIZE, f"must be in [1, {MAX_SIZE}] pixels"),
    "depth": (lambda v: 1 <= v <= 16, "must be in [1, 16] (poolings)"),
    "base_filters": (lambda v: 1 <= v <= 4096, "must be in [1, 4096]"),
}
# Flags the toolkit chooses from the data when they are not passed (segkit.training.autoconfig).
SELF_CONFIGURED = ("crop_size", "batch_size", "learning_rate", "test_every_n_steps", "max_steps", "loss", "clip_norm")


def resolve_config(args) -> RunConfig:
    """Check every argument and database; return the run's configuration. Raises InputError."""
    _check_numbers(args)
    train_meta = [_read_database(p) for p in args.train_database]
    test_meta = _read_database(args.test_database)
    args = _choose_model_for_rank(args, train_meta, test_meta)
    args, width_reason = _choose_width(args)
    voxel_size = _voxel_size(args, train_meta)
    model_config, size_factor = _model_settings(args, voxel_size)
    factors = models.size_factors(args.model, **model_config)  # per spatial axis (size_factor: their largest)
    args, classes_reason = _choose_number_classes(args, train_meta, test_meta)
    channels = _check_databases(train_meta, test_meta, args)
    _check_instance_target(args.train_database, train_meta, args.number_classes)
    args, origins = _self_configure(args, train_meta, factors, voxel_size)
    if classes_reason:
        origins = {"number_classes": classes_reason, **origins}
    if width_reason:
        origins = {"base_filters": width_reason, **origins}
    counts: dict[int, int] = {}
    for meta in train_meta:
        for c, n in meta["class_pixel_counts"].items():
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    config = RunConfig(
        model=args.model, model_config=model_config, size_factor=size_factor,
        channels=channels, number_classes=args.number_classes, image_dtype=train_meta[0]["image_dtype"],
        train_database=tuple(os.path.abspath(p) for p in args.train_database),
        test_database=os.path.abspath(args.test_database), output_dir=os.path.abspath(args.output_dir),
        batch_size=args.batch_size, learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay, clip_norm=args.clip_norm, test_every_n_steps=args.test_every_n_steps,
        warmup_steps=getattr(args, "warmup_steps", None) or min(WARMUP_MAX_STEPS, args.test_every_n_steps),
        balance_classes=bool(args.balance_classes), use_augmentation=bool(args.use_augmentation),
        early_stopping=args.early_stopping, reader_count=args.reader_count, seed=args.seed,
        max_steps=args.max_steps, max_minutes=args.max_minutes, origins=origins,
        mixed_precision=bool(args.mixed_precision), loss=args.loss,
        class_weights=args.class_weights,
        class_weight_values=tuple(parse_class_weights(args.class_weights, args.number_classes, counts)),
        crop_size=tuple(_resolve_crop(args, factors)),
        train_data=tuple(_fingerprint(m) for m in train_meta), test_data=_fingerprint(test_meta),
        mask_map=_training_mask_map(train_meta), augmentation=augmentation_constants())
    _check_output_dir(config.output_dir)
    return config


def _self_configure(args, train_meta: list[dict], factors: tuple[int, ...] = (1, 1),
                    voxel_size: list[float] | None = None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Fill the SELF_CONFIGURED flags the user did not pass; log and return why each was chosen."""
    user = {name: getattr(args, name) for name in SELF_CONFIGURED + ("max_minutes",)}
    try:
        data = autoconfig.DataSummary.from_metadata(train_meta, voxel_size)
    except (KeyError, TypeError, ValueError) as exc:
        raise cliutil.InputError(f"{args.train_database[0]}: its metadata do not describe the records ({exc}); "
                                 "rebuild it with build_lmdb.py") from None
    targets = {_instance_target_of(m) for m in train_meta}
    target = targets.pop() if len(targets) == 1 else None
    chosen = autoconfig.choose(user, data, tuple(factors), autoconfig.visible_gpus(), target)
    args = argparse.Namespace(**{**vars(args), **{name: c.value for name, c in chosen.items()}})
    for name, c in chosen.items():  # warmup_steps has no flag of its own: it follows the test interval
        log.info("chose %s%s %s: %s", "--" if name in SELF_CONFIGURED else "", name, _flag_text(c.value), c.reason)
    return args, {name: c.reason for name, c in chosen.items()}


def _choose_width(args) -> tuple[argparse.Namespace, str | None]:
    """``--base_filters`` of a UNet when not passed, from the device (autoconfig.choose_width), with its reason."""
    chosen = autoconfig.choose_width(args.model, args.base_filters, autoconfig.visible_gpus())
    if chosen is None:
        return args, None
    log.info("chose --base_filters %d: %s", chosen.value, chosen.reason)
    return argparse.Namespace(**{**vars(args), "base_filters": chosen.value}), chosen.reason


def _flag_text(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value:g}" if isinstance(value,
        float) else str(value)


def _check_numbers(args) -> None:
    rules = {f.name: f.metadata["rule"] for f in dataclasses.fields(RunConfig)}
    for name in CHECKED_FLAGS:
        value = getattr(args, name)
        if value is not None and not rules[name].test(value):
            raise cliutil.InputError(f"--{name} {rules[name].text}, got {value}")
    for name, (test, text) in OTHER_FLAG_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not test(value):  # NaN fails every comparison
            raise cliutil.InputError(f"--{name} {text}, got {value}")
    if args.lr_schedule == "cosine" and args.max_steps is None and args.max_minutes is None:
        raise cliutil.InputError("--lr_schedule cosine decays to --max_steps or to the end of --max_minutes; "
                                 "pass --max_steps N or --max_minutes M")


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
        raise cliutil.InputError(f"--class_weights {text!r}: expected 'none', 'auto' or {number_classes} numbers "
                                 "like 1,5") from None
    if len(weights) != number_classes or min(weights) < 0 or max(weights) <= 0 or not all(map(math.isfinite, weights)):
        raise cliutil.InputError(f"--class_weights {text!r}: need {number_classes} non-negative numbers (one per class, "
                                 "not all zero), e.g. " + ",".join(["1"] * number_classes))
    return weights


def _model_settings(args, voxel_size: list[float] | None = None) -> tuple[dict[str, Any], int]:
    overrides = {"dropout": args.dropout}
    if args.model in ("unet", "unet3d"):
        overrides.update(depth=args.depth, base_filters=args.base_filters)
    elif args.depth is not None or args.base_filters is not None:
        raise cliutil.InputError(f"--depth and --base_filters apply to --model unet or unet3d only, not {args.model}")
    if args.model == "unet3d":
        overrides["voxel_size"] = voxel_size
    try:
        config = models.model_config(args.model, **overrides)
    except ValueError as exc:
        raise cliutil.InputError(f"--model {args.model}: {exc}") from None
    return config, models.size_factor(args.model, **config)


def _choose_number_classes(args, train_meta: list[dict], test_meta: dict) -> tuple[argparse.Namespace, str | None]:
    """``--number_classes`` when passed; else the training target's classes (instance databases) or one more than
    the largest class id the databases' masks hold (at least 2), with the reason (None when passed)."""
    if args.number_classes is not None:
        return args, None
    targets = {_instance_target_of(m) for m in train_meta} - {None}
    if len(targets) == 1:
        target = targets.pop()
        classes, reason = instance_targets.CLASSES[target], f"the databases store the {target} instance target"
    else:
        seen = [int(c) for m in [*train_meta, test_meta]
                for c in (m.get("classes_seen") or [c for c, n in m["class_pixel_counts"].items() if n > 0])]
        classes = max([1, *seen]) + 1
        reason = f"the largest class id in the databases' masks is {max([0, *seen])}"
    log.info("chose --number_classes %d: %s", classes, reason)
    return argparse.Namespace(**{**vars(args), "number_classes": classes}), reason


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
        raise cliutil.InputError(f"the databases have different channel counts ({listing}); train and test on "
                                 f"images with the same channels")
    for path, meta in named:
        seen = meta.get("classes_seen") or [c for c, n in meta["class_pixel_counts"].items() if n > 0]
        if seen and max(seen) >= args.number_classes:
            raise cliutil.InputError(f"{path}: masks contain class {max(seen)} but --number_classes is {args.number_classes}; "
                                     f"pass --number_classes {max(seen) + 1} (or remap the masks with build_lmdb.py --mask_map)")
    return channels.pop()


def _resolve_crop(args, size_factor: tuple[int, ...]) -> list[int]:
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


def _instance_target_of(meta: dict[str, Any]) -> str | None:
    return (meta.get("instance_target") or {}).get("target") if meta.get("mask_type") == "instances" else None


def _check_instance_target(paths: list[str], train_meta: list[dict], number_classes: int) -> None:
    """Training databases built from instance masks must all store the same target, with the model's classes."""
    targets = {_instance_target_of(m) for m in train_meta}
    if len(targets) > 1:
        listing = ", ".join(f"{p}: {_instance_target_of(m) or 'class masks'}" for p, m in zip(paths, train_meta))
        raise cliutil.InputError(f"the training databases store different targets ({listing}); build them all with "
                                 "the same build_lmdb.py --mask_type / --instance_target")
    target = targets.pop()
    if target is not None and instance_targets.CLASSES[target] != number_classes:
        raise cliutil.InputError(f"the training databases store the {target} instance target of "
                                 f"{instance_targets.CLASSES[target]} classes but --number_classes is {number_classes}; "
                                 f"pass --number_classes {instance_targets.CLASSES[target]}")


def training_instances(config) -> dict[str, Any] | None:
    """The model metadata ``instances`` block of a run trained on instance targets (its training databases'
    ``instance_target``), else None: the default thresholds and a seam halo of the training crop (its largest
    side; volumes: per axis): objects the model saw whole fit in it."""
    metas = [_read_database(p) for p in config.train_database]
    target = _instance_target_of(metas[0]) if metas else None
    if target is None:
        return None
    from segkit.instances import InstanceThresholds

    block = {"target": target, "classes": list(instance_targets.CLASS_NAMES[target]),
             "thresholds": InstanceThresholds().to_dict(),
             "halo_px": [int(n) for n in config.crop_size] if len(config.crop_size) == 3 else int(max(config.crop_size))}
    diameter = _training_object_diameter(metas)
    if diameter is not None:
        block["object_diameter_px"] = diameter
    return block


def _training_object_diameter(metas: list[dict[str, Any]]) -> float | None:
    """The median training object's diameter in pixels, as the 2-D databases record it (build_lmdb.py
    --mask_type instances); several databases: the median of theirs, each weighted by its object count. None
    when no database records it (volumes, or databases built before it was recorded)."""
    found = []
    for meta in metas:
        target = meta.get("instance_target") or {}
        count, diameter = target.get("objects"), target.get("median_object_diameter_px")
        if (isinstance(count, int) and count > 0 and isinstance(diameter, (int, float)) and math.isfinite(diameter)
                and diameter > 0):
            found.append((float(diameter), count))
    if not found:
        return None
    found.sort()
    half, seen = sum(n for _, n in found) / 2, 0
    for diameter, count in found:
        seen += count
        if seen >= half:
            return diameter
    return found[-1][0]


def _training_mask_map(train_meta: list[dict]) -> dict[str, int] | None:
    """The mask value -> class map the training databases were built with (``build_lmdb.py --mask_map``),
    JSON-style ({"255": 1}; {} = none); None when the databases disagree. Exported with the model, so
    inference scores ground truth in the same encoding without being told."""
    maps = [(meta.get("build") or {}).get("mask_map") or {} for meta in train_meta]
    return maps[0] if all(m == maps[0] for m in maps) else None


def _check_output_dir(path: str) -> None:
    """The output folder must be a folder, or creatable: no file or dangling link on the way, writable."""
    cliutil.check_output_folder(path, "--output_dir")


# ---- 2-D or volumes (issue #15): the databases' spatial rank picks the model family ------------------

def _database_rank(path: str, meta: dict[str, Any]) -> int:
    """Spatial axes of a database's records: its metadata's ``spatial_rank``, else its first record's mask."""
    if meta.get("spatial_rank") is not None:
        return int(meta["spatial_rank"])
    try:
        record = lmdb_format.read_record(path, 0)
    except ValueError as exc:
        raise cliutil.InputError(f"{path}: record 0: {exc}; rebuild the database with build_lmdb.py") from None
    if record is None:
        raise cliutil.InputError(f"{path}: the database has no records; rebuild it with build_lmdb.py")
    return record.mask_hw.ndim


def _choose_model_for_rank(args, train_meta: list[dict], test_meta: dict) -> argparse.Namespace:
    """--model defaults to unet (images) or unet3d (volumes); a model of the other rank is refused."""
    paths = list(args.train_database) + [args.test_database]
    ranks = {p: _database_rank(p, m) for p, m in zip(paths, train_meta + [test_meta])}
    if len(set(ranks.values())) > 1:
        listing = ", ".join(f"{p}: {r}-D" for p, r in ranks.items())
        raise cliutil.InputError(f"the databases mix 2-D images and volumes ({listing}); train and test on one kind")
    rank = ranks[paths[0]]
    if args.model is None:
        model = models.DEFAULT_VOLUME_MODEL if rank == 3 else models.DEFAULT_MODEL
        return argparse.Namespace(**{**vars(args), "model": model})
    if models.spatial_rank(args.model) != rank:
        kind, fit = ("volumes", models.VOLUME_MODEL_NAMES) if rank == 3 else ("2-D images", models.MODEL_NAMES)
        raise cliutil.InputError(f"--model {args.model} is a {models.spatial_rank(args.model)}-D model but "
                                 f"{paths[0]} holds {kind}; pass --model {' or '.join(fit)} (or leave --model out)")
    return args


def _voxel_size(args, train_meta: list[dict]) -> list[float] | None:
    """(z, y, x) micrometres of the training volumes (the build stage's ``voxel_size_zyx_um``); InputError when
    missing or when the databases disagree."""
    if models.spatial_rank(args.model) != 3:
        return None
    sizes = {tuple(float(v) for v in _meta_voxel_size(m)) if _meta_voxel_size(m) else None for m in train_meta}
    if len(sizes) > 1:
        listing = ", ".join(f"{p}: {_meta_voxel_size(m)}" for p, m in zip(args.train_database, train_meta))
        raise cliutil.InputError(f"the training databases have different voxel sizes ({listing}); "
                                 "rebuild them with one --voxel_size z,y,x")
    size = sizes.pop()
    if size is None:  # anisotropy is read from the voxel size, never assumed (pooling, kernels, augmentation)
        raise cliutil.InputError(f"{args.train_database[0]}: volume database without a voxel size in its metadata; "
                                 "rebuild it with build_lmdb.py (--voxel_size z,y,x if the files lack it)")
    return list(size)


def _meta_voxel_size(meta: dict[str, Any]):
    """The database's voxel size (z, y, x) in micrometres, as build_lmdb.py records it; None when unknown."""
    return meta.get("voxel_size_zyx_um")
