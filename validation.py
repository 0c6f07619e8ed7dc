"""What one validation pass tells the platform: the bodies of the contract's per-epoch callbacks.

Ultralytics validates the model after every epoch. This module turns what that validation saw
into the bodies the platform's backend stores (../shared/CONTRACT.md, "Callbacks"):

- `validation-results`: the platform's task name, the primary metric, the contract's metric keys
  beside the names the UI reads, per-class metrics, and the confusion matrix (row = true class);
- `validation-image-results`: true and predicted boxes (or labels) of the first validation images;
- `training-metrics`: one row with every number of the epoch.

Per-image results and the detection confusion matrix are taken from inside the validation loop
Ultralytics already runs (`ValidationCapture` wraps the validator's `update_metrics`), so there is
no second inference pass. Ultralytics fills its own detection confusion matrix only when it plots;
classification's it always fills, and that one is used as it is.

Reads no environment variable (VALIDATION_IMAGES and VALIDATION_CONF arrive as arguments).
Imports: utils; numpy, torch and Ultralytics lazily, inside the functions that need them.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from config import PLATFORM_TASKS

LOGGER = logging.getLogger("trainer")

DATASET_MOUNT = "/workspace/dataset/"  # the backend maps this prefix onto its own copy of the dataset
MAX_BOXES = 100  # predicted boxes per image in validation-image-results
IOU_MATCH = 0.45  # a prediction and a true box are the same object above this IoU (Ultralytics' matrix rule)

_METRIC = re.compile(r"metrics/(precision|recall|mAP50|mAP50-95)\(([BMP])\)")
_KIND_PREFIX = {"B": "", "M": "mask_", "P": "pose_"}
# The same numbers under the names the platform's UI reads (contract name -> UI name).
_UI_NAMES = {"mAP50": "mAP@0.5", "mAP50-95": "mAP@0.5:0.95", "mask_precision": "precision(M)",
             "mask_recall": "recall(M)", "mask_mAP50": "mAP50(M)", "mask_mAP50-95": "mAP50-95(M)",
             "top1": "accuracy", "top5": "top5_accuracy"}


# ----------------------------------------------------------------------------------------------
# Metrics under the contract's names
# ----------------------------------------------------------------------------------------------


def finite_floats(values: dict) -> dict:
    """Floats only; NaN and infinity (no JSON for them) are left out."""
    out = {}
    for k, v in values.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[k] = v
    return out


def contract_metrics(raw: dict, fitness: float | None) -> dict:
    """Ultralytics' validation metrics under the contract's names (mAP50, mask_mAP50, top1, val/box_loss...)
    and again under the names the UI reads (mAP@0.5, mAP50(M), accuracy...)."""
    out = {}
    for key, value in raw.items():
        if m := _METRIC.fullmatch(key):
            name = _KIND_PREFIX[m.group(2)] + m.group(1)
        elif key.startswith("metrics/accuracy_top"):
            name = "top" + key[len("metrics/accuracy_top"):]
        else:
            name = key.removeprefix("metrics/")
        out[name] = value
    if fitness is not None:
        out["fitness"] = fitness
    out = finite_floats(out)
    out.update({ui: out[name] for name, ui in _UI_NAMES.items() if name in out})
    return out


def primary_metric(task: str, metrics: dict) -> tuple[str, float]:
    """The contract's primary metric: top-1 accuracy for classification, box mAP50 for the others."""
    if task == "classify":
        return "accuracy", metrics.get("top1", 0.0)
    return "mAP@0.5", metrics.get("mAP50", 0.0)


def loss_sum(values: dict, prefix: str) -> float | None:
    """The sum of the losses named prefix/<name> (train/box_loss + train/cls_loss + ...)."""
    losses = [v for k, v in values.items() if k.startswith(prefix)]
    return round(sum(losses), 6) if losses else None


# ----------------------------------------------------------------------------------------------
# Per-class metrics and the confusion matrix
# ----------------------------------------------------------------------------------------------


def class_names(names: dict | list) -> list[str]:
    """Ultralytics' {id: name} (or a list) as a list whose index is the class id."""
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    return [str(n) for n in names]


