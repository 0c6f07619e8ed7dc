"""The small shared glue of the trainer: exit codes, errors, logging with secret redaction.

Every other module imports from here; this module imports no other module of the project (but
jsonlog, inside setup_logging, for LOG_FORMAT=json).
Owns: the exit codes a Kubernetes Job's podFailurePolicy acts on, the error classes whose type
decides them (BadInput 2, TransientError 75, Cancelled 143, anything else 1), the Redactor every
text that leaves the process passes through, logging to stderr, and small helpers (`within`,
`available_cpus`, `now_iso`, `human_size`).

Environment: LOG_LEVEL and LOG_FORMAT (read by setup_logging); every variable whose name
contains KEY, SECRET, TOKEN or PASSWORD is a secret the Redactor masks.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping

LOGGER = logging.getLogger("trainer")

# Exit codes: a Kubernetes Job's podFailurePolicy acts on these (see README, "Exit codes").
EXIT_OK = 0  # the job did what it was asked


EXIT_ERROR = 1  # unexpected error (a bug, or a failure nobody classified): retry at most a little


EXIT_BAD_INPUT = 2  # bad configuration or input: retrying cannot help (FailJob)


EXIT_TRANSIENT = 75  # infrastructure failure (storage down, network): retrying can help (EX_TEMPFAIL)


EXIT_CANCELLED = 143  # SIGTERM/SIGINT or cancelled by the backend (128 + SIGTERM)


SECRET_NAME_PARTS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


class TrainerError(Exception):
    """A failure the entry points know how to report; its class decides the exit code."""

    exit_code = EXIT_ERROR


class BadInput(TrainerError):
    """Bad configuration or input: the same job will fail the same way again."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class TransientError(TrainerError):
    """Infrastructure failed (storage unreachable, throttled): a retry of the job may succeed."""

    exit_code = EXIT_TRANSIENT


class Cancelled(TrainerError):
    """The job was told to stop (signal or backend cancellation)."""

    exit_code = EXIT_CANCELLED


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")


def is_secret_name(name: str) -> bool:
    """True for variables whose value must never be shown (…KEY, …SECRET, …TOKEN, …PASSWORD)."""
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


class Redactor:
    """Masks secret values and URL credentials in any text that leaves the process."""

    def __init__(self, secrets: list[str]):
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Redactor:
        return cls([value for name, value in environ.items() if is_secret_name(name) and value])

    def __call__(self, text: Any) -> str:
        text = _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", str(text))
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class _RedactingFilter(logging.Filter):
    """Secrets masked in every record; colour codes (Ultralytics') removed unless stderr is a terminal."""

    COLOURS = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact
        self.plain = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(self.COLOURS.sub("", message) if self.plain else message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True


def setup_logging(environ: Mapping[str, str], redact: Redactor, capture_stdout: bool = False) -> None:
    """Log to stderr, through the redaction filter; Ultralytics' logger is routed here too.

    LOG_FORMAT=json: one JSON object per line, and whatever else the process writes to stderr (to
    stdout too with capture_stdout: train.py's carries nothing else) becomes such lines (jsonlog.py).
    """
    level = (environ.get("LOG_LEVEL") or "INFO").upper()  # config.ENV_VARS has the same default
    if (environ.get("LOG_FORMAT") or "").strip().lower() == "json":  # config.load_settings reports other values
        from jsonlog import json_handler

        handler = json_handler(environ.get("JOB_ID"), capture_stdout)
    else:
        handler = logging.StreamHandler()  # stderr: stdout belongs to predict.py's JSON
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def now_iso() -> str:
    """Current UTC time, ISO 8601 with a Z suffix."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def available_cpus() -> int:
    """CPUs this process may use: affinity, then the cgroup quota a Kubernetes limit sets."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def background(step, *args) -> threading.Thread:
    """Run a step in a helper thread and return it (join it where its result is needed)."""
    worker = threading.Thread(target=step, args=args, name=getattr(step, "__name__", "step"), daemon=True)
    worker.start()
    return worker


def in_background(step, *args) -> Future:
    """Start a step in a helper thread now; `.result()` waits for it and gives its result or raises
    its exception where that is needed. The thread is a daemon: a job that fails first does not wait."""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(step(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=getattr(step, "__name__", "step"), daemon=True).start()
    return future


def within(seconds: float, step, *args) -> None:
    """Run a clean-up step in a helper thread, waiting at most `seconds` for it."""
    worker = threading.Thread(target=step, args=args, daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if worker.is_alive():
        LOGGER.warning("%s did not finish within %.0f s; going on", getattr(step, "__name__", "step"), seconds)


def failure_code(logger: logging.Logger, what: str, error: Exception, redact: "Redactor") -> int:
    """Log why an entry point's work failed and return the exit code for it: a TrainerError says why
    in a line (its own code); anything else is unexpected, logged with its traceback (EXIT_ERROR)."""
    if isinstance(error, TrainerError):
        logger.error("%s failed (exit %d): %s", what, error.exit_code, redact(error))
        return error.exit_code
    logger.error("%s failed: %s", what, redact(f"{type(error).__name__}: {error}"), exc_info=error)
    return EXIT_ERROR


def exit_now(code: int) -> None:
    """End the process with `code` as soon as its work and output are out, skipping the interpreter's
    teardown (unloading torch and the rest: 2-4 s measured, see docs/performance.md, in which a pod
    would sit finished). What a normal exit does that matters still happens, in the same order: other
    non-daemon threads are waited for (bounded here), then the atexit functions run (logging's flush,
    the JSON log capture's drain, multiprocessing's clean-up of its children), then the streams are flushed."""
    import atexit
    import sys
    import time
    from concurrent.futures import thread as pool_threads

    # what interpreter shutdown does first: tell idle thread-pool workers (of pools a library never
    # shut down, e.g. MLflow's artifact uploads) to end, then wait for every non-daemon thread
    waker = threading.Thread(target=getattr(pool_threads, "_python_exit", lambda: None), daemon=True)
    waker.start()
    deadline = time.monotonic() + 30.0
    waker.join(30.0)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter shutdown would run next
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # predict.py swaps them
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)
