"""Evaluate a trained YOLO checkpoint on a dataset's test split and print one JSON document.

Test-set numbers, separate from the validation used during training: the dataset's `test` split,
or `val` when it has none, through Ultralytics' own validator. Configuration comes from the
environment (and ./.env for hand runs):

    CHECKPOINT_URI=s3://bucket/checkpoints/job-7/best.pt DATASET_ID=shapes python evaluate.py > evaluation.json
    JOB_ID=7 DATASET_URI=data/shapes.zip STORAGE_TYPE=local IMGSZ=640 python evaluate.py

The checkpoint may also be an export (.onnx, .torchscript), as for predict.py. IMGSZ unset: the
size the checkpoint was trained at. BATCH_SIZE, DEVICE, WORKERS and VALIDATION_CONF (the
confusion matrix's confidence threshold) apply as in training.

Output: {"checkpoint", "dataset", "split", "task", "task_type", "images", "primary_metric_name",
"primary_metric_value", "metrics" (the contract's names), "class_names", "per_class_metrics",
"confusion_matrix" (row = true class, column = predicted), "speed_ms_per_image"}. Logs go to
stderr; on failure stdout stays empty. Exit codes as train.py: 0, 2 bad configuration or input
(checkpoint or dataset missing or invalid, TASK_TYPE mismatch), 75 storage failing, 1 unexpected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from dotenv import load_dotenv

import cache
import cli
from config import job_dir, load_settings, log_configuration
from datasets import download_dataset
from evaluation import evaluate, test_split
from models import prepare_ultralytics
from predict import fetch_checkpoint, load_model
from storage import Storage
from utils import EXIT_OK, Redactor, exit_now, failure_code, setup_logging

LOGGER = logging.getLogger("trainer.evaluate")


def main() -> int:
    if (code := cli.handle(sys.argv[1:], "evaluate", __doc__)) is not None:  # --help, --check
        return code
    load_dotenv(Path.cwd() / ".env", override=False)
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact)
    json_out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the real stdout, kept for the document
    os.dup2(2, 1)  # anything else that prints (Ultralytics, C libraries) lands on stderr
    sys.stdout = sys.stderr
    settings = None  # with a folder of its own in WORK_DIR: the one removed at the end
    try:
        configured = load_settings(os.environ, "evaluate")
        # a folder of its own, even beside a training job of the same JOB_ID (never that job's folder)
        settings = dataclasses.replace(configured, job_id=f"evaluate-{os.getpid()}-{time.time_ns()}")
        log_configuration(configured)
        storage = Storage(settings.storage)
        prepare_ultralytics(settings.work_dir)
        model = load_model(fetch_checkpoint(storage, settings), settings)
        data, _ = download_dataset(storage, settings)
        split = test_split(data) or "val"
        imgsz = settings.imgsz if os.environ.get("IMGSZ", "").strip() else None  # unset: the training size
        report = evaluate(model, data, split, settings, job_dir(settings) / "evaluate", imgsz)
        document = {"checkpoint": storage.uri(storage.locate(settings.checkpoint_uri))
                    if not Path(settings.checkpoint_uri).expanduser().is_file() else settings.checkpoint_uri,
                    "dataset": settings.dataset_uri, **report}
    except Exception as e:
        return failure_code(LOGGER, "evaluation", e, redact)
    else:
        json_out.write(json.dumps(document) + "\n")
        json_out.flush()
        return EXIT_OK
    finally:
        if settings is not None:
            cache.remove_job_files(settings)


if __name__ == "__main__":
    exit_now(main())  # the job is done and reported: no interpreter teardown (utils.exit_now)