def detection_per_class(metrics, names: list[str], task: str) -> dict:
    """Per-class AP50, AP50-95, precision, recall and support from Ultralytics' DetMetrics (and
    its mask or pose counterpart). A class without validation targets gets zeros and support 0."""
    support = getattr(metrics, "nt_per_class", None)
    extra = {"segment": ("seg", "M"), "pose": ("pose", "P")}.get(task)
    rows = {}
    for c, name in enumerate(names):
        rows[name] = {"ap_50": 0.0, "ap_50_95": 0.0, "precision": 0.0, "recall": 0.0,
                      "support": int(support[c]) if support is not None and c < len(support) else 0}
        if extra:
            rows[name].update({f"{k}({extra[1]})": 0.0 for k in ("ap_50", "ap_50_95", "precision", "recall")})
    for i, c in enumerate(metrics.ap_class_index):
        row = rows[names[int(c)]]
        row.update(_class_row(metrics.box, i, ""))
        if extra:
            row.update(_class_row(getattr(metrics, extra[0]), i, f"({extra[1]})"))
    return rows


def _class_row(metric, i: int, suffix: str) -> dict:
    values = {"ap_50": metric.ap50[i], "ap_50_95": metric.ap[i], "precision": metric.p[i], "recall": metric.r[i]}
    return {k + suffix: round(float(v), 6) for k, v in values.items()}


def true_by_predicted(matrix, nc: int) -> list[list[int]]:
    """Ultralytics' matrix[predicted][true] (with a background row and column for detection) as the
    contract's N x N list, row = true class, column = predicted."""
    import numpy as np

    square = np.asarray(matrix)[:nc, :nc]
    return [[int(round(v)) for v in row] for row in square.T]


def classification_per_class(confusion: list[list[int]], names: list[str]) -> tuple[dict, dict]:
    """Per-class precision, recall, F1 and support from a confusion matrix (row = true class), and the
    support-weighted precision, recall and F1 over classes."""
    rows, weighted, total = {}, {"precision": 0.0, "recall": 0.0, "f1_score": 0.0}, 0
    for c, name in enumerate(names):
        hits = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[name] = {"precision": round(precision, 6), "recall": round(recall, 6), "f1_score": round(f1, 6),
                      "support": support}
        for key, value in (("precision", precision), ("recall", recall), ("f1_score", f1)):
            weighted[key] += value * support
        total += support
    return rows, {k: round(v / total, 6) if total else 0.0 for k, v in weighted.items()}


# ----------------------------------------------------------------------------------------------
# Riding along the validation loop
# ----------------------------------------------------------------------------------------------


