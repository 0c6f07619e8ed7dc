"""The trained model in MLflow: a pyfunc model in the job's run and, when asked, a registered version.

Owns: logging best.pt as an MLflow pyfunc model (pyfunc_model.YoloPyfunc: `predict` takes images
and returns predict.py's records) into the job's run, with the trainer modules it needs as code,
the pinned requirements, a signature (a list of images in, a list of records out, as the predict
method's type hints say) and an input example; registering it under MLFLOW_REGISTERED_MODEL_NAME,
tagged with the job id, the task and the primary metric; and the final status's fields for it.
Any failure logs one warning and the job goes on: tracking never fails training.

The MLflow calls are made by MLflow's helper process (tracking.py, mlflow_worker.py), which imports
torch and Ultralytics at the lowest CPU priority while training is set up and runs (`prepare_model_logging`):
the trainer's process never imports MLflow, whose import and package scan (3.4 s of Python) would
share the interpreter lock with the final validation and uploads.

Environment (through Settings): MLFLOW_LOG_MODEL, MLFLOW_REGISTERED_MODEL_NAME, MLFLOW_TRACKING_URI,
and IMGSZ, CONF_THRESHOLD, IOU_THRESHOLD, MAX_DET, PREDICT_BATCH as the model's prediction settings.
Imports: config, tracking, validation. pyfunc_model.py is not imported here: MLflow logs the file.
"""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path
from typing import Callable

from config import PLATFORM_TASKS, Settings
from tracking import Stopped, WorkerError
from validation import primary_metric

LOGGER = logging.getLogger("trainer")

ROOT = Path(__file__).resolve().parent
ARTIFACT_NAME = "model"  # the logged model's name in the run


def log_trained_model(settings: Settings, tracker, weights: Path, task: str, metrics: dict,
                      should_stop: Callable[[], bool]) -> dict:
    """Log best.pt as a pyfunc model in the job's run (MLFLOW_LOG_MODEL, or implied by a registered
    name) and register it under MLFLOW_REGISTERED_MODEL_NAME, both through MLflow's helper process
    (tracking.Tracker.log_model): this process never imports MLflow.

    Returns the final status's fields: `mlflow_model_uri`, and `registered_model_name`,
    `registered_model_version` once registered. Never raises.
    """
    name = settings.registered_model_name
    if not logs_model(settings) or not tracker.run_id or not tracker.active or should_stop():
        return {}
    fields = {}
    try:
        model_uri = tracker.log_model(model_request(settings, weights, task), should_stop)
        fields["mlflow_model_uri"] = model_uri
        LOGGER.info("MLflow: logged the model as %s", model_uri)
        if name:
            version = tracker.register_model(model_uri, name, registry_tags(settings, tracker.run_id, task, metrics),
                                             should_stop)
            fields.update(registered_model_name=name, registered_model_version=int(version))
            LOGGER.info("MLflow: registered %s version %s", name, version)
    except Exception as e:
        why = str(e) if isinstance(e, (WorkerError, Stopped)) else f"{type(e).__name__}: {e}"
        LOGGER.warning("MLflow: could not %s the model (%s); the job goes on without it",
                       "register" if fields else "log", tracker.redact(why)[:500])
    return fields


def logs_model(settings: Settings) -> bool:
    return bool(settings.mlflow_log_model or settings.registered_model_name)


def prepare_model_logging(settings: Settings, tracker) -> None:
    """Once the job's run exists, before Ultralytics sets training up: MLflow's helper process imports
    what logging the model will need (torch, Ultralytics, MLflow's pyfunc, the installed packages'
    map) at the lowest CPU priority, so that logging the model after training starts warm
    (mlflow_worker.Worker.warm). In the trainer's own process, also for a multi-GPU job (its model
    is logged from there)."""
    if logs_model(settings):
        tracker.warm_model_logging()


def model_request(settings: Settings, weights: Path, task: str) -> dict:
    """What the helper's mlflow.pyfunc.log_model takes: pyfunc_model.py as the model's code, best.pt
    as its artifact, the trainer modules it imports, requirements.txt's pins, the prediction
    settings as its model config, a small JPEG as its input example."""
    config = {"task": task, "imgsz": settings.imgsz, "conf": settings.conf, "iou": settings.iou,
              "max_det": settings.max_det, "batch": settings.predict_batch}
    return {"name": ARTIFACT_NAME, "code": str(ROOT / "pyfunc_model.py"), "weights": str(weights),
            "code_paths": [str(p) for p in shipped_modules()], "pip_requirements": pinned_requirements(),
            "config": config, "input_example": example_image()}


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
