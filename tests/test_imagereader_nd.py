"""imagereader's geometry for any number of spatial axes (issue #19): volumes (ZYXC records) in train and
eval mode, and 2-D streams bit-identical to the reader before the change."""
import hashlib

import numpy as np
import pytest
from lmdb_helpers import unit_sources, write_database

import reader_worker
from imagereader import IGNORE_LABEL, ImageReader
from segkit import tiling

# sha256 of the streams of stream_digest() given by imagereader.py at commit 0d11729 (before this branch).
EXPECTED_2D = {
    # Issue #17: train batches draw from reader_sampling.batch_generators(seed, shard, batch index) (resume
    # reproduces the uninterrupted run), no longer from per-worker streams; was bb2c012f...dd66a8.
    "train": "9c137a3237e3d0f93c273c412e9ed47d2f3762b2ad503788e4813cca6268d3ec",
    # Issue #17: eval records are padded UP to the size factor (mirrored image, int32 masks with
    # IGNORE_LABEL on the padding) so that every pixel is scored; was 3f5bb1f1...2789c8 (cropped down).
    "eval": "6dfb7fb75e1fb8fc5255814ac9ec3ebf400a3bc8d68d3ba206ca1d441331854a",
}


def positional_volume(shape_zyx, offset):
    """Image value = offset + z*10000 + y*100 + x (channel 1 = its negative); mask = (z + y + x) % 3."""
    z, y, x = np.indices(shape_zyx)
    pos = offset + z * 10000 + y * 100 + x
    return np.stack([pos, -pos], axis=-1).astype(np.float32), ((z + y + x) % 3).astype(np.uint8)


def decode(image_zyxc):
    """(z, y, x) coordinates back from a normalized (identity statistics) crop."""
    pos = np.rint(image_zyxc[..., 0]).astype(np.int64) % 1_000_000
    return pos // 10000, pos // 100 % 100, pos % 100


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    samples = [positional_volume((6, 20, 24), 0), positional_volume((3, 16, 16), 1_000_000),
               positional_volume((8, 17, 30), 2_000_000)]
    path = write_database(str(root / "vol.lmdb"), samples, sources=unit_sources(2), source_index=[0, 0, 0])
    flat = write_database(str(root / "flat.lmdb"), [(np.zeros((16, 16, 2), np.float32), np.zeros((16, 16), np.uint8))],
                          sources=unit_sources(2), source_index=[0])
    return {"vol": path, "flat": flat, "samples": samples}


def assert_is_mirror_crop(image, mask, record_shapes):
    """The crop is a window of some record's infinite mirror extension, the mask the record's at the same pixels."""
    z, y, x = decode(image)
    record = int(np.rint(image[0, 0, 0, 0])) // 1_000_000
    shape = record_shapes[record]
    for axis, coords in enumerate((z, y, x)):
        line = np.moveaxis(coords, axis, 0)[:, 0, 0]
        start = None
        for candidate in range(-shape[axis] * 2, shape[axis] * 2):
            if np.array_equal(tiling.reflect_index(np.arange(candidate, candidate + len(line)), shape[axis]), line):
                start = candidate
                break
        assert start is not None, (axis, line)
    np.testing.assert_array_equal(mask, (z + y + x) % 3)
    np.testing.assert_array_equal(image[..., 1], -image[..., 0])


def test_unaugmented_train_volumes_are_random_crops_with_mirror_padding(volumes):
    shapes = [m.shape for _, m in volumes["samples"]]
    with ImageReader(volumes["vol"], batch_size=3, crop_size=(4, 16, 16), size_factor=4, augment=False, seed=3) as reader:
        assert reader.crop_shape == reader.crop_hw == (4, 16, 16)
        for _, (images, masks) in zip(range(4), reader):
            assert images.shape == (3, 4, 16, 16, 2) and images.dtype == np.float32
            assert masks.shape == (3, 4, 16, 16) and masks.dtype == np.int32
            for image, mask in zip(images, masks):
                assert_is_mirror_crop(image, mask, shapes)


def test_default_volume_crop_is_the_smallest_record_rounded_to_the_size_factor(volumes):
    reader = ImageReader(volumes["vol"], batch_size=1, size_factor=2, augment=False)
    assert reader.crop_shape == (2, 16, 16)
    with pytest.raises(ValueError, match="one or 3 positive multiples"):
        ImageReader(volumes["vol"], batch_size=1, crop_size=(16, 16), size_factor=4, augment=False)
    with pytest.raises(ValueError, match="mix 2-D images and volumes"):
        ImageReader([volumes["vol"], volumes["flat"]], batch_size=1, size_factor=4, augment=False)


