"""Train an Ultralytics YOLO model as one job of the vision platform.

The backend launches it as a subprocess or a Kubernetes Job with the job's configuration in
the environment; by hand, put the variables in ./.env (real environment variables win):

    python train.py
    JOB_ID=1 DATASET_URI=shapes.zip MODEL_NAME=yolo11n.yaml STORAGE_TYPE=local EPOCHS=3 python train.py

Steps: validate the configuration -> report `running` -> download and check the dataset ->
resolve the model weights -> start the MLflow run -> train, reporting every epoch -> upload
checkpoints and outputs -> report `completed`. Any failure reports `failed` with a redacted
message and exits with the contract's code (see README, "Exit codes").
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dotenv import load_dotenv

import cache
from utils import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    Backend,
    BadInput,
    Cancelled,
    ConfigError,
    Location,
    Redactor,
    Settings,
    Storage,
    StorageNotFound,
    TrainerError,
    TransientError,
    archive_kind,
    available_cpus,
    backend_settings,
    check_dataset,
    default_device,
    extract_archive,
    fetch_file,
    dataset_task,
    find_dataset_root,
    human_size,
    infer_task,
    load_settings,
    log_configuration,
    now_iso,
    prepare_classification,
    prepare_ultralytics,
    resolve_data_yaml,
    safe_target,
    setup_logging,
)
from validation import ValidationCapture, contract_metrics, epoch_report, finite_floats, sequential_val_loader

LOGGER = logging.getLogger("trainer")

OUTPUT_SUFFIXES = {".csv", ".png", ".jpg", ".yaml"}  # run outputs uploaded beside the checkpoints
COMPLETED_MARKER = "completed.json"  # checkpoints/job-{JOB_ID}/completed.json: the job finished
MLFLOW_NAME = re.compile(r"[\w\-. :/]+")  # the characters MLflow accepts in a metric name


# ----------------------------------------------------------------------------------------------
# MLflow: the trainer owns the run (Ultralytics' own MLflow callback is switched off)
# ----------------------------------------------------------------------------------------------


class Tracker:
    """The job's MLflow run: one per job, found again by its `job_id` tag when the job restarts.

    Any tracking failure logs one warning and switches tracking off; it never fails training.
    The run id is kept after that, so the run is still ended (FINISHED, FAILED, KILLED) rather
    than left RUNNING forever.
    """

    END_TIMEOUT = 10.0  # seconds to wait for ending the run once tracking has failed

    def __init__(self, settings: Settings, redact: Redactor):
        self.settings = settings
        self.redact = redact
        self._client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False  # the run exists and tracking has not failed
        self._params: set[str] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}  # a DDP worker makes its own client for the same run

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.settings.mlflow_tracking_uri)
        return self._client

    def start(self) -> None:
        # MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) would stall a job for
        # minutes on a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        verify = self.settings.storage.verify  # TLS_VERIFY / TLS_CA_BUNDLE apply to MLflow too
        if verify is False:
            os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", "true")
        elif isinstance(verify, str):
            os.environ.setdefault("MLFLOW_TRACKING_SERVER_CERT_PATH", verify)
        try:
            s = self.settings
            experiment = self.client.get_experiment_by_name(s.mlflow_experiment)
            self.experiment_id = (experiment.experiment_id if experiment else
                                  self.client.create_experiment(s.mlflow_experiment, artifact_location(s)))
            runs = self.client.search_runs([self.experiment_id], f"tags.job_id = '{s.job_id}'", max_results=1,
                                           order_by=["attributes.start_time DESC"])
            if runs:
                self.run_id = runs[0].info.run_id
                self._params = set(runs[0].data.params)
                self.client.update_run(self.run_id, status="RUNNING")
                LOGGER.info("MLflow: continuing run %s of job %s", self.run_id, s.job_id)
            else:
                run = self.client.create_run(self.experiment_id, run_name=f"job-{s.job_id}",
                                             tags={"job_id": s.job_id, "project_id": s.project_id})
                self.run_id = run.info.run_id
                LOGGER.info("MLflow: run %s in experiment %r at %s", self.run_id, s.mlflow_experiment,
                            self.redact(s.mlflow_tracking_uri))
            self.active = True
        except Exception as e:
            self._off("start", e)

    def status_fields(self) -> dict:
        """The MLflow ids every status carries once the run exists (the UI links to the run)."""
        if not self.run_id:
            return {}
        return {"mlflow_experiment_id": str(self.experiment_id), "mlflow_run_id": str(self.run_id)}

    @property
    def url(self) -> str | None:
        uri = self.settings.mlflow_tracking_uri
        if not self.run_id or not uri.startswith(("http://", "https://")):
            return None
        return f"{self.redact(uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: dict) -> None:
        """Log parameters not logged before (MLflow refuses to change a logged value)."""
        if not self.active:
            return
        from mlflow.entities import Param

        new = [Param(k, self.redact(v)[:6000]) for k, v in sorted(params.items()) if k not in self._params]
        try:
            for i in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[i:i + 100])
            self._params.update(p.key for p in new)
        except Exception as e:
            self._off("log parameters", e)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log numbers at this step; names MLflow refuses (the UI's `mAP@0.5`, `precision(M)`) are left out:
        the same numbers are there under the contract's names."""
        if not self.active:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(k, v, stamp, step) for k, v in metrics.items() if MLFLOW_NAME.fullmatch(k)]
        try:
            self.client.log_batch(self.run_id, metrics=points)
        except Exception as e:
            self._off("log metrics", e)

    def log_artifacts(self, files: list[Path], artifact_path: str | None = None) -> None:
        for f in files:
            if not self.active:
                return
            try:
                self.client.log_artifact(self.run_id, str(f), artifact_path)
            except Exception as e:
                self._off(f"upload {f.name}", e)

    def finish(self, status: str) -> None:
        """End the run with FINISHED, FAILED or KILLED, also after a failure switched tracking off
        (waiting at most END_TIMEOUT then: the server may be the thing that failed)."""
        if not self.run_id:
            return
        if self.active:
            self._end(status)
            return
        worker = threading.Thread(target=self._end, args=(status,), name="mlflow-end", daemon=True)
        worker.start()
        worker.join(self.END_TIMEOUT)

    def _end(self, status: str) -> None:
        was_active = self.active
        try:
            self.client.set_terminated(self.run_id, status=status)
            self.active = False
        except Exception as e:
            if was_active:
                self._off("end the run", e)
            else:
                LOGGER.warning("MLflow: could not mark run %s %s either (%s)", self.run_id, status,
                               self.redact(f"{type(e).__name__}: {e}")[:500])

    def _off(self, action: str, error: Exception) -> None:
        """Stop tracking (the run id stays, to end the run)."""
        LOGGER.warning("MLflow: failed to %s (%s); tracking is off for the rest of this job", action,
                       self.redact(f"{type(error).__name__}: {error}")[:500])
        self.active = False


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts: WORK_DIR/mlartifacts when the tracking URI is a
    database the trainer writes to directly (MLflow's default there is ./mlruns in the working
    directory, which is not writable in the image and not the job's folder); None lets a tracking
    server decide."""
    scheme = settings.mlflow_tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        return (settings.work_dir / "mlartifacts").as_uri()
    return None


# ----------------------------------------------------------------------------------------------
# Epoch reporting: Ultralytics hooks -> backend callbacks and MLflow
# ----------------------------------------------------------------------------------------------

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
    deadline), cleanup (the job is reporting how it ended).
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
        LOGGER.warning("stop requested (%s) during %s; exiting within %g s", reason, self.phase, self.timeout)
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
        os._exit(EXIT_CANCELLED)


def stop_workers() -> None:
    """Multi-GPU: SIGTERM to the torch.distributed launcher and its workers, our child processes."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint file must not replace the one in storage, or None. torch saves a zip archive
    whose directory is written last: a half-written file has none, a damaged one fails its CRCs.
    Checked whole, without unpickling (which would run code from the file)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete checkpoint ({type(e).__name__}: {e})"
    return f"a damaged checkpoint (entry {bad} fails its CRC)" if bad else None


class CheckpointUploader:
    """Uploads the latest checkpoint files in the background, one file at a time.

    `submit` copies each file to a staging folder first (Ultralytics rewrites last.pt in
    place each epoch), and a newer copy of a file replaces an older one still waiting: uploads
    never pile up and never run twice at once for the same file.
    """

    def __init__(self, storage: Storage, settings: Settings, backend: Backend,
                 on_stored: Callable[[int], None] | None = None):
        self.storage = storage
        self.prefix = settings.checkpoint_prefix
        self.backend = backend
        self.on_stored = on_stored  # called with the epoch once that epoch's last.pt is in storage
        self.staging = job_dir(settings) / "staging"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self._pending: dict[str, tuple[Path, int]] = {}
        self._busy = False
        self._cond = threading.Condition()
        self._count = 0
        threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True).start()

    def submit(self, files: dict[str, Path], epoch: int) -> None:
        for name, path in files.items():
            if not path.is_file():
                continue
            self._count += 1
            staged = self.staging / f"{self._count:06d}-{name}"
            shutil.copyfile(path, staged)
            with self._cond:
                old = self._pending.pop(name, None)
                if old:
                    old[0].unlink(missing_ok=True)
                self._pending[name] = (staged, epoch)
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until everything submitted is uploaded; False if the timeout came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
                batch = dict(self._pending)  # everything submitted so far, one upload per file
                self._pending.clear()
                self._busy = True
            uploaded = []
            for name, (staged, _) in batch.items():
                try:
                    if name.endswith(".pt") and (problem := checkpoint_problem(staged)):
                        LOGGER.warning("not uploading %s: %s; the copy in storage stays", name, problem)
                        continue
                    self.storage.upload(staged, self.storage.locate(self.prefix + name))
                    uploaded.append(name)
                except Exception as e:  # the final upload at the end tries again
                    LOGGER.warning("background upload of %s failed: %s", name, e)
                finally:
                    staged.unlink(missing_ok=True)
            checkpoints = [n for n in uploaded if n.endswith(".pt")]
            if checkpoints:
                epoch = max(batch[n][1] for n in checkpoints)
                self.backend.log(f"checkpoint {' and '.join(checkpoints)} of epoch {epoch} uploaded to "
                                 f"{self.storage.uri(self.storage.locate(self.prefix))}", epoch=epoch)
            if "last.pt" in uploaded and self.on_stored:
                self.on_stored(batch["last.pt"][1])
            with self._cond:
                self._busy = False
                self._cond.notify_all()


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
        self._own_clients = False  # made in this process (a DDP worker): flushed at on_train_end
        self.epochs_completed = 0
        self.total_epochs = settings.epochs
        self.last_metrics: dict = {}
        self.final_metrics: dict | None = None
        self._pending: tuple[int, dict] | None = None
        self._capture: ValidationCapture | None = None
        self._unsent: dict[int, tuple[dict, list, dict]] = {}  # epoch -> its reports, until its last.pt is stored
        self._stored_epoch = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None, "_uploader": None, "_capture": None, "_lock": None}

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

    def use_storage(self, storage: Storage) -> None:
        """Upload checkpoints with this storage client (train.py's own; a DDP worker makes one)."""
        self._uploader = CheckpointUploader(storage, self.settings, self.backend, on_stored=self.checkpoint_stored)

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
        if trainer.args.task == "classify" and self.settings.validation_images:
            sequential_val_loader(trainer)  # so per-image results can name their images
        if not self.reports():
            return
        self.tracker.log_params({k: v for k, v in vars(trainer.args).items() if v is not None})
        if trainer.start_epoch:
            self.backend.log(f"resumed training at epoch {trainer.start_epoch + 1} of {trainer.epochs}",
                             epoch=trainer.start_epoch + 1)

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

    def on_model_save(self, trainer) -> None:
        """Ultralytics just wrote last.pt (and best.pt if this epoch is the best): upload them."""
        if not self.reports():
            return
        epoch = trainer.epoch + 1
        files = {}
        if epoch % self.settings.checkpoint_interval == 0 or trainer.stop:
            files["last.pt"] = Path(trainer.last)
        if trainer.best_fitness == trainer.fitness:
            files["best.pt"] = Path(trainer.best)
        if files:
            files.update({"results.csv": Path(trainer.csv), "events.jsonl": self.event_log})
            self.uploader.submit(files, epoch)

    def on_fit_epoch_end(self, trainer) -> None:
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
        self.backend.status("running", 100.0 * epoch / total, epoch=epoch, total_epochs=total,
                            **self.tracker.status_fields())
        self.tracker.log_metrics(row["extra_metrics"], step=epoch)
        if capture and capture.seconds:
            LOGGER.debug("epoch %d: per-image results and confusion matrix took %.3f s of validation",
                         epoch, capture.seconds)
        with self._lock:
            self._unsent[epoch] = (body, images, row)
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
        if not reports:
            return
        storage = self.uploader.storage
        checkpoint = storage.uri(storage.locate(self.settings.checkpoint_prefix + "last.pt"))
        for body, images, row in reports:
            self.backend.validation_results({**body, "checkpoint_path": checkpoint}, images)
            self.backend.training_metrics({**row, "checkpoint_path": checkpoint})

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
            self.backend.close()

    def recover_from_files(self, trainer) -> None:
        """After DDP training the epochs were reported by a worker: take the summary from its files."""
        if self.epochs_completed:
            return
        rows = trainer.read_results_csv()
        if rows.get("epoch"):
            self.epochs_completed = int(rows["epoch"][-1])
            self.last_metrics = contract_metrics({k: v[-1] for k, v in rows.items()
                                                  if k.startswith(("metrics/", "val/"))}, None)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def job_dir(settings: Settings) -> Path:
    return settings.work_dir / "jobs" / f"job-{settings.job_id}"


