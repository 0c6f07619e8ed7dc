"""Evaluation of a checkpoint on a dataset split, in the contract's terms.

Owns: which split a dataset is evaluated on (`test` when it has one), running Ultralytics' own
validator on it with the trainer's ValidationCapture riding along (Ultralytics fills its detection
confusion matrix only when it plots), and the report evaluate.py prints and train.py's
EVALUATE_TEST sends (`test_metrics` in the final status, `test/...` in MLflow): metrics under the
contract's names, per-class metrics, the confusion matrix with rows = true class.

Environment (through Settings): EVALUATE_TEST, IMGSZ, BATCH_SIZE, DEVICE, WORKERS, VALIDATION_CONF.
Imports: utils, config, validation, models; Ultralytics and yaml lazily.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from config import PLATFORM_TASKS, Settings, job_dir
from models import default_device
from utils import BadInput, available_cpus
from validation import (
    ValidationCapture,
    class_names,
    classification_per_class,
    contract_metrics,
    detection_per_class,
    primary_metric,
)

LOGGER = logging.getLogger("trainer")


def test_split(data: Path) -> str | None:
    """'test' when the dataset (data.yaml, or a classification folder) has a test split, else None."""
    if data.is_dir():
        return "test" if (data / "test").is_dir() else None
    import yaml

    return "test" if (yaml.safe_load(data.read_text(encoding="utf-8")) or {}).get("test") else None


def evaluate(model, data: Path, split: str, settings: Settings, folder: Path, imgsz: int | None = None) -> dict:
    """Run Ultralytics' validator for `model` on one split and report it in the contract's terms.

    Args:
        model: an Ultralytics YOLO model (a checkpoint or an export).
        data: what Ultralytics' `data` takes (data.yaml, or a classification folder).
        folder: where Ultralytics may write (its save_dir).
        imgsz: None = the size the checkpoint was trained at (Ultralytics' default for a checkpoint).

    Raises:
        BadInput: Ultralytics refused the dataset.
    """
    capture = ValidationCapture(None, 0, settings.validation_conf)

    def on_val_start(validator) -> None:
        capture.attach(validator)
        capture.start()

    model.add_callback("on_val_start", on_val_start)
    args = {"data": str(data), "split": split, "batch": validation_batch(settings),
            "device": settings.device or default_device(), "plots": False, "verbose": False,
            "workers": settings.workers if settings.workers is not None else min(8, available_cpus()),
            "project": str(folder.parent), "name": folder.name, "exist_ok": True}
    if imgsz:
        args["imgsz"] = imgsz
    LOGGER.info("evaluating %s on the %s split of %s", Path(str(model.ckpt_path)).name, split, data)
    try:
        metrics = model.val(**args)
    except RuntimeError as e:
        if str(e).startswith("Dataset"):  # Ultralytics' own dataset check refused the data
            raise BadInput(str(e).splitlines()[0]) from None
        raise
    finally:
        model.callbacks["on_val_start"].remove(on_val_start)
    return _report(capture.validator, metrics, capture, split)


def validation_batch(settings: Settings) -> int:
    """BATCH_SIZE for validation: AutoBatch (-1) and GPU memory fractions are training-only."""
    return int(settings.batch) if settings.batch >= 1 else 16


def _report(validator, metrics, capture: ValidationCapture, split: str) -> dict:
    task = validator.args.task
    names = class_names(validator.names or validator.data["names"])
    numbers = contract_metrics(metrics.results_dict, None)  # results_dict carries fitness
    confusion = capture.confusion()
    if task == "classify":
        per_class, weighted = classification_per_class(confusion, names) if confusion else (None, {})
        numbers.update(weighted)
    else:
        per_class = detection_per_class(metrics, names, task)
    name, value = primary_metric(task, numbers)
    report = {"split": split, "task": task, "task_type": PLATFORM_TASKS[task],
              "images": len(validator.dataloader.dataset), "primary_metric_name": name,
              "primary_metric_value": value, "metrics": numbers, "class_names": names,
              "per_class_metrics": per_class, "confusion_matrix": confusion,
              "speed_ms_per_image": {k: round(float(v), 3) for k, v in (metrics.speed or {}).items()}}
    LOGGER.info("%s split: %s = %.4f on %d images", split, name, value, report["images"])
    return report


def evaluate_after_training(settings: Settings, tracker, backend, weights: Path, data: Path,
                            should_stop: Callable[[], bool]) -> dict:
    """EVALUATE_TEST: best.pt on the dataset's test split -> the final status's `test_metrics` and MLflow
    `test/...` (plus the whole report as test_evaluation.json). A dataset without a test split is
    logged and skipped; a failure is a warning, never a failed job."""
    if not settings.evaluate_test:
        return {}
    if test_split(data) is None:
        LOGGER.warning("EVALUATE_TEST: the dataset has no test split; no test metrics")
        return {}
    if should_stop():
        return {}
    from ultralytics import YOLO

    folder = job_dir(settings) / "evaluate"
    try:
        report = evaluate(YOLO(str(weights)), data, "test", settings, folder, settings.imgsz)
    except Exception as e:
        LOGGER.warning("EVALUATE_TEST: evaluating best.pt on the test split failed: %s: %s", type(e).__name__, e,
                       exc_info=not isinstance(e, BadInput))
        return {"test_metrics_error": f"{type(e).__name__}: {str(e)[:500]}"}
    tracker.log_metrics({f"test/{k}": v for k, v in report["metrics"].items()}, step=settings.epochs)
    (folder / "test_evaluation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    tracker.log_artifacts([folder / "test_evaluation.json"])
    backend.log(f"test split: {report['primary_metric_name']} = {report['primary_metric_value']:.4f} "
                f"on {report['images']} images")
    return {"test_metrics": report["metrics"]}
