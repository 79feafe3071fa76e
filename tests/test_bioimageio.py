"""bioimage.io export (issue #20): the package validates with bioimageio.spec, bioimageio.core's own test passes
for a 2-D and a 3-D UNet, and bioimageio.core's probabilities equal ours (segkit.api, exact tiling)."""
import dataclasses
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

pytest.importorskip("bioimageio.core")

from test_train import dbs  # noqa: E402,F401  (the module fixture of tiny training databases)

import models  # noqa: E402
from segkit import bioimageio_export as bx  # noqa: E402
from segkit import cliutil, image_io, model_metadata  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANISOTROPIC = [0.04, 0.004, 0.004]


def make_meta(model="unet", *, classes=2, channels=1, **extra):
    cfg = models.model_config(model, depth=2, base_filters=4, **({"voxel_size": ANISOTROPIC} if model == "unet3d" else {}))
    volume = models.spatial_rank(model) == 3
    fields = dict(
        model=model, model_config=cfg, channels=channels, number_classes=classes, image_dtype="uint16",
        normalization={"method": image_io.NORMALIZATION_METHOD, "epsilon": image_io.NORMALIZATION_EPSILON},
        size_factor=list(models.size_factors(model, **cfg)) if volume else models.size_factor(model, **cfg),
        receptive_field_radius=(list(models.receptive_field_radii(model, **cfg)) if volume
                                else models.receptive_field_radius(model, **cfg)),
        training_tile_size=[16, 32, 32] if volume else [32, 32], final_metrics={"test_loss": 0.25, "iou_1": 0.8},
        mask_map={}, training={"loss": "ce", "learning_rate": 1e-3, "batch_size": 2, "seed": 0})
    if volume:
        fields.update(spatial_rank=3, voxel_size_um=ANISOTROPIC)
    return model_metadata.make_metadata(**fields, **extra)


def export_real_model(root, model="unet", classes=2, channels=1, **extra):
    """A random-weight network of the registry, exported by train_unet's own code (serving module + metadata)."""
    from segkit.training import export

    meta = make_meta(model, classes=classes, channels=channels, **extra)
    net = models.build_model(model, channels, classes, **meta["model_config"])
    final = os.path.join(root, "saved_model")
    export._save(net, channels, meta, final, models.spatial_rank(model))
    return final


def core_predict(zip_path, image, *, pad_by_halo=False, **blocking):
    """bioimageio.core's prediction of one image (spatial axes, channels last) -> probabilities, same layout.

    Default: the whole image as it is (what its test_model does); ``pad_by_halo``: its ``predict()``, which
    pads the image by the halo (the description's reflect padding) before normalizing, and crops after.
    """
    from bioimageio.core import create_prediction_pipeline, load_description, predict
    from bioimageio.core.digest_spec import create_sample_for_model

    inputs = {"images": image[None].astype(np.float32)}
    if pad_by_halo:
        sample = predict(model=zip_path, inputs=inputs, **blocking)
    else:
        descr = load_description(zip_path)
        sample = create_prediction_pipeline(descr).predict_sample_without_blocking(
            create_sample_for_model(descr, inputs=inputs), skip_input_padding=True, skip_output_cropping=True)
    return np.asarray(sample.members["probabilities"].data)[0]


def core_test(zip_path):
    from bioimageio.core import test_model

    summary = test_model(zip_path)
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    return summary.status, failed


# --- without TensorFlow ---------------------------------------------------------------


@pytest.mark.parametrize("model,factor,halo,minimum", [
    ("unet", (4, 4), (24, 24), (52, 52)),  # radius 23 -> 24, minimum 2 x 24 + 4
])
def test_halo_is_the_radius_rounded_up_to_the_size_factor_and_the_minimum_exceeds_twice_the_halo(
        model, factor, halo, minimum):
    meta = model_metadata.ModelMetadata.from_dict(make_meta(model))
    geometry = bx.Geometry.of(meta)
    assert geometry.axis_ids == ("y", "x") and geometry.size_factor == factor
    assert geometry.halo == halo and geometry.minimum == minimum
    assert all(h >= meta.receptive_field_radius for h in geometry.halo)


def test_volume_geometry_is_per_axis():
    meta = model_metadata.ModelMetadata.from_dict(make_meta("unet3d"))
    geometry = bx.Geometry.of(meta)
    assert geometry.axis_ids == ("z", "y", "x")
    for h, f, r, m in zip(geometry.halo, geometry.size_factor, meta.receptive_field_radius, geometry.minimum):
        assert h % f == 0 and r <= h < r + f and m == 2 * h + f


