"""Checkpoints during training: checked for completeness, copied aside and uploaded in the background.

Owns: checkpoint_problem (why a checkpoint file must not replace the stored one) and
CheckpointUploader (one thread that uploads each epoch's latest files, a server-side copy for a
best.pt written from the same bytes as last.pt). Used by reporting.EpochReporter each epoch and by
train.py for the final files.
Imports: config, storage, backend.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend import Backend
from config import Settings, job_dir
from storage import Storage

LOGGER = logging.getLogger("trainer")


def checkpoint_problem(path: Path, whole: bool = True) -> str | None:
    """Why a checkpoint file must not replace the one in storage, or None. torch saves a zip archive
    whose directory is written last: a half-written file has none, a damaged one fails its CRCs.
    Checked without unpickling (which would run code from the file): the directory, and with
    `whole` every entry's CRC (reading the file through; the per-epoch uploads skip that, see
    CheckpointUploader)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip() if whole else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete checkpoint ({type(e).__name__}: {e})"
    return f"a damaged checkpoint (entry {bad} fails its CRC)" if bad else None


@dataclass(frozen=True)
class _Upload:
    """A file waiting in CheckpointUploader."""

    epoch: int
    staged: Path | None = None  # a copy in the staging folder, made at submit; removed after its upload
    original: Path | None = None  # a checkpoint where Ultralytics wrote it, copied right before its upload
    signature: tuple | None = None  # the original's file_signature when submitted
    source: str | None = None  # the same bytes as this batch's file of that name: copied in storage


def _uncopied(item: _Upload) -> bool:
    """A checkpoint to copy before its upload (not a server-side copy of another file)."""
    return item.original is not None and item.staged is None and item.source is None


