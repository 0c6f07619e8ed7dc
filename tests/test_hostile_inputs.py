"""Hostile and broken inputs, table-driven: `python train.py` against real S3 and backend servers.

Every case asserts the contract's exit code (bad input 2, transient 75), an error naming the
problem, a `failed` status carrying that message, that nothing was written outside the work
folder (HOME, TMPDIR and the working directory are sandbox folders checked afterwards), and that
no secret value appears in stdout, stderr, callback bodies or the job's objects in storage.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import FAST_TRAINING, SECRETS, free_port, run_entry, storage_env
from tests.sample_data import make_dataset, make_zip

# ------------------------------------------------------------------------------------------
# Archive builders: each takes a scratch folder and returns the archive to upload
# ------------------------------------------------------------------------------------------


def good(folder: Path, mutate: Callable[[Path], None] | None = None, name: str = "ds.zip") -> Path:
    """The sample detection dataset, optionally damaged by mutate(dataset_root), zipped."""
    root = make_dataset(folder / "src", "detect", n_train=4, n_val=2)
    if mutate:
        mutate(root)
    return make_zip(root, folder / name)


def zip_entries(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "ds.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in entries.items():
                zf.writestr(name, data)
            for name, target in (symlinks or {}).items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777 << 16)  # a symbolic link
                zf.writestr(info, target)
        return path
    return build


def tar_entries(members: list[tuple[str, str, object]], mode: str = "w", name: str = "ds.tar") -> Callable[[Path], Path]:
    """members: (name, kind, payload) with kind file/dir/symlink/hardlink/chardev."""
    def build(folder: Path) -> Path:
        path = folder / name
        with tarfile.open(path, mode) as tf:
            for member, kind, payload in members:
                info = tarfile.TarInfo(member)
                if kind == "file":
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                    continue
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
                             "dir": tarfile.DIRTYPE}[kind]
                info.linkname = payload or ""
                tf.addfile(info)
        return path
    return build


def zip_flagged(method: int | None = None, flags: int | None = None) -> Callable[[Path], Path]:
    """A one-entry zip whose headers (local and central) say another compression method or flags:
    what Windows Explorer writes for Deflate64 (method 9), or an encrypted entry (flag bit 0)."""
    def build(folder: Path) -> Path:
        import struct

        path = folder / "ds.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("images/train/x.jpg", b"not really compressed" * 10)
        data = bytearray(path.read_bytes())
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # method follows flags
            at = data.index(signature)
            if flags is not None:
                struct.pack_into("<H", data, at + flags_at, flags)
            if method is not None:
                struct.pack_into("<H", data, at + flags_at + 2, method)
        path.write_bytes(bytes(data))
        return path
    return build


def zip_bomb(folder: Path) -> Path:
    path = folder / "ds.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w", force_zip64=True) as f:
        chunk = bytes(1 << 20)
        for _ in range(200):  # 200 MB of zeros, about 200 KB compressed
            f.write(chunk)
    return path


def many_files(folder: Path) -> Path:
    return zip_entries({f"f{i:04d}.txt": b"x" for i in range(300)})(folder)


def truncated(folder: Path) -> Path:
    path = good(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def raw(data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / "ds.zip").write_bytes(data)
        return folder / "ds.zip"
    return build


def write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text.encode() if isinstance(text, str) else text)
    return mutate


def remove(rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        target = root / rel
        for f in sorted(target.rglob("*"), reverse=True) if target.is_dir() else [target]:
            f.unlink() if f.is_file() else f.rmdir()
        if target.is_dir():
            target.rmdir()
    return mutate


def tiny_image(root: Path) -> None:
    import cv2
    import numpy as np

    cv2.imwrite(str(root / "images" / "train" / "train_0000.jpg"), np.zeros((5, 5, 3), np.uint8))


def classification_with_empty_val(folder: Path) -> Path:
    import cv2
    import numpy as np

    jpg = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()
    return zip_entries({"train/cat/a.jpg": jpg, "train/dog/b.jpg": jpg, "val/": b""})(folder)


YAML = "path: .\ntrain: images/train\nval: images/val\nnames: [rectangle, ellipse]\n"
LABEL = "labels/train/train_0000.txt"

# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    message: str  # a regular expression the error must match
    archive: Callable[[Path], Path] | None = None  # uploaded as datasets/<DATASET_ID>.zip
    env: dict = dataclasses.field(default_factory=dict)
    code: int = 2
    status: bool = True  # a failed status is posted (False: the job cannot reach the backend)
    escape: str | None = None  # a file name that must not appear outside the work folder


CASES = [
    # archives
    Case("zip-dot-dot", r"archive entry '\.\./\.\./outside/evil\.txt' points outside",
         zip_entries({"../../outside/evil.txt": b"pwned", "data.yaml": YAML.encode()}), escape="evil.txt"),
    Case("zip-absolute-path", r"archive entry '/tmp/evil\.txt' has an absolute path",
         zip_entries({"/tmp/evil.txt": b"pwned"}), escape="evil.txt"),
    Case("zip-drive-letter", r"archive entry 'C:/evil\.txt' has an absolute path", zip_entries({"C:/evil.txt": b"x"})),
    Case("zip-backslash-dot-dot", r"archive entry '\.\./\.\./evil\.txt' points outside",
         zip_entries({"..\\..\\evil.txt": b"pwned"}), escape="evil.txt"),
    Case("zip-symlink-data-yaml", r"has no data\.yaml",
         zip_entries({"readme.txt": b"x"}, symlinks={"data.yaml": "/etc/passwd"})),
    Case("tar-symlink-then-write-through-it", r"has no data\.yaml",
         tar_entries([("imgs", "symlink", "../../outside"), ("imgs/evil.txt", "file", b"pwned")]), escape="evil.txt"),
    Case("tar-hardlink-outside", r"has no data\.yaml", tar_entries([("data.yaml", "hardlink", "/etc/passwd")])),
    Case("tar-device-file", r"has no data\.yaml", tar_entries([("dev/null0", "chardev", None)])),
    Case("tar-absolute-member", r"archive entry '/evil\.txt' has an absolute path",
         tar_entries([("/evil.txt", "file", b"pwned")]), escape="evil.txt"),
    Case("tgz-dot-dot", r"archive entry '\.\./\.\./outside/evil\.txt' points outside",
         tar_entries([("../../outside/evil.txt", "file", b"pwned")], mode="w:gz", name="ds.tar.gz"), escape="evil.txt"),
    Case("zip-bomb", r"expands to 200\.0 MB, more than DATASET_MAX_BYTES=10000000", zip_bomb,
         env={"DATASET_MAX_BYTES": "10000000"}),
    Case("too-many-files", r"holds 300 entries \(files and folders\), more than DATASET_MAX_FILES=100", many_files,
         env={"DATASET_MAX_FILES": "100"}),
    Case("tar-of-3000-folders-over-the-file-cap", r"holds more than DATASET_MAX_FILES=10 entries \(files and folders\)",
         tar_entries([(f"d{i:04d}", "dir", None) for i in range(3000)]), env={"DATASET_MAX_FILES": "10"}),
    Case("tar-file-then-folder-of-the-same-name", r"ds\.zip-\w+\.zip: entry 'a' is a file, but other entries use it as a folder",
         tar_entries([("a", "file", b"x"), ("a/b", "file", b"y")])),
    Case("zip-deflate64", r"ds\.zip-\w+\.zip: entry 'images/train/x\.jpg' is compressed with Deflate64, which cannot be read",
         zip_flagged(method=9)),
    Case("zip-encrypted-entry", r"ds\.zip-\w+\.zip: entry 'images/train/x\.jpg' is encrypted", zip_flagged(flags=0x1)),
    Case("name-over-255-bytes", r"ds\.zip-\w+\.zip: entry 'images/x+'\.\.\. \(311 characters\) has a name part of 304 bytes",
         zip_entries({"images/" + "x" * 300 + ".jpg": b"x"})),
    Case("truncated-zip", r"corrupt or truncated|not a zip or tar archive", truncated),
    Case("corrupt-tar-gz", r"corrupt or truncated|not a zip or tar archive", raw(b"\x1f\x8b\x08\x00" + b"garbage" * 100)),
    Case("not-an-archive", r"is not a zip or tar archive", raw(b"hello, not an archive")),
    Case("archive-over-the-cap-before-download", r"is \d+ bytes, more than DATASET_MAX_BYTES=1000", good,
         env={"DATASET_MAX_BYTES": "1000"}),
    Case("dataset-not-in-storage", r"dataset s3://[^ ]+/datasets/absent\.zip does not exist", env={"DATASET_ID": "absent"}),
    Case("dataset-uri-not-an-archive", r"must be a \.zip, \.tar, \.tar\.gz or \.tgz archive",
         env={"DATASET_URI": "datasets/x.rar"}),
    # dataset defects
    Case("no-data-yaml", r"has no data\.yaml", lambda f: good(f, remove("data.yaml"))),
    Case("data-yaml-not-yaml", r"data\.yaml is not valid YAML", lambda f: good(f, write("data.yaml", "train: [oops\n"))),
    Case("names-and-nc-disagree", r"nc is 3 but names lists 2 classes",
         lambda f: good(f, write("data.yaml", YAML + "nc: 3\n"))),
    Case("val-folder-missing", r"val: images/nope does not exist",
         lambda f: good(f, write("data.yaml", YAML.replace("images/val", "images/nope")))),
    Case("train-folder-empty", r"data\.yaml train: no images found",
         lambda f: good(f, lambda r: (remove("images/train")(r), write("images/train/README.txt", "no images")(r)))),
    Case("class-id-out-of-range", r"labels/train/train_0000\.txt line 1: class 5 is out of range",
         lambda f: good(f, write(LABEL, "5 0.5 0.5 0.1 0.1\n"))),
    Case("coordinates-out-of-range", r"train_0000\.txt line 2: coordinate 1\.5 is outside \[0, 1\]",
         lambda f: good(f, write(LABEL, "0 0.5 0.5 0.1 0.1\n0 1.5 0.5 0.1 0.1\n"))),
    Case("label-with-3-values", r"train_0000\.txt line 1: has 3 values", lambda f: good(f, write(LABEL, "0 0.5 0.5\n"))),
    Case("label-not-a-number", r"train_0000\.txt line 1: has a value that is not a number",
         lambda f: good(f, write(LABEL, "zero 0.5 0.5 0.1 0.1\n"))),
    Case("corrupt-image", r"images/train/train_0001\.jpg: cannot be read as an image",
         lambda f: good(f, write("images/train/train_0001.jpg", b"\xff\xd8\xff garbage"))),
    Case("tiny-image", r"train_0000\.jpg: is smaller than 10x10 pixels", lambda f: good(f, tiny_image)),
    Case("classification-images-straight-in-train", r"train/ folder has no class folders holding images",
         zip_entries({"images/train/a.jpg": b"x", "images/train/b.jpg": b"y"})),
    Case("classification-class-folders-without-images", r"train/ folder has no class folders holding images",
         zip_entries({"train/cat/readme.txt": b"x", "train/dog/": b""})),
    Case("train-split-without-labels", r"data\.yaml train: none of its 4 images has a label",
         lambda f: good(f, remove("labels/train"))),
    Case("names-empty", r"names lists no classes", lambda f: good(f, write("data.yaml", YAML.replace("[rectangle, ellipse]", "[]")))),
    # refused by Ultralytics itself while it sets up training (after the imports): still bad input
    Case("final-batch-of-one-image", r"final batch=1 training at imgsz=32 gives BatchNorm a single value per channel",
         good, env={"BATCH_SIZE": "3", "IMGSZ": "32"}),
    Case("classification-val-folder-empty", r"val/: has no class folders holding images", classification_with_empty_val,
         env={"MODEL_NAME": "yolo11n-cls.yaml"}),
    Case("data-yaml-path-escapes", r"train: \.\./\.\./\.\./\.\./etc points outside the dataset",
         lambda f: good(f, write("data.yaml", YAML.replace("images/train", "../../../../etc")))),
    # variables
    Case("job-id-traversal", r"JOB_ID='\.\./x' must be", env={"JOB_ID": "../x"}),
    Case("dataset-id-traversal", r"DATASET_ID='a/\.\./\.\./b' must be", env={"DATASET_ID": "a/../../b"}),
    Case("model-name-traversal", r"MODEL_NAME='\.\./\.\./etc/passwd\.pt' must not contain '\.\.'",
         env={"MODEL_NAME": "../../etc/passwd.pt"}),
    Case("epochs-negative", r"EPOCHS=-3 is out of range", env={"EPOCHS": "-3"}),
    Case("batch-not-a-number", r"BATCH_SIZE='lots' is not a number", env={"BATCH_SIZE": "lots"}),
    Case("learning-rate-too-big", r"LEARNING_RATE=5 is out of range", env={"LEARNING_RATE": "5"}),
    Case("train-args-unknown-key", r"'patiense' is not an Ultralytics training argument \(did you mean 'patience'\?\)",
         env={"TRAIN_ARGS": '{"patiense": 5}'}),
    # values are checked by Ultralytics once imported, beside the dataset's download: a valid dataset
    Case("train-args-wrong-type", r"TRAIN_ARGS: 'patience=soon' is of invalid type str", good,
         env={"TRAIN_ARGS": '{"patience": "soon"}'}),
    Case("train-args-out-of-range", r"TRAIN_ARGS: 'mosaic=3\.0' is an invalid value", good,
         env={"TRAIN_ARGS": '{"mosaic": 3.0}'}),
    Case("train-args-sets-the-save-folder", r"TRAIN_ARGS may not set 'project'.*\n.*TRAIN_ARGS may not set 'save_dir'",
         env={"TRAIN_ARGS": '{"project": "/etc", "save_dir": "/"}'}),
    Case("train-args-not-json", r"TRAIN_ARGS is not valid JSON", env={"TRAIN_ARGS": "{patience: 3"}),
    Case("bad-bucket-in-uri", r"DATASET_URI='s3://Bad_Bucket/x\.zip' must be s3://bucket/key",
         env={"DATASET_URI": "s3://Bad_Bucket/x.zip"}),
    Case("ca-bundle-missing", r"TLS_CA_BUNDLE='/nonexistent/ca\.pem' is not a file", env={"TLS_CA_BUNDLE": "/nonexistent/ca.pem"}),
    # infrastructure
    Case("bucket-does-not-exist", r"bucket no-such-bucket-[0-9a-f]+ does not exist",
         env={"STORAGE_BUCKET": "<missing>"}),
    Case("storage-unreachable", r"storage unreachable while trying to look up", code=75,
         env={"MINIO_ENDPOINT": "<dead>", "STORAGE_MAX_ATTEMPTS": "2", "STORAGE_TIMEOUT": "2"}),
    Case("wrong-storage-credentials", r"storage refused to look up s3://\S+: 403",
         env={"MINIO_ENDPOINT": "<auth>"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_fails_cleanly(case: Case, s3_server, s3_auth_server, s3, bucket, receiver, tmp_path):
    sandbox = {name: tmp_path / name for name in ("cwd", "home", "tmp", "outside", "work", "scratch")}
    for folder in sandbox.values():
        folder.mkdir()
    job_id = f"h{uuid.uuid4().hex[:7]}"
    dataset_id = case.env.get("DATASET_ID", "ds")
    if case.archive and re.fullmatch(r"[A-Za-z0-9._-]+", dataset_id):
        s3.upload_file(str(case.archive(sandbox["scratch"])), bucket, f"datasets/{dataset_id}.zip")
    env = {**storage_env(s3_server, bucket), **FAST_TRAINING, "JOB_ID": job_id, "DATASET_ID": "ds",
           "MODEL_NAME": "yolo11n.yaml", "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": SECRETS[2],
           "WORK_DIR": str(sandbox["work"]), "HOME": str(sandbox["home"]), "TMPDIR": str(sandbox["tmp"]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{sandbox['work'] / 'mlflow.db'}", **case.env}
    substitutes = {"<missing>": f"no-such-bucket-{uuid.uuid4().hex[:8]}", "<dead>": f"http://127.0.0.1:{free_port()}",
                   "<auth>": s3_auth_server}
    env = {k: substitutes.get(v, v) for k, v in env.items()}

    result = run_entry("train.py", env, cwd=sandbox["cwd"], timeout=180)

    assert result.returncode == case.code, result.stderr[-3000:]
    assert re.search(case.message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr  # a readable error, not a stack trace
    if case.status:
        final = receiver.bodies("status")[-1]
        assert final["status"] == "failed" and final["exit_code"] == case.code
        assert re.search(case.message, final["error"]), final["error"]
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and sandbox["work"] not in p.parents
               and sandbox["scratch"] not in p.parents and not p.name.startswith("requests-")]
    assert outside == [], f"written outside the work folder: {outside}"
    if case.escape:
        assert not [p for p in Path(tmp_path).rglob(case.escape) if sandbox["work"] not in p.parents
                    and sandbox["scratch"] not in p.parents]
        assert not (Path("/tmp") / case.escape).exists() and not (Path("/") / case.escape).exists()
    texts = [result.stdout, result.stderr, *[str(b) for b in (e["body"] for e in receiver.requests(stored_only=False))]]
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=f"checkpoints/job-{job_id}/").get("Contents", []):
        texts.append(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("utf-8", "replace"))
    for secret in SECRETS:
        assert not any(secret in text for text in texts), f"secret leaked in {case.id}"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def one_epoch_job(s3_server, s3, bucket, receiver, dataset_zip, tmp_path, **extra) -> dict:
    """The environment of a short, valid training job (for cases where the job must succeed)."""
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    job_id = f"h{uuid.uuid4().hex[:7]}"
    return {**storage_env(s3_server, bucket), **FAST_TRAINING, "EPOCHS": "1", "JOB_ID": job_id, "DATASET_ID": "ds",
            "MODEL_NAME": "yolo11n.yaml", "TRAIN_ARGS": '{"plots": false}', "CALLBACK_URL": receiver.url(job_id),
            "INTERNAL_AUTH_TOKEN": SECRETS[2], "WORK_DIR": str(tmp_path / "work"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def test_backend_rejecting_the_token_does_not_decide_the_job(s3_server, s3, bucket, receiver_factory, dataset_zip, tmp_path):
    """The contract: callbacks never decide whether training succeeds. A 403 is logged loudly, once per route."""
    receiver = receiver_factory(token="the-backend-expects-another-token")
    env = one_epoch_job(s3_server, s3, bucket, receiver, dataset_zip, tmp_path)
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {e["outcome"] for e in receiver.requests(stored_only=False)} == {403}
    assert result.stderr.count("backend rejected PATCH status with 403 (check INTERNAL_AUTH_TOKEN)") == 1
    assert SECRETS[2] not in result.stderr + result.stdout


def test_dead_mlflow_server_does_not_fail_training(s3_server, s3, bucket, receiver, dataset_zip, tmp_path):
    env = one_epoch_job(s3_server, s3, bucket, receiver, dataset_zip, tmp_path,
                        MLFLOW_TRACKING_URI=f"http://user:mlflow-pa55word@127.0.0.1:{free_port()}")
    result = run_entry("train.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking is off for the rest of this job" in result.stderr
    final = receiver.bodies("status")[-1]
    assert final["status"] == "completed" and final.get("mlflow_run_id") is None
    assert "mlflow-pa55word" not in result.stderr + result.stdout  # URL credentials are masked too


def test_without_a_tracking_uri_mlflow_writes_only_under_the_work_folder(s3_server, s3, bucket, receiver, dataset_zip,
                                                                         tmp_path):
    """The default local store: its artifacts go to WORK_DIR/mlartifacts, not to ./mlruns in a working
    directory that is read-only in the image (as root, chmod does not stop writes: the check is that
    nothing appears there)."""
    from mlflow import MlflowClient

    cwd = tmp_path / "app"
    cwd.mkdir()
    env = one_epoch_job(s3_server, s3, bucket, receiver, dataset_zip, tmp_path)
    del env["MLFLOW_TRACKING_URI"]
    cwd.chmod(0o555)
    try:
        result = run_entry("train.py", env, cwd=cwd, timeout=300)
    finally:
        cwd.chmod(0o755)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking is off" not in result.stderr
    assert list(cwd.iterdir()) == []
    work = tmp_path / "work"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("project-default").experiment_id])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith((work / "mlartifacts").as_uri())
    assert {"weights/best.pt", "weights/last.pt", "results.csv"} <= {
        p.relative_to(work / "mlartifacts").as_posix().split("/", 2)[2] for p in (work / "mlartifacts").rglob("*")
        if p.is_file()}


def test_run_is_ended_after_a_tracking_failure_switched_tracking_off(tmp_path):
    from mlflow import MlflowClient

    from config import load_settings
    from tracking import Tracker
    from utils import Redactor

    settings = load_settings({"JOB_ID": "t1", "DATASET_ID": "d", "STORAGE_TYPE": "local", "WORK_DIR": str(tmp_path)})
    tracker = Tracker(settings, Redactor([]))
    tracker.start()
    tracker.log_metrics({"mAP50": 0.5}, step=1)
    tracker.log_metrics({"a/../b": 1.0}, step=2)  # MLflow refuses the name: tracking switches off
    tracker.log_metrics({"mAP50": 0.6}, step=3)  # not sent any more
    tracker.finish("FAILED")
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in MlflowClient(settings.mlflow_tracking_uri).get_metric_history(run.info.run_id,
                                                                                          "mAP50")] == [1]


def test_docker_image_runs_as_a_non_root_user():
    from tests.conftest import ROOT

    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert users and users[-1] not in ("root", "0")
