"""Inference benchmark: is the time spent in the model, and does memory stay bounded out of core?

    python benchmarks/bench_inference.py [--size 4096] [--big_size 20000] [--tile_size 1024]
                                         [--batch_size 1] [--skip_big] [--work_dir bench_output/inference]
    python benchmarks/bench_inference.py --side_by_side [--side_models fcdensenet56 unet] [--side_size 4096]
                                         [--repeats 2] [--side_flags --halo exact ...]

Side by side: the original toolkit's inference, FC-DenseNet56 with random weights, and ours
(``inference_unet.py``, each ``--side_models`` model with random weights), whole processes alternately on
the same folder. The original runs from its own code with its layout turned channels-last
(``benchmarks/original_nhwc.py``): as shipped (``../shared/anchors/nist-anchor infer``, NCHW through
oneDNN, ``--side_as_shipped``) TensorFlow 2.21 needs over 400 s per 256x256 image on the development
machine, two orders of magnitude more than its algorithm costs. The folders: the 20 NIST test images,
and with ``--side_size`` one synthetic image of that edge. Prints each run's wall time, CPU seconds, peak RSS
(the process and its children) and load, then the best of each and its ratios to the original.

Model: the default UNet (``models.build_model("unet", 1, 2)``, random weights) + softmax, exported
as a SavedModel per the contract in ``model_metadata`` (halo = its theoretical receptive-field
radius, rounded up to the size factor, as inference uses by default).

Part A (in memory): one ``--size`` squared uint16 single-channel image through
``inference_unet.segment_folder`` (whole-image statistics, tile reading and normalization in the
prefetch thread, forward passes, stitching, compressed TIFF write) -- "end-to-end seconds" -- and,
in the same process, the seconds the forward pass alone needs for the same tiles (same tile shape
and batches, tiles prepared beforehand). Their ratio is the overhead around the model (target
<= 1.25). The two are measured alternately, three times, and the fastest of each is used. The seconds
spent inside the forward calls during the end-to-end run are printed too.

Part B (out of core): a ``--big_size`` squared uint16 image written to disk tile by tile
(zlib-compressed tiled BigTIFF; generation holds one tile at a time), segmented by
``inference_unet.segment_folder`` (what the CLI runs) with the default memory limit: peak RSS
(target < 2 GB), megapixels/s, and wall time over the seconds spent inside the forward calls of
that same run (a 20000^2 run takes too long to repeat forward-only under the same load).

Volume (``--volume Z,Y,X``, issue #15): a Z x Y x X uint8 volume written chunk by chunk as OME-Zarr
(10 nm isotropic voxels, 32x256x256 chunks), segmented by ``inference_unet.segment_folder`` with the default
3D UNet (``models.build_model("unet3d", ...)`` at its default configuration, random weights, exported as
train_unet.py exports) and ``--volume_memory_mb`` (default 64) far below the volume's float32 working set,
so it runs out of core, writing OME-Zarr. Prints wall time over the seconds inside the forward calls of the
same run (target <= 1.25), voxels/s and peak RSS (target < 2 GB).

Blocks (``--blocks``, issue #21): one ``--blocks_shape`` uint16 volume (a TIFF stack; the default UNet
section by section) into OME-Zarr, by one process with 2 TensorFlow threads, then by 2 shard processes at
once with 1 thread each (TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS / OMP_NUM_THREADS); whole CLI
processes, model loading included (about 5 CPU seconds of TensorFlow start-up per process: use a volume
large enough that prediction dominates). Prints both wall times, their ratio (target <= 1.2), each process's
peak RSS, and how many mask pixels differ.

Each part runs in its own subprocess, so each peak RSS (VmHWM) is that part's alone. The machine
is shared and noisy: the load average is printed; trust the ratio (measured within one run) over
absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPEATS = 3  # part A: end-to-end and forward-only runs, alternated; the fastest of each counts


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class TimedPredictor:
    """Wraps a predictor; adds up the seconds spent inside its forward passes during a run."""

    def __init__(self, predict_fn):
        self.predict_fn, self.seconds, self.calls = predict_fn, 0.0, 0

    def __call__(self, batch_nhwc: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.predict_fn(batch_nhwc)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def export_default_unet(path: str) -> str:
    """The registry's default UNet with random weights, softmax on top, exported per the contract."""
    return export_random_model(path, "unet")


