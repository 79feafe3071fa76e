"""segkit.training.config.RunConfig: config.json round trip (also files of the previous code), per-field
validation with one-line errors naming file and field, the run-defining fields. No TensorFlow, no databases."""
import dataclasses
import json
import os
import sys

import pytest

from segkit import cliutil
from segkit.training import checkpoints
from segkit.training.config import RunConfig, describe

# config.json as written by train_unet.py before RunConfig existed (a real tiny run; key order kept).
WRITTEN_BEFORE = json.loads("""{"model": "unet", "model_config": {"depth": 2, "base_filters": 4, "batch_norm": true,
 "dropout": 0.0}, "size_factor": 4, "channels": 1, "number_classes": 3, "image_dtype": "uint16",
 "train_database": ["/data/train-gray.lmdb"], "test_database": "/data/test-gray.lmdb", "output_dir": "/runs/out",
 "batch_size": 2, "learning_rate": 0.0001, "lr_schedule": "cosine", "ema_decay": 0.999, "test_every_n_steps": 1000,
 "warmup_steps": 1000, "balance_classes": false, "use_augmentation": true, "early_stopping": 10, "reader_count": 1,
 "seed": 0, "max_steps": 50, "mixed_precision": false, "loss": "ce", "class_weights": "auto",
 "class_weight_values": [0.4115187509064001, 2.5407921635893866, 5.66896535124141], "crop_size": [32, 32],
 "train_data": [{"num_records": 115, "channels": 1, "tile_size": 64,
                 "class_pixel_counts": {"0": 381546, "1": 61797, "2": 27697}}],
 "test_data": {"num_records": 106, "channels": 1, "tile_size": 64,
               "class_pixel_counts": {"0": 348097, "1": 60548, "2": 25531}},
 "mask_map": {}, "replicas": 1, "workers": 1, "global_batch_size": 2, "mixed_precision_active": false}""")
# The run-defining keys of the previous code (its RUN_DEFINING_FIELDS; max_steps too under a cosine schedule).
PREVIOUS_RUN_DEFINING = {"model", "model_config", "channels", "number_classes", "loss", "class_weight_values",
                         "learning_rate", "lr_schedule", "ema_decay", "batch_size", "crop_size", "test_every_n_steps",
                         "balance_classes", "use_augmentation", "mixed_precision", "seed", "train_data", "test_data"}


def write(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def test_a_config_json_of_the_previous_code_loads_and_is_written_back_identically(tmp_path):
    config = RunConfig.load(write(tmp_path, WRITTEN_BEFORE))
    assert config.crop_size == (32, 32) and config.train_database == ("/data/train-gray.lmdb",)
    assert json.loads(config.to_json()) == WRITTEN_BEFORE and list(config.to_dict()) == list(WRITTEN_BEFORE)
    assert config.to_json() == json.dumps(WRITTEN_BEFORE, indent=1)  # byte for byte, as json.dump of the dict was
    config.save(str(tmp_path / "again.json"))
    assert RunConfig.load(str(tmp_path / "again.json")) == config
    assert config["model"] == "unet" and config["crop_size"] == (32, 32)  # read access as the dict it replaces
    assert config["origins"] == {}  # nothing was chosen by self-configuration in that run


def test_a_config_json_from_before_lr_schedule_ema_and_mask_map_means_what_those_runs_did(tmp_path):
    old = {k: v for k, v in WRITTEN_BEFORE.items() if k not in ("lr_schedule", "ema_decay", "mask_map",
                                                                 "mixed_precision_active")}
    old["max_steps"] = None
    config = RunConfig.load(write(tmp_path, old))
    assert (config.lr_schedule, config.ema_decay, config.mask_map, config.mixed_precision_active) == ("constant", 0.0,
                                                                                                     None, None)


@pytest.mark.parametrize("key,value,expected", [
    ("batch_size", 0, "'batch_size' must be >= 1"),
    ("batch_size", 2.5, "'batch_size' must be an integer"),
    ("batch_size", True, "'batch_size' must be an integer"),
    ("ema_decay", 1.5, "'ema_decay' must be in [0, 1)"),
    ("learning_rate", "fast", "'learning_rate' must be a number"),
    ("loss", "hinge", "'loss' must be one of ce, dice, ce+dice, focal"),
    ("model", "resnet", "'model' must be one of unet"),
    ("model_config", {"depth": 2, "wings": 3}, "'model_config' is invalid"),
    ("crop_size", [32], "'crop_size' must be two sizes >= 1"),
    ("class_weight_values", [0, 0, 0], "'class_weight_values' must be non-negative, not all 0"),
    ("max_steps", 0, "'max_steps' must be >= 1"),
    ("max_steps", None, "lr_schedule cosine decays to max_steps"),
    ("balance_classes", "yes", "'balance_classes' must be 0/1"),
    ("train_database", "/data/train.lmdb", "'train_database' must be a list"),
    ("number_classes", None, "'number_classes' is missing"),
])
def test_every_field_is_checked_on_load_with_one_line_naming_file_and_field(tmp_path, key, value, expected):
    data = dict(WRITTEN_BEFORE)
    if key == "number_classes":
        del data[key]
    else:
        data[key] = value
    path = write(tmp_path, data)
    with pytest.raises(cliutil.InputError) as info:
        RunConfig.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path) and expected in message, message


