"""train.py with its steps and per-epoch hooks timed from inside: where its own time and CPU go.

    BENCH_PROBE_OUT=probe.json python -m bench.trainer_probe      # with a training job's environment

Runs `train.main()` exactly as `python train.py` does, after wrapping the trainer's functions that
run per epoch (Ultralytics hooks, checkpoint staging, checks and uploads, backend and MLflow calls)
and its setup and finishing steps. Each wrapper adds the wall time and the calling thread's CPU
time (time.thread_time) to a (function, thread) total. At every epoch end it also samples each
thread's CPU from /proc/self/task, so per-epoch CPU can be split between the training thread, the
trainer's helper threads and the rest (torch's worker pool), and the garbage collector's pauses
so far (timed through gc.callbacks). Writes the totals as JSON to
BENCH_PROBE_OUT; bench/overhead_bench.py --probe runs it and prints the tables. Timing wrappers
cost microseconds per call; the figures are for finding where time goes, not for the targets.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import backend  # noqa: E402
import cache  # noqa: E402
import checkpoints  # noqa: E402
import datasets  # noqa: E402
import outbox  # noqa: E402
import reporting  # noqa: E402
import storage  # noqa: E402
import tracking  # noqa: E402
import train  # noqa: E402

# (owner, attribute): what is wrapped, where its callers look it up. Hooks and per-epoch work
# first, then the job's steps.
WRAPPED = [
    (reporting.EpochReporter, "on_pretrain_routine_end"), (reporting.EpochReporter, "on_batch_end"),
    (reporting.EpochReporter, "on_val_start"), (reporting.EpochReporter, "on_train_epoch_end"),
    (reporting.EpochReporter, "on_model_save"), (reporting.EpochReporter, "on_fit_epoch_end"),
    (checkpoints.CheckpointUploader, "submit"), (checkpoints.CheckpointUploader, "_snapshot"),
    (checkpoints, "checkpoint_problem"), (storage.Storage, "upload"),
    (storage.Storage, "put_bytes"), (storage.Storage, "copy"), (outbox.Outbox, "write"),
    (storage.Storage, "head"), (storage.Storage, "download"), (storage, "file_digest"), (backend.Backend, "_attempt"),
    (backend.Backend, "poll_health_now"), (backend.Backend, "close"), (reporting, "epoch_report"),
    (tracking.Tracker, "start"), (tracking.Tracker, "log_params"), (tracking.Tracker, "log_metrics"),
    (tracking.Tracker, "log_artifacts"), (tracking.Tracker, "finish"),
    (train, "load_settings"), (train, "prepare_training"), (train, "completed_before"), (train, "prepare_run"),
    (train, "download_dataset"), (datasets, "extract_archive"), (train, "resolve_model"), (train, "resolve_task"),
    (train, "check_dataset_or_fail"), (train, "train_model"), (train, "upload_outputs"), (train, "mark_completed"),
    (train, "log_run_artifacts"), (train, "upload_event_log"), (cache, "remove_job_files"),
]

STATS: dict[tuple[str, str], list[float]] = {}  # (function, thread) -> [calls, wall, cpu]
EPOCHS: list[dict] = []  # per epoch end: {"wall": t, "threads": {name: cpu}, "process": cpu}
LOCK = threading.Lock()
GC = {"seconds": 0.0, "collections": [0, 0, 0], "started": 0.0}  # the garbage collector's pauses, all threads


def time_collections(phase: str, info: dict) -> None:
    if phase == "start":
        GC["started"] = time.perf_counter()
    else:
        GC["seconds"] += time.perf_counter() - GC["started"]
        GC["collections"][info["generation"]] += 1


def wrap(owner, name: str) -> None:
    fn = getattr(owner, name)
    label = f"{getattr(owner, '__name__', owner)}.{name}".replace("train.", "").replace("utils.", "")

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            key = (label, threading.current_thread().name)
            with LOCK:
                entry = STATS.setdefault(key, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - wall
                entry[2] += time.thread_time() - cpu

    setattr(owner, name, timed)


def thread_cpu() -> dict[str, float]:
    """CPU seconds of every thread of this process by Python thread name (others: 'torch/native')."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    cpu: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "torch/native")
        cpu[name] = cpu.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return cpu


def sample_epoch(fn):
    @functools.wraps(fn)
    def hook(self, trainer):
        EPOCHS.append({"epoch": trainer.epoch + 1, "wall": time.time(), "threads": thread_cpu(),
                       "process": time.process_time(), "gc_seconds": GC["seconds"],
                       "gc_collections": list(GC["collections"])})
        return fn(self, trainer)
    return hook


def main() -> int:
    gc.callbacks.append(time_collections)
    train.EpochReporter.on_fit_epoch_end = sample_epoch(train.EpochReporter.on_fit_epoch_end)
    for owner, name in WRAPPED:
        wrap(owner, name)
    code = train.main()
    out = os.environ.get("BENCH_PROBE_OUT")
    if out:
        rows = [{"function": f, "thread": t, "calls": c, "wall": w, "cpu": u} for (f, t), (c, w, u) in STATS.items()]
        alive = [f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()
                 if t is not threading.main_thread()]
        Path(out).write_text(json.dumps({"functions": rows, "epochs": EPOCHS, "returned": time.time(),
                                         "threads_at_return": alive}))
    # If the interpreter's shutdown (joining threads, atexit handlers) takes long, say what it waits on.
    faulthandler.dump_traceback_later(1.0, exit=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