def export_random_model(path: str, name: str) -> str:
    """Registry model ``name`` (default configuration, random weights) + softmax, exported per the contract."""
    import models
    from segkit import model_metadata

    config = models.model_config(name)
    try:
        meta = model_metadata.load(path)
        if meta.model == name and dict(meta.model_config) == config:
            return path  # exported by an earlier run, same default configuration
    except ValueError:
        pass
    import tensorflow as tf

    model = models.build_model(name, 1, 2, **config)
    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="images")])
    def serve(images):
        return {"probabilities": tf.nn.softmax(model(images, training=False), axis=-1)}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    radius = models.receptive_field_radius(name, **config)
    meta = {
        "format": model_metadata.FORMAT, "format_version": model_metadata.FORMAT_VERSION, "model": name,
        "model_config": config, "channels": 1, "number_classes": 2, "image_dtype": "uint16",
        "normalization": {"method": "zscore_per_channel_whole_image", "epsilon": 1e-6},
        "size_factor": models.size_factor(name, **config), "receptive_field_radius": radius,
        "effective_receptive_field_radius": radius, "training_tile_size": [512, 512], "final_metrics": {},
        "signature": dict(model_metadata.SIGNATURE),
    }
    with open(model_metadata.metadata_path(path), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    return path


def synthetic_tile(y0: int, x0: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint16 cells-on-background texture for rows y0.. and columns x0.. (same pixels however it is cut)."""
    yy = np.arange(y0, y0 + height, dtype=np.float32)[:, None]
    xx = np.arange(x0, x0 + width, dtype=np.float32)[None, :]
    cells = np.sin(yy / 9.0 + 0.3 * np.sin(xx / 23.0)) * np.cos(xx / 11.0 + 0.2 * np.cos(yy / 17.0))
    noise = np.random.default_rng([seed, y0, x0]).normal(0, 60, (height, width))
    return np.clip(8000 + 3000 * (cells > 0.4) + 500 * cells + noise, 0, 65535).astype(np.uint16)


def write_big_tiff(path: str, size: int, tile: int = 512) -> float:
    """Write a size x size uint16 tiled BigTIFF tile by tile; returns seconds."""
    import tifffile

    start = time.perf_counter()
    tiles = (synthetic_tile(y, x, min(tile, size - y), min(tile, size - x))
             for y in range(0, size, tile) for x in range(0, size, tile))
    tmp = path + ".partial"
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(tiles, shape=(size, size), dtype=np.uint16, tile=(tile, tile), compression="zlib",
                  compressionargs={"level": 1}, photometric="minisblack", metadata=None)
    os.replace(tmp, path)
    return time.perf_counter() - start


def part_a(args: argparse.Namespace) -> dict:
    import tifffile

    import inference_unet as inf
    from segkit import image_io, tiling

    model = export_default_unet(os.path.join(args.work_dir, "unet_savedmodel"))
    folder = os.path.join(args.work_dir, "a_images")
    os.makedirs(folder, exist_ok=True)
    image = synthetic_tile(0, 0, args.size, args.size)
    tifffile.imwrite(os.path.join(folder, "a.tif"), image, compression="zlib")
    options = dict(saved_model_filepath=model, image_folder=folder, output_folder=os.path.join(args.work_dir, "a_out"),
                   tile_size=args.tile_size, batch_size=args.batch_size, overwrite=True)
    settings = inf.resolve_settings(**options)
    predictor = inf.SavedModelPredictor(model)

    # The same tiles, batches and shapes as inference uses, prepared beforehand.
    mean, std = image_io.image_stats(image[..., None])
    plan = tiling.plan_tiles((args.size, args.size), settings.tile_size, settings.halo, settings.size_factor)
    tiles = [image_io.normalize(tiling.read_tile(image[..., None], plan, zones[0]), mean, std)
             for _, zones in tiling.tile_groups(plan)]
    batches = [np.stack(tiles[i : i + args.batch_size]) for i in range(0, len(tiles), args.batch_size)]
    predictor(batches[0])  # warm-up: first call of this shape builds the kernels (both runs below get it warm)

    end_to_end, forward, in_model = [], [], []
    for _ in range(REPEATS):
        reset_peak_rss()
        start = time.perf_counter()
        timed = TimedPredictor(predictor)
        summary = inf.segment_folder(predict_fn=timed, **options)
        end_to_end.append(time.perf_counter() - start)
        in_model.append(timed.seconds)
        peak = peak_rss_mb()
        assert summary.segmented == ["a.tif"], summary.line()
        start = time.perf_counter()
        for batch in batches:
            predictor(batch)
        forward.append(time.perf_counter() - start)
    megapixels = args.size * args.size / 1e6
    return {
        "image": f"{args.size}x{args.size} uint16", "tiles": len(tiles),
        "tile_shape": list(plan.tile_shape), "halo": settings.halo, "batch_size": args.batch_size,
        "end_to_end_s": end_to_end, "forward_only_s": forward, "in_model_s": in_model,
        "ratio": min(end_to_end) / min(forward), "megapixels_per_s": megapixels / min(end_to_end),
        "peak_rss_mb_during_end_to_end": peak,
    }


def part_b(args: argparse.Namespace) -> dict:
    model = export_default_unet(os.path.join(args.work_dir, "unet_savedmodel"))
    folder = os.path.join(args.work_dir, f"b_images_{args.big_size}")
    path = os.path.join(folder, "big.tif")
    generated = None
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        generated = write_big_tiff(path, args.big_size)
    generation_peak = peak_rss_mb()
    run = timed_folder_run(model, folder, "big.tif", output_folder=os.path.join(args.work_dir, "b_out"),
                           tile_size=args.tile_size, batch_size=args.batch_size)
    return {
        "image": f"{args.big_size}x{args.big_size} uint16 on disk ({os.path.getsize(path) / 2**20:.0f} MB zlib tiled BigTIFF)",
        "generation_s": generated, "generation_peak_rss_mb": generation_peak, **run,
        "megapixels_per_s": args.big_size**2 / 1e6 / run["seconds"],
    }


def timed_folder_run(model: str, folder: str, image_name: str, **options) -> dict:
    """``segment_folder`` on ``folder`` (the model loaded first, not timed with the run): the image's log
    line ("out of core" or "in memory"), failures, model load, wall and in-model seconds, forward calls
    and peak RSS of the run."""
    import inference_unet as inf
    from segkit import cliutil

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("inference_unet").addHandler(handler)
    logging.getLogger("inference_unet").setLevel(logging.INFO)  # TensorFlow's import (export) may have set up the root
    cliutil.setup_logging()
    start = time.perf_counter()
    predictor = inf.SavedModelPredictor(model)
    load_seconds = time.perf_counter() - start
    timed = TimedPredictor(predictor)
    reset_peak_rss()
    start = time.perf_counter()
    summary = inf.segment_folder(predict_fn=timed, saved_model_filepath=model, image_folder=folder, overwrite=True,
                                 **options)
    seconds = time.perf_counter() - start
    return {"failed": len(summary.failed), "detail": next((line for line in lines if line.startswith(image_name + ":")), "?"),
            "model_load_s": load_seconds, "seconds": seconds, "in_model_s": timed.seconds, "calls": timed.calls,
            "peak_rss_mb": peak_rss_mb()}


def print_timed_run(run: dict, ratio_note: str) -> None:
    """The lines :func:`timed_folder_run`'s figures print as, after the part's own header."""
    print(f"   failed images   {run['failed']:8d}")
    print(f"   model load      {run['model_load_s']:8.1f} s   (TensorFlow import included; not in the wall time)")
    print(f"   wall time       {run['seconds']:8.1f} s   (statistics pass, reading, prediction, writing)")
    print(f"   in the model    {run['in_model_s']:8.1f} s   ({run['calls']} forward calls timed inside the run)")
    print(f"   ratio           {run['seconds'] / run['in_model_s']:8.3f}     ({ratio_note})")


def export_default_unet3d(path: str, voxel_size_um=(0.01, 0.01, 0.01)) -> str:
    """The default unet3d for ``voxel_size_um``, random weights, exported through train_unet.py's serving module."""
    import models
    from segkit import model_metadata

    config = models.model_config("unet3d", voxel_size=list(voxel_size_um))
    try:
        meta = model_metadata.load(path)
        if meta.model == "unet3d" and dict(meta.model_config) == config:
            return path
    except ValueError:
        pass
    from segkit.training.export import export_untrained_volume_model

    return export_untrained_volume_model(path, config)


def write_volume_zarr(path: str, shape: tuple[int, int, int], chunks=(32, 256, 256),
                      voxel_size_um=(0.01, 0.01, 0.01)) -> float:
    """A uint8 blob texture as OME-Zarr (its voxel size in the metadata), written one chunk slab at a time;
    returns seconds."""
    import zarr

    start = time.perf_counter()
    tmp = path + ".partial"
    group = zarr.open_group(tmp, mode="w", zarr_format=2)
    array = group.create_array("0", shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)), dtype="uint8")
    for z0 in range(0, shape[0], chunks[0]):
        z1 = min(z0 + chunks[0], shape[0])
        slab = np.stack([synthetic_tile(0, 0, shape[1], shape[2], seed=z) for z in range(z0, z1)])
        array[z0:z1] = (slab // 64).clip(0, 255).astype(np.uint8)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"}
                                                             for a in "zyx"],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [float(v) for v in voxel_size_um]}]}]}]
    os.replace(tmp, path)
    return time.perf_counter() - start


