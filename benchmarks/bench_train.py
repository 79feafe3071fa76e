"""Training speed on CPU: seconds per step and whether the trainer waited on the reader.

For each model (default: FC-DenseNet56 and the default UNet) at batch 4, 256x256, one channel:

* model-only: the real distributed train step (train_unet.Trainer) on one fixed in-memory batch;
* with the reader: the same step fed by the real ImageReader (reader_count 1, augmentation on) through
  the strategy's distributed dataset, as train_unet.py runs it. After the first WARMUP steps it reports
  how many of the reader's batches found their worker with no batch ready (the reader was starved: the
  consumer blocked > 1 ms on the worker), and the time the train loop spent fetching each batch from
  the tf.data pipeline (median, 90th percentile, steps over 5 ms: hand-off cost and CPU scheduling).
* --ema: the same step with the moving average of the weights (--ema_decay, the default) and without,
  alternating in one process: what the average costs per step.
* --reference: FC-DenseNet56 (256x256) and the unet3d (16x128x128) built with Keras' stock
  BatchNormalization (what a plain Keras port does), timed alternately with ours (the fused kernel) in the
  same process, so the ratio survives the shared machine's noise.

The machine is shared: absolute seconds move with the load (printed before and after); compare the
ratios measured within one run. Data: the shared NIST phase-contrast images (built into a temporary
LMDB with build_lmdb.py), else synthetic 256x256 images.

    python benchmarks/bench_train.py                 # both models, ~4 minutes on the shared 2-core CPU
    python benchmarks/bench_train.py --models unet --steps 40
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from segkit import tfquiet  # noqa: E402
from train_unet import ONEDNN_TRAINING  # noqa: E402

tfquiet.default_onednn(ONEDNN_TRAINING)  # the CPU kernels train_unet.py runs with (unless TF_ENABLE_ONEDNN_OPTS is set)

import numpy as np  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "nist-phase-contrast")
WARMUP = 3


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_databases(folder: str) -> tuple[str, str]:
    import build_lmdb

    if os.path.isdir(SHARED):
        images, masks = os.path.join(SHARED, "images"), os.path.join(SHARED, "masks")
    else:  # synthetic stand-in
        import tifffile

        images, masks = os.path.join(folder, "images"), os.path.join(folder, "masks")
        os.makedirs(images), os.makedirs(masks)
        rng = np.random.default_rng(0)
        for i in range(12):
            tifffile.imwrite(os.path.join(images, f"s{i}.tif"), rng.integers(0, 4000, (256, 256), dtype=np.uint16))
            tifffile.imwrite(os.path.join(masks, f"s{i}.tif"), (rng.random((256, 256)) > 0.7).astype(np.uint8))
    out = os.path.join(folder, "lmdb")
    code = build_lmdb.main(["--image_folder", images, "--mask_folder", masks, "--output_folder", out,
                            "--dataset_name", "bench", "--number_classes", "2"])
    if code != 0:
        sys.exit("build_lmdb.py failed")
    return os.path.join(out, "train-bench.lmdb"), os.path.join(out, "test-bench.lmdb")


def run_config(model: str, train_db: str, test_db: str, out: str, batch: int, *extra: str) -> dict:
    import train_unet

    args = train_unet.build_parser().parse_args(["--train_database", train_db, "--test_database", test_db,
                                                 "--output_dir", out, "--model", model, "--batch_size", str(batch),
                                                 "--crop_size", "256", "--reader_count", "1", *extra])
    return train_unet.resolve_config(args)


def time_steps(trainer, batches, steps: int) -> tuple[list[float], list[float]]:
    """(fetch seconds, step seconds) per step after WARMUP steps; ``batches`` is an iterator."""
    fetch, compute = [], []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        float(trainer.train_step(batch)["loss"])
        t2 = time.perf_counter()
        if i >= WARMUP:
            fetch.append(t1 - t0)
            compute.append(t2 - t1)
    return fetch, compute


def alternate(steps: int, **step_fns) -> dict[str, float]:
    """Median seconds of each zero-argument step function, called in turn (one call each per round) so
    that the machine's load hits all alike; the first WARMUP rounds (tracing) are not timed."""
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    for i in range(WARMUP + steps):
        for name, fn in step_fns.items():
            t = time.perf_counter()
            fn()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(values) for name, values in times.items()}


def fixed_batches(strategy, config):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    h, w = config["crop_size"]
    images = rng.normal(size=(config["batch_size"], h, w, config["channels"])).astype(np.float32)
    labels = (rng.random((config["batch_size"], h, w)) > 0.7).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    return iter(strategy.experimental_distribute_dataset(data))