def download_dataset(storage: Storage, settings: Settings) -> tuple[Path, Path]:
    """Fetch and unpack the dataset (cached by ETag); return what Ultralytics' `data` takes, and
    the dataset's root folder (where data.yaml, or train/ for classification, is).

    DATASET_URI (or datasets/{DATASET_ID}.zip) may be an archive in storage, an unpacked prefix in
    storage (ending in /), or a local archive or folder.
    """
    uri = settings.dataset_uri
    local = Path(uri).expanduser()
    if not uri.startswith("s3://") and local.exists():
        stat = local.stat()
        folder = local.resolve() if local.is_dir() else _extract_cached(local, settings, f"{stat.st_size}-{stat.st_mtime_ns}")
    elif uri.endswith("/"):
        folder = _download_prefix(storage, storage.locate(uri), settings)
    else:
        loc = storage.locate(uri)
        if not archive_kind(loc.key):
            raise BadInput(f"dataset {storage.uri(loc)} must be a .zip, .tar, .tar.gz or .tgz archive, "
                           "or a prefix ending in /")
        info = storage.head(loc)
        if info is None:
            raise StorageNotFound(f"dataset {storage.uri(loc)} does not exist")
        if info.size > settings.dataset_max_bytes:
            raise BadInput(f"dataset {storage.uri(loc)} is {info.size} bytes, more than DATASET_MAX_BYTES="
                           f"{settings.dataset_max_bytes}")
        folder = _cache_dir(settings, loc.key, info.etag)

        def fill() -> None:
            archive = cache.download_dir(settings) / (folder.name + archive_kind(loc.key))
            storage.download(loc, archive, info)
            try:
                _extract_into(archive, folder, settings)
            finally:
                archive.unlink(missing_ok=True)

        if not cache.provide(settings, folder, fill, info.size):
            LOGGER.info("dataset %s already extracted at %s", storage.uri(loc), folder)
    root = find_dataset_root(folder)
    if not any((root / n).is_file() for n in ("data.yaml", "data.yml")):
        LOGGER.info("dataset at %s is a classification folder (train/, val/)", root)
        return prepare_classification(root, job_dir(settings) / "classify", settings.val_fraction), root
    data_yaml, data = resolve_data_yaml(root, job_dir(settings) / "data.yaml", settings.val_fraction)
    LOGGER.info("dataset ready at %s: %d classes, train=%s val=%s", root, len(data.get("names") or []) or data.get("nc", 0),
                data["train"], data["val"])
    return data_yaml, root


