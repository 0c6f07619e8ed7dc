"""The trained model in MLflow: a pyfunc model in the job's run and, when asked, a registered version.

Owns: logging best.pt as an MLflow pyfunc model (pyfunc_model.YoloPyfunc: `predict` takes images
and returns predict.py's records) into the job's run, with the trainer modules it needs as code,
the pinned requirements, a signature (a list of images in, a list of records out, as the predict
method's type hints say) and an input example; registering it under MLFLOW_REGISTERED_MODEL_NAME,
tagged with the job id, the task and the primary metric; and the final status's fields for it.
Any failure logs one warning and the job goes on: tracking never fails training.

Environment (through Settings): MLFLOW_LOG_MODEL, MLFLOW_REGISTERED_MODEL_NAME, MLFLOW_TRACKING_URI,
and IMGSZ, CONF_THRESHOLD, IOU_THRESHOLD, MAX_DET, PREDICT_BATCH as the model's prediction settings.
Imports: utils, config, validation; mlflow (about 2 s) inside the functions that log (`preload_mlflow`
imports it as training ends). pyfunc_model.py is not imported here: MLflow logs the file.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Callable

from config import PLATFORM_TASKS, Settings
from utils import in_background
from validation import primary_metric

LOGGER = logging.getLogger("trainer")

ROOT = Path(__file__).resolve().parent
ARTIFACT_NAME = "model"  # the logged model's name in the run


def log_trained_model(settings: Settings, tracker, weights: Path, task: str, metrics: dict,
                      should_stop: Callable[[], bool]) -> dict:
    """Log best.pt as a pyfunc model in the job's run (MLFLOW_LOG_MODEL, or implied by a registered
    name) and register it under MLFLOW_REGISTERED_MODEL_NAME.

    Returns the final status's fields: `mlflow_model_uri`, and `registered_model_name`,
    `registered_model_version` once registered. Never raises.
    """
    name = settings.registered_model_name
    if not logs_model(settings) or not tracker.run_id or not tracker.active or should_stop():
        return {}
    fields = {}
    try:
        info = log_pyfunc_model(settings, tracker.run_id, weights, task)
        fields["mlflow_model_uri"] = info.model_uri
        LOGGER.info("MLflow: logged the model as %s", info.model_uri)
        if name:
            version = register(info.model_uri, name, registry_tags(settings, tracker.run_id, task, metrics))
            fields.update(registered_model_name=name, registered_model_version=int(version))
            LOGGER.info("MLflow: registered %s version %s", name, version)
    except Exception as e:
        LOGGER.warning("MLflow: could not %s the model (%s); the job goes on without it",
                       "register" if fields else "log", tracker.redact(f"{type(e).__name__}: {e}")[:500])
    return fields


def logs_model(settings: Settings) -> bool:
    return bool(settings.mlflow_log_model or settings.registered_model_name)


_preloading: list = []


def preload_mlflow(settings: Settings) -> None:
    """Get MLflow ready to log the model, on a helper thread as training ends (train.py: once the
    last epoch is saved, beside the final validation), when the model is to be logged: import it
    (2-3 s of Python; the trainer's other MLflow calls are made in its helper process, tracking.py,
    so nothing has imported it in this one) and let it map the installed packages (`_warm_up`).
    Once per process; `log_pyfunc_model` waits for it."""
    if logs_model(settings) and not _preloading:
        _preloading.append(in_background(_warm_up))


def _warm_up() -> None:
    """Import MLflow, then build the map of installed packages its log_model reads to check the
    model's requirements against this environment (it lists every file of every installed package:
    1.4 s here), so that it is built before the model is logged rather than while. An MLflow without
    that function (it is internal to MLflow) builds the map itself when it needs it."""
    importlib.import_module("mlflow")
    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def log_pyfunc_model(settings: Settings, run_id: str, weights: Path, task: str):
    """mlflow.pyfunc.log_model into the run; returns MLflow's ModelInfo."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the job's log
    for preloading in _preloading:  # what it failed at is done here again, and fails here if it must
        with contextlib.suppress(Exception):
            preloading.result()
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    config = {"task": task, "imgsz": settings.imgsz, "conf": settings.conf, "iou": settings.iou,
              "max_det": settings.max_det, "batch": settings.predict_batch}
    with quiet_mlflow_warnings(), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=str(ROOT / "pyfunc_model.py"), artifacts={"weights": str(weights)},
            code_paths=[str(p) for p in shipped_modules()], pip_requirements=pinned_requirements(),
            signature=signature(), input_example=[example_image()], model_config=config)


