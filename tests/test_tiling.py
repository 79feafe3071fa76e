"""tiling.predict_tiled: zone-of-responsibility tiling equals whole-image prediction (no TensorFlow).

The models are numpy twins of the test SavedModels (tests/savedmodel_helpers.py): a pointwise
model (radius 0: tiled must be bit-identical) and fixed pool/conv/upsample chains with zero
'same' padding (a halo below the radius must show seams, a halo at or above it must not).
Both border rules: "zero" (the original's whole-image prediction: reflect-pad to the size factor
at the end of each axis, the model's zero padding beyond) and "mirror" (mirror context beyond).
"""
import threading
import time

import numpy as np
import pytest
from savedmodel_helpers import chain_numpy, chain_radius, chain_size_factor, pointwise_numpy

from segkit import image_io, tiling

CHAIN_F4 = [("conv", 3), ("pool", 2), ("conv", 3), ("pool", 2), ("conv", 3), ("up", 2), ("conv", 3), ("up", 2),
            ("conv", 3)]
CHAIN_F2 = [("pool", 2), ("conv", 3), ("conv", 3), ("up", 2), ("conv", 3)]
SIZES = [(1, 1), (1, 9), (3, 2), (7, 16), (16, 16), (31, 45), (45, 31), (64, 20), (70, 70)]


def _image(height, width, channels=1, seed=0):
    rng = np.random.default_rng(seed + 1000 * height + width)
    return (rng.random((height, width, channels)) * 4000).astype(np.uint16)


def _normalizer(image):
    mean, std = image_io.image_stats(image)
    return mean, std, (lambda tile: image_io.normalize(tile, mean, std))


def _round_up(value, factor):
    return -(-value // factor) * factor


def _reference(image, predict_fn, halo, factor, border="mirror"):
    """Whole-image prediction, built independently: image_io.mirror_pad by the halo on every side
    ("mirror"), or the original's np.pad((0, pad_y), (0, pad_x)), mode='reflect') ("zero")."""
    height, width, _ = image.shape
    mean, std, _ = _normalizer(image)
    normalized = image_io.normalize(image, mean, std)
    pad_y, pad_x = _round_up(height, factor) - height, _round_up(width, factor) - width
    if border == "zero":
        padded = np.pad(normalized, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
        return predict_fn(padded[None])[0, :height, :width]
    padded = image_io.mirror_pad(normalized, (halo, halo + pad_y), (halo, halo + pad_x))
    return predict_fn(padded[None])[0, halo : halo + height, halo : halo + width]


def _untiled(image, predict_fn, halo, factor, **kw):
    *_, pre = _normalizer(image)
    big = _round_up(max(image.shape[:2]), factor)
    return tiling.predict_tiled(image, predict_fn, big, halo, factor, preprocess=pre, **kw)


def _check_zone_in_tile(plan, zone, halo, factor):
    """The zone lies in its tile with at least ``halo`` of context on every edge that is not the border."""
    for crop, tile_length, tile_start, length in zip(zone.crop(), plan.tile_shape, zone.tile_start, plan.shape):
        padded = _round_up(length, factor)
        if plan.border == "mirror":
            assert crop.start >= halo and crop.stop <= tile_length - halo
            assert (tile_start + halo) % factor == 0  # the whole image's pooling grid
            assert tile_start >= -halo and tile_start + tile_length <= padded + halo
        else:
            assert 0 <= tile_start and tile_start + tile_length <= padded, "never crosses the border"
            assert crop.start >= (halo if tile_start > 0 else 0)
            assert crop.stop <= tile_length - (halo if tile_start + tile_length < padded else 0)
            assert tile_start % factor == 0


def _masks_agree(a, b, probs, tie=1e-4):
    """Equal argmax masks, except where the top two classes are within ``tie``."""
    top2 = np.sort(probs, axis=-1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) < tie
    return np.array_equal(np.argmax(a, -1)[~near_tie], np.argmax(b, -1)[~near_tie])


@pytest.mark.parametrize("length", [2, 3, 4, 5, 9])
@pytest.mark.parametrize("pad", [0, 1, 3, 8, 20])
def test_reflect_index_is_mirror_pad(length, pad):
    line = np.arange(length)[:, None] * np.ones((1, 3), int)
    padded = image_io.mirror_pad(line, (pad, pad + 1), (0, 0))[:, 0]
    assert np.array_equal(tiling.reflect_index(np.arange(-pad, length + pad + 1), length), padded)


@pytest.mark.parametrize("border", tiling.BORDERS)
@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("tile,halo,factor", [(4, 0, 1), (8, 4, 4), (16, 8, 8), (32, 0, 8), (128, 16, 16)])
def test_plan_partitions_the_image(height, width, tile, halo, factor, border):
    plan = tiling.plan_tiles((height, width), tile, halo, factor, border)
    owner = np.zeros((height, width), int)
    for zone in plan.zones:
        owner[zone.region()] += 1
        _check_zone_in_tile(plan, zone, halo, factor)
    assert np.all(owner == 1), "every pixel belongs to exactly one zone"
    assert all(s % factor == 0 for s in plan.tile_shape)
    assert plan.tile_shape[0] <= min(tile, _round_up(height, factor)) + 2 * halo
    assert [z.index for z in plan.zones] == sorted(z.index for z in plan.zones)  # raster order


@pytest.mark.parametrize("height,width,tile,halo,factor,tile_shape", [
    (45, 61, 64, 16, 4, (48, 64)),      # smaller than a tile: one tile at its own padded size
    (64, 64, 64, 16, 4, (64, 64)),      # exactly one tile
    (64, 200, 64, 16, 4, (64, 96)),     # one tile high; across, 64 + 2 * 16 clipped to nothing
    (100, 100, 32, 32, 4, (96, 96)),    # 32 + 2 * 32 = 96 < 100: tiles shifted inward at the border
    (100, 100, 64, 32, 4, (100, 100)),  # 64 + 2 * 32 >= 100: every tile is the whole image
])
def test_zero_border_tiles_stop_at_the_border(height, width, tile, halo, factor, tile_shape):
    plan = tiling.plan_tiles((height, width), tile, halo, factor, "zero")
    assert plan.tile_shape == tile_shape
    assert all(min(z.tile_start) >= 0 for z in plan.zones)
    if tile_shape == (_round_up(height, factor), _round_up(width, factor)):
        assert {z.tile_start for z in plan.zones} == {(0, 0)}


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 4)])
@pytest.mark.parametrize("height,width", SIZES)
def test_pointwise_model_tiled_is_bit_exact(height, width, channels, classes):
    image = _image(height, width, channels)
    predict = pointwise_numpy(channels, classes)
    mean, std, pre = _normalizer(image)
    expected = predict(image_io.normalize(image, mean, std)[None])[0]
    for tile, halo, factor, batch in [(4, 0, 1, 1), (8, 8, 8, 3), (16, 0, 8, 2), (64, 32, 32, 1)]:
        out = tiling.predict_tiled(image, predict, tile, halo, factor, batch_size=batch, preprocess=pre)
        assert out.dtype == np.float32 and out.shape == (height, width, classes)
        assert np.array_equal(out, expected), (tile, halo, factor)


