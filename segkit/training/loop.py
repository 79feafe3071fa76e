"""The training run: :func:`train` wires a :class:`Run` (trainer, readers, checkpoints, logs) and drives
its :class:`Loop` (steps, test passes, stop reasons, NaN guard, Ctrl-C / SIGTERM between steps), then
exports the best weights. README.md, "Stage 2", describes schedule, outputs, resume and exit codes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from segkit import cliutil, metrics
from segkit.training import export
from segkit.training.checkpoints import CheckpointStore, MetricsCsv, RunState, check_same_precision
from segkit.training.config import CONFIG_FILENAME, RunConfig, config_view
from segkit.training.resolve import training_instances
from segkit.training.summaries import Summaries
from segkit.training.trainer import Trainer, distribute, learning_rate_at, make_readers, make_strategy, set_precision

log = logging.getLogger(__name__)
logging.getLogger("absl").setLevel(logging.WARNING)  # per-checkpoint "Sharding callback" chatter


class TrainingDiverged(RuntimeError):
    """The loss (or a gradient) became NaN/Inf."""


class ReaderFailed(cliutil.FaultError):
    """An image reader worker failed (its ReaderWorkerError, recorded by trainer.distribute before tf.data
    wrapped it); the message carries the worker's traceback tail."""


@dataclass
class Outcome:
    step: int
    stopped: str
    best_loss: float
    best_step: int
    saved_model: str | None
    history: list[dict[str, Any]]


def stop_reason(state: RunState, config: RunConfig | Mapping[str, Any], time_up: bool = False) -> str | None:
    """Why the run stops now (--max_steps reached, the --max_minutes budget spent, early stopping), or None.
    ``config``: a RunConfig, or a mapping with max_steps and early_stopping."""
    c = config_view(config)
    if c.max_steps is not None and state.step >= c.max_steps:
        return f"reached --max_steps {c.max_steps}"
    if time_up:
        return f"spent the --max_minutes {getattr(c, 'max_minutes', None):g} budget at step {state.step}"
    if c.early_stopping and state.evals_without_improvement >= c.early_stopping:
        return (f"early stopping: no test-loss improvement in {state.evals_without_improvement} test passes "
                f"(best {state.best_loss:.5f} at step {state.best_step})")
    return None


def train(config: RunConfig | Mapping[str, Any], *, resume: bool, strategy=None, worker_index: int = 0,
          worker_count: int = 1, is_chief: bool = True, reader_factory=None) -> Outcome:
    """Train (or continue) the run described by ``config`` (see ``resolve_config``); export on success.

    ``config``: a RunConfig, or its config.json form as a dict. ``strategy``: a tf.distribute strategy
    (default: :func:`make_strategy`). ``reader_factory``: ImageReader-compatible class (tests).
    Raises TrainingDiverged on NaN/Inf, KeyboardInterrupt after a Ctrl-C / SIGTERM has been handled.
    """
    if not isinstance(config, RunConfig):
        config = RunConfig.from_dict(config, source="train(config)")
    if strategy is None:
        strategy, worker_index, worker_count, is_chief = make_strategy()
    mixed = set_precision(config.mixed_precision)
    config = dataclasses.replace(config, replicas=strategy.num_replicas_in_sync, workers=worker_count,
                                 global_batch_size=config.batch_size * strategy.num_replicas_in_sync,
                                 mixed_precision_active=mixed)
    if resume:
        check_same_precision(config.output_dir, mixed)
    lock = cliutil.FolderLock(config.output_dir).acquire() if is_chief else None  # only the chief writes outputs
    try:
        return _train_locked(config, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory) -> Outcome:
    if is_chief:
        export.remove_stale_swaps(config.output_dir)
        with cliutil.disk_space_guard(config.output_dir, CONFIG_FILENAME, lambda: 1e5, "nothing was trained"):
            config.save(os.path.join(config.output_dir, CONFIG_FILENAME))
    log.info("%s on %d replica(s) x %d worker(s), global batch %d, crop %s", config.model, config.replicas,
             worker_count, config.global_batch_size, list(config.crop_size))
    run = Run(config, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory)
    stop = StopRequest()
    try:
        with stop.installed():  # kept through the interrupted save: a second signal waits for it
            reason = _until_stopped(run, stop)
            if stop.signal_name:
                with stop.deferred():
                    run.save_interrupted(stop.signal_name)
    finally:
        run.close()
    if stop.signal_name:
        raise KeyboardInterrupt  # exit 130 (cliutil.run_cli); nothing is exported
    run.release()
    log.info("stopped at step %d: %s", run.state.step, reason)
    saved = None
    pointer = run.store.pointer() if is_chief else None
    if pointer and pointer.get("best"):
        saved = export.export_saved_model(config, run.store.prefix(pointer["best"]), config.output_dir,
                                          run.state.best_metrics)
    return Outcome(run.state.step, reason, run.state.best_loss, run.state.best_step, saved, run.state.history)


