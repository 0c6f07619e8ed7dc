"""The job's MLflow run made in two steps: the lookup in the helper process (mlflow_worker.py)
while the dataset downloads (Tracker.prepare), then the run itself (Tracker.start). Against
MLflow's local store, and against servers that fail or never answer."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from config import load_settings
from tests.conftest import ROOT, free_port
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
    first.log_params({"epochs": 3, "lr0": 0.01})
    for step in (1, 2, 3):
        first.log_metrics({"mAP50": 0.1 * step, "mAP@0.5": 0.1}, step=step)  # the second name MLflow refuses
    first.finish("KILLED")  # a pod stopped: the job starts again
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "mAP50")] == [(1, 0.1), (2, 0.2),
                                                                                             (3, 0.1 * 3)]
    assert client.get_run(first.run_id).data.params == {"epochs": "3", "lr0": "0.01"}

    again = Tracker(settings, Redactor([]))
    again.prepare()
    again.start()
    assert again.run_id == first.run_id and again.active
    assert MlflowClient(settings.mlflow_tracking_uri).get_run(again.run_id).info.status == "RUNNING"
    again.finish("FINISHED")
    assert [r.info.run_id for r in job_runs(settings)] == [first.run_id]

    # A new training of the job (RESUME=false, other EPOCHS) gets a run of its own: numbers logged at
    # the same steps, and parameters MLflow would refuse to change, do not mix with the earlier run's.
    client.update_run(first.run_id, status="RUNNING")  # as an attempt that died with its helper leaves it
    new = Tracker(settings, Redactor([]))
    new.prepare()
    new.start(continue_run=False)
    assert client.get_run(first.run_id).info.status == "KILLED"  # not left running for good
    assert new.active and new.run_id != first.run_id and new._params == set()
    new.log_params({"epochs": 5})
    new.finish("FINISHED")
    assert client.get_run(new.run_id).data.params == {"epochs": "5"} and client.get_run(new.run_id).data.tags["job_id"]
    latest = Tracker(settings, Redactor([]))  # a resume after it continues the newest run
    latest.prepare()
    latest.start()
    assert latest.run_id == new.run_id
    latest.finish("FINISHED")


def test_a_job_failing_before_its_run_starts_makes_no_run(tmp_path):
    """prepare() only looks up: a job whose dataset is refused leaves no run behind."""
    settings = settings_for(tmp_path, job="t-bad-dataset")
    tracker = Tracker(settings, Redactor([]))
    tracker.prepare()
    assert tracker.flush(60)  # the lookup is done
    tracker.finish("FAILED")  # what report_failure does
    assert job_runs(settings) == [] and tracker.run_id is None
    assert tracker._worker.proc.wait(5) is not None  # no helper process is left behind


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


@pytest.fixture
def silent_server():
    """An HTTP server that accepts connections and never answers (a hung MLflow server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, done = [], threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    done.set()
    for conn in accepted:
        conn.close()
    listener.close()


def test_a_hung_server_never_makes_the_training_thread_wait(tmp_path, silent_server, monkeypatch, caplog):
    """Numbers are queued to the helper process: logging returns at once although the server never
    answers, and ending the run is bounded by END_TIMEOUT."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setattr(Tracker, "END_TIMEOUT", 1.0)
    tracker = Tracker(settings_for(tmp_path, MLFLOW_TRACKING_URI=silent_server), Redactor([]))
    tracker.run_id, tracker.experiment_id, tracker.active = "run1", "1", True  # as after start
    started = time.monotonic()
    tracker.log_params({"epochs": 3})
    for step in (1, 2, 3):
        tracker.log_metrics({"mAP50": 0.1 * step}, step=step)
    assert time.monotonic() - started < 5  # a call that waited would take the 60 s timeout
    assert not tracker.flush(0.5)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        tracker.finish("FINISHED")
    assert time.monotonic() - started < 20
    assert "numbers still queued after 1 s are not logged" in caplog.text
    assert "MLflow: failed to end the run (no answer in time)" in caplog.text
    assert tracker._worker.proc.wait(30) == 0  # the helper gives up on its own (mlflow_worker.END_WAIT)


def test_a_job_stopping_while_the_model_is_logged_stops_waiting_and_its_helper(tmp_path, silent_server, monkeypatch):
    """A stop while the model's helper works (here against a server that never answers) ends the wait
    within a second or two, and the helper is killed: nothing it would still write to the run (the
    fluent run's FINISHED) can outlast the job's own end of the run."""
    from tracking import Stopped

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    tracker = Tracker(settings_for(tmp_path, MLFLOW_TRACKING_URI=silent_server), Redactor([]))
    tracker.run_id, tracker.experiment_id, tracker.active = "run1", "1", True  # as after start
    model = {"name": "model", "code": str(ROOT / "pyfunc_model.py"), "weights": str(tmp_path / "best.pt"),
             "code_paths": [], "pip_requirements": [], "config": {}, "input_example": "x"}
    stop_at = time.monotonic() + 3
    with pytest.raises(Stopped):
        tracker.log_model(model, lambda: time.monotonic() > stop_at)
    assert time.monotonic() - stop_at < 3
    assert tracker._model_worker.proc.wait(5) is not None  # killed, not left logging


def test_a_trainer_killed_outright_leaves_no_run_running(tmp_path):
    """SIGKILL (out of memory, a node lost) gives the trainer no chance to end its run: the helper
    process sees its pipe close and ends the run KILLED."""
    settings = settings_for(tmp_path, job="t-killed")
    script = (
        "import os, signal, sys\n"
        "from config import load_settings\nfrom tracking import Tracker\nfrom utils import Redactor\n"
        f"settings = load_settings({{'JOB_ID': 't-killed', 'DATASET_ID': 'd', 'STORAGE_TYPE': 'local', "
        f"'WORK_DIR': {str(tmp_path)!r}}})\n"
        "tracker = Tracker(settings, Redactor([]))\ntracker.prepare()\ntracker.start()\n"
        "tracker.log_metrics({'mAP50': 0.5}, step=1)\nassert tracker.flush(60)\n"
        "print(tracker.run_id, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    run_id = result.stdout.strip()
    client = MlflowClient(settings.mlflow_tracking_uri)
    deadline = time.monotonic() + 30
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"mAP50": 0.5}


def test_a_helper_process_that_cannot_start_switches_tracking_off(tmp_path, monkeypatch, caplog):
    """Tracking never fails training, not even when its helper process cannot be started."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    tracker = Tracker(settings_for(tmp_path), Redactor([]))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        tracker.prepare()
        tracker.start()
        tracker.log_metrics({"mAP50": 0.5}, step=1)
        tracker.finish("FAILED")
    assert not tracker.active and tracker.run_id is None
    assert "cannot start MLflow's helper process: FileNotFoundError" in caplog.text


LOG_MODEL = """
import json, logging, sys
from pathlib import Path

import torch
from ultralytics import YOLO

from config import load_settings
from registry import log_trained_model
from tracking import Tracker
from utils import Redactor

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the helpers' lines too
settings = load_settings(json.loads(sys.argv[1]))
torch.manual_seed(1)
YOLO("yolo11n.yaml").save(sys.argv[2])
tracker = Tracker(settings, Redactor([]))
tracker.prepare()
tracker.start()
# (no warm-up here: log_model makes the imports at normal priority; a warm-up at the lowest priority could wait long on a busy machine)
fields = log_trained_model(settings, tracker, Path(sys.argv[2]), "detect", {"mAP50": 0.25}, lambda: False)
helpers = (tracker._worker.proc, tracker._model_worker.proc)
tracker.finish("FINISHED")
print(json.dumps({"fields": fields, "run_id": tracker.run_id, "mlflow_imported": "mlflow" in sys.modules,
                  "two_helpers": helpers[0].pid != helpers[1].pid, "model_helper_gone": helpers[1].poll() is not None}))
"""


def test_the_model_is_logged_and_registered_by_the_helper_and_the_trainer_never_imports_mlflow(tmp_path):
    """Logging the model imported MLflow into the trainer's process (2 s, then 1.4 s scanning the
    installed packages), sharing the interpreter lock with the final validation and uploads. A helper
    process of its own logs and registers it now: the model is complete (code, weights, signature,
    input example, config), the trainer's process has no MLflow module loaded at the end, MLflow's
    expected warnings stay out of the log, and the model's helper ends with the run."""
    from mlflow.models import get_model_info

    variables = {"JOB_ID": "t-model", "DATASET_ID": "d", "STORAGE_TYPE": "local", "WORK_DIR": str(tmp_path),
                 "MLFLOW_REGISTERED_MODEL_NAME": "tracking-test-model", "IMGSZ": "64", "YOLO_OFFLINE": "1"}
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    result = subprocess.run([sys.executable, "-c", LOG_MODEL, json.dumps(variables), str(tmp_path / "best.pt")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mlflow_imported"] is False
    assert out["two_helpers"] and out["model_helper_gone"]  # torch's helper is not the run's, and ends with it
    fields = out["fields"]
    assert fields["mlflow_model_uri"].startswith("models:/"), result.stderr[-3000:]
    assert (fields["registered_model_name"], fields["registered_model_version"]) == ("tracking-test-model", 1)
    assert "MLflow: logged the model as models:/" in result.stderr  # the log is configured: it would show
    assert "could not" not in result.stderr and "WARNING" not in result.stderr  # a clean job logs no warning
    assert "Any type hint" not in result.stderr and "Failed to log model config" not in result.stderr

    settings = settings_for(tmp_path, job="t-model")
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    info = get_model_info(fields["mlflow_model_uri"])
    assert info.run_id == out["run_id"] and info.saved_input_example_info and info.signature is not None
    assert info.flavors["python_function"]["config"] == {"task": "detect", "imgsz": 64, "conf": 0.25, "iou": 0.7,
                                                         "max_det": 300, "batch": 16}
    version = MlflowClient(settings.mlflow_tracking_uri).get_model_version("tracking-test-model", "1")
    assert version.run_id == out["run_id"] and version.tags["primary_metric_value"] == "0.25"
