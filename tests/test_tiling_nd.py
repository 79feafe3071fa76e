"""tiling for any number of spatial axes: 3-D tiled prediction equals whole-volume prediction exactly.

Trivial numpy predictors make stitching checkable to the bit (MONAI's identity / "times two" idea);
a chain of two 3x3x3 box sums (receptive-field radius 2, zero 'same' padding) needs the halo, and its
integer-valued float sums are exact, so equality is exact too. No TensorFlow.
"""
import itertools

import numpy as np
import pytest
from scipy import ndimage

from segkit import tiling

BOX_RADIUS = 2  # two 3x3x3 box sums


def _volume(shape, channels=2, seed=0):
    """Small integer values as float32: every sum below is exact."""
    return np.random.default_rng(seed).integers(0, 8, size=tuple(shape) + (channels,)).astype(np.float32)


def identity(batch):
    return batch


def times_two(batch):
    return batch * 2


def box_chain(batch):
    """Two 3x3x3 box sums over the spatial axes of (N, Z, Y, X, C), zero padding: radius 2."""
    weights = np.ones((1, 3, 3, 3, 1))
    out = ndimage.correlate(batch.astype(np.float64), weights, mode="constant")
    return ndimage.correlate(out, weights, mode="constant").astype(np.float32)


def _box_reference(volume, border="mirror", factor=1):
    """Whole-volume box chain: on the mirror extension (np.pad 'reflect' = image_io.mirror_pad's rule),
    or ("zero") reflect-padded at the end of each axis to the size factor, the chain's zero padding beyond."""
    if border == "zero":
        factors = tiling.per_axis(factor, 3, "size_factor")
        pads = [(0, -n % f) for n, f in zip(volume.shape[:3], factors)]
        padded = np.pad(volume, pads + [(0, 0)], mode="reflect")
        return box_chain(padded[None])[0][tuple(slice(0, n) for n in volume.shape[:3])]
    r = BOX_RADIUS
    padded = np.pad(volume, [(r, r)] * 3 + [(0, 0)], mode="reflect")
    return box_chain(padded[None])[0, r:-r, r:-r, r:-r]


# Shapes whose tile edges fall on the border (multiples of the tile) and off it, per axis.
GEOMETRIES = [
    # shape, tile, halo, size_factor
    ((8, 12, 16), (4, 6, 8), 0, 1),        # every edge on the border
    ((9, 13, 7), (4, 6, 8), 0, 1),         # every edge off (z, y) or a single short tile (x)
    ((8, 13, 16), (4, 4, 4), (2, 4, 2), (1, 2, 2)),  # on in z and x, off in y; anisotropic halo and factor
    ((5, 16, 11), 4, 2, 2),                # off in z and x, on in y; one int for every axis
    ((3, 3, 3), 8, 4, 1),                  # one tile larger than the volume
]


@pytest.mark.parametrize("shape,tile,halo,factor", GEOMETRIES)
@pytest.mark.parametrize("predict,expected", [(identity, lambda v: v), (times_two, lambda v: v * 2)])
def test_pointwise_3d_tiled_equals_whole_exactly(shape, tile, halo, factor, predict, expected):
    volume = _volume(shape)
    for batch_size in (1, 3):
        out = tiling.predict_tiled(volume, predict, tile, halo, factor, batch_size=batch_size)
        assert out.shape == volume.shape and out.dtype == np.float32
        assert np.array_equal(out, expected(volume))


@pytest.mark.parametrize("border", tiling.BORDERS)
@pytest.mark.parametrize("shape,tile,halo,factor", [
    ((8, 12, 16), 4, 2, 1),                # edges on the border
    ((9, 13, 7), (4, 6, 2), 2, 1),         # edges off the border
    ((8, 13, 16), (4, 4, 8), (2, 4, 2), (1, 2, 2)),
    ((6, 10, 12), (2, 4, 4), 4, 2),        # halo above the radius
])
def test_box_chain_3d_tiled_equals_whole_exactly(shape, tile, halo, factor, border):
    volume = _volume(shape, channels=1, seed=1)
    whole = tiling.predict_tiled(volume, box_chain, max(shape) * 2, BOX_RADIUS * 2, factor, border=border)  # one tile
    assert np.array_equal(whole, _box_reference(volume, border, factor))
    tiled = tiling.predict_tiled(volume, box_chain, tile, halo, factor, batch_size=2, border=border)
    assert np.array_equal(tiled, whole)