def part_v(args: argparse.Namespace) -> dict:
    shape = tuple(int(v) for v in args.volume.split(","))
    voxel = tuple(float(v) for v in args.volume_voxel_size.split(","))
    tag = "x".join(f"{v:g}" for v in voxel)
    model = export_default_unet3d(os.path.join(args.work_dir, f"unet3d_savedmodel_{tag}"), voxel)
    folder = os.path.join(args.work_dir, f"v_images_{'x'.join(map(str, shape))}_{tag}")
    path = os.path.join(folder, "volume.zarr")
    generated = None
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        generated = write_volume_zarr(path, shape, voxel_size_um=voxel)
    tile = {"tile_size": args.volume_tile_size} if args.volume_tile_size else {}
    run = timed_folder_run(model, folder, "volume.zarr", output_folder=os.path.join(args.work_dir, "v_out"),
                           image_format="zarr", output_format="zarr", memory_limit_mb=args.volume_memory_mb, **tile)
    voxels = int(np.prod(shape))
    return {
        "image": f"{'x'.join(map(str, shape))} uint8 OME-Zarr ({voxels / 2**20:.0f} MB; float32 {4 * voxels / 2**20:.0f} MB), "
                 f"voxel {tag} um",
        "memory_limit_mb": args.volume_memory_mb, "tile_size": args.volume_tile_size or "default",
        "generation_s": generated, **run, "voxels_per_s": voxels / run["seconds"],
    }


