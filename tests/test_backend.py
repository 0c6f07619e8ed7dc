"""The callback client against a real HTTP receiver process."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import pytest

from backend import Backend, _retry_after
from config import BackendSettings
from tests.conftest import AUTH_TOKEN, free_port
from utils import Redactor


def result(epoch: int, total: int = 3, **metrics) -> dict:
    """A validation-results body as train.py sends it (the required fields)."""
    metrics = metrics or {"mAP50": 0.1}
    return {"epoch": epoch, "total_epochs": total, "task_type": "object_detection", "primary_metric_name": "mAP@0.5",
            "primary_metric_value": metrics.get("mAP50", 0.0), "metrics": metrics}


def row(epoch: int, **numbers) -> dict:
    """A training-metrics row as train.py sends it."""
    return {"epoch": epoch, "step": epoch, "loss": 1.0, "accuracy": 0.5, "extra_metrics": numbers or {"train_loss": 1.0}}


def client(url: str | None, tmp_path, **kw) -> Backend:
    settings = BackendSettings(url=url, token=AUTH_TOKEN, connect_timeout=1, timeout=2,
                               max_attempts=kw.pop("max_attempts", 8), flush_timeout=kw.pop("flush_timeout", 10))
    return Backend(settings, Redactor([AUTH_TOKEN, "s3cr3t-value"]), tmp_path / "events.jsonl")


def test_events_arrive_in_order_per_route_with_auth_header_and_unique_ids(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    backend.status("running", 0)
    for epoch in (1, 2, 3):
        backend.validation_results(result(epoch))
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
        backend.validation_results(result(epoch, 5))
    queued = [(e.route, e.body.get("epoch")) for e in backend._queue]
    assert queued.count(("status", None)) == 1  # the start of the job is a status change: kept
    assert [ep for route, ep in queued if route == "status" and ep] == [5]  # progress: only the newest
    assert [ep for route, ep in queued if route == "validation-results"] == [1, 2, 3, 4, 5]
    backend.close()


def test_full_queue_drops_metrics_never_validation_results(tmp_path):
    backend = client(f"http://127.0.0.1:{free_port()}", tmp_path, flush_timeout=0)
    backend.BACKOFF_BASE, backend.MAX_QUEUE = 5, 10
    for epoch in range(1, 8):
        backend.validation_results(result(epoch, 7))
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
        backend.validation_results(result(epoch, 10))
    assert backend.close() == 0
    all_tries = receiver.requests("validation-results", stored_only=False)
    stored = receiver.requests("validation-results")
    assert len(all_tries) > len(stored)  # failures happened and were retried
    assert [e["body"]["epoch"] for e in stored] == list(range(1, 11))  # each once, in order
    failed_ids = {e["body"]["event_id"] for e in all_tries if e["outcome"] == 500}
    assert failed_ids <= {e["body"]["event_id"] for e in stored}  # a retry is the same event


def test_missing_training_metrics_route_is_dropped_after_one_404_and_its_numbers_go_to_metrics(
        receiver_factory, tmp_path, caplog):
    receiver = receiver_factory("--missing-route", "training-metrics")
    backend = client(receiver.url("1"), tmp_path)
    for epoch in (1, 2, 3):
        backend.training_metrics(row(epoch, **{"train/box_loss": 0.1 * epoch, "mAP50": 0.5}))
    assert backend.close() == 0
    tries = receiver.requests("training-metrics", stored_only=False)
    assert len(tries) == 1 and tries[0]["outcome"] == 404
    metrics = {(m["name"], m["epoch"]): m["value"] for m in receiver.bodies("metrics")}
    assert metrics == {("train/box_loss", e): pytest.approx(0.1 * e) for e in (1, 2, 3)} | {("mAP50", e): 0.5 for e in (1, 2, 3)}
    assert all(m["step"] == m["epoch"] for m in receiver.bodies("metrics"))
    assert sum("no training-metrics route" in r.message for r in caplog.records) == 1


def test_image_results_follow_the_stored_validation_result_in_batches(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    images = [{"image_name": f"images/val/{i}.jpg", "image_index": i, "is_correct": True} for i in range(250)]
    backend.validation_results(result(1), images)
    backend.validation_results(result(2), images[:3])
    assert backend.close() == 0
    answers = {e["body"]["epoch"]: e["answer"]["validation_result_id"] for e in receiver.requests("validation-results")}
    posts = receiver.bodies("validation-image-results")
    assert sorted(len(p) for p in posts) == [3, 50, 100, 100]  # arrays of at most 100
    for epoch, result_id in answers.items():
        mine = [i for p in posts for i in p if i["validation_result_id"] == result_id]
        assert sorted(i["image_index"] for i in mine) == list(range(250 if epoch == 1 else 3))
        assert all(i["epoch"] == epoch for i in mine)
    ids = [i["event_id"] for p in posts for i in p]
    assert len(set(ids)) == len(ids) == 253  # each element is an event of its own


def test_without_a_validation_results_route_image_results_are_not_sent(receiver_factory, tmp_path):
    receiver = receiver_factory("--missing-route", "validation-results")
    backend = client(receiver.url("1"), tmp_path)
    backend.validation_results(result(1), [{"image_name": "a.jpg", "image_index": 0}])
    backend.validation_results(result(2), [{"image_name": "a.jpg", "image_index": 0}])
    assert backend.close() == 0
    assert len(receiver.requests("validation-results", stored_only=False)) == 1  # dropped after one 404
    assert receiver.requests("validation-image-results", stored_only=False) == []


def test_a_refused_body_is_logged_once_per_route_with_the_backends_detail(receiver_factory, tmp_path, caplog):
    receiver = receiver_factory()
    backend = client(receiver.url("1"), tmp_path)
    for epoch in (1, 2):
        bad = result(epoch)
        del bad["task_type"]
        backend.validation_results(bad)
    backend.training_metrics({"epoch": 1})  # no step
    assert backend.close() == 0
    assert [e["outcome"] for e in receiver.requests(stored_only=False)] == [422, 422, 422]  # not retried
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert any("validation-results with 422" in m and "task_type: Field required" in m for m in errors)
    assert any("training-metrics with 422" in m and "step: Field required" in m for m in errors)
    receiver.refusals_expected = True  # these refusals were the point of the test


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
        backend.validation_results(result(epoch, 5))  # never blocks the caller
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


def test_nothing_is_written_to_the_event_log_once_the_client_is_closed(tmp_path):
    """The job uploads its event log and removes its folder after closing the client: a late event (a
    background upload's log line) must not make the folder again."""
    import shutil

    log = tmp_path / "jobs" / "job-1" / "events.jsonl"
    backend = Backend(BackendSettings(url=None, token=AUTH_TOKEN, connect_timeout=1, timeout=2, max_attempts=2,
                                      flush_timeout=1), Redactor([]), log)
    backend.status("completed", 100)
    backend.close()
    assert log.is_file()
    shutil.rmtree(log.parent)
    backend.log("checkpoint uploaded late")
    assert not log.parent.exists()


def test_error_text_is_redacted_before_it_leaves(receiver, tmp_path):
    backend = client(receiver.url("1"), tmp_path)
    backend.status("failed", 10, error="boto failed with key s3cr3t-value")
    backend.log(f"token {AUTH_TOKEN} seen")
    backend.close()
    assert receiver.bodies("status")[0]["error"] == "boto failed with key ***"
    assert receiver.bodies("logs")[0]["message"] == "token *** seen"
    assert "s3cr3t-value" not in (tmp_path / "events.jsonl").read_text()


def test_the_jobs_warnings_and_errors_reach_the_backends_log_panel_within_a_limit(receiver, tmp_path):
    """The contract's logs route is for warnings and errors too; the callback client's own troubles,
    and a signal handler's records, stay local; past LogForwarder.LIMIT one notice says so."""
    from logforward import LogForwarder

    backend = client(receiver.url("1"), tmp_path)
    logger = logging.getLogger("trainer.test-forwarder")
    forwarder = LogForwarder(backend)
    logger.addHandler(forwarder)
    try:
        logger.info("not a warning")
        logger.warning("dataset: %d entries skipped", 3, extra={"epoch": 2})
        logger.error("job failed (exit 2): the key s3cr3t-value is wrong")
        logger.warning("stop requested", extra={"local_only": True})
        own = logging.LogRecord("trainer", logging.WARNING, str(Path("backend.py").resolve()), 1, "queue full", (), None)
        forwarder.handle(own)  # the callback client's own record
        for n in range(LogForwarder.LIMIT):
            logger.warning("warning %d", n)
    finally:
        logger.removeHandler(forwarder)
    backend.close()
    logs = receiver.bodies("logs")
    first = {b["message"]: b for b in logs}
    assert first["dataset: 3 entries skipped"]["level"] == "WARNING" and first["dataset: 3 entries skipped"]["epoch"] == 2
    assert first["job failed (exit 2): the key *** is wrong"]["level"] == "ERROR"  # redacted as every body is
    assert "not a warning" not in first and "stop requested" not in first and "queue full" not in first
    assert len(logs) == LogForwarder.LIMIT + 1  # 2 + 198 of the loop's, then the notice (logs go out unordered)
    assert f"more than {LogForwarder.LIMIT} warnings: the rest are in the job's own log only" in first


def test_health_reads_job_status(receiver_factory, tmp_path):
    receiver = receiver_factory("--cancel-after-epoch", "1")
    backend = client(receiver.url("1"), tmp_path)
    assert backend.health() == "running"
    backend.validation_results(result(1))
    backend.close()
    assert backend.health() == "cancelled"
    assert client(f"http://127.0.0.1:{free_port()}", tmp_path).health() is None  # unreachable: cannot tell


def test_retry_after_accepts_seconds_and_http_dates():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait


def test_a_dropped_connection_on_the_final_status_is_retried_not_taken_for_a_dead_backend(receiver_factory, tmp_path):
    receiver = receiver_factory("--reset-final-once")
    backend = client(receiver.url("1"), tmp_path)
    backend.BACKOFF_BASE = 0.05
    backend.status("running", 50)
    backend.status("completed", 100)  # goes out after close() began, like at the end of a job
    assert backend.close() == 0
    outcomes = [(e["body"]["status"], e["outcome"]) for e in receiver.requests("status", stored_only=False)]
    assert outcomes == [("running", 200), ("completed", "reset"), ("completed", 200)]


def test_the_final_status_does_not_wait_behind_a_failing_route(receiver_factory, tmp_path):
    receiver = receiver_factory("--fail-route", "validation-results")
    backend = client(receiver.url("1"), tmp_path, flush_timeout=3)
    backend.BACKOFF_BASE = 0.05
    backend.status("running", 0)
    backend.validation_results(result(1))
    backend.status("completed", 100)
    started = time.monotonic()
    backend.close()
    assert [b["status"] for b in receiver.bodies("status")] == ["running", "completed"]
    assert receiver.requests("validation-results", stored_only=False)[0]["outcome"] == 500
    assert time.monotonic() - started < 4


def test_the_final_status_waits_for_a_validation_result_in_flight_two_seconds_at_most(receiver, tmp_path,
                                                                                       monkeypatch):
    """In order when the backend answers (the final status after the last result), but a result whose
    first attempt hangs holds the job's end back ORDER_GRACE (2 s) at most."""
    backend = client(receiver.url("1"), tmp_path, flush_timeout=15)
    real = backend._attempt

    def attempt(event):
        if event.route == "validation-results":
            time.sleep(8)  # a backend that does not answer this route
        return real(event)

    monkeypatch.setattr(backend, "_attempt", attempt)
    backend.validation_results(result(1))
    time.sleep(0.2)  # its attempt is under way
    started = time.monotonic()
    backend.status("completed", 100)
    deadline = started + 10
    while not receiver.bodies("status") and time.monotonic() < deadline:
        time.sleep(0.05)
    waited = time.monotonic() - started
    assert [b["status"] for b in receiver.bodies("status")] == ["completed"]
    assert backend.ORDER_GRACE - 0.3 <= waited < backend.ORDER_GRACE + 2
    backend.close()


def test_closing_while_a_request_is_in_flight_counts_it_in_flight_not_lost(receiver_factory, tmp_path, monkeypatch):
    import threading

    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))
    receiver = receiver_factory("--delay", "1")
    backend = client(receiver.url("1"), tmp_path)
    backend.log("slow to answer")
    time.sleep(0.2)  # the request is on its way
    assert backend.close(timeout=0.2) == 0  # not lost: still in flight
    time.sleep(1.5)  # the backend answers; the sender finishes the event
    assert crashes == [] and len(receiver.requests("logs")) == 1


