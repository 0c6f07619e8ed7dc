"""The epoch reports a job still owes the backend, kept in storage beside the last.pt they describe.

An epoch's validation result and training-metrics row go to the backend once that epoch's last.pt
is in storage. A job killed between those two moments (SIGKILL, a lost node) would resume after the
epoch and never report it. So the reports travel with the checkpoint:

- before a last.pt goes up, every report the backend has not yet taken is written to
  `checkpoints/job-{JOB_ID}/reports.json` (the reports already carry their `event_id`);
- once the backend has taken (or refused for good) a report, the file is rewritten without it,
  in the background;
- a job started again for the same JOB_ID first sends what the file holds for the epochs its
  last.pt holds, with the same `event_id`s, so a backend that de-duplicates on `event_id` stores
  each report once even in the rare case that the first job's delivery and the kill crossed.

Without CALLBACK_URL nothing is written or read. A failed write is logged and never stops an upload.
Environment (through Settings): CALLBACK_URL (enables it), JOB_ID (the key).
Imports: storage.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from storage import Storage, StorageNotFound

LOGGER = logging.getLogger("trainer")

REPORTS_KEY = "reports.json"  # checkpoints/job-{JOB_ID}/reports.json
ROUTES = ("validation-results", "training-metrics")


class Outbox:
    """The reports not yet taken by the backend, per epoch and route, mirrored to storage."""

    GATHER = 0.25  # seconds a rewrite waits for the other route of the same epoch: one PUT, not two

    def __init__(self, storage: Storage, prefix: str, enabled: bool = True):
        self.storage = storage
        self.loc = storage.locate(prefix + REPORTS_KEY)
        self.enabled = enabled
        self._entries: dict[int, dict] = {}  # epoch -> {"epoch", route: body or None, "images": [...]}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._written: bytes | None = None  # what storage holds, as far as this process knows
        self._dirty = threading.Event()
        self._closed = False
        self._held = False  # this process has held reports: only then is the file its to write
        if enabled:
            threading.Thread(target=self._rewriter, name="reports-outbox", daemon=True).start()

    def add(self, epoch: int, result: dict, images: list[dict], row: dict) -> None:
        """An epoch's reports, owed from now until the backend takes them."""
        if self.enabled:
            with self._lock:
                self._entries[epoch] = {"epoch": epoch, "validation-results": result, "images": images,
                                        "training-metrics": row}
                self._held = True

    def done(self, epoch: int, route: str) -> None:
        """The backend took (or refused for good) this epoch's report on `route`: not owed any more."""
        with self._lock:
            entry = self._entries.get(epoch)
            if entry is None or entry.get(route) is None:
                return
            entry[route] = None
            if not any(entry.get(r) for r in ROUTES):
                del self._entries[epoch]
        self._dirty.set()

    def owed(self, epoch: int) -> list[dict]:
        """Reports of the epochs up to `epoch` that an earlier attempt of this job stored and may not
        have delivered, oldest first; they stay owed (and in storage) until the backend takes them."""
        if not self.enabled:
            return []
        try:
            entries = json.loads(self.storage.read_bytes(self.loc))
        except StorageNotFound:
            return []
        except Exception as e:  # unreadable or damaged: the reports are lost, the job is not
            LOGGER.warning("cannot read %s: %s", self.storage.uri(self.loc), e)
            return []
        if not isinstance(entries, list):
            return []
        owed = sorted((e for e in entries if isinstance(e, dict) and isinstance(e.get("epoch"), int)
                       and e["epoch"] <= epoch and any(isinstance(e.get(r), dict) for r in ROUTES)),
                      key=lambda e: e["epoch"])
        with self._lock:
            for entry in owed:
                self._entries[entry["epoch"]] = entry
                self._held = True
        return owed

    def write(self) -> None:
        """Store what is owed now (before a last.pt goes up); a write that fails is only logged. A process
        that never held a report leaves the file alone (after multi-GPU training the DDP worker that
        reported owns it, not train.py's own process)."""
        if not self.enabled or not self._held:
            return
        with self._write_lock:
            with self._lock:
                data = json.dumps([self._entries[e] for e in sorted(self._entries)]).encode()
            if data == self._written:
                return
            try:
                self.storage.put_bytes(data, self.loc, "application/json")
                self._written = data
            except Exception as e:
                LOGGER.warning("could not store the owed epoch reports (%s): a job killed now and started "
                               "again may not report them", e)

    def close(self) -> None:
        """Store what is owed at the end (what the backend did not take is sent by a restarted job)."""
        self._closed = True
        self._dirty.set()
        self.write()

    def _rewriter(self) -> None:
        while not self._closed:
            self._dirty.wait()
            time.sleep(self.GATHER)
            self._dirty.clear()
            if not self._closed:
                self.write()