# --- side by side with the original (../shared/anchors/nist-anchor infer) ---------------------------

def _shared(*parts: str) -> str:
    """``shared/...`` beside the project, or beside a folder above it (git worktrees live deeper)."""
    folder = os.path.dirname(ROOT)
    while True:
        path = os.path.join(folder, "shared", *parts)
        if os.path.exists(path) or os.path.dirname(folder) == folder:
            return path
        folder = os.path.dirname(folder)


ANCHOR = _shared("anchors", "nist-anchor")
NIST = _shared("data", "nist-phase-contrast")


def nist_test_folder(work_dir: str) -> str:
    """The 20 NIST test images (test_files.txt), symlinked into a scratch folder (never copied)."""
    folder = os.path.join(work_dir, "nist_test_images")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(NIST, "test_files.txt")) as fh:
        names = [line.strip() for line in fh if line.strip()]
    for name in names:
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(NIST, "images", name), link)
    return folder


def big_image_folder(work_dir: str, size: int) -> str:
    import tifffile

    folder = os.path.join(work_dir, f"side_{size}")
    path = os.path.join(folder, "big.tif")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        tifffile.imwrite(path, synthetic_tile(0, 0, size, size), compression="zlib")
    return folder


def timed_process(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MB: of the process and the children it waited for; stdout).

    CPU seconds (user + system) depend less on other users' load than wall time does."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this process tree alone
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read()