def test_eval_volumes_are_whole_and_padded_up_to_the_size_factor_in_order(volumes):
    with ImageReader(volumes["vol"], batch_size=2, mode="eval", size_factor=4) as reader:
        batches = list(reader)
    got = [(image, mask) for images, masks in batches for image, mask in zip(images, masks)]
    assert [m.shape for _, m in got] == [(8, 20, 24), (4, 16, 16), (8, 20, 32)]  # every axis up to a multiple of 4
    for (image, mask), (source, source_mask) in zip(got, volumes["samples"]):
        index = [tiling.reflect_index(np.arange(n), size) for n, size in zip(mask.shape, source_mask.shape)]
        np.testing.assert_array_equal(image, source[np.ix_(*index)])  # the padding mirrors the record
        inside = tuple(slice(0, n) for n in source_mask.shape)
        np.testing.assert_array_equal(mask[inside], source_mask)
        assert np.count_nonzero(mask == IGNORE_LABEL) == mask.size - source_mask.size


def test_per_axis_size_factors_pad_and_check_each_axis_by_its_own(volumes):
    # an anisotropic unet3d pools z less than y and x: (1, 8, 8) pads z not at all, y and x to multiples of 8
    with ImageReader(volumes["vol"], batch_size=1, mode="eval", size_factor=(1, 8, 8)) as reader:
        shapes = [masks[0].shape for _, masks in reader]
    assert shapes == [(6, 24, 24), (3, 16, 16), (8, 24, 32)]
    reader = ImageReader(volumes["vol"], batch_size=1, size_factor=(1, 8, 8), augment=False)
    assert reader.crop_shape == (3, 16, 16)  # the smallest record, each axis floored to its factor
    reader.close()
    ImageReader(volumes["vol"], batch_size=1, crop_size=(3, 16, 8), size_factor=(1, 8, 8), augment=False).close()
    with pytest.raises(ValueError, match="multiples of the size factor 1x8x8"):
        ImageReader(volumes["vol"], batch_size=1, crop_size=(3, 12, 16), size_factor=(1, 8, 8), augment=False)
    with pytest.raises(ValueError, match=r"size_factor must be one int or 3 \(one per spatial axis\)"):
        ImageReader(volumes["vol"], batch_size=1, mode="eval", size_factor=(8, 8))
    with pytest.raises(ValueError, match="size_factor must be a positive integer"):
        ImageReader(volumes["vol"], batch_size=1, size_factor=(0, 8, 8))


def test_random_crop_reaches_every_placement_of_a_small_axis():
    image, mask = positional_volume((3, 5, 5), 0)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        crop_image, crop_mask = reader_worker._random_crop(image, mask, rng, (4, 5, 2))
        z, y, x = decode(crop_image)
        assert crop_image.shape == (4, 5, 2, 2) and np.array_equal(crop_mask, (z + y + x) % 3)
        starts.add((int(z[0, 0, 0]), int(x[0, 0, 0])))
    assert {s[1] for s in starts} == {0, 1, 2, 3}  # every x origin of a 2-wide crop in 5


# ----------------------------------------------------------------------------- 2-D streams unchanged


def stream_digest(tmp_path, mode):
    rng = np.random.default_rng(42)
    samples = [(rng.integers(0, 4000, (h, w, 2)).astype(np.uint16), rng.integers(0, 3, (h, w)).astype(np.uint8))
               for h, w in [(40, 36), (24, 52), (33, 33), (64, 40)]]
    path = write_database(str(tmp_path / f"{mode}.lmdb"), samples)
    digest = hashlib.sha256()
    kwargs = {"crop_size": (16, 24), "size_factor": 8, "workers": 2, "seed": 7} if mode == "train" else {"size_factor": 8}
    with ImageReader(path, batch_size=2, mode=mode, **kwargs) as reader:
        for _, (images, masks) in zip(range(6), reader):
            digest.update(images.tobytes())
            digest.update(masks.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_2d_streams_are_bit_identical_to_the_previous_reader(tmp_path, mode):
    assert stream_digest(tmp_path, mode) == EXPECTED_2D[mode]
