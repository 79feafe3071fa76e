"""Resume equality and multi-worker training (issue #17): a run stopped by SIGTERM and resumed ends with the
weights of the uninterrupted run; two workers through TF_CONFIG on localhost agree and only the chief writes."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, signal_group_when_ready
from test_train import argv, dbs, pointer  # noqa: F401  (dbs: the module fixture)

import train_unet
from segkit.training.config import augmentation_constants

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def checkpoint_values(out):
    import tensorflow as tf

    prefix = os.path.join(out, "checkpoints", pointer(out)["latest"], "ckpt")
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(dbs, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    common = ("--test_every_n_steps", 4, "--early_stopping", 0, "--reader_count", 1)
    cmd = [sys.executable, os.path.join(ROOT, "train_unet.py"), *argv(dbs, interrupted, *common, "--max_steps", 10 ** 6)]

    def past_first_test_pass(proc):
        try:
            return pointer(interrupted)["step"] >= 4
        except (OSError, ValueError):
            return False

    proc, err = signal_group_when_ready(cmd, past_first_test_pass, cwd=ROOT, env=ENV, timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    stopped = pointer(interrupted)["step"]
    target = stopped + 6
    assert train_unet.main(argv(dbs, interrupted, *common, "--max_steps", target)) == 0
    assert train_unet.main(argv(dbs, straight, *common, "--max_steps", target)) == 0
    a, b = checkpoint_values(interrupted), checkpoint_values(straight)
    assert pointer(interrupted)["step"] == pointer(straight)["step"] == target
    assert set(a) == set(b) and any("model" in n for n in a) and any(n.startswith("optimizer/") for n in a), sorted(a)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    config = json.loads((interrupted / "config.json").read_text())
    assert config["augmentation"] == augmentation_constants() and config["augmentation"]["2d"]["jitter_fraction"] == 0.1
    meta = json.loads((straight / "saved_model" / "assets" / "segmentation_metadata.json").read_text())
    assert meta["training"]["augmentation"] == augmentation_constants()


def test_the_sample_stream_is_a_function_of_seed_shard_and_batch_index(dbs):
    from imagereader import ImageReader

    train = dbs["gray"][0]
    kw = dict(batch_size=2, crop_size=32, seed=3, mode="train")
    with ImageReader(train, workers=1, **kw) as one, ImageReader(train, workers=2, **kw) as two, \
            ImageReader(train, workers=2, start_batch=5, **kw) as late:
        a = [b for _, b in zip(range(8), one)]
        b = [b for _, b in zip(range(8), two)]
        c = [b for _, b in zip(range(3), late)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
    for x, y in zip(a[5:], c):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])


MULTI_WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from segkit.training import loop
    import train_unet

    close = loop.Run.close
    def keep_weights(self):  # what this worker trained, for the test to compare (BatchNorm's moving statistics
        # are each worker's own average of its batches, so only the trained weights are compared)
        np.savez(sys.argv[2], *[w.numpy() for w in self.trainer.model.trainable_weights])
        close(self)
    loop.Run.close = keep_weights
    sys.exit(train_unet.main(sys.argv[3:]))
""")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_through_tf_config_agree_and_only_the_chief_writes(dbs, tmp_path):
    out = tmp_path / "run"
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    procs = []
    for index in range(2):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", MULTI_WORKER, ROOT, str(tmp_path / f"weights-{index}.npz"),
             *argv(dbs, out, "--max_steps", 4, "--test_every_n_steps", 2)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == 2 and config["replicas"] == 2
    assert pointer(out)["step"] == 4 and (out / "saved_model" / "saved_model.pb").exists()
    written = sorted(n for n in os.listdir(tmp_path) if n != "run")
    assert written == ["weights-0.npz", "weights-1.npz"]  # the second worker wrote nothing beside the chief's
    assert "done:" in results[0][0] and "done:" in results[1][0]
    w0, w1 = np.load(tmp_path / "weights-0.npz"), np.load(tmp_path / "weights-1.npz")
    assert len(w0.files) == len(w1.files) > 0
    for name in w0.files:
        np.testing.assert_allclose(w0[name], w1[name], rtol=1e-6, atol=1e-7, err_msg=name)