def _download_prefix(storage: Storage, prefix: Location, settings: Settings) -> Path:
    """An unpacked dataset under a storage prefix, downloaded by 8 threads, cached by its listing."""
    objects = list(storage.list(prefix))
    if not objects:
        raise StorageNotFound(f"dataset prefix {storage.uri(prefix)} holds no objects")
    total = sum(info.size for _, info in objects)
    if len(objects) > settings.dataset_max_files or total > settings.dataset_max_bytes:
        raise BadInput(f"dataset prefix {storage.uri(prefix)} holds {len(objects)} objects, {total} bytes: over "
                       f"DATASET_MAX_FILES={settings.dataset_max_files} or DATASET_MAX_BYTES={settings.dataset_max_bytes}")
    listing = "\n".join(f"{loc.key} {info.etag} {info.size}" for loc, info in objects)
    folder = _cache_dir(settings, prefix.key.rstrip("/") or prefix.bucket, hashlib.sha256(listing.encode()).hexdigest())

    def fill() -> None:
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        LOGGER.info("downloading %d objects (%s) under %s", len(objects), human_size(total), storage.uri(prefix))
        try:
            targets = [(loc, info, safe_target(tmp.resolve(), loc.key[len(prefix.key):])) for loc, info in objects]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda t: storage.download(t[0], t[2], t[1], quiet=True), targets))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if not cache.provide(settings, folder, fill, total):
        LOGGER.info("dataset %s already downloaded at %s", storage.uri(prefix), folder)
    return folder


