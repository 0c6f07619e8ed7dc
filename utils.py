"""Shared parts of the YOLO trainer: configuration, storage, backend callbacks, datasets.

train.py and predict.py are the entry points; this module holds everything they
share, in this order:

1. constants: exit codes, storage keys, every environment variable the trainer reads;
2. errors, logging and secret redaction;
3. configuration: `load_settings(environ)` -> frozen `Settings`, every problem reported at once;
4. storage: one `Storage` client for MinIO, Cloudflare R2, AWS S3 or a local folder;
5. backend callbacks: one `Backend` client with a background sender and an event log;
6. datasets and weights: safe archive extraction, `data.yaml` rewriting, pretrained weights lookup;
7. Ultralytics set-up: offline mode and settings kept in the work folder.

Environment variables (all documented in README.md and .env.example):
    JOB_ID, PROJECT_ID, CALLBACK_URL, INTERNAL_AUTH_TOKEN, TASK_TYPE, MODEL_NAME, DATASET_ID,
    DATASET_URI, EPOCHS, BATCH_SIZE, LEARNING_RATE, IMGSZ, DEVICE, WORKERS, TRAIN_ARGS, WORK_DIR,
    RESUME, STORAGE_TYPE, STORAGE_BUCKET, MINIO_*, R2_*, LOCAL_STORAGE_DIR, MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME, CHECKPOINT_URI, INPUT_URI, CONF_THRESHOLD, IOU_THRESHOLD, and the
    tuning knobs listed in ENV_VARS below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping

LOGGER = logging.getLogger("trainer")

# ----------------------------------------------------------------------------------------------
# 1. Constants
# ----------------------------------------------------------------------------------------------

# Exit codes: a Kubernetes Job's podFailurePolicy acts on these (see README, "Exit codes").
EXIT_OK = 0  # the job did what it was asked
EXIT_ERROR = 1  # unexpected error (a bug, or a failure nobody classified): retry at most a little
EXIT_BAD_INPUT = 2  # bad configuration or input: retrying cannot help (FailJob)
EXIT_TRANSIENT = 75  # infrastructure failure (storage down, network): retrying can help (EX_TEMPFAIL)
EXIT_CANCELLED = 143  # SIGTERM/SIGINT or cancelled by the backend (128 + SIGTERM)

DATASET_KEY = "datasets/{dataset_id}.zip"
PRETRAINED_KEY = "{prefix}{model_name}.pt"
CHECKPOINT_PREFIX = "checkpoints/job-{job_id}/"

# The platform's task names (what bodies carry) by Ultralytics task name.
PLATFORM_TASKS = {"detect": "object_detection", "segment": "instance_segmentation", "classify": "image_classification",
                  "pose": "pose_estimation", "obb": "oriented_detection"}
# TASK_TYPE accepts the platform's names, Ultralytics' names and the short forms.
TASK_ALIASES = {
    **{platform: task for task, platform in PLATFORM_TASKS.items()},
    **{name: name for name in PLATFORM_TASKS},
    "detection": "detect", "segmentation": "segment", "classification": "classify",
}
STORAGE_TYPES = ("minio", "r2", "s3", "local")
SECRET_NAME_PARTS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# Every variable the trainer reads, with its default ("" = unset). .env.example and the README
# list the same names; tests/test_config.py keeps the three in step.
ENV_VARS: dict[str, str] = {
    # job
    "JOB_ID": "",
    "PROJECT_ID": "default",
    "TASK_TYPE": "",
    "MODEL_NAME": "yolo11n",
    "DATASET_ID": "",
    "DATASET_URI": "",
    "EPOCHS": "100",
    "BATCH_SIZE": "16",
    "LEARNING_RATE": "",
    "IMGSZ": "640",
    "DEVICE": "",
    "WORKERS": "",
    "TRAIN_ARGS": "{}",
    "WORK_DIR": "",
    "CACHE_MAX_BYTES": "50000000000",
    "KEEP_JOB_FILES": "false",
    "RESUME": "auto",
    "CHECKPOINT_INTERVAL": "1",
    "SHUTDOWN_TIMEOUT": "20",
    "DATASET_MAX_BYTES": "100000000000",
    "DATASET_MAX_FILES": "5000000",
    "DATASET_CHECK": "strict",
    "VAL_FRACTION": "0.1",
    "PRETRAINED_PREFIX": "models/",
    "WEIGHTS_DOWNLOAD": "true",
    "LOG_LEVEL": "INFO",
    "TLS_CA_BUNDLE": "",
    "TLS_VERIFY": "true",
    # backend callbacks
    "CALLBACK_URL": "",
    "INTERNAL_AUTH_TOKEN": "",
    "CALLBACK_CONNECT_TIMEOUT": "3",
    "CALLBACK_TIMEOUT": "10",
    "CALLBACK_MAX_ATTEMPTS": "8",
    "CALLBACK_FLUSH_TIMEOUT": "10",
    "CALLBACK_HEALTH_INTERVAL": "10",
    "VALIDATION_IMAGES": "50",
    "VALIDATION_CONF": "0.25",
    # storage
    "STORAGE_TYPE": "minio",
    "STORAGE_BUCKET": "vision-platform",
    "MINIO_ENDPOINT": "http://localhost:9000",
    "MINIO_ACCESS_KEY": "",
    "MINIO_SECRET_KEY": "",
    "R2_ENDPOINT": "",
    "R2_ACCESS_KEY_ID": "",
    "R2_SECRET_ACCESS_KEY": "",
    "R2_BUCKET": "",
    "LOCAL_STORAGE_DIR": "storage",
    "STORAGE_MAX_ATTEMPTS": "8",
    "STORAGE_TIMEOUT": "60",
    "STORAGE_CHECKSUM": "when_required",
    # tracking
    "MLFLOW_TRACKING_URI": "",
    "MLFLOW_EXPERIMENT_NAME": "",
    # predict
    "CHECKPOINT_URI": "",
    "INPUT_URI": "",
    "CONF_THRESHOLD": "0.25",
    "IOU_THRESHOLD": "0.7",
    "MAX_DET": "300",
    "PREDICT_BATCH": "16",
    "PREDICT_OUTPUT_URI": "",
    "PREDICT_SAVE_IMAGES": "true",
}


# ----------------------------------------------------------------------------------------------
# 2. Errors, logging, redaction
# ----------------------------------------------------------------------------------------------


class TrainerError(Exception):
    """A failure the entry points know how to report; its class decides the exit code."""

    exit_code = EXIT_ERROR


class BadInput(TrainerError):
    """Bad configuration or input: the same job will fail the same way again."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class TransientError(TrainerError):
    """Infrastructure failed (storage unreachable, throttled): a retry of the job may succeed."""

    exit_code = EXIT_TRANSIENT


class Cancelled(TrainerError):
    """The job was told to stop (signal or backend cancellation)."""

    exit_code = EXIT_CANCELLED


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")


def is_secret_name(name: str) -> bool:
    """True for variables whose value must never be shown (…KEY, …SECRET, …TOKEN, …PASSWORD)."""
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


class Redactor:
    """Masks secret values and URL credentials in any text that leaves the process."""

    def __init__(self, secrets: list[str]):
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Redactor:
        return cls([value for name, value in environ.items() if is_secret_name(name) and value])

    def __call__(self, text: Any) -> str:
        text = _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", str(text))
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class _RedactingFilter(logging.Filter):
    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True


def setup_logging(environ: Mapping[str, str], redact: Redactor) -> None:
    """Log to stderr, through the redaction filter; Ultralytics' logger is routed here too."""
    level = (environ.get("LOG_LEVEL") or ENV_VARS["LOG_LEVEL"]).upper()
    handler = logging.StreamHandler()  # stderr: stdout belongs to predict.py's JSON
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_configuration(settings: "Settings") -> None:
    """The effective configuration, once, secrets masked; a loud warning if TLS checks are off."""
    LOGGER.info("configuration: %s", json.dumps(settings.describe(), sort_keys=True))
    if settings.storage.verify is False:
        LOGGER.warning("TLS certificate verification is OFF (TLS_VERIFY=false) for storage, backend and MLflow")


