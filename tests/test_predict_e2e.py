"""End to end: `python predict.py` as the backend runs it, on checkpoints and images in real S3."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import run_entry, storage_env
from tests.sample_data import make_dataset


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained detection checkpoint saved by Ultralytics (no download needed)."""
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("weights") / "untrained.pt"
    YOLO("yolo11n.yaml").save(str(path))
    return path


def test_prefix_of_images_in_storage_gives_one_json_document(s3_server, s3, bucket, weights, tmp_path):
    images = make_dataset(tmp_path / "ds", "detect", n_train=1, n_val=5) / "images" / "val"
    for f in sorted(images.iterdir()):
        s3.upload_file(str(f), bucket, f"inputs/batch-1/{f.name}")
    job_id = f"p{uuid.uuid4().hex[:6]}"
    s3.upload_file(str(weights), bucket, f"checkpoints/job-{job_id}/best.pt")
    env = {**storage_env(s3_server, bucket), "JOB_ID": job_id, "INPUT_URI": f"s3://{bucket}/inputs/batch-1/",
           "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "DEVICE": "cpu", "WORK_DIR": str(tmp_path / "work")}
    result = run_entry("predict.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert doc["count"] == 5 == len(doc["predictions"])
    for p in doc["predictions"]:
        assert (p["width"], p["height"]) == (64, 64)
        for d in p["detections"]:
            assert 0.0 <= d["confidence"] <= 1.0
            assert 0 <= d["box"]["x1"] <= d["box"]["x2"] <= 64 and 0 <= d["box"]["y1"] <= d["box"]["y2"] <= 64
            assert isinstance(d["class_id"], int) and isinstance(d["class_name"], str)
    assert "downloading" in result.stderr  # logs went to stderr


def test_missing_checkpoint_is_bad_input(s3_server, bucket, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not read")
    env = {**storage_env(s3_server, bucket), "CHECKPOINT_URI": "checkpoints/job-none/best.pt",
           "INPUT_URI": str(tmp_path / "a.jpg"), "WORK_DIR": str(tmp_path / "work")}
    result = run_entry("predict.py", env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"checkpoint not found: s3://{bucket}/checkpoints/job-none/best.pt" in result.stderr
