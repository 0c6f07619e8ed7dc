"""Exports of a trained checkpoint that people can deploy, each one checked against the checkpoint.

Owns: exporting a checkpoint through Ultralytics' exporter, one format at a time (a format that
fails is reported, never raised); verifying each export before it is reported (it loads through
Ultralytics' AutoBackend, `YOLO(path)`, and on a few images gives the same classes as the
checkpoint, with boxes and confidences within a tolerance); storing the files; the task an export
carries in its metadata (predict.py and evaluate.py load exports with it); and train.py's step
after training (`export_after_training`).

The comparison, on the same images at the same size: both models predict down to VERIFY_CONF.
Every detection either model is sure of (confidence >= FIRM_CONF) must have its own partner in the
other's predictions with the same class, every box coordinate within max(BOX_TOL_PX,
BOX_TOL_FRACTION of the image's longer side) and the confidence within CONF_TOL of it (at least
CONF_FLOOR); each image's most confident detection is compared the same way even below FIRM_CONF
when it clearly leads (the next one is below LEAD x its confidence), so an early checkpoint is
compared too. Classification: the same top-1 class (a tie within that tolerance either way) and
the top-5 probabilities within it. Masks and keypoints are not compared, their boxes are. And the
networks' raw main outputs (boxes and scores before NMS, or probabilities) on the same input
tensors must agree within RAW_TOL of each output channel's range.

Environment (through Settings): EXPORT_FORMATS, EXPORT_VERIFY_IMAGES, IMGSZ, DEVICE, and for
export.py EXPORT_OUTPUT_URI. Ultralytics must not pip-install a missing exporter package:
models.prepare_ultralytics sets YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=false.
Imports: utils, config, storage, datasets, models; Ultralytics, numpy, cv2 and yaml lazily.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from config import Settings, job_dir
from datasets import classification_splits, image_files, images_of
from models import default_device, ultralytics_message
from storage import Storage
from utils import BadInput, TrainerError

LOGGER = logging.getLogger("trainer")

VERIFY_CONF = 0.001  # both models predict down to this confidence (Ultralytics' validation default)
FIRM_CONF = 0.05  # detections this confident must have a partner in the other model's predictions
LEAD = 0.9  # the top detection is compared too when the next one is below LEAD x its confidence
CONF_TOL = 0.02  # largest confidence difference accepted, as a share of the confidence ...
CONF_FLOOR = 0.001  # ... or this, whichever is larger
BOX_TOL_PX = 2.0  # largest box coordinate difference accepted, in pixels of the original image ...
BOX_TOL_FRACTION = 0.01  # ... or this share of the image's longer side, whichever is larger
RAW_TOL = 0.01  # largest raw output difference accepted, as a share of the checkpoint's largest value ...
RAW_FLOOR = 0.01  # ... in that output channel, or of this, whichever is larger


@dataclasses.dataclass
class Export:
    """One format's outcome: a verified file (or folder) and where it was stored, or why not."""

    format: str
    task: str | None = None  # the checkpoint's task (every export carries it in its metadata)
    imgsz: int | None = None  # the export's input size
    path: Path | None = None  # the local file or folder Ultralytics wrote
    uri: str | None = None  # where it was stored
    seconds: float = 0.0  # export time
    verification: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        out = {"format": self.format, "ok": self.error is None, "uri": self.uri, "file": self.path.name if self.path else None,
               "seconds": round(self.seconds, 1), "verification": self.verification}
        if self.error:
            out["error"] = self.error
        return out


# ----------------------------------------------------------------------------------------------
# Export and verify
# ----------------------------------------------------------------------------------------------