def test_voxel_sizes_whose_halo_ratio_is_inexact_in_micrometres_are_given_in_nanometres():
    # 24 x 0.05 / 0.05 = 24.000000000000004: the spec refused the package of a 10 x 10 x 50 nm model in um
    meta = model_metadata.ModelMetadata.from_dict(make_meta("unet3d"))
    geometry = bx.Geometry(("z", "y", "x"), (4, 16, 16), (24, 48, 48))
    meta = dataclasses.replace(meta, voxel_size_um=(0.05, 0.01, 0.01))
    assert 24 * 0.05 / 0.05 != 24
    assert bx._space_units(meta, geometry) == [{"unit": "nanometer", "scale": s} for s in (50.0, 10.0, 10.0)]
    odd = dataclasses.replace(meta, voxel_size_um=(0.0033, 0.01, 0.01))  # 24 x 3.3 / 3.3 != 24: scales left out
    assert bx._space_units(odd, geometry) == [{}] * 3
    assert bx._space_units(model_metadata.ModelMetadata.from_dict(make_meta()), bx.Geometry(("y", "x"), (4, 4),
                                                                                           (8, 8))) == [{}, {}]


@pytest.mark.parametrize("shape", [(10, 70), (52, 52), (53, 61), (200, 57)])
def test_test_image_is_padded_or_cropped_to_a_valid_size(shape):
    geometry = bx.Geometry(("y", "x"), (4, 4), (24, 24))
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(*shape, 1)
    out = bx._valid_size(image, geometry)
    for size, before in zip(out.shape[:-1], shape):
        assert size >= 52 and (size - 52) % 4 == 0 and (size <= before or before < 52)


def test_semantic_and_instance_models_name_their_classes_and_post_processing():
    semantic = model_metadata.ModelMetadata.from_dict(make_meta(classes=3))
    assert bx.class_names(semantic) == ["background", "class_1", "class_2"]
    assert bx.instance_target(semantic) is None
    named = model_metadata.ModelMetadata.from_dict(make_meta(classes=3, class_names=["bg", "nucleus", "cytoplasm"]))
    assert bx.class_names(named) == ["bg", "nucleus", "cytoplasm"]
    instances = model_metadata.ModelMetadata.from_dict(make_meta(
        classes=3, mask_type="instances", instances={
            "target": "three_class", "classes": ["background", "interior", "boundary"], "halo_px": 32,
            "thresholds": {"seed": 0.6, "foreground": 0.4, "min_size": 9}}))
    assert bx.class_names(instances) == ["background", "interior", "boundary"]
    doc = bx.documentation(instances, bx.Geometry.of(instances))
    assert "## Post-processing (instance segmentation)" in doc and "p_interior > 0.6" in doc and "9 pixels" in doc
    assert "watershed" in doc and "## Validation" in doc and "| iou_1 | 0.8 |" in doc
    membrane = model_metadata.ModelMetadata.from_dict(make_meta(classes=2, instance_target={"target": "boundary"}))
    assert bx.class_names(membrane) == ["inside", "membrane"] and "p_membrane" in bx.documentation(
        membrane, bx.Geometry.of(membrane))


def test_cover_is_an_overlay_beside_the_image_two_to_one():
    image = np.zeros((40, 40, 1), np.float32)
    image[10:20, 10:20] = 1
    probs = np.zeros((40, 40, 2), np.float32)
    probs[..., 0] = 1
    probs[10:20, 10:20] = [0, 1]
    cover = bx.cover_image(image, probs)
    assert cover.dtype == np.uint8 and cover.shape[1] == 2 * cover.shape[0] and cover.shape[0] >= 256
    zoom = cover.shape[0] // 40
    left, right = cover[15 * zoom, 15 * zoom], cover[15 * zoom, (40 + 15) * zoom]
    assert left.tolist() == [255, 255, 255] and right.tolist() != left.tolist()  # class 1 tinted on the right


@pytest.mark.parametrize("field,value,match", [
    ("license", "NOT-A-LICENSE", "license"),
    ("name", "a/b", "name"),
])
def test_bad_description_fields_are_one_line_input_errors(tmp_path, field, value, match):
    meta = model_metadata.ModelMetadata.from_dict(make_meta())
    files = {k: str(tmp_path / n) for k, n in (("weights", "w.zip"), ("test_input", "i.npy"), ("test_output", "o.npy"),
                                               ("cover", "c.png"), ("documentation", "README.md"))}
    for path in files.values():
        open(path, "wb").close()
    with pytest.raises(cliutil.InputError, match=match) as info:
        bx.build_description(meta, bx.Geometry.of(meta), files, authors=["A"], **{field: value})
    assert "\n" not in str(info.value)


def test_cli_refuses_a_folder_that_is_not_a_savedmodel_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_bioimageio.py"),
                             "--saved_model_filepath", str(tmp_path), "--output_folder", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a SavedModel folder" in result.stderr


# --- with TensorFlow and bioimageio.core ----------------------------------------------


