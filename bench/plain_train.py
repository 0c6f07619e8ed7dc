"""The reference for bench/overhead_bench.py: plain Ultralytics training, as a user would run it.

    python -m bench.plain_train DATA_YAML MODEL PROJECT NAME '{"epochs": 8, "imgsz": 64, ...}' [UPLOAD]

One `YOLO(MODEL).train(data=DATA_YAML, project=PROJECT, name=NAME, **ARGS)` call, nothing else.
With UPLOAD, a JSON object {"endpoint", "bucket", "prefix", "access_key", "secret_key"}: the same
training plus what a user would add to keep each epoch's checkpoint in S3 (bench/overhead_bench.py
--upload-reference): after each epoch's save a callback copies last.pt aside and PUTs the copy from
a thread with a plain boto3 client; the uploads are waited for before exit, and a failed one fails
the run. No checks, reports or retries beyond boto3's: the least a checkpoint upload per epoch costs.
The only set-up it shares with train.py is what keeps the comparison fair: Ultralytics offline
with its integrations off (train.py's prepare_ultralytics switches off the same ones, and its
own MLflow run is what is being measured) and the same timestamped logging, to stderr, with
Ultralytics' messages routed through it (train.py's setup_logging).
"""

import json
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel("INFO")


def checkpoint_upload(target: dict):
    """Ultralytics callbacks that put a copy of each epoch's last.pt in S3 from one thread, and what to
    call at the end (waits for the uploads, raises the first that failed, removes the copies' folder)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=target["endpoint"], aws_access_key_id=target["access_key"],
                      aws_secret_access_key=target["secret_key"], region_name="us-east-1")
    pool = ThreadPoolExecutor(1)
    staging = Path(tempfile.mkdtemp(prefix="plain-upload-"))
    uploads, saved = [], []

    def put(path: Path, key: str) -> None:
        with path.open("rb") as body:
            s3.put_object(Bucket=target["bucket"], Key=key, Body=body)
        path.unlink()

    def on_model_save(trainer) -> None:
        saved.append(trainer.epoch)

    def on_fit_epoch_end(trainer) -> None:
        # after this epoch's save (Ultralytics calls it once more for the final validation, after stripping
        # last.pt: no save then, no upload); rewritten next epoch, so a copy goes up
        if saved:
            copy = staging / f"last-{saved.pop()}.pt"
            saved.clear()
            shutil.copyfile(trainer.last, copy)
            uploads.append(pool.submit(put, copy, target["prefix"] + "last.pt"))

    def finish() -> None:
        try:
            pool.shutdown(wait=True)
            for upload in uploads:  # a reference whose uploads failed would look cheap
                upload.result()
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return {"on_model_save": on_model_save, "on_fit_epoch_end": on_fit_epoch_end}, finish


def main() -> None:
    data, model, project, name, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    upload = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
    setup_logging()
    from ultralytics import YOLO, settings
    from ultralytics.utils import LOGGER

    settings.update({"sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False, "wandb": False,
                     "tensorboard": False, "raytune": False})
    LOGGER.handlers.clear()
    LOGGER.propagate = True
    yolo = YOLO(model)
    finish = None
    if upload:
        callbacks, finish = checkpoint_upload(upload)
        for event, callback in callbacks.items():
            yolo.add_callback(event, callback)
    try:
        yolo.train(data=data, project=project, name=name, exist_ok=True, **args)
    finally:
        if finish:
            finish()


if __name__ == "__main__":
    main()
