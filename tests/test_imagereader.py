"""imagereader.py: streams, sampling, evaluation passes, normalization, faults and shutdown.

Databases are written directly with lmdb_format (tests/lmdb_helpers.py), not with build_lmdb.py.
Each reader start spawns processes (~0.3 s), so tests share readers where they can.
"""
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from lmdb_helpers import id_samples, unit_sources, write_database

import imagereader
from imagereader import IGNORE_LABEL, ImageReader, RandomSampler, ReaderWorkerError, ShuffleOrder
from segkit import image_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ids(images_nhwc):
    """Record ids of id_samples batches (normalized with mean 0, std 1: the pixel value is 100 + id)."""
    return [int(round(v)) - 100 for v in images_nhwc[:, 0, 0, 0]]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbs")
    out = {}
    out["ids"] = write_database(str(root / "ids.lmdb"), id_samples(12), sources=unit_sources(), source_index=[0] * 12)
    out["ids2"] = write_database(str(root / "ids2.lmdb"), id_samples(17)[12:], sources=unit_sources(), source_index=[0] * 5)
    # Mixed record shapes, each record its own source (statistics over the record itself).
    rng = np.random.default_rng(0)
    shapes = [(16, 16)] * 3 + [(20, 24)] * 2 + [(16, 16)] * 2 + [(37, 45)]
    out["mixed_samples"] = [((rng.random(s) * 1000).astype(np.uint16), rng.integers(0, 3, s).astype(np.uint8)) for s in shapes]
    out["mixed"] = write_database(str(root / "mixed.lmdb"), out["mixed_samples"])
    out["rgb"] = write_database(str(root / "rgb.lmdb"), id_samples(3, channels=3), sources=unit_sources(3), source_index=[0] * 3)
    out["corrupt"] = write_database(str(root / "corrupt.lmdb"), id_samples(8), sources=unit_sources(), source_index=[0] * 8,
                                    corrupt=[5])
    # Class balance: class 1 in 1 record, class 2 in 3 records, class 3 in 12; background everywhere.
    balanced = []
    for i, cls in enumerate([1] + [2] * 3 + [3] * 12):
        image, mask = id_samples(i + 1)[i]
        mask[mask > 0] = cls
        balanced.append((image, mask))
    out["balanced"] = write_database(str(root / "balanced.lmdb"), balanced, sources=unit_sources(), source_index=[0] * 16)
    out["large"] = write_database(str(root / "large.lmdb"), [((rng.random((48, 48)) * 5000).astype(np.uint16),
                                                             rng.integers(0, 2, (48, 48)).astype(np.uint8)) for _ in range(6)])
    return out


def take(reader, count):
    it = iter(reader)
    return [next(it) for _ in range(count)]


