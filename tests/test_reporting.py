"""reporting.py's checkpoint uploader against the real S3 server, through a proxy that records requests."""

from __future__ import annotations

import signal
import uuid

import torch

from backend import Backend
from config import BackendSettings, load_settings
from reporting import CheckpointUploader
from storage import Storage
from tests.conftest import ACCESS_KEY, SECRET_KEY, spawn_server, storage_env, with_group
from utils import Redactor


def test_best_pt_written_from_the_same_bytes_as_last_pt_is_copied_in_storage_not_uploaded_twice(
        s3_server, s3, bucket, tmp_path):
    record = tmp_path / "requests.log"
    proxy, url = spawn_server("tests.s3_fault_proxy", "--upstream", s3_server, "--fail-rate", "0", "--record",
                              str(record), "--log-requests")
    try:
        job = f"c{uuid.uuid4().hex[:6]}"
        settings = load_settings({**storage_env(url, bucket), "JOB_ID": job, "DATASET_ID": "d",
                                  "WORK_DIR": str(tmp_path / "work")})
        stored = []
        uploader = CheckpointUploader(Storage(settings.storage), settings, Backend(BackendSettings(url=None),
                                      Redactor([ACCESS_KEY, SECRET_KEY])), on_stored=stored.append)
        weights = tmp_path / "weights"
        weights.mkdir()
        torch.save({"epoch": 0, "blob": torch.zeros(3_000_000)}, weights / "last.pt")  # about 12 MB: multipart
        (weights / "best.pt").write_bytes((weights / "last.pt").read_bytes())  # as Ultralytics writes them
        uploader.submit({"last.pt": weights / "last.pt", "best.pt": weights / "best.pt"}, 1, {"best.pt": "last.pt"})
        assert uploader.wait(60) and stored == [1]
    finally:
        with_group(proxy, signal.SIGTERM)
    prefix = f"/{bucket}/checkpoints/job-{job}/"
    puts = [line.split() for line in record.read_text().splitlines() if line.startswith("REQ PUT ")]
    sent = {name: sum(int(p[3]) for p in puts if p[2].split("?")[0] == prefix + name and len(p) == 4)
            for name in ("last.pt", "best.pt")}
    size = (weights / "last.pt").stat().st_size
    assert sent == {"last.pt": size, "best.pt": 0}  # one checkpoint's worth of bytes, not two
    assert any(p[2].split("?")[0] == prefix + "best.pt" and p[-1] == "copy" for p in puts)
    for name in ("last.pt", "best.pt"):
        body = s3.get_object(Bucket=bucket, Key=f"checkpoints/job-{job}/{name}")["Body"].read()
        assert body == (weights / "last.pt").read_bytes()


def test_a_newer_last_pt_never_lends_its_bytes_to_an_older_best_pt_waiting_to_be_copied(tmp_path):
    """Uploads slower than epochs: epoch 3 queued last.pt and best.pt (a copy of it); epoch 4 queues a new
    last.pt before the uploader took epoch 3's. best.pt must still hold epoch 3's bytes."""
    import threading

    settings = load_settings({"JOB_ID": "slow1", "DATASET_ID": "d", "STORAGE_TYPE": "local",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work")})
    storage = Storage(settings.storage)
    gate = threading.Event()
    slow_upload = storage.upload

    def upload(path, loc):  # the store is slow: nothing goes up until the gate opens
        gate.wait(30)
        return slow_upload(path, loc)

    storage.upload = upload
    uploader = CheckpointUploader(storage, settings, Backend(BackendSettings(url=None), Redactor([])))
    weights = tmp_path / "w"
    weights.mkdir()
    uploader.submit({"events.jsonl": _write(weights / "events.jsonl", b"x")}, 2)  # keeps the uploader busy
    epoch3 = _checkpoint(weights / "last.pt", 3)
    uploader.submit({"last.pt": epoch3, "best.pt": _checkpoint(weights / "best.pt", 3)}, 3, {"best.pt": "last.pt"})
    uploader.submit({"last.pt": _checkpoint(weights / "last.pt", 4)}, 4)
    gate.set()
    assert uploader.wait(30)
    stored = tmp_path / "store" / "vision-platform" / "checkpoints" / "job-slow1"
    assert torch.load(stored / "last.pt")["epoch"] == 4 and torch.load(stored / "best.pt")["epoch"] == 3


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _checkpoint(path, epoch: int):
    torch.save({"epoch": epoch}, path)
    return path
