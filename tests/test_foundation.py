"""Shared modules: record format, tiling geometry, normalization, metrics."""
import json

import numpy as np
import pytest

from segkit import image_io, lmdb_format, metrics, tiling


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32"])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_record_round_trip(dtype, channels):
    rng = np.random.default_rng(0)
    image = (rng.random((17, 23, channels)) * 200).astype(dtype)
    mask = rng.integers(0, 3, (17, 23)).astype(np.uint16)
    rec = lmdb_format.Record(image, mask, source_index=4, origin=(-3, 5))
    out = lmdb_format.decode_record(lmdb_format.encode_record(rec))
    assert out.image_hwc.dtype == image.dtype and out.image_hwc.shape == image.shape
    assert out.image_hwc.tobytes() == image.tobytes()
    assert out.mask_hw.dtype == mask.dtype and np.array_equal(out.mask_hw, mask)
    assert out.source_index == 4 and tuple(out.origin) == (-3, 5)
    assert out.classes == sorted(np.unique(mask).tolist())


def test_record_rejects_foreign_bytes():
    with pytest.raises(ValueError, match="bad magic"):
        lmdb_format.decode_record(b"garbage-bytes")


@pytest.mark.parametrize("length,tile,stride", [(256, 128, None), (300, 128, None), (300, 128, 100), (100, 128,
    None), (129, 128, 1)])
def test_tile_starts_cover_every_pixel(length, tile, stride):
    starts = tiling.tile_starts(length, tile, stride)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
        assert s >= 0 and (s + tile <= length or length <= tile)
    assert covered[:length].all()


def test_normalize_matches_whole_image_stats():
    rng = np.random.default_rng(1)
    image = rng.normal([10, 1000, 0.5], [2, 300, 0.1], size=(64, 48, 3)).astype(np.float32)
    mean, std = image_io.image_stats(image, rows_per_chunk=7)
    np.testing.assert_allclose(mean, image.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, image.reshape(-1, 3).std(0), rtol=1e-4)
    out = image_io.normalize(image, mean, std)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-3)
    const = image_io.normalize(np.full((4, 4, 1), 7, np.uint16), [7.0], [0.0])
    assert np.all(const == 0)


@pytest.mark.parametrize("shape,pad", [((5, 7), (3, 9)), ((1, 4), (2, 2)), ((3, 3, 2), (10, 1))])
def test_mirror_pad(shape, pad):
    a = np.arange(np.prod(shape)).reshape(shape)
    out = image_io.mirror_pad(a, (pad[0], pad[0]), (pad[1], pad[1]))
    assert out.shape[:2] == (shape[0] + 2 * pad[0], shape[1] + 2 * pad[1])
    assert np.array_equal(out[pad[0] : pad[0] + shape[0], pad[1] : pad[1] + shape[1]], a)
    assert set(np.unique(out)) <= set(np.unique(a))


def test_metrics_known_values():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    result = metrics.scores(metrics.confusion_matrix(truth, pred, 2))
    assert result["pixel_accuracy"] == pytest.approx(0.75)
    assert result["iou"] == pytest.approx([0.5, 2 / 3])
    assert result["dice"] == pytest.approx([2 / 3, 0.8])


def test_dtype_for_classes():
    assert image_io.dtype_for_classes(2) == np.uint8
    assert image_io.dtype_for_classes(256) == np.uint8
    assert image_io.dtype_for_classes(257) == np.uint16


def test_tint_colours_labelled_pixels_only():
    rgb = np.full((2, 2, 3), 100.0)
    labels = np.array([[0, 1], [2, 11]])
    out = image_io.tint(rgb, labels, alpha=0.5)
    assert (out[0, 0] == 100).all()
    assert np.allclose(out[0, 1], 0.5 * 100 + 0.5 * image_io.PALETTE[0])
    assert np.allclose(out[1, 0], 0.5 * 100 + 0.5 * image_io.PALETTE[1])
    assert np.allclose(out[1, 1], out[0, 1])  # the palette repeats after len(PALETTE) classes


def test_stem_clashes_and_the_no_images_message(tmp_path):
    assert image_io.stem_clashes(["a.tif", "b.tif", "a.tiff", "c.png"]) == ["a.tif / a.tiff"]
    assert image_io.stem_clashes(["a.tif", "b.tif"]) == []
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"")
    expected = f"{tmp_path}: no *.tif images (found .jpg, .png files: set --image_format)"
    assert image_io.no_images_message(str(tmp_path), "tif") == expected


def test_metadata_names_the_missing_keys(tmp_path):
    from segkit import model_metadata

    with pytest.raises(ValueError, match="metadata lacks channels, size_factor"):
        model_metadata.make_metadata(model="unet", number_classes=2, normalization={}, receptive_field_radius=3)
    folder = tmp_path / "sm"
    (folder / "assets").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    meta = model_metadata.make_metadata(model="unet", channels=1, number_classes=2, normalization={}, size_factor=4,
                                        receptive_field_radius=3)
    del meta["number_classes"]
    (folder / "assets" / model_metadata.METADATA_FILENAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"segmentation_metadata.json: metadata lacks number_classes; re-export the model"):
        model_metadata.read_metadata(str(folder))


def test_mask_map_parse_apply_and_format():
    assert image_io.parse_mask_map("255:1,128:2") == {255: 1, 128: 2} == image_io.parse_mask_map({"255": 1, "128": 2})
    assert image_io.parse_mask_map(None) == {} == image_io.parse_mask_map("")
    for bad in ("255=1", "255:-1", "a:b", ",", {"x": 1}):
        with pytest.raises(ValueError, match="VALUE:CLASS pairs"):
            image_io.parse_mask_map(bad)
    assert image_io.format_mask_map({255: 1, 128: 2}) == "128:2,255:1"
    mask = np.array([[0, 255, 128], [7, 255, 0]], np.uint16)
    mapped = image_io.apply_mask_map(mask, {255: 1, 128: 2})
    assert mapped.tolist() == [[0, 1, 2], [7, 1, 0]] and mapped.dtype == np.uint8
    big = np.array([[0, 70000]], np.int64)
    assert image_io.apply_mask_map(big, {70000: 1}).tolist() == [[0, 1]]
    assert image_io.apply_mask_map(mask, {}) is mask
    assert "use --mask_map 255:1" in image_io.mask_values_hint([0, 255]) and image_io.mask_values_hint([0, 1]) is None
