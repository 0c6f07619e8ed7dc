"""reporting.py's checkpoint uploader against the real S3 server, through a proxy that records requests."""

from __future__ import annotations

import signal
import uuid

import torch

from backend import Backend
from checkpoints import CheckpointUploader, checkpoint_problem
from config import BackendSettings, load_settings
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
        torch.save({"epoch": 0, "blob": torch.zeros(3_000_000)}, weights / "last.pt")  # about 12 MB
        (weights / "best.pt").write_bytes((weights / "last.pt").read_bytes())  # as Ultralytics writes them
        (weights / "results.csv").write_text("epoch,time\n1,1.5\n")
        uploader.submit({"last.pt": weights / "last.pt", "best.pt": weights / "best.pt",
                         "results.csv": weights / "results.csv"}, 1, {"best.pt": "last.pt"})
        assert uploader.wait(60) and stored == [1]
    finally:
        with_group(proxy, signal.SIGTERM)
    prefix = f"/{bucket}/checkpoints/job-{job}/"
    puts = [line.split() for line in record.read_text().splitlines() if line.startswith("REQ PUT ")]
    sent = {name: sum(int(p[3]) for p in puts if p[2].split("?")[0] == prefix + name and len(p) == 4)
            for name in ("last.pt", "best.pt")}
    size = (weights / "last.pt").stat().st_size
    assert sent == {"last.pt": size, "best.pt": 0}  # one checkpoint's worth of bytes, not two
    # in one request, though above the multipart threshold: the per-epoch upload is the least work for the store
    assert [p[2] for p in puts if p[2].startswith(prefix + "last.pt")] == [prefix + "last.pt"]
    assert any(p[2].split("?")[0] == prefix + "best.pt" and p[-1] == "copy" for p in puts)
    for name in ("last.pt", "best.pt"):
        body = s3.get_object(Bucket=bucket, Key=f"checkpoints/job-{job}/{name}")["Body"].read()
        assert body == (weights / "last.pt").read_bytes()
    assert s3.get_object(Bucket=bucket, Key=f"checkpoints/job-{job}/results.csv")["Body"].read() == b"epoch,time\n1,1.5\n"
    # verified by the stores' answers (an ETag that is the content's MD5, the copy's ETag that is the
    # source's): one request per file and epoch, no HEAD (there were five per epoch)
    assert [line for line in record.read_text().splitlines() if line.startswith("REQ HEAD ")] == []