@contextlib.contextmanager
def quiet_mlflow_warnings():
    """Keep two expected MLflow warnings out of the job's log (a clean job logs no warning):
    - that YoloPyfunc.predict's list[Any] input is not validated (on purpose: anything image-like
      is welcome), which MLflow issues from inside its own warning filters;
    - that the model's config could not be logged as run parameters: MLflow logs it there, and its
      `batch` (predict.py's batch) differs from the training `batch` already logged, which MLflow
      refuses to change. The config stays in the logged model's MLmodel file, where
      `mlflow.pyfunc.load_model` reads it."""
    show = warnings.showwarning

    def filtered(message, *args, **kwargs):
        if "Any type hint" not in str(message):
            show(message, *args, **kwargs)

    def expected(record: logging.LogRecord) -> bool:  # that refusal only, not a server that failed
        message = record.getMessage()
        return not (message.startswith("Failed to log model config as params") and "Changing param values" in message
                    and "'key': 'batch'" in message)

    model_logger = logging.getLogger("mlflow.models.model")
    warnings.showwarning = filtered
    model_logger.addFilter(expected)
    try:
        yield
    finally:
        warnings.showwarning = show
        model_logger.removeFilter(expected)


def signature():
    """What YoloPyfunc.predict's type hints say (a list of images in, a list of records out), given
    explicitly: inferring it would load the model and run the input example twice at log time."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Map, Schema

    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), outputs=Schema([ColSpec(Map(AnyType()))]))


def register(model_uri: str, name: str, tags: dict) -> str:
    """A new version of `name` in the Model Registry (the model created if new); returns the version."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags, await_registration_for=60)
    return str(version.version)


def registry_tags(settings: Settings, run_id: str, task: str, metrics: dict) -> dict:
    metric, value = primary_metric(task, metrics or {})
    return {"job_id": str(settings.job_id), "project_id": str(settings.project_id), "task": task,
            "task_type": PLATFORM_TASKS[task], "primary_metric_name": metric, "primary_metric_value": f"{value:.6g}",
            "mlflow_run_id": run_id}


def shipped_modules(start: tuple[str, ...] = ("predict",)) -> list[Path]:
    """The trainer's own modules the pyfunc model imports, directly or not (followed through their
    import statements), so the logged model carries the code it runs. Import lines (a line that
    starts with `import` or `from ... import`, as this project writes them) are found by a pattern,
    not by parsing: parsing the 18 modules took 0.23 s of the job's finish. A test holds the result
    equal to a walk of the parsed modules."""
    found: dict[str, Path] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        path = ROOT / f"{name}.py"
        if name in found or not path.is_file():
            continue
        found[name] = path
        for single, several in IMPORT_LINE.findall(path.read_text(encoding="utf-8")):
            todo += [single] if single else [part.split()[0].split(".")[0] for part in several.split(",")]
    return sorted(found.values())


IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+(\w+)[\w.]*[ \t]+import\b|import[ \t]+([\w., \t]+))", re.MULTILINE)


def pinned_requirements() -> list[str]:
    """requirements.txt's pins: what `mlflow.pyfunc.load_model` needs to run the model anywhere."""
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def example_image() -> str:
    """A small JPEG as a data: URI: the logged input example (and a first prediction at log time)."""
    import cv2
    import numpy as np

    image = np.full((64, 64, 3), 128, np.uint8)
    cv2.rectangle(image, (12, 16), (40, 48), (40, 40, 220), -1)
    return "data:image/jpeg;base64," + base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()
