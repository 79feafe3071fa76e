"""Benchmark build_lmdb: images/s and MB/s (decoded source pixels, image + mask).

1. The shared NIST data (100 images 256x256 uint16): the CLI end to end in a fresh process
   (what a user waits for, Python start-up included), and build_databases() in-process
   with 1 worker and with the default number of workers.
2. Two 8192x8192 uint16 images (+ uint8 masks; two, because a split needs two) generated
   on the fly, tiled at 512; with the peak resident memory (parent and largest worker).

    .venv/bin/python benchmarks/bench_build_lmdb.py [--repeats 3]

The machine is shared: compare figures within one run; each figure is the best of --repeats.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import build_lmdb  # noqa: E402
from segkit import image_io  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "nist-phase-contrast")


def source_megabytes(images: str, masks: str) -> tuple[int, float]:
    names = image_io.list_images(images, "tif")
    total = sum(image_io.read_image(os.path.join(images, n)).nbytes for n in names)
    total += sum(image_io.read_image(os.path.join(masks, n)).nbytes for n in image_io.list_images(masks))
    return len(names), total / 1e6


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(label: str, seconds: float, n_images: int, megabytes: float, extra: str = "") -> None:
    print(f"{label:48s} {seconds:7.3f} s  {n_images / seconds:8.1f} images/s  {megabytes / seconds:8.1f} MB/s  {extra}")


def bench_shared(work: str, repeats: int) -> None:
    images, masks = os.path.join(SHARED, "images"), os.path.join(SHARED, "masks")
    if not os.path.isdir(images):
        print(f"shared data absent ({SHARED}); skipped")
        return
    n, mb = source_megabytes(images, masks)
    print(f"shared NIST data: {n} images, {mb:.1f} MB decoded (image + mask)")
    cmd = [sys.executable, os.path.join(ROOT, "build_lmdb.py"), "--image_folder", images, "--mask_folder", masks,
           "--output_folder", os.path.join(work, "cli"), "--dataset_name", "nist", "--train_fraction", "0.8",
           "--image_format", "tif", "--overwrite", "1"]
    seconds = best_of(repeats, lambda: subprocess.run(cmd, check=True, capture_output=True))
    report("CLI, fresh process, default workers (wall)", seconds, n, mb, "target < 1 s")
    for workers in (1, build_lmdb.default_workers()):
        for tiled in (False, True):
            def run():
                build_lmdb.build_databases(image_folder=images, mask_folder=masks, output_folder=os.path.join(work, "fn"),
                                           dataset_name="nist", use_tiling=tiled, tile_size=128, workers=workers,
                                           overwrite=True, progress=False)
            label = f"build_databases, workers={workers}" + (", tiles 128" if tiled else "")
            report(label, best_of(repeats, run), n, mb)


def bench_large(work: str, repeats: int) -> None:
    import resource

    import tifffile

    folder = os.path.join(work, "large")
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "masks"))
    rng = np.random.default_rng(0)
    side = 8192
    image = (rng.integers(0, 4096, (side, side // 8), dtype=np.uint16).repeat(8, axis=1))  # cheap to generate
    mask = (image[:, :] // 1366).astype(np.uint8)  # classes 0..2
    for name in ("a", "b"):  # two images: a split needs two; each is 8192x8192
        tifffile.imwrite(os.path.join(folder, "images", f"{name}.tif"), image)
        tifffile.imwrite(os.path.join(folder, "masks", f"{name}.tif"), mask)
    mb = 2 * (image.nbytes + mask.nbytes) / 1e6
    del image, mask
    print(f"generated 2 images {side}x{side} uint16 (+ uint8 masks), {mb:.0f} MB decoded")
    for workers in (1, 2):
        def run():
            build_lmdb.build_databases(image_folder=os.path.join(folder, "images"),
                                       mask_folder=os.path.join(folder, "masks"), output_folder=os.path.join(work, "big"),
                                       dataset_name="big", train_fraction=0.5, use_tiling=True, tile_size=512,
                                       workers=workers, overwrite=True, progress=False)
        seconds = best_of(repeats, run)
        peak = {who: resource.getrusage(who).ru_maxrss / 1e3 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)}
        report(f"8192x8192 x2, tiles 512, workers={workers}", seconds, 2, mb,
               f"peak RSS so far: parent {peak[resource.RUSAGE_SELF]:.0f} MB, "
               f"largest child {peak[resource.RUSAGE_CHILDREN]:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_large", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_build_lmdb_")
    try:
        bench_shared(work, args.repeats)
        if not args.skip_large:
            bench_large(work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