def _cache_dir(settings: Settings, name: str, version: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[:60]
    digest = hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:16]
    return settings.work_dir / "datasets" / f"{stem}-{digest}"


def _extract_cached(archive: Path, settings: Settings, version: str) -> Path:
    folder = _cache_dir(settings, str(archive.resolve()), version)
    cache.provide(settings, folder, lambda: _extract_into(archive, folder, settings), archive.stat().st_size)
    return folder


def _extract_into(archive: Path, folder: Path, settings: Settings) -> None:
    """Extract next to folder, then rename: a half-extracted dataset never looks complete.

    Called under the entry's fill lock (cache.provide), so no other job extracts the same folder.
    """
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        LOGGER.info("extracting %s", archive.name)
        extract_archive(archive, tmp, settings.dataset_max_bytes, settings.dataset_max_files)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Which datasets each task trains on: detection also takes polygons (Ultralytics boxes them).
COMPATIBLE_DATA = {"detect": {"detect", "segment"}, "segment": {"segment"}, "pose": {"pose"}, "obb": {"obb"},
                   "classify": {"classify"}}


def resolve_task(settings: Settings, weights: str, data: Path) -> str:
    """TASK_TYPE, else the model's task, else the dataset's; a mismatch is a bad-input error.

    An explicit task (TASK_TYPE, or the model's) decides, and the dataset can only refuse a task
    its labels cannot be: labels of 9 values fit both obb and segment, so they never contradict
    either. The dataset's own vote decides only when nothing else does. An ambiguity is logged.
    """
    model_task = checkpoint_task(weights) if weights.endswith(".pt") else infer_task(weights)
    if settings.task and model_task and model_task != settings.task:
        raise BadInput(f"TASK_TYPE asks for {settings.task}, but MODEL_NAME={settings.model_name} is a {model_task} model")
    shape = dataset_task(data)
    task = settings.task or model_task or shape.task or "detect"
    if shape.fits and not shape.fits & COMPATIBLE_DATA[task]:
        raise BadInput(f"the dataset is a {' or '.join(sorted(shape.fits))} dataset ({shape.why}), but this job "
                       f"trains a {task} model (MODEL_NAME={settings.model_name}"
                       + (f", TASK_TYPE={settings.task})" if settings.task else ")"))
    if shape.ambiguous:
        decided_by = ("TASK_TYPE" if settings.task else f"MODEL_NAME={settings.model_name}" if model_task
                      else "the vote of its label files")
        level = logging.INFO if settings.task else logging.WARNING  # TASK_TYPE settles it: nothing to warn about
        LOGGER.log(level, "the dataset is ambiguous: %s (its own vote: %s); training %s as %s says%s", shape.why,
                   shape.task, task, decided_by, "" if settings.task else " (set TASK_TYPE to choose)")
    LOGGER.info("task: %s (model: %s, dataset: %s)", task, model_task or "any",
                " or ".join(sorted(shape.fits)) or "unknown")
    return task


