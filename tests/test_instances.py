"""Instance core (issue #16): probabilities -> objects, the 3-class target, seam merge of tiled runs, measurements."""
import csv
import importlib.util
import os

import numpy as np
import pytest
from conftest import ROOT
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

from segkit import cliutil, instance_metrics, instance_seams, instance_targets, instances
from segkit.calibration import Calibration
from segkit.instances import InstanceThresholds


def same_partition(a, b):
    """True when ``a`` and ``b`` are the same objects up to renumbering (background 0 in both)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def touching_objects(shape, count, radius, seed=0, separation=None):
    """Convex objects grown by ``radius`` from random centres more than ``separation`` (default radius) apart
    until they touch (some clumps, some alone)."""
    rng = np.random.default_rng(seed)
    separation = radius if separation is None else separation
    centres = np.zeros(shape, np.int32)
    placed = []
    for _ in range(100000):
        if len(placed) == count:
            break
        point = rng.integers(3, np.array(shape) - 3)
        if all(np.abs(point - p).max() > separation for p in placed):
            placed.append(point)
            centres[tuple(point)] = len(placed)
    assert len(placed) == count, "the objects do not fit: fewer or further apart"
    return expand_labels(centres, radius)


def probabilities(labels, blur=0.0):
    """One-hot 3-class probabilities of ``labels`` (a perfect model), optionally smoothed (a softer one)."""
    probs = instances.one_hot(instances.target_from_labels(labels), 3)
    if blur:
        probs = ndi.gaussian_filter(probs, [blur] * labels.ndim + [0])
    return probs


# ---- target and round trip ----------------------------------------------------------------------------------------

def test_target_marks_the_inner_boundary_of_every_object():
    labels = np.zeros((6, 8), np.uint16)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2  # touches object 1
    target = instances.target_from_labels(labels)
    assert target.dtype == np.uint8
    expected = np.zeros_like(target)
    expected[labels > 0] = instances.BOUNDARY
    expected[2:4, 2] = instances.INTERIOR
    expected[2:4, 5] = instances.INTERIOR
    np.testing.assert_array_equal(target, expected)
    # the build stage's definition: an object's own pixels that touch another label or background
    np.testing.assert_array_equal(target == 2, find_boundaries(labels, mode="inner") & (labels > 0))


@pytest.mark.parametrize("shape,count,radius", [((96, 112), 30, 6), ((24, 40, 36), 14, 5)])
def test_round_trip_recovers_every_object(shape, count, radius):
    truth = touching_objects(shape, count, radius)
    assert truth.max() == count
    labels = instances.labels_from_probabilities(probabilities(truth))
    counts = instance_metrics.image_counts(truth, labels, (0.5, 0.8))
    assert (counts[0.5].tp, counts[0.5].fp, counts[0.5].fn) == (count, 0, 0)
    assert counts[0.8].tp == count
    iou, _, _ = instance_metrics.iou_matrix(truth, labels)
    assert iou.max(axis=1).min() > 0.85


def test_interior_components_alone_merge_nothing_but_foreground_components_do():
    truth = touching_objects((96, 112), 30, 6)
    foreground = ndi.label(truth > 0)[0]
    assert foreground.max() < truth.max()  # the test objects do touch
    assert instances.labels_from_probabilities(probabilities(truth)).max() == truth.max()


def test_seedless_foreground_component_is_an_object_and_min_size_drops_specks():
    probs = np.zeros((12, 12, 3), np.float32)
    probs[..., 0] = 1
    probs[2:4, 2:4] = [0, 0, 1]     # 4 boundary pixels, no interior: one object of its own
    probs[8, 8] = [0, 1, 0]         # a 1-pixel seed with nothing around it: a speck
    labels = instances.labels_from_probabilities(probs, InstanceThresholds(min_size=4))
    assert labels.max() == 1 and (labels == 1).sum() == 4 and labels[8, 8] == 0
    assert instances.labels_from_probabilities(probs, InstanceThresholds(min_size=1)).max() == 2


def test_background_enclosed_by_one_object_is_filled_but_not_between_two_or_open_to_the_edge():
    probs = np.zeros((40, 60, 3), np.float32)
    probs[..., 0] = 1
    yy, xx = np.mgrid[:40, :60]
    ring = lambda cy, cx, r: (np.hypot(yy - cy, xx - cx) <= r)  # noqa: E731
    probs[ring(12, 12, 9)] = [0, 1, 0]
    probs[ring(12, 12, 3)] = [1, 0, 0]           # a dim core under the threshold: a hole in one object
    probs[20:40, 30:40] = [0, 1, 0]              # two blocks with a pocket between them
    probs[20:40, 41:52] = [0, 1, 0]
    probs[24:28, 40] = [0, 0, 1]                 # joined at two points around the pocket (rows 28-31 of column 40)
    probs[32:35, 40] = [0, 0, 1]
    probs[5:15, 50:60] = [0, 1, 0]               # a C open to the right edge of the image
    probs[8:12, 54:60] = [1, 0, 0]
    labels = instances.labels_from_probabilities(probs, InstanceThresholds(min_size=4))
    assert labels[12, 12] > 0 and (labels[ring(12, 12, 9)] == labels[12, 12]).all()   # filled
    assert labels[30, 40] == 0                   # between two objects: stays background
    assert (labels[8:12, 54:60] == 0).all()      # open to the edge: stays background
    assert len(np.unique(labels)) == 1 + 4


def test_membrane_target_labels_dense_cells():
    truth = touching_objects((80, 90), 25, 60, separation=10)  # grown until they fill the image
    assert (truth > 0).all()
    membrane = find_boundaries(truth, mode="inner").astype(np.uint8)
    labels = instances.labels_from_probabilities(instances.one_hot(membrane, 2), target="membrane")
    assert (labels > 0).all()
    counts = instance_metrics.image_counts(truth, labels, (0.5,))[0.5]
    assert (counts.tp, counts.fp, counts.fn) == (25, 0, 0)


def test_label_types_uint16_then_uint32_beyond_65535_objects():
    grid = np.zeros((771, 771), bool)
    grid[::3, ::3] = True  # 257 x 257 = 66049 isolated single pixels
    labels = ndi.label(grid)[0]
    assert instances.compact_labels(labels).dtype == np.uint32
    assert instances.compact_labels(labels).max() == 66049
    assert instances.compact_labels(np.where(labels <= 65535, labels, 0)).dtype == np.uint16
    probs = instances.one_hot(grid.astype(np.uint8), 3)
    out = instances.labels_from_probabilities(probs, InstanceThresholds(min_size=1))
    assert out.dtype == np.uint32 and out.max() == 66049


def test_compact_labels_renumbers_sequentially():
    out = instances.compact_labels(np.array([[0, 7, 7], [300000, 0, 7]], np.int64))
    assert out.dtype == np.uint16 and sorted(np.unique(out)) == [0, 1, 2]


# ---- thresholds ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,word", [
    ({"seed": 0.0}, "seed"), ({"seed": 1.0}, "seed"), ({"foreground": 1.5}, "foreground"),
    ({"seed": "0.5"}, "seed"), ({"foreground": True}, "foreground"), ({"min_size": -1}, "min_size"),
    ({"min_size": 2.5}, "min_size"), ({"dynamic": -0.1}, "dynamic"), ({"dynamic": 1.0}, "dynamic"),
    ({"dynamic": True}, "dynamic"), ({"dynamic": float("nan")}, "dynamic")])
def test_bad_thresholds_are_refused_in_one_line(kwargs, word):
    with pytest.raises(cliutil.InputError) as info:
        InstanceThresholds(**kwargs)
    message = str(info.value)
    assert word in message and "\n" not in message and "e.g." in message


def test_thresholds_round_trip_and_unknown_keys():
    thresholds = InstanceThresholds(seed=0.6, foreground=0.4, min_size=10, dynamic=0.2)
    assert InstanceThresholds.from_dict(thresholds.to_dict()) == thresholds
    assert InstanceThresholds.from_dict({"seed": 0.6}).dynamic == 0.0  # metadata written before dynamic existed
    with pytest.raises(instances.ThresholdError, match=r"meta.json: unknown instance threshold.*'sede'"):
        InstanceThresholds.from_dict({"sede": 0.5}, where="meta.json")


def test_wrong_target_or_class_count_refused():
    with pytest.raises(instances.ThresholdError, match="one of"):
        instances.labels_from_probabilities(np.zeros((4, 4, 3)), target="affinities")
    with pytest.raises(instances.ThresholdError, match="3 classes last"):
        instances.labels_from_probabilities(np.zeros((4, 4, 2)))


# ---- tiled runs: seam merge ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [17, 32, (40, 23)])
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_tiled_labels_equal_whole_image_labels(tile, blur):
    probs = probabilities(touching_objects((120, 130), 40, 7, seed=3), blur)
    whole = instances.labels_from_probabilities(probs)
    tiled = instance_seams.labels_tiled(probs, tile, halo=24)
    assert same_partition(whole, tiled)
    assert tiled.max() == whole.max() > 30


@pytest.mark.parametrize("shape, tile, halo", [((120, 130), (40, 23), 24), ((30, 44, 40), (13, 16, 15), 12)])
def test_objects_with_holes_tiled_equal_whole(shape, tile, halo):
    """Holes filled (background enclosed by one object) and pockets between objects, cut by seams in 2-D and 3-D."""
    truth = touching_objects(shape, 40 if len(shape) == 2 else 16, 7 if len(shape) == 2 else 5, seed=3)
    core = (truth > 0) & (ndi.distance_transform_edt(~find_boundaries(truth, mode="thick")) >= 3)  # one object's
    rng = np.random.default_rng(0)
    holes = core & (rng.random(shape) < 0.05)    # the model calls specks inside the objects' cores background
    probs = probabilities(truth)
    probs[holes] = [1, 0, 0]
    whole = instances.labels_from_probabilities(probs)
    assert np.array_equal(whole[holes] > 0, truth[holes] > 0) and holes.sum() > 10   # every one filled
    assert same_partition(whole, instance_seams.labels_tiled(probs, tile, halo=halo))


def test_tiled_labels_equal_whole_volume_labels():
    probs = probabilities(touching_objects((30, 44, 40), 16, 5, seed=1), blur=0.7)
    whole = instances.labels_from_probabilities(probs)
    assert same_partition(whole, instance_seams.labels_tiled(probs, (13, 16, 15), halo=12))


def test_membrane_target_tiled_equals_whole_when_cells_fit_the_halo():
    truth = touching_objects((90, 100), 30, 60, seed=2, separation=10)
    probs = instances.one_hot(find_boundaries(truth, mode="inner").astype(np.uint8), 2)
    whole = instances.labels_from_probabilities(probs, target="membrane")
    assert same_partition(whole, instance_seams.labels_tiled(probs, 32, halo=40, target="membrane"))


def test_without_the_merge_objects_cut_by_seams_are_split():
    """Negative control: the offsets alone leave every object that crosses a seam in pieces."""
    probs = probabilities(touching_objects((120, 130), 40, 7, seed=3))
    shape = probs.shape[:-1]
    merger = instance_seams.SeamMerger(shape)
    ids = np.zeros(shape, np.int64)
    for zone in instance_seams.zones(shape, 32):
        region = instance_seams.grow(zone, 24, shape)
        labels = instances.labels_from_probabilities(probs[region], origin=[s.start for s in region])
        ids[zone] = merger.add(zone, labels[instance_seams.within(instance_seams.grow(zone, 1, shape), region)])
    whole = instances.labels_from_probabilities(probs)
    assert not same_partition(whole, ids)
    assert len(merger.pairs()) > 0
    assert same_partition(whole, instance_seams.relabel(ids, merger.finish()))


def test_touching_objects_facing_each_other_across_a_seam_stay_apart():
    labels = np.zeros((20, 20), np.int32)
    labels[2:18, 2:10] = 1
    labels[2:18, 10:18] = 2  # their contact line is exactly the seam at x = 10
    probs = probabilities(labels)
    tiled = instance_seams.labels_tiled(probs, (20, 10), halo=10)
    assert tiled.max() == 2
    assert same_partition(instances.labels_from_probabilities(probs), tiled)
    assert instance_metrics.image_counts(labels, tiled, (0.9,))[0.9].tp == 2


def test_halo_below_one_pixel_refused():
    with pytest.raises(ValueError, match="at least 1 pixel"):
        instance_seams.labels_tiled(np.zeros((8, 8, 3)), 4, halo=0)


# ---- measurements -------------------------------------------------------------------------------------------------

def test_measure_objects_in_pixels_and_micrometres(tmp_path):
    labels = np.zeros((6, 8), np.uint16)
    labels[1:3, 2:5] = 4      # 2 x 3 pixels, centroid (1.5, 3)
    labels[5, 7] = 9
    image = np.zeros((6, 8, 2), np.float32)
    image[1:3, 2:5] = [10, 1]
    image[1, 2] = [16, 1]
    rows = instances.measure_objects(labels, image, spacing_um=(0.5, 0.25), name="a.tif")
    assert [r["id"] for r in rows] == [4, 9]
    first = rows[0]
    assert first["image"] == "a.tif" and first["area_px"] == 6 and first["area_um2"] == pytest.approx(0.75)
    assert (first["centroid_y_px"], first["centroid_x_px"]) == (1.5, 3.0)
    assert (first["centroid_y_um"], first["centroid_x_um"]) == (0.75, 0.75)
    assert (first["bbox_y_min"], first["bbox_x_min"], first["bbox_y_max"], first["bbox_x_max"]) == (1, 2, 3, 5)
    assert first["mean_intensity_c0"] == pytest.approx(11.0) and first["mean_intensity_c1"] == 1.0
    assert list(first) == instances.object_columns(2, 2)
    unknown = instances.measure_objects(labels, image[..., 0])
    assert unknown[0]["area_um2"] is None and unknown[0]["centroid_x_um"] is None
    assert unknown[0]["mean_intensity_c0"] == pytest.approx(11.0)
    path = str(tmp_path / "objects.csv")
    instances.write_objects_csv(path, unknown, instances.object_columns(2, 1))
    with open(path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert read[1]["id"] == "9" and read[1]["area_um2"] == "" and os.listdir(tmp_path) == ["objects.csv"]


def test_measure_volume_with_spacing():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:6] = 1  # 2 x 3 x 4 voxels
    rows = instances.measure_objects(labels, spacing_um=(2.0, 0.5, 0.5))
    assert rows[0]["volume_px"] == 24 and rows[0]["volume_um3"] == pytest.approx(12.0)
    assert rows[0]["centroid_z_um"] == pytest.approx(3.0) and rows[0]["bbox_x_max"] == 6
    assert "mean_intensity_c0" not in rows[0]


def test_spacing_from_calibration():
    assert instances.spacing_from_calibration(Calibration((650.0, 500.0), "nanometer"), 2) == \
        pytest.approx((0.65, 0.5))
    assert instances.spacing_from_calibration(None, 2) is None
    assert instances.spacing_from_calibration(Calibration((1.0, 1.0), "micrometer"), 3) is None


# ---- the benchmark script -----------------------------------------------------------------------------------------

def test_bench_instances_reports_the_ceiling_on_training_images_only(tmp_path, capsys):
    import tifffile

    spec = importlib.util.spec_from_file_location("bench_instances",
                                                  os.path.join(ROOT, "benchmarks", "bench_instances.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "masks").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "masks" / f"m{i}.tif", touching_objects((64, 64), 8, 6, seed=i).astype(np.uint16))
    (tmp_path / "test_files.txt").write_text("m2.tif\n")
    assert [os.path.basename(m) for m in bench.training_masks(str(tmp_path))] == ["m0.tif", "m1.tif"]
    assert bench.main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 images, 16 objects" in out and "(defaults)     AP@0.5 = 1.000" in out


# ---- the distance target (depth levels) -------------------------------------------------------------------------

def distance_probabilities(labels, blur=0.0):
    """One-hot probabilities of ``labels``' distance target (a perfect model), optionally smoothed."""
    classes = instance_targets.CLASSES["distance"]
    probs = instances.one_hot(instances.target_from_labels(labels, "distance"), classes)
    if blur:
        probs = ndi.gaussian_filter(probs, [blur] * labels.ndim + [0])
    return probs


