"""Real-data quality with the defaults: the three stages on every shared data set, 3 seeds each.

For each data set (``--datasets``, default nist dsb fib2d) the benchmark prepares its inputs in the output
folder (the shared data is only read), runs ``build_lmdb.py --test_list`` (the data set's split, no
other tuning), trains once per seed with ``train_unet.py``'s self-configured defaults -- nothing
but ``--number_classes 2``, ``--seed`` and the time budget ``--max_minutes`` -- and scores the
held-out images with ``inference_unet.py --mask_folder``, then again with ``--tta 1`` and with
``--border mirror``. It prints
one row per run (steps reached, training wall time, foreground IoU, Dice, pixel accuracy, IoU and
Dice with TTA, IoU with the mirror border), a mean +- sd row per data set, and the machine at start and end; ``results.csv``
in the output folder holds the same rows. See README "Segmentation quality on real microscopy".

Data sets (under ``--data_root``):
  nist   nist-phase-contrast: 0/1 cell masks as they are (``--mask_map`` only if they need one)
  dsb    dsb2018-nuclei-100: nucleus instance labels -> foreground (label > 0) as uint8 masks
  dsb-instances  the same nuclei as objects: ``build_lmdb.py --mask_type instances`` (the target it chooses),
         the number of classes the database's target has, inference ``--instances 1 --mask_folder`` on the
         instance labels; reports AP@0.5, AP@0.75 and panoptic quality PQ@0.5 (instance_metrics.csv, ALL
         row) and the IoU of the objects' union with the true one (pixels pooled)
  fib2d  neuroproof-fib-sample: every z section of the FIB-SEM volumes is a 2D image; the target is
         the membrane, skimage.segmentation.find_boundaries(labels, mode="inner"); train sections
         from the train volume, test sections from the test volume
  fib3d  the same volumes as volumes (issue #15): ``build_lmdb.py --mask_type instances`` (the per-section
         boundary target, the same membrane), the default 3D UNet for their 10 nm voxels, scored on the
         test volume's labels made into that target: the same voxels and membrane as fib2d's test sections
  fib2d-aniso, fib3d-aniso  the same with every 5th section kept (10 x 10 x 50 nm voxels, anisotropic)

    python benchmarks/bench_quality.py --output_dir /tmp/quality            # 3 x 3 runs, ~2 hours
    python benchmarks/bench_quality.py --datasets nist --seeds 0 --max_minutes 0.5   # a smoke run
    python benchmarks/bench_quality.py --datasets dsb-instances --max_minutes 15     # issue #16's figure
    python benchmarks/bench_quality.py --datasets fib3d fib2d fib3d-aniso fib2d-aniso --max_minutes 15  # #15

``--extra "--batch_size 8 --loss ce+dice"`` passes training flags through, for recipe comparisons
(off by default: the benchmark measures the defaults); a single flag needs ``--extra="--flag"``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segkit import cliutil, image_io  # noqa: E402

# ../shared/data beside the project; a git worktree sits one level deeper (worktrees/NAME).
DATA_ROOTS = [os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "..", "shared", "data")]
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "segkit_bench_quality")
METRICS = ("train_s", "iou_fg", "dice_fg", "pixel_accuracy", "iou_fg_tta", "dice_fg_tta", "iou_fg_mirror")
INSTANCE_METRICS = ("train_s", "ap50", "ap75", "pq50", "iou_fg")  # dsb-instances


@dataclass(frozen=True)
class Prepared:
    """One data set ready for the stages: folders of 2D images and class masks (0/1) paired by stem."""
    name: str
    image_folder: str
    mask_folder: str
    test_list: str      # names of the held-out images, for build_lmdb.py --test_list
    test_images: str    # a folder of links to the held-out images only, for inference
    mask_map: str | None = None  # build_lmdb.py --mask_map, when the masks are not 0/1 already
    instances: bool = False      # masks are instance labels: --mask_type instances, objects scored
    label_masks: bool = False    # masks are instance labels built into their class target (--mask_type instances)


# ----------------------------------------------------------------------------- data preparation

def read_names(path: str) -> list[str]:
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


def write_tiff(path: str, array: np.ndarray) -> None:
    with cliutil.atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, array, compression="zlib")


def fresh_folder(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def link_images(source: str, names: list[str], folder: str) -> str:
    """A fresh folder of symbolic links to ``source/NAME`` for each name."""
    fresh_folder(folder)
    for name in names:
        os.symlink(os.path.abspath(os.path.join(source, name)), os.path.join(folder, name))
    return folder


def binary_mask_map(mask_folder: str) -> str | None:
    """None when every mask is 0/1; ``"V:1"`` when the masks are exactly {0, V} (e.g. 0/255)."""
    values: set[int] = set()
    for name in image_io.list_images(mask_folder, "tif"):
        values |= {int(v) for v in np.unique(tifffile.imread(os.path.join(mask_folder, name)))}
    if values <= {0, 1}:
        return None
    if len(values) == 2 and 0 in values:
        return f"{max(values)}:1"
    raise cliutil.InputError(f"{mask_folder}: mask values {sorted(values)[:8]} are not a binary mask; "
                             "this benchmark scores foreground against background (values 0 and one other)")


def finish(name: str, images: str, masks: str, test_list: str, folder: str) -> Prepared:
    test_images = link_images(images, read_names(test_list), os.path.join(folder, "test_images"))
    return Prepared(name, images, masks, test_list, test_images, binary_mask_map(masks))


def prepare_nist(source: str, folder: str) -> Prepared:
    """The shared images and masks as they are."""
    return finish("nist", os.path.join(source, "images"), os.path.join(source, "masks"),
                  os.path.join(source, "test_files.txt"), folder)


def prepare_dsb(source: str, folder: str) -> Prepared:
    """Images linked; each instance label image becomes a foreground mask (label > 0), uint8."""
    names = image_io.list_images(os.path.join(source, "images"), "tif")
    images = link_images(os.path.join(source, "images"), names, os.path.join(folder, "images"))
    masks = fresh_folder(os.path.join(folder, "masks"))
    for name in image_io.list_images(os.path.join(source, "masks"), "tif"):
        labels = tifffile.imread(os.path.join(source, "masks", name))
        write_tiff(os.path.join(masks, name), (labels > 0).astype(np.uint8))
    return finish("dsb", images, masks, os.path.join(source, "test_files.txt"), folder)


def prepare_dsb_instances(source: str, folder: str) -> Prepared:
    """Images and instance label masks linked as they are (build_lmdb.py --mask_type instances)."""
    images, masks = (link_images(os.path.join(source, sub), image_io.list_images(os.path.join(source, sub), "tif"),
                                 os.path.join(folder, sub)) for sub in ("images", "masks"))
    test_list = os.path.join(source, "test_files.txt")
    test_images = link_images(images, read_names(test_list), os.path.join(folder, "test_images"))
    return Prepared("dsb-instances", images, masks, test_list, test_images, instances=True)


def section_names(volume_name: str, count: int) -> list[str]:
    """``train_z000-199.tif`` -> train_z000.tif ... train_z199.tif (z of the whole stack); other names
    get their section index: ``vol.tif`` -> vol_z000.tif ..."""
    stem = image_io.stem(volume_name)
    match = re.fullmatch(r"(?P<base>.*)_z(?P<start>\d+)-\d+", stem)
    base, start = (match["base"], int(match["start"])) if match else (stem, 0)
    return [f"{base}_z{start + z:03d}.tif" for z in range(count)]


def membrane(labels_yx: np.ndarray) -> np.ndarray:
    """The membrane target of one section: pixels of a body next to another id, as uint8 0/1."""
    from skimage.segmentation import find_boundaries
    return find_boundaries(labels_yx, mode="inner").astype(np.uint8)


FIB_VOXEL_UM = 0.01  # the sample's 10 nm voxels (README of the data set), when a file does not say
ANISOTROPIC_EVERY = 5  # the anisotropic variants keep every 5th section: 10 x 10 x 50 nm


def fib_volumes(source: str, every: int = 1):
    """(name, image ZYX, labels ZYX, voxel size z,y,x in um) of each FIB-SEM volume, every ``every``-th section."""
    for volume in image_io.list_images(os.path.join(source, "images"), "tif"):
        with tifffile.TiffFile(os.path.join(source, "images", volume)) as tif:
            image_zyx, spacing = tif.asarray(), (tif.imagej_metadata or {}).get("spacing")
        labels_zyx = tifffile.imread(os.path.join(source, "masks", volume))
        if image_zyx.ndim != 3 or labels_zyx.shape != image_zyx.shape:
            raise cliutil.InputError(f"{source}: {volume} is {image_zyx.shape} with labels {labels_zyx.shape}; "
                                     "expected a ZYX volume and a label volume of the same shape")
        voxel_um = (float(spacing or FIB_VOXEL_UM) * every, FIB_VOXEL_UM, FIB_VOXEL_UM)
        yield volume, image_zyx[::every], labels_zyx[::every], voxel_um


def prepare_fib2d(source: str, folder: str, every: int = 1, name: str = "fib2d") -> Prepared:
    """Every z section (every ``every``-th) of every volume becomes an image and a membrane mask; the sections
    of the volumes named in test_files.txt are the test list."""
    images, masks = fresh_folder(os.path.join(folder, "images")), fresh_folder(os.path.join(folder, "masks"))
    test_volumes, test_sections = set(read_names(os.path.join(source, "test_files.txt"))), []
    for volume, image_zyx, labels_zyx, _ in fib_volumes(source, every):
        names = section_names(volume, len(image_zyx))
        for section_name, image_yx, labels_yx in zip(names, image_zyx, labels_zyx):
            write_tiff(os.path.join(images, section_name), image_yx)
            write_tiff(os.path.join(masks, section_name), membrane(labels_yx))
        if volume in test_volumes:
            test_sections += names
    test_list = os.path.join(folder, "test_files.txt")
    cliutil.atomic_write_text(test_list, "".join(f"{n}\n" for n in test_sections))
    return finish(name, images, masks, test_list, folder)


def prepare_fib3d(source: str, folder: str, every: int = 1, name: str = "fib3d") -> Prepared:
    """The volumes (every ``every``-th section) as ImageJ stacks with their voxel size, and their instance
    labels (built into the boundary target). Inference is given the labels too: an instance model scores its
    own target made from them (metrics.csv), the per-section inner boundaries of the bodies, which are fib2d's
    membrane masks wherever the labels have no 0 (label 0 is almost absent in this sample). Binary membrane
    masks would be read as instance labels of one object, whose boundary is not the membrane."""
    images, labels = fresh_folder(os.path.join(folder, "images")), fresh_folder(os.path.join(folder, "labels"))
    for volume, image_zyx, labels_zyx, voxel_um in fib_volumes(source, every):
        meta = {"axes": "ZYX", "spacing": voxel_um[0], "unit": "um"}
        with cliutil.atomic_path(os.path.join(images, volume), suffix=".tif") as tmp:
            tifffile.imwrite(tmp, image_zyx, imagej=True, resolution=(1 / voxel_um[2], 1 / voxel_um[1]), metadata=meta,
                             compression="zlib")
        write_tiff(os.path.join(labels, volume), labels_zyx)  # ids may need 32 bits: no ImageJ stack (the image has the size)
    test_list = os.path.join(source, "test_files.txt")
    test_images = link_images(images, read_names(test_list), os.path.join(folder, "test_images"))
    return Prepared(name, images, labels, test_list, test_images, label_masks=True)


DATASETS = {  # name: (folder under --data_root, preparation)
    "nist": ("nist-phase-contrast", prepare_nist),
    "dsb": ("dsb2018-nuclei-100", prepare_dsb),
    "dsb-instances": ("dsb2018-nuclei-100", prepare_dsb_instances),
    "fib2d": ("neuroproof-fib-sample", prepare_fib2d),
    "fib3d": ("neuroproof-fib-sample", prepare_fib3d),
    "fib2d-aniso": ("neuroproof-fib-sample",
                    lambda source, folder: prepare_fib2d(source, folder, ANISOTROPIC_EVERY, "fib2d-aniso")),
    "fib3d-aniso": ("neuroproof-fib-sample",
                    lambda source, folder: prepare_fib3d(source, folder, ANISOTROPIC_EVERY, "fib3d-aniso")),
}


DEFAULT_DATASETS = ("nist", "dsb", "fib2d")  # the pixel benchmark; dsb-instances (issue #16) by --datasets


def prepare(name: str, data_root: str, folder: str) -> Prepared:
    source = os.path.join(data_root, DATASETS[name][0])
    if not os.path.isdir(source):
        raise cliutil.InputError(f"{source}: data set '{name}' not found; pass --data_root (the folder holding "
                                 f"{', '.join(d for d, _ in DATASETS.values())}) or leave '{name}' out of --datasets")
    return DATASETS[name][1](source, fresh_folder(os.path.join(folder, "inputs")))


# ----------------------------------------------------------------------------- the stages

def run(cmd: list[str], log_path: str) -> float:
    """Run a stage, its output to a log, return wall seconds; exit on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed with exit code {proc.returncode}; see {log_path}")
    return seconds


