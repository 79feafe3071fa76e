"""augment.py: mask values, alignment, the fused warp against references, context crops, intensity ops."""
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import scipy.ndimage

import augment
from augment import AugmentParams

DEFAULT = AugmentParams()
ELASTIC = AugmentParams(elastic_sigma=4.0, elastic_spacing=16)
STRONG = AugmentParams(elastic_sigma=6.0, elastic_spacing=8, jitter_fraction=0.5, scale_fraction=0.5,
                       intensity_fraction=0.1, gamma_fraction=0.5, noise_fraction=0.1)
PARAMS = {"default": DEFAULT, "elastic": ELASTIC, "strong": STRONG}
MASK_VALUES = {"uint8": [0, 3, 7, 250], "uint16": [0, 2, 999, 65535], "int32": [-5, 0, 7, 123456789],
               "uint32": [0, 1, 4_000_000_000]}


def _random_sample(rng, dtype, layout, mask_dtype):
    h, w = (int(v) for v in rng.integers(8, 48, 2))
    shape = {"hw": (h, w), "hwc1": (h, w, 1), "hwc3": (h, w, 3), "hwc6": (h, w, 6)}[layout]
    image = (rng.random(shape) * 200).astype(dtype)
    values = np.array(MASK_VALUES[mask_dtype], dtype=mask_dtype)
    # Blocky masks (not pixel noise) so that boundaries and interiors both occur.
    blocks = rng.integers(0, len(values), (h // 4 + 1, w // 4 + 1))
    mask = values[np.kron(blocks, np.ones((4, 4), int))[:h, :w]]
    return image, mask


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("layout", ["hw", "hwc1", "hwc3", "hwc6"])
@pytest.mark.parametrize("dtype,mask_dtype", [("uint8", "uint8"), ("uint16", "uint16"), ("int32", "int32"),
                                              ("float32", "uint8"), ("float32", "uint32")])
def test_mask_values_stay_a_subset_and_layout_is_kept(params, layout, dtype, mask_dtype):
    rng = np.random.default_rng(zlib.crc32(f"{params}{layout}{dtype}{mask_dtype}".encode()))
    for seed in range(12):
        image, mask = _random_sample(rng, dtype, layout, mask_dtype)
        image_before, mask_before = image.copy(), mask.copy()
        out_hw = None if seed % 2 else (int(rng.integers(4, 40)), int(rng.integers(4, 40)))
        out, out_mask = augment.augment(image, mask, np.random.default_rng(seed), PARAMS[params], out_hw)
        expected_hw = image.shape[:2] if out_hw is None else out_hw
        assert out.dtype == image.dtype and out.shape == tuple(expected_hw) + image.shape[2:]
        assert out_mask.dtype == mask.dtype and out_mask.shape == tuple(expected_hw)
        assert set(np.unique(out_mask).tolist()) <= set(np.unique(mask).tolist())
        np.testing.assert_array_equal(image, image_before)  # pure: inputs untouched
        np.testing.assert_array_equal(mask, mask_before)


def test_same_rng_state_gives_the_same_sample_and_read_only_inputs_work():
    rng = np.random.default_rng(5)
    image = (rng.random((40, 40, 2)) * 1000).astype(np.uint16)
    mask = (rng.random((40, 40)) > 0.5).astype(np.uint8)
    image.setflags(write=False)
    mask.setflags(write=False)
    a = augment.augment(image, mask, np.random.default_rng(1), STRONG)
    b = augment.augment(image, mask, np.random.default_rng(1), STRONG)
    c = augment.augment(image, mask, np.random.default_rng(2), STRONG)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


# ---- alignment -----------------------------------------------------------------------------------

def _pattern(channels=1):
    """Piecewise-constant image (1000 background, 3000 objects) whose mask is image > 2000."""
    image = np.full((64, 64), 1000.0, np.float32)
    image[8:30, 10:26] = 3000
    image[40:56, 30:60] = 3000
    cv2.circle(image, (44, 18), 9, 3000.0, -1)
    image_hwc = np.stack([image * (k + 1) for k in range(channels)], axis=2)
    return image_hwc, (image > 2000).astype(np.uint8)


def _boundary(mask, width=1):
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)


TRANSFORMS = {
    "reflect": augment.reflect, "rotate": augment.rotate, "scale": lambda i, m, r: augment.scale(i, m, r, 0.3),
    "jitter": lambda i, m, r: augment.jitter(i, m, r, 0.3), "elastic": lambda i, m, r: augment.elastic(i, m, r, 4.0, 16),
    "blur": augment.blur, "noise": augment.add_noise, "intensity": augment.shift_intensity, "gamma": augment.adjust_gamma,
    "default": lambda i, m, r: augment.augment(i, m, r, DEFAULT),
    "default+elastic": lambda i, m, r: augment.augment(i, m, r, ELASTIC),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_image_and_mask_stay_aligned(name):
    image, mask = _pattern()
    for seed in range(8):
        out, out_mask = TRANSFORMS[name](image, mask, np.random.default_rng(seed))
        # The threshold sits halfway between the two levels in the transformed image's own range.
        threshold = (out.min() + out.max()) / 2 if name in ("intensity", "gamma") else 2000
        disagree = (out[:, :, 0] > threshold) != (out_mask > 0)
        # Blur (sigma up to 2) rounds sharp corners: its iso-contour may move by 2 pixels there.
        near_edge = _boundary(out_mask, width=2 if name in ("blur", "default", "default+elastic") else 1)
        assert not np.any(disagree & ~near_edge), f"{name} seed {seed}: misaligned away from edges"
        assert disagree.mean() < 0.04, f"{name} seed {seed}: {disagree.mean():.3f} of pixels disagree"
        assert 0.1 < out_mask.mean() < 0.7  # the objects are still there


@pytest.mark.parametrize("channels", [2, 6])
def test_channel_groups_get_the_same_warp(channels):
    image, mask = _pattern(channels)  # 6: two OpenCV channel groups
    params = AugmentParams.none(reflection=True, rotation=True, scale_fraction=0.2, jitter_fraction=0.2,
                                elastic_sigma=3.0, elastic_spacing=16)
    for seed in range(4):
        out, _ = augment.augment(image, mask, np.random.default_rng(seed), params)
        for k in range(channels):
            np.testing.assert_allclose(out[:, :, k], out[:, :, 0] * (k + 1), rtol=1e-5)


# ---- the fused warp against independent references ---------------------------------------------

def _smooth(x, y):
    return 200 + 100 * np.sin(2 * np.pi * x / 60 + 0.3) * np.cos(2 * np.pi * y / 45 - 0.2)


def _reference_coordinates(geometry, origin_yx):
    """Input (x, y) of every output pixel, written out from the documented formula."""
    h, w = geometry.out_hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xs - (w - 1) / 2, ys - (h - 1) / 2
    cx, cy = origin_yx[1] + (w - 1) / 2, origin_yx[0] + (h - 1) / 2
    (a, b), (c, d) = geometry.linear
    x_in = cx + a * dx + b * dy + geometry.shift[0]
    y_in = cy + c * dx + d * dy + geometry.shift[1]
    if geometry.displacement is not None:
        x_in, y_in = x_in + geometry.displacement[0], y_in + geometry.displacement[1]
    return x_in, y_in


@pytest.mark.parametrize("params", ["default", "elastic"])
def test_fused_warp_matches_the_analytic_map_and_scipy(params):
    ys, xs = np.mgrid[0:160, 0:170].astype(np.float64)
    record = _smooth(xs, ys)[:, :, None]
    mask = np.zeros(record.shape[:2], np.uint8)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        geometry = augment.sample_geometry(rng, (48, 40), PARAMS[params])
        origin = augment.choose_origin(rng, record.shape[:2], geometry)
        out, _ = augment.warp(record, mask, geometry, origin, np.float64)
        x_in, y_in = _reference_coordinates(geometry, origin)
        assert x_in.min() >= 0 and y_in.min() >= 0 and x_in.max() <= 169 and y_in.max() <= 159  # context
        # Exact function values: only linear-interpolation and 1/32-pixel coordinate error remain.
        np.testing.assert_allclose(out[:, :, 0], _smooth(x_in, y_in), atol=0.5)
        if geometry.displacement is None:  # scipy: (row, col) order, output -> input matrix
            (a, b), (c, d) = geometry.linear
            matrix = np.array([[d, c], [b, a]])
            start = np.array([y_in[0, 0], x_in[0, 0]])
            reference = scipy.ndimage.affine_transform(record[:, :, 0], matrix, offset=start, output_shape=(48, 40), order=1)
            np.testing.assert_allclose(out[:, :, 0], reference, atol=0.3)  # 1/64 px x slope <= 14


def test_geometry_is_resampled_once(monkeypatch):
    calls = {"warpAffine": 0, "remap": 0}
    for name in calls:
        original = getattr(cv2, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(augment.cv2, name, counted)
    image, mask = np.zeros((80, 80, 3), np.float32), np.zeros((80, 80), np.uint8)
    augment.make_sample(image, mask, np.random.default_rng(0), (32, 32), DEFAULT)
    assert calls == {"warpAffine": 2, "remap": 0}  # one for the image, one for the mask
    augment.make_sample(image, mask, np.random.default_rng(0), (32, 32), ELASTIC)
    assert calls == {"warpAffine": 2, "remap": 2}


# ---- context instead of padding -----------------------------------------------------------------

def _coordinate_record(h, w):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([xs, ys], axis=2), np.zeros((h, w), np.uint8)


@pytest.mark.parametrize("params", ["default", "elastic", "strong"])
def test_large_records_give_context_not_padding(params):
    """Every output pixel is interpolated from real data (no reflection) when the record is large enough."""
    record, mask = _coordinate_record(260, 280)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        out, _ = augment.make_sample(record, mask, rng, (40, 48), PARAMS[params].replace(
            noise_fraction=0, blur_max_sigma=0, intensity_fraction=0, gamma_fraction=0), np.float64)
        rng = np.random.default_rng(seed)  # replay the same draws to get the geometry
        geometry = augment.sample_geometry(rng, (40, 48), PARAMS[params])
        origin = augment.choose_origin(rng, record.shape[:2], geometry)
        x_in, y_in = _reference_coordinates(geometry, origin)
        assert x_in.min() >= 0 and y_in.min() >= 0 and x_in.max() <= 279 and y_in.max() <= 259
        np.testing.assert_allclose(out[:, :, 0], x_in, atol=0.05)  # a reflected sample would be far off
        np.testing.assert_allclose(out[:, :, 1], y_in, atol=0.05)


def test_small_records_fall_back_to_mirror_reflection():
    record, mask = _coordinate_record(40, 40)
    params = AugmentParams.none(rotation=True, jitter_fraction=0.2)

    def mirror(t, n):  # BORDER_REFLECT_101 / image_io.mirror_pad, continuous version
        period = 2 * (n - 1)
        t = np.mod(t, period)
        return np.where(t <= n - 1, t, period - t)

    for seed in range(10):
        rng = np.random.default_rng(seed)
        out, _ = augment.make_sample(record, mask, rng, (40, 40), params, np.float64)
        rng = np.random.default_rng(seed)
        geometry = augment.sample_geometry(rng, (40, 40), params)
        origin = augment.choose_origin(rng, record.shape[:2], geometry)
        assert origin == (0, 0)  # the untransformed crop is the record
        x_in, y_in = _reference_coordinates(geometry, origin)
        np.testing.assert_allclose(out[:, :, 0], mirror(x_in, 40), atol=0.05)
        np.testing.assert_allclose(out[:, :, 1], mirror(y_in, 40), atol=0.05)


def test_plain_crop_is_an_exact_copy_and_pads_small_records():
    rng = np.random.default_rng(0)
    record = rng.integers(0, 60000, (30, 50, 2)).astype(np.uint16)
    mask = rng.integers(0, 3, (30, 50)).astype(np.uint8)
    out, out_mask = augment.make_sample(record, mask, rng, (20, 20), AugmentParams.none())
    found = [(y, x) for y in range(11) for x in range(31) if np.array_equal(record[y : y + 20, x : x + 20], out)]
    assert len(found) == 1
    y, x = found[0]
    np.testing.assert_array_equal(out_mask, mask[y : y + 20, x : x + 20])
    small, small_mask = augment.make_sample(record, mask, rng, (40, 60), AugmentParams.none())
    assert small.shape == (40, 60, 2) and small_mask.shape == (40, 60)
    assert set(np.unique(small_mask)) <= set(np.unique(mask))


# ---- intensity transforms -------------------------------------------------------------------------

def test_blur_is_spatial_only():
    image = np.zeros((32, 32, 6), np.float32)
    image[:, :, 1] = 7.0
    image[:, 16:, 3] = 1000.0  # a step edge in one channel only
    image[:, :, 5] = 3.0
    mask = np.zeros((32, 32), np.uint8)
    blurred = False
    for seed in range(6):
        out, _ = augment.blur(image, mask, np.random.default_rng(seed), max_sigma=3.0)
        for k in (0, 1, 2, 4, 5):  # constant channels stay exactly constant: nothing leaks across channels
            np.testing.assert_allclose(out[:, :, k], image[:, :, k], atol=1e-4)
        blurred |= bool(0 < out[5, 15, 3] < 1000)
    assert blurred


def test_noise_follows_the_dynamic_range():
    image = np.zeros((64, 64), np.float32)
    image[:, 32:] = 1000.0
    mask = np.zeros((64, 64), np.uint8)
    stds = []
    for seed in range(10):
        out, _ = augment.add_noise(image, mask, np.random.default_rng(seed), fraction=0.02)
        diff = out - image
        stds.append(diff.std())
        assert abs(diff.mean()) < 2.0 and diff.std() < 0.02 * 1000 * 1.1
    assert max(stds) > 5.0  # sigma is drawn up to 2% of the range (20)


def test_intensity_shift_and_gamma_respect_the_range():
    image = np.linspace(100, 1100, 32 * 32, dtype=np.float32).reshape(32, 32)
    mask = np.zeros((32, 32), np.uint8)
    for seed in range(5):
        shifted, _ = augment.shift_intensity(image, mask, np.random.default_rng(seed), fraction=0.05)
        offset = shifted - image
        np.testing.assert_allclose(offset, offset.flat[0], atol=1e-3)
        assert abs(offset.flat[0]) <= 0.05 * 1000 + 1e-3
        gamma, _ = augment.adjust_gamma(image, mask, np.random.default_rng(seed), fraction=0.5)
        assert np.all(np.diff(gamma.ravel()) >= -1e-3)  # monotone
        np.testing.assert_allclose([gamma.min(), gamma.max()], [100, 1100], rtol=1e-5)


def test_integer_images_are_rounded_and_clipped_not_wrapped():
    image = np.full((16, 16), 250, np.uint8)
    image[:, :8] = 0
    mask = np.zeros((16, 16), np.uint8)
    for seed in range(5):
        out, _ = augment.augment(image, mask, np.random.default_rng(seed), AugmentParams.none(intensity_fraction=0.5))
        assert out.dtype == np.uint8
        assert len(np.unique(out)) <= 2 and (out[:, 8:].min() >= 125)  # no wrap-around to small values


def test_params_are_validated():
    with pytest.raises(ValueError, match="noise_fraction"):
        AugmentParams(noise_fraction=-0.1)
    with pytest.raises(ValueError, match="scale_fraction"):
        AugmentParams(scale_fraction=1.0)
    assert AugmentParams.none(rotation=True).rotation and not AugmentParams.none().reflection


def test_augment_never_imports_tensorflow():
    code = "import sys, augment; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=augment.__file__.rsplit("/", 1)[0]).returncode == 0


@pytest.mark.parametrize("channels", range(1, 11))
def test_channel_groups_cover_every_channel_in_groups_opencv_handles_alike(channels):
    groups = augment.channel_groups(channels)
    assert [c for a, b in groups for c in range(a, b)] == list(range(channels))
    assert all(b - a in (1, 3, 4) for a, b in groups)
