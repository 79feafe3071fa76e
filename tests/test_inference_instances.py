"""Instance inference (issue #16): labels/, objects.csv, instance_metrics.csv, outlines, seams out of core.

The "model" is a pointwise numpy predictor that gives exact one-hot probabilities of the 3-class target the
synthetic image encodes, so the labels are known: the objects the image was drawn from. The SavedModel folder
holds only the metadata (segment_folder gets the predictor; the CLI refusals happen before TensorFlow loads).
"""
import json
import logging
import os

import numpy as np
import pytest
import tifffile
from conftest import one_error_line
from savedmodel_helpers import metadata
from skimage.segmentation import find_boundaries

import inference_unet as inf
from segkit import image_io, instance_targets, lmdb_format, model_metadata
from segkit.cliutil import InputError
from segkit.inference import folder, instances_out
from segkit.instances import InstanceThresholds, labels_from_probabilities, one_hot

HALO = 16  # >= the largest synthetic object (discs of radius <= 7, 8-pixel boxes): labels exact at seams
INTERIOR, BOUNDARY = 3000.0, 1000.0  # 1-channel volumes: class by intensity


def fake_model(path, *, instances=True, rank=2, channels=3, classes=3, halo=HALO, diameter=None, target="three_class"):
    meta = metadata(channels=channels, number_classes=classes, size_factor=1, radius=0)
    if rank == 3:
        meta.update(spatial_rank=3, size_factor=[1, 1, 1], receptive_field_radius=[0, 0, 0],
                    effective_receptive_field_radius=None, training_tile_size=[8, 32, 32])
    if instances:
        meta["instances"] = {"target": target, "classes": instance_targets.CLASS_NAMES[target],
                             "thresholds": InstanceThresholds().to_dict(), "halo_px": halo}
        if diameter is not None:
            meta["instances"]["object_diameter_px"] = diameter
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    open(os.path.join(path, "saved_model.pb"), "wb").close()
    with open(model_metadata.metadata_path(str(path)), "w") as fh:
        json.dump(meta, fh)
    return str(path)


def one_hot_predict(batch):
    """3-channel images whose channel c is high where the target is c: exact one-hot probabilities."""
    return np.eye(3, dtype=np.float32)[np.argmax(batch, axis=-1)]


def intensity_predict(image_zyxc):
    """1-channel images of 0 / INTERIOR / BOUNDARY: undo the z-score, then the nearest class."""
    mean, std = image_io.image_stats(image_zyxc)
    levels = image_io.normalize(np.array([[[0.0], [INTERIOR], [BOUNDARY]]], np.float32), mean, std)[0, :, 0]

    def predict(batch):
        return np.eye(3, dtype=np.float32)[np.argmin(np.abs(batch - levels), axis=-1)]

    return predict