def now_iso() -> str:
    """Current UTC time, ISO 8601 with a Z suffix."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------------------
# 3. Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    type: str
    bucket: str
    endpoint: str | None = None
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    region: str | None = None
    local_dir: Path | None = None
    max_attempts: int = 8
    timeout: float = 60.0
    checksum: str = "when_required"  # boto3 request/response checksum mode
    verify: bool | str = True  # TLS: True, False (TLS_VERIFY=false), or a CA bundle path


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    url: str | None
    token: str | None = dataclasses.field(default=None, repr=False)
    connect_timeout: float = 3.0
    timeout: float = 10.0
    max_attempts: int = 8
    flush_timeout: float = 10.0
    health_interval: float = 10.0
    verify: bool | str = True  # TLS: True, False (TLS_VERIFY=false), or a CA bundle path


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole configuration of one run of train.py or predict.py."""

    job_id: str | None
    project_id: str
    task: str | None  # Ultralytics task name, None = infer from the model
    model_name: str
    dataset_uri: str | None  # s3://, a storage key, or a local path; None for predict
    epochs: int
    batch: float  # -1 = AutoBatch, 0 < batch < 1 = fraction of GPU memory
    lr0: float | None  # None = Ultralytics' optimizer=auto picks optimizer and learning rate
    imgsz: int
    device: str | None  # None = first GPU if any, else cpu
    workers: int | None  # None = from the CPUs available to the process
    train_args: dict
    work_dir: Path
    cache_max_bytes: int  # cap on WORK_DIR/datasets + WORK_DIR/weights, least recently used evicted; 0 = no cap
    keep_job_files: bool  # keep WORK_DIR/jobs/job-{JOB_ID} and this job's downloads after it ends
    resume: bool
    checkpoint_interval: int  # upload last.pt every N epochs during training
    shutdown_timeout: float  # seconds from a stop request to exit: below the pod's grace period
    dataset_max_bytes: int  # caps on an archive's uncompressed size and file count
    dataset_max_files: int
    dataset_check: str  # strict | warn | off
    val_fraction: float  # share of train images that become val when a dataset has no val split
    pretrained_prefix: str
    weights_download: bool
    validation_images: int  # validation images per epoch with per-image results for the backend
    validation_conf: float  # confidence threshold of those results' predicted boxes and of the confusion matrix
    mlflow_tracking_uri: str
    mlflow_experiment: str
    checkpoint_uri: str | None
    input_uri: str | None
    conf: float
    iou: float
    max_det: int
    predict_batch: int
    predict_output_uri: str | None  # storage prefix for predictions.json and annotated images
    predict_save_images: bool
    storage: StorageSettings
    backend: BackendSettings

    @property
    def checkpoint_prefix(self) -> str:
        return CHECKPOINT_PREFIX.format(job_id=self.job_id)

    @property
    def run_dir(self) -> Path:
        """Where Ultralytics writes this job's outputs (weights/, results.csv, plots)."""
        return self.work_dir / "runs" / f"job-{self.job_id}"

    def describe(self) -> dict:
        """The effective configuration for the start-of-job log, secrets masked."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = {k.name: ("***" if is_secret_name(k.name) and getattr(value, k.name) else getattr(value, k.name))
                         for k in dataclasses.fields(value)}
            out[f.name] = value
        return json.loads(json.dumps(out, default=str))


class _Env:
    """Reads typed values from an environment mapping, collecting every problem."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.problems: list[str] = []

    def str(self, name: str, required: bool = False, default: str | None = None) -> str | None:
        assert name in ENV_VARS, f"{name} missing from ENV_VARS"
        value = (self.environ.get(name) or "").strip()
        if not value:
            value = default if default is not None else ENV_VARS[name]
        if required and not value:
            self.problems.append(f"{name} is required")
        return value or None

    def number(self, name: str, kind: type, low: float | None = None, high: float | None = None,
               what: str = "") -> Any:
        raw = self.str(name)
        try:
            value = kind(raw)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError
        except (TypeError, ValueError):
            self.problems.append(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}")
            return kind(ENV_VARS[name] or 0)
        if (low is not None and value < low) or (high is not None and value > high):
            self.problems.append(f"{name}={raw} is out of range: expected {what}")
        return value

    def flag(self, name: str) -> bool:
        raw = (self.str(name) or "").lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name}={raw!r} must be true or false")
        return False

    def reference(self, name: str, required: bool = False) -> str | None:
        """A storage key, s3:// URI or local path: sane length, no control characters, a valid bucket."""
        value = self.str(name, required)
        if not value:
            return value
        if len(value) > 1024 or re.search(r"[\x00-\x1f\x7f]", value):
            self.problems.append(f"{name} must be at most 1024 characters with no control characters")
        elif value.startswith("s3://"):
            bucket, _, key = value[5:].partition("/")
            segments = key.split("/")  # a trailing "/" (a prefix) is the only empty segment allowed
            if not S3_BUCKET.fullmatch(bucket) or not key or "" in segments[:-1] or ".." in segments:
                self.problems.append(f"{name}={value!r} must be s3://bucket/key with a valid bucket name, "
                                     "no empty path segments and no '..'")
        return value

    def identifier(self, name: str, required: bool = False, default: str | None = None) -> str | None:
        value = self.str(name, required, default)
        if value and not ID_PATTERN.match(value):
            self.problems.append(
                f"{name}={value!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value


def load_settings(environ: Mapping[str, str], entry: str = "train",
                  check_train_args: Callable[[dict, Path], list[str]] | None = None) -> Settings:
    """Build the settings of train.py (entry='train') or predict.py (entry='predict').

    Args:
        environ: the environment (a plain dict in tests).
        entry: which entry point the settings are for.
        check_train_args: validates TRAIN_ARGS against Ultralytics' own configuration check
            (train.py passes one; it needs Ultralytics, which this module does not import).

    Raises:
        ConfigError: listing every missing or invalid variable at once.
    """
    env = _Env(environ)
    training = entry == "train"
    job_id = env.identifier("JOB_ID", required=training)
    project_id = env.identifier("PROJECT_ID")

    task_raw = env.str("TASK_TYPE")
    task = TASK_ALIASES.get(task_raw.lower()) if task_raw else None
    if task_raw and not task:
        env.problems.append(f"TASK_TYPE={task_raw!r} must be one of {', '.join(TASK_ALIASES)}")

    model_name = env.reference("MODEL_NAME")
    if ".." in PurePosixPath(model_name).parts:
        env.problems.append(f"MODEL_NAME={model_name!r} must not contain '..'")

    dataset_id = env.identifier("DATASET_ID")
    dataset_uri = env.reference("DATASET_URI") or (DATASET_KEY.format(dataset_id=dataset_id) if dataset_id else None)
    if training and not dataset_uri:
        env.problems.append("DATASET_ID (or DATASET_URI) is required")

    epochs = env.number("EPOCHS", int, 1, 100_000, "an integer >= 1")
    batch = env.number("BATCH_SIZE", float, -1, 100_000, "an integer >= 1, -1 for AutoBatch, or a GPU memory fraction in (0, 1)")
    if batch not in (-1,) and not (0 < batch < 1) and (batch < 1 or batch != int(batch)):
        env.problems.append(f"BATCH_SIZE={environ.get('BATCH_SIZE')} must be an integer >= 1, -1, or a fraction in (0, 1)")
    lr0 = env.number("LEARNING_RATE", float, 0, 1, "0 < LEARNING_RATE < 1") if env.str("LEARNING_RATE") else None
    if lr0 in (0, 1):
        env.problems.append(f"LEARNING_RATE={environ.get('LEARNING_RATE')} is out of range: expected 0 < LEARNING_RATE < 1")
    imgsz = env.number("IMGSZ", int, 32, 8192, "an integer from 32 to 8192")

    device = env.str("DEVICE")
    if device and not re.fullmatch(r"cpu|mps|(cuda:)?\d+(,\d+)*", device.replace(" ", "")):
        env.problems.append(f"DEVICE={device!r} must be cpu, mps, a GPU index like 0, or a list like 0,1,2,3")
    workers = env.number("WORKERS", int, 0, 256, "an integer >= 0") if env.str("WORKERS") else None

    train_args = _parse_train_args(env)
    work_dir = Path(env.str("WORK_DIR") or Path(tempfile.gettempdir()) / "yolo-trainer").expanduser().resolve()
    if training and check_train_args and train_args:
        env.problems.extend(check_train_args(train_args, work_dir))
    dataset_check = (env.str("DATASET_CHECK") or "").lower()
    if dataset_check not in ("strict", "warn", "off"):
        env.problems.append(f"DATASET_CHECK={dataset_check!r} must be strict, warn or off")
    env.flag("TLS_VERIFY")  # validated here once; _tls_verify applies it
    ca_bundle = env.str("TLS_CA_BUNDLE")
    if ca_bundle and not Path(ca_bundle).expanduser().is_file():
        env.problems.append(f"TLS_CA_BUNDLE={ca_bundle!r} is not a file")

    resume_raw = (env.str("RESUME") or "").lower()
    if resume_raw not in ("auto", "true", "1", "yes", "false", "0", "no"):
        env.problems.append(f"RESUME={resume_raw!r} must be auto or false")

    prefix = env.reference("PRETRAINED_PREFIX") or ""
    prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"

    tracking_uri = env.str("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir / 'mlflow.db'}"
    experiment = env.str("MLFLOW_EXPERIMENT_NAME") or f"project-{project_id}"

    checkpoint_uri = env.reference("CHECKPOINT_URI")
    if entry == "predict" and not checkpoint_uri:
        if job_id:
            checkpoint_uri = CHECKPOINT_PREFIX.format(job_id=job_id) + "best.pt"
        else:
            env.problems.append("CHECKPOINT_URI (or JOB_ID, for that job's best.pt) is required")
    input_uri = env.reference("INPUT_URI", required=entry == "predict")

    settings = Settings(
        job_id=job_id,
        project_id=project_id,
        task=task,
        model_name=model_name,
        dataset_uri=dataset_uri,
        epochs=epochs,
        batch=int(batch) if batch >= 1 or batch == -1 else batch,
        lr0=lr0,
        imgsz=imgsz,
        device=device.replace(" ", "") if device else None,
        workers=workers,
        train_args=train_args,
        work_dir=work_dir,
        cache_max_bytes=env.number("CACHE_MAX_BYTES", int, 0, 10**16, "a number of bytes >= 0 (0 = no cap)"),
        keep_job_files=env.flag("KEEP_JOB_FILES"),
        resume=resume_raw in ("auto", "true", "1", "yes"),
        checkpoint_interval=env.number("CHECKPOINT_INTERVAL", int, 1, 10_000, "an integer >= 1"),
        shutdown_timeout=env.number("SHUTDOWN_TIMEOUT", float, 1, 3600, "seconds from 1 to 3600"),
        dataset_max_bytes=env.number("DATASET_MAX_BYTES", int, 1, 10**15, "a number of bytes >= 1"),
        dataset_max_files=env.number("DATASET_MAX_FILES", int, 1, 10**10, "a number of files >= 1"),
        dataset_check=dataset_check,
        val_fraction=env.number("VAL_FRACTION", float, 0.01, 0.5, "a fraction from 0.01 to 0.5"),
        pretrained_prefix=prefix,
        weights_download=env.flag("WEIGHTS_DOWNLOAD"),
        validation_images=env.number("VALIDATION_IMAGES", int, 0, 100_000, "an integer >= 0 (0 = none)"),
        validation_conf=env.number("VALIDATION_CONF", float, 0, 1, "a number from 0 to 1"),
        mlflow_tracking_uri=tracking_uri,
        mlflow_experiment=experiment,
        checkpoint_uri=checkpoint_uri,
        input_uri=input_uri,
        conf=env.number("CONF_THRESHOLD", float, 0, 1, "a number from 0 to 1"),
        iou=env.number("IOU_THRESHOLD", float, 0, 1, "a number from 0 to 1"),
        max_det=env.number("MAX_DET", int, 1, 100_000, "an integer >= 1"),
        predict_batch=env.number("PREDICT_BATCH", int, 1, 4096, "an integer from 1 to 4096"),
        predict_output_uri=_output_prefix(env),
        predict_save_images=env.flag("PREDICT_SAVE_IMAGES"),
        storage=_storage_settings(env),
        backend=backend_settings(env),
    )
    if env.problems:
        raise ConfigError(env.problems)
    return settings


# Arguments the trainer itself decides; TRAIN_ARGS may not override them.
RESERVED_TRAIN_ARGS = {
    "data": "DATASET_ID/DATASET_URI", "model": "MODEL_NAME", "epochs": "EPOCHS", "batch": "BATCH_SIZE",
    "lr0": "LEARNING_RATE", "imgsz": "IMGSZ", "device": "DEVICE", "workers": "WORKERS", "task": "TASK_TYPE",
    "resume": "RESUME", "project": None, "name": None, "save_dir": None, "exist_ok": None, "mode": None,
}


def _output_prefix(env: _Env) -> str | None:
    value = env.reference("PREDICT_OUTPUT_URI")
    if value and not value.endswith("/"):
        value += "/"  # a prefix: predictions.json and images/ go under it
    return value


def _parse_train_args(env: _Env) -> dict:
    raw = env.str("TRAIN_ARGS") or "{}"
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as e:
        env.problems.append(f"TRAIN_ARGS is not valid JSON: {e.msg} at position {e.pos}")
        return {}
    if not isinstance(args, dict):
        env.problems.append("TRAIN_ARGS must be a JSON object, e.g. {\"patience\": 20}")
        return {}
    for key in sorted(set(args) & set(RESERVED_TRAIN_ARGS)):
        owner = RESERVED_TRAIN_ARGS[key]
        env.problems.append(f"TRAIN_ARGS may not set {key!r}" + (f": use {owner}" if owner else ": the trainer sets it"))
    return {k: v for k, v in args.items() if k not in RESERVED_TRAIN_ARGS}


def _tls_verify(env: _Env) -> bool | str:
    """TLS certificate checking for storage, backend and MLflow: on, off, or a CA bundle.

    Only an explicit false/0/no/off turns it off (load_settings reports other bad values).
    """
    if (env.environ.get("TLS_VERIFY") or "").strip().lower() in ("0", "false", "no", "off"):
        return False
    ca = env.environ.get("TLS_CA_BUNDLE", "").strip()
    return str(Path(ca).expanduser()) if ca else True


def _storage_settings(env: _Env) -> StorageSettings:
    kind = (env.str("STORAGE_TYPE") or "").lower()
    bucket = env.str("STORAGE_BUCKET")
    checksum = (env.str("STORAGE_CHECKSUM") or "").lower()
    if checksum not in ("when_required", "when_supported"):
        env.problems.append(f"STORAGE_CHECKSUM={checksum!r} must be when_required or when_supported")
        checksum = "when_required"
    common = {"max_attempts": env.number("STORAGE_MAX_ATTEMPTS", int, 1, 100, "an integer from 1 to 100"),
              "timeout": env.number("STORAGE_TIMEOUT", float, 1, 3600, "seconds from 1 to 3600"), "checksum": checksum,
              "verify": _tls_verify(env)}
    if kind == "minio":
        endpoint = env.str("MINIO_ENDPOINT")
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"  # MinIO SDK style host:port
        return StorageSettings("minio", bucket, endpoint, env.str("MINIO_ACCESS_KEY", required=True),
                               env.str("MINIO_SECRET_KEY", required=True), "us-east-1", **common)
    if kind == "r2":
        return StorageSettings("r2", env.str("R2_BUCKET") or bucket, env.str("R2_ENDPOINT", required=True),
                               env.str("R2_ACCESS_KEY_ID", required=True), env.str("R2_SECRET_ACCESS_KEY", required=True),
                               "auto", **common)
    if kind == "s3":  # AWS: credentials, region and endpoint come from boto3's usual AWS_* chain
        return StorageSettings("s3", bucket, **common)
    if kind == "local":
        return StorageSettings("local", bucket, local_dir=Path(env.str("LOCAL_STORAGE_DIR")).expanduser().resolve(), **common)
    env.problems.append(f"STORAGE_TYPE={kind!r} must be one of {', '.join(STORAGE_TYPES)}")
    return StorageSettings("local", bucket or "")


def backend_settings(env: _Env | Mapping[str, str]) -> BackendSettings:
    """Callback settings; usable on their own to report a configuration failure."""
    env = env if isinstance(env, _Env) else _Env(env)
    url = env.str("CALLBACK_URL")
    if url and not re.match(r"^https?://[^/\s]+", url):
        env.problems.append(f"CALLBACK_URL={url!r} must be an http:// or https:// URL")
        url = None
    return BackendSettings(
        url=url.rstrip("/") if url else None,
        token=env.str("INTERNAL_AUTH_TOKEN"),
        connect_timeout=env.number("CALLBACK_CONNECT_TIMEOUT", float, 0.1, 300, "seconds from 0.1 to 300"),
        timeout=env.number("CALLBACK_TIMEOUT", float, 0.1, 600, "seconds from 0.1 to 600"),
        max_attempts=env.number("CALLBACK_MAX_ATTEMPTS", int, 1, 1000, "an integer from 1 to 1000"),
        flush_timeout=env.number("CALLBACK_FLUSH_TIMEOUT", float, 0, 600, "seconds from 0 to 600"),
        health_interval=env.number("CALLBACK_HEALTH_INTERVAL", float, 0, 86400, "seconds, 0 = never"),
        verify=_tls_verify(env),
    )


# ----------------------------------------------------------------------------------------------
# 4. Storage
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Location:
    bucket: str
    key: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    digest: tuple[str, str] | None = None  # (algorithm, value) a transfer is verified against; None: size only
    listed: bool = False  # from a listing, which says nothing of encryption: the object's HEAD has the last word


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
            "AllAccessDisabled", "InvalidBucketName", "401", "Unauthorized"}


_CLOCK_SKEW = {"RequestTimeTooSkewed"}


def _clock_skew(response: dict) -> float | None:
    """Seconds the storage server's clock (its Date header) is ahead of this node's, when the gap is
    past what S3 tolerates (15 minutes); None otherwise. A HEAD has no error body, so its plain 403
    can only be told from refused credentials this way."""
    from email.utils import parsedate_to_datetime

    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        skew = (parsedate_to_datetime(date) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None
    return skew if abs(skew) > 15 * 60 else None


def _certificate_refused(error: BaseException) -> bool:
    """True when a TLS error is a failed certificate verification (bad configuration), not a
    handshake that was reset or cut short (transient). Looks through the wrapped errors."""
    import ssl

    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 10:
        seen.append(error)
        if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
            return True
        kwargs = getattr(error, "kwargs", None)  # botocore keeps the original error there
        wrapped = kwargs.get("error") if isinstance(kwargs, dict) else None
        error = wrapped if isinstance(wrapped, BaseException) else error.__cause__ or error.__context__
    return False


class StorageNotFound(BadInput):
    """The object or prefix does not exist."""


class Storage:
    """One client for the job's bucket: MinIO, R2, S3 through boto3, or a local folder."""

    def __init__(self, settings: StorageSettings, interrupt: Callable[[], None] | None = None):
        self.settings = settings
        self.interrupt = interrupt  # called as transfers progress; what it raises (a stop) ends the transfer
        self.bucket = settings.bucket
        self._s3 = None if settings.type == "local" else self._client(settings)
        self._buckets_seen: set[str] = set()
        self._etags_not_md5 = False  # learnt from a store whose MD5-looking ETags are not MD5s (see _mismatch)

    @staticmethod
    def _client(s: StorageSettings):
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if s.type == "minio" else "auto"},
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=min(s.timeout, 10),
            read_timeout=s.timeout,
            max_pool_connections=32,  # predict.py reads images from several threads
            # boto3 >= 1.36 sends CRC checksums by default, which R2 and older MinIO reject.
            request_checksum_calculation=s.checksum,
            response_checksum_validation=s.checksum,
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=s.endpoint, aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key,
            # None keeps boto3's own default (AWS_CA_BUNDLE, else its bundled CAs)
            region_name=s.region, config=config, verify=None if s.verify is True else s.verify)

    # -- addressing -------------------------------------------------------------------------

    def locate(self, ref: str) -> Location:
        """`s3://bucket/key` or a key in the job's bucket."""
        if ref.startswith("s3://"):
            bucket, _, key = ref[5:].partition("/")
            if not bucket or not key:
                raise BadInput(f"{ref!r} is not an s3://bucket/key URI")
            return Location(bucket, key)
        key = ref.lstrip("/")
        if not key or ".." in PurePosixPath(key).parts:
            raise BadInput(f"{ref!r} is not a valid storage key")
        return Location(self.bucket, key)

    def uri(self, loc: Location) -> str:
        if self.settings.type == "local":
            return self._path(loc).as_uri()
        return f"s3://{loc.bucket}/{loc.key}"

    def _path(self, loc: Location) -> Path:
        return self.settings.local_dir / loc.bucket / loc.key

    # -- operations ---------------------------------------------------------------------------

    def head(self, loc: Location) -> ObjectInfo | None:
        """Size and ETag of an object, None if it does not exist."""
        if self._s3 is None:
            path = self._path(loc)
            if not path.is_file():
                return None
            st = path.stat()
            return ObjectInfo(st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")
        try:
            with self._errors("look up", loc):
                # ChecksumMode: the full-object checksum the store keeps, if it keeps one
                meta = self._s3.head_object(Bucket=loc.bucket, Key=loc.key, ChecksumMode="ENABLED")
        except StorageNotFound:
            self._check_bucket(loc)  # a HEAD cannot tell a missing object from a missing bucket
            return None
        etag = meta.get("ETag", "").strip('"')
        return ObjectInfo(meta["ContentLength"], etag, _object_digest(meta, etag))

    def _check_bucket(self, loc: Location) -> None:
        if loc.bucket in self._buckets_seen:
            return
        try:
            with self._errors("look up", Location(loc.bucket, "")):
                self._s3.head_bucket(Bucket=loc.bucket)
        except StorageNotFound:
            raise BadInput(f"bucket {loc.bucket} does not exist (check STORAGE_BUCKET and the URIs)") from None
        self._buckets_seen.add(loc.bucket)

    def download(self, loc: Location, dest: Path, info: ObjectInfo | None = None, quiet: bool = False) -> Path:
        """Download to dest atomically: a .part file, renamed once its size and digest are verified.

        The digest is the store's full-object checksum (SHA-256, SHA-1, CRC32) where it keeps one,
        else the ETag where that is the content's MD5 (a plain single-part ETag of an object without
        KMS or customer-key encryption), else there is none and the size check stands alone: an
        object whose ETag cannot be an MD5 is transferred once. A mismatch downloads again, a
        second one fails as transient. See _mismatch for a store whose ETags only look like MD5s.
        """
        info = info or self.head(loc)
        if info is None:
            raise StorageNotFound(f"{self.uri(loc)} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + f".part-{os.getpid()}-{threading.get_ident()}")
        log = LOGGER.debug if quiet else LOGGER.info
        log("downloading %s (%s) to %s", self.uri(loc), human_size(info.size), dest)
        start, previous = time.monotonic(), None
        try:
            for attempt in (1, 2):
                if self._s3 is None:
                    shutil.copyfile(self._path(loc), part)
                else:
                    with self._errors("download", loc):
                        self._s3.download_file(loc.bucket, loc.key, str(part), Callback=self._progress)
                got = part.stat().st_size
                if got != info.size:
                    raise TransientError(f"download of {self.uri(loc)} is incomplete: {got} of {info.size} bytes")
                problem, previous = self._mismatch(part, info, previous)
                if problem and info.listed:  # a listing's ETag may be an encrypted object's: ask the object
                    info = self.head(loc) or info
                    problem, previous = self._mismatch(part, info, None)
                if not problem:
                    break
                if attempt == 2:
                    raise TransientError(f"download of {self.uri(loc)} is corrupt: {problem}")
                LOGGER.warning("download of %s does not match (%s); downloading again", self.uri(loc), problem)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        log("downloaded %s in %.1f s", dest.name, time.monotonic() - start)
        return dest

    def _progress(self, _bytes: int) -> None:
        """boto3's transfer callback: a safe point to stop at (the exception ends the transfer)."""
        if self.interrupt:
            self.interrupt()

    def _mismatch(self, path: Path, info: ObjectInfo, previous: str | None) -> tuple[str | None, str | None]:
        """(why path is not the object's content or None, the MD5 computed for the next call).

        Some gateways give ETags that look like MD5s but are not, and say nothing of it: when two
        transfers give the same bytes and the same mismatch, the ETag is no MD5, the size check
        stands alone, and the store is remembered as such for the rest of the process.
        """
        if info.digest is None or (info.digest[0] == "md5" and self._etags_not_md5):
            return None, None
        algorithm, expected = info.digest
        got = file_digest(path, algorithm)
        if got == expected:
            return None, None
        if algorithm == "md5" and got == previous:
            self._etags_not_md5 = True
            LOGGER.warning("two transfers gave the same bytes and the same mismatch: this store's ETags are not "
                           "MD5s of the content; verifying sizes only from now on")
            return None, None
        return f"{algorithm} {got} != {expected}", got

    def fetch(self, loc: Location, dest: Path) -> Path:
        """Download unless dest already holds this exact object (same ETag), e.g. after a restart."""
        info = self.head(loc)
        if info is None:
            raise StorageNotFound(f"{self.uri(loc)} does not exist")
        stamp = dest.with_name(dest.name + ".etag")
        if dest.is_file() and stamp.is_file() and stamp.read_text() == info.etag and dest.stat().st_size == info.size:
            LOGGER.info("using cached %s for %s", dest, self.uri(loc))
            return dest
        self.download(loc, dest, info)
        stamp.write_text(info.etag)
        return dest

    def upload(self, path: Path, loc: Location) -> str:
        """Upload a file and verify what the store holds (size, and MD5 where the ETag is one).

        Readers see the old object or the whole new one, never a part: S3 replaces objects
        atomically, and the local store writes a temporary file and renames it.
        """
        size = path.stat().st_size
        LOGGER.info("uploading %s (%s) to %s", path.name, human_size(size), self.uri(loc))
        if self._s3 is None:
            return self._write_local(loc, lambda part: shutil.copyfile(path, part))
        previous = None
        for attempt in (1, 2):
            with self._errors("upload", loc):
                self._s3.upload_file(str(path), loc.bucket, loc.key, Callback=self._progress)
            stored = self.head(loc)
            if stored is None or stored.size != size:
                problem = f"upload of {path.name} to {self.uri(loc)} is incomplete"
            else:
                mismatch, previous = self._mismatch(path, stored, previous)
                if not mismatch:
                    return self.uri(loc)
                problem = f"upload of {path.name} to {self.uri(loc)} does not match ({mismatch})"
            if attempt == 2:
                raise TransientError(problem)
            LOGGER.warning("%s; uploading again", problem)
        return self.uri(loc)

    def read_bytes(self, loc: Location) -> bytes:
        """A small object's content, in memory (images for predict.py)."""
        if self._s3 is None:
            try:
                return self._path(loc).read_bytes()
            except FileNotFoundError:
                raise StorageNotFound(f"{self.uri(loc)} does not exist") from None
        with self._errors("read", loc):
            return self._s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()

    def put_bytes(self, data: bytes, loc: Location, content_type: str = "application/octet-stream") -> str:
        """Store a small object from memory (annotated images)."""
        if self._s3 is None:
            return self._write_local(loc, lambda part: part.write_bytes(data))
        with self._errors("upload", loc):
            self._s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType=content_type)
        return self.uri(loc)

    def _write_local(self, loc: Location, write: Callable[[Path], Any]) -> str:
        """Local store: write a temporary file, then rename it over the object (atomic for readers)."""
        dest = self._path(loc)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + f".part-{os.getpid()}-{threading.get_ident()}")
        write(part)
        os.replace(part, dest)
        return self.uri(loc)

    def list(self, prefix: Location) -> Iterator[tuple[Location, ObjectInfo]]:
        """Every object under a prefix, across as many listing pages as it takes.

        Folder markers (keys ending in '/', which consoles' "create folder" writes) are not
        objects to download: they are left out.
        """
        if self._s3 is None:
            root = self._path(Location(prefix.bucket, ""))
            base = self._path(prefix)
            folder = base if prefix.key.endswith("/") or base.is_dir() else base.parent
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                rel = path.relative_to(root).as_posix()
                if path.is_file() and rel.startswith(prefix.key) and ".part-" not in path.name:
                    yield Location(prefix.bucket, rel), ObjectInfo(path.stat().st_size, "")
            return
        paginator = self._s3.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        if obj.get("Size"):
                            LOGGER.warning("skipping %s: a folder marker with content", obj["Key"])
                        continue
                    etag = obj.get("ETag", "").strip('"')
                    yield Location(prefix.bucket, obj["Key"]), ObjectInfo(obj["Size"], etag, _etag_digest(etag), True)

    @contextlib.contextmanager
    def _errors(self, action: str, loc: Location):
        """Turn boto3 errors into BadInput (missing, refused) or TransientError (everything else)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, SSLError

        try:
            yield
        except (ClientError, S3UploadFailedError) as e:
            # upload_file wraps the ClientError that says what went wrong
            error = e if isinstance(e, ClientError) else e.__context__
            response = error.response if isinstance(error, ClientError) else {}
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            where = self.uri(loc)
            if code in _NOT_FOUND or (status == "404" and code != "NoSuchBucket"):
                raise StorageNotFound(f"{where} does not exist") from None
            skew = _clock_skew(response)
            if code in _CLOCK_SKEW or (status == "403" and skew):  # the node's fault: NTP or another node fixes it
                clock = (f"is {abs(skew) / 60:.0f} minutes {'behind' if skew > 0 else 'ahead of'}" if skew
                         else "differs from")
                raise TransientError(f"storage refused to {action} {where}: {code or status}: this node's clock "
                                     f"{clock} the storage server's, more than it allows (15 minutes on S3); "
                                     "check the node's time synchronisation (NTP)") from None
            if code in _REFUSED or status in ("401", "403"):
                raise BadInput(f"storage refused to {action} {where}: {code or status} "
                               "(check the bucket name and the storage credentials)") from None
            raise TransientError(f"storage failed to {action} {where}: {code or status or e}") from None
        except SSLError as e:
            endpoint = self.settings.endpoint or "the storage endpoint"
            if _certificate_refused(e):
                raise BadInput(f"the TLS certificate of {endpoint} is not trusted (set TLS_CA_BUNDLE to its "
                               "CA)") from None
            # a handshake reset or cut short (a restarting proxy, a load balancer): worth a retry
            raise TransientError(f"TLS handshake with {endpoint} failed while trying to {action} "
                                 f"{self.uri(loc)}: {e}") from None
        except BotoCoreError as e:
            raise TransientError(f"storage unreachable while trying to {action} {self.uri(loc)}: {e}") from None


def fetch_file(storage: Storage, ref: str, work_dir: Path) -> Path:
    """A file given as a local path, an s3:// URI or a storage key: a local file as it is, else
    the storage object, downloaded once into WORK_DIR/weights/files (cached by ETag).

    Raises:
        StorageNotFound: neither a local file nor a storage object.
    """
    local = Path(ref).expanduser()
    if not ref.startswith("s3://") and local.is_file():
        return local.resolve()
    loc = storage.locate(ref)
    return storage.fetch(loc, work_dir / "weights" / "files" / loc.bucket / loc.key)


# Full-object checksums S3 keeps (base64) that Python computes without extra packages, best first.
# CRC32C and CRC64NVME would need awscrt; a composite (per-part) checksum ends in -<parts>.
_CHECKSUM_FIELDS = (("ChecksumSHA256", "sha256"), ("ChecksumSHA1", "sha1"), ("ChecksumCRC32", "crc32"))


def _object_digest(meta: Mapping[str, Any], etag: str) -> tuple[str, str] | None:
    """What a transfer of this object is verified against: a full-object checksum the store keeps,
    else the ETag if it is the content's MD5, else None (size only)."""
    if meta.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        for field, algorithm in _CHECKSUM_FIELDS:
            value = meta.get(field)
            if value and "-" not in value:
                return algorithm, value
    if str(meta.get("ServerSideEncryption", "")).startswith("aws:kms") or meta.get("SSECustomerAlgorithm"):
        return None  # S3's ETag of a KMS or customer-key encrypted object is not the content's MD5
    return _etag_digest(etag)