@pytest.mark.slow
@pytest.mark.parametrize("border", tiling.BORDERS)
@pytest.mark.parametrize("layers", [CHAIN_F2, CHAIN_F4], ids=["f2", "f4"])
@pytest.mark.parametrize("height,width", SIZES)
def test_conv_chain_tiled_equals_untiled(layers, height, width, border):
    factor, radius = chain_size_factor(layers), chain_radius(layers)
    image = _image(height, width)
    predict = chain_numpy(layers)
    *_, pre = _normalizer(image)
    exact_halo = _round_up(radius, factor)
    untiled = _untiled(image, predict, exact_halo, factor, border=border)
    if min(height, width) > 1:  # mirror_pad pads 1-pixel images by 'edge' on both axes; reflect_index per axis
        np.testing.assert_allclose(untiled, _reference(image, predict, exact_halo, factor, border), atol=1e-6)
    for tile in (factor, 2 * factor, 4 * factor, 12, 32):
        if tile % factor:
            continue
        for halo in (exact_halo, exact_halo + factor, 3 * exact_halo):
            tiled = tiling.predict_tiled(image, predict, tile, halo, factor, batch_size=2, preprocess=pre,
                                         border=border)
            np.testing.assert_allclose(tiled, untiled, atol=1e-6, err_msg=f"tile {tile} halo {halo}")
            assert _masks_agree(tiled, untiled, untiled)


def test_border_rules_differ_near_the_border_only():
    """The two whole-image semantics agree far from the border (beyond the radius) and differ at it."""
    factor, radius = chain_size_factor(CHAIN_F4), chain_radius(CHAIN_F4)
    image, predict = _image(96, 80), chain_numpy(CHAIN_F4)
    halo = _round_up(radius, factor)
    zero, mirror = (_untiled(image, predict, halo, factor, border=b) for b in tiling.BORDERS)
    inner = (slice(radius, 96 - radius - factor), slice(radius, 80 - radius - factor))
    np.testing.assert_allclose(zero[inner], mirror[inner], atol=1e-6)
    assert np.abs(zero - mirror).max() > 1e-3


@pytest.mark.parametrize("border", tiling.BORDERS)
@pytest.mark.parametrize("layers", [CHAIN_F2, CHAIN_F4], ids=["f2", "f4"])
def test_halo_below_radius_shows_seams(layers, border):
    """The equality above is not vacuous: too little context changes pixels near tile borders."""
    factor, radius = chain_size_factor(layers), chain_radius(layers)
    image = _image(64, 64)
    predict = chain_numpy(layers)
    *_, pre = _normalizer(image)
    untiled = _untiled(image, predict, _round_up(radius, factor), factor, border=border)
    assert factor < radius
    short = tiling.predict_tiled(image, predict, 16, factor, factor, preprocess=pre, border=border)
    assert np.abs(short - untiled).max() > 1e-2


