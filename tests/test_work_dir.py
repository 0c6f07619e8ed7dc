"""The shared work folder: one download for concurrent jobs, a bounded cache, nothing job-local left.

End-to-end tests run train.py as the backend's subprocess mode does, several jobs in one WORK_DIR,
against the real S3 server (through tests/s3_slow_proxy.py to count and slow down the dataset's
download) and backend receiver. The cache cap is tested at unit level on real files, with another
process holding an entry as a running job does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import cache
from config import load_settings
from tests.conftest import (
    FAST_TRAINING,
    PYTHON,
    ROOT,
    SECRETS,
    run_entry,
    spawn_server,
    start_entry,
    storage_env,
    wait_until,
    with_group,
)
from tests.sample_data import make_dataset, make_zip

# What a job may leave in WORK_DIR: the shared caches and stores, nothing of its own.
SETTINGS_DIRS = {"ultralytics", "matplotlib"}


@pytest.fixture(scope="module")
def world(s3_server, s3, dataset_zip, tmp_path_factory):
    """A bucket with a good dataset, one with a bad label, and pretrained weights by name."""
    bucket = f"wd-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    folder = tmp_path_factory.mktemp("work-dir-data")
    bad = make_dataset(folder / "bad", "detect", n_train=4, n_val=2)
    label = sorted((bad / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "7 0.5 0.5 0.2 0.2\n")  # class 7 of 2
    s3.upload_file(str(make_zip(bad, folder / "bad.zip")), bucket, "datasets/bad.zip")
    from ultralytics import YOLO

    weights = folder / "yolo11n.pt"
    YOLO("yolo11n.yaml").save(str(weights))  # stands in for the released weights an operator uploads
    s3.upload_file(str(weights), bucket, "models/yolo11n.pt")
    return {"bucket": bucket, "s3": s3, "s3_server": s3_server}


def job_env(world: dict, work: Path, **extra) -> dict:
    return {**storage_env(world["s3_server"], world["bucket"]), **FAST_TRAINING, "EPOCHS": "1",
            "JOB_ID": f"w{uuid.uuid4().hex[:7]}", "DATASET_ID": "ds", "MODEL_NAME": "yolo11n.yaml",
            "TRAIN_ARGS": '{"plots": false}', "WORK_DIR": str(work),
            "MLFLOW_LOG_MODEL": "false", **extra}  # the logged model is test_models_out's and test_tracking's (CI time)


def left_in(work: Path) -> set[str]:
    """What is in WORK_DIR: top-level names, and inside the caches every name."""
    found = {p.name for p in work.iterdir()}
    for name in ("datasets", "weights"):
        if (work / name).is_dir():
            found |= {f"{name}/{p.relative_to(work / name).as_posix()}" for p in (work / name).iterdir()}
    return found


def dataset_entry(work: Path) -> str:
    (entry,) = [p.name for p in (work / "datasets").iterdir() if p.is_dir()]
    return entry


def shared_only(work: Path, mlflow: bool = True, weights: set[str] | None = None) -> set[str]:
    """The exact set a job may leave: the caches (one dataset, its lock files), settings, MLflow's store,
    and jobs/ with nothing in it."""
    assert list((work / "jobs").iterdir()) == []
    entry = f"datasets/{dataset_entry(work)}"
    # Ultralytics' and matplotlib's settings: made by the import that runs beside the dataset's download,
    # which a job failing first may not have reached
    settings = {d for d in SETTINGS_DIRS if (work / d).exists()}
    expected = {"datasets", "cache.lock", entry, entry + ".lock", entry + ".fill.lock", "jobs", *settings}
    if mlflow:  # the local MLflow store's database
        expected.add("mlflow.db")
    if (work / "mlartifacts").is_dir():  # a database tracking URI keeps run artifacts in WORK_DIR (shared)
        expected.add("mlartifacts")
    if (work / "torchinductor").is_dir():  # torch's compile cache, kept in WORK_DIR (shared, not job-local)
        expected.add("torchinductor")
    if weights is not None:
        expected |= {"weights", *(f"weights/{n}" for n in weights)}
    return expected


def stored(world: dict, job_id: str) -> set[str]:
    prefix = f"checkpoints/job-{job_id}/"
    listing = world["s3"].list_objects_v2(Bucket=world["bucket"], Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):] for o in listing}


# ------------------------------------------------------------------------------------------
# Two jobs at once on one dataset
# ------------------------------------------------------------------------------------------


def test_two_jobs_at_once_download_the_dataset_once_and_both_succeed(world, tmp_path):
    requests = tmp_path / "requests.log"
    proxy, url = spawn_server("tests.s3_slow_proxy", "--upstream", world["s3_server"], "--requests", str(requests),
                              "--slow", "/datasets/ds.zip", "--delay", "8")
    work = tmp_path / "work"
    procs = []
    try:
        procs += [start_entry("train.py", job_env(world, work, MINIO_ENDPOINT=url,
                                                 MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / f'ml-{i}.db'}"), tmp_path)
                 for i in range(2)]
        codes = [p.wait(400) for p in procs]
    finally:
        for p in procs:
            p.kill()
        with_group(proxy, signal.SIGTERM)
    logs = [p.log_path.read_text() for p in procs]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    gets = [line for line in requests.read_text().splitlines() if line.startswith("GET ") and "/datasets/ds.zip" in line]
    assert len(gets) == 1, gets  # one download; the first was held for 8 s, so both jobs asked meanwhile
    waited = [log for log in logs if "waiting for another job to finish ds.zip-" in log]
    assert len(waited) == 1 and "was made by another job meanwhile" in waited[0]
    assert sum("extracting ds.zip-" in log for log in logs) == 1
    assert left_in(work) == shared_only(work, mlflow=False)  # no half dataset, no temporary folder


# ------------------------------------------------------------------------------------------
# Nothing job-local is left, on every way out
# ------------------------------------------------------------------------------------------


def test_completed_job_leaves_only_the_shared_caches(world, tmp_path):
    work = tmp_path / "work"
    env = job_env(world, work, MODEL_NAME="yolo11n", WEIGHTS_DOWNLOAD="false")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"best.pt", "last.pt", "results.csv", "events.jsonl"} <= stored(world, env["JOB_ID"])  # safe first
    assert left_in(work) == shared_only(work, weights={"yolo11n.pt", "yolo11n.pt.etag", "yolo11n.pt.lock",
                                                       "yolo11n.pt.fill.lock"})
    assert f"removed {work / 'jobs' / ('job-' + env['JOB_ID'])}" in result.stderr


def test_keep_job_files_keeps_the_run_folder(world, tmp_path):
    work = tmp_path / "work"
    env = job_env(world, work, KEEP_JOB_FILES="true")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    job = work / "jobs" / f"job-{env['JOB_ID']}"
    assert (job / "train" / "weights" / "best.pt").is_file() and (job / "events.jsonl").is_file()
    shared = {"datasets", "cache.lock", "mlflow.db", "jobs", *SETTINGS_DIRS}
    assert {p.name for p in work.iterdir()} - {"mlartifacts", "torchinductor"} == shared  # MLflow's and torch's stores
    assert f"KEEP_JOB_FILES=true: keeping {job}" in result.stderr


@pytest.mark.parametrize("extra,error", [
    ({"DATASET_ID": "bad", "DATASET_CHECK": "strict"}, "class 7"),
    ({"MODEL_NAME": "yolo11s", "WEIGHTS_DOWNLOAD": "false"}, "pretrained weights yolo11s.pt not found"),
], ids=["bad-label", "missing-weights"])
def test_failed_job_leaves_only_the_shared_caches(world, tmp_path, extra, error):
    work = tmp_path / "work"
    env = job_env(world, work, **extra)
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error in result.stderr
    assert "events.jsonl" in stored(world, env["JOB_ID"])  # the event log went up before the clean-up
    weights = set() if "MODEL_NAME" in extra else None  # weights/ stays, empty: no lock files of absent weights
    assert left_in(work) == shared_only(work, mlflow=False, weights=weights)


def test_sigterm_after_the_first_epoch_leaves_only_the_shared_caches(world, receiver, tmp_path):
    work = tmp_path / "work"
    env = job_env(world, work, EPOCHS="20", INTERNAL_AUTH_TOKEN=SECRETS[2])
    env["CALLBACK_URL"] = receiver.url(env["JOB_ID"])
    proc = start_entry("train.py", env, tmp_path)
    try:
        wait_until(lambda: receiver.bodies("validation-results"), 180, "the first epoch")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        proc.kill()
    log = proc.log_path.read_text()
    assert code == 143, log[-3000:]
    assert receiver.bodies("status")[-1]["status"] == "cancelled"
    assert {"last.pt", "events.jsonl"} <= stored(world, env["JOB_ID"])  # resumable from storage alone
    assert left_in(work) == shared_only(work)


HOLD_JOB = """
import os, sys, time
import cache
from config import load_settings
settings = load_settings(os.environ, "train")
assert cache.claim_job_folder(settings, 0)
(cache.job_folder(settings) / "train").mkdir(parents=True)
(cache.job_folder(settings) / "train" / "results.csv").write_text("epoch\\n1\\n")
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_process_for_a_job_being_trained_leaves_it_alone(world, receiver, tmp_path):
    """The backend launching one JOB_ID twice in one WORK_DIR: the second process cleared the first's
    run folder (which then failed at its final save, exit 1) and reported `failed` while the first
    trained. Now it waits SHUTDOWN_TIMEOUT + 10 s for the first to end, then exits 75 (try again later)
    leaving the folder and the job's status alone, with a warning on the backend's log panel."""
    work = tmp_path / "work"
    env = job_env(world, work, SHUTDOWN_TIMEOUT="1", INTERNAL_AUTH_TOKEN=SECRETS[2])
    env["CALLBACK_URL"] = receiver.url(env["JOB_ID"])
    first = subprocess.Popen([PYTHON, "-c", HOLD_JOB], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = run_entry("train.py", env, cwd=tmp_path, timeout=120)
        waited = time.monotonic() - started
        assert result.returncode == 75, result.stderr[-3000:]
        assert waited >= 10  # it waited for the first to end
        assert (work / "jobs" / f"job-{env['JOB_ID']}" / "train" / "results.csv").read_text() == "epoch\n1\n"
        assert receiver.bodies("status") == [] and stored(world, env["JOB_ID"]) == set()
        (log,) = receiver.bodies("logs")
        assert log["level"] == "WARNING" and "is being trained by another process" in log["message"]
    finally:
        first.kill()
        first.wait(10)
    settings = load_settings({**env, "WORK_DIR": str(work)}, "train")
    assert cache.claim_job_folder(settings, wait=5)  # a killed holder's claim ends with it
    cache.remove_job_files(settings)
    assert list((work / "jobs").iterdir()) == []  # the folder and the claim's file are gone


# ------------------------------------------------------------------------------------------
# The cache cap (unit level, real files)
# ------------------------------------------------------------------------------------------


def settings_for(work: Path, cap: int, **extra):
    return load_settings({"JOB_ID": "7", "DATASET_ID": "x", "STORAGE_TYPE": "local", "WORK_DIR": str(work),
                          "CACHE_MAX_BYTES": str(cap), **extra})


def make_entry(path: Path, size: int, last_used: float) -> Path:
    """A dataset folder or a weights file of `size` bytes, last used `last_used` seconds ago."""
    if path.parent.name == "datasets":
        path.mkdir(parents=True)
        (path / "data.bin").write_bytes(b"x" * size)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    set_last_use(path, last_used)
    return path


def set_last_use(path: Path, ago: float) -> None:
    lock = path.with_name(path.name + ".lock")
    lock.touch()
    os.utime(lock, (time.time() - ago, time.time() - ago))


class Holder:
    """Another process holding an entry as a running job does (cache.hold), until stopped."""

    def __init__(self, entry: Path):
        code = "import sys; import cache; cache.hold(__import__('pathlib').Path(sys.argv[1])); print('held', flush=True); " \
               "sys.stdin.read()"
        self.proc = subprocess.Popen([PYTHON, "-c", code, str(entry)], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_cache_over_its_cap_evicts_the_least_recently_used_entry_not_one_in_use(tmp_path, caplog):
    work = tmp_path / "work"
    oldest = make_entry(work / "datasets" / "oldest-1", 3000, 400)
    older = make_entry(work / "datasets" / "older-2", 3000, 300)
    weights = make_entry(work / "weights" / "yolo11n.pt", 1000, 200)
    newest = make_entry(work / "datasets" / "newest-3", 3000, 100)
    holder = Holder(oldest)  # a running job uses the least recently used entry
    set_last_use(oldest, 400)
    try:
        with caplog.at_level("INFO", logger="trainer"):
            cache.make_room(settings_for(work, 10_000), 2500)  # 10,000 cached + 2,500 > 10,000
    finally:
        holder.stop()
    assert oldest.is_dir() and newest.is_dir() and weights.is_file()  # in use, and more recently used
    assert not older.exists() and not (work / "datasets" / "older-2.lock").exists()
    evictions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evicted")]
    assert len(evictions) == 1 and evictions[0].startswith("evicted datasets/older-2 (2.9 KB, last used "), evictions


def test_eviction_goes_on_in_order_of_last_use_until_the_new_entry_fits(tmp_path):
    work = tmp_path / "work"
    a = make_entry(work / "datasets" / "a", 4000, 500)
    w = make_entry(work / "weights" / "files" / "b" / "checkpoints" / "best.pt", 4000, 400)
    c = make_entry(work / "datasets" / "c", 4000, 300)
    made = []

    def fill():  # the new entry, made after room was made for it
        made.append(sorted(p.name for p in (work / "datasets").iterdir() if p.is_dir()))
        make_entry(work / "datasets" / "new", 5000, 0)

    assert cache.provide(settings_for(work, 10_000), work / "datasets" / "new", fill, 5000)
    assert made == [["c"]]  # a, then the fetched checkpoint went: 4,000 + 5,000 fits
    assert not a.exists() and not w.exists() and c.is_dir()
    assert (work / "datasets" / "new.lock").read_text() == "5000"  # size recorded for the next eviction
    cache.release_entries()


def test_entries_in_use_over_the_cap_stay_with_a_warning(tmp_path, caplog):
    work = tmp_path / "work"
    a = make_entry(work / "datasets" / "a", 4000, 500)
    holder = Holder(a)
    try:
        with caplog.at_level("INFO", logger="trainer"):
            cache.make_room(settings_for(work, 1000), 0)
    finally:
        holder.stop()
    assert a.is_dir()
    assert any("more than CACHE_MAX_BYTES=1000" in r.getMessage() for r in caplog.records)


def test_cap_zero_means_no_cap(tmp_path):
    work = tmp_path / "work"
    a = make_entry(work / "datasets" / "a", 4000, 500)
    cache.make_room(settings_for(work, 0), 10**9)
    assert a.is_dir()


# ------------------------------------------------------------------------------------------
# Clean-up stays inside WORK_DIR
# ------------------------------------------------------------------------------------------


def test_clean_up_never_follows_links_out_of_the_work_folder(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "image.jpg").write_bytes(b"jpg")
    work = tmp_path / "work"
    job = work / "jobs" / "job-7"
    (job / "classify" / "val" / "cat").mkdir(parents=True)
    (job / "classify" / "val" / "cat" / "image.jpg").symlink_to(outside / "keep" / "image.jpg")
    (job / "classify" / "train").symlink_to(outside / "keep")
    cache.remove_job_files(settings_for(work, 0))
    assert list((work / "jobs").iterdir()) == []
    assert (outside / "keep" / "image.jpg").read_bytes() == b"jpg"


def test_clean_up_does_not_pass_through_a_linked_jobs_folder(tmp_path):
    outside = tmp_path / "outside"
    (outside / "job-7").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "jobs").symlink_to(outside)  # WORK_DIR/jobs/job-7 resolves outside WORK_DIR: not entered
    cache.remove_job_files(settings_for(work, 0))
    assert (outside / "job-7").is_dir()


def test_keep_job_files_variable_is_validated():
    with pytest.raises(Exception, match="KEEP_JOB_FILES='maybe' must be true or false"):
        load_settings({"JOB_ID": "7", "DATASET_ID": "x", "STORAGE_TYPE": "local", "KEEP_JOB_FILES": "maybe"})
    with pytest.raises(Exception, match="CACHE_MAX_BYTES=-1 is out of range"):
        load_settings({"JOB_ID": "7", "DATASET_ID": "x", "STORAGE_TYPE": "local", "CACHE_MAX_BYTES": "-1"})
