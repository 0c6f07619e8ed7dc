"""Export a trained YOLO checkpoint to deployable formats, verify each export, and print one JSON document.

The platform runs export jobs separately from training; the configuration comes from the
environment (and ./.env for hand runs):

    CHECKPOINT_URI=s3://bucket/checkpoints/job-7/best.pt EXPORT_FORMATS=onnx,torchscript python export.py
    JOB_ID=7 DATASET_ID=shapes EXPORT_FORMATS=onnx STORAGE_TYPE=local python export.py > exports.json

Steps: fetch the checkpoint -> pick the images to compare on (DATASET_ID/DATASET_URI's validation
images, else generated ones: then the check proves the export loads and runs like the checkpoint)
-> export each format with Ultralytics' exporter and verify it (exports.py) -> upload the verified
files to EXPORT_OUTPUT_URI (default: an `export/` prefix beside the checkpoint in storage, which
for a job's best.pt is train.py's `checkpoints/job-{JOB_ID}/export/`; a local checkpoint's exports
stay in a local `export/` folder beside it unless EXPORT_OUTPUT_URI is set).

Output: {"checkpoint", "task", "imgsz", "output_uri", "exports": [{"format", "ok", "uri", "file",
"seconds", "verification", "error"?}], "exported": {format: uri}, "failed": {format: why}}.
Exit codes as train.py: 0 when at least one format was exported and verified (the others are in
"failed"); 2 bad configuration or input, including no format exported at all (each format's reason
is logged; stdout stays empty); 75 storage failing; 1 anything unexpected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath

from dotenv import load_dotenv

import cache
import cli
from config import Settings, job_dir, load_settings, log_configuration
from datasets import download_dataset
from exports import export_checkpoint, generated_images, store_exports, validation_images
from models import prepare_ultralytics
from predict import fetch_checkpoint
from storage import Storage
from utils import EXIT_OK, BadInput, Redactor, exit_now, failure_code, setup_logging

LOGGER = logging.getLogger("trainer.export")


def output_prefix(storage: Storage, settings: Settings, weights: Path) -> str | None:
    """EXPORT_OUTPUT_URI, else `export/` beside the checkpoint in storage; None for a local checkpoint
    (its exports stay in a local export/ folder beside it)."""
    if settings.export_output_uri:
        return settings.export_output_uri
    ref = settings.checkpoint_uri
    if not ref.startswith("s3://") and Path(ref).expanduser().is_file():
        return None
    loc = storage.locate(ref)
    parent = str(PurePosixPath(loc.key).parent)
    return f"s3://{loc.bucket}/" + ("" if parent == "." else parent + "/") + "export/"


def comparison_images(storage: Storage, settings: Settings) -> tuple[list, str]:
    """The images exports are compared on, and where they come from."""
    if not settings.dataset_uri:
        return generated_images(2), "generated"
    if settings.export_verify_images <= 0:  # (export_checkpoint then loads and runs each export on one)
        return [], "generated"
    data, _ = download_dataset(storage, settings)
    images = validation_images(data, settings.export_verify_images)
    return images, f"validation images of {settings.dataset_uri}" if images else "generated"


def keep_locally(exports: list, weights: Path) -> None:
    """A local checkpoint without EXPORT_OUTPUT_URI: its verified exports go to export/ beside it."""
    folder = weights.parent / "export"
    folder.mkdir(exist_ok=True)
    for export in exports:
        if export.error is None:
            target = folder / export.path.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(export.path), target)
            export.path = target
            export.uri = target.as_uri()


def main() -> int:
    if (code := cli.handle(sys.argv[1:], "export", __doc__)) is not None:  # --help, --check
        return code
    load_dotenv(Path.cwd() / ".env", override=False)
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact)
    json_out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the real stdout, kept for the document
    os.dup2(2, 1)  # anything else that prints (Ultralytics, exporters, C libraries) lands on stderr
    sys.stdout = sys.stderr
    settings = None  # with a folder of its own in WORK_DIR: the one removed at the end
    try:
        configured = load_settings(os.environ, "export")
        # a folder of its own, even beside a training job of the same JOB_ID (never that job's folder)
        settings = dataclasses.replace(configured, job_id=f"export-{os.getpid()}-{time.time_ns()}")
        log_configuration(configured)
        storage = Storage(settings.storage)
        prepare_ultralytics(settings.work_dir)
        weights = fetch_checkpoint(storage, settings)
        prefix = output_prefix(storage, settings, weights)
        images, source = comparison_images(storage, settings)
        imgsz = settings.imgsz if os.environ.get("IMGSZ", "").strip() else None  # unset: the training size
        exports = export_checkpoint(weights, settings.export_formats, settings, images, job_dir(settings) / "export",
                                    imgsz)
        if prefix is None:
            keep_locally(exports, weights)
        else:
            store_exports(storage, exports, prefix)
        document = {"checkpoint": str(weights) if prefix is None else storage.uri(storage.locate(settings.checkpoint_uri)),
                    "task": exports[0].task, "imgsz": exports[0].imgsz, "images": source,
                    "output_uri": prefix and storage.uri(storage.locate(prefix)),
                    "exports": [e.as_dict() for e in exports],
                    "exported": {e.format: e.uri for e in exports if e.error is None},
                    "failed": {e.format: e.error for e in exports if e.error is not None}}
        if not document["exported"]:
            raise BadInput("no format could be exported: " + "; ".join(f"{k}: {v}" for k, v in document["failed"].items()))
    except Exception as e:
        return failure_code(LOGGER, "export", e, redact)
    else:
        json_out.write(json.dumps(document) + "\n")
        json_out.flush()
        return EXIT_OK
    finally:
        if settings is not None:
            cache.remove_job_files(settings)


if __name__ == "__main__":
    exit_now(main())  # the job is done and reported: no interpreter teardown (utils.exit_now)
