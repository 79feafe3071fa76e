"""TensorBoard output of a run (logs/train and logs/test): scalars and test images with prediction
overlays, written without the tensorboard package. README.md, "Stage 2" (Outputs).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

from segkit import image_io

OVERLAY_IMAGES = 3


def _plugin_metadata(plugin: str, content: bytes = b""):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=content))


def summary_scalar(name: str, value: float) -> None:
    """tf.summary.scalar without the tensorboard package (same event format; step from the writer)."""
    import tensorflow as tf

    tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=_plugin_metadata("scalars"))


def summary_images(name: str, images_nhw3: np.ndarray) -> None:
    """tf.summary.image without the tensorboard package: [width, height, png, png, ...] strings."""
    import tensorflow as tf

    height, width = images_nhw3.shape[1:3]
    pngs = [tf.io.encode_png(image) for image in images_nhw3]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height))] + pngs)
    # ImagePluginData{max_images_per_step: n} as a protobuf: field 2, varint
    tf.summary.write(name, tensor, metadata=_plugin_metadata("images", bytes([0x10, len(pngs)])))


def overlay_panels(images_nhwc: np.ndarray, truth_nhw: np.ndarray, pred_nhw: np.ndarray,
                   instance_target: str | None = None) -> np.ndarray:
    """uint8 NHW3 panels [image | truth overlay | prediction overlay]; class 0 is left uncoloured. With an
    ``instance_target`` (three_class, boundary) the objects' outlines are drawn on the truth and prediction."""
    image = images_nhwc[..., :3] if images_nhwc.shape[-1] >= 3 else np.repeat(images_nhwc[..., :1], 3, axis=-1)
    lo = image.min(axis=(1, 2, 3), keepdims=True)
    hi = image.max(axis=(1, 2, 3), keepdims=True)
    gray = (image - lo) / np.maximum(hi - lo, 1e-6) * 255.0
    panels = [gray, image_io.tint(gray, truth_nhw), image_io.tint(gray, pred_nhw)]
    if instance_target is not None:
        panels[1:] = [outlined(p, classes, instance_target) for p, classes in zip(panels[1:], (truth_nhw, pred_nhw))]
    return np.concatenate(panels, axis=2).clip(0, 255).astype(np.uint8)


def outlined(panels_nhw3: np.ndarray, classes_nhw: np.ndarray, instance_target: str) -> np.ndarray:
    """Each panel with the outlines of the objects its classes give (segkit.instances.labels_from_probabilities
    of the one-hot classes: the objects the classes stand for)."""
    from segkit.inference.instances_out import draw_outlines
    from segkit.instance_targets import CLASSES
    from segkit.instances import TARGET_OF_BUILD, labels_from_probabilities, one_hot

    classes = CLASSES[instance_target]
    return np.stack([draw_outlines(panel, labels_from_probabilities(one_hot(c.astype(np.int64), classes),
                                                                    target=TARGET_OF_BUILD[instance_target]))
                     for panel, c in zip(panels_nhw3, classes_nhw)])



def middle_sections(images, truth, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Volumes (NDHWC images, NDHW classes) -> their middle z sections (NHWC, NHW); 2-D batches unchanged."""
    if truth.ndim == 3:
        return images, truth, pred
    middle = truth.shape[1] // 2
    return images[:, middle], truth[:, middle], pred[:, middle]


class Summaries:
    """The run's two event writers; on workers other than the chief they write nothing."""

    def __init__(self, output_dir: str, is_chief: bool, instance_target: str | None = None):
        import tensorflow as tf

        self.is_chief, self.instance_target = is_chief, instance_target
        if is_chief:
            self.train_writer = tf.summary.create_file_writer(os.path.join(output_dir, "logs", "train"))
            self.test_writer = tf.summary.create_file_writer(os.path.join(output_dir, "logs", "test"))
        else:
            self.train_writer = self.test_writer = tf.summary.create_noop_writer()

    def train(self, step: int, summary: dict[str, float], learning_rate: float) -> None:
        """The running means of :class:`segkit.training.loop.Meter` since the last call."""
        with self.train_writer.as_default(step=step):
            summary_scalar("loss", summary["loss"])
            summary_scalar("pixel_accuracy", summary["accuracy"])
            summary_scalar("learning_rate", learning_rate)
            summary_scalar("seconds_per_step", summary["step_seconds"])
            summary_scalar("input_fetch_seconds", summary["fetch_seconds"])
            summary_scalar("reader_starved_fraction", summary["starved_fraction"])

    def test(self, step: int, loss: float, result: dict[str, Any], first, predict: Callable) -> None:
        """A test pass's scores; ``first``: its first (images, labels) batch, shown with ``predict``'s classes."""
        with self.test_writer.as_default(step=step):
            summary_scalar("loss", loss)
            summary_scalar("pixel_accuracy", result["pixel_accuracy"])
            summary_scalar("mean_iou", result["mean_iou"])
            for c, (iou, dice) in enumerate(zip(result["iou"], result["dice"])):
                if math.isfinite(iou):
                    summary_scalar(f"iou_class_{c}", iou)
                    summary_scalar(f"dice_class_{c}", dice)
            if first is not None and self.is_chief:
                images, labels = (t[:OVERLAY_IMAGES] for t in first)
                pred = predict(images).numpy()
                shown = middle_sections(images.numpy(), labels.numpy(), pred)
                summary_images("image_truth_prediction", overlay_panels(*shown, instance_target=self.instance_target))
        self.flush()

    def flush(self) -> None:
        self.test_writer.flush()
        self.train_writer.flush()
