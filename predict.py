"""Run a trained YOLO checkpoint on images and print the results as one JSON document.

The backend runs it as a subprocess and parses its standard output; logs go to standard
error. Configuration comes from the environment (and ./.env for hand runs):

    CHECKPOINT_URI=s3://bucket/checkpoints/job-7/best.pt INPUT_URI=s3://bucket/images/ python predict.py
    JOB_ID=7 INPUT_URI=photo.jpg STORAGE_TYPE=local python predict.py > predictions.json

Output: {"predictions": [{"image", "width", "height", "detections": [...]}, ...], "count": N}
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from dotenv import load_dotenv

from utils import (
    EXIT_ERROR,
    EXIT_OK,
    IMAGE_SUFFIXES,
    BadInput,
    ConfigError,
    Redactor,
    Settings,
    Storage,
    StorageNotFound,
    TrainerError,
    load_settings,
    prepare_ultralytics,
    setup_logging,
)

LOGGER = logging.getLogger("trainer.predict")


def fetch_checkpoint(storage: Storage, settings: Settings) -> Path:
    """The checkpoint as a local file: a local path as is, else downloaded once (cached by ETag)."""
    ref = settings.checkpoint_uri
    local = Path(ref).expanduser()
    if not ref.startswith("s3://") and local.is_file():
        return local.resolve()
    loc = storage.locate(ref)
    try:
        return storage.fetch(loc, settings.work_dir / "weights" / "files" / loc.bucket / loc.key)
    except StorageNotFound:
        raise BadInput(f"checkpoint not found: {storage.uri(loc)}") from None


def gather_inputs(storage: Storage, settings: Settings) -> list[Path]:
    """Local image files for INPUT_URI: a local file or folder, or a storage object or prefix."""
    ref = settings.input_uri
    local = Path(ref).expanduser()
    if not ref.startswith("s3://") and local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        loc = storage.locate(ref)
        folder = settings.work_dir / "inputs" / loc.bucket
        if ref.endswith("/"):
            objects = [o for o, _ in storage.list(loc) if Path(o.key).suffix.lower() in IMAGE_SUFFIXES]
            files = [storage.download(o, folder / o.key) for o in objects]
        else:
            files = [storage.download(loc, folder / loc.key)]
    if not files:
        raise BadInput(f"INPUT_URI={ref}: no images found")
    return files


def predict(weights: Path, files: list[Path], settings: Settings) -> list[dict]:
    from ultralytics import YOLO

    try:
        model = YOLO(str(weights))
    except Exception as e:
        raise BadInput(f"{weights.name} is not an Ultralytics checkpoint: {e}") from None
    out = []
    for path in files:
        for result in model.predict(str(path), conf=settings.conf, iou=settings.iou, imgsz=settings.imgsz,
                                    device=settings.device or None, stream=True, verbose=False):
            out.append(describe_result(result, str(path)))
    return out


def describe_result(result, image: str) -> dict:
    """One image's results in the contract's shape."""
    height, width = result.orig_shape
    entry = {"image": image, "width": int(width), "height": int(height), "detections": []}
    names = result.names
    if result.probs is not None:
        top = result.probs.top5
        entry["classifications"] = [{"class_id": int(i), "class_name": names[int(i)],
                                     "confidence": round(float(result.probs.data[int(i)]), 5)} for i in top]
        return entry
    boxes = result.boxes if result.boxes is not None else []
    for box in boxes:
        x1, y1, x2, y2 = (round(float(v), 2) for v in box.xyxy[0])
        cls = int(box.cls[0])
        entry["detections"].append({"class_id": cls, "class_name": names[cls],
                                    "confidence": round(float(box.conf[0]), 5),
                                    "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}})
    return entry


def main() -> int:
    load_dotenv(Path.cwd() / ".env", override=False)
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact)
    json_out = os.fdopen(os.dup(1), "w")  # stdout is for the JSON only; everything else goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        settings = load_settings(os.environ, "predict")
        storage = Storage(settings.storage)
        prepare_ultralytics(settings.work_dir)
        weights = fetch_checkpoint(storage, settings)
        files = gather_inputs(storage, settings)
        predictions = predict(weights, files, settings)
    except ConfigError as e:
        LOGGER.error("%s", e)
        return e.exit_code
    except TrainerError as e:
        LOGGER.error("prediction failed (exit %d): %s", e.exit_code, redact(e))
        return e.exit_code
    except Exception as e:
        LOGGER.error("prediction failed: %s", redact(f"{type(e).__name__}: {e}"), exc_info=True)
        return EXIT_ERROR
    json.dump({"predictions": predictions, "count": len(predictions)}, json_out)
    json_out.write("\n")
    json_out.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