def test_distance_target_levels_deepen_towards_each_core_and_keep_the_3class_objects():
    truth = touching_objects((96, 112), 30, 6)
    target = instances.target_from_labels(truth, "distance")
    levels = instance_targets.DISTANCE_LEVELS
    assert target.dtype == np.uint8 and target.max() == 1 + levels
    np.testing.assert_array_equal(instance_targets.three_class_of(target, "distance"),
                                  instances.target_from_labels(truth))
    for obj in range(1, int(truth.max()) + 1):  # every object reaches the deepest level at its most inner pixel
        inside = target[(truth == obj) & (target >= 2)]
        assert inside.size == 0 or inside.max() == 1 + levels
    depth = ndi.distance_transform_edt(target >= 2)
    assert depth[target == 2].mean() < depth[target == 1 + levels].mean()  # shallow levels lie outside deep ones
    big = np.zeros((2**17 + 20, 3), np.uint32)  # large ids, one object: indexed by the ids present only
    big[2:2**17 + 18, :] = 4_000_000_000
    assert instances.target_from_labels(big, "distance").max() == 1 + levels


@pytest.mark.parametrize("shape,count,radius", [((96, 112), 30, 6), ((24, 40, 36), 14, 5)])
def test_distance_round_trip_recovers_every_object(shape, count, radius):
    truth = touching_objects(shape, count, radius)
    labels = instances.labels_from_probabilities(distance_probabilities(truth), target="distance")
    counts = instance_metrics.image_counts(truth, labels, (0.5, 0.8))
    assert (counts[0.5].tp, counts[0.5].fp, counts[0.5].fn) == (count, 0, 0)
    assert counts[0.8].tp == count