def checkpoint_task(path: str) -> str | None:
    """The task a .pt checkpoint was trained for, or None if it cannot be read (YOLO() says why later)."""
    import torch
    from ultralytics.nn.tasks import guess_model_task

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        task = (ckpt.get("train_args") or {}).get("task") or guess_model_task(ckpt.get("ema") or ckpt["model"])
    except Exception:
        return None
    return task if task in COMPATIBLE_DATA else None


def check_dataset_or_fail(data: Path, task: str, settings: Settings, backend: Backend) -> None:
    """DATASET_CHECK=strict: any problem fails the job with one report; warn: report and go on."""
    if settings.dataset_check == "off":
        return
    started = time.monotonic()
    report = check_dataset(data, task)
    LOGGER.info("dataset check done in %.1f s", time.monotonic() - started)
    if report and settings.dataset_check == "strict":
        raise BadInput(report.text())
    if report:
        LOGGER.warning("%s", report.text())
        backend.log(report.text(), level="WARNING")


def ultralytics_arg_problems(args: dict, work_dir: Path) -> list[str]:
    """TRAIN_ARGS through Ultralytics' own checks: unknown keys (with suggestions), then types and ranges."""
    prepare_ultralytics(work_dir)
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    problems = []
    for key, value in args.items():
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT), n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"TRAIN_ARGS: {key!r} is not an Ultralytics training argument{hint}")
            continue
        try:
            check_cfg({key: value}, hard=True)
        except (TypeError, ValueError) as e:
            problems.append(f"TRAIN_ARGS: {e}")
    return problems


def resolve_model(storage: Storage, settings: Settings) -> str:
    """MODEL_NAME -> what YOLO() loads: a config name, or a local .pt/.yaml file."""
    name = settings.model_name
    if name.endswith((".yaml", ".yml")):
        if Path(name).expanduser().is_file() or name.startswith("s3://") or "/" in name:
            return str(fetch_file(storage, name, settings.work_dir))
        return name  # an Ultralytics model config such as yolo11n.yaml: train from scratch
    if name.startswith("s3://") or name.endswith(".pt"):
        try:
            return str(fetch_file(storage, name, settings.work_dir))
        except StorageNotFound:
            uri = storage.uri(storage.locate(name))
            raise BadInput(f"MODEL_NAME={name}: no local file and no storage object {uri}") from None
    return str(fetch_pretrained(storage, settings, name))


