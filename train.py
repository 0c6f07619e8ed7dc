"""Train an Ultralytics YOLO model as one job of the vision platform.

The backend launches it as a subprocess or a Kubernetes Job with the job's configuration in
the environment; by hand, put the variables in ./.env (real environment variables win):

    python train.py
    JOB_ID=1 DATASET_URI=shapes.zip MODEL_NAME=yolo11n.yaml STORAGE_TYPE=local EPOCHS=3 python train.py

Steps (`train_job`): report `running` -> find where the job starts (fresh, resumed from its
last.pt in storage, or already finished) -> download and check the dataset -> resolve the model
weights -> start the MLflow run -> train, reporting every epoch -> upload checkpoints and outputs
-> optionally evaluate best.pt on the test split, export it, log and register it in MLflow (docs/models.md)
-> store the completion marker -> report `completed`. Any failure reports `failed` (or
`cancelled`) with a redacted message and exits with the contract's code (see README, "Exit codes").

The pieces live one concern per module: config (settings), storage, backend (callbacks), logforward
(warnings and errors to the backend's log panel), datasets, archives, dataset_check, models, tracking
(MLflow, through its helper process mlflow_worker), reporting (Ultralytics callbacks, the stop
signal), checkpoints (checked and uploaded in the background), resume, validation (the per-epoch
bodies), cache (WORK_DIR, the job's lock), evaluation, exports and registry (what people deploy,
after training).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dotenv import load_dotenv

import cache
import cli
from backend import Backend
from checkpoints import checkpoint_problem
from config import Settings, backend_settings, job_dir, load_settings, log_configuration
from dataset_check import check_dataset_or_fail
from datasets import download_dataset
from evaluation import evaluate_after_training
from exports import export_after_training
from logforward import LogForwarder
from models import (
    default_device,
    offline_environment,
    prepare_training,
    resolve_model,
    resolve_task,
    train_arg_name_problems,
    ultralytics_message,
    ultralytics_refusal,
)
from registry import log_trained_model, prepare_model_logging
from reporting import EpochReporter, StopSignal
from resume import COMPLETED_MARKER, completed_before, mark_completed, prepare_run
from storage import Storage
from tracking import Tracker
from utils import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TRANSIENT,
    BadInput,
    ConfigError,
    Redactor,
    TrainerError,
    available_cpus,
    background,
    exit_now,
    in_background,
    now_iso,
    setup_logging,
    within,
)

LOGGER = logging.getLogger("trainer")

OUTPUT_SUFFIXES = {".csv", ".png", ".jpg", ".yaml"}  # run outputs uploaded beside the checkpoints


# ----------------------------------------------------------------------------------------------
# The job's steps
# ----------------------------------------------------------------------------------------------


def train_job(storage: Storage, settings: Settings, backend: Backend, tracker: Tracker, reporter: EpochReporter,
              stop: StopSignal, started: float) -> None:
    """The job's steps, from `running` to `completed` (raises on any failure)."""
    # The heavy imports overlap the storage lookups and the dataset's download and check: torch's and
    # Ultralytics' (about 4 s) on a helper thread, MLflow's (and its lookups) in MLflow's helper process;
    # a job whose dataset is refused waits for neither. TRAIN_ARGS' values are checked by Ultralytics
    # once it is imported (their names were checked with the configuration).
    offline_environment(settings.work_dir)  # before anything imports Ultralytics (torch.load of a checkpoint)
    ultralytics_ready = in_background(prepare_training, settings)
    tracker.prepare()  # MLflow's import and lookups, in its own process
    backend.status("running", 0, started_at=now_iso())
    backend.watch_cancellation(settings.backend.health_interval, stop.request)
    run = prepare_run(storage, settings)
    reporter.use_storage(storage)
    if run.finished:  # a pod started again after the training was over: report it, train nothing
        reporter.send_owed(run.epochs_done)  # (a resumed training sends them as it resumes)
        mark_completed(storage, settings, run.finished)
        report_completed(backend, stop, run.finished)
        return
    if run.resume_from:  # what the backend holds already: the progress bar does not go back to 0
        reporter.resume_after(run.epochs_done)
        backend.status("running", reporter.progress(), epoch=run.epochs_done, total_epochs=settings.epochs)
    stop.check()
    data, reporter.dataset_root = download_dataset(storage, settings)
    stop.check()
    if ultralytics_ready.done():  # a TRAIN_ARGS value refused (or a failed import) ends the job here
        ultralytics_ready.result()
    weights = str(run.resume_from) if run.resume_from else resolve_model(storage, settings)
    task = resolve_task(settings, weights, data)
    check_dataset_or_fail(data, task, settings)
    backend.log(f"dataset ready: {settings.dataset_uri}")
    stop.check()
    ultralytics_ready.result()
    stop.check()
    model = build_model(settings, task, weights, reporter)  # weights that do not load make no MLflow run
    tracker.start(continue_run=run.resume_from is not None)  # a new training gets a run of its own
    if tracker.run_id:  # the UI links to the run while training runs
        backend.status("running", reporter.progress(), **tracker.status_fields())
    stop.check()
    prepare_model_logging(settings, tracker)  # the model's helper warms up from here, as Ultralytics sets up
    trainer = train_model(settings, model, data, reporter, run.save_dir, resume=run.resume_from is not None)
    stop.phase = "finishing"
    artifacts = background(log_run_artifacts, tracker, trainer)  # MLflow's copies go up beside storage's
    artifacts_started = time.monotonic()
    uris = upload_outputs(storage, settings, trainer, reporter)
    reporter.checkpoint_stored(reporter.epochs_completed)  # the final last.pt: every epoch is in storage
    backend.log(f"checkpoints uploaded to {storage.uri(storage.locate(settings.checkpoint_prefix))}")
    shipped = ship_models(storage, settings, backend, tracker, reporter, trainer, task, data, stop)
    final = {**tracker.status_fields(), "mlflow_run_url": tracker.url, "best_checkpoint": uris.get("best.pt"),
             "last_checkpoint": uris.get("last.pt"), "final_metrics": reporter.final_metrics or reporter.last_metrics,
             "epochs_completed": reporter.epochs_completed, "total_epochs": settings.epochs,
             "training_time_seconds": round(time.monotonic() - started, 1), "exit_code": EXIT_OK, **shipped}
    final = {k: v for k, v in final.items() if v is not None}  # a field not known is left out, never null
    mark_completed(storage, settings, final)  # before the status: a pod started again finds the job done
    report_completed(backend, stop, final)  # a stop from here on cuts MLflow's bookkeeping short
    wait_for_run_files(artifacts, artifacts_started, tracker, stop)
    tracker.finish("FINISHED")


