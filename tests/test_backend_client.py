"""The callback client against a real HTTP receiver process."""

from __future__ import annotations

import json
import logging
import time

from tests.conftest import AUTH_TOKEN, free_port
from utils import Backend, BackendSettings, Redactor, _retry_after


def client(url: str | None, tmp_path, **kw) -> Backend:
    settings = BackendSettings(url=url, token=AUTH_TOKEN, connect_timeout=1, timeout=2,
                               max_attempts=kw.pop("max_attempts", 8), flush_timeout=kw.pop("flush_timeout", 10))
    return Backend(settings, Redactor([AUTH_TOKEN, "s3cr3t-value"]), tmp_path / "events.jsonl")


def test_events_arrive_in_order_with_auth_header_and_unique_ids(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    backend.status("running", 0)
    for epoch in (1, 2, 3):
        backend.validation_results(epoch, 3, {"mAP50": 0.5})
        backend.metric("train/box_loss", 1.0 / epoch, epoch)
    backend.log("checkpoint uploaded")
    backend.status("completed", 100)
    assert backend.close() == 0
    entries = receiver.requests()
    assert [e["route"] for e in entries] == ["status"] + ["validation-results", "metrics"] * 3 + ["logs", "status"]
    assert all(e["auth"] == AUTH_TOKEN and e["path"].startswith("/internal/training/1/") for e in entries)
    assert [e["method"] for e in entries][0] == "PATCH"
    ids = [e["body"]["event_id"] for e in entries]
    assert len(set(ids)) == len(ids)
    status = entries[0]["body"]
    assert set(status) >= {"status", "error", "progress", "updated_at", "event_id"}
    assert status["updated_at"].endswith("Z")


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


def test_missing_route_is_dropped_after_one_404_and_others_continue(receiver_factory, tmp_path, caplog):
    receiver = receiver_factory("--missing-route", "validation-results")
    backend = client(receiver.url("1"), tmp_path)
    for epoch in (1, 2, 3):
        backend.validation_results(epoch, 3, {"mAP50": 0.1})
        backend.metric("mAP50", 0.1, epoch)
    assert backend.close() == 0
    tries = receiver.requests("validation-results", stored_only=False)
    assert len(tries) == 1 and tries[0]["outcome"] == 404
    assert len(receiver.requests("metrics")) == 3
    assert sum("no validation-results route" in r.message for r in caplog.records) == 1


def test_rejected_auth_is_not_retried(receiver_factory, tmp_path):
    receiver = receiver_factory(token="another-token")
    backend = client(receiver.url("1"), tmp_path)
    backend.status("running", 0)
    backend.status("running", 50)
    assert backend.close() == 0
    assert [e["outcome"] for e in receiver.requests(stored_only=False)] == [403, 403]


def test_dead_backend_costs_at_most_the_flush_deadline(tmp_path):
    backend = client(f"http://127.0.0.1:{free_port()}", tmp_path, flush_timeout=1.5)
    start = time.monotonic()
    for epoch in range(1, 6):
        backend.validation_results(epoch, 5, {"mAP50": 0.1})  # never blocks the caller
    assert time.monotonic() - start < 0.5
    left = backend.close()
    assert time.monotonic() - start < 4
    assert left >= 1
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