def fetch_pretrained(storage: Storage, settings: Settings, name: str) -> Path:
    """Pretrained weights by name: storage `models/{name}.pt`, then the local cache, then the internet."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"MODEL_NAME={name!r} is not a model name, a .yaml config, or a .pt checkpoint")
    cached = settings.work_dir / "weights" / f"{name}.pt"
    loc = storage.locate(f"{settings.pretrained_prefix}{name}.pt")
    with cache.refreshing(settings, cached):  # held for the job; one job at a time downloads it
        try:
            return storage.fetch(loc, cached)
        except StorageNotFound:
            pass
        except TransientError:
            if not cached.is_file():
                raise
            LOGGER.warning("storage unreachable; using cached %s", cached)
            return cached
        if cached.is_file():
            LOGGER.info("using local weights %s (not in %s)", cached, storage.uri(loc))
            return cached
        if settings.weights_download:
            LOGGER.info("%s.pt is not in storage or the cache; trying Ultralytics' download", name)
            try:
                from ultralytics.utils.downloads import attempt_download_asset

                attempt_download_asset(cached)
            except Exception as e:
                LOGGER.warning("download of %s.pt failed: %s", name, e)
            if cached.is_file():
                return cached
    raise BadInput(
        f"pretrained weights {name}.pt not found: not in {storage.uri(loc)}, not in {cached}"
        + (", and the internet download failed" if settings.weights_download else ", and WEIGHTS_DOWNLOAD is off")
        + f". Upload them once to {storage.uri(loc)} (see README, 'Pretrained weights').")


@dataclasses.dataclass
class RunStart:
    """Where a job starts: its save_dir, and a last.pt to resume from, or the finished job it already is."""

    save_dir: Path
    resume_from: Path | None = None
    finished: dict | None = None  # the final fields of a job whose training is already over


def prepare_run(storage: Storage, settings: Settings) -> RunStart:
    """A clean save_dir for this job; with RESUME=auto, restored from a resumable last.pt in storage,
    or recognised as finished: a last.pt of the same EPOCHS with every epoch done (a pod started
    again after the job completed must not train from scratch over its checkpoints)."""
    save_dir = job_dir(settings) / "train"
    shutil.rmtree(save_dir, ignore_errors=True)  # a fresh run never uploads an earlier attempt's files
    if not settings.resume:
        return RunStart(save_dir)
    weights = save_dir / "weights"
    loc = storage.locate(settings.checkpoint_prefix + "last.pt")
    try:
        last = storage.download(loc, weights / "last.pt")
    except StorageNotFound:
        return RunStart(save_dir)
    state, why, ckpt = _checkpoint_state(last, settings)
    if state == "finished":
        LOGGER.info("%s holds the whole training (%s): this job has finished", storage.uri(loc), why)
        return RunStart(save_dir, finished=_finished_fields(storage, settings, ckpt))
    if state != "resumable":
        LOGGER.info("not resuming from %s: %s; starting a new training", storage.uri(loc), why)
        shutil.rmtree(save_dir, ignore_errors=True)
        return RunStart(save_dir)
    for name, dest in (("best.pt", weights / "best.pt"), ("results.csv", save_dir / "results.csv")):
        with contextlib.suppress(StorageNotFound):
            storage.download(storage.locate(settings.checkpoint_prefix + name), dest)
    LOGGER.info("resuming from %s", storage.uri(loc))
    return RunStart(save_dir, resume_from=last)


def _checkpoint_state(last: Path, settings: Settings) -> tuple[str, str, dict]:
    """('resumable' | 'finished' | 'unusable', why, the checkpoint) for a downloaded last.pt."""
    import torch

    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:
        return "unusable", f"it cannot be read ({type(e).__name__})", {}
    epoch, total = ckpt.get("epoch", -1), (ckpt.get("train_args") or {}).get("epochs")
    if total != settings.epochs:
        return "unusable", f"it was trained for EPOCHS={total}, this job asks for {settings.epochs}", ckpt
    if ckpt.get("optimizer") is None or epoch is None or epoch < 0:
        return "finished", "a final checkpoint, without optimizer state", ckpt
    if epoch + 1 >= total:
        return "finished", f"all {total} epochs are done", ckpt
    return "resumable", "", ckpt


def _finished_fields(storage: Storage, settings: Settings, ckpt: dict) -> dict:
    """The final status of a finished job, from its stored objects and its last checkpoint."""
    fields = {"epochs_completed": settings.epochs, "exit_code": EXIT_OK,
              "final_metrics": contract_metrics(ckpt.get("train_metrics") or {}, None)}
    for name, key in (("best.pt", "best_checkpoint"), ("last.pt", "last_checkpoint")):
        loc = storage.locate(settings.checkpoint_prefix + name)
        if storage.head(loc) is not None:
            fields[key] = storage.uri(loc)
    return fields


def completed_before(storage: Storage, settings: Settings) -> dict | None:
    """The final status this job reported when it completed, if its completion marker is in storage."""
    if not settings.resume:
        return None
    try:
        fields = json.loads(storage.read_bytes(storage.locate(settings.checkpoint_prefix + COMPLETED_MARKER)))
    except StorageNotFound:
        return None
    except ValueError:
        LOGGER.warning("%s is not valid JSON; ignoring it", COMPLETED_MARKER)
        return None
    return fields if isinstance(fields, dict) else None


def mark_completed(storage: Storage, settings: Settings, fields: dict) -> None:
    """The completion marker: the job's final fields, so a pod started again reports them and stops."""
    try:
        storage.put_bytes(json.dumps(fields).encode(), storage.locate(settings.checkpoint_prefix + COMPLETED_MARKER),
                          "application/json")
    except TrainerError as e:
        LOGGER.warning("could not store the completion marker: %s", e)


def train_model(settings: Settings, task: str, weights: str, data: Path, reporter: EpochReporter, save_dir: Path,
                resume: bool = False):
    """Run Ultralytics training (or resume it); returns its trainer (save_dir, best/last paths, metrics)."""
    from ultralytics import YOLO

    try:
        model = YOLO(weights, task=task)
    except Exception as e:
        raise BadInput(f"MODEL_NAME={settings.model_name}: cannot load {Path(weights).name}: {e}") from None
    for event, hook in reporter.callbacks().items():
        model.add_callback(event, hook)
    device = settings.device or default_device()
    workers = settings.workers if settings.workers is not None else min(8, available_cpus())
    if resume:
        # Ultralytics takes everything else (epochs, batch, lr0, TRAIN_ARGS...) from the checkpoint.
        args = {"resume": True, "data": str(data), "device": device, "workers": workers, "save_dir": str(save_dir)}
    else:
        args = {**settings.train_args, "data": str(data), "epochs": settings.epochs, "batch": settings.batch,
                "imgsz": settings.imgsz, "device": device, "workers": workers,
                "project": str(save_dir.parent), "name": save_dir.name, "exist_ok": True}
        if settings.lr0 is not None:
            args["lr0"] = settings.lr0
            # optimizer=auto ignores lr0; AdamW is what auto picks for runs under 10,000 iterations.
            args.setdefault("optimizer", "AdamW")
    if "," in device:  # several GPUs: Ultralytics relaunches training as DDP worker processes
        reporter.stop.phase = "ddp"
    LOGGER.info("%s %s on %s for %d epochs (device %s)", "resuming" if resume else "training",
                settings.model_name, data, settings.epochs, device)
    try:
        model.train(**args)
    except RuntimeError as e:
        if str(e).startswith("Dataset"):  # Ultralytics' own dataset check refused the data
            raise BadInput(str(e).splitlines()[0]) from None
        raise
    reporter.recover_from_files(model.trainer)
    return model.trainer