def test_distance_seeds_split_objects_whose_boundary_the_model_misses():
    """Two touching discs, the boundary between them predicted as their shallowest interior level: the 3-class
    reading (any interior seeds) merges them; the expected depth keeps their cores apart."""
    grid = np.indices((40, 64))
    truth = np.zeros((40, 64), np.uint16)
    for obj, cx in ((1, 20), (2, 43)):
        truth[(grid[0] - 20) ** 2 + (grid[1] - cx) ** 2 <= 12 ** 2] = obj
    target = instances.target_from_labels(truth, "distance")
    target[(target == 1) & (np.abs(grid[1] - 31.5) < 2)] = 2  # the contact taken for interior
    probs = instances.one_hot(target, instance_targets.CLASSES["distance"])
    assert instances.labels_from_probabilities(probs, target="distance").max() == 2
    three = instances.one_hot(instance_targets.three_class_of(target, "distance"), 3)
    assert instances.labels_from_probabilities(three).max() == 1


def depth_probabilities(depth):
    """Distance-target probabilities whose expected depth is ``depth`` (values in [0, 0.875]): background where
    it is 0, else the mass split between the two channels (boundary, then the depth levels) whose depths
    (0, then the levels' bin centres) bracket it."""
    levels = instance_targets.DISTANCE_LEVELS
    centres = np.concatenate([[0.0], (np.arange(levels) + 0.5) / levels])  # channels 1 .. 1 + levels
    probs = np.zeros(depth.shape + (2 + levels,), np.float32)
    probs[..., 0] = depth <= 0
    low = np.clip(np.searchsorted(centres, depth, side="right") - 1, 0, levels - 1)
    upper = np.clip((depth - centres[low]) / (centres[low + 1] - centres[low]), 0, 1)
    inside = depth > 0
    np.put_along_axis(probs, (1 + low)[..., None], np.where(inside, 1 - upper, 0)[..., None], axis=-1)
    np.put_along_axis(probs, (2 + low)[..., None], np.where(inside, upper, 0)[..., None], axis=-1)
    return probs