def report_completed(backend: Backend, stop: StopSignal, fields: dict) -> None:
    """The final `completed` status; from here on a stop still exits 0 (the watchdog reads the phase)."""
    backend.status("completed", 100, **fields)
    stop.phase = "completed"


def build_model(settings: Settings, task: str, weights: str, reporter: EpochReporter):
    """The Ultralytics model from its weights (or config), with the job's callbacks; BadInput if it does not load."""
    from ultralytics import YOLO

    try:
        model = YOLO(weights, task=task)
    except Exception as e:
        raise BadInput(f"MODEL_NAME={settings.model_name}: cannot load {Path(weights).name}: "
                       f"{ultralytics_message(e, Path(weights))}") from None
    for event, hook in reporter.callbacks().items():
        model.add_callback(event, hook)
    model.add_callback("on_train_epoch_end", freeze_long_lived_objects)
    return model


def train_model(settings: Settings, model, data: Path, reporter: EpochReporter, save_dir: Path, resume: bool = False):
    """Run Ultralytics training (or resume it); returns its trainer (save_dir, best/last paths, metrics)."""
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
    except Exception as e:
        if reporter.stop.phase == "setup" and (refusal := ultralytics_refusal(e)):  # before the first batch
            raise BadInput(refusal) from None
        raise
    reporter.recover_from_files(model.trainer)
    return model.trainer


def freeze_long_lived_objects(_trainer) -> None:
    """After the first epoch this process trains, what exists (modules, the model, its data loaders,
    the clients) lives until training ends. `gc.freeze` takes it out of the garbage collector's
    sight: the full collections Python makes every few epochs walked some 650,000 such objects, a
    pause of the training thread of 0.3-0.5 s each (0.08 s per epoch on the bench machine, about
    8%). Once, after one full collection: garbage not collected yet would be frozen with the rest and
    never freed (after the first epoch, because Ultralytics rebuilds its data pipeline when that
    epoch runs out of GPU memory, and the replaced dataset, a reference cycle, must be freed). What
    training allocates later is collected as before. They stay frozen until the process exits: the
    trainer keeps most of them referenced to the end of the job anyway."""
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()