def build(data: Prepared, folder: str) -> tuple[str, str]:
    lmdb_dir = os.path.join(folder, "lmdb")
    cmd = [sys.executable, "build_lmdb.py", "--image_folder", data.image_folder, "--mask_folder", data.mask_folder,
           "--output_folder", lmdb_dir, "--dataset_name", data.name, "--test_list", data.test_list, "--overwrite", "1"]
    cmd += ["--mask_type", "instances"] if data.instances or data.label_masks else ["--number_classes", "2"]
    if data.mask_map:
        cmd += ["--mask_map", data.mask_map]
    run(cmd, os.path.join(folder, "build.log"))
    return os.path.join(lmdb_dir, f"train-{data.name}.lmdb"), os.path.join(lmdb_dir, f"test-{data.name}.lmdb")


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def overall_row(metrics_csv: str) -> dict[str, str]:
    for row in read_rows(metrics_csv):
        if row.get("image") == "ALL":
            return row
    raise SystemExit(f"{metrics_csv}: no overall (ALL) row")


def object_foreground_iou(labels_folder: str, truth_folder: str) -> float:
    """IoU of "in some object" between the predicted label images and the true ones, pixels pooled over the
    images (whatever classes the model's target has)."""
    inter = union = 0
    for name in sorted(os.listdir(labels_folder)):
        pred = tifffile.imread(os.path.join(labels_folder, name)) > 0
        truth = image_io.read_image(os.path.join(truth_folder, name)) > 0
        inter += int(np.count_nonzero(pred & truth))
        union += int(np.count_nonzero(pred | truth))
    return inter / union if union else float("nan")


