"""validation.py: Ultralytics' validation numbers under the contract's names and shapes (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from validation import (
    classification_per_class,
    contract_metrics,
    detection_per_class,
    epoch_report,
    primary_metric,
    true_by_predicted,
)


def det_metrics(names: dict):
    """Ultralytics' own DetMetrics, fed with the statistics of a small validation (3 classes, class 2 unseen)."""
    from ultralytics.utils.metrics import DetMetrics

    metrics = DetMetrics(names=names)
    rng = np.random.default_rng(0)
    for image in range(6):
        n_pred, targets = 5, np.array([0, 0, 1] if image % 2 else [1, 0])
        metrics.update_stats({"tp": rng.random((n_pred, 10)) > 0.4, "conf": rng.random(n_pred),
                              "pred_cls": rng.integers(0, 2, n_pred).astype(float), "target_cls": targets.astype(float),
                              "target_img": np.unique(targets).astype(float), "im_name": f"{image}.jpg"})
    metrics.process()
    return metrics


def test_per_class_metrics_are_ultralytics_own_per_class_numbers():
    names = {0: "cat", 1: "dog", 2: "bird"}
    metrics = det_metrics(names)
    rows = detection_per_class(metrics, list(names.values()), "detect")
    summary = {row["Class"]: row for row in metrics.summary(decimals=6)}  # Ultralytics' own per-class table
    assert set(summary) == {"cat", "dog"}
    for name, theirs in summary.items():
        ours = rows[name]
        assert ours["ap_50"] == pytest.approx(theirs["mAP50"], abs=1e-6)
        assert ours["ap_50_95"] == pytest.approx(theirs["mAP50-95"], abs=1e-6)
        assert ours["precision"] == pytest.approx(theirs["Box-P"], abs=1e-6)
        assert ours["recall"] == pytest.approx(theirs["Box-R"], abs=1e-6)
        assert ours["support"] == theirs["Instances"]
    assert rows["bird"] == {"ap_50": 0.0, "ap_50_95": 0.0, "precision": 0.0, "recall": 0.0, "support": 0}
    assert rows["cat"]["support"] == 9 and rows["dog"]["support"] == 6


def test_confusion_matrix_is_transposed_to_row_true_and_background_left_out():
    ultralytics = np.array([[5, 1, 2],    # predicted cat: 5 true cats, 1 true dog, 2 background
                            [0, 4, 3],    # predicted dog
                            [1, 2, 0]])   # background (missed): 1 cat, 2 dogs
    assert true_by_predicted(ultralytics, 2) == [[5, 0], [1, 4]]
    assert all(isinstance(v, int) for row in true_by_predicted(ultralytics.astype(float), 2) for v in row)


def test_classification_precision_recall_f1_come_from_the_confusion_matrix():
    confusion = [[8, 2],   # true cat: 8 right, 2 taken for dogs
                 [1, 9]]   # true dog
    rows, weighted = classification_per_class(confusion, ["cat", "dog"])
    assert rows["cat"] == {"precision": pytest.approx(8 / 9), "recall": 0.8, "f1_score": pytest.approx(2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), abs=1e-6),
                           "support": 10}
    assert rows["dog"]["precision"] == pytest.approx(9 / 11, abs=1e-6) and rows["dog"]["recall"] == 0.9
    assert weighted["recall"] == pytest.approx(0.85)  # weighted recall is accuracy
    assert weighted["precision"] == pytest.approx((8 / 9 + 9 / 11) / 2, abs=1e-6)


def test_metric_names_for_the_contract_and_the_ui():
    raw = {"metrics/precision(B)": 0.5, "metrics/mAP50(B)": 0.4, "metrics/mAP50-95(B)": 0.2, "metrics/mAP50(M)": 0.3,
           "metrics/precision(M)": 0.6, "val/box_loss": 1.5, "val/seg_loss": float("nan")}
    m = contract_metrics(raw, 0.25)
    assert m["mAP50"] == 0.4 and m["mAP@0.5"] == 0.4 and m["mAP@0.5:0.95"] == 0.2
    assert m["mask_mAP50"] == 0.3 and m["mAP50(M)"] == 0.3 and m["precision(M)"] == 0.6
    assert m["fitness"] == 0.25 and "val/seg_loss" not in m  # NaN has no JSON
    cls = contract_metrics({"metrics/accuracy_top1": 0.9, "metrics/accuracy_top5": 1.0}, None)
    assert cls["top1"] == cls["accuracy"] == 0.9 and cls["top5_accuracy"] == 1.0
    assert primary_metric("classify", cls) == ("accuracy", 0.9)
    assert primary_metric("obb", m) == ("mAP@0.5", 0.4)


def test_epoch_report_has_every_required_field_of_the_contract():
    from types import SimpleNamespace

    from tests.contract_schemas import TrainingMetrics, ValidationResult

    names = {0: "cat", 1: "dog", 2: "bird"}
    validator = SimpleNamespace(names=names, metrics=det_metrics(names), data={"names": names})
    metrics = contract_metrics({"metrics/mAP50(B)": 0.4, "val/box_loss": 1.0, "val/cls_loss": 0.5}, 0.3)
    body, images, row = epoch_report("obb", 2, 5, metrics, {"train/box_loss": 2.0, "train/cls_loss": 1.0,
                                                             "lr/pg0": 0.01}, validator, None)
    ValidationResult.model_validate({**body, "event_id": "x"})
    TrainingMetrics.model_validate({**row, "event_id": "x"})
    assert body["task_type"] == "oriented_detection" and body["overall_loss"] == 1.5 and images == []
    assert row["loss"] == 3.0 and row["extra_metrics"]["train_loss"] == 3.0 and row["extra_metrics"]["val_loss"] == 1.5
    assert row["learning_rate"] == 0.01 and row["accuracy"] == 0.4


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matrix_follows_ultralytics_own_rule(seed):
    """The capture counts on NumPy copies (one device transfer per batch); it must count exactly as
    Ultralytics' ConfusionMatrix.process_batch does."""
    import torch
    from ultralytics.utils.metrics import ConfusionMatrix

    from validation import ValidationCapture

    rng = np.random.default_rng(seed)
    names = {0: "a", 1: "b", 2: "c"}
    theirs = ConfusionMatrix(names=names)
    ours = ValidationCapture(None, 0, 0.25)
    ours.names, ours.matrix = list(names.values()), np.zeros((4, 4), dtype=np.int64)
    for _ in range(20):
        n_true, n_pred = rng.integers(0, 5), rng.integers(0, 8)
        centres = rng.uniform(10, 90, (max(n_true, 1), 2))
        true = np.concatenate([centres - 8, centres + 8], 1)[:n_true]
        pick = rng.integers(0, max(n_true, 1), n_pred)
        jitter = rng.normal(0, 4, (n_pred, 4))
        pred = (np.concatenate([centres - 8, centres + 8], 1)[pick] + jitter) if n_true else rng.uniform(0, 100, (n_pred, 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
        conf = np.sort(rng.uniform(0.3, 1, n_pred))[::-1].copy()
        true_cls, pred_cls = rng.integers(0, 3, n_true), rng.integers(0, 3, n_pred)
        theirs.process_batch({"bboxes": torch.tensor(pred, dtype=torch.float32), "conf": torch.tensor(conf),
                              "cls": torch.tensor(pred_cls)},
                             {"bboxes": torch.tensor(true, dtype=torch.float32), "cls": torch.tensor(true_cls)}, conf=0.0)
        ours._count(true_cls, true.astype(np.float32), pred_cls, pred.astype(np.float32), obb=False)
    assert ours.matrix.tolist() == theirs.matrix.astype(int).tolist()