def live(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_ended(pids):
    """The reader's workers are gone: not in multiprocessing's children, not in the OS process list."""
    assert len(pids) > 0
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(live(p) for p in pids):
        time.sleep(0.05)
    assert not any(live(p) for p in pids)
    assert not {c.pid for c in psutil.Process().children(recursive=True) if live(c.pid)} & set(pids)


# ---- construction: no processes ---------------------------------------------------------------------

def test_bad_databases_and_arguments_raise_value_error(dbs, tmp_path):
    with pytest.raises(ValueError, match="no LMDB database"):
        ImageReader(str(tmp_path / "missing.lmdb"), batch_size=2)
    with pytest.raises(ValueError, match="different channel counts"):
        ImageReader([dbs["ids"], dbs["rgb"]], batch_size=2)
    for kwargs, match in [(dict(mode="test"), "mode"), (dict(sampling="weighted"), "sampling"),
                          (dict(database_weights=[1, 2]), "database_weights"), (dict(crop_size=10, size_factor=4), "crop size"),
                          (dict(workers=0), "workers"), (dict(shard_index=2, shard_count=2), "shard_index")]:
        with pytest.raises(ValueError, match=match):
            ImageReader(dbs["ids"], batch_size=2, **kwargs)


def test_properties_over_several_databases(dbs):
    reader = ImageReader([dbs["ids"], dbs["ids2"]], batch_size=2, size_factor=8)
    assert reader.num_records == 17 and reader.channels == 1 and reader.number_classes == 3
    assert reader.crop_hw == (16, 16) and reader.image_dtype == "uint16"
    assert reader.class_pixel_counts == {0: 17 * 128, 1: 9 * 128, 2: 8 * 128}
    assert [m["num_records"] for m in reader.metadata] == [12, 5]
    assert ImageReader(dbs["mixed"], batch_size=2, size_factor=8).crop_hw == (16, 16)  # smallest record
    assert ImageReader(dbs["mixed"], batch_size=2, mode="eval", size_factor=8).crop_hw is None  # shapes differ
    reader.close()  # never started: a no-op


# ---- sampling (pure, no processes) ------------------------------------------------------------------

def test_shuffled_epochs_are_without_replacement_and_shards_split_them():
    order = ShuffleOrder([7, 5], seed=1)
    first, second = order.take(np.arange(12)), order.take(np.arange(12, 24))
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert not np.array_equal(first, second)
    shard0, shard1 = order.take(np.arange(0, 12, 2)), order.take(np.arange(1, 12, 2))
    assert sorted(np.concatenate([shard0, shard1])) == list(range(12))
    np.testing.assert_array_equal(ShuffleOrder([7, 5], seed=1).take(np.arange(30)), order.take(np.arange(30)))


def test_database_weights_set_each_databases_share_without_replacement():
    order = ShuffleOrder([10, 10], seed=0, weights=[3, 1])
    stream = order.take(np.arange(40))  # two epochs of 20
    from_first = stream[stream < 10]
    assert len(from_first) == 30  # 3:1
    assert np.bincount(from_first, minlength=10).tolist() == [3] * 10  # 3 full cycles of database 0
    sampler = RandomSampler([10, 30], weights=[1, 1])
    draws = sampler.draw(np.random.default_rng(0), 4000)
    assert abs((draws < 10).mean() - 0.5) < 0.03


def test_class_balanced_sampling_frequencies():
    class_records = [{0: list(range(16)), 1: [0], 2: [1, 2, 3], 3: list(range(4, 16))}]
    draws = RandomSampler([16], class_records).draw(np.random.default_rng(0), 20000)
    record_class = np.array([1] + [2] * 3 + [3] * 12)[draws]
    # A class uniformly among {0, 1, 2, 3}, then a record containing it; class 0 is in every record.
    expected = {1: 0.25 + 0.25 / 16, 2: 0.25 + 0.25 * 3 / 16, 3: 0.25 + 0.25 * 12 / 16}
    for cls, p in expected.items():
        assert abs((record_class == cls).mean() - p) < 0.015, cls


# ---- train streams ------------------------------------------------------------------------------------

def test_train_stream_shapes_and_shuffled_epochs(dbs):
    with ImageReader(dbs["ids"], batch_size=4, workers=2, augment=False, seed=7) as reader:
        batches = take(reader, 6)
        pids = reader.worker_pids
    for images, masks in batches:
        assert images.shape == (4, 16, 16, 1) and images.dtype == np.float32
        assert masks.shape == (4, 16, 16) and masks.dtype == np.int32
        for record, mask in zip(ids(images), masks):  # each mask travels with its own image
            assert set(np.unique(mask)) == {0, 1 + record % 2}
    stream = [i for images, _ in batches for i in ids(images)]
    assert sorted(stream[:12]) == list(range(12)) and sorted(stream[12:]) == list(range(12))
    assert_all_ended(pids)


def test_same_seed_same_stream_and_no_duplicated_worker_streams(dbs):
    def stream(seed):
        with ImageReader(dbs["large"], batch_size=2, workers=2, sampling="replacement", crop_size=24, seed=seed) as reader:
            return take(reader, 6)

    a, b, c = stream(3), stream(3), stream(4)
    for (ia, ma), (ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert not any(np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c))
    samples = [image for images, _ in a for image in images]  # worker 0 made batches 0, 2, 4; worker 1 1, 3, 5
    assert not any(np.array_equal(samples[i], samples[j]) for i in range(len(samples)) for j in range(i))


def test_balanced_sampling_through_the_reader(dbs):
    with ImageReader(dbs["balanced"], batch_size=32, workers=1, sampling="balanced", augment=False) as reader:
        stream = np.array([i for images, _ in take(reader, 10) for i in ids(images)])
    record_class = np.array([1] + [2] * 3 + [3] * 12)[stream]
    for cls, p in {1: 0.2656, 2: 0.2969, 3: 0.4375}.items():
        assert abs((record_class == cls).mean() - p) < 0.08


def test_starved_batches_are_counted(dbs):
    """A consumer that outpaces the worker finds no batch ready; one that waits for a full ring never does."""
    with ImageReader(dbs["large"], batch_size=2, workers=1, augment=False, queue_size=8, seed=1) as reader:
        it = iter(reader)
        next(it)  # the first batch is always waited for (the worker starts)
        assert reader.batches_delivered == 1 and reader.batches_starved == 1
        deadline = time.monotonic() + 30
        while reader._fill() < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(3):  # all ready in the ring
            next(it)
        assert reader.batches_delivered == 4 and reader.batches_starved == 1


def test_starvation_is_logged_once_per_transition(caplog):
    watch = imagereader.QueueWatch(grace=100)
    with caplog.at_level(logging.INFO, logger="imagereader"):
        for fill in [0.0, 0.05, 0.6, 0.3, 0.05, 0.02, 0.0, 0.3, 0.45, 0.55, 0.9, 0.08, 0.6]:
            watch.update(fill)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [imagereader.STARVATION_MESSAGE, imagereader.STARVATION_OVER_MESSAGE,
                        imagereader.STARVATION_MESSAGE, imagereader.STARVATION_OVER_MESSAGE]
    assert messages[0] == "Input Queue Starvation !!!!" and messages[1] == "Input Queue Starvation Over"


# ---- eval passes -------------------------------------------------------------------------------------

def test_eval_pass_covers_every_record_once_in_order_normalized(dbs):
    samples = dbs["mixed_samples"]
    with ImageReader(dbs["mixed"], batch_size=2, workers=2, mode="eval", size_factor=8) as reader:
        passes = [list(reader) for _ in range(2)]
        it = iter(reader)
        next(it)  # abandon a pass after one batch: the next iteration starts a fresh pass
        passes.append(list(reader))
    # shapes 16x16 x3, 20x24 x2 (-> 24x24), 16x16 x2, 37x45 (-> 40x48): padded up, batches never mix shapes
    assert [b[0].shape[:3] for b in passes[0]] == [(2, 16, 16), (1, 16, 16), (2, 24, 24), (2, 16, 16), (1, 40, 48)]
    for batches in passes:
        images = [image for batch, _ in batches for image in batch]
        masks = [mask for _, batch in batches for mask in batch]
        assert len(images) == len(samples)
        for (image, mask), got_image, got_mask in zip(samples, images, masks):
            h, w = mask.shape  # the whole record, then mirrored image / IGNORE_LABEL mask to the factor
            pads = [(0, got_mask.shape[0] - h), (0, got_mask.shape[1] - w)]
            mean, std = image_io.image_stats(image[:, :, None])
            expected = image_io.mirror_pad(image_io.normalize(image[:, :, None], mean, std), pads)
            np.testing.assert_allclose(got_image, expected, rtol=1e-6)
            np.testing.assert_array_equal(got_mask[:h, :w], mask)
            assert np.count_nonzero(got_mask == IGNORE_LABEL) == got_mask.size - mask.size


def test_eval_over_concatenated_databases_is_in_order(dbs):
    with ImageReader([dbs["ids"], dbs["ids2"]], batch_size=5, workers=3, mode="eval") as reader:
        assert reader.batches_per_pass == 4
        assert [i for images, _ in reader for i in ids(images)] == list(range(17))


# ---- faults and shutdown -------------------------------------------------------------------------------

def test_worker_exception_reaches_the_consumer_with_its_traceback(dbs):
    reader = ImageReader(dbs["corrupt"], batch_size=2, workers=2, crop_size=16)  # no header scan: workers meet it
    start = time.monotonic()
    with pytest.raises(ReaderWorkerError, match="record 5: not a segmentation record") as info:
        with reader:
            take(reader, 100)
    assert time.monotonic() - start < 5
    assert "Traceback" in str(info.value) and "decode_record" in str(info.value)
    assert_all_ended(reader.worker_pids)
    with pytest.raises(ValueError, match="corrupt.lmdb: record 5: not a segmentation record"):
        ImageReader(dbs["corrupt"], batch_size=2, mode="eval")  # eval reads every header up front


def test_killed_worker_is_detected(dbs):
    with ImageReader(dbs["ids"], batch_size=2, workers=2) as reader:
        it = iter(reader)
        next(it)
        pids = reader.worker_pids
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ReaderWorkerError, match="SIGKILL"):
            for _ in range(1000):
                next(it)
        assert time.monotonic() - start < 5
    assert_all_ended(pids)