def upload_outputs(storage: Storage, settings: Settings, trainer, reporter: EpochReporter) -> dict:
    """After training: best.pt, last.pt, results.csv and plots to checkpoints/job-{JOB_ID}/, side by side."""
    reporter.uploader.drop_pending()  # the final files supersede what the last epoch queued...
    reporter.uploader.wait()  # ...and an upload already under way finishes first, so the final files win
    checkpoints = [Path(trainer.wdir) / name for name in ("best.pt", "last.pt") if (Path(trainer.wdir) / name).is_file()]
    for path in checkpoints:
        if problem := checkpoint_problem(path):
            raise TrainerError(f"the final {path.name} is {problem}; not replacing the one in storage")
    reporter.outbox.write()  # the last epochs' reports go into storage before the last.pt that holds them
    outputs = [p for p in sorted(Path(trainer.save_dir).iterdir()) if p.is_file() and p.suffix in OUTPUT_SUFFIXES]
    with ThreadPoolExecutor(4, thread_name_prefix="final-upload") as pool:
        uris = dict(zip((p.name for p in checkpoints + outputs), pool.map(
            lambda p: storage.upload(p, storage.locate(settings.checkpoint_prefix + p.name)), checkpoints + outputs)))
    return {name: uris[name] for name in ("best.pt", "last.pt") if name in uris}


def ship_models(storage: Storage, settings: Settings, backend: Backend, tracker: Tracker, reporter: EpochReporter,
                trainer, task: str, data: Path, stop: StopSignal) -> dict:
    """After training, what people deploy (each optional, none fails the job): best.pt evaluated on the
    test split (EVALUATE_TEST), exported and verified (EXPORT_FORMATS), logged to MLflow as a pyfunc
    model and registered (MLFLOW_LOG_MODEL, MLFLOW_REGISTERED_MODEL_NAME). Returns final status fields."""
    best = Path(trainer.wdir) / "best.pt"
    if not best.is_file():
        return {}

    def stopped() -> bool:  # a stopped job skips what is left: it must end before SHUTDOWN_TIMEOUT
        return stop.reason is not None

    metrics = reporter.final_metrics or reporter.last_metrics
    return {**evaluate_after_training(settings, tracker, backend, best, data, stopped),
            **export_after_training(storage, settings, tracker, backend, best, data, stopped),
            **log_trained_model(settings, tracker, best, task, metrics, stopped)}


def wait_for_run_files(artifacts, started: float, tracker: Tracker, stop: StopSignal) -> None:
    """The job is completed and reported; its files go up to the MLflow run, at most ARTIFACTS_TIMEOUT
    from `started` (an MLflow server that hangs would keep the job forever), and after a stop request
    no longer than leaves the run's end its time before the deadline."""
    deadline = started + tracker.ARTIFACTS_TIMEOUT
    while artifacts.is_alive() and time.monotonic() < deadline:
        left = stop.remaining(StopSignal.LAST_WORDS + tracker.END_TIMEOUT)
        if left <= 0:
            break
        artifacts.join(min(1.0, left, deadline - time.monotonic()))
    if artifacts.is_alive():
        LOGGER.warning("MLflow: the run's files are still uploading after %.0f s; ending the run without them",
                       time.monotonic() - started)


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


# ----------------------------------------------------------------------------------------------
# How a job that did not complete ends
# ----------------------------------------------------------------------------------------------


def report_failure(error: BaseException, settings: Settings, backend: Backend, tracker: Tracker,
                   reporter: EpochReporter, stop: StopSignal, started: float) -> int:
    """A job that did not complete: keep its last checkpoint, end the MLflow run, report how it ended.
    Everything fits what is left of SHUTDOWN_TIMEOUT, counted from the stop request (or from now)."""
    was_ddp = stop.phase == "ddp"
    stop.phase = "cleanup"
    code, message = classify_failure(error, stop)
    LOGGER.log(logging.WARNING if code == EXIT_CANCELLED else logging.ERROR, "job %s (exit %d): %s",
               "cancelled" if code == EXIT_CANCELLED else "failed", code, backend.redact(message),
               exc_info=code == EXIT_ERROR)  # (also to the backend's log panel, before the final status)
    deadline = time.monotonic() + stop.remaining(default=settings.shutdown_timeout)
    if reporter.uploading:  # the last completed epoch's checkpoint, resumable, must reach storage
        if was_ddp:  # rank 0 wrote it here, but its own upload may have been cut short
            weights_dir = job_dir(settings) / "train" / "weights"
            reporter.uploader.submit({n: weights_dir / n for n in ("last.pt", "best.pt")}, reporter.epochs_completed)
        reporter.uploader.wait(max(0.0, deadline - time.monotonic() - 3))
    reporter.drop_unsent()
    within(min(5.0, deadline - time.monotonic() - 2), tracker.finish, "KILLED" if code == EXIT_CANCELLED else "FAILED")
    backend.status("cancelled" if code == EXIT_CANCELLED else "failed", reporter.progress(), error=message,
                   exit_code=code, epochs_completed=reporter.epochs_kept, **tracker.status_fields(),
                   training_time_seconds=round(time.monotonic() - started, 1), **kept_checkpoints(settings, reporter))
    return code