def touching_objects(shape, seed=0, count=None):
    """Instance labels of touching rectangles (boxes) and discs; every object's interior has >= 4 pixels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    grid = np.indices(shape)
    count = count or max(3, int(np.prod(shape)) // 400)
    for obj in range(1, count + 1):
        centre = [rng.integers(4, n - 4) for n in shape]
        radius = rng.integers(4, 8)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside] = obj
    labels[tuple(slice(2, 10) for _ in shape)] = count + 1  # a box overlapping whatever is there
    from segkit.instances import compact_labels

    return compact_labels(labels)


def expected_labels(labels):
    """What exact probabilities of ``labels``' 3-class target give (the encoding is not lossless where objects
    touch: the flooding order decides a few boundary pixels)."""
    target = instance_targets.make_target(labels, "three_class")
    return labels_from_probabilities(one_hot(target, 3))


def image_3channel(labels):
    target = instance_targets.make_target(labels, "three_class")
    return (100 + 1000 * np.eye(3)[target]).astype(np.uint16)


def image_1channel(labels):
    target = instance_targets.make_target(labels, "three_class")
    return np.array([0, INTERIOR, BOUNDARY], np.float32)[target].astype(np.uint16)


def same_up_to_renumbering(a, b):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def crosses_seams(labels, tile):
    """Whether some object lies in more than one zone of a ``tile`` grid (so the seam merge is exercised)."""
    tile = tile if isinstance(tile, tuple) else (tile,) * labels.ndim
    zone = sum(np.indices(labels.shape)[a] // t * 1000**a for a, t in enumerate(tile))
    return any(len(np.unique(zone[labels == obj])) > 1 for obj in range(1, int(labels.max()) + 1))


def segment(model, images, out, predict_fn=one_hot_predict, **kw):
    return folder.segment_folder(saved_model_filepath=model, image_folder=str(images), output_folder=str(out),
                                 predict_fn=predict_fn, **kw)


def read_csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


# --- metadata -----------------------------------------------------------------------------------------


def test_metadata_instances_block_round_trips_and_old_metadata_load_unchanged(tmp_path):
    with_block = model_metadata.load(fake_model(tmp_path / "a"))
    assert with_block.instances["target"] == "three_class" and with_block.instances["halo_px"] == HALO
    assert model_metadata.ModelMetadata.from_dict(with_block.to_dict()) == with_block
    old = model_metadata.load(fake_model(tmp_path / "b", instances=False))
    assert old.instances is None and "instances" not in old.to_dict()


@pytest.mark.parametrize("change, expected", [
    ({"target": "blobs"}, "instances.target"),
    ({"thresholds": {"seed": 1.5}}, "instances.thresholds"),
    ({"halo_px": 0}, "instances.halo_px"),
    ({"extra": 1}, "exactly the keys"),
    ({"object_diameter_px": 0}, "instances.object_diameter_px"),
    ({"object_diameter_px": "12"}, "instances.object_diameter_px"),
    ({"object_diameter_px": float("nan")}, "instances.object_diameter_px"),
])
def test_metadata_instances_block_is_validated(tmp_path, change, expected):
    data = model_metadata.load(fake_model(tmp_path)).to_dict()
    data["instances"] = {**data["instances"], **change}
    with pytest.raises(model_metadata.MetadataError, match=expected):
        model_metadata.ModelMetadata.from_dict(data)


# --- labels and objects.csv -----------------------------------------------------------------------------


def test_labels_round_trip_and_objects_csv_by_hand(tmp_path):
    labels = np.zeros((20, 30), np.uint16)
    labels[2:6, 3:9] = 1      # 4 x 6 = 24 px
    labels[7:13, 3:9] = 2     # 6 x 6 = 36 px
    labels[14:19, 20:28] = 3  # 5 x 8 = 40 px
    image = image_3channel(labels)
    os.makedirs(tmp_path / "images")
    # 0.5 um pixels (ImageJ resolution in pixels per micron)
    tifffile.imwrite(tmp_path / "images" / "cells.tif", np.moveaxis(image, -1, 0), imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "CYX", "unit": "micron"})
    summary = segment(fake_model(tmp_path / "m"), tmp_path / "images", tmp_path / "out")
    assert summary.segmented == ["cells.tif"] and not summary.failed
    written = tifffile.imread(tmp_path / "out" / "labels" / "cells.tif")
    assert written.dtype == np.uint16 and same_up_to_renumbering(written, labels)
    rows = read_csv(tmp_path / "out" / "objects.csv")
    assert list(rows[0]) == ["image", "id", "area_px", "area_um2", "centroid_y_px", "centroid_x_px", "centroid_y_um",
                             "centroid_x_um", "bbox_y_min", "bbox_x_min", "bbox_y_max", "bbox_x_max",
                             "mean_intensity_c0", "mean_intensity_c1", "mean_intensity_c2"]
    by_area = {int(r["area_px"]): r for r in rows}
    assert sorted(by_area) == [24, 36, 40]
    third = by_area[40]
    assert float(third["area_um2"]) == pytest.approx(40 * 0.25)
    assert float(third["centroid_y_px"]) == pytest.approx(16.0) and float(third["centroid_x_px"]) == pytest.approx(23.5)
    assert float(third["centroid_y_um"]) == pytest.approx(8.0) and float(third["centroid_x_um"]) == pytest.approx(11.75)
    assert [int(third[k]) for k in ("bbox_y_min", "bbox_x_min", "bbox_y_max", "bbox_x_max")] == [14, 20, 19, 28]
    # 5 x 8 box: 3 x 6 = 18 interior pixels (channel 1 high), 22 boundary pixels (channel 2 high)
    assert float(third["mean_intensity_c0"]) == pytest.approx(100.0)
    assert float(third["mean_intensity_c1"]) == pytest.approx(100 + 1000 * 18 / 40)
    assert float(third["mean_intensity_c2"]) == pytest.approx(100 + 1000 * 22 / 40)
    assert all(r["image"] == "cells.tif" for r in rows)


def test_uncalibrated_images_leave_physical_units_empty_and_zarr_output(tmp_path):
    labels = touching_objects((40, 48), seed=1)
    os.makedirs(tmp_path / "images")
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(labels))
    segment(fake_model(tmp_path / "m"), tmp_path / "images", tmp_path / "out", output_format="zarr")
    import zarr

    written = np.asarray(zarr.open_group(str(tmp_path / "out" / "labels" / "a.zarr"), mode="r")["0"])
    assert same_up_to_renumbering(written, expected_labels(labels))
    rows = read_csv(tmp_path / "out" / "objects.csv")
    assert len(rows) == written.max() and all(r["area_um2"] == "" and r["centroid_y_um"] == "" for r in rows)


def run_three_ways(tmp_path, labels, write, predict, tile):
    """Labels of one input whole in memory, with tiled prediction, and out of core (zones merged at seams)."""
    model = fake_model(tmp_path / "m", rank=labels.ndim, channels=3 if labels.ndim == 2 else 1)
    os.makedirs(tmp_path / "images")
    write(tmp_path / "images" / "x.tif")
    runs = {"whole": {}, "tiled": {"tile_size": tile}, "out_of_core": {"tile_size": tile, "memory_limit_mb": 0.001}}
    out = {}
    for kind, options in runs.items():
        summary = segment(model, tmp_path / "images", tmp_path / kind, predict_fn=predict, **options)
        assert summary.segmented == ["x.tif"] and not summary.failed, summary.failed
        out[kind] = tifffile.imread(tmp_path / kind / "labels" / "x.tif")
        out[kind + " objects"] = read_csv(tmp_path / kind / "objects.csv")
    return out


def test_2d_tiled_whole_and_out_of_core_labels_are_identical_up_to_renumbering(tmp_path, caplog):
    labels = touching_objects((70, 90), seed=2)
    image = image_3channel(labels)
    caplog.set_level(logging.INFO)
    out = run_three_ways(tmp_path, labels, lambda p: tifffile.imwrite(p, image), one_hot_predict, 32)
    assert "out of core" in caplog.text
    expected = expected_labels(labels)
    assert expected.max() >= 0.8 * labels.max() and crosses_seams(expected, 32)
    for kind in ("whole", "tiled", "out_of_core"):
        assert same_up_to_renumbering(out[kind], expected), kind
        assert sorted(int(r["area_px"]) for r in out[kind + " objects"]) == sorted(np.bincount(expected.ravel())[1:])


def test_3d_tiled_whole_and_out_of_core_labels_are_identical_up_to_renumbering(tmp_path, caplog):
    labels = touching_objects((20, 40, 44), seed=3, count=12)
    image = image_1channel(labels)

    def write(path):
        tifffile.imwrite(path, image, imagej=True, resolution=(2.0, 2.0),
                         metadata={"axes": "ZYX", "spacing": 2.0, "unit": "micron"})

    caplog.set_level(logging.INFO)
    out = run_three_ways(tmp_path, labels, write, intensity_predict(image[..., None]), "8,16,16")
    assert "out of core" in caplog.text
    expected = expected_labels(labels)
    assert expected.max() >= 0.6 * labels.max() and crosses_seams(expected, (8, 16, 16))
    for kind in ("whole", "tiled", "out_of_core"):
        assert out[kind].shape == labels.shape and same_up_to_renumbering(out[kind], expected), kind
    rows = out["out_of_core objects"]
    assert "volume_um3" in rows[0] and float(rows[0]["volume_um3"]) == pytest.approx(int(rows[0]["volume_px"]) * 0.5)


# --- ground truth: instance_metrics.csv -------------------------------------------------------------------


def test_instance_metrics_against_hand_computed_values(tmp_path):
    truth = np.zeros((30, 30), np.uint16)
    truth[2:8, 2:8], truth[2:8, 9:15], truth[20:27, 20:27] = 1, 2, 3
    drawn = truth.copy()
    drawn[truth == 3] = 0  # the image lacks object 3: TP 2, FN 1, FP 0 at every IoU threshold
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "truth")
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(drawn))
    tifffile.imwrite(tmp_path / "images" / "b.tif", image_3channel(truth))
    tifffile.imwrite(tmp_path / "truth" / "a.tif", truth)
    tifffile.imwrite(tmp_path / "truth" / "b.tif", (truth * 7).astype(np.int32))  # other ids, same objects
    summary = segment(fake_model(tmp_path / "m"), tmp_path / "images", tmp_path / "out", mask_folder=str(tmp_path / "truth"))
    assert not summary.failed
    rows = {r["image"]: r for r in read_csv(tmp_path / "out" / "instance_metrics.csv")}
    a, b, overall = rows["a.tif"], rows["b.tif"], rows["ALL"]
    for t in ("t50", "t75", "t90"):
        assert (int(a[f"tp_{t}"]), int(a[f"fp_{t}"]), int(a[f"fn_{t}"])) == (2, 0, 1)
        assert float(a[f"ap_{t}"]) == pytest.approx(2 / 3) and float(a[f"f1_{t}"]) == pytest.approx(0.8)
        assert float(a[f"pq_{t}"]) == pytest.approx(0.8)  # matched IoU 1 x F1
        assert float(b[f"ap_{t}"]) == 1.0
        assert float(overall[f"ap_{t}"]) == pytest.approx(5 / 6)  # TP 5, FN 1 over both images
    assert float(b["adapted_rand_error"]) == pytest.approx(0.0) and float(b["vi"]) == pytest.approx(0.0)
    # object 3 predicted as background: the prediction merges it (VI merge), splits nothing
    assert float(a["vi_merge"]) > 0 and float(a["vi_split"]) == pytest.approx(0.0)
    # metrics.csv keeps per-class semantics: truth labels -> their 3-class target
    per_class = {r["image"]: r for r in read_csv(tmp_path / "out" / "metrics.csv")}
    assert float(per_class["b.tif"]["pixel_accuracy"]) == 1.0


@pytest.mark.parametrize("mask, expected", [
    (np.full((30, 30), 1.5, np.float32), "not an integer type"),
    (np.full((30, 30), -1, np.int32), "negative ids"),
])
def test_bad_instance_ground_truth_fails_its_image_in_one_line(tmp_path, caplog, mask, expected):
    labels = touching_objects((30, 30), seed=4)
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "truth")
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(labels))
    tifffile.imwrite(tmp_path / "truth" / "a.tif", mask)
    summary = segment(fake_model(tmp_path / "m"), tmp_path / "images", tmp_path / "out",
                      mask_folder=str(tmp_path / "truth"))
    assert [name for name, _ in summary.failed] == ["a.tif"] and expected in summary.failed[0][1]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and expected in r.getMessage()]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and "Traceback" not in caplog.text


# --- flags ------------------------------------------------------------------------------------------------


def cli(model, tmp_path, *extra):
    os.makedirs(tmp_path / "images", exist_ok=True)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(touching_objects((30, 30))))
    return inf.main(["--saved_model_filepath", model, "--image_folder", str(tmp_path / "images"),
                     "--output_folder", str(tmp_path / "out"), *extra])


def test_instances_1_with_a_semantic_model_is_refused_in_one_line(tmp_path, capsys):
    model = fake_model(tmp_path / "m", instances=False, channels=3, classes=3)
    assert cli(model, tmp_path, "--instances", "1") == 2
    line = one_error_line(capsys)
    assert "--instances 1" in line and "not trained on instance targets" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--seed_threshold", "1.5"), ("--min_object_size", "-3"),
                                         ("--seam_halo", "0"), ("--seed_dynamic", "-0.1"), ("--seed_dynamic", "nan")])
def test_bad_instance_flags_are_refused_in_one_line(tmp_path, capsys, flag, value):
    assert cli(fake_model(tmp_path / "m"), tmp_path, flag, value) == 2
    assert flag in one_error_line(capsys)


def test_instances_default_follows_the_model_and_flags_override_thresholds(tmp_path, caplog):
    meta = model_metadata.load(fake_model(tmp_path / "m", classes=6, target="distance"))
    with caplog.at_level(logging.INFO):
        on = instances_out.resolve_instances(None, meta, "m", min_object_size=9, seed_threshold=0.7,
                                             seed_dynamic=0.2)
    assert on.thresholds == InstanceThresholds(seed=0.7, foreground=0.5, min_size=9, dynamic=0.2)
    assert on.halo_px == HALO
    assert ("seed 0.7, foreground 0.5, min_size 9, dynamic 0.2 (the model's; min_size from --min_object_size, seed "
            "from --seed_threshold, dynamic from --seed_dynamic)") in caplog.text
    assert instances_out.resolve_instances(False, meta, "m") is None
    semantic = model_metadata.load(fake_model(tmp_path / "s", instances=False))
    three_class = model_metadata.load(fake_model(tmp_path / "t"))
    with pytest.raises(InputError, match="--seed_dynamic splits the seed regions of the distance target"):
        instances_out.resolve_instances(None, three_class, "t", seed_dynamic=0.2)
    assert instances_out.resolve_instances(None, three_class, "t", seed_dynamic=0).thresholds.dynamic == 0
    assert instances_out.resolve_instances(None, semantic, "s") is None


def test_overlays_show_object_outlines(tmp_path):
    labels = touching_objects((40, 40), seed=5)
    os.makedirs(tmp_path / "images")
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(labels))
    segment(fake_model(tmp_path / "m"), tmp_path / "images", tmp_path / "out", overlay=True)
    import imageio.v3 as iio

    overlay = iio.imread(tmp_path / "out" / "overlays" / "a.png")
    yellow = np.all(overlay == np.array(instances_out.OUTLINE_RGB, np.uint8), axis=-1)
    from skimage.segmentation import find_boundaries

    expected = expected_labels(labels)
    assert np.array_equal(yellow, find_boundaries(expected, mode="inner") & (expected > 0))


# --- training: the metadata block ----------------------------------------------------------------------------


def test_training_on_instance_databases_fills_the_metadata_block(tmp_path):
    from types import SimpleNamespace

    import build_lmdb
    from segkit.training.resolve import training_instances

    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    for i in range(2):
        labels = touching_objects((48, 48), seed=10 + i)
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", image_3channel(labels)[..., 1])
        tifffile.imwrite(tmp_path / "masks" / f"{i}.tif", labels)
    build_lmdb.build_databases(image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
                               output_folder=str(tmp_path / "db"), dataset_name="ds", train_fraction=0.5, workers=1,
                               progress=False, mask_type="instances", instance_target="three_class")
    config = SimpleNamespace(train_database=(str(tmp_path / "db" / "train-ds.lmdb"),), crop_size=(32, 32))
    block = training_instances(config)
    stored = lmdb_format.read_metadata(config.train_database[0])
    train_file = stored["sources"][0]["file"]
    sizes = instance_targets.object_sizes(tifffile.imread(tmp_path / "masks" / train_file))
    diameter = round(2 * np.sqrt(np.median(sizes) / np.pi), 3)  # the disc of the median object's area
    assert stored["sources"][0]["objects"] == stored["instance_target"]["objects"] == sizes.size
    assert stored["instance_target"]["median_object_pixels"] == float(np.median(sizes))
    assert block == {"target": "three_class", "classes": ["background", "interior", "boundary"],
                     "thresholds": InstanceThresholds().to_dict(), "halo_px": 32, "object_diameter_px": diameter}
    import train_unet
    from segkit.training.resolve import resolve_config

    db = tmp_path / "db"
    resolved = resolve_config(train_unet.build_parser().parse_args([  # no --number_classes: the target's 3 classes
        "--train_database", str(db / "train-ds.lmdb"), "--test_database", str(db / "test-ds.lmdb"),
        "--output_dir", str(tmp_path / "run")]))
    assert resolved.number_classes == 3 and "three_class instance target" in resolved.origins["number_classes"]
    meta = model_metadata.ModelMetadata.from_dict({**metadata(channels=1, number_classes=3, size_factor=1, radius=0),
                                                   "instances": block})
    assert instances_out.resolve_instances(None, meta, "m").target == "three_class"
    semantic = build_lmdb.build_databases(image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
                                          output_folder=str(tmp_path / "db2"), dataset_name="ds", train_fraction=0.5,
                                          workers=1, progress=False)
    assert semantic is not None
    assert training_instances(SimpleNamespace(train_database=(str(tmp_path / "db2" / "train-ds.lmdb"),),
                                              crop_size=(32, 32))) is None


def test_tensorboard_panels_outline_the_objects_of_instance_models():
    from segkit.training.summaries import overlay_panels

    labels = np.zeros((2, 24, 24), np.uint16)
    labels[:, 3:10, 3:10], labels[:, 12:20, 5:15] = 1, 2
    classes = instance_targets.make_target(labels, "three_class")
    images = np.random.default_rng(0).random((2, 24, 24, 1)).astype(np.float32)
    plain = overlay_panels(images, classes, classes)
    panels = overlay_panels(images, classes, classes, instance_target="three_class")
    yellow = np.all(panels == np.array(instances_out.OUTLINE_RGB, np.uint8), axis=-1)
    outline = find_boundaries(labels[0], mode="inner") & (labels[0] > 0)
    assert np.array_equal(yellow[0, :, 24:48], outline) and np.array_equal(yellow[0, :, 48:], outline)
    assert not yellow[:, :, :24].any() and not np.all(plain == np.array(instances_out.OUTLINE_RGB, np.uint8), -1).any()


# --- objects at the training objects' scale (--object_diameter) ------------------------------------------------


def small_discs(shape=(64, 64), radius=3, step=12):
    """Instance labels of separate discs of ``radius`` on a grid (area 29 px, 6.1 px across, for radius 3)."""
    labels = np.zeros(shape, np.uint16)
    yy, xx = np.indices(shape)
    for i, (cy, cx) in enumerate((y, x) for y in range(step // 2, shape[0], step) for x in range(step // 2, shape[1], step)):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = i + 1
    return labels


def scaled_predict(image, calls):
    """predict(image, factor) for objects_at_scale: the one-hot "model" on the image resized by factor."""
    def predict(image_hwc, factor):
        calls.append(factor)
        size = (round(image_hwc.shape[0] * factor), round(image_hwc.shape[1] * factor))
        resized = instances_out.resize(image_hwc, size) if factor != 1 else image_hwc.astype(np.float32)
        return one_hot_predict(resized)
    return predict


def inst_settings(trained, diameter=None):
    return instances_out.InstanceSettings("three_class", InstanceThresholds(min_size=2), HALO, diameter, trained,
                                          True)


def test_small_objects_are_labelled_again_at_the_training_objects_scale():
    labels = small_discs()
    image = image_3channel(labels)
    native = instances_out.median_diameter(expected_labels(labels))
    calls = []
    probs, found, note = instances_out.objects_at_scale(image, scaled_predict(image, calls), inst_settings(20.0), 3,
                                                        2**30)
    assert calls == [1.0, pytest.approx(min(20.0 / native, instances_out.MAX_FACTOR))]
    assert "objects labelled at x" in note and "median object" in note
    assert found.shape == labels.shape and probs.shape == labels.shape + (3,)
    assert np.allclose(probs.sum(axis=-1), 1, atol=1e-5)
    assert found.max() == labels.max() == len(np.unique(found)) - 1  # every disc, one id each, ids 1..n
    overlap = [np.bincount(found[labels == k]).argmax() for k in range(1, int(labels.max()) + 1)]
    assert len(set(overlap)) == labels.max() and 0 not in overlap  # each true disc lies in its own object


def test_objects_near_the_training_size_are_labelled_once_at_their_own_scale():
    labels = small_discs()
    image = image_3channel(labels)
    native = instances_out.median_diameter(expected_labels(labels))
    calls = []
    _, found, note = instances_out.objects_at_scale(image, scaled_predict(image, calls),
                                                    inst_settings(native * (instances_out.AUTO_MIN_FACTOR - 0.1)), 3,
                                                    2**30)
    assert calls == [1.0] and note == ""
    assert same_up_to_renumbering(found, expected_labels(labels))


def test_a_given_diameter_resizes_once_and_memory_caps_the_factor():
    labels = small_discs()
    image = image_3channel(labels)
    calls = []
    _, _, note = instances_out.objects_at_scale(image, scaled_predict(image, calls), inst_settings(20.0, 8.0), 3,
                                                2**30)
    assert calls == [2.5] and "x2.50 (--object_diameter 8 px" in note
    calls.clear()  # a working set that holds the image at its own size only: no enlarging
    _, found, note = instances_out.objects_at_scale(image, scaled_predict(image, calls), inst_settings(20.0), 3,
                                                    64 * 64 * 60)
    assert calls == [1.0] and note == ""
    assert same_up_to_renumbering(found, expected_labels(labels))


def test_object_diameter_through_the_folder_and_its_refusals(tmp_path, caplog, capsys):
    labels = small_discs()
    os.makedirs(tmp_path / "images")
    tifffile.imwrite(tmp_path / "images" / "a.tif", image_3channel(labels))
    model = fake_model(tmp_path / "m", diameter=20.0)
    with caplog.at_level(logging.INFO):
        segment(model, tmp_path / "images", tmp_path / "auto")
    assert "objects labelled at x" in caplog.text and "--object_diameter auto" in caplog.text
    auto = tifffile.imread(tmp_path / "auto" / "labels" / "a.tif")
    assert auto.max() == labels.max()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        segment(model, tmp_path / "images", tmp_path / "off", object_diameter="0")
    assert "objects labelled at" not in caplog.text
    assert same_up_to_renumbering(tifffile.imread(tmp_path / "off" / "labels" / "a.tif"), expected_labels(labels))
    for value in ("-3", "abc", "0.5"):
        assert cli(model, tmp_path, "--object_diameter", value) == 2
        assert "--object_diameter must be auto, 0 (off) or the objects' diameter" in one_error_line(capsys)
    assert cli(fake_model(tmp_path / "old"), tmp_path, "--object_diameter", "12") == 2
    assert "does not record its training objects' diameter" in one_error_line(capsys)