def test_workers_ignore_ctrl_c_and_sigterm_even_while_still_importing(dbs):
    """A terminal's Ctrl-C and Slurm's SIGTERM reach every process; the workers leave them to the consumer."""
    with ImageReader(dbs["ids"], batch_size=2, workers=2) as reader:
        reader.start()
        pids = reader.worker_pids
        for pid in pids:  # right after start: the spawned workers are still importing numpy and OpenCV
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        batches = take(reader, 4)
        assert len(batches) == 4 and all(live(pid) for pid in pids)
    assert_all_ended(pids)


def test_close_with_full_queues_is_quick_and_ends_every_worker(dbs):
    reader = ImageReader(dbs["large"], batch_size=2, workers=2, crop_size=16, queue_size=4)
    take(reader, 1)
    time.sleep(0.5)  # the rings fill up; workers block waiting for free slots
    pids = reader.worker_pids
    start = time.monotonic()
    reader.close()
    reader.close()  # idempotent
    assert time.monotonic() - start < 3
    assert_all_ended(pids)
    with pytest.raises(RuntimeError, match="closed"):
        take(reader, 1)


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import imagereader

    def main():
        with imagereader.ImageReader({db!r}, batch_size=2, workers=2) as reader:
            for i, _ in enumerate(reader):
                if i == 1:  # batches 0 and 1 come from workers 0 and 1 (round-robin): both are running
                    print("pids", *reader.worker_pids, flush=True)
                time.sleep(0.01)

    if __name__ == "__main__":
        try:
            main()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
