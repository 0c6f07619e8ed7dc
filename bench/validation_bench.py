"""What the per-epoch validation extras cost: per-image results and the confusion matrix, against
the validation pass Ultralytics runs anyway.

    python -m bench.validation_bench [--tasks detect,segment,pose,obb,classify] [--val 200] [--imgsz 128]

For each task it trains a from-scratch model in this process (generated shapes, 2 epochs, CPU)
with the trainer's own ValidationCapture riding along every epoch's validation, exactly as
train.py attaches it, and prints per epoch: the validation pass's wall time (on_val_start to
on_val_end), the time spent inside the capture, and the time to build the epoch's bodies
(epoch_report). The target: capture + bodies <= 2% of the validation time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.sample_data import make_dataset  # noqa: E402

MODELS = {"detect": "yolo11n.yaml", "segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml",
          "obb": "yolo11n-obb.yaml", "classify": "yolo11n-cls.yaml"}


def measure(task: str, folder: Path, args) -> list[tuple[int, float, float, float]]:
    from ultralytics import YOLO

    from validation import ValidationCapture, contract_metrics, epoch_report

    root = make_dataset(folder / task, task, n_train=args.train, n_val=args.val, size=args.imgsz)
    capture = ValidationCapture(root, 50, 0.25)
    rows, started = [], {}

    def on_val_start(validator):
        if validator.training:
            capture.attach(validator)
            capture.start()
            started["t"] = time.perf_counter()

    def on_val_end(validator):
        if validator.training:
            capture.stop()
            started["val"] = time.perf_counter() - started["t"]

    def on_fit_epoch_end(trainer):
        if "val" not in started:
            return
        t = time.perf_counter()
        epoch_report(task, trainer.epoch + 1, trainer.epochs, contract_metrics(trainer.metrics, trainer.fitness),
                     {}, trainer.validator, capture)
        rows.append((trainer.epoch + 1, started.pop("val"), capture.seconds, time.perf_counter() - t))

    model = YOLO(MODELS[task])
    for event, hook in (("on_val_start", on_val_start), ("on_val_end", on_val_end),
                        ("on_fit_epoch_end", on_fit_epoch_end)):
        model.add_callback(event, hook)
    from datasets import resolve_data_yaml

    data = root if task == "classify" else resolve_data_yaml(root, folder / f"{task}.yaml")[0]
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=0, device="cpu",
                project=str(folder / "runs"), name=task, plots=False, verbose=False, val=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="detect,segment,pose,obb,classify")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        from models import prepare_ultralytics

        prepare_ultralytics(Path(tmp))
        results = {task: measure(task, Path(tmp), args) for task in args.tasks.split(",")}
    print(f"\n{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, {args.val} validation images "
          f"at imgsz={args.imgsz}, per-image results for 50 of them\n")
    print("| task | epoch | validation s | capture s | bodies s | extras / validation |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for task, rows in results.items():
        for epoch, val, cap, bodies in rows:
            print(f"| {task} | {epoch} | {val:.2f} | {cap:.3f} | {bodies:.3f} | {100 * (cap + bodies) / val:.2f}% |")


if __name__ == "__main__":
    main()
