"""segkit.image_io for any number of spatial axes: mirror_pad against tiling.reflect_index, stable
statistics, normalization of volumes, and the grey-level mask hint (issues #17, #18, #19)."""
import itertools

import numpy as np
import pytest

from segkit import image_io, tiling


def _reflect_reference(array, pairs):
    """mirror_pad built from tiling.reflect_index alone, one axis at a time."""
    index = [tiling.reflect_index(np.arange(-b, n + a), n) for n, (b, a) in zip(array.shape, pairs)]
    return array[np.ix_(*index)] if len(pairs) == array.ndim else array[np.ix_(*index, np.arange(array.shape[-1]))]


@pytest.mark.parametrize("shape,pairs", [
    ((1, 5), [(2, 3), (1, 0)]),              # a 1-pixel axis beside a normal one (issue #17)
    ((5, 1, 2), [(0, 4), (3, 3)]),
    ((1, 1, 3), [(2, 2), (5, 0)]),
    ((4, 3), [(0, 11), (7, 1)]),              # pads larger than the axis, asymmetric (issue #17)
    ((3, 4, 5, 2), [(1, 6), (9, 0), (2, 2)]),  # a volume, ZYXC
    ((2, 3, 4), [(3, 3), (0, 0), (5, 9)]),    # a volume without channels: every axis spatial
])
def test_mirror_pad_is_reflect_index(shape, pairs):
    array = np.arange(np.prod(shape)).reshape(shape)
    out = image_io.mirror_pad(array, pairs)
    np.testing.assert_array_equal(out, _reflect_reference(array, pairs))


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 3), (4, 5, 6, 2)])
def test_mirror_pad_equals_numpy_reflect_within_range(shape):
    array = np.random.default_rng(0).integers(0, 1000, shape)
    spatial = len(shape) - (len(shape) > 2)
    for pairs in itertools.islice(itertools.product([(0, 0), (1, 3), (5, 2)], repeat=spatial), 12):
        full = list(pairs) + [(0, 0)] * (len(shape) - spatial)
        np.testing.assert_array_equal(image_io.mirror_pad(array, list(pairs)), np.pad(array, full, mode="reflect"))


def test_mirror_pad_2d_call_form_and_no_pad_is_the_same_array():
    array = np.arange(30).reshape(5, 6)
    np.testing.assert_array_equal(image_io.mirror_pad(array, (2, 9), (1, 1)), image_io.mirror_pad(array, [(2, 9), (1, 1)]))
    assert image_io.mirror_pad(array, (0, 0), (0, 0)) is array
    with pytest.raises(ValueError):
        image_io.mirror_pad(array, (-1, 0), (0, 0))


def test_image_stats_is_stable_for_int32_near_1e9():
    """Issue #17: the sum-of-squares formula gave std 16 for data whose true std is about 6."""
    rng = np.random.default_rng(3)
    image = (1_000_000_000 + rng.integers(0, 20, (300, 200, 1))).astype(np.int32)
    mean, std = image_io.image_stats(image, rows_per_chunk=7)
    values = image.astype(np.float64).ravel()
    np.testing.assert_allclose(mean, [values.mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [values.std()], rtol=1e-9)


@pytest.mark.parametrize("shape", [(64, 48, 3), (5, 16, 12, 2), (40, 1)])
@pytest.mark.parametrize("rows,cols", [(1024, None), (7, None), (3, 5)])
def test_image_stats_over_every_spatial_axis(shape, rows, cols):
    image = np.random.default_rng(1).normal(1000, 30, shape).astype(np.float32)
    mean, std = image_io.image_stats(image, rows_per_chunk=rows, cols_per_chunk=cols)
    flat = image.astype(np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-10)


def test_normalize_a_volume_per_channel():
    rng = np.random.default_rng(2)
    volume = rng.normal([5, 500], [1, 50], size=(6, 10, 8, 2)).astype(np.float32)
    out = image_io.normalize(volume, *image_io.image_stats(volume))
    assert out.shape == volume.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(-1, 2).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 2).std(0), 1, atol=1e-3)


@pytest.mark.parametrize("values,fix", [([0, 255], "255:1"), ([0, 128, 255], "128:1,255:2"),
                                        ([0, 85, 170, 255], "85:1,170:2,255:3"), ([0, 50, 100], "50:1,100:2"),
                                        ([0, 1000, 65535], "1000:1,65535:2")])
def test_mask_hint_maps_grey_levels_to_classes(values, fix):
    assert image_io.mask_values_hint(values).endswith(f"use --mask_map {fix}")


@pytest.mark.parametrize("values", [[0, 1], [0, 1, 2, 3], [0, 3], [1, 255], [0, 7, 9]])
def test_mask_hint_is_silent_for_class_ids(values):
    assert image_io.mask_values_hint(values) is None