def cones(shape, centres, radius, height=0.85):
    """max over the centres of height * (1 - distance / radius), 0 outside: overlapping cores with a neck."""
    grid = np.indices(shape).astype(np.float64)
    depth = np.zeros(shape)
    for centre in centres:
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        depth = np.maximum(depth, height * (1 - distance / radius))
    return depth


def test_dynamic_splits_cores_joined_by_a_neck_above_the_seed_threshold():
    """Two cores whose depth runs together through a neck above the seed threshold (a model unsure where small
    touching objects part): one seed region, so one object with dynamic 0; one seed per peak with a dynamic below
    the peaks' rise above the neck. A single core is never split, and an expected depth close to
    depth_probabilities' target checks the helper."""
    depth = cones((40, 64), [(20, 22), (20, 40)], 12)  # neck at x = 31: 0.85 * (1 - 9 / 12) = 0.21, 0.64 below the peaks
    probs = depth_probabilities(depth)
    assert np.abs(instances.expected_depth(probs) - depth).max() < 1e-5
    merged = instances.labels_from_probabilities(probs, InstanceThresholds(seed=0.1), "distance")
    split = instances.labels_from_probabilities(probs, InstanceThresholds(seed=0.1, dynamic=0.15), "distance")
    kept = instances.labels_from_probabilities(probs, InstanceThresholds(seed=0.1, dynamic=0.7), "distance")
    assert (merged.max(), split.max(), kept.max()) == (1, 2, 1)
    assert split[20, 22] != split[20, 40] and np.array_equal(split > 0, merged > 0)
    single = depth_probabilities(cones((40, 40), [(20, 20)], 12))
    assert instances.labels_from_probabilities(single, InstanceThresholds(seed=0.1, dynamic=0.05), "distance").max() == 1
    low = depth_probabilities(cones((40, 40), [(20, 20)], 12, height=0.2))  # its peak rises less than the dynamic
    assert instances.labels_from_probabilities(low, InstanceThresholds(seed=0.1, dynamic=0.3), "distance").max() == 1


