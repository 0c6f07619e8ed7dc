"""Ultralytics set-up and the model a job trains: offline mode and settings kept in WORK_DIR,
TRAIN_ARGS checked by Ultralytics' own rules, the task settled between TASK_TYPE, the model and
the dataset, and MODEL_NAME resolved to a config, a checkpoint or pretrained weights.

Environment (through Settings): MODEL_NAME, TASK_TYPE, TRAIN_ARGS, PRETRAINED_PREFIX,
WEIGHTS_DOWNLOAD, DEVICE, WORK_DIR; it sets YOLO_OFFLINE, YOLO_CONFIG_DIR and MPLCONFIGDIR when
they are not set.
Imports: utils, config, storage, dataset_check, cache.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import traceback
from pathlib import Path, PurePosixPath

import cache
from config import Settings
from dataset_check import dataset_task
from storage import Storage, StorageNotFound, fetch_file
from utils import BadInput, ConfigError, TransientError

LOGGER = logging.getLogger("trainer")

def infer_task(model_name: str) -> str | None:
    """The task a model name implies (yolo11n-seg -> segment); None for a checkpoint file."""
    if model_name.endswith(".pt") or model_name.startswith("s3://"):
        return None
    stem = PurePosixPath(model_name).stem.lower()
    for suffix, task in (("-seg", "segment"), ("-cls", "classify"), ("-pose", "pose"), ("-obb", "obb")):
        if stem.endswith(suffix) or f"{suffix}-" in stem or f"{suffix}." in stem:
            return task
    return "detect"


def offline_environment(work_dir: Path) -> None:
    """Ultralytics' environment, set before anything imports it (or torch.load unpickles a model):
    offline, no pip installs at run time, its settings file in YOLO_CONFIG_DIR and matplotlib's and
    torch's caches in the work folder (so nothing is written outside it). Variables already set win."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # never pip-install at run time (an exporter package, say)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work_dir / "ultralytics"))
    os.environ.setdefault("MPLCONFIGDIR", str(work_dir / "matplotlib"))  # its font cache, not in $HOME
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work_dir / "torchinductor"))  # not /tmp/torchinductor_<user>


def prepare_ultralytics(work_dir: Path) -> None:
    """Import Ultralytics kept offline and inside the work folder (`offline_environment`), with its
    analytics and its own MLflow callback off (the trainer owns the MLflow run), its messages
    routed through the trainer's logging, and the fonts it would download for plots provided from
    matplotlib's bundled DejaVu Sans. Importing it (and torch) takes seconds: train.py does it on a
    helper thread while the job fetches its dataset.
    """
    offline_environment(work_dir)
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
    UL_LOGGER.setLevel(logging.NOTSET)  # LOG_LEVEL decides (Ultralytics sets its own logger to INFO)


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def ultralytics_refusal(error: BaseException) -> str | None:
    """The first line of an error Ultralytics raised itself, while setting up training, about the data
    or the arguments (no labels, a final batch of one image, a missing kpt_shape, its own dataset
    check), else None: what the job reports as bad input rather than as an unexpected error."""
    if not isinstance(error, (ValueError, FileNotFoundError, RuntimeError)):
        return None
    if isinstance(error, RuntimeError) and not str(error).startswith(("Dataset", "No valid images", "No images")):
        return None  # e.g. out of memory: not the input's fault
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or f"{os.sep}ultralytics{os.sep}" not in frames[-1].filename:
        return None
    lines = ANSI_CODES.sub("", str(error)).strip().splitlines()
    return lines[0] if lines else None


def ultralytics_message(error: BaseException, path: Path | None = None) -> str:
    """An Ultralytics error as one line for a status: its first line, without colour codes, the
    "ERROR ❌️" mark or the advice after it, and with `path` named by its file name alone."""
    lines = ANSI_CODES.sub("", str(error)).strip().splitlines() or [type(error).__name__]
    line = re.sub(r"^(ERROR|WARNING)\W*\s", "", lines[0]).strip()
    if path is not None:
        line = line.replace(str(path), path.name)
    return line[:300]


def default_device() -> str:
    """The first GPU when there is one, else the CPU (DEVICE unset)."""
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


# Which datasets each task trains on: detection also takes polygons (Ultralytics boxes them).
COMPATIBLE_DATA = {"detect": {"detect", "segment"}, "segment": {"segment"}, "pose": {"pose"}, "obb": {"obb"},
                   "classify": {"classify"}}


def resolve_task(settings: Settings, weights: str, data: Path) -> str:
    """TASK_TYPE, else the model's task, else the dataset's; a mismatch is a bad-input error.

    An explicit task (TASK_TYPE, or the model's) decides, and the dataset can only refuse a task
    its labels cannot be: labels of 9 values fit both obb and segment, so they never contradict
    either. The dataset's own vote decides only when nothing else does. An ambiguity is logged.
    """
    model_task = checkpoint_task(weights) if weights.endswith(".pt") else infer_task(weights)
    if settings.task and model_task and model_task != settings.task:
        raise BadInput(f"TASK_TYPE asks for {settings.task}, but MODEL_NAME={settings.model_name} is a {model_task} model")
    shape = dataset_task(data)
    task = settings.task or model_task or shape.task or "detect"
    if shape.fits and not shape.fits & COMPATIBLE_DATA[task]:
        raise BadInput(f"the dataset is a {' or '.join(sorted(shape.fits))} dataset ({shape.why}), but this job "
                       f"trains a {task} model (MODEL_NAME={settings.model_name}"
                       + (f", TASK_TYPE={settings.task})" if settings.task else ")"))
    if shape.ambiguous:
        decided_by = ("TASK_TYPE" if settings.task else f"MODEL_NAME={settings.model_name}" if model_task
                      else "the vote of its label files")
        level = logging.INFO if settings.task else logging.WARNING  # TASK_TYPE settles it: nothing to warn about
        LOGGER.log(level, "the dataset is ambiguous: %s (its own vote: %s); training %s as %s says%s", shape.why,
                   shape.task, task, decided_by, "" if settings.task else " (set TASK_TYPE to choose)")
    LOGGER.info("task: %s (model: %s, dataset: %s)", task, model_task or "any",
                " or ".join(sorted(shape.fits)) or "unknown")
    return task