""")


def test_ctrl_c_during_iteration_exits_cleanly(dbs, tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT.format(root=ROOT, db=dbs["ids"]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the reader did not start"
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert len(pids) == 2
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in out
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(live(p) for p in pids):
        time.sleep(0.05)
    assert not any(live(p) for p in pids)


def test_workers_do_not_rerun_the_main_script(dbs, tmp_path):
    """Spawned workers would normally re-run the parent's script: slow, maybe importing TensorFlow, and an
    error for scripts without an ``if __name__ == "__main__":`` guard. This script has no guard."""
    log = tmp_path / "top_level.log"
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        with open({str(log)!r}, "a") as fh:
            fh.write("ran\\n")
        import imagereader
        with imagereader.ImageReader({dbs["ids"]!r}, batch_size=2, workers=2) as reader:
            print(next(iter(reader))[0].shape)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 16, 16, 1)"
    assert log.read_text() == "ran\n"


# ---- tf.data -------------------------------------------------------------------------------------------

def test_dataset_has_an_explicit_signature_and_the_same_batches(dbs):
    import tensorflow as tf

    with ImageReader(dbs["ids"], batch_size=3, workers=1, mode="eval") as reader:
        dataset = reader.dataset()
        images_spec, masks_spec = dataset.element_spec
        assert images_spec.shape.as_list() == [None, 16, 16, 1] and images_spec.dtype == tf.float32
        assert masks_spec.shape.as_list() == [None, 16, 16] and masks_spec.dtype == tf.int32
        for _ in range(2):  # every iteration of the dataset is one full pass
            got = [i for images, _ in dataset for i in ids(images.numpy())]
            assert got == list(range(12))
    with ImageReader(dbs["ids"], batch_size=4, workers=1, augment=False) as reader:
        images_spec, _ = reader.dataset().element_spec
        assert images_spec.shape.as_list() == [4, 16, 16, 1]
        images, masks = next(iter(reader.dataset()))
        assert images.shape == (4, 16, 16, 1) and masks.dtype == tf.int32
