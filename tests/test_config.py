"""Configuration: a dict in, settings or one error listing every problem out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import load_settings
from variables import ENV_HELP, ENV_VARS
from tests.conftest import ROOT, run_entry
from utils import ConfigError, Redactor

BASE = {"JOB_ID": "42", "DATASET_ID": "ds-1", "STORAGE_TYPE": "minio", "MINIO_ACCESS_KEY": "ak",
        "MINIO_SECRET_KEY": "sk-secret-value"}


def problems(env: dict, entry: str = "train") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(env, entry)
    return info.value.problems


def test_minimal_environment_gives_documented_defaults(tmp_path):
    s = load_settings(BASE)
    assert s.job_id == "42" and s.project_id == "default"
    assert s.dataset_uri == "datasets/ds-1.zip"
    assert s.model_name == "yolo11n" and s.task is None
    assert (s.epochs, s.batch, s.lr0, s.imgsz) == (100, 16, None, 640)
    assert s.device is None and s.workers is None and s.train_args == {} and s.resume is True
    assert s.storage.type == "minio" and s.storage.bucket == "vision-platform"
    assert s.storage.endpoint == "http://localhost:9000"
    assert s.backend.url is None
    assert s.mlflow_experiment == "project-default"
    assert s.mlflow_tracking_uri == f"sqlite:///{s.work_dir / 'mlflow.db'}"
    assert s.checkpoint_prefix == "checkpoints/job-42/"


def test_launch_variables_are_parsed():
    s = load_settings({**BASE, "PROJECT_ID": "abc123", "TASK_TYPE": "instance_segmentation", "MODEL_NAME": "yolov8s-seg",
                       "EPOCHS": "10", "BATCH_SIZE": "-1", "LEARNING_RATE": "0.001", "IMGSZ": "320", "DEVICE": "0,1",
                       "WORKERS": "4", "TRAIN_ARGS": '{"patience": 20, "cos_lr": true}', "RESUME": "false",
                       "CALLBACK_URL": "http://backend:8000/internal/training/42/", "INTERNAL_AUTH_TOKEN": "t0ken",
                       "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "exp"})
    assert s.task == "segment" and s.epochs == 10 and s.batch == -1 and s.lr0 == 0.001 and s.imgsz == 320
    assert s.device == "0,1" and s.workers == 4 and s.train_args == {"patience": 20, "cos_lr": True}
    assert s.resume is False
    assert s.backend.url == "http://backend:8000/internal/training/42" and s.backend.token == "t0ken"
    assert s.mlflow_tracking_uri == "http://mlflow:5000" and s.mlflow_experiment == "exp"


@pytest.mark.parametrize("alias,task", [
    ("object_detection", "detect"), ("instance_segmentation", "segment"), ("classification", "classify"),
    ("pose_estimation", "pose"), ("oriented_detection", "obb"), ("detect", "detect"), ("OBB", "obb"),
    ("image_classification", "classify"), ("detection", "detect"), ("segmentation", "segment"),
])
def test_task_type_accepts_platform_and_ultralytics_names(alias, task):
    assert load_settings({**BASE, "TASK_TYPE": alias}).task == task


@pytest.mark.parametrize("env,expected", [
    ({"JOB_ID": ""}, "JOB_ID is required"),
    ({"JOB_ID": "../etc"}, "JOB_ID='../etc' must be"),
    ({"JOB_ID": "a/b"}, "JOB_ID='a/b' must be"),
    ({"PROJECT_ID": "p q"}, "PROJECT_ID='p q' must be"),
    ({"DATASET_ID": ""}, "DATASET_ID (or DATASET_URI) is required"),
    ({"DATASET_ID": "x/../../y"}, "DATASET_ID='x/../../y' must be"),
    ({"TASK_TYPE": "segmentation_3d"}, "TASK_TYPE='segmentation_3d' must be one of"),
    ({"MODEL_NAME": "../../etc/passwd.pt"}, "MODEL_NAME='../../etc/passwd.pt' must not contain '..'"),
    ({"EPOCHS": "ten"}, "EPOCHS='ten' is not an integer"),
    ({"EPOCHS": "0"}, "EPOCHS=0 is out of range"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE=0 must be"),
    ({"BATCH_SIZE": "2.5"}, "BATCH_SIZE=2.5 must be"),
    ({"BATCH_SIZE": "-2"}, "BATCH_SIZE=-2 is out of range"),
    ({"LEARNING_RATE": "0"}, "LEARNING_RATE=0 is out of range"),
    ({"LEARNING_RATE": "1.5"}, "LEARNING_RATE=1.5 is out of range"),
    ({"LEARNING_RATE": "nan"}, "LEARNING_RATE='nan' is not a number"),
    ({"IMGSZ": "16"}, "IMGSZ=16 is out of range"),
    ({"DEVICE": "gpu"}, "DEVICE='gpu' must be"),
    ({"WORKERS": "-1"}, "WORKERS=-1 is out of range"),
    ({"TRAIN_ARGS": "{patience: 3}"}, "TRAIN_ARGS is not valid JSON"),
    ({"TRAIN_ARGS": "[1, 2]"}, "TRAIN_ARGS must be a JSON object"),
    ({"TRAIN_ARGS": '{"epochs": 5}'}, "TRAIN_ARGS may not set 'epochs': use EPOCHS"),
    ({"TRAIN_ARGS": '{"project": "/x"}'}, "TRAIN_ARGS may not set 'project': the trainer sets it"),
    ({"RESUME": "maybe"}, "RESUME='maybe' must be auto or false"),
    ({"WEIGHTS_DOWNLOAD": "sometimes"}, "WEIGHTS_DOWNLOAD='sometimes' must be true or false"),
    ({"STORAGE_TYPE": "gcs"}, "STORAGE_TYPE='gcs' must be one of"),
    ({"MINIO_ACCESS_KEY": ""}, "MINIO_ACCESS_KEY is required"),
    ({"MINIO_SECRET_KEY": ""}, "MINIO_SECRET_KEY is required"),
    ({"STORAGE_TYPE": "r2"}, "R2_ENDPOINT is required"),
    ({"CALLBACK_URL": "backend:8000/x"}, "CALLBACK_URL='backend:8000/x' must be an http"),
    ({"CALLBACK_TIMEOUT": "0"}, "CALLBACK_TIMEOUT=0 is out of range"),
    ({"CALLBACK_MAX_ATTEMPTS": "x"}, "CALLBACK_MAX_ATTEMPTS='x' is not an integer"),
    ({"STORAGE_MAX_ATTEMPTS": "0"}, "STORAGE_MAX_ATTEMPTS=0 is out of range"),
    ({"CONF_THRESHOLD": "2"}, "CONF_THRESHOLD=2 is out of range"),
    ({"DATASET_CHECK": "maybe"}, "DATASET_CHECK='maybe' must be strict, warn or off"),
    ({"DATASET_MAX_FILES": "0"}, "DATASET_MAX_FILES=0 is out of range"),
    ({"TLS_VERIFY": "perhaps"}, "TLS_VERIFY='perhaps' must be true or false"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' must be text or json"),
    ({"PROGRESS_INTERVAL": "-1"}, "PROGRESS_INTERVAL=-1 is out of range"),
    ({"DATASET_URI": "s3://bucket/a/../b.zip"}, "DATASET_URI='s3://bucket/a/../b.zip' must be s3://bucket/key"),
    ({"DATASET_URI": "s3://bucket//b.zip"}, "DATASET_URI='s3://bucket//b.zip' must be s3://bucket/key"),
    ({"MODEL_NAME": "yolo\x00.pt"}, "MODEL_NAME must be at most 1024 characters with no control characters"),
    ({"MODEL_NAME": "m" * 1100}, "MODEL_NAME must be at most 1024 characters"),
])
def test_each_bad_variable_is_named_in_the_error(env, expected):
    found = problems({**BASE, **env})
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once():
    found = problems({"EPOCHS": "0", "BATCH_SIZE": "x", "STORAGE_TYPE": "minio", "TRAIN_ARGS": "[]",
                      "CALLBACK_URL": "ftp://x"})
    for name in ("JOB_ID", "DATASET_ID", "EPOCHS", "BATCH_SIZE", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
                 "TRAIN_ARGS", "CALLBACK_URL"):
        assert any(p.startswith(name) for p in found), (name, found)
    assert "  - " in str(ConfigError(found))  # one readable list


def test_r2_settings_and_r2_bucket_wins():
    s = load_settings({**BASE, "STORAGE_TYPE": "r2", "R2_ENDPOINT": "https://acct.r2.cloudflarestorage.com",
                       "R2_ACCESS_KEY_ID": "a", "R2_SECRET_ACCESS_KEY": "b", "R2_BUCKET": "r2b", "STORAGE_BUCKET": "other"})
    assert (s.storage.type, s.storage.bucket, s.storage.region) == ("r2", "r2b", "auto")


def test_minio_endpoint_without_scheme_gets_http():
    assert load_settings({**BASE, "MINIO_ENDPOINT": "minio:9000"}).storage.endpoint == "http://minio:9000"


@pytest.mark.parametrize("env,variable", [
    ({"STORAGE_BUCKET": "vision platform"}, "STORAGE_BUCKET"),
    ({"STORAGE_BUCKET": "vision-platform/sub"}, "STORAGE_BUCKET"),
    ({"STORAGE_BUCKET": "arn:aws:s3:::x"}, "STORAGE_BUCKET"),
    ({"STORAGE_TYPE": "s3", "STORAGE_BUCKET": "has space"}, "STORAGE_BUCKET"),
    ({"STORAGE_TYPE": "r2", "R2_BUCKET": "r2_bucket", "R2_ENDPOINT": "https://a.r2.cloudflarestorage.com",
      "R2_ACCESS_KEY_ID": "a", "R2_SECRET_ACCESS_KEY": "b"}, "R2_BUCKET"),
    ({"MINIO_ENDPOINT": "http://"}, "MINIO_ENDPOINT"),
    ({"MINIO_ENDPOINT": "http://[::1"}, "MINIO_ENDPOINT"),
    ({"MINIO_ENDPOINT": "ftp://minio:9000"}, "MINIO_ENDPOINT"),
    ({"MINIO_ENDPOINT": "http://minio:9000?x=1"}, "MINIO_ENDPOINT"),
    ({"MINIO_ENDPOINT": "http://minio:99999"}, "MINIO_ENDPOINT"),
    ({"STORAGE_TYPE": "s3", "AWS_ENDPOINT_URL": "host:9000"}, "AWS_ENDPOINT_URL"),
])
def test_bucket_names_and_endpoints_boto3_would_refuse_are_configuration_problems(env, variable):
    """botocore refuses them before any request: that read as storage unreachable (exit 75, retried) or
    crashed with a traceback (exit 1); it is a configuration problem (exit 2) naming the variable."""
    found = problems({**BASE, **env})
    assert len(found) == 1 and found[0].startswith(f"{variable}="), found


def test_older_aws_bucket_names_are_taken_for_aws_only():
    assert load_settings({**BASE, "STORAGE_TYPE": "s3", "STORAGE_BUCKET": "My_Legacy_Bucket"}).storage.bucket == \
        "My_Legacy_Bucket"  # us-east-1 buckets made before 2018 may have such names; botocore takes them
    assert problems({**BASE, "STORAGE_BUCKET": "My_Legacy_Bucket"})[0].startswith("STORAGE_BUCKET=")  # MinIO: no


def test_r2_endpoint_without_scheme_gets_https():
    s = load_settings({**BASE, "STORAGE_TYPE": "r2", "R2_ENDPOINT": "acct.r2.cloudflarestorage.com",
                       "R2_ACCESS_KEY_ID": "a", "R2_SECRET_ACCESS_KEY": "b"})
    assert s.storage.endpoint == "https://acct.r2.cloudflarestorage.com"
    assert "***@" in problems({**BASE, "MINIO_ENDPOINT": "http://user:pw-secret@minio:0"})[0]  # no credential shown


def test_dataset_uri_overrides_dataset_id():
    s = load_settings({**BASE, "DATASET_URI": "s3://other/data/x.tar.gz"})
    assert s.dataset_uri == "s3://other/data/x.tar.gz"


def test_predict_needs_an_input_and_a_checkpoint():
    found = problems({"STORAGE_TYPE": "local"}, "predict")
    assert any(p.startswith("INPUT_URI is required") for p in found)
    assert any(p.startswith("CHECKPOINT_URI (or JOB_ID") for p in found)
    s = load_settings({"STORAGE_TYPE": "local", "JOB_ID": "7", "INPUT_URI": "img.jpg"}, "predict")
    assert s.checkpoint_uri == "checkpoints/job-7/best.pt"


def test_describe_masks_every_secret():
    s = load_settings({**BASE, "INTERNAL_AUTH_TOKEN": "tok-123456"})
    text = repr(s.describe())
    assert "sk-secret-value" not in text and "tok-123456" not in text and "'***'" in text
    assert "sk-secret-value" not in repr(s)  # nor in the dataclass repr


def test_redactor_masks_secret_values_and_url_credentials():
    redact = Redactor.from_environ({"MINIO_SECRET_KEY": "abcd1234", "MY_PASSWORD": "hunter22", "EPOCHS": "1000"})
    text = redact("key abcd1234 at http://user:pa55w0rd@mlflow:5000/ with hunter22 for 1000 epochs")
    assert text == "key *** at http://***:***@mlflow:5000/ with *** for 1000 epochs"


def test_env_example_lists_every_variable_the_code_reads():
    example = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    assert names == set(ENV_VARS), (set(ENV_VARS) - names, names - set(ENV_VARS))


def test_every_variable_has_a_one_line_meaning_for_help():
    assert set(ENV_HELP) == set(ENV_VARS), set(ENV_HELP) ^ set(ENV_VARS)  # --help prints ENV_VARS' order
    assert all(meaning.strip() and "\n" not in meaning for meaning in ENV_HELP.values())


def test_configuration_table_in_the_docs_lists_every_variable():
    table = (ROOT / "docs" / "contract.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in ENV_VARS if f"`{n}`" not in table]
    assert not missing, missing


def test_readme_launch_table_lists_the_contracts_launch_variables():
    readme = (ROOT / "README.md").read_text()
    launch = ("JOB_ID", "PROJECT_ID", "CALLBACK_URL", "INTERNAL_AUTH_TOKEN", "TASK_TYPE", "MODEL_NAME", "DATASET_ID",
              "EPOCHS", "BATCH_SIZE", "LEARNING_RATE", "STORAGE_TYPE", "STORAGE_BUCKET", "MLFLOW_TRACKING_URI",
              "MLFLOW_EXPERIMENT_NAME")
    assert not [n for n in launch if f"`{n}`" not in readme]
    assert len(readme.splitlines()) < 250  # a front door: the depth is in docs/


def test_dotenv_file_is_read_and_real_environment_wins(tmp_path: Path):
    (tmp_path / ".env").write_text("JOB_ID=from-dotenv\nEPOCHS=0\nSTORAGE_TYPE=local\n")
    result = run_entry("train.py", {"EPOCHS": "5", "WORK_DIR": str(tmp_path / "w")}, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "DATASET_ID (or DATASET_URI) is required" in result.stderr
    assert "JOB_ID is required" not in result.stderr  # taken from .env
    assert "EPOCHS" not in result.stderr.split("invalid configuration", 1)[1]  # the real EPOCHS=5 won over .env's 0


def test_train_args_checker_runs_with_the_other_checks_and_all_problems_come_together(tmp_path):
    seen = {}

    def checker(args, work_dir):
        seen.update(args=args, work_dir=work_dir)
        return ["TRAIN_ARGS: 'patiense' is not an Ultralytics training argument"]

    env = {**BASE, "EPOCHS": "0", "TRAIN_ARGS": '{"patiense": 3}', "WORK_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        load_settings(env, check_train_args=checker)
    assert seen == {"args": {"patiense": 3}, "work_dir": tmp_path.resolve()}
    assert any(p.startswith("EPOCHS=0") for p in info.value.problems)
    assert any("'patiense'" in p for p in info.value.problems)


def test_train_arg_names_are_checked_without_importing_ultralytics():
    """train.py checks TRAIN_ARGS' names with the configuration, against Ultralytics' default.yaml
    read from disk: the names must be exactly Ultralytics' own, and neither it nor torch is imported
    (about 3 s) before the job starts its downloads."""
    code = ("import sys, json; from config import load_settings; from models import train_arg_name_problems\n"
            "from utils import ConfigError\n"
            f"env = {{**{BASE!r}, 'TRAIN_ARGS': json.dumps({{'patiense': 3, 'cos_lr': True}})}}\n"
            "try:\n    load_settings(env, check_train_args=train_arg_name_problems)\n"
            "except ConfigError as e:\n    print(json.dumps(e.problems))\n"
            "print(json.dumps(sorted(m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    problems, imported = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert problems == ["TRAIN_ARGS: 'patiense' is not an Ultralytics training argument (did you mean 'patience'?)"]
    assert imported == []

    from ultralytics.cfg import DEFAULT_CFG_DICT

    from models import ultralytics_argument_names

    assert ultralytics_argument_names() == set(DEFAULT_CFG_DICT)


@pytest.mark.parametrize("value", ["-2", "0", "1.5", "abc"])
def test_a_bad_batch_size_is_reported_once(value):
    found = problems({**BASE, "BATCH_SIZE": value})
    assert len(found) == 1 and found[0].startswith("BATCH_SIZE="), found
