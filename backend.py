"""The callback client: the contract's routes to the platform's backend, sent from background
threads so that a slow, failing or dead backend never slows or decides training.

Owns: the bodies' envelope (`event_id`, the event log), per-route ordering, retries with backoff,
the chain from a stored validation result to its per-image results, 404 and 422 handling, the
health poll that carries the backend's cancellation, and the bounded flush at exit.
Environment (through config.BackendSettings): CALLBACK_URL, INTERNAL_AUTH_TOKEN,
CALLBACK_CONNECT_TIMEOUT, CALLBACK_TIMEOUT, CALLBACK_MAX_ATTEMPTS, CALLBACK_FLUSH_TIMEOUT,
CALLBACK_HEALTH_INTERVAL, TLS_CA_BUNDLE, TLS_VERIFY.
Imports: utils, config.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from config import BackendSettings
from utils import Redactor, now_iso

LOGGER = logging.getLogger("trainer")

RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


TERMINAL_STATUSES = {"completed", "failed", "cancelled"}


@dataclasses.dataclass(eq=False)
class Event:
    method: str
    route: str
    body: dict | list
    key: str  # events with the same key are delivered one at a time, in order
    critical: bool  # never dropped or coalesced; retried until the flush deadline
    barrier: bool = False  # the final status: sent only after every earlier critical event
    progress: bool = False  # a per-epoch progress status: a newer one replaces it while queued
    on_success: Callable[[Any], None] | None = None  # called with the response once the backend took it
    on_done: Callable[[], None] | None = None  # called once the backend took it or refused it for good
    on_refused: Callable[[], None] | None = None  # called once it was refused for good (taken: on_success)
    attempts: int = 0
    refusals: int = 0  # connection attempts refused (ECONNREFUSED): nothing listens at the backend's address
    not_before: float = 0.0
    sending: bool = False  # a sender holds it right now: it cannot be dropped or coalesced
    queued: float = dataclasses.field(default_factory=time.monotonic)


class Backend:
    """Sends the contract's callbacks from background threads; never blocks or fails training.

    - Every event gets an `event_id` that stays the same across its retries (each element of an
      array body gets its own), and is appended to a JSON-lines event log before it is sent.
    - Order: `status` events, `validation-results`, `training-metrics` and the `metrics` of one
      name are each delivered in order, one at a time; different routes and names (and log
      messages, which carry their timestamp) go out in parallel on SENDERS (12) threads, so a slow
      backend does not build a backlog. The final status waits for every status before it, and for
      the validation results before it that are on their first attempt, ORDER_GRACE (2 s) at most:
      a failing route, or a backend that hangs, must not hold the job's end back; metrics and logs
      still queued may arrive after it.
    - Chained: the answer to `validation-results` carries `validation_result_id`; the epoch's
      per-image results then go to `validation-image-results` in arrays of IMAGE_BATCH.
    - Retries: connection errors, timeouts, 408/425/429/5xx, with exponential backoff and full
      jitter, honouring Retry-After. `status` and `validation-results` are retried until the
      flush deadline; other events up to CALLBACK_MAX_ATTEMPTS times. A 404 switches the route
      off (a `training-metrics` row then goes out as one `metrics` post per number); a 422 (the
      body does not match the backend's schema) is logged once per route with the backend's
      detail; other 4xx are logged once per route and status. None of them is retried.
    - Bounded: a queued progress status is replaced by a newer one, and past MAX_QUEUE events the
      oldest metric or log event is dropped (it stays in the event log); status and validation
      results are never dropped.
    - `close()` flushes until CALLBACK_FLUSH_TIMEOUT, but stops at once when the backend refuses
      connections: a backend that is down is not waited for.
    Without CALLBACK_URL events are only logged.
    """

    SENDERS = 12
    ORDER_GRACE = 2.0  # seconds the final status waits for validation results on their first attempt
    MAX_QUEUE = 10_000
    IMAGE_BATCH = 100
    BACKOFF_BASE = 0.5
    BACKOFF_CAP = 30.0

    def __init__(self, settings: BackendSettings, redact: Redactor, event_log: Path | None = None):
        self.settings = settings
        self.redact = redact
        self.event_log = event_log
        self._queue: list[Event] = []
        self._inflight: set[str] = set()
        self._cond = threading.Condition()
        self._log_lock = threading.Lock()
        self._closed = False
        self.final_status: str | None = None  # the terminal status this job reported, once it did
        self._poll_now = False
        self._deadline = math.inf
        self._unreachable = False
        self._dropped = 0
        self._disabled_routes: set[str] = set()
        self._warned: set[tuple[str, int]] = set()
        self._local = threading.local()
        self._threads = []
        if settings.url:
            self._threads = [threading.Thread(target=self._sender, name=f"callback-sender-{i}", daemon=True)
                             for i in range(self.SENDERS)]
            for t in self._threads:
                t.start()

    # -- the contract's routes ------------------------------------------------------------------

    def status(self, status: str, progress: float, error: str | None = None, **extra) -> None:
        body = {"status": status, "error": self.redact(error) if error else None,
                "progress": round(max(0.0, min(100.0, progress)), 2), "updated_at": now_iso(), **extra}
        final = status in TERMINAL_STATUSES
        if final:
            self.final_status = status
        self._emit("PATCH", "status", body, critical=True, barrier=final,
                   progress=status == "running" and "epoch" in extra)

    def validation_results(self, body: dict, images: list[dict] | None = None,
                           on_done: Callable[[], None] | None = None) -> None:
        """One epoch's validation result; once the backend has stored it, its per-image results.
        A body may bring its own `event_id` (a report sent again after a restart keeps its first one).
        `on_done` runs once the result and all its per-image results were taken (or refused for good)."""
        body = {**body, "event_id": body.get("event_id") or uuid.uuid4().hex}

        def accepted(response) -> None:
            result_id = _answer_field(response, "validation_result_id", "id")
            if isinstance(result_id, int):
                self.validation_image_results(result_id, body["epoch"], images, body["event_id"], on_done)
                return
            if ("validation-image-results", 0) not in self._warned:
                self._warned.add(("validation-image-results", 0))
                LOGGER.warning("the backend's validation-results answer has no validation_result_id: "
                               "per-image results are not sent")
            _call(on_done)

        if images:  # done once the images are: `accepted` passes on_done down to them
            self._emit("POST", "validation-results", body, critical=True, on_success=accepted,
                       on_refused=on_done)
        else:
            self._emit("POST", "validation-results", body, critical=True, on_done=on_done)

    def validation_image_results(self, result_id: int, epoch: int, images: list[dict], parent: str,
                                 on_done: Callable[[], None] | None = None) -> None:
        """Per-image results of a stored validation result, IMAGE_BATCH per request. Their event_ids
        derive from the result's (`parent`), so the same result sent again brings the same ids.
        `on_done` runs once every request was taken (or refused for good)."""
        starts = range(0, len(images), self.IMAGE_BATCH)
        each = _after_all(len(starts), on_done)
        for i in starts:
            chunk = [{**image, "validation_result_id": result_id, "epoch": epoch,
                      "event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{parent}/{i + j}").hex}
                     for j, image in enumerate(images[i:i + self.IMAGE_BATCH])]
            self._emit("POST", "validation-image-results", chunk, on_done=each)

    def training_metrics(self, row: dict, on_done: Callable[[], None] | None = None) -> None:
        """One epoch's row of every number; a backend without the route gets them as `metrics`.
        `on_done` runs once the row (or every `metrics` post in its place) was taken."""
        if "training-metrics" in self._disabled_routes:
            self._metrics_instead(row, on_done)
        else:
            self._emit("POST", "training-metrics", row, on_done=on_done)

    def metric(self, name: str, value: float, epoch: int, on_done: Callable[[], None] | None = None,
               **extra) -> None:
        body = {"name": name, "value": value, "epoch": epoch, "timestamp": now_iso(), **extra}
        self._emit("POST", "metrics", body, key=f"metrics:{name}", on_done=on_done)

    def log(self, message: str, level: str = "INFO", epoch: int | None = None) -> None:
        body = {"message": self.redact(message), "level": level, "timestamp": now_iso()}
        if epoch is not None:
            body["epoch"] = epoch
        self._emit("POST", "logs", body, key=f"logs:{uuid.uuid4().hex}")  # unordered: each carries its time

    def health(self) -> str | None:
        """The backend's job_status, or None when it cannot tell (no URL, error, no route)."""
        if not self.settings.url or "health" in self._disabled_routes:
            return None
        try:
            response = self._http().get(f"{self.settings.url}/health", headers=self._headers(),
                                        timeout=(self.settings.connect_timeout, self.settings.timeout),
                                        verify=self.settings.verify)
            if response.status_code == 404:
                self._disable("health")
                return None
            return response.json().get("job_status") if response.ok else None
        except Exception as e:  # never let a health check fail the job
            LOGGER.debug("health check failed: %s", self.redact(e))
            return None

    def watch_cancellation(self, interval: float, on_cancel) -> None:
        """Poll GET /health in the background: at once, then every `interval` seconds and whenever
        `poll_health_now` asks (after each epoch); call on_cancel once on 'cancelled'."""
        if not self.settings.url or interval <= 0:
            return

        def poll() -> None:
            while not self._closed:
                if self.health() == "cancelled":
                    on_cancel("cancelled by the backend")
                    return
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._poll_now, timeout=interval)
                    self._poll_now = False

        threading.Thread(target=poll, name="health-poll", daemon=True).start()

    def poll_health_now(self) -> None:
        """Ask the health poller (if any) to ask the backend now rather than at its next interval."""
        with self._cond:
            self._poll_now = True
            self._cond.notify_all()

    # -- queueing -------------------------------------------------------------------------------

    def _emit(self, method: str, route: str, body: dict | list, critical: bool = False, barrier: bool = False,
              progress: bool = False, key: str | None = None, on_success: Callable[[Any], None] | None = None,
              on_done: Callable[[], None] | None = None, on_refused: Callable[[], None] | None = None) -> None:
        if isinstance(body, list):
            body = [{**element, "event_id": element.get("event_id") or uuid.uuid4().hex} for element in body]
        else:
            body = {**body, "event_id": body.get("event_id") or uuid.uuid4().hex}
        self._append_event_log(method, route, body)
        if not self.settings.url:
            LOGGER.info("event %s %s: %s", method, route, json.dumps(body)[:500])
            return
        event = Event(method, route, body, key or route, critical, barrier, progress, on_success, on_done, on_refused)
        with self._cond:
            if progress:  # only the newest progress matters to the backend
                self._queue = [e for e in self._queue if not (e.progress and not e.sending)]
            if len(self._queue) >= self.MAX_QUEUE:
                self._drop_oldest_droppable()
            self._queue.append(event)
            self._cond.notify_all()

    def _drop_oldest_droppable(self) -> None:
        for i, e in enumerate(self._queue):
            if not e.critical and not e.progress and not e.sending:
                del self._queue[i]
                self._dropped += 1
                if self._dropped == 1:
                    LOGGER.warning("callback queue full (backend slow or down): dropping the oldest metric "
                                   "and log events; they stay in the event log")
                return

    def _metrics_instead(self, row: dict, on_done: Callable[[], None] | None = None) -> None:
        """The backend has no training-metrics route: the row's numbers go out one `metrics` post each,
        with event_ids derived from the row's (the same row sent again brings the same ids)."""
        numbers = row.get("extra_metrics") or {}
        each = _after_all(len(numbers), on_done)
        for name, value in numbers.items():
            event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{row.get('event_id') or uuid.uuid4().hex}/{name}").hex
            self.metric(name, value, row["epoch"], on_done=each, step=row["epoch"], event_id=event_id)

    def _append_event_log(self, method: str, route: str, body: dict) -> None:
        if self.event_log is None or self._closed:  # closed: the log is in storage, its folder going away
            return
        try:
            with self._log_lock:
                self.event_log.parent.mkdir(parents=True, exist_ok=True)
                with self.event_log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"method": method, "route": route, "body": body}) + "\n")
        except OSError as e:
            LOGGER.warning("cannot write event log %s: %s", self.event_log, e)

    def _next(self, now: float) -> Event | float:
        """The next event a sender may take, or how long to wait before one may be ready."""
        blocked = set(self._inflight)
        wait = math.inf
        for i, e in enumerate(self._queue):
            if e.barrier:  # the final status: after every earlier status, and after earlier validation
                # results still on their first attempt, for ORDER_GRACE at most: one that failed, or a
                # backend that hangs, does not hold the job's end back
                first = now - e.queued < self.ORDER_GRACE
                if e.sending or any(x.route == "status" or (first and x.critical and x.attempts - x.sending <= 0)
                                    for x in self._queue[:i]):  # (an attempt counts from its start)
                    return min(wait, max(0.01, self.ORDER_GRACE - (now - e.queued))) if first else wait
                if e.not_before <= now:
                    return e
                return min(wait, e.not_before - now)
            if e.key in blocked:
                continue
            blocked.add(e.key)
            if e.not_before <= now:
                return e
            wait = min(wait, e.not_before - now)
        return wait

    def _sender(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._closed and (self._unreachable or now >= self._deadline or not self._queue):
                        self._cond.notify_all()
                        return
                    got = self._next(now)
                    if isinstance(got, Event):
                        break
                    timeout = min(got, self._deadline - now) if self._closed else got
                    self._cond.wait(None if timeout == math.inf else max(timeout, 0.001))
                event = got
                event.sending = True
                self._inflight.add(event.key)
            try:
                delay = self._attempt(event)
            except Exception as e:  # a sender thread must never die: its route would stall for good
                LOGGER.warning("sending %s %s failed unexpectedly: %s: %s", event.method, event.route,
                               type(e).__name__, self.redact(e))
                event.attempts += 1
                delay = None if event.attempts >= self.settings.max_attempts else 1.0
            with self._cond:
                event.sending = False
                self._inflight.discard(event.key)
                if delay is None:
                    if event in self._queue:  # close() may have given up on the queue meanwhile
                        self._queue.remove(event)
                else:
                    event.not_before = time.monotonic() + delay
                self._cond.notify_all()

    # -- one attempt ----------------------------------------------------------------------------

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.settings.token:
            headers["X-Internal-Auth"] = self.settings.token
        return headers

    def _http(self):
        """One requests session per thread (sessions are not thread-safe)."""
        if getattr(self._local, "session", None) is None:
            import requests

            self._local.session = requests.Session()
        return self._local.session

    def _disable(self, route: str) -> None:
        if route not in self._disabled_routes:
            self._disabled_routes.add(route)
            LOGGER.warning("backend has no %s route (404): not sending to it again", route)

    def _attempt(self, event: Event) -> float | None:
        """Send once. None when the event is done with (sent or given up), else seconds to wait."""
        import requests

        if event.route in self._disabled_routes:  # switched off by a 404 since it was queued
            self._route_absent(event)
            return None
        event.attempts += 1
        retry_after = None
        try:
            # verify per request: a session's verify loses to REQUESTS_CA_BUNDLE in the environment
            response = self._http().request(
                event.method, f"{self.settings.url}/{event.route}", json=event.body, headers=self._headers(),
                timeout=(self.settings.connect_timeout, self.settings.timeout), verify=self.settings.verify)
            code = response.status_code
            if code < 400:
                if event.on_success:
                    try:
                        event.on_success(response)
                    except Exception as e:  # the event itself was delivered: never send it again
                        LOGGER.warning("after %s %s: %s: %s", event.method, event.route, type(e).__name__, e)
                _call(event.on_done)
                return None
            if code == 404:
                self._disable(event.route)
                self._route_absent(event)
                return None
            if code not in RETRY_STATUSES:
                if (event.route, code) not in self._warned:
                    self._warned.add((event.route, code))
                    hint = " (check INTERNAL_AUTH_TOKEN)" if code in (401, 403) else ""
                    if code == 422:
                        hint = " (the body does not match the backend's schema; numbers of this route are lost)"
                    LOGGER.error("backend rejected %s %s with %d%s: %s", event.method, event.route, code, hint,
                                 self.redact(_refusal_detail(response)))
                _call(event.on_done)  # refused for good: sending it again would not change that
                _call(event.on_refused)
                return None
            retry_after = _retry_after(response.headers.get("Retry-After"))
            problem = f"HTTP {code}"
        except (requests.ConnectionError, requests.Timeout) as e:
            if _refused(e):
                event.refusals += 1
                if self._closed and event.refusals >= 2:  # refused again at exit: nothing listens there
                    self._unreachable = True
                    LOGGER.warning("backend refuses connections at exit: not waiting for it")
                    return 0.0
                if self._closed:
                    return 0.2  # one quick retry: a restarting backend or a lost race, not yet "down"
            problem = type(e).__name__
        except Exception as e:
            problem = type(e).__name__
        if not event.critical and event.attempts >= self.settings.max_attempts:
            LOGGER.warning("giving up on %s %s after %d attempts (%s)", event.method, event.route, event.attempts, problem)
            return None
        backoff = random.uniform(0, min(self.BACKOFF_CAP, self.BACKOFF_BASE * 2 ** (event.attempts - 1)))
        LOGGER.debug("%s %s failed (%s), retrying in %.1f s", event.method, event.route, problem, backoff)
        return max(backoff, retry_after or 0.0)

    def _route_absent(self, event: Event) -> None:
        """The event's route is absent (404): a training-metrics row goes out as `metrics` posts (done
        once they are), anything else is done with."""
        if event.route == "training-metrics":
            self._metrics_instead(event.body, event.on_done)
        else:
            _call(event.on_done)
            _call(event.on_refused)

    def close(self, timeout: float | None = None) -> int:
        """Deliver what is queued for up to `timeout` seconds, then stop. Returns events left unsent."""
        if not self._threads:
            self._closed = True
            return 0
        timeout = self.settings.flush_timeout if timeout is None else timeout
        with self._cond:
            self._closed = True
            self._deadline = time.monotonic() + timeout
            for e in self._queue:
                e.not_before = 0.0  # one more try now, whatever the backoff said
            self._cond.notify_all()
        for t in self._threads:
            t.join(max(0.0, self._deadline - time.monotonic()) + 0.05)
        with self._cond:
            left = [e for e in self._queue if not e.sending]
            inflight = len(self._queue) - len(left)
            self._queue = [e for e in self._queue if e.sending]  # a sender still owns these
        if left:
            LOGGER.warning("%d callback event(s) not delivered; they are in the event log", len(left))
        if inflight:
            LOGGER.warning("%d callback event(s) still in flight at exit", inflight)
        return len(left)


def _after_all(count: int, callback: Callable[[], None] | None) -> Callable[[], None] | None:
    """A callback to give each of `count` events: the last of them to be done runs `callback`."""
    if callback is None:
        return None
    if count == 0:
        _call(callback)
        return None
    left = [count]
    lock = threading.Lock()

    def one_done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            _call(callback)

    return one_done


def _call(callback: Callable[[], None] | None) -> None:
    """Run an event's on_done; its failure is logged, never raised into a sender."""
    if callback is not None:
        try:
            callback()
        except Exception as e:
            LOGGER.warning("after a callback: %s: %s", type(e).__name__, e)


def _refused(error: BaseException) -> bool:
    """True only when the connection was actively refused (ECONNREFUSED): a reset, a dropped keep-alive,
    a timeout or a TLS failure is a fault worth retrying, not a backend that is down."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED:
            return True
        if "Connection refused" in str(error) and "NewConnectionError" in type(error).__name__:
            return True
        # where it came from: the cause, the context, urllib3's `reason`, or an exception in args;
        # only exceptions are followed (ssl.SSLError's `reason` is a string such as 'CERTIFICATE_VERIFY_FAILED')
        links = [error.__cause__, error.__context__, getattr(error, "reason", None), *getattr(error, "args", ())]
        error = next((e for e in links if isinstance(e, BaseException)), None)
    return False


def _answer_field(response, *names: str) -> Any:
    """The first of names in a JSON object answer, or None."""
    try:
        answer = response.json()
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    return next((answer[n] for n in names if answer.get(n) is not None), None)


def _refusal_detail(response) -> str:
    """A refusal's reason: FastAPI's `detail` list as `field: message; ...`, else the text (shortened)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail[:10]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where or 'body'}: {item.get('msg', item)}")
        return "; ".join(parts)[:1000]
    return str(detail if detail is not None else response.text)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(float(value), 300.0)
    except ValueError:
        try:
            when = dt.datetime.strptime(value, "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=dt.timezone.utc)
            return max(0.0, min((when - dt.datetime.now(dt.timezone.utc)).total_seconds(), 300.0))
        except ValueError:
            return None
