"""model_metadata.ModelMetadata: typed, frozen, validated on read; the JSON layout of today's files."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from savedmodel_helpers import metadata as helper_metadata

from segkit import model_metadata
from segkit.model_metadata import MetadataError, ModelMetadata


def _training_fields():
    """The arguments train_unet's export passes to make_metadata (numpy scalars as training produces them)."""
    return dict(
        model="unet", model_config={"depth": 2, "base_filters": 8}, channels=1, number_classes=3, image_dtype="uint16",
        normalization={"method": "zscore_per_channel_whole_image", "epsilon": 1e-6}, size_factor=4,
        receptive_field_radius=23, effective_receptive_field_radius=np.int64(16),
        effective_receptive_field={"radius": 13.5, "radius_rounded": 16}, training_tile_size=[32, 32],
        final_metrics={"step": 6, "test_loss": np.float32(0.5)}, mask_map={"255": 1},
        training={"loss": "cross_entropy", "batch_size": 4, "seed": 0})


def _saved_model(tmp_path, meta):
    folder = tmp_path / "saved_model"
    (folder / "assets").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    (folder / "assets" / model_metadata.METADATA_FILENAME).write_text(json.dumps(meta))
    return str(folder)


def test_training_export_round_trips_through_the_file(tmp_path):
    meta = model_metadata.make_metadata(**_training_fields())
    assert isinstance(meta, dict) and meta["format"] == model_metadata.FORMAT
    text = json.dumps(meta, default=lambda o: o.item())  # train_unet dumps numpy scalars the same way
    loaded = model_metadata.load(_saved_model(tmp_path, json.loads(text)))
    assert loaded.to_dict() == json.loads(text)
    assert loaded.effective_receptive_field_radius == 16 and loaded.training_tile_size == (32, 32)
    assert loaded["number_classes"] == loaded.number_classes == 3 and loaded.get("mask_map") == {"255": 1}


def test_old_files_load_and_unknown_keys_are_kept(tmp_path):
    old = helper_metadata(channels=2, number_classes=4, size_factor=8, radius=12)  # no mask_map, no training
    old["written_by"] = "a future version"
    loaded = model_metadata.read_metadata(_saved_model(tmp_path, old))
    assert loaded.mask_map is None and loaded.training is None and loaded.channels == 2
    assert loaded.extra == {"written_by": "a future version"} and loaded["written_by"] == "a future version"
    again = model_metadata.load(str(tmp_path / "saved_model")).to_dict()
    assert {k: v for k, v in again.items() if v is not None} == old
    path = loaded.write(str(tmp_path / "copy"))
    assert json.loads(open(path).read()) == loaded.to_dict()


def test_the_object_is_frozen_and_documents_its_fields():
    meta = ModelMetadata.from_dict(model_metadata.make_metadata(**_training_fields()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.channels = 3
    with pytest.raises(TypeError):
        meta.normalization["epsilon"] = 0.0
    described = ModelMetadata.describe().splitlines()
    assert len(described) == len(dataclasses.fields(ModelMetadata))
    assert all(len(line.split(": ", 1)[1]) > 5 for line in described)


@pytest.mark.parametrize("field,value,message", [
    ("channels", 0, "metadata field channels must be an integer >= 1, got 0"),
    ("channels", "3", "metadata field channels must be an integer >= 1, got '3'"),
    ("number_classes", 2.5, "metadata field number_classes must be an integer >= 1"),
    ("size_factor", True, "metadata field size_factor must be an integer >= 1"),
    ("receptive_field_radius", -1, "metadata field receptive_field_radius must be a finite number >= 0"),
    ("effective_receptive_field_radius", "big", "metadata field effective_receptive_field_radius must be a finite number"),
    ("model", "", "metadata field model must be a non-empty string"),
    ("normalization", "zscore", "metadata field normalization must be a JSON object"),
    ("training_tile_size", [32], "metadata field training_tile_size must be a list of 2 or 3 positive integers"),
    ("mask_map", {"255": -1}, "metadata field mask_map must be an object of VALUE: CLASS pairs"),
    ("format_version", 2, "unsupported metadata format 'segmentation-savedmodel' v2"),
])
def test_every_bad_field_is_named_with_the_file(tmp_path, field, value, message):
    meta = helper_metadata(channels=1, number_classes=2, size_factor=4, radius=3)
    meta[field] = value
    folder = _saved_model(tmp_path, meta)
    with pytest.raises(MetadataError) as info:
        model_metadata.load(folder)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{folder}/assets/segmentation_metadata.json: ")
    assert message in text and text.endswith("re-export the model with train_unet.py of this toolkit")
    with pytest.raises(ValueError, match="metadata field|unsupported"):  # still a ValueError for older callers
        model_metadata.make_metadata(**{k: v for k, v in meta.items() if k not in ("format", "signature")})


def test_inference_reports_bad_metadata_in_one_line_exit_2(tmp_path):
    meta = helper_metadata(channels=1, number_classes=2, size_factor=4, radius=3)
    meta["size_factor"] = 0
    folder = _saved_model(tmp_path, meta)
    (tmp_path / "images").mkdir()
    proc = subprocess.run([sys.executable, f"{ROOT}/inference_unet.py", "--saved_model_filepath", folder,
                           "--image_folder", str(tmp_path / "images"), "--output_folder", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "segmentation_metadata.json: metadata field size_factor must be an integer >= 1" in lines[0]
