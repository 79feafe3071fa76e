"""A measuring stick for issue #16: StarDist itself on the DSB nuclei split, same budget, same scoring.

Issue #16 asks for AP@0.5 >= 0.86 (StarDist's published 0.864, Schmidt et al. 2018, on a similar DSB subset;
StarDist's defaults train 400 epochs of 100 steps) after 15 minutes of CPU training. This script asks what StarDist
itself reaches under that budget on this machine: the 80 training images of ``dsb2018-nuclei-100`` (every image
not in ``test_files.txt``), StarDist's own example recipe (``examples/2D/2_training.ipynb`` of the stardist
repository: 32 rays, grid 2x2, percentile normalisation 1-99.8, label holes filled, random flips / 90-degree
turns / intensity change / noise, 15 % of the training images held out for validation and threshold
optimisation), the training stopped after ``--max_minutes`` of wall time, then ``optimize_thresholds`` on the
validation images. The 20 test images are scored with this project's object metric
(``segkit.instance_metrics``, the ``ALL`` row of ``inference_unet.py --instances 1 --mask_folder``: AP =
TP/(TP+FP+FN), one-to-one matching, counts pooled over images) and, as a cross-check, with StarDist's
``matching_dataset``.

StarDist is not a dependency of this project; it needs its own environment (TensorFlow 2.15 with Keras 2):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install "tensorflow-cpu==2.15.*" "stardist==0.9.*"
    /tmp/sdv/bin/python benchmarks/bench_stardist_reference.py --seeds 0 1 2 --max_minutes 15

It prints one row per seed and the mean +- sd, and writes ``results.csv`` and the predicted labels
(``seedN/NAME.tif``) in ``--output_dir``. See README "Quality", issue #16.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segkit import cliutil, instance_metrics  # noqa: E402  (no TensorFlow; numpy, scipy, scikit-image)

DATA_ROOTS = [os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "..", "shared", "data")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="the dsb2018-nuclei-100 folder (default: ../shared/data/...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_minutes", type=float, default=15.0, help="training wall time per seed")
    p.add_argument("--output_dir", default="/tmp/stardist_reference")
    args = p.parse_args(argv)
    if args.max_minutes <= 0:
        p.error("--max_minutes must be > 0")
    if args.data is None:
        found = [os.path.join(r, "dsb2018-nuclei-100") for r in DATA_ROOTS]
        found = [f for f in found if os.path.isdir(f)]
        if not found:
            p.error("no dsb2018-nuclei-100 folder under ../shared/data; give --data")
        args.data = found[0]
    return args


def load(folder: str) -> tuple[list[str], list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The split (test names from ``test_files.txt``, every other image trains) and every image and mask."""
    for part in ("test_files.txt", "images", "masks"):
        if not os.path.exists(os.path.join(folder, part)):
            raise cliutil.InputError(f"{folder}: no {part}; give --data the dsb2018-nuclei-100 folder "
                                     "(images/, masks/, test_files.txt)")
    with open(os.path.join(folder, "test_files.txt")) as fh:
        test = [line.strip() for line in fh if line.strip()]
    names = sorted(os.listdir(os.path.join(folder, "images")))
    held_out = set(test)
    missing = sorted(held_out - set(names)) + [n for n in names if not os.path.exists(os.path.join(folder, "masks", n))]
    if missing:
        raise cliutil.InputError(f"{folder}: {len(missing)} listed or found image(s) lack an image or a mask "
                                 f"(first: {missing[0]}); every test_files.txt name needs images/NAME and "
                                 "masks/NAME")
    train = [n for n in names if n not in held_out]
    images = {n: tifffile.imread(os.path.join(folder, "images", n)) for n in names}
    masks = {n: tifffile.imread(os.path.join(folder, "masks", n)) for n in names}
    return train, test, images, masks


def random_fliprot(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StarDist's example augmenter, as published."""
    axes = tuple(range(mask.ndim))
    perm = tuple(np.random.permutation(axes))
    img = img.transpose(perm + tuple(range(mask.ndim, img.ndim)))
    mask = mask.transpose(perm)
    for ax in axes:
        if np.random.rand() > 0.5:
            img = np.flip(img, axis=ax)
            mask = np.flip(mask, axis=ax)
    return img, mask


def augmenter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = random_fliprot(x, y)
    x = x * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)
    sig = 0.02 * np.random.uniform(0, 1)
    return x + sig * np.random.normal(0, 1, x.shape), y


def run_seed(seed: int, args: argparse.Namespace, train: list[str], test: list[str],
             images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, float]:
    import tensorflow as tf
    from csbdeep.utils import normalize
    from stardist import fill_label_holes
    from stardist.matching import matching_dataset
    from stardist.models import Config2D, StarDist2D

    np.random.seed(seed)
    tf.random.set_seed(seed)
    x = [normalize(images[n], 1, 99.8, axis=(0, 1)) for n in train]
    y = [fill_label_holes(masks[n]) for n in train]
    rng = np.random.RandomState(42)  # the example's split of the training images
    ind = rng.permutation(len(x))
    n_val = max(1, int(round(0.15 * len(ind))))
    x_val, y_val = [x[i] for i in ind[:n_val]], [y[i] for i in ind[:n_val]]
    x_trn, y_trn = [x[i] for i in ind[n_val:]], [y[i] for i in ind[n_val:]]
    conf = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, use_gpu=False)
    model = StarDist2D(conf, name=f"seed{seed}", basedir=os.path.join(args.output_dir, "models"))
    model.prepare_for_training()

    class Budget(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.start = time.monotonic()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None) -> None:
            self.steps += 1
            if time.monotonic() - self.start > 60.0 * args.max_minutes:
                self.model.stop_training = True

    budget = Budget()
    model.callbacks.append(budget)
    model.train(x_trn, y_trn, validation_data=(x_val, y_val), augmenter=augmenter, epochs=10_000, steps_per_epoch=100)
    train_s = time.monotonic() - budget.start
    thresholds = model.optimize_thresholds(x_val, y_val)
    out = os.path.join(args.output_dir, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    scores = instance_metrics.InstanceScores(thresholds=(0.5, 0.75))
    truths, preds = [], []
    for name in test:
        labels, _ = model.predict_instances(normalize(images[name], 1, 99.8, axis=(0, 1)))
        with cliutil.atomic_path(os.path.join(out, name), suffix=".tif") as tmp:
            tifffile.imwrite(tmp, labels.astype(np.uint16), compression="zlib")
        scores.add(name, masks[name], labels)
        truths.append(masks[name])
        preds.append(labels)
    row = scores.overall()
    check = matching_dataset(truths, preds, thresh=0.5, show_progress=False)
    return {"seed": seed, "steps": budget.steps, "train_s": round(train_s), "prob": thresholds["prob"],
            "nms": thresholds["nms"], "ap50": row["ap_t50"], "ap75": row["ap_t75"], "pq50": row["pq_t50"],
            "stardist_accuracy50": check.accuracy}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    train, test, images, masks = load(args.data)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {len(train)} training, "
          f"{len(test)} test images; {args.max_minutes} min per seed", flush=True)
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args, train, test, images, masks)
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        with cliutil.atomic_path(os.path.join(args.output_dir, "results.csv"), suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    if len(rows) > 1:
        for key in ("ap50", "ap75", "pq50"):
            values = [r[key] for r in rows]
            print(f"{key}: {statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(cliutil.run_cli(main))
