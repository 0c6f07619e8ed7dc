"""`--help` and `--check` of train.py and predict.py, against the real local servers.

The checks run in-process (cli.run_checks with a plain environment dict) for each outcome; one
`train.py --check` and the two `--help` runs go through the entry points as subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

import cli
from variables import ENV_HELP, ENV_VARS
from tests.conftest import AUTH_TOKEN, ROOT, SECRETS, free_port, storage_env
from tests.sample_data import make_dataset, make_zip
from utils import BadInput

LINE = re.compile(r"^(ok|warn|skipped|problem|unreachable|error) +(.+?) +(\d+\.\d\d) s  (.*)$")


def run_checks(entry: str, env: dict) -> tuple[int, dict[str, tuple[str, str]], str]:
    """(exit code, {check: (status, detail)}, the printed report)."""
    out = io.StringIO()
    code = cli.run_checks(entry, env, out)
    report = out.getvalue()
    lines = report.splitlines()
    assert lines[-1].startswith("check: ") and lines[-1].endswith(f"exit {code}"), report
    checks = {}
    for line in lines[:-1]:
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        checks[match[2]] = (match[1], match[4])
    return code, checks, report


@pytest.fixture
def train_env(s3_server, s3, bucket, tmp_path) -> dict:
    """A training job whose dataset and pretrained weights are in the bucket; DEVICE=cpu."""
    s3.put_object(Bucket=bucket, Key="datasets/ds-1.zip", Body=b"PK\x05\x06" + b"\0" * 18)
    s3.put_object(Bucket=bucket, Key="models/yolo11n.pt", Body=b"weights")
    return {**storage_env(s3_server, bucket), "JOB_ID": "c1", "DATASET_ID": "ds-1", "MODEL_NAME": "yolo11n",
            "DEVICE": "cpu", "WORK_DIR": str(tmp_path / "work")}


def test_help_needs_no_other_variable_and_lists_every_variable_with_default_and_meaning(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # nothing else: no JOB_ID, no storage
    (tmp_path / ".env").write_text("JOB_ID=7\nCHECKPOINT_URI=best.pt\nEXPORT_FORMATS=onnx\n")  # --help runs nothing
    texts = {}
    for entry, first in (("train", "Train an Ultralytics YOLO model"), ("predict", "Run a trained YOLO checkpoint"),
                         ("evaluate", "Evaluate"), ("export", "Export a trained YOLO checkpoint")):
        result = subprocess.run([sys.executable, str(ROOT / f"{entry}.py"), "--help"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        text = texts[entry] = result.stdout
        assert text.startswith(first), text[:200]
        assert "--check" in text and f"usage: python {entry}.py" in text
        for name in ENV_VARS:
            listed = re.search(rf"^  {name}( \(default: (.*)\))?$", text, re.M)
            found = re.match(r"^(\w+\.py): ", ENV_HELP[name])
            meant = found[1] if found else ""
            if meant and meant != f"{entry}.py" and name not in cli.BORROWED[entry]:
                assert not listed, f"{entry}.py --help lists {name}, which only {meant} reads"
                continue
            if name in cli.NOT_READ.get(entry, ()):
                assert not listed, f"{entry}.py --help lists {name}, which it does not read"
                continue
            assert listed, f"{entry}.py --help misses {name}"
            assert (listed[2] or "") == ENV_VARS[name]  # the default, from the same table the code uses
            meaning = ENV_HELP[name].split(": ", 1)[1] if meant else ENV_HELP[name]
            assert " ".join(text[listed.end():].split()).startswith(meaning[:40])  # followed by its meaning
    assert "PREDICT_SHARDS" in texts["predict"] and "CALLBACK_URL" not in texts["predict"]  # predict's
    assert "EXPORT_FORMATS" not in texts["predict"] and "EXPORT_OUTPUT_URI" in texts["export"]
    assert "CHECKPOINT_URI" in texts["evaluate"] and "DATASET_ID" in texts["evaluate"] and "EPOCHS" not in texts["evaluate"]
    unlisted = [name for name in ENV_VARS if not any(re.search(rf"^  {name}\b", t, re.M) for t in texts.values())]
    assert unlisted == []  # every variable is in some entry point's help (IMGSZ once fell out of all four)


def test_unknown_arguments_are_a_usage_error():
    assert cli.handle(["--chekc"], "train", "doc") == 2
    assert cli.handle([], "train", "doc") is None  # no argument: run the job


def test_check_of_a_good_training_configuration_is_all_ok(train_env, receiver, mlflow_server):
    env = {**train_env, "CALLBACK_URL": receiver.url("c1"), "INTERNAL_AUTH_TOKEN": AUTH_TOKEN,
           "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": f"exp-{uuid.uuid4().hex[:6]}"}
    code, checks, report = run_checks("train", env)
    assert code == 0, report
    assert list(checks) == ["configuration", "work folder", "storage", "dataset", "weights", "backend", "mlflow", "gpu"]
    assert all(status == "ok" for status, _ in checks.values()), report
    bucket = train_env["STORAGE_BUCKET"]
    assert checks["dataset"][1] == f"s3://{bucket}/datasets/ds-1.zip (22 B)"
    assert checks["weights"][1] == f"pretrained yolo11n: s3://{bucket}/models/yolo11n.pt (7 B)"
    assert checks["backend"][1].endswith("/health: job_status running")
    assert "will be created" in checks["mlflow"][1]
    assert "DEVICE=cpu" in checks["gpu"][1]
    assert [r["route"] for r in receiver.requests()] == ["health"]  # the check sends no callback
    assert not any(secret in report for secret in SECRETS)


def test_missing_dataset_and_missing_weights_are_problems_exit_2(train_env, s3):
    s3.delete_object(Bucket=train_env["STORAGE_BUCKET"], Key="datasets/ds-1.zip")
    code, checks, _ = run_checks("train", {**train_env, "MODEL_NAME": "checkpoints/job-0/best.pt"})
    assert code == 2
    assert checks["dataset"] == ("problem", f"dataset s3://{train_env['STORAGE_BUCKET']}/datasets/ds-1.zip does not exist")
    assert checks["weights"][0] == "problem" and "no local file and no storage object" in checks["weights"][1]
    assert checks["storage"][0] == "ok"


def test_missing_bucket_is_a_problem_exit_2(train_env):
    code, checks, _ = run_checks("train", {**train_env, "STORAGE_BUCKET": f"nope-{uuid.uuid4().hex[:8]}"})
    assert code == 2
    assert checks["storage"][0] == "problem" and "does not exist" in checks["storage"][1]


def test_unreachable_storage_exits_75_and_skips_what_needs_it(train_env):
    code, checks, _ = run_checks("train", {**train_env, "MINIO_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert code == 75
    assert checks["storage"][0] == "unreachable"
    assert checks["dataset"] == ("skipped", "storage is unreachable")
    assert checks["weights"][0] == "skipped"


def test_unreachable_backend_and_mlflow_exit_75(train_env):
    dead = f"http://127.0.0.1:{free_port()}"
    code, checks, _ = run_checks("train", {**train_env, "CALLBACK_URL": f"{dead}/internal/training/c1",
                                           "MLFLOW_TRACKING_URI": dead})
    assert code == 75
    assert checks["backend"] == ("unreachable", f"{dead}/internal/training/c1/health is unreachable (Connection refused)")
    assert checks["mlflow"][0] == "unreachable" and checks["dataset"][0] == "ok"


def test_refused_token_is_a_problem_and_wins_over_unreachable(train_env, receiver):
    code, checks, report = run_checks("train", {**train_env, "CALLBACK_URL": receiver.url("c1"),
                                                "INTERNAL_AUTH_TOKEN": "wrong-token-1234",
                                                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert code == 2  # fix the configuration first: retrying cannot help
    assert checks["backend"][0] == "problem" and "refuses INTERNAL_AUTH_TOKEN" in checks["backend"][1]
    assert checks["mlflow"][0] == "unreachable"
    assert "wrong-token-1234" not in report  # a secret variable's value is masked


def test_bad_configuration_is_reported_whole_before_anything_is_reached(tmp_path):
    code, checks, _ = run_checks("train", {"STORAGE_TYPE": "minio", "EPOCHS": "0", "WORK_DIR": str(tmp_path)})
    assert code == 2 and list(checks) == ["configuration"]
    status, detail = checks["configuration"]
    assert status == "problem"
    for name in ("JOB_ID is required", "DATASET_ID (or DATASET_URI) is required", "EPOCHS=0", "MINIO_ACCESS_KEY"):
        assert name in detail


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with a GPU has GPU 0")
def test_device_asking_for_a_gpu_this_machine_lacks_is_a_problem(train_env):
    code, checks, _ = run_checks("train", {**train_env, "DEVICE": "0"})
    assert code == 2
    assert checks["gpu"][0] == "problem" and checks["gpu"][1].startswith("DEVICE=0 but 0 GPU(s) seen")


def test_predict_check_finds_the_checkpoint_and_an_image_of_the_shard(s3_server, s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="checkpoints/job-p1/best.pt", Body=b"weights")
    s3.put_object(Bucket=bucket, Key="inputs/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=b"an image")
    env = {**storage_env(s3_server, bucket), "JOB_ID": "p1", "INPUT_URI": "inputs/", "DEVICE": "cpu",
           "WORK_DIR": str(tmp_path / "w"), "PREDICT_SHARDS": "4", "JOB_COMPLETION_INDEX": "3"}
    code, checks, report = run_checks("predict", env)
    assert code == 0, report
    assert list(checks) == ["configuration", "work folder", "storage", "checkpoint", "input", "gpu"]
    assert checks["configuration"][1].endswith("shard 3 of 4")
    assert checks["checkpoint"][1] == f"s3://{bucket}/checkpoints/job-p1/best.pt (7 B)"
    assert checks["input"][1] == f"images found, the first s3://{bucket}/inputs/a.jpg"

    code, checks, _ = run_checks("predict", {**env, "JOB_ID": "p2", "INPUT_URI": "inputs/none/"})
    assert code == 2
    assert checks["checkpoint"][0] == "problem" and checks["input"] == ("problem", "INPUT_URI=inputs/none/: no images found")


def test_check_lines_are_json_with_log_format_json(train_env):
    out = io.StringIO()
    code = cli.run_checks("train", {**train_env, "MINIO_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, out, as_json=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 75 and lines[-1] == {"summary": {"ok": 3, "skipped": 4, "unreachable": 1}, "exit_code": 75}
    assert {"name", "status", "seconds", "detail"} == set(lines[0])


def test_check_prints_only_its_json_lines_on_stdout_in_a_new_work_folder(tmp_path):
    """TRAIN_ARGS' values are checked by Ultralytics, whose first run in a new folder (every pod's
    emptyDir) prints a settings notice: it went to stdout among the JSON lines and broke jq."""
    dataset = make_zip(make_dataset(tmp_path / "ds", "detect", n_train=2, n_val=1), tmp_path / "ds.zip")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STORAGE_TYPE": "local", "JOB_ID": "j1",
           "DATASET_URI": str(dataset), "MODEL_NAME": "yolo11n.yaml", "WORK_DIR": str(tmp_path / "new-work"),
           "TRAIN_ARGS": '{"patience": 3}', "LOG_FORMAT": "json", "YOLO_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--check"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    assert lines[0]["name"] == "configuration" and "summary" in lines[-1], result.stdout


def test_unknown_model_config_is_a_problem(tmp_path, monkeypatch):
    for name in ("YOLO_CONFIG_DIR", "MPLCONFIGDIR", "YOLO_OFFLINE"):  # prepare_ultralytics sets them in-process
        monkeypatch.setenv(name, str(tmp_path / name) if name != "YOLO_OFFLINE" else "1")
    with pytest.raises(BadInput, match="MODEL_NAME=yolo99z.yaml is not a model config Ultralytics knows"):
        cli._model_config("yolo99z.yaml", tmp_path)


def test_train_py_check_exits_with_its_code(train_env, receiver, tmp_path):
    """Through the entry point: a config name (no download), the real backend; exit 0, report on stdout."""
    env = {**train_env, "MODEL_NAME": "yolo11n.yaml", "CALLBACK_URL": receiver.url("c1"),
           "INTERNAL_AUTH_TOKEN": AUTH_TOKEN}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_", "R2_"))}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--check"], env={**base, **env}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [LINE.match(line)[1] for line in lines[:-1]] == ["ok", "ok", "ok", "ok", "ok", "ok", "skipped", "ok"]
    assert "yolo11n.yaml: Ultralytics' model config (scale n)" in result.stdout
    assert lines[-1] == "check: 7 ok, 1 skipped; exit 0"
    assert not (tmp_path / "work" / "jobs").exists()  # nothing trained, no job folder
