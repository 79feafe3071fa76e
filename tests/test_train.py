"""train_unet.py: tiny runs on data/ through the real reader; export, resume, faults, distribution."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, signal_group_when_ready

import build_lmdb
import train_unet

TINY = ["--depth", "2", "--base_filters", "4", "--crop_size", "32", "--batch_size", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    """Example data as tiled databases: gray (3 classes, 64 px tiles) and RGB (3 channels)."""
    root = tmp_path_factory.mktemp("dbs")
    data = os.path.join(ROOT, "data")
    assert build_lmdb.main(["--image_folder", os.path.join(data, "images"), "--mask_folder", os.path.join(data, "masks"),
                            "--output_folder", str(root), "--dataset_name", "gray", "--use_tiling", "1",
                            "--tile_size", "64", "--train_fraction", "0.75", "--number_classes", "3"]) == 0
    assert build_lmdb.main(["--image_folder", os.path.join(data, "rgb", "images"),
                            "--mask_folder", os.path.join(data, "rgb", "masks"), "--output_folder", str(root),
                            "--dataset_name", "rgb", "--use_tiling", "1", "--tile_size", "64",
                            "--train_fraction", "0.5"]) == 0
    return {name: (str(root / f"train-{name}.lmdb"), str(root / f"test-{name}.lmdb")) for name in ("gray", "rgb")}


def argv(dbs, out, *extra, kind="gray"):
    train, test = dbs[kind]
    return ["--train_database", train, "--test_database", test, "--output_dir", str(out), "--number_classes", "3",
            *TINY, *map(str, extra)]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pointer(out):
    with open(os.path.join(out, "checkpoints", "checkpoint.json")) as fh:
        return json.load(fh)


def state(out, name):
    with open(os.path.join(out, "checkpoints", name, "state.json")) as fh:
        return json.load(fh)


SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    serve = loaded.signatures["serving_default"]
    x = np.random.default_rng(0).normal(size=(2, 48, 80, 1)).astype(np.float32)
    probs = serve(images=tf.constant(x))["probabilities"].numpy()
    meta = json.load(open(sys.argv[1] + "/assets/segmentation_metadata.json"))
    project = [m for m in ("models", "train_unet", "imagereader", "cliutil") if m in sys.modules]
    print(json.dumps({"shape": probs.shape, "sum_err": float(abs(probs.sum(-1) - 1).max()),
                      "dtype": probs.dtype.name, "meta": meta, "project_modules": project}))
""")


