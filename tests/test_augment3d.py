"""augment3d: the fused 3D warp against a slow reference, labels, sections, anisotropy, determinism."""
import numpy as np
import pytest
from scipy import ndimage

import augment3d
from augment3d import AugmentParams3D

ANISOTROPIC = (0.04, 0.008, 0.008)  # z spacing 5x the in-plane spacing (serial-section EM)
ISOTROPIC = (0.008, 0.008, 0.008)  # FIB-SEM
GEOMETRY_ONLY = AugmentParams3D().replace(section_scale_fraction=0.0, section_shift_fraction=0.0, noise_fraction=0.0,
                                          missing_probability=0.0, low_contrast_probability=0.0)


def smooth_volume(shape_zyx, seed=0):
    """A smooth float image (wavelengths >= 12 voxels) so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape_zyx], indexing="ij")
    image = sum(np.sin(2 * np.pi * (a * z + b * y + c * x) + phase)
                for a, b, c, phase in rng.uniform([-1 / 12] * 3 + [0], [1 / 12] * 3 + [6.28], size=(4, 4)))
    return image[..., None].astype(np.float32)


def blob_labels(shape_zyx, ids=(0, 3, 7, 250), seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(ids), size=tuple(max(2, n // 6) for n in shape_zyx))
    index = ndimage.zoom(coarse, [n / c for n, c in zip(shape_zyx, coarse.shape)], order=0)
    return np.asarray(ids)[index]


def reference_coordinates(geometry, centre_in):
    """The separate transforms composed one after the other, as coordinate maps (slow and plain)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in geometry.out_zyx], indexing="ij"))
    q = grid[list(geometry.permutation)]                                    # transpose
    q = q * np.asarray(geometry.mirror_zyx)[:, None, None, None]             # mirror
    q = q / np.asarray(geometry.scale_zyx)[:, None, None, None]              # scale
    q = np.einsum("ij,j...->i...", geometry.rotation, q)                     # rotation
    if geometry.displacement is not None:                                    # elastic
        q = q + np.stack([np.zeros(geometry.out_zyx) if d is None else d for d in geometry.displacement])
    if geometry.section_offsets_yx is not None:                              # slip / shift
        q[1:] += np.moveaxis(geometry.section_offsets_yx, 1, 0)[:, :, None, None]
    return q + np.asarray(centre_in)[:, None, None, None]


