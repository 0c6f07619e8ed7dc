"""The job's MLflow run made in two steps: the lookup on a helper thread while the dataset
downloads (Tracker.prepare), then the run itself (Tracker.start). Against MLflow's local store."""

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
    assert first.active and first.run_id
    first.log_metrics({"mAP50": 0.5}, step=1)
    first.finish("KILLED")  # a pod stopped: the job starts again

    again = Tracker(settings, Redactor([]))
    again.prepare()
    again.start()
    assert again.run_id == first.run_id and again.active
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
    assert not tracker.active and tracker.run_id is None
    assert "MLflow: failed to start" in caplog.text
    tracker.log_metrics({"mAP50": 0.5}, step=1)  # ignored, no error
    tracker.finish("FAILED")