def _etag_digest(etag: str) -> tuple[str, str] | None:
    """("md5", etag) where the ETag can be an MD5 (32 hex digits; a multipart ETag has a '-')."""
    return ("md5", etag) if re.fullmatch(r"[0-9a-f]{32}", etag or "") else None


def file_digest(path: Path, algorithm: str) -> str:
    """A file's digest as S3 writes it: hex for md5 (the ETag), base64 for checksums."""
    import base64

    crc, digest = 0, None if algorithm == "crc32" else hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if digest is None:
                crc = zlib.crc32(chunk, crc)
            else:
                digest.update(chunk)
    if algorithm == "md5":
        return digest.hexdigest()
    raw = crc.to_bytes(4, "big") if digest is None else digest.digest()
    return base64.b64encode(raw).decode()


# ----------------------------------------------------------------------------------------------
# 5. Backend callbacks
# ----------------------------------------------------------------------------------------------

RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
TERMINAL_STATUSES = {"completed", "failed", "cancelled"}


@dataclasses.dataclass(eq=False)
class Event:
    method: str
    route: str
    body: dict | list
    key: str  # events with the same key are delivered one at a time, in order
    critical: bool  # never dropped or coalesced; retried until the flush deadline
    barrier: bool = False  # the final status: sent only after every earlier critical event
    progress: bool = False  # a per-epoch progress status: a newer one replaces it while queued
    on_success: Callable[[Any], None] | None = None  # called with the response once the backend took it
    attempts: int = 0
    refusals: int = 0  # connection attempts refused (ECONNREFUSED): nothing listens at the backend's address
    not_before: float = 0.0
    sending: bool = False  # a sender holds it right now: it cannot be dropped or coalesced