@pytest.mark.parametrize("border", tiling.BORDERS)
def test_box_chain_3d_without_halo_shows_seams(border):
    """The equality above is not vacuous: too little context changes voxels at zone borders."""
    volume = _volume((8, 8, 8), channels=1, seed=2)
    short = tiling.predict_tiled(volume, box_chain, 4, 0, 1, border=border)
    assert not np.array_equal(short, _box_reference(volume, border))
    exact = tiling.predict_tiled(volume, box_chain, 4, BOX_RADIUS, 1, border=border)
    assert np.array_equal(exact, _box_reference(volume, border))


@pytest.mark.parametrize("border", tiling.BORDERS)
@pytest.mark.parametrize("shape,tile,halo,factor", GEOMETRIES)
def test_3d_plan_partitions_the_volume(shape, tile, halo, factor, border):
    plan = tiling.plan_tiles(shape, tile, halo, factor, border)
    owner = np.zeros(shape, int)
    halos, factors = tiling.per_axis(halo, 3, "halo"), tiling.per_axis(factor, 3, "size_factor")
    for zone in plan.zones:
        owner[zone.region()] += 1
        for crop, tile_length, h, f, start, n in zip(zone.crop(), plan.tile_shape, halos, factors, zone.tile_start,
                                                     shape):
            if border == "mirror":
                assert crop.start >= h and crop.stop <= tile_length - h
                assert (start + h) % f == 0
            else:  # context on interior edges only; the tile never crosses the padded border
                padded = -(-n // f) * f
                assert 0 <= start and start + tile_length <= padded and start % f == 0
                assert crop.start >= (h if start > 0 else 0)
                assert crop.stop <= tile_length - (h if start + tile_length < padded else 0)
    assert np.all(owner == 1)
    assert [z.index for z in plan.zones] == sorted(z.index for z in plan.zones)
    assert len(plan.zones) == int(np.prod(plan.grid_shape))


class _RegionReader:
    """An on-disk-like volume: records every region read."""

    def __init__(self, volume):
        self._volume, self.shape, self.reads = volume, volume.shape, []

    def __getitem__(self, key):
        self.reads.append(tuple(s.stop - s.start for s in key))
        return self._volume[key].copy()


def test_3d_region_reader_reads_at_most_one_tile_per_zone():
    volume = _volume((9, 13, 7), channels=1)
    reader = _RegionReader(volume)
    out = tiling.predict_tiled(reader, box_chain, 4, 2, 1, border="mirror")
    plan = tiling.plan_tiles((9, 13, 7), 4, 2, 1, border="mirror")
    assert len(reader.reads) == len(tiling.tile_groups(plan)) == len(plan.zones)
    assert all(all(r <= t for r, t in zip(read, plan.tile_shape)) for read in reader.reads)
    assert np.array_equal(out, _box_reference(volume))


def test_sink_gets_3d_zones_once():
    volume = _volume((5, 6, 7))
    pasted = np.full(volume.shape, np.nan, np.float32)

    def sink(zone, probs):
        assert probs.shape == zone.shape + (2,) and np.all(np.isnan(pasted[zone.region()]))
        pasted[zone.region()] = probs

    assert tiling.predict_tiled(volume, times_two, (2, 4, 4), 0, 1, sink=sink) is None
    assert np.array_equal(pasted, volume * 2)


def test_per_axis_values_are_checked():
    with pytest.raises(ValueError, match=r"tile must be one int or 3 \(one per spatial axis\)"):
        tiling.plan_tiles((4, 4, 4), (4, 4), 0, 1)
    with pytest.raises(ValueError, match="halo must be a non-negative multiple of the size factor 2, got 3"):
        tiling.plan_tiles((4, 4, 4), 4, (2, 3, 2), 2)
    with pytest.raises(ValueError, match="tile must be a positive multiple of the size factor 4, got 6"):
        tiling.plan_tiles((4, 4, 4), (4, 6, 4), 0, (1, 4, 1))


@pytest.mark.parametrize("height,width,tile,stride", [(256, 300, 128, None), (100, 129, 128, 1), (300, 300, 128, 100)])
def test_tile_grid_2d_is_the_product_of_tile_starts(height, width, tile, stride):
    expected = [(y, x) for y in tiling.tile_starts(height, tile, stride) for x in tiling.tile_starts(width, tile, stride)]
    assert tiling.tile_grid(height, width, tile, stride) == expected


def test_tile_origins_cover_a_volume():
    shape, tile = (10, 33, 20), (4, 16, 20)
    covered = np.zeros(shape, int)
    origins = tiling.tile_origins(shape, tile)
    for origin in origins:
        covered[tuple(slice(o, o + t) for o, t in zip(origin, tile))] += 1
        assert all(o + t <= n for o, t, n in zip(origin, tile, shape))
    assert covered.min() >= 1 and origins == sorted(origins)
    assert origins == list(itertools.product([0, 4, 6], [0, 16, 17], [0]))
