"""Fault injection: flaky, slow, dead and cancelling backends, signals, a crash and resume, flaky S3.

Every fault comes from a real process on loopback (tests/backend_receiver.py, tests/s3_fault_proxy.py,
or a signal to the trainer), bounded in time; the code under test is never patched. "Does not slow
training" is judged on the training itself: the elapsed time at the last epoch's end in the job's
results.csv (Ultralytics' own clock, from the first batch), against a reference run made in this
module, with allowances for a shared 2-core machine far smaller than what a blocking callback
costs; bench/callbacks_bench.py measures the same ratios precisely.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import signal
import subprocess
import time
import uuid

import pytest
import torch

from backend import Backend
from tests.conftest import (
    FAST_TRAINING,
    PYTHON,
    ROOT,
    SECRETS,
    Receiver,
    free_port,
    run_entry,
    spawn_server,
    start_entry,
    storage_env,
    wait_until,
    with_group,
)
from tests.sample_data import make_dataset, make_zip

EPOCHS = 3
# Allowances on the training time (results.csv, first batch to the last epoch's end) for noise on a
# shared 2-core machine: two runs of the same job came within 0.1 s of each other (13 s of training)
# where their wall times were 2-9 s apart. Callbacks that held training back would cost far more:
# with the slow backend's 2 s answers, 2 s for each callback of each epoch before the last (3 or more
# per epoch: 12 s and up). A single blocking 2 s call per epoch (+4.6 s) fails the bound too. The
# job's whole wall time is bounded loosely: its start and finish include the dataset, MLflow and the
# final callbacks, which the slow backend answers in 2 s each.
TRAINING_RATIO, TRAINING_SLACK_S = 1.10, 2.0
WALL_RATIO, WALL_SLACK_S = 1.25, 10.0
# Timed runs use epochs longer than the slow backend's 2 s answers, as real epochs are: the
# per-route order of callbacks then never holds training back.
TIMED = {"DATASET_ID": "big", "IMGSZ": "128"}


@pytest.fixture(scope="module")
def world(s3_server, s3, dataset_zip, tmp_path_factory):
    """A bucket with the datasets, and a reference run with a healthy backend for wall-time comparisons."""
    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    folder = tmp_path_factory.mktemp("reference")
    big = make_zip(make_dataset(folder / "big", "detect", n_train=96, n_val=16), folder / "big.zip")
    s3.upload_file(str(big), bucket, "datasets/big.zip")
    receiver = Receiver(folder)
    world = {"bucket": bucket, "s3": s3, "s3_server": s3_server, "folder": tmp_path_factory}
    env = job_env(world, receiver, folder, **TIMED)
    started = time.monotonic()
    result = run_entry("train.py", env, cwd=folder, timeout=300)
    world["normal_wall"] = time.monotonic() - started
    receiver.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    world["normal_training"] = training_seconds(world, env["JOB_ID"])
    return world


def job_env(world: dict, receiver: Receiver | None, folder, **extra) -> dict:
    job_id = extra.pop("JOB_ID", f"r{uuid.uuid4().hex[:7]}")
    return {**storage_env(world["s3_server"], world["bucket"]), **FAST_TRAINING, "EPOCHS": str(EPOCHS),
            "JOB_ID": job_id, "DATASET_ID": "ds", "MODEL_NAME": "yolo11n.yaml", "TRAIN_ARGS": '{"plots": false}',
            "CALLBACK_URL": receiver.url(job_id) if receiver else f"http://127.0.0.1:{free_port()}/internal/training/{job_id}",
            "INTERNAL_AUTH_TOKEN": SECRETS[2], "CALLBACK_TIMEOUT": "1", "CALLBACK_CONNECT_TIMEOUT": "1",
            "WORK_DIR": str(folder / "work"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "MLFLOW_LOG_MODEL": "false", **extra}  # the logged model is test_models_out's and test_tracking's (CI time)


def event_ids(body) -> tuple:
    """The event_id of a body, or of each element of an array body."""
    return tuple(b["event_id"] for b in body) if isinstance(body, list) else (body["event_id"],)


def unique(entries: list[dict]) -> list[dict]:
    """Stored requests de-duplicated by event_id, in order of first arrival."""
    seen, out = set(), []
    for e in entries:
        if e["body"] is None:  # GET /health: no event
            continue
        if event_ids(e["body"]) not in seen:
            seen.add(event_ids(e["body"]))
            out.append(e)
    return out


def assert_final_status_last(stored: list[dict], status: str, tries: list[dict] | None = None) -> None:
    """The final status arrived once, after every other status and after every validation result,
    except one whose first attempt had failed before it (`tries`: every request the receiver saw; a
    retried result does not hold the job's end back) or one that kept it waiting ORDER_GRACE (a
    hanging request)."""
    statuses = [e for e in stored if e["route"] == "status"]
    assert statuses[-1]["body"]["status"] == status
    assert [e["body"]["status"] for e in statuses].count(status) == 1
    final = statuses[-1]
    late = [e["body"] for e in stored if e["route"] == "validation-results" and e["time"] > final["time"]]
    failed_before = {e["body"]["event_id"] for e in tries or [] if e["route"] == "validation-results"
                     and e["outcome"] == 500 and e["time"] < final["arrived"]}  # (recorded before answered)
    late = [body["epoch"] for body in late if body["event_id"] not in failed_before]
    if late:  # on its first attempt still: the final status waited its grace, ORDER_GRACE after it was made
        made = datetime.datetime.fromisoformat(final["body"]["updated_at"]).timestamp()
        assert final["time"] - made >= Backend.ORDER_GRACE - 0.05, f"epochs {late} overtaken without waiting"


def stored_events(world: dict, job_id: str) -> list[dict]:
    key = f"checkpoints/job-{job_id}/events.jsonl"
    lines = world["s3"].get_object(Bucket=world["bucket"], Key=key)["Body"].read().decode().splitlines()
    return [json.loads(line) for line in lines]


def training_seconds(world: dict, job_id: str) -> float:
    """Ultralytics' elapsed time at the last epoch's end (results.csv's `time` column), as stored."""
    key = f"checkpoints/job-{job_id}/results.csv"
    rows = list(csv.DictReader(io.StringIO(world["s3"].get_object(Bucket=world["bucket"], Key=key)["Body"].read().decode())))
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, EPOCHS + 1)), rows
    return float(rows[-1]["time"])