def test_sink_gets_each_zone_once_in_raster_order():
    image = _image(50, 70, 2)
    predict = pointwise_numpy(2, 3)
    *_, pre = _normalizer(image)
    expected = tiling.predict_tiled(image, predict, 16, 8, 8, preprocess=pre)
    pasted = np.full(expected.shape, np.nan, np.float32)
    seen = []

    def sink(zone, probs_hwk):
        assert probs_hwk.shape == zone.shape + (3,)
        assert np.all(np.isnan(pasted[zone.region()]))
        pasted[zone.region()] = probs_hwk
        seen.append(zone.index)

    assert tiling.predict_tiled(image, predict, 16, 8, 8, batch_size=3, preprocess=pre, sink=sink) is None
    assert seen == sorted(seen) and len(seen) == 4 * 5
    assert np.array_equal(pasted, expected)


class _RegionReader:
    """An on-disk-like image: records every region read; no whole-image access."""

    def __init__(self, image):
        self._image, self.shape, self.reads = image, image.shape, []

    def __getitem__(self, key):
        ys, xs = key
        self.reads.append((ys.stop - ys.start, xs.stop - xs.start))
        return self._image[ys, xs].copy()


def test_region_reader_reads_at_most_one_tile_per_zone():
    image = _image(100, 90)
    reader = _RegionReader(image)
    predict = chain_numpy(CHAIN_F2)
    *_, pre = _normalizer(image)
    out = tiling.predict_tiled(reader, predict, 16, 8, 2, preprocess=pre)
    plan = tiling.plan_tiles((100, 90), 16, 8, 2)
    assert len(reader.reads) == len(tiling.tile_groups(plan)) <= len(plan.zones)
    assert all(h <= plan.tile_shape[0] and w <= plan.tile_shape[1] for h, w in reader.reads)
    np.testing.assert_allclose(out, tiling.predict_tiled(image, predict, 16, 8, 2, preprocess=pre), atol=0)


def test_tiles_have_one_shape_and_are_batched():
    shapes = []

    def predict(batch_nhwc):
        shapes.append(batch_nhwc.shape)
        return np.repeat(batch_nhwc[..., :1], 2, axis=-1)

    tiling.predict_tiled(_image(77, 50), predict, 16, 8, 8, batch_size=4)
    plan = tiling.plan_tiles((77, 50), 16, 8, 8)
    tiles = len(tiling.tile_groups(plan))
    assert tiles == 5 * 3 < len(plan.zones) == 5 * 4  # across, the last two zones share a tile shifted inward
    assert {s[1:3] for s in shapes} == {plan.tile_shape}
    assert [s[0] for s in shapes] == [4] * (tiles // 4) + ([tiles % 4] if tiles % 4 else [])


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile=12, halo=0, size_factor=8), "tile must be a positive multiple"),
    (dict(tile=16, halo=4, size_factor=8), "halo must be a non-negative multiple"),
    (dict(tile=0, halo=0, size_factor=1), "tile must be a positive"),
])
def test_bad_geometry_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiling.predict_tiled(_image(10, 10), lambda b: b, **kwargs)


def test_predict_fn_with_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        tiling.predict_tiled(_image(10, 10), lambda b: b[:, ::2], 8, 0, 1)


def test_prefetch_reraises_producer_errors_and_stops_early():
    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(tiling.prefetched(broken(), 2))

    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    before = threading.active_count()
    gen = tiling.prefetched(endless(), 2)
    assert next(gen) == 0
    gen.close()  # consumer stops early: the producer thread must end
    time.sleep(0.05)
    assert threading.active_count() == before and len(produced) < 10


def test_prefetch_overlaps_reading_with_the_model():
    """With prefetching, tiles are read while the model runs: counted as events, not timed."""
    image = _image(32, 32)
    for depth in (0, 2):
        reading, overlapped = threading.Event(), []

        def preprocess(tile):
            reading.set()
            return tile.astype(np.float32)

        def model(batch):
            reading.clear()  # did a tile get read while this call ran?
            overlapped.append(reading.wait(timeout=0.5 if depth else 0.01))
            return np.repeat(batch[..., :1], 2, axis=-1)

        tiling.predict_tiled(image, model, 8, 0, 8, preprocess=preprocess, prefetch=depth)
        assert len(overlapped) == 16
        if depth:
            assert sum(overlapped) >= 16 - depth - 1  # all but the last tiles, already read ahead
        else:
            assert not any(overlapped)  # one thread: reading waits for the model