def kept_checkpoints(settings: Settings, reporter: EpochReporter) -> dict:
    """A job that did not complete but kept epochs in storage: where its checkpoints are (last.pt is
    resumable; best.pt went up with the first epoch and whenever it improved)."""
    if not reporter.uploading or not reporter.epochs_kept:
        return {}
    storage = reporter.uploader.storage
    kept = {"last_checkpoint": storage.uri(storage.locate(settings.checkpoint_prefix + "last.pt"))}
    best = storage.locate(settings.checkpoint_prefix + "best.pt")
    with contextlib.suppress(Exception):  # (a resumed job's best.pt may be missing: a courtesy field)
        if storage.head(best) is not None:
            kept["best_checkpoint"] = storage.uri(best)
    return kept


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


def last_words(backend: Backend, tracker: Tracker, reporter: EpochReporter, stop: StopSignal) -> None:
    """The shutdown watchdog's: the deadline came before the job reported how it ended."""
    if backend.final_status is None:
        backend.status("cancelled", reporter.progress(), error=f"{stop.reason}; shutdown cut short at "
                       f"SHUTDOWN_TIMEOUT={stop.timeout:g} s", exit_code=EXIT_CANCELLED,
                       epochs_completed=reporter.epochs_kept, **tracker.status_fields())
    backend.close(stop.remaining(0.5))


def report_running_elsewhere(settings: Settings, redact: Redactor) -> int:
    """Another process trains this JOB_ID in this WORK_DIR and reports it: this one leaves its files
    and its status alone (a `failed` would be false), says so, and exits as a transient failure."""
    message = (f"job {settings.job_id} is being trained by another process in WORK_DIR={settings.work_dir}; "
               f"this one exits without touching it (exit {EXIT_TRANSIENT}: try again once it has ended)")
    LOGGER.error("%s", message)
    backend = Backend(settings.backend, redact)  # no event log: the job's is the other process's
    backend.log(message, level="WARNING")
    backend.close()
    return EXIT_TRANSIENT


def report_config_error(error: ConfigError, redact: Redactor) -> int:
    """Configuration is invalid: say so to the backend if its URL at least is usable."""
    LOGGER.error("%s", error)
    try:
        settings = backend_settings(os.environ)
    except Exception:
        return EXIT_BAD_INPUT
    backend = Backend(settings, redact)
    backend.log(f"job failed (exit {EXIT_BAD_INPUT}): {error}", level="ERROR")  # for the log panel, as any failure
    backend.status("failed", 0, error=str(error), exit_code=EXIT_BAD_INPUT, epochs_completed=0)
    backend.close()
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> int:
    if (code := cli.handle(sys.argv[1:], "train", __doc__)) is not None:  # --help, --check
        return code
    load_dotenv(Path.cwd() / ".env", override=False)  # hand runs; real environment variables win
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact, capture_stdout=True)  # LOG_FORMAT=json: stdout's lines become JSON too
    try:
        settings = load_settings(os.environ, "train", check_train_args=train_arg_name_problems)
    except ConfigError as e:
        return report_config_error(e, redact)

    log_configuration(settings)
    if not cache.claim_job_folder(settings, wait=settings.shutdown_timeout + 10):  # (one that is stopping ends)
        return report_running_elsewhere(settings, redact)
    stop = StopSignal(settings.shutdown_timeout)
    stop.install()
    event_log = job_dir(settings) / "events.jsonl"
    backend = Backend(settings.backend, redact, event_log)
    forwarder = LogForwarder(backend)  # the job's warnings and errors, also on the backend's logs route
    LOGGER.addHandler(forwarder)
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
            reporter.use_storage(storage)
            reporter.send_owed(finished.get("epochs_completed") or settings.epochs)
            report_completed(backend, stop, finished)
        else:
            train_job(storage, settings, backend, tracker, reporter, stop, started)
        code = EXIT_OK
    except BaseException as e:  # one top-level handler: classify, report, exit with the contract's code
        code = report_failure(e, settings, backend, tracker, reporter, stop, started)
        flush = max(0.5, min(settings.backend.flush_timeout, stop.remaining(1.0, settings.shutdown_timeout)))
    finally:
        backend.close(flush)
        LOGGER.removeHandler(forwarder)  # nothing goes out any more (nor into the event log, removed below)
    if reporter.uploading:  # what the backend did not take stays owed in storage, for a job started again
        within(stop.remaining(0.5, default=30.0), reporter.outbox.close)
    if storage is not None:  # a courtesy copy: bounded by what is left of a stop's deadline
        within(stop.remaining(0.5, default=60.0), upload_event_log, storage, settings, event_log)
    cache.remove_job_files(settings)  # last: everything job-local is in storage or no longer needed
    return code


if __name__ == "__main__":
    exit_now(main())  # the job is done and reported: no interpreter teardown (utils.exit_now)
