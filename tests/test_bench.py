"""The benchmarks keep working as the code moves: they reach into the trainer's modules by name, so a
renamed or moved function must fail here, not on the day someone measures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

from tests.conftest import ACCESS_KEY, ROOT, SECRET_KEY, free_port
from tests.sample_data import make_dataset


def test_the_probe_wraps_functions_that_exist_where_their_callers_look_them_up():
    import bench.trainer_probe as probe  # its table of wrapped functions is resolved on import

    assert all(callable(getattr(owner, name)) for owner, name in probe.WRAPPED)


def test_the_fetch_benchmark_runs_end_to_end_on_a_tiny_dataset(tmp_path):
    """s5cmd, the trainer's own fetch and a boto3 loop against a local S3 server, one small round."""
    result = subprocess.run([sys.executable, "-m", "bench.fetch_bench", "--rounds", "1", "--archive-mb", "2",
                             "--files", "20", "--workdir", str(tmp_path), "--download-variants"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer / s5cmd" in result.stdout or "s5cmd" in result.stdout, result.stdout[-2000:]
    assert "the trainer's parts" in result.stdout


def test_the_fetch_benchmark_sends_every_client_through_the_delaying_proxy(tmp_path):
    """--latency-ms: s5cmd, the trainer and the boto3 loop all fetch through the proxy that holds each request."""
    result = subprocess.run([sys.executable, "-m", "bench.fetch_bench", "--rounds", "1", "--files", "10",
                             "--archive-mb", "1", "--shapes", "prefix", "--latency-ms", "20", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every request held 20 ms" in result.stdout, result.stdout[-2000:]
    gets = [line.split("\t") for line in (tmp_path / "proxy-requests.tsv").read_text().splitlines()]
    gets = [r for r in gets if r[2] == "GET" and "images-prefix/" in r[3] and "list-type" not in r[3]]
    assert len(gets) >= 3 * 11, len(gets)  # each of the 11 objects, by each of the three clients
    assert all(float(r[1]) - float(r[0]) >= 0.02 for r in gets)


def test_the_upload_reference_puts_each_epochs_last_pt_in_s3(tmp_path, s3_server, s3, bucket):
    """bench/plain_train.py with an upload target (overhead_bench --upload-reference): plain Ultralytics that
    also uploads last.pt every epoch. Its figure means something only if the checkpoints really go up, and
    a run whose uploads fail must fail, not pass for a cheap reference."""
    data = make_dataset(tmp_path / "data", "detect", n_train=4, n_val=2, size=32)
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text((data / "data.yaml").read_text().replace("path: .", f"path: {data}"))
    args = {"epochs": 2, "imgsz": 32, "batch": 4, "workers": 0, "device": "cpu", "plots": False, "val": False}
    target = {"endpoint": s3_server, "bucket": bucket, "prefix": "plain/run/", "access_key": ACCESS_KEY,
              "secret_key": SECRET_KEY}
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo"), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    result = subprocess.run([sys.executable, "-m", "bench.plain_train", str(data_yaml), "yolo11n.yaml",
                             str(tmp_path / "runs"), "run", json.dumps(args), json.dumps(target)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    import torch
    import ultralytics  # noqa: F401  (the checkpoint's model classes, to unpickle it)

    stored = s3.get_object(Bucket=bucket, Key="plain/run/last.pt")["Body"].read()
    assert zipfile.ZipFile(io.BytesIO(stored)).testzip() is None  # a whole torch checkpoint, not a cut-off one
    checkpoint = torch.load(io.BytesIO(stored), weights_only=False)
    local = torch.load(tmp_path / "runs" / "run" / "weights" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 1  # the last epoch's (counted from 0), put before Ultralytics' final strip:
    assert checkpoint["optimizer"] is not None and local["optimizer"] is None  # resumable, as train.py's are

    refused = {**target, "endpoint": f"http://127.0.0.1:{free_port()}"}  # nothing listens: every PUT fails
    args = {**args, "epochs": 1}
    result = subprocess.run([sys.executable, "-m", "bench.plain_train", str(data_yaml), "yolo11n.yaml",
                             str(tmp_path / "runs"), "refused", json.dumps(args), json.dumps(refused)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "EndpointConnectionError" in result.stderr  # never a silently cheap reference
