"""The ceiling of the 3-class instance target on the shared DSB nuclei (issue #16).

Ground-truth instance labels -> 3-class target (:func:`segkit.instances.target_from_labels`) -> one-hot
"probabilities" (a perfect model) -> :func:`segkit.instances.labels_from_probabilities` -> AP = TP/(TP+FP+FN) at
IoU 0.5 (:mod:`segkit.instance_metrics`), over the 80 training images (those not in ``test_files.txt``). For
comparison it prints the same score for the connected components of the foreground and of the interiors alone,
and the grow-back with ``min_size`` 0. The data README quotes 0.780 / 0.936 / 0.989 over all 100 images.

    python benchmarks/bench_instances.py [--data /work/shared/data/dsb2018-nuclei-100]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
import tifffile
from scipy import ndimage as ndi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from segkit import instance_metrics, instances  # noqa: E402

# beside the project (/work/main -> /work/shared) or beside a worktree folder (/work/wt/NAME -> /work/shared)
_CANDIDATES = [os.path.join(ROOT, *[".."] * up, "shared", "data", "dsb2018-nuclei-100") for up in (1, 2)]
DEFAULT_DATA = next((c for c in _CANDIDATES if os.path.isdir(c)), _CANDIDATES[0])


def training_masks(data: str) -> list[str]:
    """The mask files whose stem is not listed in ``test_files.txt``."""
    with open(os.path.join(data, "test_files.txt"), encoding="utf-8") as fh:
        test = {os.path.splitext(line.strip())[0] for line in fh if line.strip() and not line.startswith("#")}
    masks = sorted(glob.glob(os.path.join(data, "masks", "*.tif")))
    return [m for m in masks if os.path.splitext(os.path.basename(m))[0] not in test]


def ceilings(masks: list[str]) -> dict[str, float]:
    """AP@0.5 of each way back from the target to objects, counts summed over ``masks``."""
    methods = {
        "foreground components": lambda t: ndi.label(t > 0)[0],
        "interior components": lambda t: ndi.label(t == instances.INTERIOR)[0],
        "3-class + watershed, min_size 0": lambda t: instances.labels_from_probabilities(
            instances.one_hot(t, 3), instances.InstanceThresholds(min_size=0)),
        "3-class + watershed (defaults)": lambda t: instances.labels_from_probabilities(instances.one_hot(t, 3)),
    }
    pairs: dict[str, list] = {name: [] for name in methods}
    for path in masks:
        truth = tifffile.imread(path)
        target = instances.target_from_labels(truth)
        for name, method in methods.items():
            pairs[name].append((truth, method(target)))
    return {name: instance_metrics.average_precision(p, 0.5) for name, p in pairs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="the dsb2018-nuclei-100 folder")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "test_files.txt")):
        print(f"error: no test_files.txt in {args.data}; pass --data DSB_FOLDER", file=sys.stderr)
        return 2
    masks = training_masks(args.data)
    if not masks:
        print(f"no training masks in {args.data}/masks", file=sys.stderr)
        return 2
    start = time.perf_counter()
    scores = ceilings(masks)
    objects = sum(int(np.unique(tifffile.imread(m)).size - 1) for m in masks)
    print(f"ceiling of the targets, ground truth -> target -> objects, {len(masks)} images, {objects} objects "
          f"({time.perf_counter() - start:.1f} s)")
    for name, ap in scores.items():
        print(f"  {name:34s} AP@0.5 = {ap:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