def bench_model(model: str, dbs, folder: str, steps: int, batch: int) -> None:
    import tensorflow as tf

    import train_unet

    config = run_config(model, *dbs, os.path.join(folder, model), batch)
    strategy = tf.distribute.MirroredStrategy()
    trainer = train_unet.Trainer(config, strategy, mixed=False)
    trainer.set_learning_rate(config["learning_rate"])
    _, alone = time_steps(trainer, fixed_batches(strategy, config), steps)
    train_reader, test_reader = train_unet.make_readers(config, 1, 0, 1, 0)
    try:
        batches = iter(train_unet.distribute(strategy, train_reader))
        time_steps(trainer, batches, 0)  # warm-up: the ring fills, the step is traced
        counts = train_reader.batches_delivered, train_reader.batches_starved
        fetch, compute = time_steps(trainer, batches, steps)
        delivered = train_reader.batches_delivered - counts[0]
        starved = train_reader.batches_starved - counts[1]
    finally:
        train_reader.close()
        test_reader.close()
    ms = np.array(fetch) * 1000
    print(f"{model:<14} batch {batch}, 256x256x1: model-only {statistics.median(alone):.3f} s/step (median of {steps}); "
          f"with reader {statistics.median(compute):.3f} s/step; reader starved on {starved}/{delivered} batches; "
          f"fetch median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, > 5 ms in {int(np.sum(ms > 5))}/{steps} "
          f"steps   [load {load()}]")


def bench_ema(model: str, dbs, folder: str, steps: int, batch: int) -> None:
    """The train step with the weights' moving average (the default --ema_decay) and without, alternating."""
    import tensorflow as tf

    import train_unet

    strategy = tf.distribute.MirroredStrategy()

    def step_fn(decay: str):
        config = run_config(model, *dbs, os.path.join(folder, f"{model}-ema{decay}"), batch, "--ema_decay", decay)
        trainer = train_unet.Trainer(config, strategy, mixed=False)
        trainer.set_learning_rate(config["learning_rate"])
        data = next(fixed_batches(strategy, config))  # the one fixed batch, fetched outside the timing
        return lambda: float(trainer.train_step(data)["loss"])

    medians = alternate(steps, off=step_fn("0"), on=step_fn(str(train_unet.EMA_DEFAULT_DECAY)))
    off, on = medians["off"], medians["on"]
    print(f"{model:<14} batch {batch}: train step without the moving average {off:.3f} s, with it {on:.3f} s: "
          f"ratio {on / off:.3f}   [load {load()}]")


REFERENCE_SHAPES = {"fcdensenet56": (256, 256), "unet3d": (16, 128, 128)}  # spatial shape of --reference's batch


def bench_reference(model_name: str, steps: int, batch: int) -> None:
    """A model with stock Keras BatchNormalization vs ours, alternating steps in one process."""
    import keras
    import tensorflow as tf

    import models
    import models.layers

    def step_fn(model):
        optimizer = keras.optimizers.Adam(1e-4)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) + sum(model.losses, 0.0)
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss
        return step

    ours = step_fn(models.build_model(model_name, 1, 2))
    fused = models.layers.FusedBatchNormalization
    models.layers.FusedBatchNormalization = keras.layers.BatchNormalization
    try:
        stock = step_fn(models.build_model(model_name, 1, 2))
    finally:
        models.layers.FusedBatchNormalization = fused
    shape = REFERENCE_SHAPES[model_name]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, *shape, 1)), tf.float32)
    y = tf.constant(rng.random((batch, *shape)) > 0.7, tf.int32)
    medians = alternate(steps, stock=lambda: float(stock(x, y)), ours=lambda: float(ours(x, y)))
    s, o = medians["stock"], medians["ours"]
    print(f"{model_name} plain step, batch {batch} of {'x'.join(map(str, shape))}, stock Keras BatchNormalization "
          f"{s:.3f} s vs fused {o:.3f} s: ratio {o / s:.2f}   [load {load()}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcdensenet56", "unet"])
    parser.add_argument("--steps", type=int, default=6, help="timed FC-DenseNet steps per measurement (UNet: 4x; "
                                                             "after 3 warm-up steps)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--reference", type=int, default=1, help="1 = also time FC-DenseNet56 and the unet3d with stock Keras BN")
    parser.add_argument("--ema", type=int, default=1, help="1 = also time each model's step with and without --ema_decay")
    args = parser.parse_args(argv)
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} cores, intra/inter-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads()}/{tf.config.threading.get_inter_op_parallelism_threads()} "
          f"(0 = default); load average before: {load()}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
        dbs = make_databases(folder)
        for model in args.models:
            steps = args.steps if model.startswith("fcdense") else 4 * args.steps
            bench_model(model, dbs, folder, steps, args.batch_size)
            if args.ema:
                bench_ema(model, dbs, folder, steps, args.batch_size)
    if args.reference:
        for model in REFERENCE_SHAPES:
            bench_reference(model, max(4, args.steps // 2), args.batch_size)
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