def upload_outputs(storage: Storage, settings: Settings, trainer, uploader: CheckpointUploader) -> dict:
    """After training: best.pt, last.pt, results.csv and plots to checkpoints/job-{JOB_ID}/."""
    uploader.wait()  # the background uploads of the last epoch go first, so the final files win
    uris = {}
    for name in ("best.pt", "last.pt"):
        path = Path(trainer.wdir) / name
        if path.is_file():
            if problem := checkpoint_problem(path):
                raise TrainerError(f"the final {name} is {problem}; not replacing the one in storage")
            uris[name] = storage.upload(path, storage.locate(settings.checkpoint_prefix + name))
    for path in sorted(Path(trainer.save_dir).iterdir()):
        if path.is_file() and path.suffix in OUTPUT_SUFFIXES:
            storage.upload(path, storage.locate(settings.checkpoint_prefix + path.name))
    return uris


def log_run_artifacts(tracker: Tracker, trainer) -> None:
    save_dir = Path(trainer.save_dir)
    tracker.log_artifacts(sorted(Path(trainer.wdir).glob("*.pt")), "weights")
    tracker.log_artifacts(sorted(p for p in save_dir.iterdir() if p.is_file() and p.suffix in OUTPUT_SUFFIXES))


def upload_event_log(storage: Storage, settings: Settings, event_log: Path) -> None:
    if not event_log.is_file():
        return
    try:
        storage.upload(event_log, storage.locate(settings.checkpoint_prefix + "events.jsonl"))
    except TrainerError as e:
        LOGGER.warning("could not upload the event log: %s", e)
    except Exception as e:  # e.g. a stop at a transfer's safe point: the log is a courtesy
        LOGGER.warning("could not upload the event log: %s: %s", type(e).__name__, e)


def within(seconds: float, step, *args) -> None:
    """Run a clean-up step in a helper thread, waiting at most `seconds` for it."""
    worker = threading.Thread(target=step, args=args, daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if worker.is_alive():
        LOGGER.warning("%s did not finish within %.0f s; going on", getattr(step, "__name__", "step"), seconds)


def report_config_error(error: ConfigError, redact: Redactor) -> int:
    """Configuration is invalid: say so to the backend if its URL at least is usable."""
    LOGGER.error("%s", error)
    try:
        settings = backend_settings(os.environ)
    except Exception:
        return EXIT_BAD_INPUT
    backend = Backend(settings, redact)
    backend.status("failed", 0, error=str(error), exit_code=EXIT_BAD_INPUT, epochs_completed=0)
    backend.close()
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> int:
    load_dotenv(Path.cwd() / ".env", override=False)  # hand runs; real environment variables win
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact)
    try:
        settings = load_settings(os.environ, "train", check_train_args=ultralytics_arg_problems)
    except ConfigError as e:
        return report_config_error(e, redact)

    log_configuration(settings)
    stop = StopSignal(settings.shutdown_timeout)
    stop.install()
    event_log = job_dir(settings) / "events.jsonl"
    backend = Backend(settings.backend, redact, event_log)
    tracker = Tracker(settings, redact)
    reporter = EpochReporter(settings, redact, backend, tracker, stop)
    stop.on_deadline = lambda: last_words(backend, tracker, reporter, stop)
    storage = None
    started = time.monotonic()
    flush = settings.backend.flush_timeout
    try:
        storage = Storage(settings.storage, interrupt=stop.check)
        if finished := completed_before(storage, settings):
            LOGGER.info("job %s completed before (%s%s in storage): reporting completed again, not training",
                        settings.job_id, settings.checkpoint_prefix, COMPLETED_MARKER)
            backend.status("completed", 100, **finished)
        else:
            train_job(storage, settings, backend, tracker, reporter, stop, started)
        code = EXIT_OK
    except BaseException as e:  # one top-level handler: classify, report, exit with the contract's code
        code = report_failure(e, settings, backend, tracker, reporter, stop, started)
        flush = max(0.5, min(settings.backend.flush_timeout, stop.remaining(1.0, settings.shutdown_timeout)))
    finally:
        backend.close(flush)
    if storage is not None:  # a courtesy copy: bounded by what is left of a stop's deadline
        within(stop.remaining(0.5, default=60.0), upload_event_log, storage, settings, event_log)
    cache.remove_job_files(settings)  # last: everything job-local is in storage or no longer needed
    return code