def run_seed(data: Prepared, seed: int, args, train_db: str, test_db: str) -> dict[str, float]:
    """Train with the defaults (and ``--extra``), score the held-out images plain and with TTA."""
    out = fresh_folder(os.path.join(args.output_dir, data.name, f"seed{seed}"))
    model = os.path.join(out, "model")
    train_s = run([sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
                   "--output_dir", model, *([] if data.instances else ["--number_classes", "2"]), "--seed", str(seed),
                   "--max_minutes", f"{args.max_minutes:g}", *shlex.split(args.extra)], os.path.join(out, "train.log"))
    steps = int(read_rows(os.path.join(model, "metrics.csv"))[-1]["step"])  # the final test pass

    def infer(folder: str, *extra: str) -> dict[str, str]:
        run([sys.executable, "inference_unet.py", "--saved_model_filepath", os.path.join(model, "saved_model"),
             "--image_folder", data.test_images, "--output_folder", os.path.join(out, folder),
             "--mask_folder", data.mask_folder, *extra], os.path.join(out, f"{folder}.log"))
        return overall_row(os.path.join(out, folder, "metrics.csv"))

    if data.instances:
        infer("objects", "--instances", "1", "--overlay", "1")
        scores = overall_row(os.path.join(out, "objects", "instance_metrics.csv"))
        return {"steps": steps, "train_s": train_s, "ap50": float(scores["ap_t50"]), "ap75": float(scores["ap_t75"]),
                "pq50": float(scores["pq_t50"]),
                "iou_fg": object_foreground_iou(os.path.join(out, "objects", "labels"), data.mask_folder)}
    plain = infer("masks", "--overlay", "1")
    tta = infer("masks_tta", "--tta", "1") if args.tta else {"iou_1": "nan", "dice_1": "nan"}
    mirror = infer("masks_mirror", "--border", "mirror") if args.mirror else {"iou_1": "nan"}
    return {"steps": steps, "train_s": train_s, "iou_fg": float(plain["iou_1"]), "dice_fg": float(plain["dice_1"]),
            "pixel_accuracy": float(plain["pixel_accuracy"]), "iou_fg_tta": float(tta["iou_1"]),
            "dice_fg_tta": float(tta["dice_1"]), "iou_fg_mirror": float(mirror["iou_1"])}


