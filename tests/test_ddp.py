"""Multi-GPU (DDP) without GPUs: the callbacks survive Ultralytics' relaunch and only rank 0 reports.

Ultralytics trains on several GPUs by cloudpickling the trainer's callbacks into a file and
starting one worker process per GPU that loads them. tests/ddp_sim.py does exactly that in two
processes: `parent` builds the callbacks as train.py does (train.py as __main__), `worker` loads
them and runs one epoch of hooks as rank 0 or rank 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import torch

from tests.conftest import AUTH_TOKEN, ROOT


def run_sim(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tests.ddp_sim", *args], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_callbacks_survive_the_ddp_relaunch_and_only_rank_0_reports(receiver, tmp_path):
    from mlflow import MlflowClient

    job_id = f"ddp{uuid.uuid4().hex[:6]}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"JOB_ID": job_id, "DATASET_URI": str(tmp_path), "STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(tmp_path / "store"),
           "WORK_DIR": str(tmp_path / "work"), "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": AUTH_TOKEN,
           "MLFLOW_TRACKING_URI": tracking}
    payload = tmp_path / "callbacks.pkl"
    run_id = run_sim("parent", str(payload), env=env).stdout.strip().splitlines()[-1]
    last = tmp_path / "weights" / "last.pt"
    last.parent.mkdir()
    torch.save({"epoch": 0, "model": None}, last)  # a real (zip) checkpoint file: damaged ones are not uploaded

    run_sim("worker", str(payload), str(last), env={**env, "RANK": "1", "LOCAL_RANK": "1"})
    assert receiver.requests() == []  # rank 1 sends nothing, uploads nothing, logs nothing to MLflow
    assert not (tmp_path / "store").exists()

    run_sim("worker", str(payload), str(last), env={**env, "RANK": "0", "LOCAL_RANK": "0"})
    (result,) = receiver.bodies("validation-results")  # once, from rank 0, flushed before the worker exited
    assert result["epoch"] == 1 and result["metrics"]["mAP50"] == 0.25 and result["task_type"] == "object_detection"
    assert result["per_class_metrics"]["rectangle"]["ap_50"] == 0.25
    (row,) = receiver.bodies("training-metrics")
    assert {"train/box_loss", "lr/pg0", "train_loss"} <= set(row["extra_metrics"])
    assert receiver.bodies("status")[-1]["epoch"] == 1
    stored = tmp_path / "store" / "vision-platform" / "checkpoints" / f"job-{job_id}" / "last.pt"
    assert stored.read_bytes() == last.read_bytes()  # the worker uploaded the checkpoint itself
    client = MlflowClient(tracking)
    assert [m.step for m in client.get_metric_history(run_id, "mAP50")] == [1]  # the same run as the parent's
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