def checkpoint_task(path: str) -> str | None:
    """The task a .pt checkpoint was trained for, or None if it cannot be read (YOLO() says why later)."""
    import torch
    from ultralytics.nn.tasks import guess_model_task

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        task = (ckpt.get("train_args") or {}).get("task") or guess_model_task(ckpt.get("ema") or ckpt["model"])
    except Exception:
        return None
    return task if task in COMPATIBLE_DATA else None


def ultralytics_argument_names() -> set[str]:
    """The training arguments Ultralytics knows: the keys of its cfg/default.yaml (what its
    DEFAULT_CFG_DICT is made of), read without importing Ultralytics and torch (about 3 s)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("ultralytics")  # a top-level package: found, not imported
    if spec is None or spec.origin is None:
        raise RuntimeError("Ultralytics is not installed")
    default = Path(spec.origin).parent / "cfg" / "default.yaml"
    return set(yaml.load(default.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def train_arg_name_problems(args: dict, work_dir: Path | None = None) -> list[str]:
    """TRAIN_ARGS keys Ultralytics does not know, with the closest names it does: checked with the
    configuration, before anything is downloaded (a misspelt key is the common mistake). `work_dir`
    is unused: the signature is load_settings' check_train_args'."""
    known = ultralytics_argument_names()
    problems = []
    for key in args:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"TRAIN_ARGS: {key!r} is not an Ultralytics training argument{hint}")
    return problems


def train_arg_value_problems(args: dict) -> list[str]:
    """TRAIN_ARGS values through Ultralytics' own check_cfg (types and ranges); needs Ultralytics
    imported (`prepare_ultralytics`). Unknown keys are `train_arg_name_problems`'."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    problems = []
    for key, value in args.items():
        if key in DEFAULT_CFG_DICT:
            try:
                check_cfg({key: value}, hard=True)
            except (TypeError, ValueError) as e:
                problems.append(f"TRAIN_ARGS: {e}")
    return problems


def ultralytics_arg_problems(args: dict, work_dir: Path) -> list[str]:
    """TRAIN_ARGS through Ultralytics' own checks at once: unknown keys (with suggestions), then
    types and ranges (`--check`; train.py checks the values beside the dataset's download)."""
    prepare_ultralytics(work_dir)
    return train_arg_name_problems(args) + train_arg_value_problems(args)


def prepare_training(settings: Settings) -> None:
    """train.py's helper-thread step: import Ultralytics (`prepare_ultralytics`), then check
    TRAIN_ARGS' values with it; raises ConfigError, as the configuration check would have."""
    prepare_ultralytics(settings.work_dir)
    if problems := train_arg_value_problems(settings.train_args):
        raise ConfigError(problems)


def resolve_model(storage: Storage, settings: Settings) -> str:
    """MODEL_NAME -> what YOLO() loads: a config name, or a local .pt/.yaml file."""
    name = settings.model_name
    if name.endswith((".yaml", ".yml")):
        if Path(name).expanduser().is_file() or name.startswith("s3://") or "/" in name:
            return str(fetch_file(storage, name, settings.work_dir))
        return name  # an Ultralytics model config such as yolo11n.yaml: train from scratch
    if name.startswith("s3://") or name.endswith(".pt"):
        try:
            return str(fetch_file(storage, name, settings.work_dir))
        except StorageNotFound:
            uri = storage.uri(storage.locate(name))
            raise BadInput(f"MODEL_NAME={name}: no local file and no storage object {uri}") from None
    return str(fetch_pretrained(storage, settings, name))


def fetch_pretrained(storage: Storage, settings: Settings, name: str) -> Path:
    """Pretrained weights by name: storage `models/{name}.pt`, then the local cache, then the internet."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"MODEL_NAME={name!r} is not a model name, a .yaml config, or a .pt checkpoint")
    cached = settings.work_dir / "weights" / f"{name}.pt"
    loc = storage.locate(f"{settings.pretrained_prefix}{name}.pt")
    with cache.refreshing(settings, cached):  # held for the job; one job at a time downloads it
        try:
            return storage.fetch(loc, cached)
        except StorageNotFound:
            pass
        except TransientError:
            if not cached.is_file():
                raise
            LOGGER.warning("storage unreachable; using cached %s", cached)
            return cached
        if cached.is_file():
            LOGGER.info("using local weights %s (not in %s)", cached, storage.uri(loc))
            return cached
        if settings.weights_download:
            LOGGER.info("%s.pt is not in storage or the cache; trying Ultralytics' download", name)
            try:
                from ultralytics.utils.downloads import attempt_download_asset

                attempt_download_asset(cached)
            except Exception as e:
                LOGGER.warning("download of %s.pt failed: %s", name, e)
            if cached.is_file():
                return cached
    raise BadInput(
        f"pretrained weights {name}.pt not found: not in {storage.uri(loc)}, not in {cached}"
        + (", and the internet download failed" if settings.weights_download else ", and WEIGHTS_DOWNLOAD is off")
        + f". Upload them once to {storage.uri(loc)} (see README, 'Pretrained weights').")
