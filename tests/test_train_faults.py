"""train_unet.py under faults (issue #17, training part): a locked output folder, unwritable outputs, a full
disk, damaged saved state, absurd numbers, the checkpoint/export swaps, signals during a save, reader failures.
docs/faults.md lists what each guarantees."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import UNWRITABLE_KINDS, one_error_line, unwritable_output
from test_train import argv, dbs, pointer, state  # noqa: F401  (dbs: the module fixture)

import train_unet
from segkit import cliutil
from segkit.training import checkpoints, export
from segkit.training.checkpoints import CheckpointStore, RunState


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1. one run per output folder


def test_a_second_run_on_a_locked_output_folder_is_refused_in_one_line(dbs, tmp_path, capsys):
    out = tmp_path / "run"
    with cliutil.FolderLock(str(out)):  # a running train_unet.py holds it (flock is per open file)
        assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 2
        line = one_error_line(capsys)
    assert f"--output_dir {out} is in use by process {os.getpid()} on {socket.gethostname()}" in line
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written, the holder's files untouched


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(dbs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {dead_pid()}\n")
    assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 0
    assert pointer(out)["step"] == 2


def test_the_lock_text_decides_where_flock_is_unsupported(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead_pid()}\n")
    cliutil.FolderLock(str(tmp_path)).acquire().release()  # stale: taken over
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    with pytest.raises(cliutil.InputError, match=f"in use by process {os.getpid()}"):
        cliutil.FolderLock(str(tmp_path)).acquire()
    (tmp_path / ".lock").write_text("some-other-node 1\n")
    with pytest.raises(cliutil.InputError, match="in use by process 1 on some-other-node"):
        cliutil.FolderLock(str(tmp_path)).acquire()


# ----------------------------------------------------------------------------- 2. unwritable output locations


@pytest.mark.parametrize("kind", UNWRITABLE_KINDS)
def test_an_output_folder_that_cannot_be_written_is_refused_in_one_line(dbs, tmp_path, capsys, kind):
    out, expected = unwritable_output(tmp_path, kind, "run")
    assert train_unet.main(argv(dbs, out, "--max_steps", 2)) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------- 3. full disk


@pytest.mark.slow
@pytest.mark.parametrize("error", ["ENOSPC", "TensorFlow"])
def test_a_full_disk_while_checkpointing_keeps_the_last_complete_checkpoint(dbs, tmp_path, capsys, monkeypatch, error):
    written = []
    original = CheckpointStore._write

    def write(checkpoint, tmp, run_state):
        if written:
            if error == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            import tensorflow as tf
            raise tf.errors.ResourceExhaustedError(None, None, f"{tmp}/ckpt; No space left on device")
        original(checkpoint, tmp, run_state)
        written.append(run_state.step)

    monkeypatch.setattr(CheckpointStore, "_write", staticmethod(write))
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 6, "--test_every_n_steps", 2)) == 1
    line = one_error_line(capsys)
    assert "no space left on " in line and "needed about " in line and "MB" in line
    assert "the last complete checkpoint (step 2) is kept" in line
    assert pointer(out)["latest"] == "ckpt-000000002" and state(out, "ckpt-000000002")["step"] == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint.json", "ckpt-000000002"]  # no temporary left
    assert not (out / "saved_model").exists()


@pytest.mark.slow
def test_a_full_disk_while_exporting_keeps_the_checkpoints(dbs, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_swap_in", full)
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 1
    assert "no space left on " in one_error_line(capsys)
    assert pointer(out)["best"] == "ckpt-000000002"
    assert not [n for n in os.listdir(out) if n.startswith(".saved_model")]


# ----------------------------------------------------------------------------- 4. damaged saved state


@pytest.fixture(scope="module")
def finished(dbs, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 2, "--test_every_n_steps", 2)) == 0
    return out


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "pointer not JSON": (lambda d: (d / "checkpoints/checkpoint.json").write_text("{"), "checkpoint.json: unreadable"),
    "pointer field": (lambda d: (d / "checkpoints/checkpoint.json").write_text('{"latest": 5, "step": 2}'),
                      "checkpoint.json: the field 'latest' must name a checkpoint folder"),
    "pointer names a missing folder": (
        lambda d: (d / "checkpoints/checkpoint.json").write_text('{"latest": "ckpt-000000007", "step": 7}'),
        "the field 'latest' names ckpt-000000007, which is missing"),
    "pointer step": (lambda d: (d / "checkpoints/checkpoint.json").write_text(
        '{"latest": "ckpt-000000002", "best": null, "step": "two"}'), "the field 'step' must be an integer"),
    "state field missing": (lambda d: _edit_state(d, lambda s: s.pop("history")),
                            "state.json: the field 'history' is missing"),
    "state field type": (lambda d: _edit_state(d, lambda s: s.update(step=-4)),
                         "state.json: the field 'step' must be an integer >= 0"),
    "state not JSON": (lambda d: (d / "checkpoints/ckpt-000000002/state.json").write_text("[1,"),
                       "state.json: not JSON"),
    "config field": (lambda d: _edit_json(d / "config.json", lambda c: c.update(test_every_n_steps=0)),
                     "config.json: the field 'test_every_n_steps' must be >= 1"),
    "checkpoint data truncated": (lambda d: [_truncate(p) for p in (d / "checkpoints/ckpt-000000002").glob("ckpt.data-*")],
                                  "ckpt: the checkpoint files are damaged or incomplete"),
    "checkpoint index missing": (lambda d: os.remove(d / "checkpoints/ckpt-000000002/ckpt.index"),
                                 "ckpt: the checkpoint files are damaged or incomplete"),
    "metrics.csv": (lambda d: (d / "metrics.csv").write_text("step,x\nnot-a-step,1\n"), "metrics.csv: unreadable"),
}


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_state(d, change):
    _edit_json(d / "checkpoints/ckpt-000000002/state.json", change)


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_saved_state_is_named_with_its_field_in_one_line(dbs, finished, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    apply, expected = DAMAGE[damage]
    apply(out)
    capsys.readouterr()
    assert train_unet.main(argv(dbs, out, "--max_steps", 4, "--test_every_n_steps", 2)) == 2
    assert expected in one_error_line(capsys)


# ----------------------------------------------------------------------------- 5. numbers


@pytest.mark.parametrize("flag, value", [
    ("--dropout", "nan"), ("--dropout", "1.5"), ("--dropout", "-0.1"), ("--seed", "-1"), ("--seed", str(2 ** 40)),
    ("--crop_size", "0"), ("--crop_size", str(10 ** 9)), ("--ema_decay", "nan"), ("--learning_rate", "inf"),
    ("--learning_rate", "nan"), ("--batch_size", str(10 ** 9)), ("--reader_count", "100000"), ("--max_minutes", "nan"),
    ("--max_minutes", "inf"), ("--depth", "100"), ("--base_filters", "0"), ("--number_classes", str(10 ** 7)),
    ("--class_weights", "1,nan,1"), ("--class_weights", "1,inf,1"), ("--clip_norm", "-1"), ("--clip_norm", "nan"),
])
def test_every_numeric_flag_is_checked_against_nan_infinity_and_absurd_sizes(dbs, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    args = [a for a in argv(dbs, out, "--max_steps", 2) ]
    if flag in args:  # replace TINY's value
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert train_unet.main(args) == 2
    assert flag in one_error_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. swaps, signals, readers


class FakeCheckpoint:
    def write(self, prefix):
        with open(prefix + ".index", "w") as fh:
            fh.write("weights")


def test_saving_the_same_step_again_never_removes_the_folder_the_pointer_names(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), is_chief=True)
    store.save(FakeCheckpoint(), RunState(step=5), best=True)
    real_rename = os.rename

    def failing_rename(src, dst):  # the crash between removing and renaming in, made an exception
        if ".ckpt-000000005" in str(src):
            raise OSError(errno.EIO, "simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        store.save(FakeCheckpoint(), RunState(step=5), best=True)
    monkeypatch.setattr(os, "rename", real_rename)
    named = checkpoints.read_pointer(str(tmp_path))  # checks that the folder it names exists
    assert named["latest"] == "ckpt-000000005" and store.load_state(named["latest"]).step == 5
    again = store.save(FakeCheckpoint(), RunState(step=5), best=False)  # a new name, then the old one goes
    assert os.path.basename(again) == "ckpt-000000005-1"
    assert sorted(os.listdir(store.folder)) == ["checkpoint.json", "ckpt-000000005", "ckpt-000000005-1"]  # best kept


def test_collect_garbage_leaves_other_processes_temporaries_alone(tmp_path):
    store = CheckpointStore(str(tmp_path), is_chief=True)
    busy = tmp_path / "checkpoints" / f".ckpt-000000009.tmp-{socket.gethostname()}-1-abcdefgh"
    busy.mkdir()
    store.save(FakeCheckpoint(), RunState(step=1), best=True)
    assert busy.is_dir()


def test_a_failed_swap_restores_the_previous_saved_model_and_leftovers_are_cleaned_at_start(tmp_path, monkeypatch):
    final, new = tmp_path / "saved_model", tmp_path / "new"
    final.mkdir()
    (final / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    real_rename = os.rename

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        export._swap_in(str(new), str(final))
    monkeypatch.setattr(os, "rename", real_rename)
    assert (final / "v").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["new", "saved_model"]
    # killed between moving aside and renaming in: restored at the next start; else removed
    os.rename(final, tmp_path / f".saved_model.old-{socket.gethostname()}-{dead_pid()}")
    export.remove_stale_swaps(str(tmp_path))
    assert (final / "v").read_text() == "1"
    (tmp_path / f"saved_model.old-{dead_pid()}").mkdir()  # the previous code's name
    export.remove_stale_swaps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["new", "saved_model"]


@pytest.mark.slow
def test_a_second_signal_during_the_interrupted_save_waits_for_it(dbs, tmp_path, monkeypatch, capsys):
    from segkit.training import loop

    original_check, original_save = loop.Loop._check_finite, CheckpointStore.save

    def check(self, out):
        original_check(self, out)
        if self.state.step == 4:  # the 5th step: a SIGTERM between test passes
            os.kill(os.getpid(), signal.SIGTERM)

    def save(self, checkpoint, run_state, best):
        if run_state.step == 5:  # the interrupted save: a second SIGTERM lands inside it
            os.kill(os.getpid(), signal.SIGTERM)
        return original_save(self, checkpoint, run_state, best)

    monkeypatch.setattr(loop.Loop, "_check_finite", check)
    monkeypatch.setattr(CheckpointStore, "save", save)
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 100, "--test_every_n_steps", 4)) == 130
    assert pointer(out)["step"] == 5 and pointer(out)["best"] == "ckpt-000000004"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_reader_failure_is_recognised_by_its_type(dbs, tmp_path, monkeypatch, capsys):
    import imagereader

    class FailingReader(imagereader.ImageReader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if self.mode == "train" and i == 3:
                    raise imagereader.ReaderWorkerError("reader worker 0 (pid 1) failed:\nValueError: disk gone")
                yield batch

    monkeypatch.setattr(imagereader, "ImageReader", FailingReader)
    out = tmp_path / "run"
    assert train_unet.main(argv(dbs, out, "--max_steps", 20, "--test_every_n_steps", 2)) == 1
    err = capsys.readouterr().err
    assert "error: the image reader failed; training stopped (the last checkpoint, step 2, is kept)" in err
    assert "ValueError: disk gone" in err and "Traceback" not in err
