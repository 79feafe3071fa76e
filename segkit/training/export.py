"""SavedModel export of a run's best weights: float32 serving_default ("images" NHWC -> "probabilities"
NHWC) with the metadata asset of segkit/model_metadata.py. README.md, "What the SavedModel carries".
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import time
from typing import Any

import numpy as np

import models
from segkit import cliutil, image_io, model_metadata
from segkit.training.checkpoints import json_default
from segkit.training.config import RunConfig
from segkit.training.resolve import training_instances
from segkit.training.trainer import build_model, evaluated_weights

log = logging.getLogger(__name__)

TRAINING_FIELDS = ("loss", "class_weight_values", "learning_rate", "lr_schedule", "ema_decay", "batch_size", "seed",
                   "use_augmentation", "augmentation")


def export_saved_model(config: RunConfig, weights_prefix: str, output_dir: str, final_metrics: dict[str, Any]) -> str:
    """Export the weights at ``weights_prefix`` as saved_model/ (float32, serving_default + metadata asset)."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("float32")
    model = build_model(config)
    status = tf.train.Checkpoint(**{evaluated_weights(config): model}).read(weights_prefix)
    status.assert_existing_objects_matched()  # never export initial weights because a name did not match
    status.expect_partial()  # the optimizer and the other model stay in the checkpoint
    meta = _metadata(config, model, final_metrics)
    final = os.path.join(output_dir, "saved_model")
    with cliutil.disk_space_guard(output_dir, "the SavedModel", lambda: _weights_bytes(model) * 1.5,
                                  "the checkpoints are kept, the previous saved_model/ (if any) too"):
        _save(model, config.channels, meta, final, models.spatial_rank(config.model))
    log.info("exported %s (theoretical radius %s px, effective %s px)", final, meta["receptive_field_radius"],
             meta["effective_receptive_field_radius"])
    return final


def _weights_bytes(model) -> float:
    return float(sum(int(w.numpy().nbytes) for w in model.weights))


def _metadata(config: RunConfig, model, final_metrics: dict[str, Any]) -> dict[str, Any]:
    """What the SavedModel carries, including the receptive field measured on the trained weights."""
    from models.receptive_field import effective_receptive_field

    instances = fitted_instances(config, model)
    if models.spatial_rank(config.model) == 3:
        return _volume_metadata(config, final_metrics, instances)

    radius = models.receptive_field_radius(config.model, **config.model_config)
    # Probe no larger than one training batch's pixels: export then needs no more memory than training.
    probe = int(math.sqrt(config.batch_size * config.crop_size[0] * config.crop_size[1]))
    erf = effective_receptive_field(model, size_factor=config.size_factor, theoretical_radius=radius,
                                    max_probe=max(probe, 2 * config.size_factor))
    return model_metadata.make_metadata(
        model=config.model, model_config=config.model_config, channels=config.channels,
        number_classes=config.number_classes, image_dtype=config.image_dtype,
        normalization={"method": image_io.NORMALIZATION_METHOD, "epsilon": image_io.NORMALIZATION_EPSILON},
        size_factor=config.size_factor, receptive_field_radius=radius,
        effective_receptive_field_radius=erf["radius_rounded"], effective_receptive_field=erf,
        training_tile_size=list(config.crop_size), final_metrics=final_metrics, mask_map=config.mask_map,
        training={k: config.to_dict()[k] for k in TRAINING_FIELDS}, instances=instances)


def _volume_metadata(config: RunConfig, final_metrics: dict[str, Any], instances: dict[str, Any] | None
                     ) -> dict[str, Any]:
    """A volume model's metadata: spatial rank 3, voxel size, size factor and radius per axis (z, y, x). The
    gradient probe of the effective receptive field is 2-D only: inference uses the exact theoretical halo."""
    return model_metadata.make_metadata(
        model=config.model, model_config=config.model_config, channels=config.channels,
        number_classes=config.number_classes, image_dtype=config.image_dtype, spatial_rank=3,
        voxel_size_um=list(config.model_config["voxel_size"]),
        normalization={"method": image_io.NORMALIZATION_METHOD, "epsilon": image_io.NORMALIZATION_EPSILON},
        size_factor=list(models.size_factors(config.model, **config.model_config)),
        receptive_field_radius=list(models.receptive_field_radii(config.model, **config.model_config)),
        training_tile_size=list(config.crop_size), final_metrics=final_metrics, mask_map=config.mask_map,
        training={k: config.to_dict()[k] for k in TRAINING_FIELDS}, instances=instances)


