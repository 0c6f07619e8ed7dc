"""End to end: `python train.py` as the backend runs it, against real S3, MLflow and backend servers.

One detection job (from scratch, 3 epochs, 64-pixel images) runs once for this module;
each test below checks one promise of the contract about that job.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
import zipfile

import pytest
import torch

from tests.conftest import (
    FAST_TRAINING,
    ROOT,
    SECRETS,
    Receiver,
    run_entry,
    storage_env,
)

EPOCHS = 3


@pytest.fixture(scope="module")
def job(s3_server, s3, mlflow_server, dataset_zip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(dataset_zip("detect", top="shapes")), bucket, "datasets/ds-1.zip")
    receiver = Receiver(folder)
    job_id = f"e2e{uuid.uuid4().hex[:6]}"
    experiment = f"project-{job_id}"
    env = {
        **storage_env(s3_server, bucket), **FAST_TRAINING,
        "JOB_ID": job_id, "PROJECT_ID": "p1", "DATASET_ID": "ds-1", "MODEL_NAME": "yolo11n.yaml",
        "TASK_TYPE": "object_detection", "EPOCHS": str(EPOCHS), "LEARNING_RATE": "0.01",
        "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": SECRETS[2],
        "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": experiment,
        "WORK_DIR": str(folder / "work"),
        "PREDICT_BATCH": "8",  # the logged model's batch, unlike the training's 16 (both are MLflow parameters)
        # records any attempt to reach a non-loopback host (tests/netguard/sitecustomize.py)
        "PYTHONPATH": str(ROOT / "tests" / "netguard"), "NETGUARD_LOG": str(folder / "net.log"),
    }
    result = run_entry("train.py", env, cwd=folder, timeout=600)
    receiver.stop()
    yield {"result": result, "receiver": receiver, "bucket": bucket, "job_id": job_id, "experiment": experiment,
           "mlflow": mlflow_server, "s3": s3, "s3_server": s3_server, "work": folder / "work", "net_log": folder / "net.log"}


def test_exits_zero_and_reports_running_then_completed(job):
    result = job["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [b["status"] for b in job["receiver"].bodies("status")]
    assert statuses[0] == "running" and statuses[-1] == "completed"
    assert set(statuses[1:-1]) <= {"running"}
    progress = [b["progress"] for b in job["receiver"].bodies("status")]
    assert progress == sorted(progress) and progress[-1] == 100


def test_a_clean_job_logs_no_warning(job):
    """A warning in a job that went well teaches users to ignore warnings (MLflow's refusal to log
    the model's config as parameters was one, in every job)."""
    output = job["result"].stdout + job["result"].stderr
    assert [line for line in output.splitlines() if "WARNING" in line] == []
    assert {b["level"] for b in job["receiver"].bodies("logs")} == {"INFO"}  # nor on the backend's log panel


def test_every_callback_carries_the_auth_header_and_an_event_id(job):
    entries = job["receiver"].requests(stored_only=False)
    assert entries and all(e["auth"] == SECRETS[2] for e in entries)
    bodies = [b for e in entries if e["body"] is not None for b in (e["body"] if isinstance(e["body"], list) else [e["body"]])]
    assert all(isinstance(b.get("event_id"), str) and b["event_id"] for b in bodies)  # each element of an array too
    assert len({b["event_id"] for b in bodies}) == len(bodies)


def test_every_body_matches_the_backends_schema(job):
    assert job["receiver"].refusals() == []
    assert job["receiver"].requests("validation-image-results")  # the array route was used too


def test_one_validation_result_per_epoch_with_the_contracts_fields(job):
    results = job["receiver"].bodies("validation-results")
    assert [r["epoch"] for r in results] == list(range(1, EPOCHS + 1))  # final evaluation is not an extra epoch
    last_pt = f"s3://{job['bucket']}/checkpoints/job-{job['job_id']}/last.pt"
    for r in results:
        assert r["total_epochs"] == EPOCHS and r["task_type"] == "object_detection"
        m = r["metrics"]
        for key in ("precision", "recall", "mAP50", "mAP50-95", "fitness"):
            assert 0.0 <= m[key] <= 1.0, (key, m[key])
        assert m["mAP@0.5"] == m["mAP50"] and m["mAP@0.5:0.95"] == m["mAP50-95"]  # the UI's names
        assert (r["primary_metric_name"], r["primary_metric_value"]) == ("mAP@0.5", m["mAP50"])
        assert {"val/box_loss", "val/cls_loss", "val/dfl_loss"} <= set(m)
        assert all(math.isfinite(v) and v >= 0 for k, v in m.items() if k.startswith("val/"))
        assert r["overall_loss"] == pytest.approx(sum(v for k, v in m.items() if k.startswith("val/")), abs=1e-4)
        assert r["class_names"] == ["rectangle", "ellipse"] and r["checkpoint_path"] == last_pt
        per_class = r["per_class_metrics"]
        assert set(per_class) == {"rectangle", "ellipse"}
        supported = [c for c in per_class.values() if c["support"] > 0]
        assert supported
        for key, overall in (("ap_50", "mAP50"), ("ap_50_95", "mAP50-95"), ("precision", "precision"),
                             ("recall", "recall")):  # Ultralytics' overall numbers are the means over classes
            assert sum(c[key] for c in supported) / len(supported) == pytest.approx(m[overall], abs=2e-4), key
        matrix = r["confusion_matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        assert all(sum(row) <= per_class[name]["support"] for row, name in zip(matrix, r["class_names"]))


def test_validation_images_carry_boxes_inside_the_image(job):
    ids = {e["body"]["epoch"]: e["answer"]["validation_result_id"] for e in job["receiver"].requests("validation-results")}
    images = [image for b in job["receiver"].bodies("validation-image-results") for image in b]
    assert sorted(ids) == list(range(1, EPOCHS + 1))
    for epoch, result_id in ids.items():
        mine = [i for i in images if i["validation_result_id"] == result_id]
        assert all(i["epoch"] == epoch for i in mine)
        assert sorted(i["image_index"] for i in mine) == list(range(16))  # 16 val images, fewer than 50
        for i in mine:
            assert i["image_name"].startswith("images/val/") and i["image_path"] == "/workspace/dataset/" + i["image_name"]
            assert i["true_boxes"] and i["true_label"] in ("rectangle", "ellipse")
            for box in i["true_boxes"] + i["predicted_boxes"]:
                x1, y1, x2, y2 = box["bbox"]
                assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64 and box["format"] == "xyxy"
            assert all(b["confidence"] >= 0.25 for b in i["predicted_boxes"])


def test_one_training_metrics_row_per_epoch(job):
    rows = job["receiver"].bodies("training-metrics")
    results = job["receiver"].bodies("validation-results")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for row, result in zip(rows, results):
        extra = row["extra_metrics"]
        assert row["step"] == row["epoch"] and row["accuracy"] == result["primary_metric_value"]
        assert row["loss"] == pytest.approx(sum(v for k, v in extra.items() if k.startswith("train/")), abs=1e-4)
        assert extra["train_loss"] == row["loss"] and extra["val_loss"] == result["overall_loss"]
        assert row["learning_rate"] == extra["lr/pg0"] and row["checkpoint_path"] == result["checkpoint_path"]
        assert {"train/box_loss", "train/cls_loss", "train/dfl_loss", "lr/pg1", "mAP50", "val/box_loss"} <= set(extra)
    assert job["receiver"].bodies("metrics") == []  # this backend has training-metrics: no per-name posts


def test_statuses_carry_the_mlflow_ids_once_the_run_exists(job):
    statuses = job["receiver"].bodies("status")
    first = next(i for i, s in enumerate(statuses) if s.get("mlflow_run_id"))
    assert first == 1 and statuses[first]["status"] == "running"  # right after the run was made
    assert all(s["mlflow_run_id"] == statuses[-1]["mlflow_run_id"] for s in statuses[first:])
    assert all(s["mlflow_experiment_id"] == statuses[-1]["mlflow_experiment_id"] for s in statuses[first:])


def test_final_status_carries_the_contract_fields(job):
    final = job["receiver"].bodies("status")[-1]
    assert final["error"] is None and final["exit_code"] == 0
    assert final["epochs_completed"] == EPOCHS
    assert final["best_checkpoint"] == f"s3://{job['bucket']}/checkpoints/job-{job['job_id']}/best.pt"
    assert final["last_checkpoint"] == f"s3://{job['bucket']}/checkpoints/job-{job['job_id']}/last.pt"
    assert final["mlflow_run_id"] and final["mlflow_run_id"] in final["mlflow_run_url"]
    assert {"precision", "recall", "mAP50", "mAP50-95"} <= set(final["final_metrics"])
    assert final["training_time_seconds"] > 0


def test_checkpoints_are_in_storage_and_load(job):
    from ultralytics import YOLO

    prefix = f"checkpoints/job-{job['job_id']}/"
    keys = {o["Key"] for o in job["s3"].list_objects_v2(Bucket=job["bucket"], Prefix=prefix)["Contents"]}
    assert {prefix + n for n in ("best.pt", "last.pt", "results.csv", "events.jsonl")} <= keys
    for name in ("best.pt", "last.pt"):
        data = job["s3"].get_object(Bucket=job["bucket"], Key=prefix + name)["Body"].read()
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == -1 or ckpt["epoch"] == EPOCHS - 1  # Ultralytics marks finished checkpoints -1
        assert ckpt["train_args"]["epochs"] == EPOCHS
        path = job["work"] / f"loaded-{name}"
        path.write_bytes(data)
        model = YOLO(str(path))
        assert model.task == "detect" and model.names == {0: "rectangle", 1: "ellipse"}


def test_predict_runs_on_the_trained_checkpoint(job, dataset_zip):
    import zipfile

    folder = job["work"].parent / "predict-in"
    with zipfile.ZipFile(dataset_zip("detect", top="shapes")) as zf:
        zf.extractall(folder)
    env = {**storage_env(job["s3_server"], job["bucket"]), "JOB_ID": job["job_id"], "IMGSZ": "64", "DEVICE": "cpu",
           "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "INPUT_URI": str(folder / "shapes" / "images" / "val"),
           "WORK_DIR": str(job["work"])}
    result = run_entry("predict.py", env, cwd=job["work"].parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["count"] == 16 and doc["task"] == "detect"
    assert {d["class_name"] for p in doc["predictions"] for d in p["detections"]} <= {"rectangle", "ellipse"}


def test_event_log_in_storage_matches_callbacks(job):
    key = f"checkpoints/job-{job['job_id']}/events.jsonl"
    lines = job["s3"].get_object(Bucket=job["bucket"], Key=key)["Body"].read().decode().splitlines()
    events = [json.loads(line) for line in lines]

    def ids(bodies) -> set:
        return {b["event_id"] for body in bodies for b in (body if isinstance(body, list) else [body])}

    assert ids(e["body"] for e in events) == ids(e["body"] for e in job["receiver"].requests() if e["route"] != "health")
    assert events[-1]["body"]["status"] == "completed"


def test_mlflow_has_one_run_with_one_point_per_epoch_params_and_artifacts(job):
    from mlflow import MlflowClient

    client = MlflowClient(job["mlflow"])
    experiment = client.get_experiment_by_name(job["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == f"job-{job['job_id']}" and run.info.status == "FINISHED"
    assert run.data.tags["job_id"] == job["job_id"]
    params = run.data.params
    assert params["epochs"] == str(EPOCHS) and params["imgsz"] == "64" and params["task"] == "detect"
    assert params["lr0"] == "0.01" and params["optimizer"] == "AdamW"  # LEARNING_RATE is honoured, not auto-replaced
    for key in ("mAP50", "mAP50-95", "precision", "train/box_loss", "val/box_loss", "lr/pg0", "fitness",
                "train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert {"results.csv", "results.png"} <= top
    assert {"weights/best.pt", "weights/last.pt"} <= weights


def test_no_secret_in_output_callbacks_or_storage(job):
    result = job["result"]
    texts = [result.stdout, result.stderr, job["receiver"].record.read_text()]
    key = f"checkpoints/job-{job['job_id']}/events.jsonl"
    texts.append(job["s3"].get_object(Bucket=job["bucket"], Key=key)["Body"].read().decode())
    for text in texts:
        for secret in SECRETS[:2]:  # the auth token is legitimately in the receiver's record of headers
            assert secret not in text
    assert SECRETS[2] not in result.stdout + result.stderr + texts[-1]


def test_configuration_is_logged_once_with_secrets_masked(job):
    lines = [line for line in job["result"].stderr.splitlines() if "configuration: {" in line]
    assert len(lines) == 1
    config = json.loads(lines[0].split("configuration: ", 1)[1])
    assert config["storage"]["secret_key"] == "***" and config["storage"]["access_key"] == "***"
    assert config["backend"]["token"] == "***"
    assert config["epochs"] == EPOCHS


def test_each_epoch_logs_one_summary_line_with_losses_metric_time_and_eta(job):
    line = re.compile(r" trainer: epoch (\d+)/(\d+) \| train loss box \d+\.\d{3} cls \d+\.\d{3} dfl \d+\.\d{3} \| "
                      r"mAP@0\.5 \d\.\d{4} \| \d+\.\d s, ETA (\d+ s|\d+ min \d\d s)$")
    found = [(int(m[1]), int(m[2])) for m in map(line.search, job["result"].stderr.splitlines()) if m]
    assert found == [(epoch, EPOCHS) for epoch in range(1, EPOCHS + 1)], job["result"].stderr[-3000:]


def test_runs_offline_without_any_outside_connection_attempt(job):
    assert job["result"].returncode == 0
    attempts = job["net_log"].read_text() if job["net_log"].exists() else ""
    assert attempts == "", attempts  # no font, weights, analytics or DNS look-up outside loopback


# ------------------------------------------------------------------------------------------
# Failure paths and pretrained weights (each a short run of its own)
# ------------------------------------------------------------------------------------------


def base_env(s3_server, bucket, receiver, tmp_path, **extra) -> dict:
    job_id = f"f{uuid.uuid4().hex[:6]}"
    return {**storage_env(s3_server, bucket), **FAST_TRAINING, "JOB_ID": job_id, "DATASET_ID": "ds",
            "MODEL_NAME": "yolo11n.yaml", "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": SECRETS[2],
            "WORK_DIR": str(tmp_path / "work"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}", **extra}


def test_invalid_configuration_exits_2_and_reports_failed(s3_server, bucket, receiver, tmp_path):
    env = base_env(s3_server, bucket, receiver, tmp_path, EPOCHS="0", TRAIN_ARGS='{"data": "x"}')
    result = run_entry("train.py", env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    (final,) = receiver.bodies("status")  # no "running": the job never started
    assert final["status"] == "failed" and final["exit_code"] == 2
    assert "EPOCHS=0 is out of range" in final["error"] and "TRAIN_ARGS may not set 'data'" in final["error"]
    (log,) = receiver.bodies("logs")  # the log panel says why, as for any failure
    assert log["level"] == "ERROR" and log["message"].startswith("job failed (exit 2): ") and "EPOCHS=0" in log["message"]


def test_missing_dataset_exits_2_naming_the_object(s3_server, bucket, receiver, tmp_path):
    env = base_env(s3_server, bucket, receiver, tmp_path, DATASET_ID="absent")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    statuses = receiver.bodies("status")
    assert [s["status"] for s in statuses] == ["running", "failed"]
    assert statuses[-1]["error"] == f"dataset s3://{bucket}/datasets/absent.zip does not exist"
    assert statuses[-1]["exit_code"] == 2
    errors = [b["message"] for b in receiver.bodies("logs") if b["level"] == "ERROR"]  # the contract: logs get errors
    assert errors == [f"job failed (exit 2): dataset s3://{bucket}/datasets/absent.zip does not exist"]


def test_a_refused_dataset_fails_without_waiting_for_torch_and_ultralytics(s3_server, s3, bucket, receiver, tmp_path):
    """Importing torch and Ultralytics takes seconds (on a helper thread, beside the dataset's download
    and check): a job whose dataset is refused fails without waiting for it. An Ultralytics whose
    import never ends stands in for a slow one; the job must still end, with the dataset's error."""
    stuck = tmp_path / "stuck" / "ultralytics"
    stuck.mkdir(parents=True)
    (stuck / "__init__.py").write_text("import time\ntime.sleep(600)\n")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes/readme.txt", b"not a dataset")
    s3.put_object(Bucket=bucket, Key="datasets/ds.zip", Body=archive.getvalue())
    env = base_env(s3_server, bucket, receiver, tmp_path, PYTHONPATH=str(stuck.parent))
    result = run_entry("train.py", env, cwd=tmp_path, timeout=90)
    assert result.returncode == 2, result.stderr[-2000:]
    final = receiver.bodies("status")[-1]
    assert final["status"] == "failed" and "has no data.yaml" in final["error"]


def test_weights_that_do_not_load_are_bad_input_and_make_no_mlflow_run(s3_server, s3, bucket, receiver, dataset_zip,
                                                                        tmp_path):
    """docs/job.md: a job refused before training makes no MLflow run; one refused for its weights made
    a FAILED run (its failed status even named it), as the run was made before the model was built."""
    import sqlite3

    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    s3.put_object(Bucket=bucket, Key="models/junk.pt", Body=b"\xb9" + os.urandom(3000))
    env = base_env(s3_server, bucket, receiver, tmp_path, MODEL_NAME="s3://" + bucket + "/models/junk.pt")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    final = receiver.bodies("status")[-1]
    assert final["error"].startswith(f"MODEL_NAME=s3://{bucket}/models/junk.pt: cannot load junk.pt: junk.pt is not a "
                                     "loadable checkpoint") and "mlflow_run_id" not in final
    database = tmp_path / "ml.db"
    runs = sqlite3.connect(database).execute("select count(*) from runs").fetchone()[0] if database.exists() else 0
    assert runs == 0


def test_pretrained_name_without_weights_is_a_clear_bad_input(s3_server, s3, bucket, receiver, dataset_zip, tmp_path):
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    env = base_env(s3_server, bucket, receiver, tmp_path, MODEL_NAME="yolo11n", WEIGHTS_DOWNLOAD="false")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    error = receiver.bodies("status")[-1]["error"]
    assert error.startswith(f"pretrained weights yolo11n.pt not found: not in s3://{bucket}/models/yolo11n.pt")
    assert "Traceback" not in result.stderr


def test_pretrained_name_trains_from_the_weights_in_storage(s3_server, s3, bucket, receiver, dataset_zip, tmp_path):
    from ultralytics import YOLO

    weights = tmp_path / "yolo11n.pt"
    YOLO("yolo11n.yaml").save(str(weights))  # stands in for the released weights an operator uploads
    s3.upload_file(str(weights), bucket, "models/yolo11n.pt")
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    env = base_env(s3_server, bucket, receiver, tmp_path, MODEL_NAME="yolo11n", WEIGHTS_DOWNLOAD="false",
                   EPOCHS="1", TRAIN_ARGS='{"plots": false}')
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"downloading s3://{bucket}/models/yolo11n.pt" in result.stderr
    moved, total = map(int, re.search(r"Transferred (\d+)/(\d+) items from pretrained", result.stderr).groups())
    assert moved >= 0.95 * total  # loaded, not re-initialised (only the 80-class head differs from 2 classes)
    assert receiver.bodies("status")[-1]["status"] == "completed"
