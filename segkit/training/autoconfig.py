"""Self-configuration: the training settings a user did not pass, chosen from the databases and the machine.

The original toolkit's defaults (learning rate 1e-4, a test pass every 1000 steps, warm-up at a tenth
for the first 1000 steps, no step limit) suit week-long GPU runs; a first run of minutes on a user's own
data needs settings that follow the data, as nnU-Net derives its plans from a dataset fingerprint. Every
rule below reads the database metadata (record shapes, record count) and the machine (GPUs visible or
not); a flag the user passes always wins and keeps the original's meaning. Each choice carries a one-line
reason, written to config.json ("origins") and the log. README.md, "Stage 2", lists the rules. No
TensorFlow here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# Pixels of one training crop, and of one replica's batch, by device kind. CPU: the budget at which the
# default UNet trains at ~0.3 s per step on a 2-core AVX-512 machine and 0.53 s on an AVX2 one, oneDNN on
# (README, "Benchmarks");
# GPU: 4 crops of 512^2 (a 16 GB card holds FC-DenseNet56 at that size).
CROP_PIXELS = {"cpu": 256 * 256, "gpu": 512 * 512}
BATCH_PIXELS = {"cpu": 8 * 256 * 256, "gpu": 4 * 512 * 512}
BATCH_RANGE = (2, 64)
# Volumes (rank 3): voxels of one crop and of one replica's batch. CPU: 32x64x64 crops, two per batch (a depth-4
# unet3d with 8 base filters steps in about a second on 2 cores); GPU: 128^3 crops, two per batch (nnU-Net's
# 3D plans on a 10 GB card are of this size).
CROP_VOXELS = {"cpu": 32 * 64 * 64, "gpu": 128 ** 3}
BATCH_VOXELS = {"cpu": 2 * 32 * 64 * 64, "gpu": 2 * 128 ** 3}
# Filters of the UNets' first level (--base_filters), by spatial rank and device. CPU: 8, because within a time
# budget the step count counts for more than the width (DSB nuclei, a validation split of the training images, 15
# minutes: 16 filters took 1202 steps and scored AP@0.5 0.810, 8 filters 2226 steps and 0.840). GPU: nnU-Net's
# 32 for images; 16 for volumes, the float32 activations of nnU-Net's 32-feature half-precision 3D plan at the
# 128^3 crops above (the UNet's memory grows with the width).
BASE_FILTERS = {2: {"cpu": 8, "gpu": 32}, 3: {"cpu": 8, "gpu": 16}}
WIDTH_MODELS = {"unet": 2, "unet3d": 3}  # the models with a --base_filters, and their spatial rank
LEARNING_RATE = 1e-3           # Adam; the step size the measured recipes used (README quality section)
TEST_EVERY_EPOCHS = 10         # a test pass every 10 passes over the training data (in crops) ...
TEST_EVERY_RANGE = (50, 1000)  # ... within these steps (1000: the original's interval)
AUTO_WARMUP_STEPS = 100        # with a chosen test interval: warm-up at a tenth of the rate for at most this many
                               # steps (the original's min(1000, interval) would hold a long interval at 1e-4)
BUDGET_TEST_PASSES = 20        # without --max_steps or --max_minutes: 20 test intervals ...
MIN_AUTO_STEPS = 2000          # ... and at least this many steps
# cross-entropy + Dice (nnU-Net's default) for every target: the Dice term weighs each class alike whatever its
# pixel share. Decided on validation splits of training data (README, "Quality"): instance targets, whose thin
# boundary class separates touching objects (DSB nuclei); the boundary target (unet3d on a split of the FIB-SEM
# training volume: membrane IoU 0.581 against 0.509 with cross-entropy); class masks (NIST cells on 16 of the 80
# training images: foreground IoU 0.954 against 0.946)
DEFAULT_LOSS = "ce+dice"
# Adam's steps are clipped to this global gradient norm (per replica, of its batch's mean loss). Typical norms of the
# default UNet's gradients are 0.2-1.5 (NIST cells, first 400 steps), so only the spikes are cut. Decided on the NIST
# validation split (16 of the 80 training images; README, "Quality"): seed 0, 10 minutes, foreground IoU 0.966
# against 0.954 without clipping.
CLIP_NORM = 1.0


@dataclass(frozen=True)
class DataSummary:
    """What the rules read from the training databases' metadata."""

    record_shape: tuple[int, ...]  # median spatial shape of a training record (a tile, or a whole image)
    records: int
    voxel_size: tuple[float, ...] | None = None  # volumes: (z, y, x) micrometres, when every database says the same

    @classmethod
    def from_metadata(cls, metas: Sequence[Mapping[str, Any]],
                      voxel_size: Sequence[float] | None = None) -> DataSummary:
        """``voxel_size``: the training volumes' (z, y, x) micrometres, as resolve read and checked them from the
        same metadata (every database the same); None for images."""
        shapes = []
        for meta in metas:
            tile = meta.get("tile_size")
            if tile is not None:
                rank = len(tile) if isinstance(tile, (list, tuple)) else 2
                shape = tuple(int(t) for t in tile) if isinstance(tile, (list, tuple)) else (int(tile),) * rank
                shapes += [shape] * int(meta["num_records"])
            else:
                shapes += [_source_shape(s) for s in meta.get("sources", ())]
        if not shapes:
            raise ValueError("the training databases describe no records")
        median = tuple(int(v) for v in _median_rows(shapes))
        voxel = tuple(float(v) for v in voxel_size) if voxel_size else None
        return cls(record_shape=median, records=sum(int(m["num_records"]) for m in metas),
                   voxel_size=voxel if voxel and len(voxel) == len(median) else None)