def test_a_newer_last_pt_never_lends_its_bytes_to_an_older_best_pt_waiting_to_be_copied(tmp_path):
    """Uploads slower than epochs: epoch 3 queued last.pt and best.pt (a copy of it); epoch 4 queues a new
    last.pt before the uploader took epoch 3's. best.pt must still hold epoch 3's bytes."""
    import threading

    settings = load_settings({"JOB_ID": "slow1", "DATASET_ID": "d", "STORAGE_TYPE": "local",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work")})
    storage = Storage(settings.storage)
    gate = threading.Event()
    slow_upload = storage.upload

    def upload(path, loc, **kwargs):  # the store is slow: nothing goes up until the gate opens
        gate.wait(30)
        return slow_upload(path, loc, **kwargs)

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


def _gated_uploader(tmp_path, job: str, **kwargs):
    """A CheckpointUploader on local storage whose uploads wait for the returned gate: a slow store."""
    import threading

    settings = load_settings({"JOB_ID": job, "DATASET_ID": "d", "STORAGE_TYPE": "local",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work")})
    storage = Storage(settings.storage)
    gate = threading.Event()
    slow_upload = storage.upload

    def upload(path, loc, **kw):
        gate.wait(30)
        return slow_upload(path, loc, **kw)

    storage.upload = upload
    uploader = CheckpointUploader(storage, settings, Backend(BackendSettings(url=None), Redactor([])), **kwargs)
    return uploader, gate, tmp_path / "store" / "vision-platform" / "checkpoints" / f"job-{job}"


def test_a_checkpoint_is_copied_by_the_upload_thread_not_by_the_training_thread(tmp_path):
    """submit() runs on Ultralytics' training thread: it copies no checkpoint (500 MB for a large model);
    the upload thread makes the copy right before the upload."""
    stored_epochs = []
    uploader, gate, stored = _gated_uploader(tmp_path, "stage1", on_stored=stored_epochs.append)
    weights = tmp_path / "w"
    weights.mkdir()
    uploader.submit({"events.jsonl": _write(weights / "events.jsonl", b"x")}, 1)  # keeps the uploader busy
    uploader.submit({"last.pt": _checkpoint(weights / "last.pt", 2), "results.csv": _write(weights / "results.csv", b"r")}, 2)
    staged = sorted(p.name.split("-", 1)[1] for p in uploader.staging.iterdir())
    assert staged == ["events.jsonl", "results.csv"]  # small files are copied at once, the checkpoint is not
    gate.set()
    assert uploader.wait(30) and stored_epochs == [2]
    assert torch.load(stored / "last.pt")["epoch"] == 2 and not list(uploader.staging.iterdir())


def test_a_checkpoint_written_again_before_its_upload_is_skipped_for_the_newer_one(tmp_path):
    """Uploads slower than epochs, and epoch 4 rewrote last.pt before the uploader took epoch 3's: epoch 3's
    last.pt is gone, so nothing may go up as epoch 3 (its reports wait for epoch 4's); best.pt, queued as a
    copy of epoch 3's last.pt, goes up from its own file."""
    stored_epochs = []
    uploader, gate, stored = _gated_uploader(tmp_path, "stage2", on_stored=stored_epochs.append)
    weights = tmp_path / "w"
    weights.mkdir()
    uploader.submit({"events.jsonl": _write(weights / "events.jsonl", b"x")}, 2)  # keeps the uploader busy
    uploader.submit({"last.pt": _checkpoint(weights / "last.pt", 3), "best.pt": _checkpoint(weights / "best.pt", 3)},
                    3, {"best.pt": "last.pt"})
    torch.save({"epoch": 4, "blob": torch.zeros(1000)}, weights / "last.pt")  # in place, not submitted yet
    gate.set()
    assert uploader.wait(30)
    assert stored_epochs == [] and not (stored / "last.pt").exists()
    assert torch.load(stored / "best.pt")["epoch"] == 3
    uploader.submit({"last.pt": weights / "last.pt"}, 4)
    assert uploader.wait(30) and stored_epochs == [4] and torch.load(stored / "last.pt")["epoch"] == 4


def test_a_checkpoint_waiting_behind_slow_uploads_is_copied_before_the_next_save(tmp_path):
    """CHECKPOINT_INTERVAL=5 and a slow store: epoch 5's last.pt still waits when epoch 6 ends its training.
    The reporter's on_train_epoch_end copies it then (secure), so epoch 6's save, which rewrites last.pt
    and submits nothing, cannot take it: epoch 5 goes up as it was and is reported stored."""
    stored_epochs = []
    uploader, gate, stored = _gated_uploader(tmp_path, "stage3", on_stored=stored_epochs.append)
    weights = tmp_path / "w"
    weights.mkdir()
    uploader.submit({"events.jsonl": _write(weights / "events.jsonl", b"x")}, 4)  # keeps the uploader busy
    uploader.submit({"last.pt": _checkpoint(weights / "last.pt", 5)}, 5)
    uploader.secure()  # epoch 6's on_train_epoch_end
    torch.save({"epoch": 6, "blob": torch.zeros(1000)}, weights / "last.pt")  # epoch 6's save, not submitted
    gate.set()
    assert uploader.wait(30) and stored_epochs == [5] and torch.load(stored / "last.pt")["epoch"] == 5
    assert not list(uploader.staging.iterdir())


def test_the_checkpoints_of_a_batch_are_copied_when_the_upload_thread_takes_it(tmp_path):
    """A batch of best.pt and last.pt (not copies of each other) behind a slow upload: both are copied when
    the upload thread takes the batch, so last.pt rewritten while best.pt goes up still goes up as it was."""
    import time

    stored_epochs = []
    uploader, gate, stored = _gated_uploader(tmp_path, "stage4", on_stored=stored_epochs.append)
    weights = tmp_path / "w"
    weights.mkdir()
    uploader.submit({"best.pt": _checkpoint(weights / "best.pt", 7), "last.pt": _checkpoint(weights / "last.pt", 7)}, 7)
    deadline = time.monotonic() + 30
    while len(list(uploader.staging.iterdir())) < 2 and time.monotonic() < deadline:  # taken and copied
        time.sleep(0.01)
    torch.save({"epoch": 8, "blob": torch.zeros(1000)}, weights / "last.pt")  # while best.pt waits at the gate
    gate.set()
    assert uploader.wait(30) and stored_epochs == [7]
    assert torch.load(stored / "last.pt")["epoch"] == 7 and torch.load(stored / "best.pt")["epoch"] == 7


def test_where_time_stamps_are_whole_seconds_each_copy_is_checked_by_its_crcs(tmp_path):
    """On a file system that keeps whole seconds, last.pt written again within a second of its submit keeps
    its signature, and a copy taken meanwhile can begin with the old checkpoint and end with the new one's
    zip directory: the directory check passes it. There every copy is read through against its CRCs, and
    a torn one is not uploaded (nor reported stored); the next whole one goes up."""
    import os

    stored_epochs = []
    uploader, gate, stored = _gated_uploader(tmp_path, "coarse", on_stored=stored_epochs.append)
    gate.set()
    weights = tmp_path / "w"
    weights.mkdir()
    old, new = (_checkpoint(weights / f"{n}.pt", n, torch.arange(50_000, dtype=torch.float32) + n).read_bytes()
                for n in (1, 2))
    assert len(old) == len(new)
    torn = _write(weights / "last.pt", old[: len(old) // 2] + new[len(old) // 2:])
    assert checkpoint_problem(torn, whole=False) is None  # the directory alone cannot tell
    whole_second = 1_700_000_000 * 10**9
    os.utime(torn, ns=(whole_second, whole_second))
    uploader.submit({"last.pt": torn}, 1)
    assert uploader.wait(30) and stored_epochs == [] and not (stored / "last.pt").exists()
    (weights / "last.pt").write_bytes(new)
    os.utime(weights / "last.pt", ns=(whole_second, whole_second))
    uploader.submit({"last.pt": weights / "last.pt"}, 2)
    assert uploader.wait(30) and stored_epochs == [2] and torch.load(stored / "last.pt")["epoch"] == 2


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_checkpoint_is_checked_by_its_directory_each_epoch_and_by_its_crcs_at_the_end(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"epoch": 1, "blob": torch.arange(100_000, dtype=torch.float32)}, good)
    data = good.read_bytes()
    assert checkpoint_problem(good) is None and checkpoint_problem(good, whole=False) is None
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])  # a writer stopped half-way: no zip directory at the end
    assert "not a complete checkpoint" in checkpoint_problem(cut, whole=False)
    assert "not a complete checkpoint" in checkpoint_problem(cut)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # a damaged byte inside the tensor data: only the CRCs see it
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    assert checkpoint_problem(tmp_path / "flipped.pt", whole=False) is None
    assert "fails its CRC" in checkpoint_problem(tmp_path / "flipped.pt")


def _checkpoint(path, epoch: int, blob=None):
    torch.save({"epoch": epoch} if blob is None else {"epoch": epoch, "blob": blob}, path)
    return path


def outbox_at(tmp_path, job: str = "o1"):
    from outbox import Outbox

    settings = load_settings({"JOB_ID": job, "DATASET_ID": "d", "STORAGE_TYPE": "local",
                              "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work")})
    storage = Storage(settings.storage)
    outbox = Outbox(storage, settings.checkpoint_prefix)
    return outbox, storage, storage._path(outbox.loc)


def report(epoch: int) -> tuple[dict, list, dict]:
    return ({"epoch": epoch, "event_id": f"r{epoch}"}, [{"image_name": f"{epoch}.jpg"}],
            {"epoch": epoch, "event_id": f"m{epoch}"})


def test_the_outbox_stores_what_is_owed_and_a_new_attempt_takes_only_the_epochs_its_checkpoint_holds(tmp_path):
    import json
    import time

    outbox, storage, path = outbox_at(tmp_path)
    for epoch in (1, 2, 3):
        outbox.add(epoch, *report(epoch))
    outbox.write()  # as before epoch 3's last.pt goes up
    assert [e["epoch"] for e in json.loads(path.read_text())] == [1, 2, 3]
    outbox.done(1, "validation-results")
    outbox.done(1, "training-metrics")  # epoch 1 fully taken: rewritten without it, in the background
    outbox.done(2, "training-metrics")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(json.loads(path.read_text())) != 2:
        time.sleep(0.05)
    stored = json.loads(path.read_text())
    assert [(e["epoch"], bool(e["validation-results"]), bool(e["training-metrics"])) for e in stored] == [
        (2, True, False), (3, True, True)]

    again, _, _ = outbox_at(tmp_path)  # the job started again from a last.pt of 2 epochs
    owed = again.owed(2)
    assert [e["epoch"] for e in owed] == [2] and owed[0]["validation-results"]["event_id"] == "r2"
    assert owed[0]["images"] == [{"image_name": "2.jpg"}]
    again.done(2, "validation-results")
    again.close()
    assert json.loads(path.read_text()) == []  # epoch 3 is trained again, under new ids


def test_a_process_that_never_held_a_report_leaves_the_outbox_alone(tmp_path):
    """After multi-GPU training the DDP worker reported and owns the file; train.py's own process,
    which held no report, must not overwrite what the worker left owed."""
    import json

    worker, _, path = outbox_at(tmp_path, "o4")
    worker.add(1, *report(1))
    worker.close()
    main, _, _ = outbox_at(tmp_path, "o4")
    main.write()
    main.close()
    assert [e["epoch"] for e in json.loads(path.read_text())] == [1]


def test_a_missing_or_damaged_outbox_owes_nothing_and_the_job_goes_on(tmp_path, caplog):
    outbox, _, path = outbox_at(tmp_path, "o2")
    assert outbox.owed(5) == []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[{"epoch": 1, "validation-results"')  # cut short
    assert outbox.owed(5) == []
    assert "cannot read" in caplog.text
    path.write_text('{"epoch": 1}')
    assert outbox.owed(5) == []


def test_without_a_callback_url_no_outbox_is_written(tmp_path):
    from outbox import Outbox

    _, storage, path = outbox_at(tmp_path, "o3")
    off = Outbox(storage, "checkpoints/job-o3/", enabled=False)
    off.add(1, *report(1))
    off.write()
    off.close()
    assert not path.exists() and off.owed(1) == []


def test_large_transfers_use_about_one_part_per_thread():
    mb = 1024 * 1024
    parts = {size: Storage._parts(size * mb).multipart_chunksize // mb for size in (9, 25, 80, 300, 2000)}
    assert parts == {9: 8, 25: 8, 80: 8, 300: 30, 2000: 64}  # boto3's 8 MB floor, 64 MB cap
    one = Storage._parts(100 * mb, in_one=True)  # a yolo11m-sized per-epoch checkpoint: one PutObject
    assert one.multipart_threshold > 100 * mb and one.max_request_concurrency == 1
    large = Storage._parts(450 * mb, in_one=True)  # yolo11x's: parts side by side (the finish waits for it)
    assert large.multipart_threshold < 450 * mb and large.max_request_concurrency == Storage.THREADS


def test_the_objects_alive_after_the_first_epoch_are_frozen_once_and_garbage_is_never_frozen():
    import gc
    import weakref

    import train

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection: only what the function does frees the garbage below
    try:
        before = Node()
        before.me = before  # a cycle already garbage when the first epoch ends (a replaced data pipeline)
        was = weakref.ref(before)
        del before
        train.freeze_long_lived_objects(None)  # Ultralytics' on_train_epoch_end, first epoch
        assert was() is None, "garbage was frozen with the live objects: it would never be freed"
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        after = Node()
        after.me = after  # alive during a later epoch, garbage after it
        later = weakref.ref(after)
        train.freeze_long_lived_objects(None)  # every later epoch: nothing more is frozen (frozen
        assert gc.get_freeze_count() <= frozen  # objects other threads release leave the count)
        del after
        gc.collect()
        assert later() is None, "a later epoch froze objects again: their garbage would never be freed"
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