# ----------------------------------------------------------------------------- report

def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


HEADER = f"{'dataset':<8}{'seed':>6}{'steps':>7}{'train s':>10}" + "".join(
    f"{h:>16}" for h in ("fg IoU", "fg Dice", "pix acc", "IoU tta", "Dice tta", "IoU mirror"))
INSTANCE_HEADER = f"{'dataset':<8}{'seed':>6}{'steps':>7}{'train s':>10}" + "".join(
    f"{h:>16}" for h in ("AP@0.5", "AP@0.75", "PQ@0.5", "objects IoU"))


def metrics_of(run_: dict[str, float]) -> tuple[str, ...]:
    return INSTANCE_METRICS if "ap50" in run_ else METRICS


def format_row(name: str, seed: str, run_: dict[str, float], sd: dict[str, float] | None = None) -> str:
    """One table row; with ``sd`` every cell reads mean+-sd."""
    def cell(key: str, width: int, digits: int) -> str:
        text = f"{run_[key]:.{digits}f}" + (f"+-{sd[key]:.{digits}f}" if sd else "")
        return f"{text:>{width}}"
    return f"{name:<8}{seed:>6}{run_['steps']:>7.0f}{cell('train_s', 10, 0)}" + "".join(
        cell(k, 16, 4) for k in metrics_of(run_)[1:])