def test_saddle_split_equals_the_plain_per_component_reconstruction():
    """_split_at_saddles' shortcuts (components with one local maximum skipped, each reconstruction in its
    component's box) give the seeds of the plain rule: every component alone in the whole image, reconstructed,
    split when it holds two or more h-maxima."""
    from skimage.morphology import local_maxima, reconstruction

    faces = ndi.generate_binary_structure(2, 1)
    outcomes = set()
    for seed in range(3):
        probs = distance_probabilities(touching_objects((90, 100), 30, 7, seed=seed), blur=2.0)
        probs += np.random.default_rng(seed).uniform(0, 0.05, probs.shape).astype(np.float32)
        probs /= probs.sum(-1, keepdims=True)
        depth = instances.expected_depth(probs)
        seeds = instances._seeds(depth > 0.3, 4)
        for dynamic in (0.02, 0.1, 0.3):
            plain = seeds.astype(np.int64)
            for index in range(1, int(seeds.max()) + 1):
                land = np.where(seeds == index, depth, 0.0).astype(np.float64)
                rec = reconstruction(land - dynamic, land, method="dilation", footprint=faces)
                peaks, count = ndi.label(local_maxima(rec, footprint=faces) & (seeds == index), structure=faces)
                if count > 1:
                    plain[seeds == index] = 0
                    plain[peaks > 0] = peaks[peaks > 0] + plain.max()
            split = instances._split_at_saddles(seeds, depth, dynamic)
            assert same_partition(split, plain)
            outcomes.add(len(np.unique(split)) > len(np.unique(seeds)))
    assert outcomes == {True, False}  # both paths taken: some components split, some cases none


