"""Benchmark 3D augmentation: samples/s of augment3d.make_sample_3d on one core, as a reader worker runs it.

    .venv/bin/python benchmarks/bench_augment3d.py                 # 16x128x128 (EM, 40x4x4 nm) and 64x64x64 (8 nm)
    .venv/bin/python benchmarks/bench_augment3d.py --seconds 10 --profile

For each case it makes samples from an in-memory uint8 record (with room for the context the crop
needs, ``context_margin_3d``) with OpenCV on one thread (``cv2.setNumThreads(1)``, as in the reader's
workers) and, unless --tune_allocator 0, glibc keeping freed arrays for reuse
(``augment3d.tune_allocator``), default 3D augmentation and geometry only, and prints samples/s of wall-clock time and per
CPU second of this process (what one worker on a core of its own gives), with the load average (the
machine is shared: compare figures taken together).

Measured 2026-11-29 on the 2-core development machine while other sessions ran test suites (load
average 6, so the wall-clock figures are about half of what a worker with a core of its own gets),
uint8, one channel, default 3D augmentation (geometry only in brackets):

    crop                                   samples/s (wall)   samples per CPU second
    16x128x128, 40x4x4 nm (anisotropic)    71 (73)            159 (179)
    64x64x64, 8 nm (isotropic)             35 (41)             71 (88)
    16x128x128 without tune_allocator      44 (42)             79 (85)
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment3d  # noqa: E402
from augment3d import AugmentParams3D  # noqa: E402

CASES = {  # name: (crop z, y, x; voxel size z, y, x in micrometres)
    "16x128x128 anisotropic (EM 40x4x4 nm)": ((16, 128, 128), (0.04, 0.004, 0.004)),
    "64x64x64 isotropic (FIB-SEM 8 nm)": ((64, 64, 64), (0.008, 0.008, 0.008)),
}
GEOMETRY_ONLY = AugmentParams3D().replace(section_scale_fraction=0.0, section_shift_fraction=0.0, noise_fraction=0.0,
                                          missing_probability=0.0, low_contrast_probability=0.0)


def make_record(out_zyx, spacing, channels=1, seed=0):
    """A uint8 record with the full context a crop of ``out_zyx`` can need, and a 4-class mask."""
    shape = tuple(np.asarray(out_zyx) + 2 * augment3d.context_margin_3d(out_zyx, spacing))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=shape + (channels,), dtype=np.uint8)
    mask = rng.integers(0, 4, size=shape, dtype=np.uint8)
    return image, mask


def rate(image, mask, out_zyx, spacing, params, seconds: float) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process)."""
    rng = np.random.default_rng(0)
    for _ in range(3):  # warm-up: caches, first allocations
        augment3d.make_sample_3d(image, mask, rng, out_zyx, spacing, params)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        augment3d.make_sample_3d(image, mask, rng, out_zyx, spacing, params)
        count += 1
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the default augmentation")
    parser.add_argument("--tune_allocator", type=int, default=1, choices=(0, 1),
                        help="1 = augment3d.tune_allocator() first, as a reader worker should")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    if args.tune_allocator:
        print(f"augment3d.tune_allocator(): {'applied' if augment3d.tune_allocator() else 'not available'}")
    for name, (out_zyx, spacing) in CASES.items():
        image, mask = make_record(out_zyx, spacing)
        for label, params in (("default", AugmentParams3D()), ("geometry only", GEOMETRY_ONLY)):
            wall, cpu = rate(image, mask, out_zyx, spacing, params, args.seconds)
            print(f"{name:40s} record {'x'.join(map(str, image.shape[:3]))}  {label:14s} {wall:7.1f} samples/s "
                  f"({cpu:6.1f} per CPU second; load average {os.getloadavg()[0]:.2f})", flush=True)
        if args.profile:
            rng = np.random.default_rng(1)
            profile = cProfile.Profile()
            profile.runcall(lambda: [augment3d.make_sample_3d(image, mask, rng, out_zyx, spacing) for _ in range(30)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