def _until_stopped(run: Run, stop: StopRequest) -> str:
    """The loop, with a reader failure (wrapped by tf.data into some other error) raised as ReaderFailed."""
    try:
        return Loop(run).until_stopped(stop)
    except Exception:
        failure = next((r.failure for r in run.readers if getattr(r, "failure", None) is not None), None)
        if failure is None:
            raise
        raise ReaderFailed(f"the image reader failed; training stopped (the last checkpoint, step "
                           f"{run.last_saved_step()}, is kept):\n{str(failure)[:3000]}") from None


class Run:
    """What one training run holds: trainer, readers, checkpoint store, state, metrics.csv, TensorBoard."""

    def __init__(self, config: RunConfig, strategy, worker_index, worker_count, is_chief, mixed, resume, reader_factory):
        self.config, self.strategy, self.is_chief = config, strategy, is_chief
        out = config.output_dir
        self.trainer = Trainer(config, strategy, mixed)
        self.store = CheckpointStore(out, is_chief)
        self.store.size_hint = self.trainer.checkpoint_bytes()
        self.state = RunState()
        if resume:
            self._restore(CheckpointStore(out, True))
        self.csv = MetricsCsv(os.path.join(out, "metrics.csv"), self.state.step if resume else None, is_chief)
        self.summaries = Summaries(out, is_chief, (training_instances(config) or {}).get("target"))
        self.test_data = None
        try:
            local_replicas = len(strategy.extended.worker_devices)  # this machine's share of the replicas
            self.readers = make_readers(config, local_replicas, worker_index, worker_count,
                                        self.state.step, reader_factory)
        except ValueError as exc:  # e.g. fewer test batches than workers
            raise cliutil.InputError(str(exc)) from None

    def _restore(self, chief_store: CheckpointStore) -> None:
        pointer = chief_store.pointer()
        self.state = chief_store.load_state(pointer["latest"])
        prefix = chief_store.prefix(pointer["latest"])
        import tensorflow as tf

        try:  # truncated or missing shards: NotFound / DataLoss / OutOfRange; other variables: AssertionError
            self.trainer.checkpoint.read(prefix).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError, IndexError, OSError) as exc:  # IndexError: truncated
            first = " ".join(str(exc).split())[:200]
            raise cliutil.InputError(f"{prefix}: the checkpoint files are damaged or incomplete ({type(exc).__name__}: "
                                     f"{first}); restore them, move {os.path.dirname(os.path.dirname(prefix))} aside "
                                     "or use a new --output_dir") from None
        log.info("resuming from step %d (best test loss %.5f at step %d, %d test passes so far)",
                 self.state.step, self.state.best_loss, self.state.best_step, len(self.state.history))

    def last_saved_step(self) -> str:
        pointer = self.store.pointer()
        return str(pointer["step"]) if pointer else "none yet"

    def save_interrupted(self, signal_name: str) -> None:
        """Ctrl-C / SIGTERM (pre-emption): keep the steps since the last test pass as the 'latest' checkpoint,
        so a resubmitted job loses nothing finished, not up to --test_every_n_steps. It is not a test pass:
        'best', the history and early stopping are unchanged. A second signal waits for it
        (StopRequest.deferred). Single worker only: under the multi-worker strategy a save
        is a collective step the other workers may never reach."""
        if self.config.workers > 1 or not self.is_chief or self.state.step == 0:
            return
        if (self.store.pointer() or {}).get("step") == self.state.step:
            return  # saved by the test pass of this very step
        self.trainer.step.assign(self.state.step)
        started = time.perf_counter()
        self.store.save(self.trainer.checkpoint, self.state, best=False)
        log.info("%s: saved the checkpoint of step %d (%.1f s); rerun the same command to continue",
                 signal_name, self.state.step, time.perf_counter() - started)

    def close(self) -> None:
        for reader in getattr(self, "readers", ()):
            reader.close()
        if hasattr(self, "summaries"):
            self.summaries.flush()
        if not self.is_chief:
            shutil.rmtree(self.store.folder, ignore_errors=True)

    def release(self) -> None:
        """Drop the input pipelines so the closed readers (and their semaphores) are freed now, not at exit."""
        self.readers = ()
        self.test_data = None
        gc.collect()