def assert_not_slowed(world: dict, job_id: str, wall: float) -> None:
    training, normal = training_seconds(world, job_id), world["normal_training"]
    assert training <= normal * TRAINING_RATIO + TRAINING_SLACK_S, f"training took {training:.1f} s, {normal:.1f} s normally"
    normal_wall = world["normal_wall"]
    assert wall <= normal_wall * WALL_RATIO + WALL_SLACK_S, f"the job took {wall:.1f} s, {normal_wall:.1f} s normally"


def load_checkpoint(world: dict, job_id: str, name: str) -> dict:
    data = world["s3"].get_object(Bucket=world["bucket"], Key=f"checkpoints/job-{job_id}/{name}")["Body"].read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------
# The backend misbehaves
# ------------------------------------------------------------------------------------------


def test_flaky_backend_gets_every_epoch_and_the_final_status_exactly_once(world, receiver_factory, tmp_path):
    receiver = receiver_factory("--fail-rate", "0.15", "--hang-rate", "0.15", "--hang-seconds", "5", "--seed", "7")
    env = job_env(world, receiver, tmp_path)
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tries = receiver.requests(stored_only=False)
    assert sum(e["outcome"] == 500 for e in tries) and sum(e["outcome"] == "lost-answer" for e in tries)
    stored = unique(receiver.requests())
    epochs = [e["body"]["epoch"] for e in stored if e["route"] == "validation-results"]
    assert epochs == list(range(1, EPOCHS + 1))
    assert_final_status_last(stored, "completed", tries)
    arrived = {i for e in stored for i in event_ids(e["body"])}
    for event in stored_events(world, env["JOB_ID"]):  # what the trainer emitted
        progress = event["route"] == "status" and event["body"]["status"] == "running" and "epoch" in event["body"]
        if event["route"] in ("status", "validation-results") and not progress:  # progress may be coalesced
            assert event["body"]["event_id"] in arrived, event


def test_backend_down_for_the_whole_run_costs_nothing(world, tmp_path):
    env = job_env(world, None, tmp_path, **TIMED)
    started = time.monotonic()
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert_not_slowed(world, env["JOB_ID"], wall)
    events = stored_events(world, env["JOB_ID"])
    assert [e["body"]["epoch"] for e in events if e["route"] == "validation-results"] == [1, 2, 3]
    assert events[-1]["body"]["status"] == "completed"
    assert "backend refuses connections at exit: not waiting for it" in result.stderr