class Backend:
    """Sends the contract's callbacks from background threads; never blocks or fails training.

    - Every event gets an `event_id` that stays the same across its retries (each element of an
      array body gets its own), and is appended to a JSON-lines event log before it is sent.
    - Order: `status` events, `validation-results`, `training-metrics` and the `metrics` of one
      name are each delivered in order, one at a time; different routes and names (and log
      messages, which carry their timestamp) go out in parallel on SENDERS (12) threads, so a slow
      backend does not build a backlog. The final status waits for every status and validation
      result before it (metrics and logs still queued may arrive after it).
    - Chained: the answer to `validation-results` carries `validation_result_id`; the epoch's
      per-image results then go to `validation-image-results` in arrays of IMAGE_BATCH.
    - Retries: connection errors, timeouts, 408/425/429/5xx, with exponential backoff and full
      jitter, honouring Retry-After. `status` and `validation-results` are retried until the
      flush deadline; other events up to CALLBACK_MAX_ATTEMPTS times. A 404 switches the route
      off (a `training-metrics` row then goes out as one `metrics` post per number); a 422 (the
      body does not match the backend's schema) is logged once per route with the backend's
      detail; other 4xx are logged once per route and status. None of them is retried.
    - Bounded: a queued progress status is replaced by a newer one, and past MAX_QUEUE events the
      oldest metric or log event is dropped (it stays in the event log); status and validation
      results are never dropped.
    - `close()` flushes until CALLBACK_FLUSH_TIMEOUT, but stops at once when the backend refuses
      connections: a backend that is down is not waited for.
    Without CALLBACK_URL events are only logged.
    """

    SENDERS = 12
    MAX_QUEUE = 10_000
    IMAGE_BATCH = 100
    BACKOFF_BASE = 0.5
    BACKOFF_CAP = 30.0

    def __init__(self, settings: BackendSettings, redact: Redactor, event_log: Path | None = None):
        self.settings = settings
        self.redact = redact
        self.event_log = event_log
        self._queue: list[Event] = []
        self._inflight: set[str] = set()
        self._cond = threading.Condition()
        self._log_lock = threading.Lock()
        self._closed = False
        self.final_status: str | None = None  # the terminal status this job reported, once it did
        self._poll_now = False
        self._deadline = math.inf
        self._unreachable = False
        self._dropped = 0
        self._disabled_routes: set[str] = set()
        self._warned: set[tuple[str, int]] = set()
        self._local = threading.local()
        self._threads = []
        if settings.url:
            self._threads = [threading.Thread(target=self._sender, name=f"callback-sender-{i}", daemon=True)
                             for i in range(self.SENDERS)]
            for t in self._threads:
                t.start()

    # -- the contract's routes ------------------------------------------------------------------

    def status(self, status: str, progress: float, error: str | None = None, **extra) -> None:
        body = {"status": status, "error": self.redact(error) if error else None,
                "progress": round(max(0.0, min(100.0, progress)), 2), "updated_at": now_iso(), **extra}
        final = status in TERMINAL_STATUSES
        if final:
            self.final_status = status
        self._emit("PATCH", "status", body, critical=True, barrier=final,
                   progress=status == "running" and "epoch" in extra)

    def validation_results(self, body: dict, images: list[dict] | None = None) -> None:
        """One epoch's validation result; once the backend has stored it, its per-image results."""
        def accepted(response) -> None:
            result_id = _answer_field(response, "validation_result_id", "id")
            if isinstance(result_id, int):
                self.validation_image_results(result_id, body["epoch"], images)
            elif ("validation-image-results", 0) not in self._warned:
                self._warned.add(("validation-image-results", 0))
                LOGGER.warning("the backend's validation-results answer has no validation_result_id: "
                               "per-image results are not sent")

        self._emit("POST", "validation-results", body, critical=True, on_success=accepted if images else None)

    def validation_image_results(self, result_id: int, epoch: int, images: list[dict]) -> None:
        """Per-image results of a stored validation result, IMAGE_BATCH per request."""
        for i in range(0, len(images), self.IMAGE_BATCH):
            chunk = [{**image, "validation_result_id": result_id, "epoch": epoch}
                     for image in images[i:i + self.IMAGE_BATCH]]
            self._emit("POST", "validation-image-results", chunk)

    def training_metrics(self, row: dict) -> None:
        """One epoch's row of every number; a backend without the route gets them as `metrics`."""
        if "training-metrics" in self._disabled_routes:
            self._metrics_instead(row)
        else:
            self._emit("POST", "training-metrics", row)

    def metric(self, name: str, value: float, epoch: int, **extra) -> None:
        body = {"name": name, "value": value, "epoch": epoch, "timestamp": now_iso(), **extra}
        self._emit("POST", "metrics", body, key=f"metrics:{name}")

    def log(self, message: str, level: str = "INFO", epoch: int | None = None) -> None:
        body = {"message": self.redact(message), "level": level, "timestamp": now_iso()}
        if epoch is not None:
            body["epoch"] = epoch
        self._emit("POST", "logs", body, key=f"logs:{uuid.uuid4().hex}")  # unordered: each carries its time

    def health(self) -> str | None:
        """The backend's job_status, or None when it cannot tell (no URL, error, no route)."""
        if not self.settings.url or "health" in self._disabled_routes:
            return None
        try:
            response = self._http().get(f"{self.settings.url}/health", headers=self._headers(),
                                        timeout=(self.settings.connect_timeout, self.settings.timeout),
                                        verify=self.settings.verify)
            if response.status_code == 404:
                self._disable("health")
                return None
            return response.json().get("job_status") if response.ok else None
        except Exception as e:  # never let a health check fail the job
            LOGGER.debug("health check failed: %s", self.redact(e))
            return None

    def watch_cancellation(self, interval: float, on_cancel) -> None:
        """Poll GET /health in the background: at once, then every `interval` seconds and whenever
        `poll_health_now` asks (after each epoch); call on_cancel once on 'cancelled'."""
        if not self.settings.url or interval <= 0:
            return

        def poll() -> None:
            while not self._closed:
                if self.health() == "cancelled":
                    on_cancel("cancelled by the backend")
                    return
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._poll_now, timeout=interval)
                    self._poll_now = False

        threading.Thread(target=poll, name="health-poll", daemon=True).start()

    def poll_health_now(self) -> None:
        """Ask the health poller (if any) to ask the backend now rather than at its next interval."""
        with self._cond:
            self._poll_now = True
            self._cond.notify_all()

    # -- queueing -------------------------------------------------------------------------------

    def _emit(self, method: str, route: str, body: dict | list, critical: bool = False, barrier: bool = False,
              progress: bool = False, key: str | None = None, on_success: Callable[[Any], None] | None = None) -> None:
        if isinstance(body, list):
            body = [{**element, "event_id": uuid.uuid4().hex} for element in body]
        else:
            body = {**body, "event_id": uuid.uuid4().hex}
        self._append_event_log(method, route, body)
        if not self.settings.url:
            LOGGER.info("event %s %s: %s", method, route, json.dumps(body)[:500])
            return
        event = Event(method, route, body, key or route, critical, barrier, progress, on_success)
        with self._cond:
            if progress:  # only the newest progress matters to the backend
                self._queue = [e for e in self._queue if not (e.progress and not e.sending)]
            if len(self._queue) >= self.MAX_QUEUE:
                self._drop_oldest_droppable()
            self._queue.append(event)
            self._cond.notify_all()

    def _drop_oldest_droppable(self) -> None:
        for i, e in enumerate(self._queue):
            if not e.critical and not e.progress and not e.sending:
                del self._queue[i]
                self._dropped += 1
                if self._dropped == 1:
                    LOGGER.warning("callback queue full (backend slow or down): dropping the oldest metric "
                                   "and log events; they stay in the event log")
                return

    def _metrics_instead(self, row: dict) -> None:
        """The backend has no training-metrics route: the row's numbers go out one `metrics` post each."""
        for name, value in row["extra_metrics"].items():
            self.metric(name, value, row["epoch"], step=row["epoch"])

    def _append_event_log(self, method: str, route: str, body: dict) -> None:
        if self.event_log is None:
            return
        try:
            with self._log_lock:
                self.event_log.parent.mkdir(parents=True, exist_ok=True)
                with self.event_log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"method": method, "route": route, "body": body}) + "\n")
        except OSError as e:
            LOGGER.warning("cannot write event log %s: %s", self.event_log, e)

    def _next(self, now: float) -> Event | float:
        """The next event a sender may take, or how long to wait before one may be ready."""
        blocked = set(self._inflight)
        wait = math.inf
        for i, e in enumerate(self._queue):
            if e.barrier:  # the final status goes after every earlier status, and nothing else
                if e.sending or any(x.route == "status" for x in self._queue[:i]):
                    return wait
                if e.not_before <= now:
                    return e
                return min(wait, e.not_before - now)
            if e.key in blocked:
                continue
            blocked.add(e.key)
            if e.not_before <= now:
                return e
            wait = min(wait, e.not_before - now)
        return wait

    def _sender(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._closed and (self._unreachable or now >= self._deadline or not self._queue):
                        self._cond.notify_all()
                        return
                    got = self._next(now)
                    if isinstance(got, Event):
                        break
                    timeout = min(got, self._deadline - now) if self._closed else got
                    self._cond.wait(None if timeout == math.inf else max(timeout, 0.001))
                event = got
                event.sending = True
                self._inflight.add(event.key)
            delay = self._attempt(event)
            with self._cond:
                event.sending = False
                self._inflight.discard(event.key)
                if delay is None:
                    if event in self._queue:  # close() may have given up on the queue meanwhile
                        self._queue.remove(event)
                else:
                    event.not_before = time.monotonic() + delay
                self._cond.notify_all()

    # -- one attempt ----------------------------------------------------------------------------

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.settings.token:
            headers["X-Internal-Auth"] = self.settings.token
        return headers

    def _http(self):
        """One requests session per thread (sessions are not thread-safe)."""
        if getattr(self._local, "session", None) is None:
            import requests

            self._local.session = requests.Session()
        return self._local.session

    def _disable(self, route: str) -> None:
        if route not in self._disabled_routes:
            self._disabled_routes.add(route)
            LOGGER.warning("backend has no %s route (404): not sending to it again", route)

    def _attempt(self, event: Event) -> float | None:
        """Send once. None when the event is done with (sent or given up), else seconds to wait."""
        import requests

        if event.route in self._disabled_routes:  # switched off by a 404 since it was queued
            if event.route == "training-metrics":
                self._metrics_instead(event.body)
            return None
        event.attempts += 1
        retry_after = None
        try:
            # verify per request: a session's verify loses to REQUESTS_CA_BUNDLE in the environment
            response = self._http().request(
                event.method, f"{self.settings.url}/{event.route}", json=event.body, headers=self._headers(),
                timeout=(self.settings.connect_timeout, self.settings.timeout), verify=self.settings.verify)
            code = response.status_code
            if code < 400:
                if event.on_success:
                    try:
                        event.on_success(response)
                    except Exception as e:  # the event itself was delivered: never send it again
                        LOGGER.warning("after %s %s: %s: %s", event.method, event.route, type(e).__name__, e)
                return None
            if code == 404:
                self._disable(event.route)
                if event.route == "training-metrics":
                    self._metrics_instead(event.body)
                return None
            if code not in RETRY_STATUSES:
                if (event.route, code) not in self._warned:
                    self._warned.add((event.route, code))
                    hint = " (check INTERNAL_AUTH_TOKEN)" if code in (401, 403) else ""
                    if code == 422:
                        hint = " (the body does not match the backend's schema; numbers of this route are lost)"
                    LOGGER.error("backend rejected %s %s with %d%s: %s", event.method, event.route, code, hint,
                                 self.redact(_refusal_detail(response)))
                return None
            retry_after = _retry_after(response.headers.get("Retry-After"))
            problem = f"HTTP {code}"
        except (requests.ConnectionError, requests.Timeout) as e:
            if _refused(e):
                event.refusals += 1
                if self._closed and event.refusals >= 2:  # refused again at exit: nothing listens there
                    self._unreachable = True
                    LOGGER.warning("backend refuses connections at exit: not waiting for it")
                    return 0.0
                if self._closed:
                    return 0.2  # one quick retry: a restarting backend or a lost race, not yet "down"
            problem = type(e).__name__
        except Exception as e:
            problem = type(e).__name__
        if not event.critical and event.attempts >= self.settings.max_attempts:
            LOGGER.warning("giving up on %s %s after %d attempts (%s)", event.method, event.route, event.attempts, problem)
            return None
        backoff = random.uniform(0, min(self.BACKOFF_CAP, self.BACKOFF_BASE * 2 ** (event.attempts - 1)))
        LOGGER.debug("%s %s failed (%s), retrying in %.1f s", event.method, event.route, problem, backoff)
        return max(backoff, retry_after or 0.0)

    def close(self, timeout: float | None = None) -> int:
        """Deliver what is queued for up to `timeout` seconds, then stop. Returns events left unsent."""
        if not self._threads:
            return 0
        timeout = self.settings.flush_timeout if timeout is None else timeout
        with self._cond:
            self._closed = True
            self._deadline = time.monotonic() + timeout
            for e in self._queue:
                e.not_before = 0.0  # one more try now, whatever the backoff said
            self._cond.notify_all()
        for t in self._threads:
            t.join(max(0.0, self._deadline - time.monotonic()) + 0.05)
        with self._cond:
            left = [e for e in self._queue if not e.sending]
            inflight = len(self._queue) - len(left)
            self._queue = [e for e in self._queue if e.sending]  # a sender still owns these
        if left:
            LOGGER.warning("%d callback event(s) not delivered; they are in the event log", len(left))
        if inflight:
            LOGGER.warning("%d callback event(s) still in flight at exit", inflight)
        return len(left)


def _refused(error: BaseException) -> bool:
    """True only when the connection was actively refused (ECONNREFUSED): a reset, a dropped keep-alive,
    a timeout or a TLS failure is a fault worth retrying, not a backend that is down."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED:
            return True
        if "Connection refused" in str(error) and "NewConnectionError" in type(error).__name__:
            return True
        nested = [a for a in getattr(error, "args", ()) if isinstance(a, BaseException)]
        error = error.__cause__ or error.__context__ or getattr(error, "reason", None) or (nested[0] if nested else None)
    return False


def _answer_field(response, *names: str) -> Any:
    """The first of names in a JSON object answer, or None."""
    try:
        answer = response.json()
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    return next((answer[n] for n in names if answer.get(n) is not None), None)


def _refusal_detail(response) -> str:
    """A refusal's reason: FastAPI's `detail` list as `field: message; ...`, else the text (shortened)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail[:10]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where or 'body'}: {item.get('msg', item)}")
        return "; ".join(parts)[:1000]
    return str(detail if detail is not None else response.text)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(float(value), 300.0)
    except ValueError:
        try:
            when = dt.datetime.strptime(value, "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=dt.timezone.utc)
            return max(0.0, min((when - dt.datetime.now(dt.timezone.utc)).total_seconds(), 300.0))
        except ValueError:
            return None


# ----------------------------------------------------------------------------------------------
# 6. Datasets and weights
# ----------------------------------------------------------------------------------------------

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".dng", ".mpo", ".pfm", ".heic"}


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def extract_archive(archive: Path, dest: Path, max_bytes: int = 10**14, max_files: int = 10**8) -> Path:
    """Extract a zip or tar archive into dest, treating every entry as hostile.

    Every entry is checked before anything is written: a path that would land outside dest
    ('..', absolute, a drive letter, backslash tricks) refuses the archive; so does a name the
    file system cannot hold (a part over 255 bytes), a name used both as a file and as a folder,
    and a zip entry that cannot be read (encrypted, or compressed with a method such as Deflate64
    that Python lacks). The entry count (files and folders) and the declared uncompressed total
    must be within the caps (DATASET_MAX_FILES, DATASET_MAX_BYTES) and fit on the disk. Links,
    devices and other special entries are skipped with a warning. While writing, the real byte
    count is enforced too, so an archive whose headers understate its size (a zip bomb) stops at
    the cap; an entry that still fails to be written is a bad-input error naming it.
    """
    import gzip
    import lzma

    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                if len(infos) > max_files:
                    raise BadInput(f"{archive.name} holds {len(infos)} entries (files and folders), more than "
                                   f"DATASET_MAX_FILES={max_files}")
                entries = [(info, info.filename, safe_target(root, info.filename), _zip_kind(info)) for info in infos]
                _check_entries(archive, root, entries)
                _check_caps(archive, dest, [i.file_size for i, _, _, kind in entries if kind == "file"], max_bytes)
                budget = _Budget(archive, max_bytes)
                for info, name, target, kind in entries:
                    with _writing(archive, name):
                        if kind == "dir":
                            target.mkdir(parents=True, exist_ok=True)
                        elif kind == "file":
                            with zf.open(info) as src:
                                budget.copy(src, target)
                        else:
                            LOGGER.warning("skipping %s in %s: a %s", name, archive.name, kind)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _tar_members(tf, archive, max_files)  # every header, before anything is written
                entries = [(m, m.name, safe_target(root, m.name), _tar_kind(m)) for m in members]
                _check_entries(archive, root, entries)
                _check_caps(archive, dest, [m.size for m, _, _, kind in entries if kind == "file"], max_bytes)
                budget = _Budget(archive, max_bytes)
                for member, name, target, kind in entries:
                    with _writing(archive, name):
                        if kind == "dir":
                            target.mkdir(parents=True, exist_ok=True)
                        elif kind == "file":
                            with tf.extractfile(member) as src:
                                budget.copy(src, target)
                        else:
                            LOGGER.warning("skipping %s in %s: a %s", name, archive.name, kind)
        else:
            raise BadInput(f"{archive.name} is not a zip or tar archive")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            gzip.BadGzipFile, lzma.LZMAError) as e:
        raise BadInput(f"{archive.name} is corrupt or truncated: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """file, dir, link or special file; many tools write no Unix file type at all (plain files)."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "link"
    if info.is_dir():
        return "dir"
    if kind not in (0, stat.S_IFREG):
        return "special file"
    return "file"


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.isfile():
        return "file"
    return "link" if member.issym() or member.islnk() else "special file"


def _tar_members(tf: tarfile.TarFile, archive: Path, max_files: int) -> list[tarfile.TarInfo]:
    """Every header of a tar, stopping as soon as there are more than max_files (each costs memory)."""
    members = []
    for member in tf:
        members.append(member)
        if len(members) > max_files:
            raise BadInput(f"{archive.name} holds more than DATASET_MAX_FILES={max_files} entries (files and folders)")
    return members


# Compression methods Python's zipfile reads; others (Deflate64, which Windows Explorer writes for
# large files, Implode, PPMd...) would fail mid-extraction.
ZIP_READABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
ZIP_METHOD_NAMES = {6: "Implode", 9: "Deflate64", 10: "PKWARE Implode", 93: "Zstandard", 95: "XZ", 96: "JPEG",
                    97: "WavPack", 98: "PPMd", 99: "AES encryption"}
NAME_MAX = 255  # bytes in one path part, on every common Linux file system
PATH_MAX = 4096


def _check_entries(archive: Path, root: Path, entries: list[tuple[Any, str, Path, str]]) -> None:
    """Refuse, before anything is written, an archive with an entry that could not be extracted."""
    files: dict[Path, str] = {}
    folders: set[Path] = set()
    for info, name, target, kind in entries:
        if kind not in ("file", "dir"):
            continue  # skipped: never written
        problem = _name_problem(target)
        if not problem and kind == "file" and isinstance(info, zipfile.ZipInfo):
            problem = _zip_problem(info)
        if problem:
            raise BadInput(f"{archive.name}: entry {_short(name)} {problem}")
        if kind == "file":
            files.setdefault(target, name)
        _add_folders(folders, root, target if kind == "dir" else target.parent)
    clash = next((target for target in files if target in folders), None)
    if clash is not None:
        raise BadInput(f"{archive.name}: entry {_short(files[clash])} is a file, but other entries use it as a folder")


def _add_folders(folders: set[Path], root: Path, folder: Path) -> None:
    """Add folder and its parents up to root; a folder already there has its parents there too."""
    while folder != root and root in folder.parents and folder not in folders:
        folders.add(folder)
        folder = folder.parent


def _name_problem(target: Path) -> str | None:
    longest = max((len(os.fsencode(part)) for part in target.parts), default=0)
    if longest > NAME_MAX:
        return f"has a name part of {longest} bytes; file systems allow {NAME_MAX}"
    if len(os.fsencode(str(target))) >= PATH_MAX:
        return f"has a path longer than {PATH_MAX} bytes once extracted"
    return None


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return "is encrypted: the trainer cannot decrypt it (re-create the archive without a password)"
    if info.compress_type not in ZIP_READABLE:
        method = ZIP_METHOD_NAMES.get(info.compress_type, f"number {info.compress_type}")
        return (f"is compressed with {method}, which cannot be read (re-create the archive with standard "
                "Deflate, e.g. `zip -r` or 7-Zip's Deflate method)")
    return None


def _short(name: str, limit: int = 80) -> str:
    """An entry name for a message: quoted, and cut short if very long."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


@contextlib.contextmanager
def _writing(archive: Path, name: str):
    """An entry that fails to be written despite the checks: bad input naming it, unless the disk is full."""
    import errno
    import gzip

    try:
        yield
    except gzip.BadGzipFile:
        raise  # the archive itself is corrupt: the caller says so
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransientError(f"the disk filled up while extracting {archive.name} ({e.strerror})") from None
        raise BadInput(f"{archive.name}: entry {_short(name)} cannot be extracted: {e.strerror or e}") from None
    except (NotImplementedError, RuntimeError) as e:  # zipfile: an unsupported method, encryption
        raise BadInput(f"{archive.name}: entry {_short(name)} cannot be extracted: {e}") from None


def _check_caps(archive: Path, dest: Path, sizes: list[int], max_bytes: int) -> None:
    total = sum(sizes)
    if total > max_bytes:
        raise BadInput(f"{archive.name} expands to {human_size(total)}, more than DATASET_MAX_BYTES={max_bytes}")
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if total > free:
        raise TransientError(f"{archive.name} expands to {human_size(total)} but only {human_size(free)} "
                             f"is free in {dest.parent}")


class _Budget:
    """Counts the bytes really written while extracting, against DATASET_MAX_BYTES."""

    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.left = archive, max_bytes

    def copy(self, src, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                self.left -= len(chunk)
                if self.left < 0:
                    raise BadInput(f"{self.archive.name} expands beyond DATASET_MAX_BYTES "
                                   "(its headers understate its size)")
                out.write(chunk)


def safe_target(root: Path, name: str) -> Path:
    """Where an archive entry would land; refuses any that would land outside root."""
    name = name.replace("\\", "/")  # Windows tools write backslashes; they must not hide a '..'
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise BadInput(f"archive entry {name!r} has an absolute path")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise BadInput(f"archive entry {name!r} points outside the dataset folder")
    return target


def find_dataset_root(folder: Path) -> Path:
    """The folder holding data.yaml (or train/ for classification): folder itself or its one top folder."""
    candidates = [folder]
    children = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir():
        candidates.append(children[0])
    for c in candidates:
        if any((c / n).is_file() for n in ("data.yaml", "data.yml")):
            return c
    for c in candidates:
        if (c / "train").is_dir():
            return c
    raise BadInput("the dataset has no data.yaml (at its root or in its one top folder) "
                   "and no train/ folder for classification")


def resolve_data_yaml(root: Path, out: Path, val_fraction: float = 0.1) -> tuple[Path, dict]:
    """Rewrite root's data.yaml with absolute paths into out, so Ultralytics never looks elsewhere.

    Split entries may be folders, .txt lists of images or lists of either; paths may be
    relative to `path`, to the list file, or absolute paths written on another machine (mapped
    into the dataset by their longest existing tail). Lists are rewritten next to out with
    absolute paths. Without a val entry, a deterministic share of the train images becomes the
    validation split (see split_off_validation). Returns the written file and its content.
    """
    import yaml

    src = next(root / n for n in ("data.yaml", "data.yml") if (root / n).is_file())
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"{src.name} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{src.name} must be a mapping with train, val and names")
    if not data.get("val") and data.get("validation"):
        data["val"] = data.pop("validation")  # some exporters write 'validation'
    if not data.get("train"):
        raise BadInput(f"{src.name} has no train entry")
    if data.get("names") is None and data.get("nc") is None:
        raise BadInput(f"{src.name} has neither names nor nc")
    base = _dataset_base(root, data.get("path"))
    out.parent.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test", "minival"):
        if data.get(split):
            data[split] = _rebase(base, root, data[split], split, out.parent)
    if not data.get("val"):
        data["train"], data["val"] = split_off_validation(data["train"], root, out.parent, val_fraction)
    data["path"] = str(base)
    data.pop("download", None)  # never let Ultralytics fetch anything
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out, data


def _dataset_base(root: Path, path: Any) -> Path:
    """data.yaml's `path`, resolved against the extracted folder whatever machine wrote it."""
    if not path or not isinstance(path, str):
        return root
    p = Path(path)
    if not p.is_absolute():
        candidate = (root / p).resolve()
        return candidate if candidate.is_dir() and (candidate == root or root in candidate.parents) else root
    return root  # an absolute path from the exporting machine means nothing here


def _locate(root: Path, value: str, *bases: Path) -> Path | None:
    """A path from data.yaml or a list file, found inside the dataset, or None.

    Relative paths are tried against each base in turn; absolute ones (POSIX or Windows, from the
    exporting machine) by their longest tail that exists in the dataset. Nothing outside root.
    """
    if re.match(r"^([A-Za-z]:)?[\\/]", value):
        parts = [p for p in re.split(r"[\\/]+", value) if p and not re.fullmatch(r"[A-Za-z]:", p)]
        tails = (root.joinpath(*parts[i:]) for i in range(len(parts)) if ".." not in parts[i:])
        return next((t for t in tails if t.exists()), None)
    value = value.replace("\\", "/")
    for base in bases:
        target = (base / value).resolve()
        if (target == root or root in target.parents) and target.exists():
            return target
    return None


def _rebase(base: Path, root: Path, value: Any, split: str, lists: Path) -> Any:
    if isinstance(value, list):
        rebased = [_rebase(base, root, v, f"{split}[{i}]", lists) for i, v in enumerate(value)]
        return rebased
    if not isinstance(value, str):
        raise BadInput(f"data.yaml {split} must be a path or a list of paths")
    # Ultralytics retries '../x' as 'x' below path; so do we.
    target = _locate(root, value, base) or (_locate(root, value[3:], base) if value.startswith("../") else None)
    if target is None:
        outside = not re.match(r"^([A-Za-z]:)?[\\/]", value) and root not in (base / value).resolve().parents
        raise BadInput(f"data.yaml {split}: {value} " + ("points outside the dataset" if outside
                                                         else "does not exist in the dataset"))
    if target.is_file() and target.suffix == ".txt":
        return str(_rewrite_list(target, base, root, lists / f"{split.replace('[', '-').rstrip(']')}.txt", split))
    return str(target)


def _rewrite_list(listed: Path, base: Path, root: Path, out: Path, split: str) -> Path:
    """A .txt list of images with every line made absolute (Ultralytics reads bare relative lines
    relative to its working directory, which would be wrong here)."""
    found, missing = [], []
    for line in listed.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            target = _locate(root, line, listed.parent, base, root)
            (found if target and target.is_file() else missing).append(str(target) if target else line)
    if missing:
        raise BadInput(f"data.yaml {split}: {listed.name} lists {len(missing)} image(s) that are not in the "
                       f"dataset, e.g. {', '.join(missing[:3])}")
    out.write_text("\n".join(found) + "\n", encoding="utf-8")
    return out


def _images_of(value: Any) -> list[Path]:
    """Every image of a resolved split entry (folders searched recursively, lists read)."""
    if isinstance(value, list):
        return [img for v in value for img in _images_of(v)]
    path = Path(value)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix == ".txt" and path.is_file():
        return [Path(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return []


def _validation_share(images: list[Path], root: Path, fraction: float) -> set[Path]:
    """The same images every time: those whose SHA-1 of their path inside the dataset sorts first."""
    ranked = sorted(images, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())
    return set(ranked[: max(1, round(len(ranked) * fraction))]) if len(ranked) > 1 else set()


def split_off_validation(train: Any, root: Path, lists: Path, fraction: float) -> tuple[str, str]:
    """A dataset with only a train split: VAL_FRACTION of its images (at least one) become val.

    The choice is deterministic (by hash of each image's path inside the dataset), so a resumed
    or repeated job validates on the same images. Writes train.txt and val.txt lists.
    """
    images = _images_of(train)
    val = _validation_share(images, root, fraction)
    if not val:
        raise BadInput("data.yaml has no val entry and train has too few images to split one off")
    LOGGER.info("no val split in data.yaml: %d of %d train images become the validation split", len(val), len(images))
    (lists / "train-split.txt").write_text("\n".join(str(p) for p in images if p not in val) + "\n", encoding="utf-8")
    (lists / "val-split.txt").write_text("\n".join(str(p) for p in sorted(val)) + "\n", encoding="utf-8")
    return str(lists / "train-split.txt"), str(lists / "val-split.txt")


def prepare_classification(root: Path, out: Path, fraction: float = 0.1) -> Path:
    """A classification folder as Ultralytics wants it. With train/ but neither val/ nor test/, a
    deterministic share of each class's images becomes val/ (symbolic links under out)."""
    if not (root / "train").is_dir() or (root / "val").is_dir() or (root / "test").is_dir():
        return root
    shutil.rmtree(out, ignore_errors=True)
    moved = 0
    for cls in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        images = sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        val = _validation_share(images, root, fraction)
        for image in images:
            link = out / ("val" if image in val else "train") / cls.name / image.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image)
        moved += len(val)
    LOGGER.info("no val/ folder: %d train images (%.0f%% of each class) become the validation split", moved,
                100 * fraction)
    return out


@dataclasses.dataclass(frozen=True)
class DatasetShape:
    """What a prepared dataset's layout and labels say about its task."""

    fits: frozenset[str]  # every task its labels are valid for; empty: nothing to tell
    task: str | None  # what the dataset alone suggests, used only when nothing explicit decides
    why: str

    @property
    def ambiguous(self) -> bool:
        return len(self.fits) > 1


def dataset_task(data: Path) -> DatasetShape:
    """The tasks a prepared dataset fits: a classification folder, kpt_shape, or a vote over its
    train label files.

    A label line of 9 values is both an oriented box and a 4-point polygon, so a dataset whose
    labels all have 9 values fits obb and segment alike. Its vote then goes by shape: an oriented
    box is a rotated rectangle, a parallelogram once normalised; a 4-point polygon drawn with a
    polygon tool usually is not. Any longer polygon makes the dataset a segmentation dataset.
    """
    import collections

    import yaml

    if data.is_dir():
        return DatasetShape(frozenset({"classify"}), "classify", "class folders without a data.yaml")
    cfg = yaml.safe_load(data.read_text(encoding="utf-8"))
    if cfg.get("kpt_shape"):
        return DatasetShape(frozenset({"pose"}), "pose", "data.yaml has kpt_shape")
    votes = collections.Counter(_label_file_shape(_label_path(image)) for image in _images_of(cfg.get("train")))
    votes.pop(None, None)
    quads = votes["rectangles"] + votes["quadrilaterals"]
    if votes["polygons"]:
        return DatasetShape(frozenset({"segment"}), "segment", "its labels are polygons")
    if quads:
        task = "segment" if votes["quadrilaterals"] > votes["rectangles"] else "obb"
        return DatasetShape(frozenset({"obb", "segment"}), task,
                            f"its labels have 9 values, which fit both oriented boxes and 4-point polygons; "
                            f"{votes['rectangles']} of {quads} label files hold only rotated rectangles")
    if votes["boxes"]:
        return DatasetShape(frozenset({"detect"}), "detect", "its labels are boxes (5 values)")
    return DatasetShape(frozenset(), None, "no labels to tell")


def _label_file_shape(label: Path) -> str | None:
    """One label file's vote: boxes, polygons, rectangles (9 values, all parallelograms),
    quadrilaterals (9 values, some not parallelograms), or None (no file, no labels, not text)."""
    counts: set[int] = set()
    skewed = False
    try:
        for _, line in label_lines(label) if label.is_file() else ():
            values = line.split() if line else []
            counts.add(len(values))
            if len(values) == 9 and not skewed:
                skewed = not _is_parallelogram(values[1:])
    except UnicodeDecodeError:
        return None
    if any(n >= 7 and n % 2 and n != 9 for n in counts):
        return "polygons"
    if 9 in counts:
        return "quadrilaterals" if skewed else "rectangles"
    return "boxes" if 5 in counts else None


def _is_parallelogram(coords: list[str], tolerance: float = 0.01) -> bool:
    """Whether 4 corners (x1 y1 ... x4 y4, in order) form a parallelogram: the diagonals share a midpoint."""
    try:
        x1, y1, x2, y2, x3, y3, x4, y4 = (float(v) for v in coords)
    except ValueError:
        return True  # not numbers: the dataset check says so; no vote either way
    return abs(x1 + x3 - x2 - x4) <= tolerance and abs(y1 + y3 - y2 - y4) <= tolerance


# -- dataset check ---------------------------------------------------------------------------


class DatasetReport:
    """Problems found in a dataset: the first SHOWN with file and line, then a count.

    Only the shown ones are kept: one broken label file of millions of lines must not hold
    millions of messages in memory.
    """

    SHOWN = 10

    def __init__(self):
        self.problems: list[str] = []  # the first SHOWN problems
        self.count = 0  # every problem found

    def add(self, where: str, what: str) -> None:
        self.count += 1
        if len(self.problems) < self.SHOWN:
            self.problems.append(f"{where}: {what}")

    def __bool__(self) -> bool:
        return self.count > 0

    def text(self) -> str:
        more = self.count - len(self.problems)
        return (f"dataset check found {self.count} problem(s):\n  - " + "\n  - ".join(self.problems)
                + (f"\n  - ... and {more} more" if more else ""))


def infer_task(model_name: str) -> str | None:
    """The task a model name implies (yolo11n-seg -> segment); None for a checkpoint file."""
    if model_name.endswith(".pt") or model_name.startswith("s3://"):
        return None
    stem = PurePosixPath(model_name).stem.lower()
    for suffix, task in (("-seg", "segment"), ("-cls", "classify"), ("-pose", "pose"), ("-obb", "obb")):
        if stem.endswith(suffix) or f"{suffix}-" in stem or f"{suffix}." in stem:
            return task
    return "detect"


def check_dataset(data: Path, task: str | None) -> DatasetReport:
    """Check a prepared dataset (a resolved data.yaml, or a classification folder) before training."""
    report = DatasetReport()
    if data.suffix in (".yaml", ".yml"):
        _check_yaml_dataset(data, task, report)
    else:
        _check_classification_dataset(data, report)
    return report


def _check_yaml_dataset(data_yaml: Path, task: str | None, report: DatasetReport) -> None:
    import yaml

    cfg = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    names, nc = cfg.get("names"), cfg.get("nc")
    if isinstance(names, dict):
        keys = sorted(names, key=str)
        if sorted(int(k) if str(k).isdigit() else -1 for k in keys) != list(range(len(keys))):
            report.add("data.yaml", f"names keys must be 0..{len(keys) - 1}, got {keys[:5]}")
    elif names is not None and not isinstance(names, list):
        report.add("data.yaml", "names must be a list or a mapping of class ids to names")
    if nc is not None and (not isinstance(nc, int) or nc < 1):
        report.add("data.yaml", f"nc must be a positive integer, got {nc!r}")
    elif nc is not None and names is not None and isinstance(names, (list, dict)) and nc != len(names):
        report.add("data.yaml", f"nc is {nc} but names lists {len(names)} classes")
    classes = len(names) if isinstance(names, (list, dict)) else (nc if isinstance(nc, int) else 0)
    kpt = cfg.get("kpt_shape")
    if task == "pose" and not (isinstance(kpt, list) and len(kpt) == 2 and kpt[1] in (2, 3) and kpt[0] >= 1):
        report.add("data.yaml", f"a pose dataset needs kpt_shape: [keypoints, 2 or 3], got {kpt!r}")
        kpt = None
    images_checked = []
    for split in ("train", "val"):
        images = _images_of(cfg.get(split))
        if not images:
            report.add(f"data.yaml {split}", f"no images found in {cfg.get(split)}")
        for image in images:
            label = _label_path(image)
            if label.is_file():
                _check_label_file(label, task, classes, kpt, report)
        images_checked.extend(images)
    _check_images(images_checked, report)


def _label_path(image: Path) -> Path:
    """Ultralytics' convention: the last /images/ becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


# A label line longer than this is refused unread (a polygon of 20,000 points is about 400 KB).
MAX_LABEL_LINE = 1 << 20


def label_lines(label: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of a label file, read line by line so memory stays flat whatever its
    size; the text is None for a line longer than MAX_LABEL_LINE characters, which is skipped.

    Raises:
        UnicodeDecodeError: the file is not UTF-8 text.
    """
    with label.open(encoding="utf-8", newline=None) as f:
        number = 0
        while line := f.readline(MAX_LABEL_LINE + 1):
            number += 1
            if len(line) > MAX_LABEL_LINE and not line.endswith("\n"):
                while (rest := f.readline(1 << 16)) and not rest.endswith("\n"):
                    pass  # skip to the end of the overlong line, a chunk at a time
                yield number, None
            else:
                yield number, line


def _check_label_file(label: Path, task: str | None, classes: int, kpt: list | None, report: DatasetReport) -> None:
    where = "/".join(label.parts[-3:])
    try:
        for number, line in label_lines(label):
            if line is None:
                report.add(f"{where} line {number}", f"is longer than {MAX_LABEL_LINE} characters")
            elif line.strip():
                problem = _label_problem(line.split(), task, classes, kpt)
                if problem:
                    report.add(f"{where} line {number}", problem)
    except UnicodeDecodeError:
        report.add(where, "is not a text file")


def _label_problem(values: list[str], task: str | None, classes: int, kpt: list | None) -> str | None:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return "has a value that is not a number"
    n = len(numbers)
    if task == "obb" and n != 9:
        return f"has {n} values; an oriented box is: class x1 y1 x2 y2 x3 y3 x4 y4"
    if task == "pose" and kpt and n != 5 + kpt[0] * kpt[1]:
        return f"has {n} values; a pose label is: class x y w h and {kpt[0]} keypoints of {kpt[1]} values"
    if task == "segment" and (n < 7 or n % 2 == 0):
        return f"has {n} values; a segment label is: class and at least 3 x y points"
    if task in (None, "detect") and n != 5 and (n < 7 or n % 2 == 0):
        return f"has {n} values; a box label is: class x_center y_center width height"
    cls = numbers[0]
    if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls < max(classes, 1):
        return f"class {values[0]} is out of range (the dataset has {classes} classes: 0..{classes - 1})"
    coords = numbers[1:]
    if task == "pose" and kpt and kpt[1] == 3:  # every third keypoint value is a visibility flag
        coords = numbers[1:5] + [v for i, v in enumerate(numbers[5:]) if i % 3 != 2]
    bad = next((v for v in coords if not (math.isfinite(v) and 0.0 <= v <= 1.0)), None)
    if bad is not None:
        return f"coordinate {bad:g} is outside [0, 1] (labels are normalised to the image size)"
    return None


def _check_images(images: list[Path], report: DatasetReport) -> None:
    """Every image opens and is at least 10x10 pixels (what Ultralytics requires)."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(path: Path) -> str | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
                width, height = im.size
        except Exception as e:
            return f"cannot be read as an image ({type(e).__name__})"
        return "is smaller than 10x10 pixels" if min(width, height) < 10 else None

    with ThreadPoolExecutor(8) as pool:
        for path, found in zip(images, pool.map(problem, images)):
            if found:
                report.add("/".join(path.parts[-3:]), found)


def _check_classification_dataset(root: Path, report: DatasetReport) -> None:
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" not in splits:
        report.add(str(root.name), "a classification dataset needs a train/ folder of class folders")
        return
    if "val" not in splits and "test" not in splits:
        report.add(str(root.name), "a classification dataset needs a val/ (or test/) folder of class folders")
    train_classes = {p.name for p in splits["train"].iterdir() if p.is_dir()}
    if not train_classes:
        report.add("train/", "has no class folders")
    images = []
    for split, folder in splits.items():
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            found = sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found and split == "train":
                report.add(f"{split}/{cls.name}/", "has no images")
            if split != "train" and cls.name not in train_classes:
                report.add(f"{split}/{cls.name}/", "is a class that train/ does not have")
            images.extend(found)
    _check_images(images, report)


# ----------------------------------------------------------------------------------------------
# 7. Ultralytics set-up
# ----------------------------------------------------------------------------------------------


def prepare_ultralytics(work_dir: Path) -> None:
    """Keep Ultralytics offline and inside the work folder; call before importing ultralytics.

    Its settings file lives in YOLO_CONFIG_DIR and matplotlib's cache in MPLCONFIGDIR (default:
    the work folder, so nothing is written outside it), analytics and its
    own MLflow callback are off (the trainer owns the MLflow run), and the fonts it would
    download for plots are provided from matplotlib's bundled DejaVu Sans.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work_dir / "ultralytics"))
    os.environ.setdefault("MPLCONFIGDIR", str(work_dir / "matplotlib"))  # its font cache, not in $HOME
    config_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    config_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (config_dir / name).exists() and font.is_file():
            shutil.copyfile(font, config_dir / name)

    from ultralytics import settings
    from ultralytics.utils import LOGGER as UL_LOGGER

    settings.update({
        "sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False, "wandb": False,
        "tensorboard": False, "raytune": False, "datasets_dir": str(work_dir / "datasets"),
        "weights_dir": str(work_dir / "weights"), "runs_dir": str(work_dir / "runs"),
    })
    UL_LOGGER.handlers.clear()  # route Ultralytics' messages through our stderr handler and redaction
    UL_LOGGER.propagate = True


def default_device() -> str:
    """The first GPU when there is one, else the CPU (DEVICE unset)."""
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def available_cpus() -> int:
    """CPUs this process may use: affinity, then the cgroup quota a Kubernetes limit sets."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