@pytest.mark.parametrize("spacing,any_axis", [(ANISOTROPIC, False), (ISOTROPIC, False), (ISOTROPIC, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_warp_equals_reference_composition(spacing, any_axis, seed):
    rng = np.random.default_rng(seed)
    out = (12, 24, 20)
    record = (40, 70, 70)
    image, mask = smooth_volume(record, seed), blob_labels(record, seed=seed)
    params = GEOMETRY_ONLY.replace(slip_probability=0.2, shift_probability=0.2, misalign_max_pixels=4,
                                   elastic_jitter_um=(0.016, 0.016, 0.016), elastic_spacing_um=(0.08,) * 3,
                                   rotation_out_of_plane=any_axis)
    geometry = augment3d.sample_geometry_3d(rng, out, spacing, params)
    origin = augment3d.choose_origin_3d(rng, record, geometry)
    fused_image, fused_mask = augment3d.warp_3d(image, mask, geometry, origin)
    coords = reference_coordinates(geometry, np.asarray(origin) + (np.asarray(out) - 1) / 2)
    assert coords.min() >= 0 and (coords.max(axis=(1, 2, 3)) <= np.asarray(record) - 1).all()  # real context only
    reference = ndimage.map_coordinates(image[..., 0].astype(np.float64), coords, order=1)
    reference_mask = ndimage.map_coordinates(mask, coords, order=0)
    assert fused_image.shape == out + (1,) and fused_mask.shape == out
    np.testing.assert_allclose(fused_image[..., 0], reference, atol=0.03)  # image range is about +-4
    assert np.mean(fused_mask == reference_mask) > 0.99  # only ties at half voxels may round differently


def test_exact_transforms_equal_plain_array_operations():
    """Mirror and transpose alone move voxels without interpolation: equal to np.flip / np.transpose."""
    rng = np.random.default_rng(3)
    image, mask = smooth_volume((10, 10, 10)), blob_labels((10, 10, 10))
    params = AugmentParams3D.none(mirror=True, transpose=True)
    seen = set()
    for _ in range(30):
        geometry = augment3d.sample_geometry_3d(rng, (10, 10, 10), ISOTROPIC, params)
        out_image, out_mask = augment3d.warp_3d(image, mask, geometry, (0, 0, 0))
        # input[c_in + mirror * q[permutation]]: flip input axes, then bring input axis i to output axis perm[i]
        flipped = image[..., 0][tuple(slice(None, None, int(m)) for m in geometry.mirror_zyx)]
        expected = np.transpose(flipped, np.argsort(geometry.permutation))
        np.testing.assert_array_equal(out_image[..., 0], expected)
        flipped_mask = mask[tuple(slice(None, None, int(m)) for m in geometry.mirror_zyx)]
        np.testing.assert_array_equal(out_mask, np.transpose(flipped_mask, np.argsort(geometry.permutation)))
        seen.add(geometry.permutation)
    assert len(seen) > 3  # an isotropic volume gets transposes of all axes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64])
@pytest.mark.parametrize("spacing", [ANISOTROPIC, ISOTROPIC])
def test_masks_keep_only_their_own_class_ids(dtype, spacing):
    rng = np.random.default_rng(5)
    image, mask = smooth_volume((20, 40, 40)), blob_labels((20, 40, 40)).astype(dtype)
    for _ in range(5):
        _, out = augment3d.make_sample_3d(image, mask, rng, (8, 24, 24), spacing)
        assert out.dtype == dtype and set(np.unique(out)) <= {0, 3, 7, 250}


def test_slip_and_shift_move_whole_sections():
    rng = np.random.default_rng(7)
    record = (16, 60, 60)
    image = np.random.default_rng(0).random(record + (2,)).astype(np.float32)  # rough: any resampling would show
    mask = blob_labels(record)
    params = AugmentParams3D.none(slip_probability=0.3, shift_probability=0.3, misalign_max_pixels=6)
    moved = 0
    for _ in range(10):
        geometry = augment3d.sample_geometry_3d(rng, (12, 32, 32), ANISOTROPIC, params)
        oz, oy, ox = augment3d.choose_origin_3d(rng, record, geometry)
        out_image, out_mask = augment3d.warp_3d(image, mask, geometry, (oz, oy, ox))
        offsets = np.zeros((12, 2), int) if geometry.section_offsets_yx is None else geometry.section_offsets_yx.astype(int)
        for z, (dy, dx) in enumerate(offsets):
            window = (oz + z, slice(oy + dy, oy + dy + 32), slice(ox + dx, ox + dx + 32))
            np.testing.assert_array_equal(out_image[z], image[window])
            np.testing.assert_array_equal(out_mask[z], mask[window])
        moved += int(np.any(offsets))
    assert moved >= 5


def test_shift_moves_all_later_sections_and_slip_only_one():
    rng = np.random.default_rng(0)
    shifted = augment3d.section_offsets(rng, 50, AugmentParams3D.none(shift_probability=0.1, misalign_max_pixels=1000))
    changes = np.flatnonzero(np.any(np.diff(shifted, axis=0), axis=1))
    assert 1 <= len(changes) <= 15  # piecewise constant: a shift persists to the end
    slipped = augment3d.section_offsets(rng, 200, AugmentParams3D.none(slip_probability=0.1, misalign_max_pixels=5))
    assert 0 < np.count_nonzero(np.any(slipped, axis=1)) < 50 and np.abs(slipped).max() <= 5


def test_anisotropic_volume_is_never_rotated_out_of_plane_or_z_transposed():
    rng = np.random.default_rng(11)
    params = AugmentParams3D()
    for _ in range(300):
        geometry = augment3d.sample_geometry_3d(rng, (8, 32, 32), ANISOTROPIC, params)
        assert geometry.permutation[0] == 0 and geometry.scale_zyx[0] == 1.0
        assert np.allclose(np.abs(geometry.linear[0]), [1, 0, 0]) and np.allclose(np.abs(geometry.linear[:, 0]), [1, 0, 0])
        assert geometry.displacement is None or geometry.displacement[0] is None
        assert geometry.keeps_sections
    # negative control: an isotropic volume has its z transposed, and rotated out of plane when asked
    transposed = [augment3d.sample_geometry_3d(rng, (8, 32, 32), ISOTROPIC, params).permutation[0] for _ in range(50)]
    assert set(transposed) == {0, 1, 2}
    tilted = [augment3d.sample_geometry_3d(rng, (8, 32, 32), ISOTROPIC, params.replace(rotation_out_of_plane=True))
              .keeps_sections for _ in range(50)]
    assert not any(tilted)


def test_rotation_turns_the_section_plane_only_unless_asked_for_any_axis():
    """The default rotation is about z (gunpowder's in-plane rotation), also for isotropic volumes; with
    rotation_out_of_plane an isotropic volume gets any 3D rotation."""
    rng = np.random.default_rng(5)
    for spacing in (ISOTROPIC, ANISOTROPIC):
        for _ in range(100):
            rotation = augment3d.sample_geometry_3d(rng, (8, 32, 32), spacing, AugmentParams3D()).rotation
            np.testing.assert_allclose(rotation[0], [1, 0, 0], atol=1e-12)
            np.testing.assert_allclose(rotation[:, 0], [1, 0, 0], atol=1e-12)
    anywhere = AugmentParams3D(rotation_out_of_plane=True)
    tilts = [abs(augment3d.sample_geometry_3d(rng, (8, 32, 32), ISOTROPIC, anywhere).rotation[0, 0]) for _ in range(100)]
    assert min(tilts) < 0.9  # z turned away from z


@pytest.mark.parametrize("params", [AugmentParams3D(), AugmentParams3D(rotation_out_of_plane=True),
                                    AugmentParams3D(transpose=False)], ids=["in-plane", "any-axis", "no-transpose"])
def test_context_margin_bounds_every_draw(params):
    rng = np.random.default_rng(2)
    for spacing, out in [(ANISOTROPIC, (8, 32, 32)), (ISOTROPIC, (16, 16, 16)), (ISOTROPIC, (8, 32, 24))]:
        margin = augment3d.context_margin_3d(out, spacing, params)
        record = tuple(np.asarray(out) + 2 * margin)
        for _ in range(200):
            geometry = augment3d.sample_geometry_3d(rng, out, spacing, params)
            origin = augment3d.choose_origin_3d(rng, record, geometry)
            centre = np.asarray(origin) + (np.asarray(out) - 1) / 2
            lo, hi = geometry.extent
            assert np.all(centre + lo >= 0) and np.all(centre + hi <= np.asarray(record) - 1)


def test_tall_stacks_fall_back_to_map_coordinates(monkeypatch):
    image, mask = smooth_volume((24, 48, 48)), blob_labels((24, 48, 48))
    geometry = augment3d.sample_geometry_3d(np.random.default_rng(4), (12, 20, 20), ISOTROPIC, GEOMETRY_ONLY)
    origin = augment3d.choose_origin_3d(np.random.default_rng(4), (24, 48, 48), geometry)
    fast = augment3d.warp_3d(image, mask, geometry, origin)
    monkeypatch.setattr(augment3d, "CV_MAX_ROWS", 0)
    slow = augment3d.warp_3d(image, mask, geometry, origin)
    np.testing.assert_allclose(fast[0], slow[0], atol=0.03)
    assert np.mean(fast[1] == slow[1]) > 0.99


def test_small_records_are_mirror_padded():
    image, mask = smooth_volume((4, 10, 10)), blob_labels((4, 10, 10))
    out_image, out_mask = augment3d.make_sample_3d(image, mask, np.random.default_rng(0), (6, 16, 16), ANISOTROPIC)
    assert out_image.shape == (6, 16, 16, 1) and np.isfinite(out_image).all() and out_mask.shape == (6, 16, 16)


def test_section_defects_and_intensity():
    image = smooth_volume((6, 16, 16)) * 100 + 500
    rng = np.random.default_rng(0)
    blank = augment3d.apply_intensity_3d(image.copy(), rng, AugmentParams3D.none(missing_probability=1.0))
    assert np.all(blank == image.min())
    low = augment3d.apply_intensity_3d(image.copy(), rng, AugmentParams3D.none(low_contrast_probability=1.0))
    np.testing.assert_allclose(low.std(axis=(1, 2, 3)), 0.1 * image.std(axis=(1, 2, 3)), rtol=1e-3)
    np.testing.assert_allclose(low.mean(axis=(1, 2, 3)), image.mean(axis=(1, 2, 3)), rtol=1e-4)
    scaled = augment3d.apply_intensity_3d(image.copy(), rng, AugmentParams3D.none(section_scale_fraction=0.1))
    ratio = scaled.std(axis=(1, 2, 3)) / image.std(axis=(1, 2, 3))
    assert np.all((ratio >= 0.9 - 1e-4) & (ratio <= 1.1 + 1e-4)) and np.ptp(ratio) > 0  # differs per section


def test_deterministic_for_a_fixed_seed_and_pure():
    image = (smooth_volume((12, 40, 40)) * 1000 + 2000).astype(np.uint16)[..., 0]
    mask = blob_labels((12, 40, 40)).astype(np.uint8)
    before = image.copy(), mask.copy()
    first = augment3d.augment_3d(image, mask, np.random.default_rng(42), ANISOTROPIC, out_zyx=(8, 24, 24))
    second = augment3d.augment_3d(image, mask, np.random.default_rng(42), ANISOTROPIC, out_zyx=(8, 24, 24))
    other = augment3d.augment_3d(image, mask, np.random.default_rng(43), ANISOTROPIC, out_zyx=(8, 24, 24))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])
    assert first[0].dtype == np.uint16 and first[0].shape == (8, 24, 24)
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(mask, before[1])
    transform = augment3d.volume_augmenter(ANISOTROPIC, out_zyx=(8, 24, 24))
    np.testing.assert_array_equal(transform(image, mask, np.random.default_rng(42))[0], first[0])


def test_voxel_size_is_required():
    with pytest.raises(ValueError, match="voxel size"):
        augment3d.volume_augmenter(None)


def test_tune_allocator_applies_on_glibc():
    import platform

    assert augment3d.tune_allocator() is (platform.libc_ver()[0] == "glibc")


def test_benchmark_script_runs(capsys):
    import importlib.util
    import os

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_augment3d", os.path.join(ROOT, "benchmarks", "bench_augment3d.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--seconds", "0.01"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "samples/s" in line]
    assert len(lines) == 4 and all("per CPU second" in line for line in lines)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("spacing", [ANISOTROPIC, ISOTROPIC])
def test_integer_images_are_interpolated_in_their_own_type_within_the_stated_bound(dtype, spacing):
    """uint8/uint16 regions are remapped without conversion (REMAP_NATIVE_DTYPES): each in-plane
    interpolation is rounded to the integer grid (<= 0.5) with 1/32-voxel weights (<= slope / 64 per axis)."""
    rng = np.random.default_rng(9)
    record, out = (72, 110, 110), (12, 24, 20)
    exact = smooth_volume(record, 9)[..., 0] * 25 + 120  # about 20..220 grey levels
    image = np.rint(exact).astype(dtype)[..., None]
    mask = blob_labels(record)
    slope = max(np.abs(g).max() for g in np.gradient(image[..., 0].astype(np.float64)))
    params = GEOMETRY_ONLY.replace(elastic_jitter_um=(0.016,) * 3, elastic_spacing_um=(0.08,) * 3)
    for _ in range(4):
        geometry = augment3d.sample_geometry_3d(rng, out, spacing, params)
        origin = augment3d.choose_origin_3d(rng, record, geometry)
        fast, _ = augment3d.warp_3d(image, mask, geometry, origin)
        coords = reference_coordinates(geometry, np.asarray(origin) + (np.asarray(out) - 1) / 2)
        assert coords.min() >= 0 and (coords.max(axis=(1, 2, 3)) <= np.asarray(record) - 1).all()  # real context
        reference = ndimage.map_coordinates(image[..., 0].astype(np.float64), coords, order=1)
        error = np.abs(fast[..., 0] - reference)
        assert fast.dtype == np.float32 and error.max() <= 0.5 + 2 * slope / 64 + 1e-3
        assert error.mean() < 0.5  # negative control of the bound's size: mostly just the rounding


@pytest.mark.parametrize("spacing", [ANISOTROPIC, ISOTROPIC])
def test_regions_too_tall_for_one_stack_are_laid_out_as_a_mosaic(monkeypatch, spacing):
    """A region with more rows than cv2.remap takes is tiled into a mosaic of sections: same samples."""
    image, mask = smooth_volume((24, 48, 48)), blob_labels((24, 48, 48))
    geometry = augment3d.sample_geometry_3d(np.random.default_rng(4), (12, 20, 20), spacing, GEOMETRY_ONLY)
    origin = augment3d.choose_origin_3d(np.random.default_rng(4), (24, 48, 48), geometry)
    stacked = augment3d.warp_3d(image, mask, geometry, origin)
    monkeypatch.setattr(augment3d, "CV_MAX_ROWS", 400)
    lo, hi = geometry.extent
    assert augment3d._mosaic_columns(np.ceil(hi - lo).astype(int) + 3) > 1
    tiled = augment3d.warp_3d(image, mask, geometry, origin)
    np.testing.assert_allclose(tiled[0], stacked[0], atol=1e-3)  # float32 row coordinates of other sizes
    np.testing.assert_array_equal(tiled[1], stacked[1])


@pytest.mark.parametrize("spacing,any_axis", [(ANISOTROPIC, False), (ISOTROPIC, False), (ISOTROPIC, True)])
def test_regions_inside_the_record_are_remapped_from_views_with_the_same_result(monkeypatch, spacing, any_axis):
    """A region inside a C-ordered record is handed to cv2.remap as a strided view (no copy); the samples
    equal those of the copied stack up to cv2's fixed-point rounding, image (uint8, float32) and mask."""
    calls = []
    stack = augment3d._section_stack
    monkeypatch.setattr(augment3d, "_section_stack", lambda region: calls.append(region.shape) or stack(region))
    params = GEOMETRY_ONLY.replace(rotation_out_of_plane=any_axis)
    for dtype in (np.uint8, np.float32):
        image = (smooth_volume((30, 64, 64)) * 30 + 128).astype(dtype)
        mask = blob_labels((30, 64, 64))
        for seed in range(4):
            geometry = augment3d.sample_geometry_3d(np.random.default_rng(seed), (8, 24, 24), spacing, params)
            origin = augment3d.choose_origin_3d(np.random.default_rng(seed), (30, 64, 64), geometry)
            calls.clear()
            viewed = augment3d.warp_3d(image, mask, geometry, origin)
            assert calls and all(shape[1:3] != (64, 64) for shape in calls)  # a block of the record, not all of it
            with monkeypatch.context() as m:
                m.setattr(augment3d, "_section_stack", lambda region: None)
                copied = augment3d.warp_3d(image, mask, geometry, origin)
            # the row coordinates differ (another pitch), so cv2's 1/32-voxel rounding may differ at ties
            difference = np.abs(viewed[0] - copied[0])
            if dtype == np.uint8:
                assert np.mean(difference == 0) > 0.99 and difference.max() <= 1.0
            else:
                assert difference.max() <= 0.01  # of values about 128 +- 100
            assert np.mean(viewed[1] == copied[1]) > 0.99


def test_section_stack_is_a_view_only_when_the_rows_line_up():
    record = np.zeros((10, 50, 40, 1), np.uint8)
    view, pitch = augment3d._section_stack(record[2:6, 5:20, 3:30])
    assert view.base is not None and pitch == (50, 27) and view.shape == (3 * 50 + 15, 27, 1)
    assert np.shares_memory(view, record)
    assert augment3d._section_stack(record[2:6, 5:20, 3:30:2]) is None  # strided columns
    assert augment3d._section_stack(np.zeros((4, 5, 6, 7), np.uint8)[:, :, :, :5]) is None  # channel groups
    assert augment3d._section_stack(record[:, ::-1]) is None  # rows upside down


def test_noise_is_seeded_and_has_the_drawn_strength():
    image = np.full((8, 32, 32, 1), 100.0, np.float32)
    image[0, 0, 0, 0] = 0.0  # dynamic range 100
    params = AugmentParams3D.none(noise_fraction=0.05)
    a = augment3d.apply_intensity_3d(image.copy(), np.random.default_rng(1), params)
    b = augment3d.apply_intensity_3d(image.copy(), np.random.default_rng(1), params)
    c = augment3d.apply_intensity_3d(image.copy(), np.random.default_rng(2), params)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    sigma = np.random.default_rng(1).uniform(0.0, 0.05) * 100  # the first draw of apply_intensity_3d
    noise = (a - image)[1:]
    assert abs(noise.std() / sigma - 1) < 0.02 and abs(noise.mean()) < 0.02 * sigma


def test_mosaic_places_every_section_where_the_positions_say():
    region = np.arange(7 * 3 * 4, dtype=np.uint8).reshape(7, 3, 4)
    for columns in (1, 2, 3, 7):
        mosaic = augment3d._mosaic(region, columns, np.uint8)
        for z in range(7):
            rows, cols = augment3d._mosaic_position(np.float32([z]), np.float32([0]), np.float32([0]), region.shape[1:], columns)
            r, c = int(rows[0]), int(cols[0])
            np.testing.assert_array_equal(mosaic[r:r + 3, c:c + 4], region[z])


@pytest.mark.parametrize("columns", [2, 3, 7, 13])
def test_mosaic_tile_arithmetic_is_exact_for_every_section_index(columns):
    sections = np.arange(4000, dtype=np.float32)
    zero = np.zeros(1, np.float32)
    rows, cols = augment3d._mosaic_position(sections, zero, zero, (180, 120), columns)
    np.testing.assert_array_equal(rows, (np.arange(4000) // columns) * 180)
    np.testing.assert_array_equal(cols, (np.arange(4000) % columns) * 120)