def test_slow_backend_does_not_slow_training(world, receiver_factory, tmp_path):
    receiver = receiver_factory("--delay", "2")
    env = job_env(world, receiver, tmp_path, CALLBACK_TIMEOUT="10", **TIMED)
    started = time.monotonic()
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert_not_slowed(world, env["JOB_ID"], wall)
    stored = receiver.requests()
    assert [e["body"]["epoch"] for e in stored if e["route"] == "validation-results"] == [1, 2, 3]
    assert_final_status_last(stored, "completed")


def test_backend_cancellation_stops_the_job_within_seconds_at_the_default_interval(world, receiver_factory, tmp_path):
    receiver = receiver_factory("--cancel-after-epoch", "1")
    env = job_env(world, receiver, tmp_path, EPOCHS="40", **TIMED)  # CALLBACK_HEALTH_INTERVAL left at its default
    assert "CALLBACK_HEALTH_INTERVAL" not in env
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 143, result.stderr[-3000:]
    final = receiver.bodies("status")[-1]
    assert final["status"] == "cancelled" and final["error"] == "cancelled by the backend" and final["exit_code"] == 143
    assert 1 <= final["epochs_completed"] < 40
    # The health poll right after an epoch sees the cancellation while that epoch's checkpoint is on its
    # way up: its upload finishes (a stop waits for it), so every epoch counted is stored and reported.
    done = final["epochs_completed"]
    assert done == max(b.get("epoch", 0) for b in receiver.bodies("status"))  # the last epoch that ended
    assert sorted({b["epoch"] for b in receiver.bodies("validation-results")}) == list(range(1, done + 1))
    assert load_checkpoint(world, env["JOB_ID"], "last.pt")["epoch"] == done - 1  # Ultralytics counts from 0
    prefix = f"s3://{world['bucket']}/checkpoints/job-{env['JOB_ID']}/"
    assert (final["last_checkpoint"], final["best_checkpoint"]) == (prefix + "last.pt", prefix + "best.pt")
    assert any(b["level"] == "WARNING" and b["message"] == "job cancelled (exit 143): cancelled by the backend"
               for b in receiver.bodies("logs"))
    pressed = next(e["time"] for e in receiver.requests("validation-results") if e["body"]["epoch"] == 1)
    stopped = next(e["time"] for e in receiver.requests("status") if e["body"]["status"] == "cancelled")
    health = receiver.requests("health")
    assert health[0]["time"] < pressed  # polled at start, not only after a first interval
    # the poll after the next epoch sees it: about one epoch, never the 10 s interval plus several epochs
    assert stopped - pressed < 15, (stopped - pressed, final["epochs_completed"])
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("project-default").experiment_id])[0]
    assert run.info.status == "KILLED"


# ------------------------------------------------------------------------------------------
# Signals, crashes and resume
# ------------------------------------------------------------------------------------------


def test_sigterm_after_the_first_epoch_leaves_a_resumable_checkpoint(world, receiver_factory, tmp_path):
    receiver = receiver_factory()
    env = job_env(world, receiver, tmp_path, EPOCHS="20")
    proc = start_entry("train.py", env, tmp_path)
    try:
        wait_until(lambda: receiver.bodies("validation-results"), 120, "the first epoch")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    log = proc.log_path.read_text()
    assert code == 143, log[-3000:]
    assert took < 30, took  # fits a Kubernetes grace period of 30 s
    final = receiver.bodies("status")[-1]
    assert final["status"] == "cancelled" and final["error"] == "received SIGTERM" and final["exit_code"] == 143
    ckpt = load_checkpoint(world, env["JOB_ID"], "last.pt")
    assert ckpt["optimizer"] is not None and 0 <= ckpt["epoch"] < 20  # resumable
    done = final["epochs_completed"]  # every epoch that ended is stored and reported, no more, no fewer
    assert done == max(b.get("epoch", 0) for b in receiver.bodies("status"))
    assert ckpt["epoch"] == done - 1 and sorted({b["epoch"] for b in receiver.bodies("validation-results")}) == list(
        range(1, done + 1))
    assert stored_events(world, env["JOB_ID"])[-1]["body"]["status"] == "cancelled"


