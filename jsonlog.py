"""LOG_FORMAT=json: one JSON object per line on stderr, as log collectors (Loki, Fluent Bit,
CloudWatch) take them.

Each line is {"time", "level", "logger", "job_id", "message"}, plus "epoch" where the record has
one (the epoch summaries pass it with `extra=`) and "exception" (the whole traceback, one string).
Everything else the process writes becomes such lines too, so that every line on stderr parses:
file descriptor 2 (and 1 for train.py, whose stdout carries nothing a caller reads) is a pipe
that a thread reads line by line into records of the logger "stderr" (or "stdout"). That covers
Ultralytics' progress bars (a bar's last frame, once it is done), print() calls, messages of C
libraries, and the output of child processes such as the multi-GPU workers. A traceback printed
raw becomes one ERROR record; Python warnings go through logging. Secrets are masked by the
handler's redaction filter (utils.Redactor), as in text mode.

What a process writes in the instant before os._exit (the shutdown watchdog's hard exit) may be
lost: the pipe is drained at a normal exit only.
Imports: nothing of the project (utils.setup_logging imports this module).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import re
import sys
import threading

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves (Ultralytics' colorstr and bars)


TRACEBACK = "Traceback (most recent call last):"


_capture: OutputCapture | None = None  # file descriptors are process-wide: one capture per process


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, job_id, message, epoch."""

    def __init__(self, job_id: str | None):
        super().__init__()
        self.job_id = job_id or None

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z"), "level": record.levelname, "logger": record.name, "job_id": self.job_id,
                 "message": ANSI.sub("", record.getMessage())}
        epoch = getattr(record, "epoch", None)
        if epoch is not None:
            entry["epoch"] = epoch
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_handler(job_id: str | None, capture_stdout: bool = False) -> logging.Handler:
    """A handler writing JSON lines to the real stderr, with the process's output captured as records."""
    global _capture
    if _capture is None:
        _capture = OutputCapture()
        atexit.register(_capture.close)
    if capture_stdout:
        _capture.add(1, "stdout")
    handler = logging.StreamHandler(_capture.stderr)
    handler.setFormatter(JsonFormatter(job_id))
    handler.json_lines = True
    logging.captureWarnings(True)  # a warning is one WARNING record, not two raw lines
    logging.raiseExceptions = False  # a failing handler must not write into the pipe it is draining
    return handler


def json_logging() -> bool:
    """True when the root logger writes JSON lines (no terminal bars then)."""
    return any(getattr(h, "json_lines", False) for h in logging.getLogger().handlers)


class OutputCapture:
    """File descriptors turned into pipes whose lines become log records; stderr keeps a copy of
    the real stderr for the JSON handler."""

    def __init__(self):
        self.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        self.saved: dict[int, int] = {}
        self.readers: list[threading.Thread] = []
        self.add(2, "stderr")

    def add(self, fd: int, name: str) -> None:
        if fd in self.saved:
            return
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        read_end, write_end = os.pipe()
        self.saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        reader = threading.Thread(target=_read_lines, args=(read_end, logging.getLogger(name)), daemon=True,
                                  name=f"log-capture-{name}")
        reader.start()
        self.readers.append(reader)

    def close(self, timeout: float = 2.0) -> None:
        """At exit: give the file descriptors back, then let the readers drain what is left."""
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)  # closes this process's write end of the pipe
            os.close(saved)
        self.saved.clear()
        for reader in self.readers:
            reader.join(timeout)  # a child still holding the pipe keeps it open: not waited for longer


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _read_lines(fd: int, logger: logging.Logger) -> None:
    """Each line read becomes a record; a raw traceback (header to exception line) one ERROR record."""
    pending, traceback = b"", None
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            try:
                chunk = pipe.read(65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                traceback = _line(logger, raw, traceback)
    if pending:
        traceback = _line(logger, pending, traceback)
    if traceback:
        logger.error("%s", "\n".join(traceback))


def _line(logger: logging.Logger, raw: bytes, traceback: list[str] | None) -> list[str] | None:
    """Log one captured line (a progress bar's last frame: the text after its last carriage return);
    returns the traceback being collected, if any."""
    text = ANSI.sub("", raw.decode("utf-8", "replace").rsplit("\r", 1)[-1]).rstrip()
    if traceback is not None:
        traceback.append(text)
        if text and not text[0].isspace() and text != TRACEBACK:  # the exception line ends it
            logger.error("%s", "\n".join(traceback))
            return None
        return traceback
    if text == TRACEBACK or text.startswith("Exception in thread "):  # the latter: threading's header
        return [text]
    if text.strip():
        logger.info("%s", text.strip())  # the columns' alignment means nothing in a JSON field
    return None