class Loop:
    """The steps of a :class:`Run`: learning rate, train step, NaN guard, progress, test passes."""

    def __init__(self, run: Run):
        self.run, self.config, self.trainer = run, run.config, run.trainer
        self.state = run.state
        self.last_train_loss = float("nan")
        self.started = time.perf_counter()
        self.seconds_before = self.state.train_seconds  # earlier invocations of this run (resume)
        self.time_up = False
        self.budget_spent = 0.0  # fraction of --max_minutes spent (agreed by the workers): cosine's progress
        self.last_test_seconds = 0.0
        self.stop: StopRequest | None = None

    def until_stopped(self, stop: StopRequest | None = None) -> str:
        """Train until a stop reason (or until ``stop`` is requested: checked between steps)."""
        self.started = time.perf_counter()
        self.seconds_before = self.state.train_seconds
        if self.config.max_minutes is not None:  # the same on every worker: state.json is the chief's
            self.budget_spent = self.seconds_before / (60.0 * self.config.max_minutes)
            self.time_up = self.budget_spent >= 1.0
            if self.seconds_before > 0:
                log.info("--max_minutes %g: %.1f minutes spent before this invocation", self.config.max_minutes,
                         self.seconds_before / 60.0)
        self.stop = stop
        train_reader, test_reader = self.run.readers
        self.run.test_data = distribute(self.run.strategy, test_reader)
        iterator = iter(distribute(self.run.strategy, train_reader))
        meter = Meter(train_reader)
        every = self.config.test_every_n_steps
        with progress_bar(self.state.step, self.config.max_steps) as bar, _logs_above(bar):
            return self._steps(stop, iterator, meter, every, bar)

    def _steps(self, stop, iterator, meter: Meter, every: int, bar) -> str:
        lr = None
        while (reason := stop_reason(self.state, self.config, self.time_up)) is None:
            if stop is not None and stop.signal_name:
                return f"interrupted by {stop.signal_name}"
            if learning_rate_at(self.state.step, self.config, self.budget_spent) != lr:
                lr = learning_rate_at(self.state.step, self.config, self.budget_spent)
                self.trainer.set_learning_rate(lr)
            asked = time.perf_counter()
            batch = next(iterator)
            started = time.perf_counter()
            out = {k: float(v) for k, v in self.trainer.train_step(batch).items()}
            meter.add(out, started - asked, time.perf_counter() - started)
            self._check_finite(out)
            self.state.step += 1
            self.state.train_seconds = self._seconds()  # what every checkpoint of this step records
            self.trainer.step.assign(self.state.step)
            bar.update(1)
            if self.state.step % min(100, every) == 0:
                self._log_train(meter, lr)
            self.time_up = self._budget_spent()
            if self.state.step % every == 0 or self._last_step() or self.time_up:
                self._test_pass()
        return reason

    def _last_step(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def _seconds(self) -> float:
        """Training time of this run so far (steps and test passes), earlier invocations included."""
        return self.seconds_before + time.perf_counter() - self.started

    def _budget_spent(self) -> bool:
        """--max_minutes: stop once the training time plus one more test pass (the final one, as long as
        the last one took) would exceed the budget; also update :attr:`budget_spent`, the fraction of the
        budget spent (cosine's progress). Every worker must stop at the same step and use the same learning
        rate, so under the multi-worker strategy the workers agree (all-reduces of the largest time) at
        each log interval, and keep the agreed values in between."""
        budget = self.config.max_minutes
        if budget is None:
            return False
        spent, with_test = self._seconds(), self._seconds() + self.last_test_seconds
        if self.config.workers and self.config.workers > 1:
            if self.state.step % min(100, self.config.test_every_n_steps):
                return False
            spent, with_test = self.trainer.max_over_replicas(spent), self.trainer.max_over_replicas(with_test)
        self.budget_spent = spent / (60.0 * budget)
        return with_test >= 60.0 * budget

    def _check_finite(self, out: dict[str, float]) -> None:
        if not math.isfinite(out["loss"]) or out["finite_grads"] < 0.999:
            what = "loss" if not math.isfinite(out["loss"]) else "gradient"
            raise TrainingDiverged(
                f"the training {what} became NaN/Inf at step {self.state.step + 1}; stopped without saving. "
                f"The last good checkpoint (step {self.run.last_saved_step()}) is kept in {self.run.store.folder}; "
                "lower --learning_rate, try --loss ce, or check the databases for NaN/Inf pixels")

    def _log_train(self, meter: Meter, lr: float) -> None:
        summary = meter.flush()
        self.run.summaries.train(self.state.step, summary, lr)
        log.info("step %d  loss %.4f  acc %.4f  lr %.2g  %.3f s/step (input %.1f ms)  reader starved on %.0f%% of batches",
                 self.state.step, summary["loss"], summary["accuracy"], lr, summary["step_seconds"],
                 1000 * summary["fetch_seconds"], 100 * summary["starved_fraction"])
        self.last_train_loss = summary["loss"]

    def _test_pass(self) -> None:
        started = time.perf_counter()
        loss, result, first = self.trainer.evaluate(self.run.test_data)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the test loss became NaN/Inf at step {self.state.step}; stopped without saving. "
                                   f"The last good checkpoint (step {self.run.last_saved_step()}) is kept; lower --learning_rate")
        improved = self.state.record(self.state.step, loss, result)
        self.state.train_seconds = self._seconds()
        with self.stop.deferred() if self.stop is not None else contextlib.nullcontext():
            self.run.store.save(self.trainer.checkpoint, self.state, best=improved)
        row = metrics.flat_row({"step": self.state.step, "train_loss": self.last_train_loss,
                                "test_loss": loss, "best": int(improved), "test_pixels": result["pixels"],
                                "elapsed_s": round(time.perf_counter() - self.started, 1)}, result)
        with cliutil.disk_space_guard(self.config.output_dir, "metrics.csv", lambda: 1e5,
                                      f"the checkpoint of step {self.state.step} is saved"):
            self.run.csv.append(row)
        self.run.summaries.test(self.state.step, loss, result, first, self.trainer.predict)
        self.last_test_seconds = time.perf_counter() - started
        log.info("test pass at step %d: loss %.5f%s, pixel accuracy %.4f, IoU %s, Dice %s (%.1f s)",
                 self.state.step, loss, " (best)" if improved else f" (best {self.state.best_loss:.5f})",
                 result["pixel_accuracy"], _fmt(result["iou"]), _fmt(result["dice"]), time.perf_counter() - started)