def export_checkpoint(weights: Path, formats: tuple[str, ...], settings: Settings, images: list, work: Path,
                      imgsz: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> list[Export]:
    """Export weights to each format and verify each export; every failure is caught and reported.

    Args:
        weights: the .pt checkpoint; a copy in `work` is exported, so files land there (named after it).
        images: (name, BGR array) pairs the exports are compared with the checkpoint on.
        imgsz: export and comparison size; None = the size the checkpoint was trained at.
        should_stop: checked before each format (a stopped job skips the rest).
    """
    from ultralytics import YOLO

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy = work / weights.name
    shutil.copyfile(weights, copy)
    try:
        model = YOLO(str(copy))
    except Exception as e:  # a file that is not a checkpoint: bad input (exit 2), as for train.py and predict.py
        raise BadInput(f"{weights.name} is not an Ultralytics checkpoint: {ultralytics_message(e, copy)}") from None
    imgsz = imgsz or int(model.overrides.get("imgsz") or 640)
    device = settings.device or default_device()
    images = images or generated_images(1, imgsz)  # at least load and run each export
    reference = [(name, _predict(model, image, imgsz, device)) for name, image in images]
    exports = []
    for fmt in formats:
        if should_stop():
            exports.append(Export(fmt, model.task, imgsz, error="skipped: the job was asked to stop"))
            continue
        export = _export_one(model, fmt, imgsz, device)
        export.task, export.imgsz = model.task, imgsz
        if export.error is None:
            _verify(export, model, model.task, reference, images, imgsz, device)
        exports.append(export)
    return exports


def _export_one(model, fmt: str, imgsz: int, device: str) -> Export:
    started = time.monotonic()
    LOGGER.info("exporting %s to %s (imgsz %d, device %s)", Path(model.ckpt_path).name, fmt, imgsz, device)
    try:
        path = model.export(format=fmt, imgsz=imgsz, device=device, verbose=False)
        if not path or not Path(path).exists():
            raise RuntimeError("Ultralytics' exporter wrote no file")
    except Exception as e:  # a missing package, a format this task or machine cannot have, an exporter bug
        error = _first_line(e)
        LOGGER.warning("export to %s failed: %s", fmt, error)
        return Export(fmt, seconds=time.monotonic() - started, error=f"export failed: {error}")
    export = Export(fmt, path=Path(path), seconds=time.monotonic() - started)
    LOGGER.info("exported %s in %.1f s: %s", fmt, export.seconds, export.path.name)
    return export


def _verify(export: Export, checkpoint, task: str, reference: list, images: list, imgsz: int, device: str) -> None:
    """Load the export through AutoBackend and compare it with the checkpoint: predictions and raw outputs."""
    from ultralytics import YOLO

    try:
        loaded = YOLO(str(export.path), task=task)
        pairs = [(name, ref, _predict(loaded, image, imgsz, device)) for (name, ref), (_, image) in zip(reference, images)]
    except Exception as e:
        export.verification = {"passed": False, "images": 0}
        export.error = f"verification failed: the export does not load or run: {_first_line(e)}"
        LOGGER.warning("%s: %s", export.format, export.error)
        return
    export.verification = compare_predictions(pairs)
    export.verification["raw_output_diff"] = raw_output_diff(checkpoint, loaded, [image for _, image in images])
    raw = export.verification["raw_output_diff"]
    if raw is not None and raw > RAW_TOL:
        export.verification["passed"] = False
        export.verification["problems"].append(f"raw outputs differ by {raw:.2%} of their range (tolerance {RAW_TOL:.0%})")
    if export.verification["passed"]:
        LOGGER.info("%s verified on %d images: %s", export.format, len(pairs), export.verification)
    else:
        export.error = "verification failed: " + "; ".join(export.verification["problems"][:5])
        LOGGER.warning("%s: %s", export.format, export.error)


def _predict(model, image, imgsz: int, device: str):
    return model.predict(image, imgsz=imgsz, conf=VERIFY_CONF, device=device, verbose=False)[0]


def raw_output_diff(checkpoint, export, images: list) -> float | None:
    """The largest difference between the two networks' raw main outputs (boxes and class scores before
    NMS, or class probabilities) on the same input tensors: per output channel for detection-like
    outputs (a score channel is not drowned by pixel coordinates), as a share of the checkpoint's
    largest value in that channel (at least RAW_FLOOR). None if they cannot be compared (logged)."""
    import torch

    worst = 0.0
    try:
        for image in images:
            im = export.predictor.preprocess([image])  # the export's input shape fits both networks
            with torch.no_grad():
                a = _main_output(checkpoint.predictor.model(im.to(checkpoint.predictor.device)))
                b = _main_output(export.predictor.model(im))
            if a.shape != b.shape:
                LOGGER.warning("raw outputs not compared: shapes %s and %s", tuple(a.shape), tuple(b.shape))
                return None
            a, b = a.float().cpu(), b.float().cpu()
            if a.dim() == 3:  # (batch, channels, anchors): each channel on its own scale
                scale = a.abs().amax(dim=(0, 2)).clamp(min=RAW_FLOOR)[None, :, None]
            else:
                scale = a.abs().max().clamp(min=RAW_FLOOR)
            worst = max(worst, float(((a - b).abs() / scale).max()))
    except Exception as e:
        LOGGER.warning("raw outputs not compared: %s", _first_line(e))
        return None
    return round(worst, 7)


def _main_output(y):
    import torch

    while isinstance(y, (list, tuple)):
        y = y[0]
    return y if isinstance(y, torch.Tensor) else torch.as_tensor(y)


def compare_predictions(pairs: list) -> dict:
    """(name, checkpoint result, export result) triples -> what was compared and every difference found."""
    problems: list[str] = []
    stats = {"detections": 0, "max_box_diff_px": 0.0, "max_conf_diff": 0.0}
    for name, ref, out in pairs:
        if ref.probs is not None:
            problems += _compare_classes(name, ref, out, stats)
        else:
            problems += _compare_boxes(name, ref, out, stats)
    return {"passed": not problems, "images": len(pairs), "compared": stats["detections"],
            "max_box_diff_px": round(stats["max_box_diff_px"], 4), "max_conf_diff": round(stats["max_conf_diff"], 5),
            "problems": problems}


def _compare_classes(name: str, ref, out, stats: dict) -> list[str]:
    if out.probs is None:
        return [f"{name}: the export gives no class probabilities"]
    import numpy as np

    p, q = (r.probs.data.float().cpu().numpy() for r in (ref, out))
    if p.shape != q.shape:
        return [f"{name}: {q.shape[0]} classes in the export, {p.shape[0]} in the checkpoint"]
    top5 = np.argsort(-p)[:5]
    diffs = np.abs(p[top5] - q[top5])
    stats["detections"] += 1
    stats["max_conf_diff"] = max(stats["max_conf_diff"], float(diffs.max()))
    problems = []
    if int(q.argmax()) != int(top5[0]) and p[top5[0]] - p[int(q.argmax())] > conf_tolerance(p[top5[0]]):
        problems.append(f"{name}: top class {ref.names[int(q.argmax())]} instead of {ref.names[int(top5[0])]}")
    if any(d > conf_tolerance(v) for d, v in zip(diffs, p[top5])):
        problems.append(f"{name}: top-5 probabilities differ by up to {diffs.max():.4f}")
    return problems


def conf_tolerance(conf: float) -> float:
    return max(CONF_TOL * float(conf), CONF_FLOOR)


def _boxes(result):
    import numpy as np

    boxes = result.obb if result.obb is not None else result.boxes
    if boxes is None or len(boxes) == 0:
        return np.zeros(0, int), np.zeros(0), np.zeros((0, 4))
    return boxes.cls.int().cpu().numpy(), boxes.conf.float().cpu().numpy(), boxes.xyxy.float().cpu().numpy()


def _compare_boxes(name: str, ref, out, stats: dict) -> list[str]:
    """The firm detections both ways, and the most confident one when it clearly leads."""
    tol = max(BOX_TOL_PX, BOX_TOL_FRACTION * max(ref.orig_shape))
    a, b = _boxes(ref), _boxes(out)
    problems = _match(name, a, b, a[1] >= FIRM_CONF, tol, stats, "not in the export")
    problems += _match(name, b, a, b[1] >= FIRM_CONF, tol, {"detections": 0, "max_box_diff_px": 0.0, "max_conf_diff": 0.0},
                       "in the export only")
    order = a[1].argsort()[::-1]
    if len(order) and a[1][order[0]] < FIRM_CONF and (len(order) == 1 or a[1][order[1]] < LEAD * a[1][order[0]]):
        top = order[:1]  # the top detection: compared even when it is not firm, if nothing is close to it
        problems += _match(name, tuple(x[top] for x in a), tuple(x[b[1].argsort()[::-1][:1]] for x in b),
                           [True], tol, stats, "is the top detection, not the export's")
    return problems


def _match(name: str, a, b, wanted, tol: float, stats: dict, missing: str) -> list[str]:
    """Each wanted detection of a has its own partner in b: same class, box and confidence within tolerance."""
    import numpy as np

    cls_a, conf_a, box_a = a
    cls_b, conf_b, box_b = b
    taken = np.zeros(len(cls_b), bool)
    problems = []
    for i in np.argsort(-conf_a):
        if not wanted[i]:
            continue
        stats["detections"] += 1
        candidates = np.flatnonzero((cls_b == cls_a[i]) & ~taken)
        diffs = np.abs(box_b[candidates] - box_a[i]).max(1) if len(candidates) else np.zeros(0)
        if not len(candidates) or diffs.min() > tol:
            near = f" (nearest box {diffs.min():.2f} px away)" if len(candidates) else ""
            problems.append(f"{name}: class {int(cls_a[i])} at {np.round(box_a[i], 1).tolist()} "
                            f"(confidence {conf_a[i]:.3f}) {missing}{near}")
            continue
        j = candidates[diffs.argmin()]
        taken[j] = True
        conf_diff = abs(float(conf_b[j] - conf_a[i]))
        stats["max_box_diff_px"] = max(stats["max_box_diff_px"], float(diffs.min()))
        stats["max_conf_diff"] = max(stats["max_conf_diff"], conf_diff)
        if conf_diff > conf_tolerance(conf_a[i]):
            problems.append(f"{name}: class {int(cls_a[i])} confidence {conf_b[j]:.3f} instead of {conf_a[i]:.3f}")
    return problems


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:400] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------
# Images to compare on, storing, the task of an export
# ----------------------------------------------------------------------------------------------