def test_unreadable_or_non_object_config_json_is_an_input_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(cliutil.InputError, match="unreadable"):
        RunConfig.load(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(cliutil.InputError, match="JSON object"):
        RunConfig.load(str(path))


def test_frozen_documented_and_run_defining_as_before():
    config = RunConfig.from_dict(WRITTEN_BEFORE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8
    docs = describe()
    assert set(docs) == {f.name for f in dataclasses.fields(RunConfig)} and all(len(d) > 10 for d in docs.values())
    # augmentation: the augmentation constants (issue #17), and clip_norm, not compared when an old config.json
    # lacks them (None)
    assert set(config.run_defining()) == PREVIOUS_RUN_DEFINING | {"max_steps", "augmentation", "clip_norm"}  # cosine
    constant = dataclasses.replace(config, lr_schedule="constant")
    assert set(constant.run_defining()) == PREVIOUS_RUN_DEFINING | {"augmentation", "clip_norm"}
    assert config.clip_norm is None  # not recorded: that run did not clip
    assert constant.origins == {} and "origins" not in constant.to_dict()  # written only when something was chosen
    with pytest.raises(cliutil.InputError, match="RunConfig: the field 'seed' must be an integer"):
        dataclasses.replace(config, seed="3")  # checked on construction too


def test_resume_check_names_the_bad_field_of_the_saved_config(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints" / "ckpt-000000001")  # the pointer is checked too: it must name a real folder
    (out / "checkpoints" / "ckpt-000000001" / "state.json").write_text(checkpoints.RunState(step=1).to_json())
    (out / "checkpoints" / checkpoints.CHECKPOINT_POINTER).write_text(json.dumps({"latest": "ckpt-000000001",
                                                                                  "step": 1}))
    config = RunConfig.from_dict(dict(WRITTEN_BEFORE, output_dir=str(out)))
    write(out, dict(WRITTEN_BEFORE, output_dir=str(out)))
    assert checkpoints.check_resume(config, require=True)
    with pytest.raises(cliutil.InputError, match="learning_rate: 0.0001 -> 0.001"):
        checkpoints.check_resume(dataclasses.replace(config, learning_rate=1e-3), require=False)
    assert checkpoints.check_resume(dataclasses.replace(config, early_stopping=3), require=False)  # not run-defining
    write(out, dict(WRITTEN_BEFORE, output_dir=str(out), reader_count=-1))
    with pytest.raises(cliutil.InputError, match=r"config.json: the field 'reader_count' must be >= 1"):
        checkpoints.check_resume(config, require=False)


def test_a_continued_run_keeps_the_settings_chosen_at_its_start(tmp_path):
    """After an update that chooses another default (or on another machine), the same command continues the run
    with what was chosen at its start; a setting the user passed is still compared."""
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints" / "ckpt-000000001")
    (out / "checkpoints" / "ckpt-000000001" / "state.json").write_text(checkpoints.RunState(step=1).to_json())
    (out / "checkpoints" / checkpoints.CHECKPOINT_POINTER).write_text(json.dumps({"latest": "ckpt-000000001",
                                                                                  "step": 1}))
    start = dict(WRITTEN_BEFORE, output_dir=str(out), loss="ce", batch_size=8,
                 origins={"loss": "cross-entropy, the original's", "batch_size": "about 512k pixels per batch"})
    write(out, start)
    now = RunConfig.from_dict(dict(start, loss="ce+dice", batch_size=16, learning_rate=1e-3,
                                   origins={"loss": "nnU-Net's", "batch_size": "on a GPU"}))
    kept = checkpoints.keep_chosen_settings(now)
    assert (kept.loss, kept.batch_size) == ("ce", 8)
    assert kept.origins["loss"] == "kept from the run's start: cross-entropy, the original's"
    with pytest.raises(cliutil.InputError, match="learning_rate: 0.0001 -> 0.001"):  # the user's flag: compared
        checkpoints.check_resume(kept, require=False)
    assert checkpoints.check_resume(dataclasses.replace(kept, learning_rate=1e-4), require=True)
    write(out, dict(start, origins={}))  # started by a version that chose nothing: its values are kept too
    kept = checkpoints.keep_chosen_settings(now)
    assert (kept.loss, kept.batch_size) == ("ce", 8) and kept.origins["loss"].startswith("kept from the run's start")
    # --base_filters (chosen from the device) lives in model_config: a run started on a CPU (8) goes on on a GPU
    write(out, dict(start, model_config=dict(start["model_config"], base_filters=8)))
    on_gpu = RunConfig.from_dict(dict(now.to_dict(), model_config=dict(start["model_config"], base_filters=32),
                                      origins=dict(now.origins, base_filters="32 filters on 1 GPU(s)")))
    kept = checkpoints.keep_chosen_settings(on_gpu)
    assert kept.model_config == dict(start["model_config"], base_filters=8)
    assert kept.origins["base_filters"].startswith("kept from the run's start")
    assert checkpoints.check_resume(dataclasses.replace(kept, learning_rate=1e-4), require=True)
    fresh = RunConfig.from_dict(dict(now.to_dict(), output_dir=str(tmp_path / "new")))
    assert checkpoints.keep_chosen_settings(fresh) is fresh  # nothing to continue: this version's choices


def test_resume_compares_only_the_augmentation_of_the_runs_rank(tmp_path):
    """A 2-D run continues when only the 3-D augmentation constants changed (a toolkit update), and is
    refused when its own 2-D ones did; the message names the sub-setting."""
    from segkit.training.config import augmentation_constants

    out = tmp_path / "run"
    os.makedirs(out / "checkpoints" / "ckpt-000000001")
    (out / "checkpoints" / "ckpt-000000001" / "state.json").write_text(checkpoints.RunState(step=1).to_json())
    (out / "checkpoints" / checkpoints.CHECKPOINT_POINTER).write_text(json.dumps({"latest": "ckpt-000000001",
                                                                                  "step": 1}))
    now = augmentation_constants()
    config = RunConfig.from_dict(dict(WRITTEN_BEFORE, output_dir=str(out), augmentation=now))
    older_3d = {"2d": now["2d"], "3d": {k: v for k, v in now["3d"].items() if k != "rotation_out_of_plane"}}
    write(out, dict(WRITTEN_BEFORE, output_dir=str(out), augmentation=older_3d))
    assert checkpoints.check_resume(config, require=True)
    other_2d = {"2d": dict(now["2d"], jitter_fraction=0.3), "3d": now["3d"]}
    write(out, dict(WRITTEN_BEFORE, output_dir=str(out), augmentation=other_2d))
    with pytest.raises(cliutil.InputError, match="augmentation.jitter_fraction: 0.3 -> 0.1"):
        checkpoints.check_resume(config, require=False)


def test_training_turns_onednn_on_unless_the_user_chose(monkeypatch):
    """train_unet.py asks for oneDNN's CPU kernels (3.6x faster steps on an AVX2 CPU) only when
    TF_ENABLE_ONEDNN_OPTS is unset and TensorFlow is not imported yet."""
    import train_unet
    from segkit import tfquiet

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    unset: dict = {}
    assert tfquiet.default_onednn(train_unet.ONEDNN_TRAINING, unset) and unset == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    user = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert not tfquiet.default_onednn(train_unet.ONEDNN_TRAINING, user) and user == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert not tfquiet.default_onednn(None, unset := {}) and unset == {}
    monkeypatch.setitem(sys.modules, "tensorflow", object())  # imported already: too late, leave it
    late: dict = {}
    assert not tfquiet.default_onednn("1", late) and late == {}


def test_state_written_before_train_seconds_existed_still_loads_and_a_bad_value_is_refused():
    old = json.dumps({"step": 5, "best_loss": 0.5, "best_step": 5, "best_metrics": {}, "evals_without_improvement": 0,
                      "history": [{"step": 5, "test_loss": 0.5}]})
    assert checkpoints.RunState.from_json(old).train_seconds == 0.0
    assert checkpoints.RunState.from_json(old[:-1] + ', "train_seconds": 61.5}').train_seconds == 61.5
    for bad in ('"soon"', "-1", "NaN", "Infinity"):
        with pytest.raises(cliutil.InputError, match="the field 'train_seconds' must be a number >= 0"):
            checkpoints.RunState.from_json(old[:-1] + f', "train_seconds": {bad}}}')