def train_job(storage: Storage, settings: Settings, backend: Backend, tracker: Tracker, reporter: EpochReporter,
              stop: StopSignal, started: float) -> None:
    """The job's steps, from `running` to `completed` (raises on any failure)."""
    backend.status("running", 0, started_at=now_iso())
    backend.watch_cancellation(settings.backend.health_interval, stop.request)
    prepare_ultralytics(settings.work_dir)
    run = prepare_run(storage, settings)
    if run.finished:  # a pod started again after the training was over: report it, train nothing
        mark_completed(storage, settings, run.finished)
        backend.status("completed", 100, **run.finished)
        return
    stop.check()
    data, reporter.dataset_root = download_dataset(storage, settings)
    stop.check()
    weights = str(run.resume_from) if run.resume_from else resolve_model(storage, settings)
    task = resolve_task(settings, weights, data)
    check_dataset_or_fail(data, task, settings, backend)
    backend.log(f"dataset ready: {settings.dataset_uri}")
    stop.check()
    tracker.start()
    if tracker.run_id:  # the UI links to the run while training runs
        backend.status("running", 0, **tracker.status_fields())
    reporter.use_storage(storage)
    trainer = train_model(settings, task, weights, data, reporter, run.save_dir, resume=run.resume_from is not None)
    stop.phase = "finishing"
    uris = upload_outputs(storage, settings, trainer, reporter.uploader)
    reporter.checkpoint_stored(reporter.epochs_completed)  # the final last.pt: every epoch is in storage
    backend.log(f"checkpoints uploaded to {storage.uri(storage.locate(settings.checkpoint_prefix))}")
    final = {**tracker.status_fields(), "mlflow_run_url": tracker.url, "best_checkpoint": uris.get("best.pt"),
             "last_checkpoint": uris.get("last.pt"), "final_metrics": reporter.final_metrics or reporter.last_metrics,
             "epochs_completed": reporter.epochs_completed,
             "training_time_seconds": round(time.monotonic() - started, 1), "exit_code": EXIT_OK}
    final = {k: v for k, v in final.items() if v is not None}  # a field not known is left out, never null
    mark_completed(storage, settings, final)  # before the status: a pod started again finds the job done
    backend.status("completed", 100, **final)
    log_run_artifacts(tracker, trainer)  # while the final status goes out
    tracker.finish("FINISHED")


def report_failure(error: BaseException, settings: Settings, backend: Backend, tracker: Tracker,
                   reporter: EpochReporter, stop: StopSignal, started: float) -> int:
    """A job that did not complete: keep its last checkpoint, end the MLflow run, report how it ended.
    Everything fits what is left of SHUTDOWN_TIMEOUT, counted from the stop request (or from now)."""
    was_ddp = stop.phase == "ddp"
    stop.phase = "cleanup"
    code, message = classify_failure(error, stop)
    LOGGER.error("job %s (exit %d): %s", "cancelled" if code == EXIT_CANCELLED else "failed", code,
                 backend.redact(message), exc_info=code == EXIT_ERROR)
    deadline = time.monotonic() + stop.remaining(default=settings.shutdown_timeout)
    if reporter.uploading:  # the last completed epoch's checkpoint, resumable, must reach storage
        if was_ddp:  # rank 0 wrote it here, but its own upload may have been cut short
            weights_dir = job_dir(settings) / "train" / "weights"
            reporter.uploader.submit({n: weights_dir / n for n in ("last.pt", "best.pt")}, reporter.epochs_completed)
        reporter.uploader.wait(max(0.0, deadline - time.monotonic() - 3))
    reporter.drop_unsent()
    within(min(5.0, deadline - time.monotonic() - 2), tracker.finish, "KILLED" if code == EXIT_CANCELLED else "FAILED")
    backend.status("cancelled" if code == EXIT_CANCELLED else "failed", reporter.progress(), error=message,
                   exit_code=code, epochs_completed=reporter.epochs_completed, **tracker.status_fields(),
                   training_time_seconds=round(time.monotonic() - started, 1))
    return code


def last_words(backend: Backend, tracker: Tracker, reporter: EpochReporter, stop: StopSignal) -> None:
    """The shutdown watchdog's: the deadline came before the job reported how it ended."""
    if backend.final_status is None:
        backend.status("cancelled", reporter.progress(), error=f"{stop.reason}; shutdown cut short at "
                       f"SHUTDOWN_TIMEOUT={stop.timeout:g} s", exit_code=EXIT_CANCELLED,
                       epochs_completed=reporter.epochs_completed, **tracker.status_fields())
    backend.close(stop.remaining(0.5))


def classify_failure(error: BaseException, stop: StopSignal) -> tuple[int, str]:
    """Exit code and a readable message for any exception that ended the job. A requested stop comes
    first: whatever it interrupted (a transfer, the DDP workers) failed because of it."""
    if stop.reason:
        return EXIT_CANCELLED, stop.reason
    if isinstance(error, TrainerError):
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_CANCELLED, "interrupted"
    return EXIT_ERROR, f"unexpected error: {type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