@contextlib.contextmanager
def plain_http_port():
    """A port that answers TLS with plain HTTP, and reads what it is sent first: closing with the
    client's hello unread would reset the connection, which the client may see before the answer
    (a ConnectionError instead of the TLS fault this is about)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while conn.recv(65536):  # until the client gives up on the handshake
                    pass

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    try:
        yield server.getsockname()[1]
    finally:
        worker.join(10)
        server.close()


def test_only_a_refused_connection_counts_as_refused_and_a_tls_fault_does_not_crash_the_check(receiver):
    """Real failures: a port nobody listens on refuses; TLS spoken to a plain HTTP server is a TLS
    fault (its ssl.SSLError carries a string `reason`, which once crashed the check in a sender thread)."""
    import requests

    from backend import _refused

    with pytest.raises(requests.ConnectionError) as refused:
        requests.get(f"http://127.0.0.1:{free_port()}/", timeout=5)
    assert _refused(refused.value)
    with plain_http_port() as port, pytest.raises(requests.exceptions.SSLError) as tls:
        requests.get(f"https://127.0.0.1:{port}/", timeout=5)
    assert not _refused(tls.value)
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent, pytest.raises(requests.Timeout) as slow:
        # the kernel accepts the connection, nothing ever answers: a fault, not a refusal
        requests.get(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.2)
    assert not _refused(slow.value)


def test_a_sender_survives_an_unexpected_error_and_still_delivers(receiver, tmp_path, monkeypatch):
    backend = client(receiver.url("1"), tmp_path)
    real, failures = backend._attempt, []

    def flaky(event):
        if not failures:
            failures.append(event.route)
            raise RuntimeError("a bug in one attempt")
        return real(event)

    monkeypatch.setattr(backend, "_attempt", flaky)
    backend.status("running", 0)
    backend.close()
    assert failures == ["status"]
    assert [b["status"] for b in receiver.bodies("status")] == ["running"]


def test_a_result_is_done_only_once_its_image_results_were_taken_and_sent_again_keeps_every_id(receiver_factory,
                                                                                               tmp_path):
    """What the reports outbox relies on: `on_done` of a validation result waits for its per-image
    results; a result sent again (a job started again) brings the same result and image ids."""
    flag = tmp_path / "images-down"
    flag.touch()
    receiver = receiver_factory("--fail-route", "validation-image-results", "--fail-while", str(flag))
    images = [{"image_name": f"images/val/{i}.jpg", "image_index": i, "is_correct": True} for i in range(150)]
    body = {**result(1), "event_id": "result-1"}
    done = []
    first = client(receiver.url("1"), tmp_path, max_attempts=2, flush_timeout=5)
    first.validation_results(body, images, on_done=lambda: done.append("first"))
    first.close()
    assert receiver.bodies("validation-results") and not receiver.bodies("validation-image-results")
    assert done == []  # the images were given up on: still owed

    flag.unlink()
    again = client(receiver.url("1"), tmp_path / "again")
    again.validation_results(body, images, on_done=lambda: done.append("again"))
    assert again.close() == 0 and done == ["again"]
    assert {b["event_id"] for b in receiver.bodies("validation-results")} == {"result-1"}
    ids = [i["event_id"] for p in receiver.bodies("validation-image-results") for i in p]
    tried = [i["event_id"] for e in receiver.requests("validation-image-results", stored_only=False)
             if e["outcome"] == 500 for i in e["body"]]
    assert len(set(ids)) == 150 and set(tried) <= set(ids)  # the same ids as the first job's tries


def test_a_row_sent_as_metrics_where_the_route_is_absent_is_done_once_they_are_with_stable_ids(receiver_factory,
                                                                                                tmp_path):
    receiver = receiver_factory("--missing-route", "training-metrics")
    done = []
    backend = client(receiver.url("1"), tmp_path)
    the_row = {**row(1, train_loss=1.0, val_loss=2.0), "event_id": "row-1"}
    backend.training_metrics(the_row, on_done=lambda: done.append(1))  # 404: goes out as metrics
    backend.training_metrics(the_row, on_done=lambda: done.append(2))  # the same row again: the same ids
    assert backend.close() == 0
    assert done == [1, 2]
    posts = receiver.bodies("metrics")
    assert sorted(p["name"] for p in posts) == ["train_loss", "train_loss", "val_loss", "val_loss"]
    assert len({p["event_id"] for p in posts}) == 2