@pytest.fixture(scope="module")
def package_2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("bio2d")
    saved = export_real_model(root, "unet", classes=3)
    folder, zip_path = bx.export_bioimageio(saved, str(root / "out"), authors=["Test Author"])
    return saved, folder, zip_path


@pytest.fixture(scope="module")
def package_3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("bio3d")
    saved = export_real_model(root, "unet3d", classes=2)
    folder, zip_path = bx.export_bioimageio(saved, str(root / "out"))
    return saved, folder, zip_path


@pytest.mark.slow
def test_2d_package_validates_and_passes_bioimageio_cores_own_test(package_2d, tmp_path, monkeypatch):
    from bioimageio.spec import load_description

    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips the TensorFlow weights into the working folder
    _, folder, zip_path = package_2d
    assert sorted(os.listdir(folder)) == ["README.md", "cover.png", "rdf.yaml", "test_input.npy", "test_output.npy",
                                          "tf_saved_model.zip"]
    with zipfile.ZipFile(os.path.join(folder, "tf_saved_model.zip")) as zf:
        assert "saved_model.pb" in zf.namelist() and "assets/segmentation_metadata.json" in zf.namelist()
    descr = load_description(zip_path, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.format()
    (out,), (inp,) = descr.outputs, descr.inputs
    assert [str(a.id) for a in inp.axes] == ["batch", "y", "x", "channel"]
    assert [a.size.min for a in inp.axes[1:3]] == [52, 52] and [a.size.step for a in inp.axes[1:3]] == [4, 4]
    assert [a.halo for a in out.axes[1:3]] == [24, 24] and out.axes[3].channel_names == ["background", "class_1",
                                                                                         "class_2"]
    zmuv = [p for p in inp.preprocessing if p.id == "zero_mean_unit_variance"]
    assert [([str(a) for a in p.kwargs.axes], p.kwargs.eps) for p in zmuv] == [(["y", "x"], 1e-6)]  # per image, channel
    assert descr.weights.tensorflow_saved_model_bundle.tensorflow_version.major == 2
    assert core_test(zip_path) == ("passed", [])


@pytest.mark.slow
def test_2d_probabilities_of_bioimageio_core_equal_ours_on_a_whole_image(package_2d, tmp_path, monkeypatch):
    from segkit.api import Segmenter

    monkeypatch.chdir(tmp_path)
    saved, _, zip_path = package_2d
    rng = np.random.default_rng(3)
    image = (1000 + 400 * bx.synthetic_image((76, 92), 1, seed=5) + rng.normal(0, 30, (76, 92, 1))).astype(np.uint16)
    _, ours = Segmenter(saved, tile_size=32).segment(image[..., 0], probabilities=True)  # tiled, exact halo
    theirs = core_predict(zip_path, image)
    assert theirs.shape == ours.shape == (76, 92, 3)
    np.testing.assert_allclose(theirs, ours, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("blocking,stats", [({}, "padded"), ({"blocksize_parameter": 0}, "whole")])
def test_2d_bioimageio_core_predict_padding_by_the_halo_equals_our_mirror_border(package_2d, tmp_path, monkeypatch,
                                                                                 blocking, stats):
    """core's predict() pads by the halo with the declared reflect padding (= our --border mirror). Without blocks
    it takes the statistics over the padded image, with blocks over the image: the same probabilities as ours
    with those statistics. (Padded statistics move the probabilities slightly, up to ~0.02 on this random-weight
    network; the classes barely.)"""
    from segkit import tiling
    from segkit.inference.predictor import SavedModelPredictor

    monkeypatch.chdir(tmp_path)
    saved, _, zip_path = package_2d
    image = (1000 + 400 * bx.synthetic_image((140, 160), 1, seed=5)).astype(np.float32)  # > core's block
    theirs = core_predict(zip_path, image, pad_by_halo=True, **blocking)
    predictor, (halo,) = SavedModelPredictor(saved), {24}
    padded_stats = image_io.image_stats(image_io.mirror_pad(image, [(halo, halo)] * 2))
    ours = {}
    for name, (mean, std) in (("padded", padded_stats), ("whole", image_io.image_stats(image))):
        ours[name] = tiling.predict_tiled(image, predictor, 32, halo, 4, border="mirror",
                                          preprocess=lambda t: image_io.normalize(t, mean, std))
    np.testing.assert_allclose(theirs, ours[stats], atol=2e-5)
    # the statistics move the classes only where this random-weight network is near 0.5 (98-99 % agree; seed-dependent)
    assert (ours["padded"].argmax(-1) == ours["whole"].argmax(-1)).mean() > 0.95


@pytest.mark.slow
def test_3d_package_carries_the_voxel_size_and_passes_bioimageio_cores_own_test(package_3d, tmp_path, monkeypatch):
    from bioimageio.spec import load_description

    from segkit.inference.predictor import SavedModelPredictor

    monkeypatch.chdir(tmp_path)
    saved, _, zip_path = package_3d
    descr = load_description(zip_path, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.format()
    space = descr.inputs[0].axes[1:4]
    assert [str(a.id) for a in space] == ["z", "y", "x"] and [a.unit for a in space] == ["nanometer"] * 3
    assert [a.scale for a in space] == [1000 * v for v in ANISOTROPIC]
    assert core_test(zip_path) == ("passed", [])
    meta = model_metadata.load(saved)
    geometry = bx.Geometry.of(meta)
    shape = tuple(m + f for m, f in zip(geometry.minimum, geometry.size_factor))
    image = bx.synthetic_image(shape, 1, seed=9) * 3
    ours = bx.reference_probabilities(image, SavedModelPredictor(saved), meta, geometry)
    np.testing.assert_allclose(core_predict(zip_path, image), ours, atol=2e-5)
    # padding by the halo (= our --border mirror) changes the voxels near the border only: most classes agree
    # (88-95 % on this small random-weight volume, depending on the weights)
    assert (core_predict(zip_path, image, pad_by_halo=True).argmax(-1) == ours.argmax(-1)).mean() > 0.8


@pytest.mark.slow
def test_export_script_writes_the_package_with_the_given_authors_licence_and_citation(package_2d, tmp_path):
    saved, _, _ = package_2d
    image = (bx.synthetic_image((60, 70), 1) * 10).astype(np.uint16)[..., 0]
    import tifffile

    tifffile.imwrite(tmp_path / "cells.tif", image)
    out = tmp_path / "pkg"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_bioimageio.py"),
                             "--saved_model_filepath", saved, "--output_folder", str(out),
                             "--authors", "Ada Lovelace; Alan Turing", "--license", "MIT",
                             "--cite", "Our paper|10.1234/abcd", "--test_image", str(tmp_path / "cells.tif"),
                             "--name", "Cell boundaries (UNet)"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out / "bioimageio_model.zip") in result.stdout
    from bioimageio.spec import load_description

    descr = load_description(str(out / "bioimageio_model.zip"), perform_io_checks=False)
    assert [a.name for a in descr.authors] == ["Ada Lovelace", "Alan Turing"] and str(descr.license) == "MIT"
    assert [(c.text, str(c.doi)) for c in descr.cite] == [("Our paper", "10.1234/abcd")]
    assert descr.name == "Cell boundaries (UNet)"
    test_input = np.load(out / "bioimageio_model" / "test_input.npy")
    assert test_input.shape == (1, 60, 68, 1)  # the given image cropped to a valid size (52 + n * 4)
    np.testing.assert_array_equal(test_input[0, :, :, 0], image[:, 1:69])


# --- train_unet.py's hook ----------------------------------------------------------------


def test_a_failed_package_export_warns_in_one_line_and_keeps_the_savedmodel(tmp_path, caplog):
    from segkit.training.export import export_bioimageio_package

    saved = tmp_path / "saved_model"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")  # no metadata: the package cannot be built
    with caplog.at_level("WARNING"):
        assert export_bioimageio_package(str(saved), str(tmp_path)) is None
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "bioimage.io package not written" in record.getMessage() and "\n" not in record.getMessage()
    assert "scripts/export_bioimageio.py" in record.getMessage()
    assert sorted(os.listdir(saved)) == ["saved_model.pb"] and not (tmp_path / "bioimageio_model").exists()


def test_the_training_package_is_tested_on_the_first_test_image(dbs):
    from segkit import lmdb_format
    from segkit.training.export import first_test_image

    image = first_test_image(dbs["gray"][1])
    env = lmdb_format.open_readonly(dbs["gray"][1])
    with env.begin() as txn:
        expected = lmdb_format.decode_record(txn.get(lmdb_format.record_key(0))).image_hwc
    env.close()
    assert image is not None and np.array_equal(image, expected)
    assert first_test_image(None) is None and first_test_image("/nonexistent/db.lmdb") is None


def test_train_flag_bioimageio_takes_the_original_0_1_form():
    import train_unet

    base = ["--train_database", "a", "--test_database", "b", "--output_dir", "c"]
    assert train_unet.build_parser().parse_args(base).bioimageio is True
    assert train_unet.build_parser().parse_args(base + ["--bioimageio", "0"]).bioimageio is False


@pytest.mark.slow
def test_training_writes_the_package_beside_the_savedmodel(dbs, tmp_path, monkeypatch):
    from test_train import argv

    import train_unet

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 0
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "bioimageio_model" / "rdf.yaml").is_file() and (out / "bioimageio_model.zip").is_file()
    assert core_test(str(out / "bioimageio_model.zip")) == ("passed", [])