def run_ours(model: str, folder: str, out: str, extra: list[str], onednn: str | None) -> tuple[float, float, float]:
    cmd = [sys.executable, os.path.join(ROOT, "inference_unet.py"), "--saved_model_filepath", model, "--image_folder",
           folder, "--output_folder", out, "--overwrite", "1", *extra]
    env = dict(os.environ)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    wall, cpu, peak, _ = timed_process(cmd, env)
    return wall, cpu, peak


def run_anchor(folder: str, out: str) -> tuple[float, float, float]:
    """The original's inference.py as shipped: its own wall time (process start-up included); CPU seconds and peak
    RSS of the anchor's process tree (which also builds and saves the random checkpoint first)."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1")  # the original's NCHW convolutions need oneDNN on the CPU
    _, cpu, peak, text = timed_process([sys.executable, ANCHOR, "infer", folder, out], env)
    line = next(line for line in text.splitlines() if line.startswith("nist-anchor infer:"))
    return float(line.split(":")[1].split()[0]), cpu, peak


def run_original_nhwc(folder: str, out: str, checkpoint: str) -> tuple[float, float, float]:
    """The original's inference.py and model.py turned channels-last (benchmarks/original_nhwc.py), in a process
    of its own, timed from the shell like ours (interpreter start-up included)."""
    script = os.path.join(ROOT, "benchmarks", "original_nhwc.py")
    wall, cpu, peak, _ = timed_process([sys.executable, script, "infer", checkpoint, folder, out], dict(os.environ))
    return wall, cpu, peak


def original_checkpoint(work_dir: str) -> str:
    """A randomly initialised checkpoint of the original FC-DenseNet56 (seed 0), made once."""
    prefix = os.path.join(work_dir, "original_nhwc_ckpt", "ckpt")
    if not os.path.exists(prefix + ".index"):
        script = os.path.join(ROOT, "benchmarks", "original_nhwc.py")
        out = subprocess.run([sys.executable, script, "checkpoint", prefix], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]
    return prefix


def side_by_side(args: argparse.Namespace) -> None:
    """Ours and the original alternately on the same folder, ``--repeats`` times; prints each run and the ratios
    to the original (channels-last: ``original_nhwc.py``; the anchor as shipped too with ``--side_as_shipped``)."""
    if not (os.path.exists(ANCHOR) and os.path.isdir(NIST)):
        sys.exit(f"side by side needs {ANCHOR} and {NIST}")
    cases = [("NIST test, 20 x 256x256", nist_test_folder(args.work_dir), 20 * 256 * 256)]
    if args.side_size:
        cases.append((f"{args.side_size}x{args.side_size}", big_image_folder(args.work_dir, args.side_size),
                      args.side_size**2))
    if args.side_only_size:
        cases = cases[1:]
    models = {name: export_random_model(os.path.join(args.work_dir, f"{name}_savedmodel"), name)
              for name in args.side_models}
    checkpoint = original_checkpoint(args.work_dir)
    settings = [None] if args.side_onednn == "default" else ["0", "1"]
    variants = [[]] + [shlex.split(v) for v in args.side_variant]
    ours = {f"ours {name}{'' if o is None else ' oneDNN ' + ('off', 'on')[int(o)]}{' ' + ' '.join(v) if v else ''}":
            (path, o, v) for name, path in models.items() for o in settings for v in variants}
    originals = ["original FC-DenseNet56 channels-last"] + (["original FC-DenseNet56 as shipped"] if args.side_as_shipped
                                                            else [])
    print("the original: its inference.py and model.py run channels-last (benchmarks/original_nhwc.py)"
          + ("; as shipped with TF_ENABLE_ONEDNN_OPTS=1 (its NCHW convolutions fail without oneDNN on the CPU)"
             if args.side_as_shipped else ""))
    for label, folder, pixels in cases:
        runs: dict[str, list[tuple[float, float, float]]] = {}
        for repeat in range(args.repeats):
            order = originals + list(ours) if repeat % 2 == 0 else list(ours) + originals
            for who in order:
                load = os.getloadavg()[0]
                out = os.path.join(args.work_dir, "side_out_" + who.replace(" ", "_"))
                if who.endswith("as shipped"):
                    result = run_anchor(folder, out)
                elif who.startswith("original"):
                    result = run_original_nhwc(folder, out, checkpoint)
                else:
                    path, onednn, variant = ours[who]
                    result = run_ours(path, folder, out, [*args.side_flags, *variant], onednn)
                runs.setdefault(who, []).append(result)
                print(f"  {label}: {who:>38} {result[0]:7.2f} s  cpu {result[1]:7.1f} s  peak RSS {result[2]:6.0f} MB  "
                      f"(load {load:.1f})", flush=True)
        base_wall = min(w for w, _, _ in runs[originals[0]])
        base_cpu = min(c for _, c, _ in runs[originals[0]])
        print(f"\n{label}: best of {args.repeats} (wall incl. process start-up; CPU = user + system of the process "
              f"tree; peak RSS of the process tree); ratios to the {originals[0]}")
        for who, results in runs.items():
            wall, cpu, peak = min(r[0] for r in results), min(r[1] for r in results), max(r[2] for r in results)
            print(f"  {who:<40} {wall:8.2f} s  x{wall / base_wall:5.2f}  cpu {cpu:7.1f} s  x{cpu / base_cpu:5.2f}  "
                  f"{pixels / 1e6 / wall:6.3f} MP/s  peak RSS {peak:6.0f} MB")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def _threads_env(threads: int) -> dict:
    return {**os.environ, "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_processes(commands: list[list[str]], threads: int) -> tuple[float, list[float]]:
    """Run ``commands`` at once; (wall seconds until the last ends, peak RSS MB of each)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=_threads_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for cmd in commands]
    peaks = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(proc.args[:2])} failed:\n{proc.stderr.read().decode()[-3000:]}")
        peaks.append(usage.ru_maxrss / 1024)
    return time.perf_counter() - start, peaks


