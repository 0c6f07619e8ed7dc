"""The job's configuration: `load_settings(environ)` turns an environment (the variables of
variables.py) into one frozen Settings, or raises one ConfigError listing every problem at once.

Owns: the storage layout keys (datasets/, models/, checkpoints/job-{JOB_ID}/), the task names (the
platform's, Ultralytics' and the short forms), and where a job's local files go (`job_dir`).
Environment: all of variables.ENV_VARS (see docs/contract.md, "Configuration").
Imports: utils, variables.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import tempfile
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from utils import ConfigError, is_secret_name
from variables import ENV_VARS

LOGGER = logging.getLogger("trainer")

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


ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
LEGACY_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")  # botocore's own check (older us-east-1 names)




# Ultralytics' export formats (its export_formats() "Argument" column, less the PyTorch '-'; a test keeps
# them in step) and the other names it accepts for some of them.
EXPORT_FORMAT_NAMES = ("torchscript", "onnx", "openvino", "engine", "coreml", "coreai", "saved_model", "pb", "edgetpu",
                       "litert", "paddle", "mnn", "ncnn", "imx", "rknn", "executorch", "axelera", "deepx", "qnn",
                       "hailo", "ascend", "xilinx")
EXPORT_FORMAT_ALIASES = {"tensorrt": "engine", "trt": "engine", "tflite": "litert", "mlpackage": "coreml"}


def log_configuration(settings: "Settings") -> None:
    """The effective configuration, once, secrets masked; a loud warning if TLS checks are off."""
    LOGGER.info("configuration: %s", json.dumps(settings.describe(), sort_keys=True))
    if settings.storage.verify is False:
        LOGGER.warning("TLS certificate verification is OFF (TLS_VERIFY=false) for storage, backend and MLflow")




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
    progress_interval: float = 5.0  # seconds between a long transfer's progress lines; 0 = none


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
    export_formats: tuple[str, ...]  # Ultralytics format names, e.g. ("onnx", "torchscript"); () = none
    export_output_uri: str | None  # export.py: storage prefix for the exported files
    export_verify_images: int  # images each export is compared with the checkpoint on
    mlflow_log_model: bool  # log the trained model as an MLflow pyfunc model
    registered_model_name: str | None  # register that model under this name
    evaluate_test: bool  # train.py: evaluate best.pt on the dataset's test split too
    storage: StorageSettings
    backend: BackendSettings
    predict_shards: int = 1  # PREDICT_SHARDS: the input is split into this many shards
    predict_shard: int | None = None  # JOB_COMPLETION_INDEX: this run's shard; None = every image

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
    """Build the settings of train.py (entry='train'), predict.py ('predict'), export.py ('export') or
    evaluate.py ('evaluate').

    Args:
        environ: the environment (a plain dict in tests).
        entry: which entry point the settings are for: it decides what is required (JOB_ID for train;
            a dataset for train and evaluate; CHECKPOINT_URI or JOB_ID for predict, export and
            evaluate; INPUT_URI for predict; EXPORT_FORMATS for export).
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
    if entry in ("train", "evaluate") and not dataset_uri:
        env.problems.append("DATASET_ID (or DATASET_URI) is required")

    epochs = env.number("EPOCHS", int, 1, 100_000, "an integer >= 1")
    known = len(env.problems)
    batch = env.number("BATCH_SIZE", float, -1, 100_000, "an integer >= 1, -1 for AutoBatch, or a GPU memory fraction in (0, 1)")
    if len(env.problems) == known and batch not in (-1,) and not (0 < batch < 1) and (batch < 1 or batch != int(batch)):
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
    env.flag("TLS_VERIFY")  # validated here once; tls_verify applies it
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
    if entry in ("predict", "export", "evaluate") and not checkpoint_uri:
        if job_id:
            checkpoint_uri = CHECKPOINT_PREFIX.format(job_id=job_id) + "best.pt"
        else:
            env.problems.append("CHECKPOINT_URI (or JOB_ID, for that job's best.pt) is required")
    input_uri = env.reference("INPUT_URI", required=entry == "predict")
    shards, shard = _predict_shard(env) if entry == "predict" else (1, None)
    log_format = (env.str("LOG_FORMAT") or "").lower()
    if log_format not in ("text", "json"):
        env.problems.append(f"LOG_FORMAT={log_format!r} must be text or json")

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
        predict_output_uri=_output_prefix(env, "PREDICT_OUTPUT_URI"),
        predict_save_images=env.flag("PREDICT_SAVE_IMAGES"),
        export_formats=_export_formats(env, required=entry == "export"),
        export_output_uri=_output_prefix(env, "EXPORT_OUTPUT_URI"),
        export_verify_images=env.number("EXPORT_VERIFY_IMAGES", int, 0, 1000, "an integer from 0 to 1000 (0 = load only)"),
        mlflow_log_model=env.flag("MLFLOW_LOG_MODEL"),
        registered_model_name=_registered_model_name(env),
        evaluate_test=env.flag("EVALUATE_TEST"),
        storage=_storage_settings(env),
        backend=backend_settings(env),
        predict_shards=shards,
        predict_shard=shard,
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


def _output_prefix(env: _Env, name: str) -> str | None:
    value = env.reference(name)
    if value and not value.endswith("/"):
        value += "/"  # a prefix: predictions.json and images/ (or the exported files) go under it
    return value


