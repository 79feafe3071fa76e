"""The TensorFlow side of a training step: distribution strategy, precision, learning rate, the Trainer
(model, optimizer, moving average, distributed train / eval steps) and the readers' tf.data pipelines.

TensorFlow is imported inside the functions. README.md, "Stage 2" and "Cluster use".
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import numpy as np

import models
from segkit import devices, metrics, tfquiet
from segkit.training.config import RunConfig, config_view
from segkit.training.losses import batch_statistics, loss_from_statistics, zero_statistics

log = logging.getLogger(__name__)

COSINE_FINAL_FRACTION = 0.01  # --lr_schedule cosine ends at learning_rate / 100


def make_strategy():
    """(strategy, worker_index, worker_count, is_chief); MultiWorker when TF_CONFIG / multi-node Slurm.

    Logs :func:`segkit.devices.missing_gpu_warning` at WARNING when a GPU was expected but none is visible.
    """
    tf = tfquiet.import_tensorflow()
    warn_if_gpu_missing(len(tf.config.list_physical_devices("GPU")))
    resolver = None
    if os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    elif int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1) > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    if resolver is None or len(_workers(resolver)) <= 1:
        strategy = tf.distribute.MirroredStrategy()
        return strategy, 0, 1, True
    workers = _workers(resolver)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    me = f"{resolver.task_type}:{resolver.task_id}"
    index = workers.index(me)
    return strategy, index, len(workers), index == 0


def warn_if_gpu_missing(visible_gpus: int) -> str | None:
    """Log (WARNING) and return the missing-GPU line when Slurm / CUDA_VISIBLE_DEVICES promised a GPU."""
    warning = devices.missing_gpu_warning(visible_gpus)
    if warning:
        log.warning(warning)
    return warning


def _workers(resolver) -> list[str]:
    """'chief:0' first, then 'worker:i' in order (TensorFlow's chief convention)."""
    spec = resolver.cluster_spec().as_dict()
    names = [f"chief:{i}" for i in range(len(spec.get("chief", [])))]
    return names + [f"worker:{i}" for i in range(len(spec.get("worker", [])))]


def set_precision(requested: bool) -> bool:
    """mixed_float16 when requested and a GPU is visible; returns whether it is active."""
    import keras
    import tensorflow as tf

    if requested and not tf.config.list_physical_devices("GPU"):
        log.info("--mixed_precision 1 is ignored on CPU (no GPU visible); training in float32")
        requested = False
    keras.mixed_precision.set_global_policy("mixed_float16" if requested else "float32")
    return requested


def learning_rate_at(step: int, config: RunConfig | Mapping[str, Any], budget_spent: float = 0.0) -> float:
    """LR for the update that makes step ``step + 1``: a tenth during warm-up, then constant or cosine decay.
    ``config``: a RunConfig, or a mapping with learning_rate, warmup_steps, lr_schedule and max_steps.
    Cosine decays over the steps from warm-up to max_steps; without max_steps, over the time budget
    (--max_minutes): ``budget_spent`` is the fraction of it spent so far (0..1)."""
    c = config_view(config)
    if step < c.warmup_steps:
        return c.learning_rate / 10.0
    if c.lr_schedule == "constant":
        return c.learning_rate
    if c.max_steps is None:
        progress = min(1.0, max(0.0, float(budget_spent)))
    else:
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return c.learning_rate * (COSINE_FINAL_FRACTION + (1.0 - COSINE_FINAL_FRACTION) * cosine)


def forward(model, images, double_single: bool = True):
    """``model(images, training=False)``; with ``double_single``, a batch of one 2-D image runs as two (the
    image twice) and the first is returned: with oneDNN's CPU kernels (on for training,
    train_unet.ONEDNN_TRAINING) TensorFlow 2.21 runs the 2-D UNet on a single image 15-30x slower than
    per image of a batch of two on the AVX2 development CPU (13-19 against 0.4-0.5 CPU us per pixel),
    which made the test passes of databases with images of many sizes (one per eval batch) a quarter of
    a time budget. Images are independent in inference mode, so the result is the one image's. Volumes
    (no such slowdown measured: unet3d at batch 1 is faster with oneDNN) and GPUs run as they are."""
    import tensorflow as tf

    if not double_single or images.shape.rank != 4:
        return model(images, training=False)
    count = tf.shape(images)[0]
    doubled = tf.cond(tf.equal(count, 1), lambda: tf.concat([images, images], 0), lambda: images)
    return model(doubled, training=False)[:count]


def evaluated_weights(config: RunConfig) -> str:
    """The checkpoint name of the weights that are tested, chosen as best and exported: the moving
    average (``ema_model``) when the run keeps one, else the trained ``model`` itself."""
    return "ema_model" if config.ema_decay > 0 else "model"


def build_model(config: RunConfig):
    return models.build_model(config.model, config.channels, config.number_classes, **config.model_config)


class Trainer:
    """Model, optimizer, the weights' moving average and the distributed train / eval steps."""

    def __init__(self, config: RunConfig, strategy, mixed: bool):
        import keras
        import tensorflow as tf

        self.config, self.strategy, self.mixed = config, strategy, mixed
        self.replicas = strategy.num_replicas_in_sync
        self.number_classes = config.number_classes
        with strategy.scope():
            keras.utils.set_random_seed(config.seed)
            self.model = build_model(config)
            optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
            self.optimizer = keras.optimizers.LossScaleOptimizer(optimizer) if mixed else optimizer
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.ema_model = _averaged_copy(config, self.model) if evaluated_weights(config) == "ema_model" else None
        # Test passes, the 'best' choice, overlays and the export all use the averaged weights when there are some.
        self.eval_model = self.ema_model or self.model
        self.class_weights = tf.constant(config.class_weight_values, tf.float32)
        tracked = {"ema_model": self.ema_model} if self.ema_model is not None else {}
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step, **tracked)
        # autograph=False: the steps have no tensor-dependent Python control flow, and autograph would
        # re-read this file's source when it first traces (e.g. at the first test pass, hours in).
        self.train_step = tf.function(self._train_step, autograph=False)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True, autograph=False)
        self.double_single = not tf.config.list_logical_devices("GPU")  # see forward()
        self.predict = tf.function(lambda images: tf.argmax(forward(self.eval_model, images, self.double_single), axis=-1,
                                                            output_type=tf.int32), reduce_retracing=True,
                                   autograph=False)

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk: the model, the optimizer's slots and the average."""
        models_held = 2 if self.ema_model is not None else 1
        return int(sum(int(np.prod(w.shape)) * 4 for w in self.model.weights) * (models_held + 2))

    def max_over_replicas(self, value: float) -> float:
        """The largest ``value`` over the replicas of every worker (a collective: every worker must call it)."""
        import tensorflow as tf

        values = self.strategy.run(lambda: tf.constant(float(value), tf.float32))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.MAX, values, axis=None).numpy())

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate = value

    def _update_ema(self) -> None:
        """average <- d * average + (1 - d) * weight on every replica, d = min(decay, (1 + t) / (10 + t)) with
        t the steps done before this one (TensorFlow's ExponentialMovingAverage num_updates ramp)."""
        import tensorflow as tf

        t = tf.cast(self.step, tf.float32)
        decay = tf.minimum(tf.constant(self.config.ema_decay, tf.float32), (1.0 + t) / (10.0 + t))

        def update(average, weight):
            return average.assign(decay * average + (1.0 - decay) * tf.cast(weight, average.dtype))

        for average, weight in zip(self.ema_model.weights, self.model.weights):
            self.strategy.extended.update(average.value, update, args=(weight.value,), group=False)

    def _statistics(self, labels, logits) -> dict:
        return batch_statistics(labels, logits, self.config.loss, self.class_weights, self.number_classes)

    def _replica_train(self, images, labels):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            stats = self._statistics(labels, logits)
            data_loss = loss_from_statistics(stats, self.config.loss, self.class_weights)
            regularization = tf.add_n(self.model.losses) if self.model.losses else tf.constant(0.0)
            scaled = (data_loss + tf.cast(regularization, tf.float32)) / self.replicas
            if self.mixed:
                scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        grad_norm = tf.linalg.global_norm(grads)
        if self.config.clip_norm:  # this replica's share of the mean loss: its gradient's norm is 1/replicas of it
            limit = self.config.clip_norm / self.replicas
            if self.mixed:  # the gradients are of the scaled loss: clip in those units
                limit = limit * tf.cast(self.optimizer.dynamic_scale, tf.float32)
            grads, _ = tf.clip_by_global_norm(grads, limit, use_norm=grad_norm)
        self.optimizer.apply(grads, self.model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        finite_grads = tf.constant(1.0) if self.mixed else tf.cast(tf.math.is_finite(grad_norm), tf.float32)
        return {"loss": data_loss / self.replicas, "correct": correct, "pixels": stats["pixels"],
                "finite_grads": finite_grads / self.replicas}

    def _train_step(self, batch):
        images, labels = batch
        out = self.strategy.run(self._replica_train, args=(images, labels))
        if self.ema_model is not None:
            self._update_ema()
        return self._sum_over_replicas(out)

    def _replica_eval(self, images, labels):
        """Statistics of one batch; zeros for the empty batch a replica gets when a pass ends unevenly."""
        import tensorflow as tf

        classes = self.number_classes

        def compute():  # labels < 0: the reader's padding to the size factor, never scored
            logits = forward(self.eval_model, images, self.double_single)
            stats = batch_statistics(labels, logits, self.config.loss, self.class_weights, classes, ignore_negative=True)
            pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
            flat_labels, flat_pred = tf.reshape(labels, [-1]), tf.reshape(pred, [-1])
            scored = flat_labels >= 0
            stats["confusion"] = tf.cast(tf.math.confusion_matrix(tf.boolean_mask(flat_labels, scored),
                                                                  tf.boolean_mask(flat_pred, scored),
                                                                  num_classes=classes, dtype=tf.int32), tf.float64)
            return stats

        def empty():
            return dict(zero_statistics(self.config.loss, classes), confusion=tf.zeros([classes, classes], tf.float64))

        return tf.cond(tf.shape(images)[0] > 0, compute, empty)

    def _eval_step(self, batch):
        images, labels = batch
        return self._sum_over_replicas(self.strategy.run(self._replica_eval, args=(images, labels)))

    def _sum_over_replicas(self, out: dict) -> dict:
        import tensorflow as tf

        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    def evaluate(self, dataset) -> tuple[float, dict[str, Any], tuple | None]:
        """One full pass: (test loss, metrics.scores of the confusion matrix, first local batch for overlays)."""
        import tensorflow as tf

        totals: dict[str, np.ndarray] = {}
        first = None
        for batch in dataset:
            if first is None:
                first = tuple(self.strategy.experimental_local_results(t)[0] for t in batch)
            for k, v in self.eval_step(batch).items():
                totals[k] = totals.get(k, 0) + v.numpy().astype(np.float64)
        if not totals:
            raise RuntimeError("the test pass produced no batches")
        cm = totals.pop("confusion").round().astype(np.int64)
        loss = float(loss_from_statistics({k: tf.constant(v, tf.float32) for k, v in totals.items()},
                                          self.config.loss, self.class_weights))
        return loss, dict(metrics.scores(cm), pixels=int(cm.sum())), first


def _averaged_copy(config: RunConfig, model):
    """A second model of the same architecture to hold the moving average of every weight (BatchNorm
    statistics included), starting from ``model``'s initial weights."""
    ema = build_model(config)
    if [w.shape for w in ema.weights] != [w.shape for w in model.weights]:
        raise RuntimeError("the moving-average model's weights do not line up with the model's")
    for average, weight in zip(ema.weights, model.weights):
        average.assign(weight)
    return ema


def make_readers(config: RunConfig, replicas: int, worker_index: int, worker_count: int, start_step: int,
                 reader_factory=None):
    """Train reader (reader_count x this machine's replicas processes, own shard) and eval reader."""
    from imagereader import ImageReader

    factory = reader_factory or ImageReader
    factors = models.size_factors(config.model, **config.model_config)  # per axis: z may pool less than y, x
    # The stream is a function of (seed, shard, batch index): a resumed run starts at batch start_step and
    # draws what the uninterrupted run would have drawn there.
    train = factory(list(config.train_database), batch_size=config.batch_size, mode="train",
                    workers=config.reader_count * replicas,
                    sampling="balanced" if config.balance_classes else "shuffle",
                    augment=config.use_augmentation, crop_size=tuple(config.crop_size),
                    size_factor=factors, seed=config.seed, shard_index=worker_index, shard_count=worker_count,
                    start_batch=start_step)
    try:
        test = factory(config.test_database, batch_size=config.batch_size, mode="eval",
                       workers=config.reader_count, size_factor=factors,
                       shard_index=worker_index, shard_count=worker_count)
    except BaseException:
        train.close()
        raise
    return train, test


def distribute(strategy, reader):
    """The reader's tf.data pipeline, one batch per replica per step (sharding is done by the reader).

    A reader failure reaches the caller wrapped by tf.data (an UnknownError with the text): it is recorded
    first as ``reader.failure`` (the ReaderWorkerError itself), so the loop can tell it apart by type."""
    import tensorflow as tf

    from imagereader import ReaderWorkerError

    reader.failure = None

    def recorded():
        try:
            yield from reader
        except ReaderWorkerError as exc:
            reader.failure = exc
            raise

    def dataset_fn(_context):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        spec = reader.dataset().element_spec
        return tf.data.Dataset.from_generator(recorded, output_signature=spec).with_options(options).prefetch(2)

    return strategy.distribute_datasets_from_function(dataset_fn)
