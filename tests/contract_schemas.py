"""The backend's callback body schemas, as pydantic models, from ../shared/CONTRACT.md ("Callbacks").

The platform's backend is a FastAPI application: it validates each body against models like these
and answers a body that misses a required field, or has one of the wrong type, with 422 and a
`detail` list. These models are strict (no "1" for 1, no 2.0 for an int, no bool for a number), so
a type that a lenient backend would coerce still fails here. Extra fields are allowed, as the
contract says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PLATFORM_TASKS = Literal["object_detection", "instance_segmentation", "image_classification", "pose_estimation",
                         "oriented_detection"]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    event_id: str = Field(min_length=1)


class Status(Body):
    status: Literal["running", "completed", "failed", "cancelled"]
    error: str | None = None
    progress: float | None = Field(default=None, ge=0, le=100)
    updated_at: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_run_id: str | None = None


class ValidationResult(Body):
    epoch: int = Field(ge=1)
    task_type: PLATFORM_TASKS
    primary_metric_name: str
    primary_metric_value: float = Field(ge=0, le=1)
    metrics: dict[str, float]
    total_epochs: int | None = None
    overall_loss: float | None = None
    class_names: list[str] | None = None
    per_class_metrics: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    checkpoint_path: str | None = None


class Box(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    class_id: int
    bbox: list[float] = Field(min_length=4, max_length=4)
    format: Literal["xyxy"]
    confidence: float | None = Field(default=None, ge=0, le=1)


class Top5(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    label_id: int
    confidence: float = Field(ge=0, le=1)


class ValidationImageResult(Body):
    validation_result_id: int
    epoch: int = Field(ge=1)
    image_name: str
    image_index: int = Field(ge=0)
    image_path: str | None = None
    true_boxes: list[Box] | None = None
    predicted_boxes: list[Box] | None = None
    true_label_id: int | None = None
    true_label: str | None = None
    predicted_label_id: int | None = None
    predicted_label: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    top5_predictions: list[Top5] | None = None
    is_correct: bool | None = None
    iou: float | None = Field(default=None, ge=0, le=1)


class TrainingMetrics(Body):
    epoch: int = Field(ge=1)
    step: int
    loss: float | None = None
    accuracy: float | None = None
    learning_rate: float | None = None
    checkpoint_path: str | None = None
    extra_metrics: dict[str, float] | None = None


class Metric(Body):
    name: str
    value: float
    epoch: int
    step: int | None = None
    timestamp: str | None = None


class Log(Body):
    message: str
    level: Literal["INFO", "WARNING", "ERROR"]
    epoch: int | None = None
    timestamp: str | None = None


# (method, route) -> the model of its body, or of each element of an array body
SCHEMAS = {
    ("PATCH", "status"): Status,
    ("POST", "validation-results"): ValidationResult,
    ("POST", "validation-image-results"): ValidationImageResult,
    ("POST", "training-metrics"): TrainingMetrics,
    ("POST", "metrics"): Metric,
    ("POST", "logs"): Log,
}
ARRAY_ROUTES = {"validation-image-results"}


def problems(method: str, route: str, body) -> list[dict]:
    """FastAPI-style 422 `detail` entries for a body, or [] when the backend would store it."""
    model = SCHEMAS[(method, route)]
    if route in ARRAY_ROUTES:
        if not isinstance(body, list) or not body:
            return [{"type": "list_type", "loc": ["body"], "msg": "Input should be a non-empty list", "input": None}]
        found = []
        for i, element in enumerate(body):
            found += _errors(model, element, ["body", i])
        return found
    return _errors(model, body, ["body"])


def _errors(model, body, where: list) -> list[dict]:
    try:
        model.model_validate(body)
    except ValidationError as e:
        return [{"type": err["type"], "loc": [*where, *err["loc"]], "msg": err["msg"]}
                for err in e.errors(include_url=False)]
    return []
