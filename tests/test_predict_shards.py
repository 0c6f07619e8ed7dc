"""Sharded predict.py: the pods of a Kubernetes Indexed Job split one input between them with no
coordination (a hash of each key), and each writes its own document and images."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import pytest

from config import load_settings
from shards import Shard, shard_of
from tests.conftest import ROOT, storage_env
from tests.sample_data import make_dataset
from utils import BadInput, ConfigError

SHARDS = 3


def test_a_key_s_shard_is_sha1_of_the_key_modulo_the_count():
    key = "sub/val_0001.jpg"
    assert shard_of(key, 7) == int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % 7
    assert shard_of(key, 1) == 0
    counts = collections.Counter(shard_of(f"images/img_{i:05d}.jpg", 4) for i in range(4000))
    assert sorted(counts) == [0, 1, 2, 3] and all(850 < n < 1150 for n in counts.values()), counts


def test_each_shard_takes_its_share_in_input_order_and_together_they_take_everything():
    keys = [f"k{i:03d}.jpg" for i in range(60)]
    taken = []
    for index in range(SHARDS):
        shard = Shard(index, SHARDS)
        mine = list(shard.select(keys, str, "in/"))
        assert mine == [k for k in keys if k in mine]  # input order kept
        assert (shard.listed, shard.taken) == (60, len(mine))
        assert shard.fields() == {"shard": index, "shards": SHARDS, "listed": 60}
        assert shard.document_name() == f"predictions-{index}.json"
        taken += mine
    assert sorted(taken) == keys  # every key exactly once
    assert list(Shard(None).select(keys, str, "in/")) == keys and Shard(None).fields() == {}
    assert Shard(None).document_name() == "predictions.json" and Shard(None).images_folder() == "images/"


def test_an_input_without_images_is_bad_input_for_every_shard_but_an_empty_shard_is_not():
    with pytest.raises(BadInput, match="INPUT_URI=in/: no images found"):
        list(Shard(1, SHARDS).select([], str, "in/"))
    key = "only.jpg"
    other = (shard_of(key, SHARDS) + 1) % SHARDS
    assert list(Shard(other, SHARDS).select([key], str, "in/")) == []  # the image is another shard's


@pytest.mark.parametrize("env,expected", [
    ({"PREDICT_SHARDS": "4"}, "PREDICT_SHARDS=4 needs JOB_COMPLETION_INDEX (0 to 3)"),
    ({"PREDICT_SHARDS": "4", "JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX=4 is out of range: expected 0 to"),
    ({"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX=1 is out of range"),  # PREDICT_SHARDS defaults to 1
    ({"PREDICT_SHARDS": "0", "JOB_COMPLETION_INDEX": "0"}, "PREDICT_SHARDS=0 is out of range"),
    ({"PREDICT_SHARDS": "2", "JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX=-1 is out of range"),
    ({"PREDICT_SHARDS": "2", "JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX='one' is not an integer"),
])
def test_shard_settings_are_validated(env, expected):
    with pytest.raises(ConfigError) as info:
        load_settings({"STORAGE_TYPE": "local", "JOB_ID": "1", "INPUT_URI": "in/", **env}, "predict")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_shard_settings_are_read_by_predict_only():
    s = load_settings({"STORAGE_TYPE": "local", "JOB_ID": "1", "INPUT_URI": "in/", "PREDICT_SHARDS": "8",
                       "JOB_COMPLETION_INDEX": "7"}, "predict")
    assert (s.predict_shards, s.predict_shard) == (8, 7)
    train = load_settings({"STORAGE_TYPE": "local", "JOB_ID": "1", "DATASET_ID": "d", "PREDICT_SHARDS": "8",
                           "JOB_COMPLETION_INDEX": "9"})  # an Indexed Job's index means nothing to train.py
    assert (train.predict_shards, train.predict_shard) == (1, None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("weights") / "detect.pt"
    torch.manual_seed(1)
    YOLO("yolo11n.yaml").save(str(path))
    return path


def test_n_processes_with_indexes_0_to_n_1_cover_every_image_exactly_once(s3_server, s3, bucket, checkpoint, tmp_path):
    images = sorted((make_dataset(tmp_path / "ds", "detect", n_train=1, n_val=5) / "images" / "val").iterdir())
    keys = [f"inputs/batch/{f.name}" for f in images] + [f"inputs/batch/sub/{f.name}" for f in images[:3]]
    for key in keys:  # the same file names in two folders: their annotated copies must not collide
        s3.upload_file(str(tmp_path / "ds" / "images" / "val" / key.rsplit("/", 1)[1]), bucket, key)
    env = {**storage_env(s3_server, bucket), "CHECKPOINT_URI": str(checkpoint), "INPUT_URI": "inputs/batch/",
           "PREDICT_OUTPUT_URI": "predictions/run-1/", "PREDICT_SHARDS": str(SHARDS), "IMGSZ": "64",
           "CONF_THRESHOLD": "0.0", "MAX_DET": "2", "DEVICE": "cpu", "WORKERS": "2", "WORK_DIR": str(tmp_path / "work"),
           "LOG_FORMAT": "json"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_", "R2_"))}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "predict.py")], cwd=tmp_path, text=True,
                              env={**base, **env, "JOB_COMPLETION_INDEX": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(SHARDS)]
    outputs = [p.communicate(timeout=300) for p in procs]
    seen = []
    for index, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.count("\n") == 1  # the document alone on stdout, in JSON log mode too
        doc = json.loads(stdout)
        logs = [json.loads(line) for line in stderr.splitlines()]  # every log line is a JSON object
        assert all({"time", "level", "logger", "job_id", "message"} <= set(e) for e in logs)
        assert f"shard {index} of {SHARDS}: {doc['count']} of the {len(keys)} images" in [e["message"] for e in logs]
        assert (doc["shard"], doc["shards"], doc["listed"], doc["failed"]) == (index, SHARDS, len(keys), 0)
        names = [p["image"].removeprefix(f"s3://{bucket}/") for p in doc["predictions"]]
        assert doc["count"] == len(names)
        assert all(shard_of(n.removeprefix("inputs/batch/"), SHARDS) == index for n in names)  # its own share
        seen += names
        stored = json.loads(s3.get_object(Bucket=bucket, Key=f"predictions/run-1/predictions-{index}.json")["Body"].read())
        assert stored == doc
        for p in doc["predictions"]:
            assert p["annotated_image"].startswith(f"s3://{bucket}/predictions/run-1/images/shard-{index}/")
            s3.head_object(Bucket=bucket, Key=p["annotated_image"].removeprefix(f"s3://{bucket}/"))
    assert sorted(seen) == sorted(keys)  # together: every image, each exactly once
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="predictions/run-1/")["Contents"]
    assert sum(o["Key"].startswith("predictions/run-1/images/") for o in listed) == len(keys)  # no name collided
    assert "predictions/run-1/predictions.json" not in {o["Key"] for o in listed}