def file_signature(path: Path) -> tuple:
    """What changes when a file is written again: Ultralytics rewrites last.pt in place (same inode),
    which moves its modification and change times and usually its size."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def coarse_times(signature: tuple | None) -> bool:
    """A file system that keeps whole seconds only (some network and older file systems): two writes
    within one second can leave the same signature, so the signature cannot vouch for a copy. Nanosecond
    time stamps are a whole second once in a billion writes (an extra check, then; nothing worse)."""
    return signature is not None and signature[2] % 1_000_000_000 == 0


class CheckpointUploader:
    """Uploads the latest checkpoint files in the background, one file at a time.

    Ultralytics rewrites last.pt in place each epoch, so a file goes up from a copy in a staging
    folder. A checkpoint is copied by the upload thread right before its upload, not by `submit`
    (which runs on the training thread: copying a 500 MB checkpoint there would add a fraction of a
    second to every epoch); `submit` notes the file's signature, and a copy is kept only if the file
    had that signature before and after it was made. A checkpoint written again meanwhile is
    skipped: the newer one is on its way. Small files (results.csv, the event log) are copied at
    `submit`. A newer file replaces an older one still waiting: uploads never pile up and never run
    twice at once for the same file. An upload is one request up to Storage.PUT_IN_ONE_UP_TO
    (`Storage.upload(in_one=True)`), and a checkpoint is checked for completeness by its zip
    directory, not by reading it whole: the file was written by this job a moment before, and a
    cut-off one (a worker stopped while writing) has no directory. Every epoch's work here shares
    the CPU with training; the final files are checked whole (train.upload_outputs), and so is each
    copy where the file system's time stamps are whole seconds (coarse_times): there a copy taken
    while the file was written again could pass the signature, begin with the old checkpoint and end
    with the new one's directory, and only the entries' CRCs tell.
    """

    def __init__(self, storage: Storage, settings: Settings, backend: Backend,
                 on_stored: Callable[[int], None] | None = None, before_last: Callable[[], None] | None = None):
        self.storage = storage
        self.prefix = settings.checkpoint_prefix
        self.backend = backend
        self.on_stored = on_stored  # called with the epoch once that epoch's last.pt is in storage
        self.before_last = before_last  # called right before a last.pt goes up (the reports it owes first)
        self.staging = job_dir(settings) / "staging"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self._pending: dict[str, _Upload] = {}
        self._busy = False
        self._cond = threading.Condition()
        self._copying = threading.Lock()  # held while checkpoints are copied for their upload
        self._names = itertools.count(1)  # staged file names (next() is atomic: both threads draw)
        threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True).start()

    def submit(self, files: dict[str, Path], epoch: int, copies: dict[str, str] | None = None) -> None:
        """Queue files for upload; `copies` names files whose content is another's of this batch
        (best.pt written from the same bytes as last.pt): those become a server-side copy after
        the other's upload, not a second upload."""
        copies = copies or {}
        items = {}
        for name, path in files.items():
            if not path.is_file():
                continue
            if name.endswith(".pt"):
                items[name] = _Upload(epoch, original=path, signature=file_signature(path), source=copies.get(name))
            else:
                staged = self._staged_name(name)
                shutil.copyfile(path, staged)
                items[name] = _Upload(epoch, staged=staged)
        items = {name: item if item.source in (None, *items) else dataclasses.replace(item, source=None)
                 for name, item in items.items()}  # a copy of a file not submitted: its own upload
        with self._cond:  # one batch: a copy never goes without the upload it copies
            for name, item in items.items():
                old = self._pending.pop(name, None)
                copier = next((n for n, waiting in self._pending.items() if waiting.source == name), None)
                if copier and copier not in items:  # a waiting copy of the replaced file: its own upload
                    self._pending[copier] = dataclasses.replace(self._pending[copier], source=None)
                if old and old.staged:
                    old.staged.unlink(missing_ok=True)
                self._pending[name] = item
            self._cond.notify_all()

    def drop_pending(self) -> None:
        """Forget uploads not started yet (the final upload supersedes them)."""
        with self._cond:
            for item in self._pending.values():
                if item.staged:
                    item.staged.unlink(missing_ok=True)
            self._pending.clear()
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until everything submitted is uploaded; False if the timeout came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _staged_name(self, name: str) -> Path:
        return self.staging / f"{next(self._names):06d}-{name}"

    def secure(self) -> None:
        """Copy now, on the calling thread, each checkpoint still waiting for the upload thread to copy
        it. EpochReporter calls this before Ultralytics may write checkpoints again (at the end of an
        epoch's training, before its validation and save; and after the last epoch's submit in a
        multi-GPU job, before the final strip), so a submitted checkpoint is never lost to a rewrite
        while uploads run behind. When uploads keep up, nothing is waiting and this costs nothing."""
        try:
            with self._copying:  # the upload thread copies what it takes under the same lock
                with self._cond:
                    waiting = {n: item for n, item in self._pending.items() if _uncopied(item)}
                for name, item in waiting.items():
                    staged = self._snapshot(name, item)
                    with self._cond:
                        if self._pending.get(name) is item and staged:  # not taken meanwhile
                            self._pending[name] = dataclasses.replace(item, staged=staged)
                        elif staged:
                            staged.unlink(missing_ok=True)
        except Exception as e:  # never let the uploads' bookkeeping break training
            LOGGER.warning("copying checkpoints for their upload failed: %s", e)

    def _snapshot(self, name: str, item: _Upload) -> Path | None:
        """A copy of the checkpoint as it was submitted, or None if it has been written again since."""
        staged, kept = self._staged_name(name), False
        try:
            if file_signature(item.original) == item.signature:
                shutil.copyfile(item.original, staged)
                kept = file_signature(item.original) == item.signature and staged.stat().st_size == item.signature[1]
        except FileNotFoundError:
            pass
        finally:
            if not kept:
                staged.unlink(missing_ok=True)
        if not kept:
            LOGGER.debug("%s of epoch %d was written again before its upload: the newer one goes instead",
                         name, item.epoch)
        return staged if kept else None

    def _take(self) -> dict[str, _Upload]:
        """Everything submitted so far, one upload per file, its checkpoints copied at once (a copy is
        local and quick; uploads are not, and the next epoch may rewrite what waits behind them)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending)
        with self._copying:  # taken and copied under one hold: secure() never finds a batch taken, uncopied
            with self._cond:
                batch = dict(self._pending)
                self._pending.clear()
                self._busy = True
            for name, item in batch.items():
                if _uncopied(item):
                    try:
                        batch[name] = dataclasses.replace(item, staged=self._snapshot(name, item), original=None)
                    except Exception as e:
                        LOGGER.warning("copying %s for its upload failed: %s", name, e)
                        batch[name] = dataclasses.replace(item, original=None)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            uploaded = []
            for name, item in sorted(batch.items(), key=lambda entry: entry[1].source is not None):
                staged = item.staged
                try:
                    if item.source in uploaded:  # the same bytes as a file of this batch: copy it in storage
                        self.storage.copy(self.storage.locate(self.prefix + item.source),
                                          self.storage.locate(self.prefix + name))
                        uploaded.append(name)
                        continue
                    if staged is None and item.original:  # its source did not go up: its own file
                        staged = self._snapshot(name, item)
                    if staged is None:  # written again before it was copied: a newer one follows
                        continue
                    whole = coarse_times(item.signature)  # read through where time stamps cannot vouch for the copy
                    if name.endswith(".pt") and (problem := checkpoint_problem(staged, whole)):
                        LOGGER.warning("not uploading %s: %s; the copy in storage stays", name, problem)
                        continue
                    if name == "last.pt" and self.before_last:
                        self.before_last()
                    # not stopped by a stop request: the job's stop waits for the last finished epoch's checkpoint
                    self.storage.upload(staged, self.storage.locate(self.prefix + name), in_one=True, stoppable=False)
                    uploaded.append(name)
                except Exception as e:  # the final upload at the end tries again
                    LOGGER.warning("background upload of %s failed: %s", name, e)
                finally:
                    if staged:
                        staged.unlink(missing_ok=True)
            checkpoints = [n for n in uploaded if n.endswith(".pt")]
            if checkpoints:
                epoch = max(batch[n].epoch for n in checkpoints)
                self.backend.log(f"checkpoint {' and '.join(checkpoints)} of epoch {epoch} uploaded to "
                                 f"{self.storage.uri(self.storage.locate(self.prefix))}", epoch=epoch)
            if "last.pt" in uploaded and self.on_stored:
                self.on_stored(batch["last.pt"].epoch)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
