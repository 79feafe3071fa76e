"""Instance thresholds fitted to a trained model on its training records (segkit.instance_tuning, issue #16)."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from savedmodel_helpers import metadata
from test_inference_instances import image_3channel, touching_objects

from segkit import instance_targets, instance_tuning, model_metadata
from segkit.instance_metrics import average_precision
from segkit.instances import InstanceThresholds, labels_from_probabilities, one_hot

NECK = 0.75


def two_discs_with_a_neck(shape=(40, 64)):
    """Two touching discs of radius 12; the model is sure of their interiors (0.999) but takes the boundary
    between them for interior at NECK (0.75): a seed threshold of 0.5 merges them, one of 0.75 or more keeps them
    apart."""
    grid = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for obj, cx in ((1, 20), (2, 43)):
        labels[(grid[0] - 20) ** 2 + (grid[1] - cx) ** 2 <= 12 ** 2] = obj
    probs = one_hot(instance_targets.make_target(labels, "three_class"), 3)
    probs[(probs[..., 1] == 1)] = (0.0005, 0.999, 0.0005)
    probs[(np.abs(grid[1] - 31.5) < 2) & (labels > 0)] = (0.05, NECK, 0.2)
    return probs, labels


def test_fitting_separates_objects_the_default_seed_threshold_merges():
    probs, labels = two_discs_with_a_neck()
    default = labels_from_probabilities(probs)
    assert len(np.unique(default)) - 1 == 1  # merged at the neck
    tuning = instance_tuning.tune_thresholds([(probs, labels)])
    assert tuning.thresholds.seed >= NECK
    assert tuning.default_score["ap50"] == 0.5 and tuning.tuned_score["ap50"] == 1.0  # 1 TP + 1 FN -> 2 TP
    assert average_precision([(labels, labels_from_probabilities(probs, tuning.thresholds))]) == 1.0
    assert f"seed {tuning.thresholds.seed:g}" in tuning.summary()


def test_exact_probabilities_keep_the_defaults_and_nothing_to_score_gives_none():
    labels = touching_objects((48, 48), seed=4)
    probs = one_hot(instance_targets.make_target(labels, "three_class"), 3)
    tuning = instance_tuning.tune_thresholds([(probs, labels)])
    assert tuning.thresholds == InstanceThresholds()  # a change must score strictly higher to be taken
    assert tuning.tuned_score == tuning.default_score
    empty = np.zeros((16, 16), np.uint16)
    assert instance_tuning.tune_thresholds([(one_hot(empty, 3), empty)]) is None


def test_min_sizes_tried_follow_the_object_sizes():
    small = np.zeros((32, 32), np.uint16)
    small[2:6, 2:6], small[10:14, 10:14] = 1, 2  # 16 px objects
    large = np.zeros((200, 200), np.uint16)
    large[:100, :100], large[100:, 100:] = 1, 2  # 10000 px objects
    assert max(instance_tuning.min_size_grid([(None, small)], 4)) <= 4
    assert set(instance_tuning.min_size_grid([(None, large)], 4)) == {4, 200, 500, 1000, 2000}


def test_true_labels_of_the_stored_target_recover_the_objects():
    labels = touching_objects((48, 48), seed=5)
    recovered = instance_tuning.true_labels_of_target(instance_targets.make_target(labels, "three_class"))
    assert average_precision([(labels, recovered)]) >= 0.9


def three_class_databases(tmp_path, count, shape, seed, **split):
    """Databases of ``count`` 3-channel images of touching objects and their labels (3-class target)."""
    import build_lmdb

    for sub in ("images", "masks"):
        os.makedirs(tmp_path / sub)
    for i in range(count):
        labels = touching_objects(shape, seed=seed + i)
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", image_3channel(labels))
        tifffile.imwrite(tmp_path / "masks" / f"{i}.tif", labels)
    assert build_lmdb.build_databases(image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
                                      output_folder=str(tmp_path / "db"), dataset_name="ds", workers=1, progress=False,
                                      mask_type="instances", instance_target="three_class", **split) is not None
    return str(tmp_path / "db" / "train-ds.lmdb")


def test_export_fits_the_thresholds_on_the_training_records_and_the_metadata_carries_them(tmp_path):
    from segkit.training.export import fitted_instances

    three_class_databases(tmp_path, 3, (48, 48), 20, train_fraction=0.67)
    config = SimpleNamespace(train_database=(str(tmp_path / "db" / "train-ds.lmdb"),), crop_size=(32, 32),
                             size_factor=1, model="unet", model_config={"depth": 2})

    def model(images, training=False):  # channel c is high where the target is c: near one-hot logits
        return 20.0 * images

    block = fitted_instances(config, model)
    tuning = block["tuning"]
    assert tuning["on"].startswith("2 training record(s)")
    assert tuning["tuned"]["objective"] >= tuning["default"]["objective"] > 0.8
    assert block["thresholds"] == InstanceThresholds.from_dict(block["thresholds"]).to_dict()
    meta = model_metadata.ModelMetadata.from_dict({**metadata(channels=3, number_classes=3, size_factor=1,
                                                              radius=0), "instances": block})
    assert meta.instances["tuning"] == tuning


def test_the_fitting_sample_is_spread_over_the_training_records(tmp_path):
    from segkit import lmdb_format
    from segkit.training.export import _training_predictions

    (tmp_path / "test.txt").write_text("5.tif\n")
    train = three_class_databases(tmp_path, 6, (32, 32), 40, test_list=str(tmp_path / "test.txt"))
    config = SimpleNamespace(train_database=(train,), model="unet", model_config={"depth": 2})
    files = [source["file"] for source in lmdb_format.read_metadata(train)["sources"]]
    targets = {f: instance_targets.make_target(tifffile.imread(tmp_path / "masks" / f), "three_class") for f in files}
    # 5 records of 32x32, 2 records' pixels wanted: every 2nd record (the 1st and the 3rd), not the first two
    got = [target for _, target in _training_predictions(config, lambda images, training=False: images, 2 * 32 * 32)]
    assert len(got) == 2
    assert np.array_equal(got[0], targets[files[0]]) and np.array_equal(got[1], targets[files[2]])


@pytest.mark.parametrize("tuning", ["yes", 3])
def test_metadata_refuses_a_tuning_record_that_is_not_an_object(tuning):
    block = {"target": "three_class", "classes": ["background", "interior", "boundary"],
             "thresholds": InstanceThresholds().to_dict(), "halo_px": 16, "tuning": tuning}
    with pytest.raises(model_metadata.MetadataError, match="instances.tuning"):
        model_metadata.ModelMetadata.from_dict({**metadata(channels=1, number_classes=3, size_factor=1, radius=0),
                                                "instances": block})


def test_distance_target_is_fitted_on_its_expected_depth():
    from test_instances import distance_probabilities
    from test_instances import touching_objects as clumps

    labels = clumps((96, 112), 30, 6)
    probs = distance_probabilities(labels, blur=1.0)
    truth = instance_tuning.true_labels_of_target(instance_targets.make_target(labels, "distance"), "distance")
    assert average_precision([(labels, truth)]) == 1.0
    tuning = instance_tuning.tune_thresholds([(probs, truth)], target="distance")
    assert tuning.tuned_score["ap50"] >= tuning.default_score["ap50"] > 0.9
    assert tuning.thresholds.seed in instance_tuning.SEED_GRIDS["distance"] + (0.5,)


def test_fitting_finds_the_seed_dynamic_that_splits_necked_cores():
    """Two pairs of cores joined by necks: peaks 0.85 over a neck of 0.54, and peaks 0.5 over a neck of 0.3. No
    seed threshold parts both pairs (under 0.3 both merge, between the necks the first merges, over 0.5 the
    second has no seed and is one seedless object); a dynamic below the first pair's rise above its neck (0.31)
    with a seed threshold under 0.5 parts both, and the fit finds it (the 3-class target is not searched over
    it)."""
    from test_instances import cones, depth_probabilities

    depth = np.maximum(cones((40, 80), [(20, 16), (20, 24)], 11), cones((40, 80), [(20, 56), (20, 65)], 11, height=0.5))
    grid = np.indices(depth.shape)[1]
    truth = np.where(depth > 0, np.where(grid < 40, 1 + (grid >= 20), 3 + (grid >= 61)), 0).astype(np.uint16)
    tuning = instance_tuning.tune_thresholds([(depth_probabilities(depth), truth)], target="distance")
    assert 0 < tuning.thresholds.dynamic < 0.31 and tuning.thresholds.seed < 0.5
    assert tuning.tuned_score["ap50"] == 1.0 > tuning.default_score["ap50"]
    assert f"dynamic {tuning.thresholds.dynamic:g}" in tuning.summary()
    assert instance_tuning.DYNAMIC_GRIDS["3class"] == (0.0,)


def test_distance_target_builds_trains_to_six_classes_and_its_metadata_and_package_say_so(tmp_path):
    import build_lmdb
    from segkit import bioimageio_export, lmdb_format
    from segkit.training.autoconfig import DEFAULT_LOSS
    from segkit.training.resolve import training_instances

    for sub in ("images", "masks"):
        os.makedirs(tmp_path / sub)
    for i in range(2):
        labels = touching_objects((48, 48), seed=30 + i)
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", image_3channel(labels)[..., 1])
        tifffile.imwrite(tmp_path / "masks" / f"{i}.tif", labels)
    summary = build_lmdb.build_databases(image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
                                         output_folder=str(tmp_path / "db"), dataset_name="ds", train_fraction=0.5,
                                         workers=1, progress=False, mask_type="instances", instance_target="distance")
    train = str(tmp_path / "db" / "train-ds.lmdb")
    meta = lmdb_format.read_metadata(train)
    assert summary.number_classes == 6 and meta["instance_target"]["target"] == "distance"
    assert DEFAULT_LOSS == "ce+dice"
    block = training_instances(SimpleNamespace(train_database=(train,), crop_size=(32, 32)))
    assert block["target"] == "distance" and len(block["classes"]) == 6
    model_meta = model_metadata.ModelMetadata.from_dict({**metadata(channels=1, number_classes=6, size_factor=1,
                                                                    radius=0), "instances": block})
    assert bioimageio_export.instance_target(model_meta) == "distance"
    assert bioimageio_export.class_names(model_meta)[1:3] == ["boundary", "depth_1_of_4"]
    with pytest.raises(model_metadata.MetadataError, match="needs 6 classes"):
        model_metadata.ModelMetadata.from_dict({**metadata(channels=1, number_classes=3, size_factor=1, radius=0),
                                                "instances": block})
