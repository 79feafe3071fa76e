"""Real-data quality: the three stages on the shared NIST phase-contrast data.

Runs ``build_lmdb.py`` with the benchmark's split (``--test_list``), trains
with a fixed step budget (train_unet.py's defaults otherwise, so the moving
average of the weights is what is tested and exported), and segments the 20 held-out test images with
``inference_unet.py --mask_folder``; prints foreground IoU, Dice and pixel
accuracy from the metrics.csv that inference writes, and the foreground IoU and
Dice of the same model with ``--tta 1`` (mean of the 8 flip/rot90 predictions; UNet variants only:
FC-DenseNet56 needs its exact halo of 448 px, ~5 s per 256x256 image per pass on a CPU).

Seeds (``--seeds``, default 0 1 2): every variant is trained once per seed (the seed of the weights
initialization and of the sample stream; the split is fixed by ``test_files.txt``) and a ``mean``
row gives the mean and sample standard deviation over the seeds. One run is one draw: on this data
the default UNet's foreground IoU moves by a few thousandths from seed to seed, about as much as
the recipes compared in the README differ, so a single seed cannot rank them.

Variants (``--variants``): ``unet`` (default model, default augmentation),
``unet-noaug`` (augmentation off), ``fcdensenet56`` (default augmentation).
The step budgets are fixed so runs compare: ``--steps`` for the UNet variants,
``--fcdensenet_steps`` for FC-DenseNet56 (about ten times slower per step on a
CPU: the same 10 minutes buys far fewer steps). The target is training within
10 minutes on the 2-core development CPU; the training wall time is measured
and printed for each run so that can be checked (see the README table).

    python benchmarks/bench_quality.py --output_dir bench_output/quality

A UNet run takes about 12 minutes on the 2-core development CPU (10 of training, inference twice),
an FC-DenseNet56 run about 14: the defaults (3 variants x 3 seeds) take about 2 hours; pass
``--variants unet --seeds 0`` for one run. Per-run rows also go to ``results.csv`` in the output folder.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "nist-phase-contrast")

VARIANTS = {
    # name: (model, use_augmentation)
    "unet": ("unet", 1),
    "unet-noaug": ("unet", 0),
    "fcdensenet56": ("fcdensenet56", 1),
}


def run(cmd: list[str], log_path: str) -> float:
    """Run a stage, tee its output to a log, return wall seconds; exit on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed with exit code {proc.returncode}; see {log_path}")
    return seconds


def build(data: str, out: str) -> tuple[str, str]:
    lmdb_dir = os.path.join(out, "lmdb")
    run([sys.executable, "build_lmdb.py", "--image_folder", os.path.join(data, "images"),
         "--mask_folder", os.path.join(data, "masks"), "--output_folder", lmdb_dir,
         "--dataset_name", "nist", "--image_format", "tif", "--number_classes", "2",
         "--test_list", os.path.join(data, "test_files.txt"), "--overwrite"],
        os.path.join(out, "build.log"))
    return os.path.join(lmdb_dir, "train-nist.lmdb"), os.path.join(lmdb_dir, "test-nist.lmdb")


def test_image_folder(data: str, out: str) -> str:
    """A folder of links to the held-out images, so inference sees only the test split."""
    folder = os.path.join(out, "test_images")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(data, "test_files.txt")) as fh:
        names = [line.strip() for line in fh if line.strip()]
    for name in names:
        os.symlink(os.path.abspath(os.path.join(data, "images", name)), os.path.join(folder, name))
    return folder


def overall_row(metrics_csv: str) -> dict[str, str]:
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row.get("image") in ("__overall__", "overall", "ALL"):
            return row
    raise SystemExit(f"{metrics_csv}: no overall row")


METRICS = ("train_s", "iou_fg", "dice_fg", "pixel_accuracy", "iou_fg_tta", "dice_fg_tta")