def blocks_mode(args: argparse.Namespace) -> None:
    """One volume by 1 process with 2 threads vs 2 shard processes with 1 thread each (module docstring)."""
    import shutil

    import tifffile
    import zarr

    shape = tuple(int(n) for n in args.blocks_shape.split(","))
    model = export_default_unet(os.path.join(args.work_dir, "unet_saved_model"))
    images = os.path.join(args.work_dir, "blocks_images")
    os.makedirs(images, exist_ok=True)
    volume_path = os.path.join(images, "volume.tif")
    if not os.path.exists(volume_path) or tifffile.TiffFile(volume_path).series[0].shape != shape:
        tifffile.imwrite(volume_path, np.stack([synthetic_tile(0, 0, shape[1], shape[2], seed=z)
                                                for z in range(shape[0])]), imagej=True, metadata={"axes": "ZYX"})
    runs = {}
    for label, shards, threads in (("1 process x 2 threads", 1, 2), ("2 shards x 1 thread", 2, 1)):
        out = os.path.join(args.work_dir, f"blocks_out_{shards}")
        shutil.rmtree(out, ignore_errors=True)
        base = [sys.executable, os.path.join(ROOT, "inference_unet.py"), "--saved_model_filepath", model,
                "--image_folder", images, "--output_folder", out, "--output_format", "zarr",
                "--tile_size", str(args.tile_size), "--batch_size", str(args.batch_size)]
        commands = [base] if shards == 1 else [base + ["--shard_index", str(i), "--shard_count", str(shards)]
                                               for i in range(shards)]
        runs[label] = _run_processes(commands, threads) + (out,)
    (one_s, one_rss, one_out), (two_s, two_rss, two_out) = runs.values()
    differ = int(np.count_nonzero(zarr.open_array(os.path.join(one_out, "volume.zarr", "0"), mode="r")[...]
                                  != zarr.open_array(os.path.join(two_out, "volume.zarr", "0"), mode="r")[...]))
    print(f"\nBlocks. {'x'.join(map(str, shape))} uint16 volume, default UNet section by section, tile {args.tile_size}")
    print(f"   1 process, 2 threads   {one_s:8.1f} s   peak RSS {one_rss[0]:.0f} MB")
    print(f"   2 shards, 1 thread each {two_s:7.1f} s   peak RSS per shard {', '.join(f'{r:.0f}' for r in two_rss)} MB")
    print(f"   ratio                  {two_s / one_s:8.3f}     (2 shards / 1 process; target <= 1.2)")
    print(f"   mask pixels differing  {differ:8d}     (2 vs 1 TensorFlow threads round sums differently: a few argmax "
          "ties of random weights may flip; at equal thread counts shards equal one process exactly)")


