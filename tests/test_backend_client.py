"""The callback client against a real HTTP receiver process."""

from __future__ import annotations

import json
import logging
import time

import pytest

from tests.conftest import AUTH_TOKEN, free_port
from utils import Backend, BackendSettings, Redactor, _retry_after


def client(url: str | None, tmp_path, **kw) -> Backend:
    settings = BackendSettings(url=url, token=AUTH_TOKEN, connect_timeout=1, timeout=2,
                               max_attempts=kw.pop("max_attempts", 8), flush_timeout=kw.pop("flush_timeout", 10))
    return Backend(settings, Redactor([AUTH_TOKEN, "s3cr3t-value"]), tmp_path / "events.jsonl")


def test_events_arrive_in_order_per_route_with_auth_header_and_unique_ids(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    backend.status("running", 0)
    for epoch in (1, 2, 3):
        backend.validation_results(epoch, 3, {"mAP50": 0.5})
        backend.metric("train/box_loss", 1.0 / epoch, epoch)
        backend.status("running", 100 * epoch / 3, epoch=epoch)
    backend.log("checkpoint uploaded")
    backend.status("completed", 100)
    assert backend.close() == 0
    entries = receiver.requests()
    assert [e["body"]["epoch"] for e in entries if e["route"] == "validation-results"] == [1, 2, 3]
    assert [e["body"]["epoch"] for e in entries if e["route"] == "metrics"] == [1, 2, 3]
    statuses = [e["body"] for e in entries if e["route"] == "status"]
    assert statuses[0]["progress"] == 0 and statuses[-1]["status"] == "completed"
    critical = [e for e in entries if e["route"] in ("status", "validation-results")]
    assert critical[-1]["body"]["status"] == "completed"  # the final status waits for these
    assert all(e["auth"] == AUTH_TOKEN and e["path"].startswith("/internal/training/1/") for e in entries)
    assert {e["method"] for e in entries if e["route"] == "status"} == {"PATCH"}
    ids = [e["body"]["event_id"] for e in entries]
    assert len(set(ids)) == len(ids)
    assert set(statuses[0]) >= {"status", "error", "progress", "updated_at", "event_id"}
    assert statuses[0]["updated_at"].endswith("Z")


def test_slow_backend_gets_routes_in_parallel(receiver_factory, tmp_path):
    receiver = receiver_factory("--delay", "0.5")
    backend = client(receiver.url("1"), tmp_path)
    start = time.monotonic()
    for name in ("a", "b", "c", "d"):
        backend.metric(name, 1.0, 1)
    assert backend.close() == 0
    assert time.monotonic() - start < 1.5  # four metric names at once, not 4 x 0.5 s in a row
    assert len(receiver.requests("metrics")) == 4


def test_queued_progress_is_coalesced_but_status_changes_are_kept(tmp_path):
    backend = client(f"http://127.0.0.1:{free_port()}", tmp_path, flush_timeout=0)
    backend.BACKOFF_BASE = 5  # the first attempt fails and the rest wait in the queue
    backend.status("running", 0)
    for epoch in range(1, 6):
        backend.status("running", epoch * 10, epoch=epoch)
        backend.validation_results(epoch, 5, {"mAP50": 0.1})
    queued = [(e.route, e.body.get("epoch")) for e in backend._queue]
    assert queued.count(("status", None)) == 1  # the start of the job is a status change: kept
    assert [ep for route, ep in queued if route == "status" and ep] == [5]  # progress: only the newest
    assert [ep for route, ep in queued if route == "validation-results"] == [1, 2, 3, 4, 5]
    backend.close()


def test_full_queue_drops_metrics_never_validation_results(tmp_path):
    backend = client(f"http://127.0.0.1:{free_port()}", tmp_path, flush_timeout=0)
    backend.BACKOFF_BASE, backend.MAX_QUEUE = 5, 10
    for epoch in range(1, 8):
        backend.validation_results(epoch, 7, {"mAP50": 0.1})
        backend.metric("loss", 1.0, epoch)
    routes = [e.route for e in backend._queue]
    assert routes.count("validation-results") == 7 and len(routes) <= 11
    backend.close()
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert len(logged) == 14  # the event log keeps everything


def test_retried_events_keep_their_event_id_and_all_arrive(receiver_factory, tmp_path):
    receiver = receiver_factory("--fail-rate", "0.5", "--seed", "3")
    backend = client(receiver.url("1"), tmp_path)
    backend.BACKOFF_BASE = 0.01
    for epoch in range(1, 11):
        backend.validation_results(epoch, 10, {"mAP50": 0.1})
    assert backend.close() == 0
    all_tries = receiver.requests("validation-results", stored_only=False)
    stored = receiver.requests("validation-results")
    assert len(all_tries) > len(stored)  # failures happened and were retried
    assert [e["body"]["epoch"] for e in stored] == list(range(1, 11))  # each once, in order
    failed_ids = {e["body"]["event_id"] for e in all_tries if e["outcome"] == 500}
    assert failed_ids <= {e["body"]["event_id"] for e in stored}  # a retry is the same event


def test_missing_route_is_dropped_after_one_404_and_its_numbers_go_to_metrics(receiver_factory, tmp_path, caplog):
    receiver = receiver_factory("--missing-route", "validation-results")
    backend = client(receiver.url("1"), tmp_path)
    for epoch in (1, 2, 3):
        backend.validation_results(epoch, 3, {"mAP50": 0.1 * epoch, "recall": 0.5})
    assert backend.close() == 0
    tries = receiver.requests("validation-results", stored_only=False)
    assert len(tries) == 1 and tries[0]["outcome"] == 404
    metrics = {(m["name"], m["epoch"]): m["value"] for m in receiver.bodies("metrics")}
    assert metrics == {("mAP50", e): pytest.approx(0.1 * e) for e in (1, 2, 3)} | {("recall", e): 0.5 for e in (1, 2, 3)}
    assert sum("no validation-results route" in r.message for r in caplog.records) == 1


def test_rejected_auth_is_not_retried(receiver_factory, tmp_path):
    receiver = receiver_factory(token="another-token")
    backend = client(receiver.url("1"), tmp_path)
    backend.status("running", 0)
    backend.status("running", 50)
    assert backend.close() == 0
    assert [e["outcome"] for e in receiver.requests(stored_only=False)] == [403, 403]


def test_dead_backend_is_not_waited_for_at_exit(tmp_path):
    backend = client(f"http://127.0.0.1:{free_port()}", tmp_path, flush_timeout=10)
    start = time.monotonic()
    for epoch in range(1, 6):
        backend.validation_results(epoch, 5, {"mAP50": 0.1})  # never blocks the caller
    assert time.monotonic() - start < 0.5
    left = backend.close()
    assert time.monotonic() - start < 1.0  # refused connections at exit: not waited for
    assert left == 5
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["body"]["epoch"] for e in logged] == [1, 2, 3, 4, 5]  # the event log has everything


def test_without_callback_url_events_are_only_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    backend = client(None, tmp_path)
    backend.status("running", 0)
    assert backend.close() == 0
    assert any("event PATCH status" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "events.jsonl").read_text())["body"]["status"] == "running"


def test_error_text_is_redacted_before_it_leaves(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    backend.status("failed", 10, error="boto failed with key s3cr3t-value")
    backend.log(f"token {AUTH_TOKEN} seen")
    backend.close()
    assert receiver.bodies("status")[0]["error"] == "boto failed with key ***"
    assert receiver.bodies("logs")[0]["message"] == "token *** seen"
    assert "s3cr3t-value" not in (tmp_path / "events.jsonl").read_text()


def test_health_reads_job_status(receiver_factory, tmp_path):
    receiver = receiver_factory("--cancel-after-epoch", "1")
    backend = client(receiver.url("1"), tmp_path)
    assert backend.health() == "running"
    backend.validation_results(1, 3, {})
    backend.close()
    assert backend.health() == "cancelled"
    assert client(f"http://127.0.0.1:{free_port()}", tmp_path).health() is None  # unreachable: cannot tell


def test_retry_after_accepts_seconds_and_http_dates():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
