"""Where a job starts: fresh, resumed from its last.pt in storage, or recognised as finished.

A pod started again for the same JOB_ID (preemption, a retry) resumes from the stored last.pt when
it is resumable; a job that already completed (its completion marker, or a last.pt whose every
epoch is done) reports completed again and trains nothing.
Environment (through Settings): RESUME, EPOCHS, JOB_ID.
Imports: utils, config, storage, validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path

from config import Settings, job_dir
from storage import Storage, StorageNotFound
from utils import EXIT_OK, TrainerError
from validation import contract_metrics

LOGGER = logging.getLogger("trainer")

COMPLETED_MARKER = "completed.json"  # checkpoints/job-{JOB_ID}/completed.json: the job finished


@dataclasses.dataclass
class RunStart:
    """Where a job starts: its save_dir, and a last.pt to resume from, or the finished job it already is."""

    save_dir: Path
    resume_from: Path | None = None
    finished: dict | None = None  # the final fields of a job whose training is already over
    epochs_done: int = 0  # epochs the stored last.pt holds (their reports may still be owed, see outbox.py)


def prepare_run(storage: Storage, settings: Settings) -> RunStart:
    """A clean save_dir for this job; with RESUME=auto, restored from a resumable last.pt in storage,
    or recognised as finished: a last.pt of the same EPOCHS with every epoch done (a pod started
    again after the job completed must not train from scratch over its checkpoints)."""
    save_dir = job_dir(settings) / "train"
    shutil.rmtree(save_dir, ignore_errors=True)  # a fresh run never uploads an earlier attempt's files
    if not settings.resume:
        return _new_training(storage, settings, save_dir)
    weights = save_dir / "weights"
    loc = storage.locate(settings.checkpoint_prefix + "last.pt")
    try:
        last = storage.download(loc, weights / "last.pt")
    except StorageNotFound:
        return _new_training(storage, settings, save_dir)
    state, why, ckpt = _checkpoint_state(last, settings)
    if state == "finished":
        LOGGER.info("%s holds the whole training (%s): this job has finished", storage.uri(loc), why)
        return RunStart(save_dir, finished=_finished_fields(storage, settings, ckpt), epochs_done=settings.epochs)
    if state != "resumable":  # a warning: the backend sees the job's epochs reported again from epoch 1
        LOGGER.warning("not resuming from %s: %s; starting a new training", storage.uri(loc), why)
        shutil.rmtree(save_dir, ignore_errors=True)
        return _new_training(storage, settings, save_dir)
    for name, dest in (("best.pt", weights / "best.pt"), ("results.csv", save_dir / "results.csv")):
        with contextlib.suppress(StorageNotFound):
            storage.download(storage.locate(settings.checkpoint_prefix + name), dest)
    LOGGER.info("resuming from %s", storage.uri(loc))
    return RunStart(save_dir, resume_from=last, epochs_done=ckpt["epoch"] + 1)


def _new_training(storage: Storage, settings: Settings, save_dir: Path) -> RunStart:
    """A training from the start: an earlier completion of this JOB_ID no longer holds (a pod started
    again after this one is stopped must resume it, not report the old training completed)."""
    marker = storage.locate(settings.checkpoint_prefix + COMPLETED_MARKER)
    try:
        if storage.head(marker) is not None:  # (a policy without DeleteObject warns only where it matters)
            storage.delete(marker)
    except TrainerError as e:
        LOGGER.warning("could not remove an earlier completion marker (%s): a pod started again may report the "
                       "earlier training completed", e)
    return RunStart(save_dir)


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
    fields = {"epochs_completed": settings.epochs, "total_epochs": settings.epochs, "exit_code": EXIT_OK,
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
    marker = storage.locate(settings.checkpoint_prefix + COMPLETED_MARKER)
    if storage.head(marker) is None:  # also the job's first storage request: it names a missing bucket
        return None
    try:
        fields = json.loads(storage.read_bytes(marker))
    except StorageNotFound:
        return None
    except ValueError:
        LOGGER.warning("%s is not valid JSON; ignoring it", COMPLETED_MARKER)
        return None
    if not isinstance(fields, dict):
        return None
    if fields.get("total_epochs") not in (None, settings.epochs):  # as a last.pt of other EPOCHS: a new training
        LOGGER.warning("job %s completed before with EPOCHS=%s; this one asks for EPOCHS=%d: training again",
                       settings.job_id, fields["total_epochs"], settings.epochs)
        return None
    return fields


def mark_completed(storage: Storage, settings: Settings, fields: dict) -> None:
    """The completion marker: the job's final fields, so a pod started again reports them and stops."""
    try:
        storage.put_bytes(json.dumps(fields).encode(), storage.locate(settings.checkpoint_prefix + COMPLETED_MARKER),
                          "application/json")
    except TrainerError as e:
        LOGGER.warning("could not store the completion marker: %s", e)
