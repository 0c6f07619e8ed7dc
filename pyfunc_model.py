"""The trained model as an MLflow pyfunc model: `predict` takes images and returns predict.py's records.

MLflow runs this file wherever the model is used (`mlflow.pyfunc.load_model("models:/NAME/1")`,
`mlflow models serve`), in any Python with the trainer's requirements: registry.py logs it as the
model's code (MLflow's "models from code": nothing is pickled), with predict.py and the modules
predict.py imports as code_paths, best.pt as the artifact `weights`, and the job's prediction
settings as the model config.

Input: a list of images, each one a local file path, encoded image bytes (JPEG, PNG...), a
`data:image/...;base64,...` string (what a JSON caller of `mlflow models serve` sends), or an
H x W x 3 uint8 array in BGR order (OpenCV's layout, which Ultralytics expects). A DataFrame's
first column is taken as that list.
Output: one record per image, the entries predict.py prints (`describe_result`): image, width,
height, detections (and the task's extra fields); an image given as bytes or an array is named
`input-<i>`; one that cannot be read is an entry with an `error`, as in predict.py.

Model config (set when logged; override with `mlflow.pyfunc.load_model(uri, model_config={...})`):
task, imgsz, conf, iou, max_det, batch, device (None = Ultralytics' choice).
Environment: sets YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=false unless they are set.
Imports: mlflow, numpy, cv2, Ultralytics; predict (describe_result) inside predict().
"""

from __future__ import annotations

import base64
import os
from typing import Any

import mlflow.models
import mlflow.pyfunc

DEFAULT_CONFIG = {"task": None, "imgsz": 640, "conf": 0.25, "iou": 0.7, "max_det": 300, "batch": 16, "device": None}


class YoloPyfunc(mlflow.pyfunc.PythonModel):
    """An Ultralytics YOLO checkpoint behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")
        from ultralytics import YOLO

        self.config = {**DEFAULT_CONFIG, **(context.model_config or {})}
        self.model = YOLO(context.artifacts["weights"], task=self.config["task"])

    def predict(self, model_input: list[Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        from predict import describe_result

        c = self.config
        decoded = [_decode(item, i) for i, item in enumerate(model_input)]
        records: list[dict[str, Any]] = []
        for start in range(0, len(decoded), c["batch"]):
            chunk = decoded[start:start + c["batch"]]
            arrays = [image for _, image, _ in chunk if image is not None]
            results = iter(self.model.predict(arrays, imgsz=c["imgsz"], conf=c["conf"], iou=c["iou"],
                                              max_det=c["max_det"], device=c["device"], batch=len(arrays),
                                              verbose=False) if arrays else ())
            for name, image, error in chunk:
                if image is None:
                    records.append({"image": name, "width": None, "height": None, "detections": [], "error": error})
                else:
                    records.append(describe_result(next(results), name))
        return records


def _decode(item: Any, index: int):
    """(name, BGR array, None) or (name, None, why it cannot be read), decoded as predict.py decodes."""
    import cv2
    import numpy as np

    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3:
            return f"input-{index}", None, f"an array image must be H x W x 3, not {item.shape}"
        return f"input-{index}", np.ascontiguousarray(item, dtype=np.uint8), None
    if isinstance(item, (bytes, bytearray, memoryview)):
        name, data = f"input-{index}", bytes(item)
    elif isinstance(item, str) and item.startswith("data:"):
        name = f"input-{index}"
        try:
            data = base64.b64decode(item.split(",", 1)[1], validate=False)
        except (IndexError, ValueError):
            return name, None, "not a base64 data: URI"
    elif isinstance(item, (str, os.PathLike)):
        name = str(item)
        try:
            with open(item, "rb") as f:
                data = f.read()
        except OSError as e:
            return name, None, f"cannot be read: {e.strerror or e}"
    else:
        return f"input-{index}", None, f"not an image: {type(item).__name__}"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        return name, None, "cannot decode the image (corrupt, empty or not an image format)"
    return name, image, None


mlflow.models.set_model(YoloPyfunc())  # MLflow logs this file as the model's code ("models from code")
