"""The job's warnings and errors on the backend's `logs` route, which the contract names for them.

A logging handler on train.py's "trainer" logger: the platform's log panel shows why a job failed or
what went wrong along the way (a dataset problem, a background upload that failed, tracking switched off).
Imports: backend.
"""

from __future__ import annotations

import logging

from backend import Backend


class LogForwarder(logging.Handler):
    """The job's warnings and errors (the "trainer" loggers), also on the backend's `logs` route,
    which the contract names for them: the platform's log panel shows why a job failed or what went
    wrong along the way. Not forwarded: the callback client's own records (a backend in trouble is
    not told through itself), records marked `extra={"local_only": True}` (a signal handler's: it
    must not take the client's locks), and, past LIMIT, the rest (one notice says so)."""

    LIMIT = 200
    LEVELS = {logging.WARNING: "WARNING", logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}

    def __init__(self, backend: Backend):
        super().__init__(logging.WARNING)
        self.backend = backend
        self.sent = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Decided before the handler's lock is taken: the client logs while holding its own lock,
        and a record forwarded from another thread waits for that lock while holding this one."""
        return (record.module != "backend" and not getattr(record, "local_only", False)
                and self.sent <= self.LIMIT and super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sent += 1
            if self.sent > self.LIMIT:
                self.backend.log(f"more than {self.LIMIT} warnings: the rest are in the job's own log only",
                                 level="WARNING")
                return
            self.backend.log(record.getMessage(), level=self.LEVELS.get(record.levelno, "WARNING"),
                             epoch=getattr(record, "epoch", None))
        except Exception:  # a log line never fails the job
            self.handleError(record)