def run_variant(name: str, seed: int, args, train_db: str, test_db: str, images: str) -> dict[str, float]:
    model, augment = VARIANTS[name]
    steps = args.fcdensenet_steps if model.startswith("fcdensenet") else args.steps
    test_every = min(args.test_every_n_steps, max(1, steps // 3))
    out = os.path.join(args.output_dir, name, f"seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    train_cmd = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
                 "--output_dir", os.path.join(out, "model"), "--model", model, "--number_classes", "2",
                 "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
                 "--test_every_n_steps", str(test_every), "--max_steps", str(steps),
                 "--use_augmentation", str(augment), "--early_stopping", "1000", "--seed", str(seed),
                 "--reader_count", "1", "--lr_schedule", args.lr_schedule, "--loss", args.loss]
    if args.ema_decay is not None:
        train_cmd += ["--ema_decay", str(args.ema_decay)]
    train_s = run(train_cmd, os.path.join(out, "train.log"))

    def infer(folder: str, *extra: str) -> tuple[float, dict[str, str]]:
        cmd = [sys.executable, "inference_unet.py", "--saved_model_filepath", os.path.join(out, "model", "saved_model"),
               "--image_folder", images, "--output_folder", os.path.join(out, folder), "--image_format", "tif",
               "--mask_folder", os.path.join(args.data, "masks"), *extra]
        seconds = run(cmd, os.path.join(out, f"{folder}.log"))
        return seconds, overall_row(os.path.join(out, folder, "metrics.csv"))

    infer_s, row = infer("masks", "--overlay", "1")
    tta = {"iou_1": "nan", "dice_1": "nan"}
    if not model.startswith("fcdensenet"):  # FC-DenseNet: exact halo 448 px, 8 x ~5 s per image on a CPU
        _, tta = infer("masks_tta", "--tta", "1")  # the same model, mean of the 8 flip/rot90 predictions
    return {"steps": steps, "train_s": train_s, "infer_s": infer_s, "iou_fg": float(row["iou_1"]),
            "dice_fg": float(row["dice_1"]), "pixel_accuracy": float(row["pixel_accuracy"]),
            "iou_fg_tta": float(tta["iou_1"]), "dice_fg_tta": float(tta["dice_1"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "bench_output", "quality"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1900, help="UNet step budget (the README table's runs)")
    parser.add_argument("--fcdensenet_steps", type=int, default=90, help="step budget of fcdensenet56")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--test_every_n_steps", type=int, default=100, help="also the warm-up length (the seed's rule)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train every variant once per seed; a mean row follows (default: 0 1 2)")
    parser.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--loss", default="ce", choices=["ce", "dice", "ce+dice", "focal"])
    parser.add_argument("--ema_decay", type=float, default=None, help="default: train_unet.py's (0.999)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        sys.exit(f"{args.data}: shared data not found; pass --data")
    os.makedirs(args.output_dir, exist_ok=True)
    train_db, test_db = build(args.data, args.output_dir)
    images = test_image_folder(args.data, args.output_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print(f"budget: {args.steps} steps (fcdensenet56: {args.fcdensenet_steps}), batch {args.batch_size}, lr {args.learning_rate} ({args.lr_schedule}), "
          f"loss {args.loss}, ema_decay {'default' if args.ema_decay is None else args.ema_decay}")
    print(f"{'variant':<14}{'seed':>6}{'steps':>7}{'train s':>9}{'fg IoU':>9}{'fg Dice':>9}{'pix acc':>9}"
          f"{'IoU tta':>9}{'Dice tta':>9}")
    rows = []
    for name in args.variants:
        runs = []
        for seed in args.seeds:
            r = run_variant(name, seed, args, train_db, test_db, images)
            runs.append(r)
            rows.append({"variant": name, "seed": seed, **r})
            print(f"{name:<14}{seed:>6}{r['steps']:>7}" + "".join(_cell(k, r[k]) for k in METRICS), flush=True)
        if len(runs) > 1:
            means = {k: statistics.fmean(r[k] for r in runs) for k in METRICS}
            sds = {k: statistics.stdev(r[k] for r in runs) for k in METRICS}
            print(f"{name:<14}{'mean':>6}{runs[0]['steps']:>7}" + "".join(_cell(k, means[k]) for k in METRICS))
            print(f"{'':<14}{'sd':>6}{'':>7}" + "".join(_cell(k, sds[k]) for k in METRICS), flush=True)
    write_csv(os.path.join(args.output_dir, "results.csv"), rows)
    print(f"results: {os.path.join(args.output_dir, 'results.csv')}")
    return 0


def _cell(key: str, value: float) -> str:
    return f"{value:>9.0f}" if key == "train_s" else f"{value:>9.4f}"


def write_csv(path: str, rows: list[dict]) -> None:
    """One row per (variant, seed), written under a temporary name and renamed into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["variant", "seed", "steps", *METRICS, "infer_s"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