def test_sigkill_right_after_a_reported_epoch_resumes_after_it_and_reports_every_epoch_once(
        world, mlflow_server, receiver_factory, tmp_path):
    """The kill lands while the epochs' training-metrics rows are still owed (the backend answers
    500 to them during the first job, as CI once hit by chance in the instant between an epoch's
    validation result and its row): the job started again sends them first, under the same event_ids."""
    from mlflow import MlflowClient

    flag = tmp_path / "training-metrics-down"
    flag.touch()
    receiver = receiver_factory("--fail-route", "training-metrics", "--fail-while", str(flag))
    experiment = f"resume-{uuid.uuid4().hex[:6]}"
    env = job_env(world, receiver, tmp_path / "first", EPOCHS="4", MLFLOW_TRACKING_URI=mlflow_server,
                  MLFLOW_EXPERIMENT_NAME=experiment, **TIMED)
    (tmp_path / "first").mkdir()
    proc = start_entry("train.py", env, tmp_path / "first")

    def reported() -> int:
        return max([b["epoch"] for b in receiver.bodies("validation-results")] or [0])

    try:
        wait_until(lambda: reported() >= 2, 240, "epoch 2's validation result at the backend")
        proc.kill()  # SIGKILL right after the result arrived: no clean-up at all
        proc.wait(30)
    finally:
        proc.kill()
    done = reported()
    assert done in (2, 3)  # killed mid-way through a 4-epoch job
    assert not receiver.bodies("training-metrics")  # none delivered: every row is owed
    owed = json.loads(world["s3"].get_object(Bucket=world["bucket"],
                                              Key=f"checkpoints/job-{env['JOB_ID']}/reports.json")["Body"].read())
    owed = [e for e in owed if e["epoch"] <= done]  # (a later epoch's, stored before its last.pt, is retrained)
    assert [e["epoch"] for e in owed if e["training-metrics"]] == list(range(1, done + 1))
    flag.unlink()  # the backend is well again

    (tmp_path / "second").mkdir()  # a new pod: nothing local survives, only storage
    again = {**env, "WORK_DIR": str(tmp_path / "second" / "work")}
    before = len(receiver.bodies("status"))
    result = run_entry("train.py", again, cwd=tmp_path / "second", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [b["progress"] for b in receiver.bodies("status")[before:]]
    assert progress[0] == 0 and min(progress[1:]) >= 25.0 * done  # from the stored epochs on, never back to 0
    assert any(b["message"] == f"resumed training at epoch {done + 1} of 4" for b in receiver.bodies("logs"))
    results = [e["body"] for e in unique(receiver.requests("validation-results"))]
    assert [r["epoch"] for r in results] == [1, 2, 3, 4]  # each epoch reported exactly once, in order
    rows = [e["body"] for e in unique(receiver.requests("training-metrics"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {r["event_id"] for r in rows[:done]} == {e["training-metrics"]["event_id"] for e in owed}
    assert all(r["checkpoint_path"].endswith(f"job-{env['JOB_ID']}/last.pt") for r in rows)
    final = receiver.bodies("status")[-1]
    assert final["status"] == "completed" and final["epochs_completed"] == 4
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "mAP50"))
    assert set(steps) == {1, 2, 3, 4} and len(steps) <= 5  # an epoch cut short by the kill may be logged twice


def test_rows_the_backend_never_took_are_sent_by_the_job_started_again_after_it_completed(world, receiver_factory,
                                                                                          tmp_path):
    """The backend refused training-metrics (500) for a whole 2-epoch job: the job completes, its rows
    stay owed in storage, and the same job started again (it finds its completion marker) delivers them."""
    flag = tmp_path / "training-metrics-down"
    flag.touch()
    receiver = receiver_factory("--fail-route", "training-metrics", "--fail-while", str(flag))
    env = job_env(world, receiver, tmp_path, EPOCHS="2", CALLBACK_MAX_ATTEMPTS="2", CALLBACK_FLUSH_TIMEOUT="3")
    result = run_entry("train.py", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not receiver.bodies("training-metrics") and receiver.bodies("status")[-1]["status"] == "completed"
    key = f"checkpoints/job-{env['JOB_ID']}/reports.json"
    owed = json.loads(world["s3"].get_object(Bucket=world["bucket"], Key=key)["Body"].read())
    assert [(e["epoch"], e["validation-results"]) for e in owed] == [(1, None), (2, None)]  # results were taken

    flag.unlink()
    again = run_entry("train.py", env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = receiver.bodies("training-metrics")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["event_id"] for r in rows] == [e["training-metrics"]["event_id"] for e in owed]
    assert [b["epoch"] for b in receiver.bodies("validation-results")] == [1, 2]  # not sent twice
    assert [b["status"] for b in receiver.bodies("status")].count("completed") == 2
    assert json.loads(world["s3"].get_object(Bucket=world["bucket"], Key=key)["Body"].read()) == []  # nothing owed


def test_backend_without_training_metrics_or_image_routes_gets_every_number_as_metrics(world, receiver_factory,
                                                                                      tmp_path):
    receiver = receiver_factory("--missing-route", "training-metrics", "--missing-route", "validation-image-results")
    env = job_env(world, receiver, tmp_path, EPOCHS="2")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [b["epoch"] for b in receiver.bodies("validation-results")] == [1, 2]
    posted = {(m["name"], m["epoch"]) for m in receiver.bodies("metrics")}
    for name in ("train/box_loss", "lr/pg0", "train_loss", "val_loss", "mAP50", "val/box_loss"):
        assert {(name, 1), (name, 2)} <= posted, name
    assert len(receiver.requests("training-metrics", stored_only=False)) == 1  # one 404, then not again
    assert len(receiver.requests("validation-image-results", stored_only=False)) == 1
    assert receiver.bodies("status")[-1]["status"] == "completed"


def test_resume_false_starts_again(world, receiver_factory, tmp_path):
    """RESUME=false trains again; from its start the earlier training's completion marker is gone, so
    a pod started again after this one is stopped resumes it instead of reporting the old one."""
    receiver = receiver_factory()
    env = job_env(world, receiver, tmp_path, EPOCHS="2", RESUME="false", JOB_ID=f"nr{uuid.uuid4().hex[:6]}")
    assert run_entry("train.py", env, cwd=tmp_path, timeout=300).returncode == 0
    marker = {"Bucket": world["bucket"], "Key": f"checkpoints/job-{env['JOB_ID']}/completed.json"}
    assert world["s3"].head_object(**marker)
    proc = start_entry("train.py", env, tmp_path)
    try:
        wait_until(lambda: len(receiver.bodies("validation-results")) == 3, 120, "the second training's first epoch")
        with pytest.raises(world["s3"].exceptions.ClientError, match="404"):
            world["s3"].head_object(**marker)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert world["s3"].head_object(**marker)  # completed again
    assert [b["epoch"] for b in receiver.bodies("validation-results")] == [1, 2, 1, 2]
    assert not any("resumed" in b["message"] for b in receiver.bodies("logs"))


def test_a_completion_marker_of_other_epochs_is_not_this_jobs_completion(tmp_path, caplog):
    """As a last.pt trained for other EPOCHS is not resumed, a job completed with other EPOCHS is a
    new training, not reported completed again."""
    from config import load_settings
    from resume import completed_before, mark_completed
    from storage import Storage

    def settings(epochs: str):
        return load_settings({"JOB_ID": "m1", "DATASET_ID": "d", "STORAGE_TYPE": "local", "EPOCHS": epochs,
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "w")})

    storage = Storage(settings("3").storage)
    mark_completed(storage, settings("3"), {"epochs_completed": 3, "total_epochs": 3, "exit_code": 0})
    assert completed_before(storage, settings("3"))["epochs_completed"] == 3
    with caplog.at_level("WARNING", logger="trainer"):
        assert completed_before(storage, settings("5")) is None
    assert "completed before with EPOCHS=3; this one asks for EPOCHS=5: training again" in caplog.text
    mark_completed(storage, settings("3"), {"epochs_completed": 2, "exit_code": 0})  # an older marker
    assert completed_before(storage, settings("5"))["epochs_completed"] == 2


# ------------------------------------------------------------------------------------------
# Storage misbehaves
# ------------------------------------------------------------------------------------------


def test_flaky_storage_503s_and_dropped_connections_do_not_fail_the_job(world, receiver_factory, tmp_path):
    faults = tmp_path / "faults.log"
    proxy, url = spawn_server("tests.s3_fault_proxy", "--upstream", world["s3_server"], "--fail-rate", "0.2",
                              "--record", str(faults), "--seed", "3")
    try:
        receiver = receiver_factory()
        env = job_env(world, receiver, tmp_path, MINIO_ENDPOINT=url, KEEP_JOB_FILES="true")  # compared below
        result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    finally:
        with_group(proxy, signal.SIGTERM)
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = [line.split()[0] for line in faults.read_text().splitlines()]
    assert kinds.count("503") >= 2 and kinds.count("drop") >= 2, kinds
    local = tmp_path / "work" / "jobs" / f"job-{env['JOB_ID']}" / "train" / "weights"
    for name in ("best.pt", "last.pt"):
        stored = world["s3"].get_object(Bucket=world["bucket"], Key=f"checkpoints/job-{env['JOB_ID']}/{name}")["Body"].read()
        assert stored == (local / name).read_bytes()  # intact, byte for byte
    assert receiver.bodies("status")[-1]["status"] == "completed"


# ------------------------------------------------------------------------------------------
# Endings: a silent storage endpoint, a completed job started again, a damaged checkpoint
# ------------------------------------------------------------------------------------------


@pytest.fixture
def silent_storage(world, tmp_path):
    """An S3 proxy that goes silent (accepts, never answers) once its hang file exists."""
    hang = tmp_path / "storage-is-silent"
    proxy, url = spawn_server("tests.s3_fault_proxy", "--upstream", world["s3_server"], "--fail-rate", "0",
                              "--record", str(tmp_path / "faults.log"), "--hang-file", str(hang))
    yield url, hang
    with_group(proxy, signal.SIGTERM)


def test_sigterm_with_a_silent_storage_endpoint_exits_within_the_shutdown_timeout(world, receiver_factory,
                                                                                  silent_storage, tmp_path):
    url, hang = silent_storage
    receiver = receiver_factory()
    env = job_env(world, receiver, tmp_path, EPOCHS="30", MINIO_ENDPOINT=url, SHUTDOWN_TIMEOUT="10")
    proc = start_entry("train.py", env, tmp_path)
    try:
        wait_until(lambda: receiver.bodies("validation-results"), 180, "the first epoch")
        hang.touch()  # from now on every storage request hangs (STORAGE_TIMEOUT is 60 s, with retries)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert code == 143, proc.log_path.read_text()[-3000:]
    assert took < 10 + 2, took  # one deadline from the signal: Kubernetes' SIGKILL never comes
    final = receiver.bodies("status")[-1]
    assert final["status"] == "cancelled" and final["exit_code"] == 143


def test_sigterm_while_a_storage_request_hangs_in_setup_is_a_cancellation(world, receiver_factory, silent_storage,
                                                                          tmp_path):
    url, hang = silent_storage
    hang.touch()  # storage is silent from the start: the job hangs in its first storage request
    receiver = receiver_factory()
    env = job_env(world, receiver, tmp_path, MINIO_ENDPOINT=url, SHUTDOWN_TIMEOUT="6")
    proc = start_entry("train.py", env, tmp_path)
    try:
        wait_until(lambda: "hang" in (tmp_path / "faults.log").read_text(), 60, "the first storage request")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert code == 143, proc.log_path.read_text()[-3000:]  # not 75 "failed": the stop decides the code
    assert took < 6 + 2, took
    (final,) = [b for b in receiver.bodies("status") if b["status"] != "running"]
    assert final["status"] == "cancelled" and "received SIGTERM" in final["error"]


def test_a_completed_job_started_again_reports_completed_and_trains_nothing(world, receiver_factory, tmp_path):
    receiver = receiver_factory()
    env = job_env(world, receiver, tmp_path / "first", EPOCHS="1")
    (tmp_path / "first").mkdir()
    assert run_entry("train.py", env, cwd=tmp_path / "first", timeout=300).returncode == 0
    prefix = f"checkpoints/job-{env['JOB_ID']}/"
    best = world["s3"].head_object(Bucket=world["bucket"], Key=prefix + "best.pt")["ETag"]
    first = receiver.bodies("status")[-1]

    for attempt in ("marker", "finished-last.pt"):  # a new pod, nothing local; then without the marker
        if attempt == "finished-last.pt":
            world["s3"].delete_object(Bucket=world["bucket"], Key=prefix + "completed.json")
        folder = tmp_path / attempt
        folder.mkdir()
        before = len(receiver.bodies("status"))
        result = run_entry("train.py", {**env, "WORK_DIR": str(folder / "work")}, cwd=folder, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Starting training" not in result.stderr
        statuses = receiver.bodies("status")[before:]
        assert statuses[-1]["status"] == "completed" and [s["status"] for s in statuses].count("running") <= 1
        assert not any(s["status"] == "running" and s.get("epoch") for s in statuses)  # no training progress
        assert statuses[-1]["best_checkpoint"] == first["best_checkpoint"]
        assert statuses[-1]["epochs_completed"] == 1
        assert world["s3"].head_object(Bucket=world["bucket"], Key=prefix + "best.pt")["ETag"] == best  # untouched
    assert [b["epoch"] for b in receiver.bodies("validation-results")] == [1]  # trained once


def test_a_damaged_checkpoint_never_replaces_the_good_one_in_storage(tmp_path):
    """Multi-GPU: SIGTERM may reach a DDP worker while it writes last.pt; what it leaves is checked
    before it replaces the stored checkpoint."""
    from backend import Backend
    from checkpoints import CheckpointUploader
    from config import BackendSettings, load_settings
    from storage import Storage
    from utils import Redactor

    settings = load_settings({"JOB_ID": "ddp1", "DATASET_ID": "d", "STORAGE_TYPE": "local",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work")})
    storage = Storage(settings.storage)
    stored = []
    uploader = CheckpointUploader(storage, settings, Backend(BackendSettings(url=None), Redactor([])),
                                  on_stored=stored.append)
    good = tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": None}, good)
    uploader.submit({"last.pt": good}, 4)
    assert uploader.wait(30) and stored == [4]
    half = tmp_path / "half" / "last.pt"
    half.parent.mkdir()
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut off while being written
    uploader.submit({"last.pt": half}, 5)
    assert uploader.wait(30) and stored == [4]  # epoch 5 is not reported as stored
    target = tmp_path / "store" / "vision-platform" / "checkpoints" / "job-ddp1" / "last.pt"
    assert target.read_bytes() == good.read_bytes()


# ------------------------------------------------------------------------------------------
# After the job is reported completed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase,code", [("completed", 0), ("training", 143)])
def test_the_shutdown_deadline_exits_0_once_the_job_was_reported_completed(phase, code, tmp_path):
    """What is left after `completed` is MLflow's bookkeeping: a stop whose deadline cuts it short
    must not turn the job into a failed Kubernetes Job (143 is a FailJob exit in k8s/job.yaml)."""
    script = ("import sys, time\nfrom reporting import StopSignal\n"
              "stop = StopSignal(3.5)\nstop.phase = sys.argv[1]\nstop.request('test')\ntime.sleep(60)\n")
    started = time.monotonic()
    done = subprocess.run([PYTHON, "-c", script, phase], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert time.monotonic() - started < 30 and "shutdown did not finish within SHUTDOWN_TIMEOUT=3.5 s" in done.stderr


def test_a_completed_job_waits_for_its_mlflow_files_a_bounded_time(monkeypatch, caplog):
    """An MLflow server that hangs while the run's files go up kept a completed job alive for good:
    the wait ends at Tracker.ARTIFACTS_TIMEOUT, and sooner after a stop request (the run's end and
    the last words keep their seconds before the deadline)."""
    import threading

    from reporting import StopSignal
    from tracking import Tracker
    from train import wait_for_run_files

    hung = threading.Event()
    artifacts = threading.Thread(target=hung.wait, daemon=True)  # a log_artifacts call that never returns
    artifacts.start()
    tracker = Tracker.__new__(Tracker)  # only its timeouts are read
    monkeypatch.setattr(Tracker, "ARTIFACTS_TIMEOUT", 1.5)
    monkeypatch.setattr(Tracker, "END_TIMEOUT", 10.0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="trainer"):
        wait_for_run_files(artifacts, started, tracker, StopSignal(30))
    assert 1.4 < time.monotonic() - started < 5
    assert re.search(r"the run's files are still uploading after \d+ s; ending the run without them", caplog.text)
    monkeypatch.setattr(Tracker, "ARTIFACTS_TIMEOUT", 900.0)
    stop = StopSignal(30)
    stop.deadline = time.monotonic() + StopSignal.LAST_WORDS + Tracker.END_TIMEOUT + 1.0  # as request() sets it
    started = time.monotonic()
    wait_for_run_files(artifacts, started, tracker, stop)
    assert time.monotonic() - started < 4
    hung.set()
    artifacts.join(5)
    wait_for_run_files(artifacts, time.monotonic(), tracker, StopSignal(30))  # done: returns at once