def validation_images(data: Path, count: int) -> list:
    """(name, BGR array) of `count` validation images spread over the split: data.yaml's `val`, or a
    classification folder's val/ (test/ when it has no val/)."""
    import cv2

    if count <= 0:
        return []
    if data.is_dir():
        splits = classification_splits(data)
        paths = image_files(splits.get("val") or splits.get("test") or data)
    else:
        import yaml

        spec = yaml.safe_load(data.read_text(encoding="utf-8")) or {}
        base = data.parent / (spec.get("path") or ".")  # train.py's data.yaml has absolute paths already
        val = spec.get("val") or []
        paths = images_of([str(base / v) for v in val] if isinstance(val, list) else str(base / val))
    picked = [paths[i * len(paths) // count] for i in range(count)] if len(paths) > count else paths
    images = [(p.name, cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in picked]
    return [(name, image) for name, image in images if image is not None]


def generated_images(count: int = 2, size: int = 640) -> list:
    """Images to run an export on when no dataset is at hand: noise with coloured shapes (it proves the
    export loads and runs like the checkpoint; what it finds there is whatever it finds)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        image = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 4, 2))
            cv2.rectangle(image, (x, y), (x + w, y + h), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        images.append((f"generated-{i}", image))
    return images


def store_exports(storage: Storage, exports: list[Export], prefix: str) -> None:
    """Upload each verified export under prefix (a folder export file by file); a failed upload is
    reported on that export."""
    for export in exports:
        if export.error is not None:
            continue
        try:
            if export.path.is_dir():
                for f in sorted(p for p in export.path.rglob("*") if p.is_file()):
                    storage.upload(f, storage.locate(f"{prefix}{export.path.name}/{f.relative_to(export.path).as_posix()}"))
                export.uri = storage.uri(storage.locate(f"{prefix}{export.path.name}/"))
            else:
                export.uri = storage.upload(export.path, storage.locate(prefix + export.path.name))
        except (TrainerError, OSError) as e:
            export.error = f"upload failed: {e}"
            LOGGER.warning("%s: %s", export.format, export.error)


def log_exports(tracker, exports: list[Export]) -> None:
    """The verified exports as MLflow artifacts under export/."""
    for export in exports:
        if export.error is not None:
            continue
        if export.path.is_dir():
            for folder in sorted({f.parent for f in export.path.rglob("*") if f.is_file()}):
                rel = folder.relative_to(export.path.parent).as_posix()
                tracker.log_artifacts(sorted(f for f in folder.iterdir() if f.is_file()), f"export/{rel}")
        else:
            tracker.log_artifacts([export.path], "export")


def status_fields(exports: list[Export]) -> dict:
    """The final status's `exports` ({format: URI}) and `export_errors` ({format: why})."""
    fields = {"exports": {e.format: e.uri for e in exports if e.error is None}}
    errors = {e.format: e.error for e in exports if e.error is not None}
    if errors:
        fields["export_errors"] = errors
    return fields


def load_export(path: Path, task: str | None, device: str):
    """An export as an Ultralytics model, loaded now (a broken file fails here, not at the first image),
    for the task its metadata records, else TASK_TYPE's."""
    from ultralytics import YOLO

    task = export_task(path) or task
    if task is None:
        raise BadInput(f"{path.name} is not a checkpoint (.pt), nor an Ultralytics export whose metadata names its "
                       "task; if it is an export, set TASK_TYPE")
    model = YOLO(str(path), task=task)
    model.overrides["device"] = device  # AutoBackend is set up on this device, the one predictions use
    model.names  # noqa: B018 - sets up AutoBackend
    return model


def export_task(path: Path) -> str | None:
    """The task an Ultralytics export carries in its metadata, or None (not an export, or none recorded)."""
    try:
        from ultralytics.nn.backends.base import BaseBackend

        task = BaseBackend.read_metadata(str(path)).get("task")
    except Exception:
        return None
    return task if task in ("detect", "segment", "classify", "pose", "obb") else None


# ----------------------------------------------------------------------------------------------
# train.py's step
# ----------------------------------------------------------------------------------------------


def export_after_training(storage: Storage, settings: Settings, tracker, backend, weights: Path, data: Path,
                          should_stop: Callable[[], bool]) -> dict:
    """EXPORT_FORMATS: export best.pt, verify, store under checkpoints/job-{JOB_ID}/export/, log to MLflow.

    Returns the final status's fields (none when EXPORT_FORMATS is empty). Never raises: an export
    that fails is a warning and an `export_errors` entry.
    """
    if not settings.export_formats:
        return {}
    try:
        images = validation_images(data, settings.export_verify_images)
        exports = export_checkpoint(weights, settings.export_formats, settings, images, job_dir(settings) / "export",
                                    settings.imgsz, should_stop)
        store_exports(storage, exports, settings.checkpoint_prefix + "export/")
        log_exports(tracker, exports)
    except Exception as e:  # whatever went wrong around the exports, the trained job stands
        LOGGER.warning("exports failed: %s", _first_line(e), exc_info=True)
        return {"exports": {}, "export_errors": {f: f"failed: {_first_line(e)}" for f in settings.export_formats}}
    for export in exports:
        if export.error is None:  # (a failure was logged as a warning, which the backend gets too)
            backend.log(f"exported {export.format} (verified on {export.verification['images']} images): {export.uri}")
    return status_fields(exports)