def summary(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = ("steps", *metrics_of(runs[0]))
    return ({k: statistics.fmean(r[k] for r in runs) for k in keys},
            {k: statistics.stdev(r[k] for r in runs) for k in keys})


def write_csv(path: str, rows: list[dict]) -> None:
    """One row per (dataset, seed), then mean and sd rows per data set; written atomically."""
    with cliutil.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["dataset", "seed", "steps", *METRICS, *INSTANCE_METRICS[1:-1]],
                                    restval="")
            writer.writeheader()
            writer.writerows(rows)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=list(DATASETS),
                   help=f"data sets to run (default: {' '.join(DEFAULT_DATASETS)}; dsb-instances on request)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per seed (default: 0 1 2)")
    p.add_argument("--max_minutes", type=float, default=10.0, help="train_unet.py's time budget per run (default: 10)")
    p.add_argument("--data_root", default=next((d for d in DATA_ROOTS if os.path.isdir(d)), DATA_ROOTS[0]),
                   help="folder holding the shared data sets (default: ../shared/data)")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT, help=f"prepared inputs, runs, results.csv "
                   f"(default: {DEFAULT_OUTPUT}; keep it outside the project)")
    p.add_argument("--tta", type=cliutil.str2bool, default=True, metavar="0/1",
                   help="also score with inference_unet.py --tta 1 (default: 1)")
    p.add_argument("--mirror", type=cliutil.str2bool, default=True, metavar="0/1",
                   help="also score with inference_unet.py --border mirror (mirror context beyond the image border "
                        "instead of the network's zero padding; default: 1)")
    p.add_argument("--extra", default="", help="further train_unet.py flags, quoted (recipe comparisons; "
                   "default: none, the benchmark measures the defaults)")
    return p.parse_args(argv)


def run_dataset(name: str, args) -> list[dict]:
    folder = os.path.join(args.output_dir, name)
    os.makedirs(folder, exist_ok=True)
    data = prepare(name, args.data_root, folder)
    train_db, test_db = build(data, folder)
    rows, runs = [], []
    print(INSTANCE_HEADER if data.instances else HEADER, flush=True)
    for seed in args.seeds:
        result = run_seed(data, seed, args, train_db, test_db)
        runs.append(result)
        rows.append({"dataset": name, "seed": seed, **result})
        print(format_row(name, str(seed), result), flush=True)
    if len(runs) > 1:
        mean, sd = summary(runs)
        print(format_row(name, "mean", mean, sd), flush=True)
        rows += [{"dataset": name, "seed": "mean", **mean}, {"dataset": name, "seed": "sd", **sd}]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"machine at start: {machine()}")
    print(f"training: defaults, --number_classes 2 (dsb-instances: the target's) --max_minutes {args.max_minutes:g} --seed S"
          + (f" {args.extra}" if args.extra else ""))
    rows = []
    for name in args.datasets:
        rows += run_dataset(name, args)
        write_csv(os.path.join(args.output_dir, "results.csv"), rows)
    print(f"machine at end: {machine()}")
    print(f"results: {os.path.join(args.output_dir, 'results.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(cliutil.run_cli(main))
