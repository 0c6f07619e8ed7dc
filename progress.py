"""Progress of long storage transfers, for the people who read a job's log or watch its terminal.

A transfer still running after PROGRESS_INTERVAL seconds logs one line every PROGRESS_INTERVAL
seconds until it ends, e.g.

    downloading shapes.zip: 45% (45.0 MB of 100.0 MB) at 9.8 MB/s, ETA 6 s

so short transfers (most checkpoints) log nothing more than their start and end. On a terminal
(stderr is a TTY and logs are text) a tqdm bar takes the place of those lines. Fed by boto3's
transfer callback, which a multipart transfer calls from several threads at once.

Environment (through StorageSettings): PROGRESS_INTERVAL (seconds; 0 = no progress at all).
Imports: utils, jsonlog.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from jsonlog import json_logging
from utils import human_size

LOGGER = logging.getLogger("trainer")


BAR_AFTER = 1.0  # seconds a transfer runs before a terminal gets a bar for it


def on_terminal() -> bool:
    """A person watches stderr: a TTY, with text logs (a JSON log line must stay one object)."""
    try:
        return sys.stderr.isatty() and not json_logging()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def duration(seconds: float) -> str:
    """`6 s`, `4 min 05 s`, `2 h 03 min`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TransferProgress:
    """boto3's `Callback` for one transfer: counts bytes, logs a line every `interval` seconds once
    the transfer has run that long, or drives a tqdm bar on a terminal."""

    def __init__(self, what: str, total: int, interval: float, bar: bool | None = None, file=None):
        self.what = what  # e.g. "downloading shapes.zip"
        self.total = max(0, total)
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self.next_line = self.started + interval
        self.lines = 0
        self._bar_wanted = interval > 0 and (on_terminal() if bar is None else bar)
        self._file = file
        self._bar = None
        self._lock = threading.Lock()

    def __call__(self, transferred: int) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            # a retried part is reported as negative bytes: the count goes back
            self.done = min(self.total, max(0, self.done + transferred))
            now = time.monotonic()
            if self._bar_wanted:
                self._update_bar(now)
            elif now >= self.next_line and self.done < self.total:
                self.next_line = now + self.interval
                self.lines += 1
                LOGGER.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """`<what>: 45% (45.0 MB of 100.0 MB) at 9.8 MB/s, ETA 6 s`"""
        elapsed = max(1e-6, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        return (f"{self.what}: {percent:.0f}% ({human_size(self.done)} of {human_size(self.total)}) "
                f"at {human_size(rate)}/s, ETA {eta}")

    def _update_bar(self, now: float) -> None:
        if self._bar is None:
            if now - self.started < BAR_AFTER or self.done >= self.total:
                return
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.what, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self._file or sys.stderr, leave=False, mininterval=0.5, dynamic_ncols=True)
        self._bar.update(self.done - self._bar.n)
        if self.done >= self.total:
            self._bar.close()


def epoch_summary(epoch: int, total: int, losses: dict, metric: tuple[str, float | None],
                  seconds: float | None, eta: float | None) -> str:
    """The one line per epoch that a reader of `kubectl logs` looks for among the progress bars:
    `epoch 2/10 | train loss box 1.234 cls 2.345 dfl 1.100 | mAP@0.5 0.4560 | 12.3 s, ETA 1 min 38 s`"""
    parts = [f"epoch {epoch}/{total}"]
    if losses:
        parts.append("train loss " + " ".join(f"{name.removesuffix('_loss')} {value:.3f}"
                                              for name, value in losses.items()))
    name, value = metric
    parts.append(f"{name} {value:.4f}" if isinstance(value, (int, float)) else f"{name} -")
    timing = f"{seconds:.1f} s" if seconds is not None else "- s"
    parts.append(f"{timing}, ETA {duration(eta) if eta is not None else 'unknown'}")
    return " | ".join(parts)
