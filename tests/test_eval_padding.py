"""Test passes score every pixel (issue #17): eval records are padded UP to the size factor, the padding
is labelled IGNORE_LABEL and neither the test loss nor the confusion matrix counts it."""
import numpy as np
import pytest
from lmdb_helpers import write_database

import reader_worker
from imagereader import IGNORE_LABEL, ImageReader
from segkit import image_io


def record(shape, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 1000).astype(np.uint16)
    return image, rng.integers(0, classes, shape).astype(np.uint8)


@pytest.mark.parametrize("shape, factor, padded", [((37, 45), 16, (48, 48)), ((3, 37, 45), 4, (4, 40, 48)),
                                                   ((32, 48), 16, (32, 48)), ((5, 7), 16, (16, 16))])
def test_eval_records_are_padded_up_and_the_padding_is_ignore_labelled(tmp_path, shape, factor, padded):
    image, mask = record(shape)
    sample = (image[..., None], mask) if len(shape) == 3 else (image, mask)
    path = write_database(str(tmp_path / "eval.lmdb"), [sample], voxel_size=(0.04, 0.01, 0.01) if len(shape) == 3 else None)
    assert reader_worker._eval_shape(shape, factor) == padded
    with ImageReader(path, batch_size=1, mode="eval", size_factor=factor) as reader:
        (images, masks), = list(reader)
    got_image, got_mask = images[0], masks[0]
    assert got_mask.shape == padded and got_mask.dtype == np.int32
    inside = tuple(slice(0, n) for n in shape)
    np.testing.assert_array_equal(got_mask[inside], mask)  # every record pixel is there, with its class
    assert np.count_nonzero(got_mask != IGNORE_LABEL) == mask.size  # and only the padding is ignored
    mean, std = image_io.image_stats(image[..., None])
    expected = image_io.mirror_pad(image_io.normalize(image[..., None], mean, std),
                                   [(0, p - n) for p, n in zip(padded, shape)])
    np.testing.assert_allclose(got_image, expected, rtol=1e-6)  # the image is mirrored into the padding


def test_train_crops_are_unchanged_by_the_eval_padding(tmp_path):
    """The train stream keeps the mask's own dtype and class ids (no IGNORE_LABEL)."""
    path = write_database(str(tmp_path / "train.lmdb"), [record((37, 45), seed) for seed in range(3)])
    with ImageReader(path, batch_size=2, crop_size=16, size_factor=16, seed=1) as reader:
        _, masks = next(iter(reader))
    assert masks.min() >= 0 and reader._plan.mask_dtype == "uint8"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "ce+dice"])
def test_a_37x45_record_is_scored_on_all_its_pixels_and_the_padding_never_counts(tmp_path, loss):
    """Confusion matrix total = 37 * 45 (it was 32 * 32 when records were cropped down to the factor), and
    the test loss equals the loss of the record's own pixels, computed independently."""
    import tensorflow as tf

    import train_unet

    train = write_database(str(tmp_path / "train.lmdb"), [record((64, 64), seed) for seed in range(2)])
    test = write_database(str(tmp_path / "test.lmdb"), [record((37, 45), 7)])
    argv = ["--train_database", train, "--test_database", test, "--output_dir", str(tmp_path / "out"),
            "--number_classes", "3", "--depth", "4", "--base_filters", "4", "--crop_size", "32", "--batch_size", "1",
            "--seed", "3", "--loss", loss]
    config = train_unet.resolve_config(train_unet.build_parser().parse_args(argv))
    assert config.size_factor == 16
    strategy = tf.distribute.MirroredStrategy()
    trainer = train_unet.Trainer(config, strategy, mixed=False)
    with ImageReader(test, batch_size=1, mode="eval", size_factor=config.size_factor) as reader:
        test_loss, scores, first = trainer.evaluate(train_unet.distribute(strategy, reader))
    assert scores["pixels"] == 37 * 45
    images, labels = (t.numpy() for t in first)
    assert labels.shape == (1, 48, 48)
    logits = trainer.eval_model(images, training=False)[:, :37, :45]
    own = train_unet.batch_statistics(tf.constant(labels[:, :37, :45]), logits, loss, trainer.class_weights, 3)
    expected = float(train_unet.loss_from_statistics(own, loss, trainer.class_weights))
    assert test_loss == pytest.approx(expected, rel=1e-5)
    # negative control: scoring the padding (as a class) would change the loss
    padded = tf.constant(np.maximum(labels, 0))
    with_padding = train_unet.batch_statistics(padded, trainer.eval_model(images, training=False), loss,
                                               trainer.class_weights, 3)
    assert float(train_unet.loss_from_statistics(with_padding, loss, trainer.class_weights)) != pytest.approx(expected,
                                                                                                              rel=1e-5)