FITTED_TARGETS = ("three_class", "distance")  # targets of separate objects; dense labels keep the defaults
TUNING_PIXELS = 1 << 21  # training pixels (voxels) the instance thresholds are fitted on: ~32 records of 256x256


def fitted_instances(config: RunConfig, model) -> dict[str, Any] | None:
    """The metadata ``instances`` block (resolve.training_instances) with, for the 3-class and distance targets, the labelling
    thresholds fitted to this model on its training records (segkit.instance_tuning) and how they scored there;
    the defaults stay when the records hold no object. The boundary target (dense labels) keeps the defaults."""
    block = training_instances(config)
    if block is None or block["target"] not in FITTED_TARGETS:
        return block
    from segkit.instance_tuning import true_labels_of_target, tune_thresholds
    from segkit.instances import TARGET_OF_BUILD, InstanceThresholds

    started = time.monotonic()
    name = block["target"]
    pairs = [(probs, true_labels_of_target(target, name)) for probs, target in _training_predictions(config, model)]
    tuning = tune_thresholds(pairs, InstanceThresholds.from_dict(block["thresholds"]), TARGET_OF_BUILD[name])
    if tuning is None:
        log.info("instance thresholds: the defaults (the training records scanned hold no object)")
        return block
    log.info("%s; %.0f s", tuning.summary(), time.monotonic() - started)
    return dict(block, thresholds=tuning.thresholds.to_dict(), tuning=tuning.to_dict())