def run_part(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--size", str(args.size), "--big_size",
           str(args.big_size), "--tile_size", str(args.tile_size), "--batch_size", str(args.batch_size),
           "--work_dir", args.work_dir, "--volume", args.volume, "--volume_memory_mb", str(args.volume_memory_mb),
           "--volume_voxel_size", args.volume_voxel_size, "--volume_tile_size", args.volume_tile_size]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"part {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="part A image edge (in memory)")
    p.add_argument("--big_size", type=int, default=20000, help="part B image edge (out of core)")
    p.add_argument("--tile_size", type=int, default=1024, help="zone size passed to inference")
    p.add_argument("--batch_size", type=int, default=1, help="tiles per forward pass")
    p.add_argument("--skip_big", action="store_true", help="run part A only")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "bench_output", "inference"))
    p.add_argument("--side_by_side", action="store_true",
                   help="instead of parts A/B: ours and the original (../shared/anchors/nist-anchor infer) alternately "
                        "on the 20 NIST test images (and a --side_size image), whole processes")
    p.add_argument("--side_models", nargs="+", default=["fcdensenet56", "unet"], help="our models, random weights")
    p.add_argument("--side_size", type=int, default=0, help="also one synthetic image of this edge (0: none)")
    p.add_argument("--side_flags", nargs=argparse.REMAINDER, default=[], help="extra flags for inference_unet.py")
    p.add_argument("--repeats", type=int, default=2, help="side by side: alternated repeats")
    p.add_argument("--side_as_shipped", action="store_true",
                   help="also run the anchor as shipped (NCHW through oneDNN: >400 s per 256x256 image on the 2-core "
                        "development machine)")
    p.add_argument("--side_variant", action="append", default=[],
                   help="side by side: also run each of our models with these inference_unet.py flags (quoted; "
                        "repeatable), e.g. --side_variant='--tile_size 2048'")
    p.add_argument("--side_only_size", action="store_true", help="side by side: skip the NIST folder")
    p.add_argument("--side_onednn", choices=["default", "both"], default="default",
                   help="both: run ours with TF_ENABLE_ONEDNN_OPTS=0 and =1 (alternating with the rest)")
    p.add_argument("--blocks", action="store_true",
                   help="instead of parts A/B: one volume by 1 process with 2 threads vs 2 shard processes with 1 "
                        "thread each (block by block, OME-Zarr)")
    p.add_argument("--blocks_shape", default="16,1024,1024", help="--blocks: the volume's z,y,x")
    p.add_argument("--volume", default="",
                   help="instead of parts A/B: this Z,Y,X uint8 OME-Zarr volume, default 3D UNet, out of core "
                        "(issue #15: 256,512,512)")
    p.add_argument("--volume_memory_mb", type=float, default=64, help="--volume: inference's --memory_limit_mb")
    p.add_argument("--volume_voxel_size", default="0.01,0.01,0.01",
                   help="--volume: z,y,x voxel size in um, of the volume and of the default unet3d built for it "
                        "(e.g. 0.04,0.004,0.004 for serial-section EM: pooling (1,2,2) first, a z halo of 10)")
    p.add_argument("--volume_tile_size", default="",
                   help="--volume: inference's --tile_size (z,y,x zone per tile; default: inference's own)")
    p.add_argument("--part", choices=["a", "b", "v"], help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if args.blocks:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: timings are noisy)")
        blocks_mode(args)
        return
    if args.side_by_side:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: timings are noisy)")
        side_by_side(args)
        return
    if args.part:
        print(json.dumps({"a": part_a, "b": part_b, "v": part_v}[args.part](args)))
        return
    if args.volume:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: timings are noisy)")
        v = run_part("v", args)
        print(f"\nV. {v['image']}, default 3D UNet (random weights), --memory_limit_mb {v['memory_limit_mb']:g}, "
              f"--tile_size {v['tile_size']}")
        print(f"   {v['detail']}")
        if v["generation_s"] is not None:
            print(f"   generated in    {v['generation_s']:8.1f} s")
        print_timed_run(v, "wall / in-model, same run; target <= 1.25")
        print(f"   throughput      {v['voxels_per_s'] / 1e6:8.3f} megavoxels/s")
        print(f"   peak RSS        {v['peak_rss_mb']:8.0f} MB  (target < 2048; TensorFlow included)")
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: timings are noisy)")
    a = run_part("a", args)
    print(f"\nA. {a['image']}, default UNet, {a['tiles']} tiles of {a['tile_shape'][0]}x{a['tile_shape'][1]} "
          f"(halo {a['halo']}), batch {a['batch_size']}")
    print(f"   end-to-end      {min(a['end_to_end_s']):8.2f} s   (runs: {', '.join(f'{s:.2f}' for s in a['end_to_end_s'])})")
    print(f"   forward only    {min(a['forward_only_s']):8.2f} s   (runs: {', '.join(f'{s:.2f}' for s in a['forward_only_s'])})")
    print(f"   ratio           {a['ratio']:8.3f}     (target <= 1.25)")
    best = a["end_to_end_s"].index(min(a["end_to_end_s"]))
    print(f"   in the model    {a['in_model_s'][best]:8.2f} s   of that end-to-end run (forward calls timed inside it)")
    print(f"   throughput      {a['megapixels_per_s']:8.2f} megapixels/s")
    print(f"   peak RSS        {a['peak_rss_mb_during_end_to_end']:8.0f} MB  (whole process, TensorFlow included)")
    if not args.skip_big:
        b = run_part("b", args)
        print(f"\nB. {b['image']}")
        print(f"   {b['detail']}")
        if b["generation_s"] is not None:
            print(f"   generated in    {b['generation_s']:8.1f} s   (peak RSS {b['generation_peak_rss_mb']:.0f} MB)")
        print_timed_run(b, "wall / in-model, same run")
        print(f"   throughput      {b['megapixels_per_s']:8.2f} megapixels/s")
        print(f"   peak RSS        {b['peak_rss_mb']:8.0f} MB  (target < 2048; TensorFlow included)")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