@pytest.mark.slow
def test_tiny_unet_trains_and_exports_a_self_contained_savedmodel(dbs, tmp_path):
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 6, "--test_every_n_steps", 3)) == 0
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(np.isfinite(float(r["test_loss"])) and 0 <= float(r["iou_1"]) <= 1 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["crop_size"] == [32, 32] and config["warmup_steps"] == 3 and config["replicas"] == 1
    assert pointer(out)["latest"] == "ckpt-000000006"
    events = [f for d in ("train", "test") for f in os.listdir(out / "logs" / d)]
    assert len(events) == 2
    assert b"image_truth_prediction" in (out / "logs" / "test" / [f for f in os.listdir(out / "logs" / "test")][0]).read_bytes()
    # Served by plain TensorFlow in a fresh interpreter that cannot import this project (-I, other cwd).
    result = subprocess.run([sys.executable, "-I", "-c", SERVE, str(out / "saved_model")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["shape"] == [2, 48, 80, 3] and served["dtype"] == "float32" and served["sum_err"] < 1e-5
    assert served["project_modules"] == []
    meta = served["meta"]
    assert meta["model"] == "unet" and meta["channels"] == 1 and meta["number_classes"] == 3
    assert meta["size_factor"] == 4 and meta["receptive_field_radius"] == 23 and meta["training_tile_size"] == [32, 32]
    assert 0 < meta["effective_receptive_field_radius"] <= 24 and meta["effective_receptive_field_radius"] % 4 == 0
    assert meta["final_metrics"]["step"] in (3, 6)
    assert meta["normalization"]["method"] == "zscore_per_channel_whole_image"
    assert meta["mask_map"] == {}  # the databases were built without --mask_map


@pytest.mark.parametrize("extra,kind,match", [
    (["--number_classes", "2"], "gray", "--number_classes 3"),
    (["--class_weights", "1,2"], "gray", "class_weights"),
    (["--crop_size", "30"], "gray", "multiple"),
    (["--model", "fcdensenet56"], "gray", "--depth and --base_filters"),
    (["--test_database", "/nonexistent/test.lmdb"], "gray", "no LMDB database"),
    (["--test_database", "RGB_TEST"], "gray", "different channel counts"),
    (["--lr_schedule", "cosine"], "gray", "--max_steps"),
    (["--ema_decay", "1"], "gray", "--ema_decay must be in [0, 1)"),
])
def test_bad_input_exits_2_before_writing_anything(dbs, tmp_path, capsys, extra, kind, match):
    extra = [dbs["rgb"][1] if e == "RGB_TEST" else e for e in extra]
    out = tmp_path / "never"
    assert train_unet.main(argv(dbs, out, *extra, kind=kind)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists()


def test_class_weights_and_losses():
    import tensorflow as tf

    assert train_unet.parse_class_weights("none", 3, {0: 10, 1: 5}) == [1.0, 1.0, 1.0]
    auto = train_unet.parse_class_weights("auto", 2, {0: 75, 1: 25})
    assert auto[1] / auto[0] == pytest.approx(3.0) and (75 * auto[0] + 25 * auto[1]) / 100 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(2, 8, 8, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 3, (2, 8, 8)), tf.int32)
    ones = tf.ones([3])
    stats = train_unet.batch_statistics(labels, logits, "ce", ones, 3)
    expected = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    assert float(train_unet.loss_from_statistics(stats, "ce", ones)) == pytest.approx(float(expected), rel=1e-5)
    perfect = tf.one_hot(labels, 3) * 40.0
    for loss in ("dice", "ce+dice", "focal"):
        s = train_unet.batch_statistics(labels, perfect, loss, ones, 3)
        assert float(train_unet.loss_from_statistics(s, loss, ones)) < 1e-3
    # Statistics add up: the loss of a whole pass equals the loss from summed per-batch statistics.
    halves = [train_unet.batch_statistics(labels[i:i + 1], logits[i:i + 1], "ce+dice", ones, 3) for i in (0, 1)]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    whole = train_unet.batch_statistics(labels, logits, "ce+dice", ones, 3)
    assert float(train_unet.loss_from_statistics(summed, "ce+dice", ones)) == pytest.approx(
        float(train_unet.loss_from_statistics(whole, "ce+dice", ones)), rel=1e-5)


def test_learning_rate_schedules():
    config = {"learning_rate": 1e-3, "warmup_steps": 100, "max_steps": 1100, "lr_schedule": "constant"}
    assert train_unet.learning_rate_at(99, config) == pytest.approx(1e-4)
    assert train_unet.learning_rate_at(100, config) == train_unet.learning_rate_at(5000, config) == 1e-3
    config["lr_schedule"] = "cosine"
    assert train_unet.learning_rate_at(0, config) == pytest.approx(1e-4)  # same warm-up
    assert train_unet.learning_rate_at(100, config) == pytest.approx(1e-3)
    assert train_unet.learning_rate_at(600, config) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # half way
    lrs = [train_unet.learning_rate_at(s, config) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-5)
    assert train_unet.learning_rate_at(2000, config) == pytest.approx(1e-5)  # stays at the floor


def test_cosine_under_a_time_budget_decays_over_the_budget_spent():
    """--lr_schedule cosine --max_minutes M (no --max_steps): the decay follows the fraction of the budget spent."""
    config = {"learning_rate": 1e-3, "warmup_steps": 100, "max_steps": None, "lr_schedule": "cosine"}
    assert train_unet.learning_rate_at(50, config, 0.3) == pytest.approx(1e-4)  # warm-up is still counted in steps
    assert train_unet.learning_rate_at(100, config, 0.0) == pytest.approx(1e-3)
    assert train_unet.learning_rate_at(100, config, 0.5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    spent = [i / 100 for i in range(101)]
    lrs = [train_unet.learning_rate_at(5000, config, f) for f in spent]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-5)
    assert train_unet.learning_rate_at(5000, config, 1.7) == pytest.approx(1e-5)  # past the budget: the floor
    config["max_steps"] = 1100  # --max_steps given: the steps define the decay, the time does not
    assert train_unet.learning_rate_at(600, config, 0.9) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))


def test_early_stopping_counts_passes_without_improvement_beyond_tolerance():
    config = {"max_steps": None, "early_stopping": 2}
    st = train_unet.RunState()
    assert st.record(1, 1.0, {}) and not st.record(2, 1.0 - 5e-5, {})  # within tolerance: no improvement
    assert train_unet.stop_reason(st, config) is None
    assert not st.record(3, 1.2, {}) and "early stopping" in train_unet.stop_reason(st, config)
    assert st.best_step == 1 and st.evals_without_improvement == 2
    assert train_unet.RunState.from_json(st.to_json()) == st


@pytest.mark.slow
def test_mismatched_configuration_is_refused_on_resume(dbs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 0
    before = sorted(os.listdir(out / "checkpoints"))
    capsys.readouterr()
    assert train_unet.main(argv(dbs, out, "--max_steps", 4, "--test_every_n_steps", 2, "--loss", "dice",
                                "--base_filters", "8")) == 2
    err = capsys.readouterr().err
    assert "loss" in err and "model_config.base_filters" in err and "new --output_dir" in err
    assert sorted(os.listdir(out / "checkpoints")) == before
    assert train_unet.main(argv(dbs, tmp_path / "fresh", "--resume", 1)) == 2  # nothing to resume
    # Same configuration with a larger step budget continues (only --max_steps changed).
    assert train_unet.main(argv(dbs, out, "--max_steps", 4, "--test_every_n_steps", 2)) == 0
    assert [int(r["step"]) for r in read_csv(out / "metrics.csv")] == [2, 4]
    # A cosine schedule is defined by its end: a different --max_steps is another run.
    cosine = tmp_path / "cosine"
    assert train_unet.main(argv(dbs, cosine, "--max_steps", 2, "--test_every_n_steps", 2, "--lr_schedule", "cosine")) == 0
    capsys.readouterr()
    assert train_unet.main(argv(dbs, cosine, "--max_steps", 4, "--test_every_n_steps", 2, "--lr_schedule", "cosine")) == 2
    assert "max_steps: 2 -> 4" in capsys.readouterr().err
    # A checkpoint of a mixed-precision (GPU) run cannot continue in float32 (here: no GPU): refused in one line.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, mixed_precision_active=True)))
    before = sorted(os.listdir(out / "checkpoints"))
    assert train_unet.main(argv(dbs, out, "--max_steps", 6, "--test_every_n_steps", 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained in mixed float16 (on a GPU)" in err[0] and "continue it on a GPU machine" in err[0]
    assert sorted(os.listdir(out / "checkpoints")) == before and json.loads(config_path.read_text())["mixed_precision_active"]


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(dbs, tmp_path, monkeypatch, capsys):
    import imagereader

    class PoisonedReader(imagereader.ImageReader):
        def __iter__(self):
            for i, (images, masks) in enumerate(super().__iter__()):
                if self.mode == "train" and i == 7:
                    images = np.full_like(images, np.nan)
                yield images, masks

    monkeypatch.setattr(imagereader, "ImageReader", PoisonedReader)
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 20, "--test_every_n_steps", 3)) == train_unet.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "NaN/Inf at step 8" in err and "step 6" in err
    assert pointer(out)["latest"] == "ckpt-000000006" and state(out, "ckpt-000000006")["step"] == 6
    assert not (out / "saved_model").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_continues_with_the_same_history(dbs, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_unet.py"), *argv(dbs, out, "--test_every_n_steps", 4)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd + ["--max_steps", "10000"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if pointer(out)["step"] >= 12:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, readers included, as a pre-empted node
        proc.wait()
    saved = pointer(out)
    assert saved["step"] >= 12, "the run did not reach its third checkpoint in time"
    history = state(out, saved["latest"])["history"]
    target = saved["step"] + 8
    result = subprocess.run(cmd + ["--max_steps", str(target)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {saved['step']}" in result.stderr
    final = pointer(out)
    assert final["step"] == target
    resumed = state(out, final["latest"])
    assert resumed["history"][:len(history)] == history and len(resumed["history"]) == len(history) + 2
    steps = [int(r["step"]) for r in read_csv(out / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == target


TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import train_unet
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    args = train_unet.build_parser().parse_args(sys.argv[2:])
    config = train_unet.resolve_config(args)
    outcome = train_unet.train(config, resume=False, strategy=strategy)
    print(json.dumps({"step": outcome.step, "saved": outcome.saved_model}))
""")


@pytest.mark.slow
def test_two_replica_mirrored_strategy_on_two_logical_cpus(dbs, tmp_path):
    from segkit import lmdb_format

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS, ROOT, *argv(dbs, out, "--max_steps", 4,
                             "--test_every_n_steps", 2)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["replicas"] == 2 and config["global_batch_size"] == 4
    meta = lmdb_format.read_metadata(dbs["gray"][1])
    total = sum(src["height"] * src["width"] for src in meta["sources"])
    # Exact test passes: every test pixel counted once although replicas get uneven batch counts.
    assert meta["num_records"] % 4 != 0
    assert all(int(r["test_pixels"]) == meta["num_records"] * 64 * 64 for r in read_csv(out / "metrics.csv"))
    assert total > 0 and (out / "saved_model" / "saved_model.pb").exists()


@pytest.mark.slow
def test_sigterm_shuts_down_the_readers_and_keeps_the_checkpoint(dbs, tmp_path):
    """Slurm pre-emption sends SIGTERM to every process of the job: handled like Ctrl-C (KeyboardInterrupt,
    exit 130, readers closed by the trainer; the readers themselves ignore it)."""
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_unet.py"), *argv(dbs, out, "--test_every_n_steps", 2, "--max_steps", 100000)]
    children = []

    def checkpointed(proc):  # the first test pass has saved; note the reader workers before signalling
        if not (out / "checkpoints" / "checkpoint.json").exists():
            return False
        children.extend(psutil.Process(proc.pid).children(recursive=True))
        return True

    proc, err = signal_group_when_ready(cmd, checkpointed, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert children, "the reader workers should be running"
    assert proc.returncode == 130 and "interrupted" in err, f"exit {proc.returncode}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert pointer(out)["step"] >= 2  # the last checkpoint stays


@pytest.mark.slow
def test_sigterm_between_test_passes_saves_a_latest_checkpoint_and_the_run_resumes_from_it(dbs, tmp_path):
    """Pre-emption long before the next test pass: the steps done so far are kept, not only the last test pass's."""
    import select

    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_unet.py"), *argv(dbs, out, "--test_every_n_steps", 100000)]
    seen = []

    def at_step_100(proc):  # the progress line every 100 steps
        if select.select([proc.stderr], [], [], 1.0)[0]:
            seen.append(proc.stderr.readline())
        if not any(" step 100 " in line for line in seen):
            return False
        assert not (out / "checkpoints" / "checkpoint.json").exists(), "".join(seen[-20:])  # no test pass yet
        return True

    proc, err = signal_group_when_ready(cmd, at_step_100, timeout=180, cwd=ROOT,
                                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    saved = pointer(out)
    assert saved["step"] >= 100 and saved["latest"] and saved["best"] is None
    assert f"saved the checkpoint of step {saved['step']}" in err
    # The resubmitted job continues from there (a different --max_steps is not run-defining).
    outcome = train_unet.train(train_unet.resolve_config(train_unet.build_parser().parse_args(
        argv(dbs, out, "--test_every_n_steps", 100000, "--max_steps", saved["step"] + 3))), resume=True)
    assert outcome.step == saved["step"] + 3 and outcome.saved_model is not None
    assert [h["step"] for h in outcome.history] == [saved["step"] + 3]


@pytest.mark.slow
def test_mixed_precision_step_uses_loss_scaling(dbs, tmp_path):
    """The GPU path (mixed_float16 + LossScaleOptimizer), forced on CPU: float32 logits, finite updates."""
    import keras
    import tensorflow as tf

    config = train_unet.resolve_config(train_unet.build_parser().parse_args(argv(dbs, tmp_path / "mp")))
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = tf.distribute.MirroredStrategy()
        trainer = train_unet.Trainer(config, strategy, mixed=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert trainer.model.get_layer("down0_conv1").compute_dtype == "float16"
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(2, 32, 32, 1)).astype(np.float32), rng.integers(0, 3, (2, 32, 32)).astype(np.int32))
    data = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    before = trainer.model.get_layer("logits").kernel.numpy().copy()
    losses = [float(trainer.train_step(next(data))["loss"]) for _ in range(3)]
    assert all(np.isfinite(losses)) and not np.allclose(before, trainer.model.get_layer("logits").kernel.numpy())


def test_clip_norm_scales_each_step_s_gradient_down_to_it(dbs, tmp_path):
    """--clip_norm c: the gradient is scaled to global norm c when larger. Adam's first step is lr x g / (|g| +
    1e-7) per weight: about lr whatever the gradient's scale, unless the clipped gradient is far below Adam's
    epsilon, as with c = 1e-9; without clipping (0) the weights move by about the rate."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(2, 32, 32, 1)).astype(np.float32), rng.integers(0, 3, (2, 32, 32)).astype(np.int32))
    moved = {}
    for clip in (0, 1e-9):
        config = train_unet.resolve_config(train_unet.build_parser().parse_args(
            argv(dbs, tmp_path / f"clip{clip}", "--clip_norm", clip, "--ema_decay", 0)))
        assert config.clip_norm == clip and "clip_norm" not in config.origins
        trainer = train_unet.Trainer(config, strategy, mixed=False)
        data = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
        before = trainer.model.get_layer("logits").kernel.numpy().copy()
        trainer.train_step(next(data))
        moved[clip] = float(np.abs(trainer.model.get_layer("logits").kernel.numpy() - before).max())
    assert moved[0] > 1e-5 and moved[1e-9] < 1e-3 * moved[0]


@pytest.mark.slow
def test_moving_average_follows_the_ramped_decay_and_is_what_is_tested(dbs, tmp_path):
    import tensorflow as tf

    config = train_unet.resolve_config(train_unet.build_parser().parse_args(argv(dbs, tmp_path / "ema", "--ema_decay", 0.5)))
    strategy = tf.distribute.MirroredStrategy()
    trainer = train_unet.Trainer(config, strategy, mixed=False)
    assert trainer.eval_model is trainer.ema_model and trainer.ema_model is not trainer.model
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(2, 32, 32, 1)).astype(np.float32), rng.integers(0, 3, (2, 32, 32)).astype(np.int32))
    data = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    average = [w.numpy().copy() for w in trainer.model.weights]  # starts at the initial weights
    names = [w.path for w in trainer.model.weights]
    assert any("moving_mean" in n for n in names)  # BatchNorm statistics are averaged too
    for t in range(3):
        trainer.train_step(next(data))
        trainer.step.assign(t + 1)
        decay = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.18..., 0.25
        average = [decay * a + (1 - decay) * w.numpy() for a, w in zip(average, trainer.model.weights)]
        for a, e in zip(average, trainer.ema_model.weights):
            np.testing.assert_allclose(e.numpy(), a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trainer.ema_model.weights[0].numpy(), trainer.model.weights[0].numpy())
    # No average with --ema_decay 0: the raw weights are tested.
    plain = train_unet.resolve_config(train_unet.build_parser().parse_args(argv(dbs, tmp_path / "raw", "--ema_decay", 0)))
    raw = train_unet.Trainer(plain, strategy, mixed=False)
    assert raw.ema_model is None and raw.eval_model is raw.model


@pytest.mark.slow
def test_the_export_carries_the_averaged_weights_of_the_best_checkpoint(dbs, tmp_path):
    import tensorflow as tf

    import models

    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 6, "--test_every_n_steps", 3, "--ema_decay", 0.9)) == 0
    config = json.loads((out / "config.json").read_text())
    best = os.path.join(out, "checkpoints", pointer(out)["best"], "ckpt")
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 1)).astype(np.float32)
    probs = {}
    for name in ("model", "ema_model"):
        model = models.build_model("unet", 1, 3, **config["model_config"])
        tf.train.Checkpoint(**{name: model}).read(best).expect_partial()
        probs[name] = tf.nn.softmax(model(x, training=False), axis=-1).numpy()
    served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(), probs["ema_model"], atol=1e-5)
    assert not np.allclose(probs["model"], probs["ema_model"], atol=1e-3)
    meta = json.loads((out / "saved_model" / "assets" / "segmentation_metadata.json").read_text())
    assert meta["training"]["ema_decay"] == 0.9


def test_the_training_databases_mask_map_is_exported_when_they_agree():
    built = lambda m: {"build": {"mask_map": m}}  # noqa: E731
    assert train_unet._training_mask_map([built({"255": 1}), built({"255": 1})]) == {"255": 1}
    assert train_unet._training_mask_map([built({"255": 1}), built({})]) is None  # disagree: inference needs the flag
    assert train_unet._training_mask_map([{}, built({})]) == {}  # databases without build metadata count as none


def test_first_signal_asks_the_loop_to_stop_a_second_interrupts_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = train_unet.StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert stop.signal_name == "SIGTERM"  # noted, nothing raised: the loop stops at the next step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_single_image_runs_as_a_batch_of_two_and_gets_its_own_prediction():
    """trainer.forward (test passes, TensorBoard panels) doubles a batch of one image, which oneDNN runs
    15-30x faster on the development CPU, and returns that image's prediction; other batches pass as they are."""
    import tensorflow as tf

    import models
    from segkit.training.trainer import forward

    model = models.build_model("unet", 1, 2, depth=2, base_filters=4, batch_norm=True, dropout=0.0)
    f = tf.function(lambda t: forward(model, t), reduce_retracing=True, autograph=False)
    x = np.random.default_rng(0).random((1, 32, 48, 1), np.float32)
    one = f(tf.constant(x)).numpy()
    assert one.shape == (1, 32, 48, 2)
    np.testing.assert_allclose(one, model(x, training=False).numpy(), atol=1e-5)
    three = np.concatenate([x, 0.5 * x, 2 * x])
    out = f(tf.constant(three)).numpy()
    assert out.shape == (3, 32, 48, 2)
    np.testing.assert_allclose(out[0], one[0], atol=1e-5)
    np.testing.assert_allclose(out, model(three, training=False).numpy(), atol=1e-5)
    plain = tf.function(lambda t: forward(model, t, double_single=False), autograph=False)
    np.testing.assert_allclose(plain(tf.constant(x)).numpy(), one, atol=1e-5)  # GPUs: as it is