class ValidationCapture:
    """Collects, from inside one of Ultralytics' validation passes, the first images' results and
    (for detection-like tasks) a confusion matrix; `seconds` is the time it added to the pass.

    `attach(validator)` wraps the validator's `update_metrics` once; `start()` begins a new pass.
    Any error here switches the capture off with one warning: it never breaks validation.
    """

    def __init__(self, root: Path | None, max_images: int, conf: float):
        self.root = root.resolve() if root else None
        self.max_images = max_images
        self.conf = conf
        self.validator = None
        self.active = False
        self.broken = False
        self.images: list[dict] = []
        self.matrix = None
        self.seen = 0
        self.seconds = 0.0

    def attach(self, validator) -> None:
        if self.validator is validator:
            return
        self.validator = validator
        original = validator.update_metrics

        def update_metrics(preds, batch):
            original(preds, batch)
            self.update(preds, batch)

        validator.update_metrics = update_metrics

    def start(self) -> None:
        """A new validation pass of the attached validator (after `attach`)."""
        import numpy as np

        v = self.validator
        self.images, self.seen, self.seconds = [], 0, 0.0
        self.task = v.args.task
        self.names = class_names(v.names or v.data["names"])
        # [predicted, true] with a background row and column, as Ultralytics keeps it
        self.matrix = None if self.task == "classify" else np.zeros((len(self.names) + 1,) * 2, dtype=np.int64)
        self.active = not self.broken
        if self.task == "classify" and not _sequential(v.dataloader):
            self.max_images = 0  # a shuffled loader gives no way to name its images

    def stop(self) -> None:
        self.active = False

    def update(self, preds, batch) -> None:
        if not self.active:
            return
        started = time.perf_counter()
        try:
            if self.task == "classify":
                self._classify(preds, batch)
            else:
                self._detect(preds, batch)
        except Exception as e:  # never let the platform's extras break Ultralytics' validation
            self.active, self.broken = False, True
            LOGGER.warning("per-image validation results are off for this job: %s: %s", type(e).__name__, e)
        finally:
            self.seconds += time.perf_counter() - started

    def confusion(self) -> list[list[int]] | None:
        """The pass's confusion matrix, row = true class, or None if it could not be made."""
        if self.task == "classify":
            cm = getattr(self.validator, "confusion_matrix", None)
            return true_by_predicted(cm.matrix, len(self.names)) if cm is not None else None
        if self.matrix is None or self.broken:
            return None
        return true_by_predicted(self.matrix, len(self.names))

    # -- detection, segmentation, pose, oriented boxes -------------------------------------------

    def _detect(self, preds: list[dict], batch: dict) -> None:
        """One batch: every image counts in the confusion matrix; the first images become entries.

        Ground truth and the predictions above VALIDATION_CONF leave the device once per batch (one
        transfer, no per-image synchronisation on a GPU); the rest is small NumPy work per image.
        """
        import numpy as np
        import torch

        obb = self.task == "obb"
        height, width = (int(v) for v in batch["img"].shape[2:])
        owner = batch["batch_idx"].reshape(-1).long().cpu().numpy()
        true_cls = batch["cls"].reshape(-1).long().cpu().numpy()
        true = batch["bboxes"].float().cpu().numpy().copy()
        scale = np.array([width, height, width, height], dtype=np.float32)
        if obb:
            true[:, :4] *= scale
        else:
            true = _xywh2xyxy(true) * scale
        kept = [torch.cat([p["bboxes"], p["conf"][:, None], p["cls"][:, None]], 1)[p["conf"] >= self.conf] for p in preds]
        found = torch.cat(kept).float().cpu().numpy() if kept else np.zeros((0, 7 if obb else 6), np.float32)
        per_image = np.split(found, np.cumsum([len(k) for k in kept])[:-1]) if kept else []
        for si, det in enumerate(per_image):
            index = self.seen
            self.seen += 1
            det = det[np.argsort(-det[:, -2], kind="stable")]  # most confident first
            mine = owner == si
            self._count(true_cls[mine], true[mine], det[:, -1].astype(int), det[:, :-2], obb)
            if index < self.max_images:
                self.images.append(self._detect_image(index, batch, si, true_cls[mine], true[mine], det, obb))

    def _count(self, true_cls, true, pred_cls, pred, obb: bool) -> None:
        """Ultralytics' confusion-matrix rule (ConfusionMatrix.process_batch) on NumPy arrays: each
        prediction, most confident first, claims the unclaimed true box it overlaps most (IoU > 0.45),
        class-agnostic; unmatched true boxes count as missed (background row), unmatched predictions as
        false (background column). Predictions arrive sorted by confidence."""
        import numpy as np

        nc, matrix = len(self.names), self.matrix
        if not len(true_cls) or not len(pred_cls):
            np.add.at(matrix, (pred_cls, nc), 1)
            np.add.at(matrix, (nc, true_cls), 1)
            return
        iou = _iou(true, pred, obb)
        match = np.full(len(true_cls), -1)
        for d in np.flatnonzero((iou > IOU_MATCH).any(0)):
            g = iou[:, d].argmax()
            if iou[g, d] > IOU_MATCH:
                match[g] = d
                iou[g] = 0
        hit = match >= 0
        np.add.at(matrix, (pred_cls[match[hit]], true_cls[hit]), 1)
        np.add.at(matrix, (nc, true_cls[~hit]), 1)
        unmatched = np.setdiff1d(np.arange(len(pred_cls)), match[hit])
        np.add.at(matrix, (pred_cls[unmatched], nc), 1)

    def _detect_image(self, index, batch, si, true_cls, true, det, obb) -> dict:
        from ultralytics.utils import ops

        det = det[:MAX_BOXES]
        imgsz = tuple(batch["img"].shape[2:])
        shape, ratio_pad = batch["ori_shape"][si], batch["ratio_pad"][si]
        true_px = ops.scale_boxes(imgsz, true.copy(), shape, ratio_pad=ratio_pad, xywh=obb)
        pred_px = ops.scale_boxes(imgsz, det[:, :-2].copy(), shape, ratio_pad=ratio_pad, xywh=obb)
        true_cls, pred_cls, pred_conf = true_cls.tolist(), det[:, -1].astype(int).tolist(), det[:, -2].tolist()
        entry = self._image_entry(index, batch["im_file"][si])
        entry["true_boxes"] = [_box(c, b, shape, obb) for c, b in zip(true_cls, true_px)]
        entry["predicted_boxes"] = [{**_box(c, b, shape, obb), "confidence": round(p, 5)}
                                    for c, p, b in zip(pred_cls, pred_conf, pred_px)]
        if true_cls:
            entry.update(true_label_id=true_cls[0], true_label=self.names[true_cls[0]])
        if pred_cls:
            entry.update(predicted_label_id=pred_cls[0], predicted_label=self.names[pred_cls[0]],
                         confidence=round(pred_conf[0], 5))
        entry["is_correct"] = bool(set(true_cls) & set(pred_cls))
        if true_cls and pred_cls:
            entry["iou"] = round(float(_iou(true, det[:1, :-2], obb).max()), 5)
        return entry

    # -- classification ------------------------------------------------------------------------

    def _classify(self, preds, batch: dict) -> None:
        count = int(preds.shape[0])
        wanted = max(0, min(count, self.max_images - self.seen))
        if wanted:
            probs = preds[:wanted].float()
            top_conf, top_ids = probs.topk(min(5, probs.shape[1]), dim=1)
            samples = self.validator.dataloader.dataset.samples
            for i, (confs, ids, true) in enumerate(zip(top_conf.tolist(), top_ids.tolist(), batch["cls"][:wanted].tolist())):
                index = self.seen + i
                entry = self._image_entry(index, samples[index][0])
                true, best = int(true), int(ids[0])
                entry.update(true_label_id=true, true_label=self.names[true], predicted_label_id=best,
                             predicted_label=self.names[best], confidence=round(confs[0], 5),
                             top5_predictions=[{"label_id": int(c), "confidence": round(p, 5)} for c, p in zip(ids, confs)],
                             is_correct=best == true)
                self.images.append(entry)
        self.seen += count

    def _image_entry(self, index: int, path: str) -> dict:
        name = self._inside_dataset(path)
        return {"image_name": name, "image_index": index, "image_path": DATASET_MOUNT + name}

    def _inside_dataset(self, path: str) -> str:
        """The image's path inside the dataset (symbolic links of a made-up split resolved)."""
        if self.root:
            prefix = f"{self.root}/"
            for candidate in (str(path), str(Path(path).resolve())):
                if candidate.startswith(prefix):
                    return candidate[len(prefix):]
        return Path(path).name


