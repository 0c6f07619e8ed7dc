"""The work folder's shared caches, and the clean-up of each job's own files.

Several jobs run one after another, or at once, in the same WORK_DIR (the backend's subprocess
mode). This module owns what they share and what each leaves behind:

- shared caches, kept between jobs and bounded together by CACHE_MAX_BYTES:
  `WORK_DIR/datasets/<entry>/` (extracted datasets, one folder per archive ETag or prefix listing)
  and `WORK_DIR/weights/` (pretrained weights by name, fetched checkpoints, Ultralytics' own);
- job-local files, removed when the job ends unless KEEP_JOB_FILES=true: all in
  `WORK_DIR/jobs/job-{JOB_ID}/` (run folder, staging, data.yaml and lists, classify links, event
  log, and downloads/ for archives before extraction).

Everything else in WORK_DIR (mlflow.db, ultralytics/, matplotlib/, the empty jobs/) stays and is
not counted.

Locks, one pair of files next to each cache entry `X`:
- `X.lock` (fcntl.flock): a job holds it shared from the moment it asks for the entry until it
  ends, so the entry is never evicted under it; eviction takes it exclusive without waiting and
  skips entries it cannot take. Its mtime is the entry's last use, its content the entry's size.
- `X.fill.lock` (filelock): whoever creates the entry holds it for the download and extraction;
  a second job asking for the same entry waits there, then finds the finished entry.
  Entries are created under a temporary name and renamed into place, so a half-made entry never
  looks complete.
- `WORK_DIR/cache.lock` (filelock): one eviction at a time.
- `WORK_DIR/jobs/job-{JOB_ID}.lock` (fcntl.flock, exclusive): train.py's claim on its job folder,
  from its start until the folder is removed: one training per JOB_ID and WORK_DIR at a time.

fcntl.flock is Linux (POSIX) only, as is this trainer. Reads (through Settings): WORK_DIR,
CACHE_MAX_BYTES, KEEP_JOB_FILES, JOB_ID.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from config import Settings
from utils import human_size

LOGGER = logging.getLogger("trainer")

CACHE_DIRS = ("datasets", "weights")  # shared caches under WORK_DIR, bounded by CACHE_MAX_BYTES
LOCK_SUFFIX = ".lock"
FILL_SUFFIX = ".fill.lock"
SIDE_SUFFIXES = (".etag", LOCK_SUFFIX)  # files that belong to a weights entry, not entries themselves

# Shared locks this process holds on the entries it uses (entry path -> descriptor). They must
# outlive the call that takes them (the job uses its dataset until it ends) and are released by
# remove_job_files() or when the process exits: module state like Ultralytics' SETTINGS.
_HELD: dict[Path, int] = {}
_CLAIMED: dict[Path, int] = {}  # the job folder's claim (its lock file -> descriptor), see claim_job_folder


# ----------------------------------------------------------------------------------------------
# Job-local files
# ----------------------------------------------------------------------------------------------


def job_folder(settings: Settings) -> Path:
    """The folder only this job writes (train.py's job_dir)."""
    return settings.work_dir / "jobs" / f"job-{settings.job_id}"


def claim_job_folder(settings: Settings, wait: float) -> bool:
    """Hold this job's lock, `jobs/job-{JOB_ID}.lock`, until its files are removed (or the process
    exits, however it ends): a second process for the same JOB_ID and WORK_DIR (launched twice, or a
    replacement while the first still shuts down) would clear the first's run folder under it.
    Waits up to `wait` seconds for another holder to end; False if it still holds the lock."""
    folder = job_folder(settings)
    path = folder.with_name(folder.name + LOCK_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while (fd := _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    _CLAIMED[path] = fd
    return True


def _release_job_folder() -> None:
    """The claim's end: its file goes first, while still held (`_lock` retakes a lock won on a
    removed file), then the lock."""
    while _CLAIMED:
        path, fd = _CLAIMED.popitem()
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def download_dir(settings: Settings) -> Path:
    """Where this job's archives are downloaded before extraction."""
    return job_folder(settings) / "downloads"


def remove_job_files(settings: Settings) -> None:
    """At the very end of a job, on every way out: release its cache entries and delete its own files.

    KEEP_JOB_FILES=true keeps them (for debugging). Nothing outside WORK_DIR is touched and no
    symbolic link is followed (classify/ holds links into the shared dataset: only the links go).
    """
    release_entries()
    try:
        if settings.keep_job_files:
            LOGGER.info("KEEP_JOB_FILES=true: keeping %s", job_folder(settings))
            return
        # jobs/ itself stays: another job starting now may be creating its folder in it.
        _remove_within(settings.work_dir, job_folder(settings))
    finally:
        _release_job_folder()


def _remove_within(root: Path, path: Path) -> None:
    """Delete path (a file, link or folder) if it lies inside root without passing through a link."""
    if not os.path.lexists(path):
        return
    here = root
    for part in path.relative_to(root).parts[:-1]:
        here = here / part
        if here.is_symlink() or not here.is_dir():
            LOGGER.warning("not removing %s: %s is not a folder inside %s", path, here, root)
            return
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)  # removes links, never what they point to
        LOGGER.info("removed %s", path)
    except OSError as e:
        LOGGER.warning("could not remove %s: %s", path, e)


# ----------------------------------------------------------------------------------------------
# Using and filling cache entries
# ----------------------------------------------------------------------------------------------


def provide(settings: Settings, entry: Path, fill: Callable[[], None], incoming: int) -> bool:
    """Make sure the cache entry exists and hold it for the rest of the job; True if this call made it.

    `fill()` must create `entry` atomically (a temporary name renamed into place). It runs at most
    once across concurrent jobs: the others wait, then use what it made. Before it runs, least
    recently used entries are evicted to make room for `incoming` bytes; after, to bring the
    cache back under its cap with the new entry's real size.
    """
    hold(entry)  # first: from here on nobody evicts it
    if os.path.lexists(entry):
        return False
    with _fill_lock(entry):
        if os.path.lexists(entry):
            LOGGER.info("%s was made by another job meanwhile", entry.name)
            return False
        make_room(settings, incoming, f"{entry.name} ({human_size(incoming)})")
        fill()
        _record_size(entry)
    make_room(settings, 0, entry.name)
    return True


@contextlib.contextmanager
def refreshing(settings: Settings, entry: Path):
    """For a cache file checked against storage on every use (weights by ETag): hold it, and let one
    job at a time download or replace it; then bring the cache under its cap."""
    hold(entry)
    with _fill_lock(entry):
        yield
    make_room(settings, 0, entry.name)


@contextlib.contextmanager
def _fill_lock(entry: Path):
    """The entry's fill lock (waits for another job that holds it); leftovers of killed jobs are cleared."""
    lock = FileLock(_side(entry, FILL_SUFFIX))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        LOGGER.info("waiting for another job to finish %s", entry.name)
        lock.acquire()
    try:
        _remove_stale_temporaries(entry)
        yield
    finally:
        lock.release()


def hold(entry: Path) -> None:
    """A shared lock on the entry until release_entries() or exit, and mark it used now."""
    if entry in _HELD:
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(_side(entry, LOCK_SUFFIX), fcntl.LOCK_SH)
    _HELD[entry] = fd
    os.utime(fd)  # the lock file's mtime is the entry's last use


def release_entries() -> None:
    """Release every shared lock this process holds on cache entries.

    The lock files of an entry that was never made (a failed download) are removed, unless
    another job holds them too.
    """
    while _HELD:
        entry, fd = _HELD.popitem()
        os.close(fd)  # closing the descriptor releases its flock
        if not os.path.lexists(entry):
            _evict(entry)


def _lock(path: Path, mode: int) -> int | None:
    """Open path and flock it (mode may include LOCK_NB: None if taken); a descriptor to close.

    An evictor unlinks an entry's lock file while holding it exclusively: a lock won on such an
    unlinked file protects nothing, so it is dropped and taken again on the file now at path.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _side(entry: Path, suffix: str) -> Path:
    return entry.with_name(entry.name + suffix)


def _record_size(entry: Path) -> None:
    """Write a new dataset folder's size into its lock file (measuring a large folder is slow)."""
    if entry.is_dir() and not entry.is_symlink():
        _side(entry, LOCK_SUFFIX).write_text(str(_tree_size(entry)))


def _remove_stale_temporaries(entry: Path) -> None:
    """Partial downloads and extractions of this entry left by a killed job (only the fill lock's
    holder makes them, so none is in progress)."""
    for tmp in [*entry.parent.glob(f"{entry.name}.tmp-*"), *entry.parent.glob(f"{entry.name}.part-*")]:
        LOGGER.info("removing %s, left by an interrupted job", tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Size cap and least-recently-used eviction
# ----------------------------------------------------------------------------------------------


def make_room(settings: Settings, incoming: int, what: str = "") -> None:
    """Evict least recently used entries that no job holds until the caches plus `incoming` fit the cap.

    CACHE_MAX_BYTES=0 turns the cap off. Entries in use are skipped; when they alone exceed the
    cap, a warning says so and the job goes on.
    """
    cap = settings.cache_max_bytes
    if not cap:
        return
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(settings.work_dir / "cache.lock"):
        entries = cache_entries(settings.work_dir)
        total = sum(size for _, size, _ in entries)
        if total + incoming <= cap:
            return
        for entry, size, used in sorted(entries, key=lambda e: e[2]):
            if total + incoming <= cap:
                break
            if entry in _HELD or not _evict(entry):
                continue
            total -= size
            LOGGER.info("evicted %s (%s, last used %s) from the cache: %s of %s used, %s to add%s",
                        entry.relative_to(settings.work_dir), human_size(size), time.strftime(
                            "%Y-%m-%d %H:%M:%S", time.localtime(used)), human_size(total), human_size(cap),
                        human_size(incoming), f" for {what}" if what else "")
        if total + incoming > cap:
            LOGGER.warning("the caches hold %s in entries in use, more than CACHE_MAX_BYTES=%d with %s to add; "
                           "going on over the cap", human_size(total), cap, human_size(incoming))


def cache_entries(work_dir: Path) -> list[tuple[Path, int, float]]:
    """Every cache entry as (path, size in bytes, last use as a timestamp)."""
    found = []
    datasets = work_dir / "datasets"
    if datasets.is_dir():
        for path in datasets.iterdir():
            if path.is_dir() and not path.is_symlink() and ".tmp-" not in path.name:
                found.append((path, _dataset_size(path), _last_use(path)))
    weights = work_dir / "weights"
    if weights.is_dir():
        for folder, dirs, files in os.walk(weights):  # does not descend into linked folders
            for name in files:
                path = Path(folder) / name
                if name.endswith(SIDE_SUFFIXES) or ".part-" in name or path.is_symlink():
                    continue
                stamp = _side(path, ".etag")
                size = path.stat().st_size + (stamp.stat().st_size if stamp.is_file() else 0)
                found.append((path, size, _last_use(path)))
    return found


def _dataset_size(folder: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(_side(folder, LOCK_SUFFIX).read_text())
    return _tree_size(folder)


def _tree_size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _last_use(entry: Path) -> float:
    """The lock file's mtime (touched on every use), else the entry's own."""
    for path in (_side(entry, LOCK_SUFFIX), entry):
        with contextlib.suppress(OSError):
            return path.stat().st_mtime
    return 0.0


def _evict(entry: Path) -> bool:
    """Delete an entry no job holds (exclusive lock, no wait); False if one does."""
    lock_path = _side(entry, LOCK_SUFFIX)
    fd = _lock(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        LOGGER.debug("not evicting %s: in use", entry.name)
        return False
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
            _side(entry, ".etag").unlink(missing_ok=True)
        _side(entry, FILL_SUFFIX).unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)  # while locked: a job waiting on it takes the new file instead
        return True
    except OSError as e:
        LOGGER.warning("could not evict %s: %s", entry, e)
        return False
    finally:
        os.close(fd)