def _export_formats(env: _Env, required: bool) -> tuple[str, ...]:
    """EXPORT_FORMATS as Ultralytics format names, in order, without repeats; every bad name in one problem."""
    raw = env.str("EXPORT_FORMATS", required=required) or ""
    formats, bad = [], []
    for name in (n.strip().lower() for n in raw.split(",")):
        if not name:
            continue
        name = EXPORT_FORMAT_ALIASES.get(name, name)
        if name not in EXPORT_FORMAT_NAMES:
            close = difflib.get_close_matches(name, EXPORT_FORMAT_NAMES, n=1)
            bad.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif name not in formats:
            formats.append(name)
    if bad:
        env.problems.append(f"EXPORT_FORMATS: {', '.join(bad)} {'is not an export format' if len(bad) == 1 else 'are not export formats'}; "
                            f"known: {', '.join(EXPORT_FORMAT_NAMES)} (also {', '.join(EXPORT_FORMAT_ALIASES)})")
    return tuple(formats)


def _registered_model_name(env: _Env) -> str | None:
    """A name MLflow's Model Registry accepts (no '/' or ':', which would break models:/NAME/VERSION)."""
    value = env.str("MLFLOW_REGISTERED_MODEL_NAME")
    if value and (len(value) > 256 or re.search(r"[/:\x00-\x1f\x7f]", value)):
        env.problems.append(f"MLFLOW_REGISTERED_MODEL_NAME={value!r} must be at most 256 characters without '/', ':' "
                            "or control characters")
    return value


def _predict_shard(env: _Env) -> tuple[int, int | None]:
    """PREDICT_SHARDS and this pod's JOB_COMPLETION_INDEX (set by Kubernetes in an Indexed Job)."""
    shards = env.number("PREDICT_SHARDS", int, 1, 1_000_000, "an integer >= 1")
    if not env.str("JOB_COMPLETION_INDEX"):
        if shards > 1:
            env.problems.append(f"PREDICT_SHARDS={shards} needs JOB_COMPLETION_INDEX (0 to {shards - 1}), "
                                "which Kubernetes sets in an Indexed Job")
        return shards, None
    if shards < 1:  # already reported: the index cannot be checked against it
        return shards, env.number("JOB_COMPLETION_INDEX", int, 0, None, "an integer >= 0")
    index = env.number("JOB_COMPLETION_INDEX", int, 0, shards - 1, f"0 to PREDICT_SHARDS - 1 = {shards - 1}")
    return shards, index


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


def tls_verify(env: _Env) -> bool | str:
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
              "verify": tls_verify(env),
              "progress_interval": env.number("PROGRESS_INTERVAL", float, 0, 3600, "seconds from 0 to 3600 (0 = none)")}
    if kind == "minio":
        endpoint = _endpoint(env, "MINIO_ENDPOINT", "http")  # MinIO SDK style host:port is http://
        return StorageSettings("minio", _bucket(env, "STORAGE_BUCKET"), endpoint, env.str("MINIO_ACCESS_KEY", required=True),
                               env.str("MINIO_SECRET_KEY", required=True), "us-east-1", **common)
    if kind == "r2":
        name = "R2_BUCKET" if env.str("R2_BUCKET") else "STORAGE_BUCKET"
        return StorageSettings("r2", _bucket(env, name), _endpoint(env, "R2_ENDPOINT", "https", required=True),
                               env.str("R2_ACCESS_KEY_ID", required=True), env.str("R2_SECRET_ACCESS_KEY", required=True),
                               "auto", **common)
    if kind == "s3":  # AWS: credentials, region and endpoint come from boto3's usual AWS_* chain
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # boto3's own variables: checked, not taken
            if value := (env.environ.get(name) or "").strip():
                _url(env, name, value, None)
        return StorageSettings("s3", _bucket(env, "STORAGE_BUCKET", legacy=True), **common)
    if kind == "local":
        return StorageSettings("local", bucket, local_dir=Path(env.str("LOCAL_STORAGE_DIR")).expanduser().resolve(), **common)
    env.problems.append(f"STORAGE_TYPE={kind!r} must be one of {', '.join(STORAGE_TYPES)}")
    return StorageSettings("local", bucket or "")


def _bucket(env: _Env, name: str, legacy: bool = False) -> str:
    """A bucket name the store accepts: 3-63 lowercase letters, digits, dots and hyphens (MinIO, R2,
    S3 today); with `legacy` (AWS), also the older us-east-1 names botocore still takes (upper case,
    underscores). botocore refuses others before sending anything, which read as storage unreachable."""
    bucket = env.str(name) or ""
    if not (S3_BUCKET.fullmatch(bucket) or (legacy and LEGACY_BUCKET.fullmatch(bucket))):
        env.problems.append(f"{name}={bucket!r} is not a bucket name: 3 to 63 lowercase letters, digits, dots and "
                            "hyphens, starting and ending with a letter or digit")
    return bucket


def _endpoint(env: _Env, name: str, scheme: str | None, required: bool = False) -> str | None:
    """An http(s) endpoint URL; host:port gets `scheme://` (None: the scheme is required). What boto3
    would refuse when it makes its client (an exit 1 with a traceback) is a configuration problem."""
    value = env.str(name, required=required)
    return _url(env, name, value, scheme) if value else value


def _url(env: _Env, name: str, value: str, scheme: str | None) -> str:
    url = value if "://" in value or scheme is None else f"{scheme}://{value}"
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if not (parts and parts.scheme in ("http", "https") and parts.hostname and port_ok and not parts.query
            and not parts.fragment):
        shown = re.sub(r"//[^/@]*@", "//***@", value)  # credentials in the URL stay out of the message
        env.problems.append(f"{name}={shown!r} must be an http:// or https:// URL with a host "
                            "(host:port alone means " + (f"{scheme}://" if scheme else "nothing here: give the scheme")
                            + "), without a query")
    return url


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
        verify=tls_verify(env),
    )


def job_dir(settings: Settings) -> Path:
    return settings.work_dir / "jobs" / f"job-{settings.job_id}"