def _xywh2xyxy(boxes):
    out = boxes.copy()
    out[:, :2] = boxes[:, :2] - boxes[:, 2:4] / 2
    out[:, 2:4] = boxes[:, :2] + boxes[:, 2:4] / 2
    return out


def _iou(true, pred, obb: bool):
    """IoU of every true box (rows) with every predicted box (columns); Ultralytics' probabilistic
    IoU for oriented boxes, as its own matching uses."""
    import numpy as np

    if obb:
        from ultralytics.utils.metrics import batch_probiou

        return np.asarray(batch_probiou(true, pred), dtype=np.float64)
    lt = np.maximum(true[:, None, :2], pred[None, :, :2])
    rb = np.minimum(true[:, None, 2:4], pred[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_t = (true[:, 2] - true[:, 0]) * (true[:, 3] - true[:, 1])
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    return inter / (area_t[:, None] + area_p[None, :] - inter + 1e-7)


def _box(cls: int, box, shape, obb: bool) -> dict:
    """One box in the contract's shape, xyxy in the original image's pixels (an oriented box's hull)."""
    height, width = float(shape[0]), float(shape[1])
    if obb:
        from ultralytics.utils import ops

        corners = ops.xywhr2xyxyxyxy(box[None])[0]
        x1, y1 = corners.min(0).tolist()
        x2, y2 = corners.max(0).tolist()
    else:
        x1, y1, x2, y2 = box[:4].tolist()
    x1, x2 = (round(min(max(v, 0.0), width), 2) for v in (x1, x2))
    y1, y2 = (round(min(max(v, 0.0), height), 2) for v in (y1, y2))
    return {"class_id": cls, "bbox": [x1, y1, x2, y2], "format": "xyxy"}


def _sequential(loader) -> bool:
    """True when the loader yields its dataset in order (no random sampling)."""
    from torch.utils.data import RandomSampler

    sampler = getattr(loader, "sampler", None)
    return not isinstance(sampler, RandomSampler) and not getattr(sampler, "shuffle", False)


def sequential_val_loader(trainer) -> None:
    """Classification validates on a shuffled loader, whose images cannot be named afterwards: give
    the trainer and its validator the same loader in dataset order (metrics do not depend on order)."""
    loader = trainer.test_loader
    if loader is None or _sequential(loader):
        return
    from ultralytics.data import build_dataloader

    ordered = build_dataloader(loader.dataset, loader.batch_size, loader.num_workers, shuffle=False,
                               rank=-1, device=trainer.device)
    trainer.test_loader = ordered
    if getattr(trainer, "validator", None) is not None:
        trainer.validator.dataloader = ordered
    if hasattr(loader, "close"):
        loader.close()


# ----------------------------------------------------------------------------------------------
# The bodies
# ----------------------------------------------------------------------------------------------


def epoch_report(task: str, epoch: int, total: int, metrics: dict, train: dict, validator,
                 capture: ValidationCapture | None) -> tuple[dict, list[dict], dict]:
    """The epoch's validation-results body, its per-image results and its training-metrics row.

    Args:
        task: Ultralytics' task name.
        metrics: the validation metrics under the contract's names (contract_metrics).
        train: the training losses (train/<name>) and learning rates (lr/pg<i>).
        validator: Ultralytics' validator after the pass (per-class metrics, names).
        capture: what rode along the pass, or None.
    """
    names = class_names(validator.names or validator.data["names"])
    confusion = capture.confusion() if capture else None
    metrics = dict(metrics)
    per_class = None
    if task == "classify":
        if confusion:
            per_class, weighted = classification_per_class(confusion, names)
            metrics.update(weighted)
    else:
        per_class = detection_per_class(validator.metrics, names, task)
    name, value = primary_metric(task, metrics)
    val_loss = loss_sum(metrics, "val/")
    body = {"epoch": epoch, "total_epochs": total, "task_type": PLATFORM_TASKS[task], "task": task,
            "primary_metric_name": name, "primary_metric_value": value, "metrics": metrics,
            "class_names": names}
    if val_loss is not None:
        body["overall_loss"] = val_loss
    if per_class is not None:
        body["per_class_metrics"] = per_class
    if confusion is not None:
        body["confusion_matrix"] = confusion
    return body, list(capture.images) if capture else [], training_row(epoch, metrics, train, value, val_loss)


def training_row(epoch: int, metrics: dict, train: dict, primary: float, val_loss: float | None) -> dict:
    """The training-metrics row: every number of the epoch, the summed losses, the primary metric."""
    loss = loss_sum(train, "train/")
    extra: dict[str, Any] = {**train, **metrics}
    if loss is not None:
        extra["train_loss"] = loss
    if val_loss is not None:
        extra["val_loss"] = val_loss
    row = {"epoch": epoch, "step": epoch, "accuracy": primary, "extra_metrics": extra}
    if loss is not None:
        row["loss"] = loss
    if "lr/pg0" in train:
        row["learning_rate"] = train["lr/pg0"]
    return row