def progress_bar(start_step: int, max_steps: int | None, stream=None):
    """A tqdm bar of training steps with ETA (to --max_steps, else a rate) on a terminal; disabled (the
    step log lines only, as in batch-job logs) when ``stream`` (default stderr) is not a terminal."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    return tqdm(total=max_steps, initial=start_step, desc="training", unit="step", file=stream,
                dynamic_ncols=True, disable=not _isatty(stream))


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _logs_above(bar):
    """Log lines printed above an active bar instead of through it."""
    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


class Meter:
    """Running means between train log lines: loss, accuracy, seconds per step, input fetch time, and
    the fraction of the reader's batches that found no batch ready (its ``batches_starved`` counter)."""

    def __init__(self, reader=None):
        self.reader = reader
        self.reset()

    def _reader_counts(self) -> tuple[int, int]:
        return (getattr(self.reader, "batches_delivered", 0), getattr(self.reader, "batches_starved", 0))

    def reset(self):
        self.steps = 0
        self.loss = self.correct = self.pixels = self.compute = self.fetch = 0.0
        self.counts = self._reader_counts()

    def add(self, out: dict[str, float], fetch: float, compute: float) -> None:
        self.steps += 1
        self.loss += out["loss"]
        self.correct += out["correct"]
        self.pixels += out["pixels"]
        self.compute += compute + fetch
        self.fetch += fetch

    def flush(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        delivered, starved = (now - before for now, before in zip(self._reader_counts(), self.counts))
        summary = {"loss": self.loss / steps, "accuracy": self.correct / max(self.pixels, 1.0),
                   "step_seconds": self.compute / steps, "fetch_seconds": self.fetch / steps,
                   "starved_fraction": starved / max(delivered, 1)}
        self.reset()
        return summary


class StopRequest:
    """Ctrl-C / SIGTERM during training: the first one asks the loop to stop at the next step boundary
    (then the run saves, closes its readers and exits 130); a second one raises KeyboardInterrupt at once.

    Raising from a signal handler in the middle of a TensorFlow call can leave native state half
    updated (a crash in free() was seen); stopping between steps never does.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.saving = False

    def _handle(self, signum, frame):
        if self.signal_name and not self.saving:
            raise KeyboardInterrupt
        if self.saving and self.signal_name:
            log.warning("%s received: finishing the checkpoint being written first", signal.Signals(signum).name)
            return
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after the current step (again to stop at once)", self.signal_name)

    @contextlib.contextmanager
    def deferred(self):
        """A checkpoint is being written: a second signal waits for it (an exception raised inside TensorFlow's
        write could leave native state half updated); a first one still stops after it."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def installed(self):
        """The block in which Ctrl-C / SIGTERM come here (cliutil.signals_handled)."""
        return cliutil.signals_handled(self._handle)