@pytest.mark.parametrize("dynamic", [0.0, 0.1])
def test_distance_target_tiled_equals_whole(dynamic):
    probs = distance_probabilities(touching_objects((120, 130), 40, 7, seed=3), blur=1.0)
    thresholds = InstanceThresholds(dynamic=dynamic)
    whole = instances.labels_from_probabilities(probs, thresholds, target="distance")
    tiled = instance_seams.labels_tiled(probs, (40, 23), halo=24, thresholds=thresholds, target="distance")
    assert same_partition(whole, tiled) and whole.max() > 30


def test_dynamic_seeds_tiled_equal_whole_for_necked_cores_in_2d_and_3d():
    """Chains of overlapping cones (cores joined by necks, what dynamic splits) cut by seams in every direction."""
    rng = np.random.default_rng(5)
    for shape, count, radius, tile, halo in (((96, 120), 14, 9, (31, 26), 40), ((28, 40, 44), 6, 7, (11, 17, 14), 30)):
        centres = []
        for _ in range(count):  # pairs of overlapping cores
            first = rng.integers(radius, np.array(shape) - radius)
            centres += [first, np.clip(first + rng.integers(-radius + 2, radius - 2, len(shape)), 0, np.array(shape) - 1)]
        probs = depth_probabilities(cones(shape, centres, radius))
        thresholds = InstanceThresholds(seed=0.2, dynamic=0.1, min_size=2)
        whole = instances.labels_from_probabilities(probs, thresholds, "distance")
        tiled = instance_seams.labels_tiled(probs, tile, halo=halo, thresholds=thresholds, target="distance")
        assert same_partition(whole, tiled) and whole.max() > count // 2


def test_seam_records_of_one_zone_mergers_merge_as_one_merger_does():
    probs = probabilities(touching_objects((60, 70), 12, 6, seed=4))
    shape, halo = probs.shape[:2], 16
    whole, pieces = instance_seams.SeamMerger(shape), instance_seams.SeamMerger(shape)
    written_whole, written_pieces = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for zone in instance_seams.zones(shape, (30, 35)):
        region = instance_seams.grow(zone, halo, shape)
        labels = instances.labels_from_probabilities(probs[region], origin=[s.start for s in region])
        ring = labels[instance_seams.within(instance_seams.grow(zone, 1, shape), region)]
        written_whole[zone] = whole.add(zone, ring)
        single = instance_seams.SeamMerger(shape)
        local = single.add(zone, ring)
        offset = pieces.add_record(single.record())
        written_pieces[zone] = np.where(local > 0, local + offset, 0)
    np.testing.assert_array_equal(instance_seams.relabel(written_whole, whole.finish()),
                                  instance_seams.relabel(written_pieces, pieces.finish()))
    with pytest.raises(ValueError, match="one zone"):
        whole.record()
