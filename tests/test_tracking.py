"""The job's MLflow run made in two steps: the lookup on a helper thread while the dataset
downloads (Tracker.prepare), then the run itself on the tracker's thread while training starts
(Tracker.start, Tracker.ready). Against MLflow's local store and a server that never answers."""

from __future__ import annotations

import logging

from mlflow import MlflowClient

from config import load_settings
from tests.conftest import free_port
from tracking import Tracker
from utils import Redactor


def settings_for(tmp_path, job: str = "t-prep", **extra):
    return load_settings({"JOB_ID": job, "DATASET_ID": "d", "STORAGE_TYPE": "local", "WORK_DIR": str(tmp_path),
                          **extra})


def job_runs(settings) -> list:
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.job_id = '{settings.job_id}'")


def test_prepared_start_makes_the_run_and_a_restart_continues_it(tmp_path):
    settings = settings_for(tmp_path)
    first = Tracker(settings, Redactor([]))
    first.prepare()
    first.start()
    assert first.ready(60) and first.active and first.run_id
    first.log_metrics({"mAP50": 0.5}, step=1)
    first.finish("KILLED")  # a pod stopped: the job starts again

    again = Tracker(settings, Redactor([]))
    again.prepare()
    again.start()
    assert again.ready(60) and again.run_id == first.run_id and again.active
    assert MlflowClient(settings.mlflow_tracking_uri).get_run(again.run_id).info.status == "RUNNING"
    again.finish("FINISHED")
    assert [r.info.run_id for r in job_runs(settings)] == [first.run_id]


def test_a_job_failing_before_its_run_starts_makes_no_run(tmp_path):
    """prepare() only looks up: a job whose dataset is refused leaves no run behind."""
    settings = settings_for(tmp_path, job="t-bad-dataset")
    tracker = Tracker(settings, Redactor([]))
    tracker.prepare()
    tracker.finish("FAILED")  # what report_failure does
    tracker._preparing.join(30)
    assert job_runs(settings) == [] and tracker.run_id is None


def test_a_lookup_that_failed_switches_tracking_off_at_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(settings_for(tmp_path, MLFLOW_TRACKING_URI=dead), Redactor([]))
    tracker.prepare()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        tracker.start()
        assert not tracker.ready(60)
    assert not tracker.active and tracker.run_id is None
    assert "MLflow: failed to start" in caplog.text
    tracker.log_metrics({"mAP50": 0.5}, step=1)  # ignored, no error
    tracker.finish("FAILED")


def test_training_does_not_wait_for_a_slow_mlflow_server_and_numbers_queue_behind_the_run(tmp_path, monkeypatch):
    """start() returns at once while the server takes its time; what is logged meanwhile goes out
    once the run exists, in order, and the status that carries the run's ids comes after it."""
    import socket
    import time

    listener = socket.socket()  # listens, never accepts: the kernel takes the connection, nobody answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    settings = settings_for(tmp_path, job="t-slow", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    tracker = Tracker(settings, Redactor([]))
    announced = []
    tracker.prepare()
    began = time.monotonic()
    tracker.start(on_started=lambda: announced.append(tracker.run_id))
    tracker.log_params({"epochs": 3})
    tracker.log_metrics({"mAP50": 0.5}, step=1)
    assert time.monotonic() - began < 1.0  # not the server's 3 s: the caller went on training
    assert tracker.run_id is None and tracker.active  # still being made
    assert not tracker.ready(10)  # the server never answered: tracking is off, no run, nothing announced
    assert not tracker.active and tracker.run_id is None and announced == []
    tracker.finish("FINISHED")  # nothing to end, no error
    listener.close()


def test_numbers_logged_before_the_run_exists_reach_it_and_the_run_is_announced_once(tmp_path):
    settings = settings_for(tmp_path, job="t-queue")
    tracker = Tracker(settings, Redactor([]))
    announced = []
    tracker.prepare()
    tracker.start(on_started=lambda: announced.append(tracker.run_id))
    tracker.log_params({"epochs": 3, "imgsz": 64})
    for step in (1, 2):
        tracker.log_metrics({"mAP50": 0.1 * step, "mAP@0.5": 0.1 * step}, step=step)
    assert tracker.ready(60)
    assert announced == [tracker.run_id]
    tracker.finish("FINISHED")
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"epochs": "3", "imgsz": "64"} and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "mAP50")] == [1, 2]


def test_a_job_ending_while_its_run_is_still_being_made_leaves_no_run_running(tmp_path):
    """finish() waits (bounded) for a run still being made, then ends it: never left RUNNING."""
    settings = settings_for(tmp_path, job="t-end-early")
    tracker = Tracker(settings, Redactor([]))
    tracker.prepare()
    tracker.start()
    tracker.finish("FAILED")  # straight away: the job failed while MLflow was still importing
    runs = job_runs(settings)
    assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]
