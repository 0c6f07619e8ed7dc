"""Ultralytics callbacks and the job's stop signal: what happens while Ultralytics trains.

Owns: StopSignal (SIGTERM, SIGINT and the backend's cancellation, acted on at safe points, with
one shutdown deadline) and EpochReporter, which turns each epoch into the contract's callbacks
(sent once the epoch's last.pt is in storage, by checkpoints.CheckpointUploader) and MLflow points. The reporter survives
Ultralytics' multi-GPU relaunch: it is pickled into the DDP workers, where it makes its own clients.
Environment (through Settings): CHECKPOINT_INTERVAL, SHUTDOWN_TIMEOUT, VALIDATION_IMAGES,
VALIDATION_CONF; RANK (set by torch.distributed in DDP workers).
Imports: utils, config, storage, backend, checkpoints, outbox, tracking, validation, progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from backend import Backend
from checkpoints import CheckpointUploader
from config import Settings
from outbox import Outbox
from progress import epoch_summary
from storage import Storage
from tracking import Tracker
from utils import EXIT_CANCELLED, EXIT_OK, Cancelled, Redactor, within
from validation import ValidationCapture, contract_metrics, epoch_report, finite_floats, sequential_val_loader

LOGGER = logging.getLogger("trainer")

class StopSignal:
    """Where SIGTERM/SIGINT and the backend's cancellation meet the job.

    The signal handler only records the request; the job acts on it at safe points: between
    setup steps, in storage transfers (their progress callback), and after a training or
    validation batch, never while Ultralytics writes a checkpoint. (Raising from the handler is
    unsafe: inside a boto3 request botocore takes the exception for a network fault and retries.)

    From the request on, one deadline, SHUTDOWN_TIMEOUT after it, bounds everything the job still
    does: each clean-up step gets what is left, and a watchdog thread ends the process at the
    deadline if a step will not, after `on_deadline` (the job's last report) had its last seconds.
    Phases: setup and training (a stop raises Cancelled at the next safe point), ddp (the workers
    are told to stop), finishing (training is over: the job completes if it can before the
    deadline), completed (reported so: what is left is MLflow's bookkeeping, and the job exits 0
    even when the deadline cuts it short), cleanup (the job is reporting how it ended).
    """

    LAST_WORDS = 3.0  # seconds the watchdog keeps before the deadline for the job's last report

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.reason: str | None = None
        self.phase = "setup"
        self.deadline: float | None = None
        self.on_deadline: Callable[[], None] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def request(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self.deadline = time.monotonic() + self.timeout
        LOGGER.warning("stop requested (%s) during %s; exiting within %g s", reason, self.phase, self.timeout,
                       extra={"local_only": True})  # perhaps in a signal handler: not through the callback client
        threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()
        if self.phase == "ddp":
            stop_workers()

    def check(self) -> None:
        """Raise Cancelled if a stop was requested and this phase may stop."""
        if self.reason and self.phase in ("setup", "training"):
            raise Cancelled(self.reason)

    def remaining(self, reserve: float = 0.0, default: float = math.inf) -> float:
        """Seconds left before the deadline, less `reserve`; `default` when no stop was requested."""
        if self.deadline is None:
            return default
        return max(0.0, self.deadline - time.monotonic() - reserve)

    def _on_signal(self, signum: int, frame) -> None:
        self.request(f"received {signal.Signals(signum).name}")

    def _watchdog(self) -> None:
        time.sleep(self.remaining(self.LAST_WORDS))
        LOGGER.error("shutdown did not finish within SHUTDOWN_TIMEOUT=%g s; exiting now", self.timeout)
        if self.on_deadline:
            within(self.remaining(0.5), self.on_deadline)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_OK if self.phase == "completed" else EXIT_CANCELLED)  # a job reported completed succeeded


def stop_workers() -> None:
    """Multi-GPU: SIGTERM to the torch.distributed launcher and its workers, our child processes."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()


class EpochReporter:
    """Ultralytics callbacks: report each epoch, upload its checkpoints, stop on request.

    After each epoch's validation it builds the contract's `validation-results` body (with the
    per-image results taken from inside that validation, see validation.py) and `training-metrics`
    row, and sends them once that epoch's `last.pt` is in storage: every `checkpoint_path` the
    backend holds then resolves, and a job killed at any moment and started again resumes after the
    last epoch the backend has seen, never reporting an epoch twice. Progress and MLflow go at once.

    `on_fit_epoch_end` runs after every epoch and once more for the final evaluation of
    best.pt; only the first kind follows an `on_train_epoch_end` for the same epoch, which
    is how the final evaluation is told apart and kept as the job's final metrics.

    Multi-GPU: Ultralytics pickles these callbacks (cloudpickle) into every DDP worker. The
    live clients are not pickled: a worker makes its own backend sender, uploader and MLflow
    client for the same run on first use, only rank 0 reports anything, and rank 0 flushes
    what it queued when training ends.
    """

    def __init__(self, settings: Settings, redact: Redactor, backend: Backend, tracker: Tracker, stop: StopSignal):
        self.settings = settings
        self.redact = redact
        self.event_log = backend.event_log
        self.tracker = tracker
        self.stop = stop
        self.dataset_root: Path | None = None  # image names in per-image results are relative to it
        self._backend: Backend | None = backend
        self._uploader: CheckpointUploader | None = None
        self._outbox: Outbox | None = None
        self._saved: tuple[dict, int, dict] | None = None  # this epoch's checkpoint files, uploaded once reported
        self._own_clients = False  # made in this process (a DDP worker): flushed at on_train_end
        self.epochs_completed = 0
        self.total_epochs = settings.epochs
        self.last_metrics: dict = {}
        self.final_metrics: dict | None = None
        self._pending: tuple[int, dict] | None = None
        self._capture: ValidationCapture | None = None
        self._unsent: dict[int, dict] = {}  # epoch -> its reports (as the outbox holds them), until its last.pt is stored
        self._stored_epoch = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None, "_uploader": None, "_outbox": None, "_capture": None,
                "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = Backend(self.settings.backend, self.redact, self.event_log)
            self._own_clients = True
        return self._backend

    @property
    def uploader(self) -> CheckpointUploader:
        if self._uploader is None:
            self.use_storage(Storage(self.settings.storage))
        return self._uploader

    @property
    def uploading(self) -> bool:
        """True once checkpoint uploads have started (train.py's storage client is in use)."""
        return self._uploader is not None

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self.use_storage(Storage(self.settings.storage))
        return self._outbox

    def use_storage(self, storage: Storage) -> None:
        """Upload checkpoints with this storage client (train.py's own; a DDP worker makes one)."""
        self._outbox = Outbox(storage, self.settings.checkpoint_prefix, enabled=bool(self.settings.backend.url))
        self._uploader = CheckpointUploader(storage, self.settings, self.backend, on_stored=self.checkpoint_stored,
                                            before_last=self._outbox.write)

    def send_owed(self, epochs_done: int) -> None:
        """Before anything else of a job started again: the reports an earlier attempt stored with its
        last.pt (of `epochs_done` epochs) but may not have delivered, sent again under their event_ids."""
        owed = self.outbox.owed(epochs_done)
        if owed:
            LOGGER.info("sending again the reports of epoch(s) %s that the last attempt may not have delivered",
                        ", ".join(str(e["epoch"]) for e in owed))
        for entry in owed:
            self._send(entry)

    @staticmethod
    def reports() -> bool:
        """Only one process reports: the single process, or rank 0 of a DDP run."""
        return int(os.environ.get("RANK", -1)) in (-1, 0)

    def callbacks(self) -> dict:
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_start": self.on_train_start,
            "on_train_batch_end": self.on_batch_end,
            "on_val_start": self.on_val_start,
            "on_val_batch_end": self.on_batch_end,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_train_end": self.on_train_end,
            "teardown": self.on_train_end,
        }

    def on_pretrain_routine_end(self, trainer) -> None:
        self.total_epochs = trainer.epochs
        self.epochs_completed = trainer.start_epoch
        with self._lock:  # a resumed job's epochs so far are in storage: its last.pt is what it resumed from
            self._stored_epoch = max(self._stored_epoch, trainer.start_epoch)
        if trainer.args.task == "classify" and self.settings.validation_images:
            sequential_val_loader(trainer)  # so per-image results can name their images
        if not self.reports():
            return
        self.tracker.log_params({k: v for k, v in vars(trainer.args).items() if v is not None})
        if trainer.start_epoch:
            self.backend.log(f"resumed training at epoch {trainer.start_epoch + 1} of {trainer.epochs}",
                             epoch=trainer.start_epoch + 1)
            # sent by the process that reports the epochs to come (in DDP, rank 0's worker): one writer
            # of reports.json per job at a time
            self.send_owed(trainer.start_epoch)

    def on_train_start(self, trainer) -> None:
        self.stop.check()
        self.stop.phase = "training"

    def on_batch_end(self, _) -> None:
        self.stop.check()

    def on_val_start(self, validator) -> None:
        """An epoch's validation (not the final evaluation of best.pt): ride along to collect results."""
        if not validator.training or not self.reports():
            if self._capture:
                self._capture.stop()
            return
        if self._capture is None:
            self._capture = ValidationCapture(self.dataset_root, self.settings.validation_images,
                                              self.settings.validation_conf)
        self._capture.attach(validator)
        self._capture.start()

    def on_train_epoch_end(self, trainer) -> None:
        train = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.lr}
        self._pending = (trainer.epoch, finite_floats(train))
        if self._uploader:  # this epoch's save will rewrite last.pt: a checkpoint still waiting is copied now
            self._uploader.secure()

    def on_model_save(self, trainer) -> None:
        """Ultralytics just wrote last.pt (and best.pt if this epoch is the best): upload them."""
        if not self.reports():
            return
        if trainer.stop and int(os.environ.get("RANK", -1)) == -1:
            return  # the last epoch: train.py uploads the final (stripped, smaller) files in a moment
        epoch = trainer.epoch + 1
        files, copies = {}, {}
        if epoch % self.settings.checkpoint_interval == 0 or trainer.stop:
            files["last.pt"] = Path(trainer.last)
        if trainer.best_fitness == trainer.fitness:
            files["best.pt"] = Path(trainer.best)
            if "last.pt" in files:  # Ultralytics wrote both from the same bytes: one upload, one copy
                copies["best.pt"] = "last.pt"
        if files:
            files.update({"results.csv": Path(trainer.csv), "events.jsonl": self.event_log})
            self._saved = (files, epoch, copies, bool(trainer.stop))  # submitted at on_fit_epoch_end, once
            # this epoch's reports exist; the last epoch's (multi-GPU) copied at once: the final strip follows

    def _submit_saved(self) -> None:
        """Upload what on_model_save kept (the next callback, on_fit_epoch_end, comes straight after it)."""
        saved, self._saved = self._saved, None
        if saved:
            files, epoch, copies, last = saved
            self.uploader.submit(files, epoch, copies)
            if last:
                self.uploader.secure()

    def on_fit_epoch_end(self, trainer) -> None:
        try:
            self._end_epoch(trainer)
        finally:  # the epoch's checkpoint goes up whatever happened to its reports
            self._submit_saved()

    def _end_epoch(self, trainer) -> None:
        capture = self._capture
        if capture:
            capture.stop()
        if self._pending is None or self._pending[0] != trainer.epoch:
            self.final_metrics = contract_metrics(trainer.metrics or {}, None)
            return
        _, train = self._pending
        self._pending = None
        epoch, total = trainer.epoch + 1, trainer.epochs
        metrics = contract_metrics(trainer.metrics or {}, trainer.fitness)
        self.epochs_completed, self.total_epochs, self.last_metrics = epoch, total, metrics
        if trainer.stop:  # the last epoch: what follows (final evaluation, uploads) is not cancelled
            self.stop.phase = "finishing"
        if not self.reports():
            return
        self.backend.poll_health_now()  # a cancellation pressed during the epoch is seen now
        body, images, row = epoch_report(trainer.args.task, epoch, total, metrics, train, trainer.validator, capture)
        LOGGER.info("%s", summarize_epoch(trainer, epoch, total, train, body), extra={"epoch": epoch})
        self.backend.status("running", 100.0 * epoch / total, epoch=epoch, total_epochs=total,
                            **self.tracker.status_fields())
        self.tracker.log_metrics(row["extra_metrics"], step=epoch)
        if capture and capture.seconds:
            LOGGER.debug("epoch %d: per-image results and confusion matrix took %.3f s of validation",
                         epoch, capture.seconds)
        storage = self.uploader.storage  # the reports name the last.pt that holds this epoch, and carry
        checkpoint = storage.uri(storage.locate(self.settings.checkpoint_prefix + "last.pt"))  # their ids now,
        body = {**body, "checkpoint_path": checkpoint, "event_id": uuid.uuid4().hex}  # so that a job started
        row = {**row, "checkpoint_path": checkpoint, "event_id": uuid.uuid4().hex}  # again sends the same ones
        self.outbox.add(epoch, body, images, row)
        with self._lock:
            self._unsent[epoch] = {"epoch": epoch, "validation-results": body, "images": images, "training-metrics": row}
        self._submit_saved()  # after outbox.add: the upload writes this epoch's reports before its last.pt
        self._send_stored()

    def checkpoint_stored(self, epoch: int) -> None:
        """last.pt holding `epoch` is in storage: that epoch and the ones before it may be reported."""
        with self._lock:
            self._stored_epoch = max(self._stored_epoch, epoch)
        self._send_stored()

    def _send_stored(self) -> None:
        with self._lock:
            ready = sorted(e for e in self._unsent if e <= self._stored_epoch)
            reports = [self._unsent.pop(e) for e in ready]
        for entry in reports:
            self._send(entry)

    def _send(self, entry: dict) -> None:
        """One epoch's reports (those of it still owed); each leaves the outbox once the backend took it."""
        epoch, outbox = entry["epoch"], self.outbox
        if entry.get("validation-results"):
            self.backend.validation_results(entry["validation-results"], entry.get("images") or [],
                                            on_done=lambda: outbox.done(epoch, "validation-results"))
        if entry.get("training-metrics"):
            self.backend.training_metrics(entry["training-metrics"], on_done=lambda: outbox.done(epoch, "training-metrics"))

    def resume_after(self, epochs_done: int) -> None:
        """A job resumed from a last.pt in storage holding `epochs_done` epochs (reported before)."""
        with self._lock:
            self.epochs_completed = self._stored_epoch = max(self._stored_epoch, epochs_done)

    @property
    def epochs_kept(self) -> int:
        """Epochs whose last.pt is in storage, those reported: what a job that does not complete keeps
        (a job started again resumes after them). Without checkpoint uploads, the epochs completed."""
        if not self.uploading:
            return self.epochs_completed
        with self._lock:
            return min(self.epochs_completed, self._stored_epoch)

    def progress(self) -> float:
        return 100.0 * self.epochs_completed / self.total_epochs if self.total_epochs else 0.0

    def drop_unsent(self) -> None:
        """The job ends without these epochs' last.pt in storage: they are not reported (a resumed
        job trains them again)."""
        with self._lock:
            epochs, self._unsent = sorted(self._unsent), {}
        if epochs:
            LOGGER.info("epoch(s) %s not reported: their last.pt is not in storage (a resumed job trains them "
                        "again)", ", ".join(map(str, epochs)))

    def on_train_end(self, trainer) -> None:
        """In a DDP worker, deliver what this process queued before it exits."""
        if self._own_clients and self.reports():
            if self._uploader:
                self._uploader.wait(self.settings.shutdown_timeout)
            self.tracker.flush(self.tracker.END_TIMEOUT)
            self.backend.close()
            if self._outbox:
                self._outbox.close()  # what the backend did not take stays owed in storage

    def recover_from_files(self, trainer) -> None:
        """After DDP training the epochs were reported by a worker: take the summary from its files."""
        if self.epochs_completed:
            return
        rows = trainer.read_results_csv()
        if rows.get("epoch"):
            self.epochs_completed = int(rows["epoch"][-1])
            self.last_metrics = contract_metrics({k: v[-1] for k, v in rows.items()
                                                  if k.startswith(("metrics/", "val/"))}, None)


def summarize_epoch(trainer, epoch: int, total: int, train: dict, body: dict) -> str:
    """The epoch's summary line: training losses, primary metric, epoch time, ETA (mean epoch time of
    this run times the epochs left)."""
    losses = {k.removeprefix("train/"): v for k, v in train.items() if k.startswith("train/")}
    seconds = getattr(trainer, "epoch_time", None)
    started, done = getattr(trainer, "train_time_start", None), epoch - getattr(trainer, "start_epoch", 0)
    mean = (time.time() - started) / done if started and done > 0 else seconds
    eta = mean * (total - epoch) if mean is not None else None
    metric = (body["primary_metric_name"], body["primary_metric_value"])
    return epoch_summary(epoch, total, losses, metric, seconds, eta)