def _training_predictions(config: RunConfig, model, pixels: int = TUNING_PIXELS):
    """(softmax probabilities, stored target) of whole training records, about ``pixels`` of them (at least one
    record), read as the test passes read records (normalized by their source image's statistics; padded to the
    size factor, the padding cut off again): every k-th record, k = all training pixels / ``pixels``, so the
    sample spans the databases (the tiles of every image, not those of the first few)."""
    import tensorflow as tf

    from imagereader import ImageReader
    from reader_databases import ReaderDatabases
    from segkit.training.trainer import forward

    shapes = ReaderDatabases(list(config.train_database)).all_record_shapes()
    every = int(min(len(shapes), max(1, np.prod(shapes, axis=1).sum() // pixels)))
    seen = 0
    with ImageReader(list(config.train_database), batch_size=1, mode="eval", workers=1, shard_count=every,
                     size_factor=models.size_factors(config.model, **config.model_config)) as reader:
        for images, masks in reader:
            logits = forward(model, tf.constant(images))
            probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()
            for prob, mask in zip(probs, masks):
                extent = [int(index.max()) + 1 for index in np.nonzero(mask >= 0)]  # the padding is at the ends
                valid = tuple(slice(0, n) for n in extent)
                yield prob[valid], mask[valid]
                seen += int(np.prod(extent))
            if seen >= pixels:
                return


def export_untrained_volume_model(path: str, model_config: dict[str, Any], number_classes: int = 2, seed: int = 0,
                                  training_tile_size: tuple[int, ...] = (32, 64, 64)) -> str:
    """A unet3d with random weights (``seed``), exported to ``path`` as training exports one (one uint8
    channel, the serving module and metadata per axis): for tests and benchmarks of volume inference."""
    import keras

    keras.utils.set_random_seed(seed)
    config = models.model_config("unet3d", **model_config)
    net = models.build_model("unet3d", 1, number_classes, **config)
    meta = model_metadata.make_metadata(
        model="unet3d", model_config=config, channels=1, number_classes=number_classes, image_dtype="uint8",
        spatial_rank=3, voxel_size_um=list(config["voxel_size"]),
        normalization={"method": image_io.NORMALIZATION_METHOD, "epsilon": image_io.NORMALIZATION_EPSILON},
        size_factor=list(models.size_factors("unet3d", **config)),
        receptive_field_radius=list(models.receptive_field_radii("unet3d", **config)),
        training_tile_size=list(training_tile_size))
    _save(net, 1, meta, path, 3)
    return path


def _save(model, channels: int, meta: dict[str, Any], final: str, spatial_rank: int) -> None:
    """SavedModel of ``model`` with ``meta`` as its asset, staged beside ``final`` and swapped in."""
    import tensorflow as tf

    staging = cliutil.make_temp(final, directory=True)
    try:
        asset_dir = os.path.join(staging, "asset_source")
        os.makedirs(asset_dir)
        with open(os.path.join(asset_dir, model_metadata.METADATA_FILENAME), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, default=json_default)
        module = _serving_module(model, channels, os.path.join(asset_dir, model_metadata.METADATA_FILENAME),
                                 spatial_rank)
        tf.saved_model.save(module, os.path.join(staging, "saved_model"), signatures={"serving_default": module.serve})
        _swap_in(os.path.join(staging, "saved_model"), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _serving_module(model, channels: int, metadata_file: str, spatial_rank: int = 2):
    """serving_default: "images" (NHWC, or NDHWC for volumes) float32 -> "probabilities" of the same layout."""
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    module.metadata = tf.saved_model.Asset(metadata_file)

    @tf.function(input_signature=[tf.TensorSpec([None] * (spatial_rank + 1) + [channels], tf.float32, name="images")],
                 autograph=False)
    def serve(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits, axis=-1)}

    module.serve = serve
    return module


def _swap_in(new_dir: str, final: str) -> None:
    """Replace folder ``final`` by ``new_dir``; at every moment one complete version exists on disk: the old
    one is moved aside (``.saved_model.old-HOST-PID``), restored if the new one cannot be renamed in, and
    removed after; :func:`remove_stale_swaps` restores or removes those of killed runs."""
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, f".{os.path.basename(final)}.old-{cliutil.owner_tag()}")
        os.rename(final, old)
    try:
        os.rename(new_dir, final)
    except BaseException:
        if old:
            os.rename(old, final)
        raise
    finally:
        cliutil.fsync_path(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


_OLD_SWAP = re.compile(r"^\.saved_model\.old-(?P<host>.+)-(?P<pid>\d+)$|^saved_model\.old-(?P<legacy_pid>\d+)$")


def remove_stale_swaps(output_dir: str) -> None:
    """Leftovers of an export killed mid-swap (its process dead on this machine): the moved-aside model is put
    back when saved_model/ is missing, else removed."""
    try:
        entries = os.listdir(output_dir)
    except FileNotFoundError:
        return
    for entry in entries:
        match = _OLD_SWAP.match(entry)
        if not match:
            continue
        host, pid = match["host"] or socket.gethostname(), int(match["pid"] or match["legacy_pid"])
        if host != socket.gethostname() or pid == os.getpid() or cliutil.pid_alive(pid):
            continue
        path, final = os.path.join(output_dir, entry), os.path.join(output_dir, "saved_model")
        if not os.path.exists(final):
            os.rename(path, final)
            log.info("restored %s from %s (an export was killed while swapping)", final, entry)
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s (left by an export that was killed)", path)
        cliutil.fsync_path(output_dir)


def first_test_image(test_database: str | None):
    """The first record's image of the test database (spatial axes, channels last), or None when unreadable:
    the bioimage.io package's test tensors and cover then come from a synthetic image."""
    if not test_database:
        return None
    from segkit import lmdb_format

    try:
        record = lmdb_format.read_record(test_database, 0)
    except Exception:  # the package is an extra; a synthetic image will do
        return None
    return None if record is None else np.array(record.image_hwc)


def export_bioimageio_package(saved_model_dir: str, output_dir: str, test_database: str | None = None) -> str | None:
    """Write the bioimage.io model package (segkit/bioimageio_export.py, default authors, licence and
    citations) beside ``saved_model_dir``, its test tensors and cover from the first test image; returns the
    folder, or None after a one-line warning: a failure here never touches the SavedModel, and
    scripts/export_bioimageio.py can build the package later."""
    try:
        from segkit.bioimageio_export import export_bioimageio

        folder, _ = export_bioimageio(saved_model_dir, output_dir, test_image=first_test_image(test_database))
    except Exception as exc:  # the package is an extra: the SavedModel stays exported whatever fails here
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        log.warning("bioimage.io package not written (%s: %s); the SavedModel is fine, build the package with "
                    "scripts/export_bioimageio.py --saved_model_filepath %s", type(exc).__name__, first, saved_model_dir)
        return None
    log.info("bioimage.io package: %s (.zip beside it) for deepImageJ, ilastik, napari", folder)
    return folder