def _source_shape(source: Mapping[str, Any]) -> tuple[int, ...]:
    if "shape" in source:
        return tuple(int(v) for v in source["shape"])
    if "depth" in source:  # a volume stored whole (build_lmdb.py records depth, height and width)
        return int(source["depth"]), int(source["height"]), int(source["width"])
    return int(source["height"]), int(source["width"])


def _median_rows(shapes: list[tuple[int, ...]]) -> list[float]:
    rank = min(len(s) for s in shapes)
    columns = [sorted(s[-rank + i] for s in shapes) for i in range(rank)]
    return [c[(len(c) - 1) // 2] for c in columns]  # the lower median: a shape that exists


def visible_gpus(environ: Mapping[str, str] | None = None) -> int:
    """NVIDIA GPUs this process may use, without importing TensorFlow: the driver's device list
    (/proc/driver/nvidia/gpus), limited by CUDA_VISIBLE_DEVICES. 0 when there is no driver."""
    environ = os.environ if environ is None else environ
    try:
        present = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    named = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(present, len(named))


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


def choose(user: Mapping[str, Any], data: DataSummary, size_factor: int, gpus: int,
           instance_target: str | None = None) -> dict[str, Choice]:
    """The settings the user left unset (``user[name] is None``), each with its reason.

    ``user``: the flags as given (None = not passed) for crop_size, batch_size, learning_rate,
    test_every_n_steps, max_steps, max_minutes and loss. ``size_factor``: the model's (crops are multiples).
    ``instance_target``: the training databases' instance target (build_lmdb.py --mask_type instances), or None.
    """
    kind = "gpu" if gpus > 0 else "cpu"
    where = f"{gpus} GPU(s)" if gpus else "a CPU"
    chosen: dict[str, Choice] = {}
    rank = len(data.record_shape)
    factors = tuple(size_factor) if isinstance(size_factor, (tuple, list)) else (int(size_factor),) * rank
    crop = user.get("crop_size")
    if crop is None:
        crop, reason = (_volume_crop(data.record_shape, factors, kind, data.voxel_size) if rank == 3
                        else _image_crop(data, factors, kind))
        chosen["crop_size"] = Choice(crop, f"median training record {'x'.join(map(str, data.record_shape))}, "
                                           f"{reason} on {where}, a multiple of the size factor "
                                           f"{'x'.join(map(str, factors))}")
    crop_pixels = math.prod(crop) if isinstance(crop, (tuple, list)) else int(crop) ** rank
    batch = user.get("batch_size")
    if batch is None:
        budget = (BATCH_VOXELS if rank == 3 else BATCH_PIXELS)[kind]
        batch = int(min(max(round(budget / crop_pixels), BATCH_RANGE[0]), BATCH_RANGE[1]))
        unit = "voxels" if rank == 3 else "pixels"
        chosen["batch_size"] = Choice(batch, f"about {budget // 1024}k {unit} per batch on {where} "
                                             f"({crop_pixels} per crop), within {BATCH_RANGE[0]}-{BATCH_RANGE[1]}")
    if user.get("learning_rate") is None:
        chosen["learning_rate"] = Choice(LEARNING_RATE, "Adam at 1e-3 (the original's 1e-4 suits week-long runs)")
    if "loss" in user and user["loss"] is None:
        why = (f"the {instance_target} instance target: its thin boundary class separates touching objects, and "
               if instance_target else "")
        chosen["loss"] = Choice(DEFAULT_LOSS, f"{why}the Dice term weighs each class alike whatever its pixel share "
                                "(nnU-Net's cross-entropy + Dice; --loss ce for the original's)")
    if "clip_norm" in user and user["clip_norm"] is None:
        chosen["clip_norm"] = Choice(CLIP_NORM, f"gradients clipped to global norm {CLIP_NORM:g}: a loss spike no "
                                                "longer throws the weights (and their moving average) back hundreds "
                                                "of steps (--clip_norm 0 for none, the original's)")
    every = user.get("test_every_n_steps")
    if every is None:
        # one pass = the training data once in crops: a record larger than the crop (a volume stored whole, a
        # large image) counts for as many crops as it holds
        per_record = max(1.0, math.prod(data.record_shape) / crop_pixels)
        epoch = math.ceil(data.records * per_record / (batch * max(gpus, 1)))
        every = int(min(max(TEST_EVERY_EPOCHS * epoch, TEST_EVERY_RANGE[0]), TEST_EVERY_RANGE[1]))
        every = every // 10 * 10 or every
        held = f", {per_record:.3g} crops each" if per_record > 1 else ""
        chosen["test_every_n_steps"] = Choice(every, f"{TEST_EVERY_EPOCHS} passes over the {data.records} training "
                                                     f"records{held} at this batch ({epoch} step(s) each), within "
                                                     f"{TEST_EVERY_RANGE[0]}-{TEST_EVERY_RANGE[1]}")
        chosen["warmup_steps"] = Choice(min(AUTO_WARMUP_STEPS, every),
                                        f"the first min({AUTO_WARMUP_STEPS}, test interval) steps at a tenth of the "
                                        "learning rate (with --test_every_n_steps given: min(1000, it), the original's)")
    if user.get("max_steps") is None and user.get("max_minutes") is None:
        steps = max(MIN_AUTO_STEPS, BUDGET_TEST_PASSES * every)
        chosen["max_steps"] = Choice(steps, f"{BUDGET_TEST_PASSES} test intervals, at least {MIN_AUTO_STEPS} steps "
                                            "(pass --max_steps or --max_minutes to set the budget)")
    return chosen


def choose_width(model: str, base_filters: int | None, gpus: int) -> Choice | None:
    """``--base_filters`` for a UNet the user did not give one (None: passed, or a model without a width)."""
    if base_filters is not None or model not in WIDTH_MODELS:
        return None
    kind = "gpu" if gpus > 0 else "cpu"
    value = BASE_FILTERS[WIDTH_MODELS[model]][kind]
    why = ("on a CPU: within a time budget more steps of a narrow UNet beat fewer of a wide one" if kind == "cpu"
           else f"on {gpus} GPU(s): nnU-Net's width" + (" for half precision, held in float32"
                                                        if WIDTH_MODELS[model] == 3 else ""))
    return Choice(value, f"{value} filters at the first level {why}")


def _image_crop(data: DataSummary, factors: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], str]:
    """2-D: the median record, at most the CROP_PIXELS edge per axis, floored to the size factor."""
    edge = int(math.sqrt(CROP_PIXELS[kind]))
    crop = tuple(max(f, min(int(v), edge) // f * f) for v, f in zip(data.record_shape, factors))
    return crop, f"at most {edge} px per axis"


def _volume_crop(record_zyx: tuple[int, ...], factors: tuple[int, ...], kind: str,
                 voxel_size: tuple[float, ...] | None = None) -> tuple[tuple[int, ...], str]:
    """Volumes: the median record floored to the per-axis size factor, then the axis of the largest physical
    extent (voxels x voxel size; without a voxel size, voxels) shrunk by one factor at a time until the crop
    holds at most CROP_VOXELS[kind] voxels (no axis below its factor). As nnU-Net's plans, the crop tends to a
    cube in micrometres: an anisotropic stack keeps fewer sections than pixels per row."""
    crop = [max(f, int(v) // f * f) for v, f in zip(record_zyx, factors)]
    spacing = voxel_size or (1.0,) * len(crop)
    budget = CROP_VOXELS[kind]
    while math.prod(crop) > budget:
        shrinkable = [a for a in range(len(crop)) if crop[a] > factors[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: (round(crop[a] * spacing[a], 9), a))
        crop[axis] -= factors[axis]
    extent = " of the longest extent in micrometres" if voxel_size else ""
    return tuple(crop), f"at most {budget} voxels per crop (shrunk along the axis{extent} first)"
