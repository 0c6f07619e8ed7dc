"""Every YOLO task end to end, dataset layouts users upload, pretrained weights and fine-tuning.

Each task: a generated learnable dataset in that task's format, `python train.py` against the
S3 server, the MLflow server and the backend receiver, then `python predict.py` on the result.
(Detection is covered the same way in test_train_e2e.py.)
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import uuid

import pytest
import torch

from tests.conftest import FAST_TRAINING, SECRETS, run_entry, storage_env
from tests.sample_data import make_dataset, make_zip

EPOCHS = 2
PLATFORM = {"segment": "instance_segmentation", "pose": "pose_estimation", "obb": "oriented_detection",
            "classify": "image_classification"}
TASKS = {
    # task: (MODEL_NAME, TASK_TYPE or None = inferred, metric keys, predict fields)
    "segment": ("yolo11n-seg", "instance_segmentation", ("mask_mAP50", "mask_mAP50-95", "mAP50", "val/seg_loss"), "polygon"),
    "pose": ("yolo11n-pose.yaml", None, ("pose_mAP50", "pose_mAP50-95", "mAP50", "val/pose_loss"), "keypoints"),
    "obb": ("yolo11n-obb.yaml", "oriented_detection", ("mAP50", "mAP50-95", "precision", "val/box_loss"), "rotated_box"),
    "classify": ("yolo11n-cls.yaml", "image_classification", ("top1", "top5", "val/loss", "accuracy", "f1_score"),
                 "classifications"),
}
VAL_IMAGES = 16  # tests/sample_data.py's default validation split


def assert_validation_details(task: str, results: list[dict], receiver) -> None:
    """The task's primary metric, confusion matrix and per-image results, as the backend stores them."""
    ids = {e["answer"]["validation_result_id"]: e["body"] for e in receiver.requests("validation-results")}
    images = [i for b in receiver.bodies("validation-image-results") for i in b]
    for result_id, r in ids.items():
        mine = sorted((i for i in images if i["validation_result_id"] == result_id), key=lambda i: i["image_index"])
        assert [i["image_index"] for i in mine] == list(range(VAL_IMAGES)), task
        matrix, m = r["confusion_matrix"], r["metrics"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        if task == "classify":
            assert r["primary_metric_name"] == "accuracy" and r["primary_metric_value"] == m["top1"] == m["accuracy"]
            assert sum(map(sum, matrix)) == VAL_IMAGES  # every validation image once, row = its true class
            assert (matrix[0][0] + matrix[1][1]) / VAL_IMAGES == pytest.approx(m["top1"], abs=1e-4)
            assert [sum(row) for row in matrix] == [r["per_class_metrics"][n]["support"] for n in r["class_names"]]
            assert sum(i["is_correct"] for i in mine) == matrix[0][0] + matrix[1][1]
            for i in mine:
                assert i["image_name"].startswith("val/") and i["true_label"] in r["class_names"]
                assert i["top5_predictions"][0]["label_id"] == i["predicted_label_id"]
                assert i["is_correct"] == (i["predicted_label_id"] == i["true_label_id"])
                assert abs(sum(p["confidence"] for p in i["top5_predictions"]) - 1) < 0.01  # two classes
        else:
            assert r["primary_metric_name"] == "mAP@0.5" and r["primary_metric_value"] == m["mAP50"]
            for i in mine:
                assert i["true_boxes"] and all(0 <= v <= 64 for b in i["true_boxes"] + i["predicted_boxes"]
                                               for v in b["bbox"])
            if task == "segment":
                assert m["mAP50(M)"] == m["mask_mAP50"] and "ap_50(M)" in r["per_class_metrics"]["rectangle"]


@pytest.fixture(scope="module")
def space(s3_server, s3, tmp_path_factory):
    bucket = f"tasks-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    return {"bucket": bucket, "s3": s3, "s3_server": s3_server, "tmp": tmp_path_factory}


def job_env(space, receiver, folder, job_id, **extra) -> dict:
    return {**storage_env(space["s3_server"], space["bucket"]), **FAST_TRAINING, "EPOCHS": str(EPOCHS),
            "JOB_ID": job_id, "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": SECRETS[2],
            "TRAIN_ARGS": '{"plots": false}', "WORK_DIR": str(folder / "work"), **extra}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_trains_reports_its_metrics_and_predicts(task, space, mlflow_server, receiver, tmp_path):
    from mlflow import MlflowClient

    model_name, task_type, keys, field = TASKS[task]
    s3, bucket = space["s3"], space["bucket"]
    source = make_dataset(tmp_path / "ds", task)
    if task == "classify":  # a .tar.gz through DATASET_URI, class folders inside one top folder
        archive = tmp_path / "ds.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(source, arcname="flowers")
        s3.upload_file(str(archive), bucket, "datasets/cls.tar.gz")
        dataset = {"DATASET_URI": f"s3://{bucket}/datasets/cls.tar.gz"}
    else:
        s3.upload_file(str(make_zip(source, tmp_path / "ds.zip")), bucket, f"datasets/{task}.zip")
        dataset = {"DATASET_ID": task}
    if task == "segment":  # pretrained weights by name, from storage as an operator seeds them
        from ultralytics import YOLO

        YOLO("yolo11n-seg.yaml").save(str(tmp_path / "seg.pt"))
        s3.upload_file(str(tmp_path / "seg.pt"), bucket, "models/yolo11n-seg.pt")
    job_id = f"{task[:3]}{uuid.uuid4().hex[:6]}"
    experiment = f"tasks-{job_id}"
    env = job_env(space, receiver, tmp_path, job_id, MODEL_NAME=model_name, MLFLOW_TRACKING_URI=mlflow_server,
                  MLFLOW_EXPERIMENT_NAME=experiment, WEIGHTS_DOWNLOAD="false", **dataset,
                  **({"TASK_TYPE": task_type} if task_type else {}))
    result = run_entry("train.py", env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    statuses = [b["status"] for b in receiver.bodies("status")]
    assert statuses[0] == "running" and statuses[-1] == "completed"
    results = receiver.bodies("validation-results")
    assert [r["epoch"] for r in results] == list(range(1, EPOCHS + 1))
    assert {r["task_type"] for r in results} == {PLATFORM[task]}
    for r in results:
        assert set(keys) <= set(r["metrics"]), (task, sorted(r["metrics"]))
        assert all(0 <= r["metrics"][k] <= 1 for k in keys if not k.startswith("val/"))
        names = ["ellipse", "rectangle"] if task == "classify" else ["rectangle", "ellipse"]  # class folders sort
        assert r["class_names"] == names and set(r["per_class_metrics"]) == set(names)
    assert [m["epoch"] for m in receiver.bodies("training-metrics")] == list(range(1, EPOCHS + 1))
    assert_validation_details(task, results, receiver)
    if task == "segment":
        moved, total = map(int, re.search(r"Transferred (\d+)/(\d+) items from pretrained", result.stderr).groups())
        assert moved >= 0.95 * total  # started from the stored weights, not re-initialised

    best = s3.get_object(Bucket=bucket, Key=f"checkpoints/job-{job_id}/best.pt")["Body"].read()
    ckpt = torch.load(io.BytesIO(best), map_location="cpu", weights_only=False)
    assert ckpt["train_args"]["task"] == task
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.params["task"] == task
    for key in keys:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
    for text in (result.stdout, result.stderr):
        assert not any(secret in text for secret in SECRETS)

    images = sorted((source / "val").rglob("*.jpg") if task == "classify" else (source / "images" / "val").iterdir())
    for image in images[:3]:
        s3.upload_file(str(image), bucket, f"inputs/{job_id}/{image.name}")
    predicted = run_entry("predict.py", {**storage_env(space["s3_server"], bucket), "JOB_ID": job_id, "IMGSZ": "64",
                                         "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "DEVICE": "cpu",
                                         "INPUT_URI": f"inputs/{job_id}/", "WORK_DIR": str(tmp_path / "work")},
                          cwd=tmp_path, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    doc = json.loads(predicted.stdout)
    assert doc["count"] == 3 and doc["task"] == task
    for p in doc["predictions"]:
        assert (p["width"], p["height"]) == (64, 64)
        if task == "classify":
            assert len(p[field]) == 2 and abs(sum(c["confidence"] for c in p[field]) - 1) < 0.01  # 2 classes
            assert {c["class_name"] for c in p[field]} == {"rectangle", "ellipse"}
        else:
            assert p["detections"] and all(field in d for d in p["detections"])
            assert {d["class_name"] for d in p["detections"]} <= {"rectangle", "ellipse"}


# ------------------------------------------------------------------------------------------
# Dataset layouts, caching, fine-tuning
# ------------------------------------------------------------------------------------------


def test_unpacked_prefix_with_txt_lists_names_mapping_and_no_val_then_fine_tuning(space, receiver_factory, tmp_path):
    s3, bucket = space["s3"], space["bucket"]
    root = make_dataset(tmp_path / "export", "detect", n_train=12, n_val=1)
    images = sorted(p.name for p in (root / "images" / "train").iterdir())
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("".join(f"../images/train/{n}\n" for n in images))  # relative to the list
    (root / "data.yaml").write_text("path: /data/exports/shapes\ntrain: lists/train.txt\n"
                                    "names:\n  0: rectangle\n  1: ellipse\n")
    for f in sorted(root.rglob("*")):
        if f.is_file() and "images/val" not in f.as_posix() and "labels/val" not in f.as_posix():
            s3.upload_file(str(f), bucket, f"datasets/unpacked-1/{f.relative_to(root).as_posix()}")

    receiver = receiver_factory()
    job_id = f"pre{uuid.uuid4().hex[:6]}"
    env = job_env(space, receiver, tmp_path, job_id, EPOCHS="1", MODEL_NAME="yolo11n.yaml",
                  DATASET_URI=f"s3://{bucket}/datasets/unpacked-1/", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'ml.db'}")
    first = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no val split in data.yaml: 1 of 12 train images become the validation split" in first.stderr
    assert [r["epoch"] for r in receiver.bodies("validation-results")] == [1]

    again = {**env, "JOB_ID": f"{job_id}b", "CALLBACK_URL": receiver.url(f"{job_id}b"), "EPOCHS": "1",
             "MODEL_NAME": f"checkpoints/job-{job_id}/best.pt"}  # fine-tune the first job's result
    second = run_entry("train.py", again, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already downloaded" in second.stderr  # cached by its listing: not downloaded again
    moved, total = map(int, re.search(r"Transferred (\d+)/(\d+) items from pretrained", second.stderr).groups())
    assert moved == total  # every weight of the previous checkpoint (same classes) was loaded


def test_segmentation_of_four_corner_polygons_trains(space, receiver, tmp_path):
    """Labels of 9 values (class and 4 points) are also oriented boxes: the explicit task decides."""
    s3, bucket = space["s3"], space["bucket"]
    source = make_dataset(tmp_path / "ds", "segment", n_train=8, n_val=4)
    for label in source.rglob("labels/*/*.txt"):  # every polygon becomes the 4 corners around it
        lines = []
        for line in label.read_text().split("\n"):
            if line.strip():
                cls, *xy = line.split()
                xs, ys = [float(v) for v in xy[0::2]], [float(v) for v in xy[1::2]]
                corners = [(min(xs), min(ys)), (max(xs), min(ys)), (max(xs), max(ys)), (min(xs), max(ys))]
                lines.append(" ".join([cls] + [f"{v:.6f}" for point in corners for v in point]))
        label.write_text("\n".join(lines) + "\n")
    s3.upload_file(str(make_zip(source, tmp_path / "quads.zip")), bucket, "datasets/quads.zip")
    job_id = f"quad{uuid.uuid4().hex[:6]}"
    env = job_env(space, receiver, tmp_path, job_id, EPOCHS="1", TASK_TYPE="instance_segmentation",
                  MODEL_NAME="yolo11n-seg.yaml", DATASET_ID="quads", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'ml.db'}")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the dataset is ambiguous" in result.stderr and "training segment as TASK_TYPE says" in result.stderr
    assert receiver.bodies("status")[-1]["status"] == "completed"
    assert {r["task"] for r in receiver.bodies("validation-results")} == {"segment"}


@pytest.mark.parametrize("model,task_type,dataset,message", [
    ("yolo11n-seg.yaml", "classification", "detect",
     r"TASK_TYPE asks for classify, but MODEL_NAME=yolo11n-seg\.yaml is a segment model"),
    ("yolo11n-pose.yaml", None, "detect",
     r"the dataset is a detect dataset \(its labels are boxes \(5 values\)\), but this job trains a pose model"),
    ("yolo11n.yaml", None, "classify", r"the dataset is a classify dataset \(class folders without a data\.yaml\), "
                                       r"but this job trains a detect model"),
    ("<detect-checkpoint>", "pose_estimation", "pose", r"TASK_TYPE asks for pose, but MODEL_NAME=\S+ is a detect model"),
])
def test_task_mismatch_is_a_clear_bad_input_before_training(model, task_type, dataset, message, space, receiver,
                                                             tmp_path):
    s3, bucket = space["s3"], space["bucket"]
    s3.upload_file(str(make_zip(make_dataset(tmp_path / "ds", dataset, n_train=2, n_val=1), tmp_path / "d.zip")),
                   bucket, f"datasets/mismatch-{dataset}.zip")
    if model == "<detect-checkpoint>":
        from ultralytics import YOLO

        YOLO("yolo11n.yaml").save(str(tmp_path / "det.pt"))
        model = str(tmp_path / "det.pt")
    job_id = f"mm{uuid.uuid4().hex[:6]}"
    env = job_env(space, receiver, tmp_path, job_id, MODEL_NAME=model, DATASET_ID=f"mismatch-{dataset}",
                  MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'ml.db'}", **({"TASK_TYPE": task_type} if task_type else {}))
    result = run_entry("train.py", env, cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    final = receiver.bodies("status")[-1]
    assert final["status"] == "failed" and re.search(message, final["error"]), final["error"]
    assert "Starting training" not in result.stderr
