"""Run a trained YOLO checkpoint on images and print the results as one JSON document.

The backend runs it as a subprocess and parses its standard output; every log line goes to
standard error. Configuration comes from the environment (and ./.env for hand runs):

    CHECKPOINT_URI=s3://bucket/checkpoints/job-7/best.pt INPUT_URI=s3://bucket/images/ python predict.py
    JOB_ID=7 INPUT_URI=photo.jpg STORAGE_TYPE=local python predict.py > predictions.json

Output: {"predictions": [{"image", "width", "height", "detections": [...]}, ...], "count": N, ...}

Images are listed lazily (storage listings page by page), downloaded and decoded by a pool
of threads ahead of the model, run in batches, and each result is written to a spool file at
once, so memory stays flat however many images there are. The document is printed only
when every image has been handled; on failure stdout stays empty and the exit code says why.
An image that cannot be read or decoded is an error entry in the document; storage failing for
10 images in a row, or for every image, is an outage that fails the run (exit 75).

In a Kubernetes Indexed Job (JOB_COMPLETION_INDEX set, PREDICT_SHARDS pods) each pod takes the
images whose key hashes to its index (shards.py) and writes predictions-{index}.json.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from dotenv import load_dotenv

import cli
from config import Settings, load_settings, log_configuration
from datasets import image_files, is_image_name
from exports import load_export
from jsonlog import json_logging
from models import default_device, offline_environment, prepare_ultralytics, ultralytics_message
from shards import Shard
from storage import Storage, StorageNotFound, fetch_file
from utils import (
    EXIT_OK,
    BadInput,
    Redactor,
    TransientError,
    available_cpus,
    exit_now,
    failure_code,
    in_background,
    setup_logging,
)

LOGGER = logging.getLogger("trainer.predict")

# Decoded pixels held ahead of the model, and in one batch, at most: 16 images of 4K (25 MB each)
# fit; 64-megapixel photos (192 MB decoded) go three at a time.
HELD_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class InputImage:
    name: str  # how the output names it: the local path or the s3:// URI
    read: Callable[[], bytes]
    key: str = ""  # its path relative to INPUT_URI: what sharding hashes


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def fetch_checkpoint(storage: Storage, settings: Settings) -> Path:
    """The checkpoint as a local file: a local path as is, else downloaded once (cached by ETag)."""
    try:
        return fetch_file(storage, settings.checkpoint_uri, settings.work_dir)
    except StorageNotFound:
        raise BadInput(f"checkpoint not found: {storage.uri(storage.locate(settings.checkpoint_uri))}") from None


def load_model(weights: Path, settings: Settings):
    from ultralytics import YOLO

    try:
        if weights.suffix.lower() == ".pt":
            model = YOLO(str(weights))
        else:  # an export (.onnx, .torchscript...), run by Ultralytics' AutoBackend
            model = load_export(weights, settings.task, settings.device or default_device())
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{weights.name} is not an Ultralytics checkpoint: {ultralytics_message(e, weights)}") from None
    if settings.task and model.task != settings.task:
        raise BadInput(f"TASK_TYPE is {settings.task} but {weights.name} is a {model.task} model")
    LOGGER.info("loaded %s: %s model, %d classes", weights.name, model.task, len(model.names))
    return model


def list_inputs(storage: Storage, settings: Settings) -> Iterator[InputImage]:
    """The images of INPUT_URI, lazily: a local file or folder, a storage object, or a prefix."""
    ref = settings.input_uri
    local = Path(ref).expanduser()
    if not ref.startswith("s3://") and local.exists():
        paths = [local] if local.is_file() else image_files(local)
        for path in paths:
            key = path.name if path == local else path.relative_to(local).as_posix()
            yield InputImage(printable(str(path)), path.read_bytes, printable(key))
        return
    loc = storage.locate(ref)
    if ref.endswith("/"):
        for obj, _ in storage.list(loc):
            if is_image_name(obj.key[len(loc.key):]):
                yield InputImage(storage.uri(obj), functools.partial(storage.read_bytes, obj),
                                 obj.key[len(loc.key):])
        return
    if storage.head(loc) is None:
        raise BadInput(f"INPUT_URI={ref}: no such local file or folder, and no storage object {storage.uri(loc)}")
    yield InputImage(storage.uri(loc), functools.partial(storage.read_bytes, loc), loc.name)


def decode(item: InputImage):
    """(image as a BGR array, None) or (None, why it could not be read).

    Raises:
        TransientError: storage failed to give the image after its client's retries (StorageWatch
            decides whether that is one bad image or an outage).
    """
    import cv2
    import numpy as np

    try:
        data = item.read()
    except StorageNotFound:
        return None, "does not exist (deleted after it was listed?)"
    except IsADirectoryError:
        return None, "is a folder, not an image"
    except OSError as e:  # a dangling link, no permission...
        return None, f"cannot be read: {e.strerror or e}"
    except BadInput as e:  # e.g. storage refused this one object
        return None, str(e)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as e:  # e.g. over OpenCV's CV_IO_MAX_IMAGE_PIXELS (2^30): one image, not the run
        return None, f"cannot decode the image: {_opencv_reason(e)}"
    except MemoryError:
        return None, "cannot decode the image: not enough memory for its pixels"
    if image is None:
        return None, "cannot decode the image (corrupt, empty or not an image format)"
    return image, None


def _opencv_reason(error: Exception) -> str:
    """OpenCV's own words from its multi-line error ("... error: (-215:Assertion failed) pixels <= ...")."""
    text = " ".join(str(error).split())
    return text.split(" error: ", 1)[-1][:200]


def printable(name: str) -> str:
    """A local file name as valid UTF-8 text: bytes that are not (kept by Python as lone surrogates,
    which strict JSON parsers and databases refuse) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class StorageWatch:
    """Tells one image storage could not give from a storage outage.

    An image whose read still fails after the storage client's retries is reported as an error
    entry. But OUTAGE failures in a row, or a run in which no image could be read at all, mean
    storage is down: the run fails as transient (exit 75) instead of printing a document of errors.
    """

    OUTAGE = 10

    def __init__(self):
        self.read = self.in_a_row = 0
        self.last: TransientError | None = None

    def read_ok(self) -> None:
        self.read += 1
        self.in_a_row = 0

    def read_failed(self, error: TransientError) -> str:
        """The error entry's text; raises TransientError once failures look like an outage."""
        self.in_a_row += 1
        self.last = error
        if self.in_a_row >= self.OUTAGE:
            raise TransientError(f"storage is failing: the last {self.in_a_row} images could not be read ({error})")
        return f"storage failed to give it: {error}"

    def check(self) -> None:
        """At the end of the run: no image read at all, and storage failed, is an outage."""
        if self.last is not None and not self.read:
            raise TransientError(f"no image could be read from storage: {self.last}")


def load_ahead(inputs: Iterator[InputImage], workers: int, window: int, watch: StorageWatch,
               budget: int = HELD_BYTES):
    """Download and decode images ahead of the consumer, in input order.

    A feeder thread keeps `workers` loads going while the model runs, as long as fewer than `window`
    images wait and those decoded hold less than `budget` bytes of pixels: with large photos memory
    stays bounded (the budget, plus one image per worker), with small ones `window` bounds it.
    """
    ahead = _Ahead(workers, window, budget)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="load")
    threading.Thread(target=ahead.feed, args=(inputs, pool), name="load-feeder", daemon=True).start()
    try:
        while (taken := ahead.take()) is not None:
            item, future = taken
            try:
                image, error = future.result()
            except TransientError as e:
                yield item, None, watch.read_failed(e)
                continue
            ahead.release(image)
            watch.read_ok()
            yield item, image, error
            image = future = taken = None  # the consumer's now: not held here (the future holds it too)
    finally:  # on an outage, reads still queued are not waited for
        ahead.close()
        pool.shutdown(wait=False, cancel_futures=True)


class _Ahead:
    """load_ahead's shared state: the loads in input order, and what they hold."""

    def __init__(self, workers: int, window: int, budget: int):
        self.workers, self.window, self.budget = workers, window, budget
        self.changed = threading.Condition()
        self.queue: collections.deque = collections.deque()  # (item, future), in input order
        self.loading = self.held = 0  # loads under way; bytes of decoded pixels not taken yet
        self.ended, self.closed, self.error = False, False, None

    def feed(self, inputs: Iterator[InputImage], pool: ThreadPoolExecutor) -> None:
        """The feeder thread: lists the inputs (storage pages included) and starts their loads."""
        try:
            for item in inputs:
                with self.changed:
                    self.changed.wait_for(lambda: self.closed or (
                        self.loading < self.workers and len(self.queue) < self.window and self.held < self.budget))
                    if self.closed:
                        return
                    self.loading += 1
                    self.queue.append((item, pool.submit(self._load, item)))
                    self.changed.notify_all()
        except BaseException as e:  # a listing that failed: raised to the consumer after what came before
            self.error = e
        finally:
            with self.changed:
                self.ended = True
                self.changed.notify_all()

    def _load(self, item: InputImage):
        held = 0
        try:
            image, error = decode(item)
            held = image.nbytes if image is not None else 0
            return image, error
        finally:
            with self.changed:
                self.loading -= 1
                self.held += held
                self.changed.notify_all()

    def take(self):
        """The next (item, future) in input order; None at the end."""
        with self.changed:
            self.changed.wait_for(lambda: self.queue or self.ended)
            if self.queue:
                self.changed.notify_all()  # a place in the window is free
                return self.queue.popleft()
        if self.error is not None:
            raise self.error
        return None

    def release(self, image) -> None:
        """The consumer has the image: its bytes are the model's now, not held ahead."""
        with self.changed:
            self.held -= image.nbytes if image is not None else 0
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def batched(loaded, size: int, budget: int = HELD_BYTES):
    """Batches of `size` loaded images, or fewer where their pixels reach `budget` bytes."""
    batch, held = [], 0
    for x in loaded:
        batch.append(x)
        held += x[1].nbytes if x[1] is not None else 0
        if len(batch) == size or held >= budget:
            x = None  # (the batch's last image is the consumer's now)
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def predict_batch(model, batch: list, settings: Settings, device: str):
    """Run one batch; yields (input, result or None, error or None) in input order. Without IMGSZ the
    model runs at the size it was trained at (Ultralytics' own default, as evaluate.py and export.py)."""
    arrays = [image for _, image, _ in batch if image is not None]
    options = {"quantize": 16} if device != "cpu" else {}  # half precision on a GPU ('half' is deprecated)
    if os.environ.get("IMGSZ", "").strip():
        options["imgsz"] = settings.imgsz
    results = iter(model.predict(arrays, stream=True, conf=settings.conf, iou=settings.iou,
                                 max_det=settings.max_det, device=device, batch=len(arrays), verbose=False,
                                 **options) if arrays else ())
    for item, image, error in batch:
        yield item, (next(results) if image is not None else None), error


def describe_result(result, image: str) -> dict:
    """One image's results in the contract's shape, with the task's extra fields."""
    height, width = result.orig_shape
    entry = {"image": image, "width": int(width), "height": int(height), "detections": []}
    names = result.names
    if result.probs is not None:  # classification
        probs = result.probs
        entry["classifications"] = [{"class_id": int(i), "class_name": names[int(i)], "confidence": _conf(c)}
                                    for i, c in zip(probs.top5, probs.top5conf.tolist())]
        return entry
    obb = result.obb is not None
    boxes = result.obb if obb else result.boxes
    if boxes is None or len(boxes) == 0:
        return entry
    xyxy, conf, cls = boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.int().tolist()
    masks = result.masks.xy if result.masks is not None else None
    keypoints = result.keypoints.data.tolist() if result.keypoints is not None else None
    for i in range(len(cls)):
        # clipped to the image: a rotated box's corners may lie outside it, its axis-aligned box may not
        x1, x2 = (_px(min(max(v, 0.0), width)) for v in (xyxy[i][0], xyxy[i][2]))
        y1, y2 = (_px(min(max(v, 0.0), height)) for v in (xyxy[i][1], xyxy[i][3]))
        d = {"class_id": cls[i], "class_name": names[cls[i]], "confidence": _conf(conf[i]),
             "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}
        if masks is not None:
            d["polygon"] = [[_px(x), _px(y)] for x, y in masks[i].tolist()]
        if keypoints is not None:
            d["keypoints"] = [{"x": _px(k[0]), "y": _px(k[1]), "confidence": _conf(k[2]) if len(k) > 2 else None}
                              for k in keypoints[i]]
        if obb:
            cx, cy, w, h, angle = boxes.xywhr[i].tolist()
            d["rotated_box"] = {"cx": _px(cx), "cy": _px(cy), "width": _px(w), "height": _px(h),
                                "angle": round(angle, 5), "points": [[_px(x), _px(y)] for x, y in boxes.xyxyxyxy[i].tolist()]}
        entry["detections"].append(d)
    return entry


def _px(v: float) -> float:
    return round(float(v), 2)


def _conf(v: float) -> float:
    return round(min(max(float(v), 0.0), 1.0), 5)


class Spool:
    """Collects one JSON line per image on disk and uploads annotated images in the background."""

    def __init__(self, folder: Path, storage: Storage, settings: Settings, images: str = "images/"):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "predictions.jsonl"
        self.file = self.path.open("w", encoding="utf-8")
        self.storage = storage
        self.prefix = settings.predict_output_uri if settings.predict_save_images else None
        self.images = images  # annotated images' folder under the prefix (a shard's own)
        self.uploads = ThreadPoolExecutor(4, thread_name_prefix="upload") if self.prefix else None
        self.pending: collections.deque = collections.deque()
        self.count = self.failed = 0

    def add(self, item: InputImage, result, error: str | None) -> None:
        if result is None:
            entry = {"image": item.name, "width": None, "height": None, "detections": [], "error": error}
            self.failed += 1
            LOGGER.warning("%s: %s", item.name, error)
        else:
            entry = describe_result(result, item.name)
            if self.uploads:
                loc = self.storage.locate(f"{self.prefix}{self.images}{self.count:06d}-{Path(item.name).name}")
                entry["annotated_image"] = self.storage.uri(loc)
                self._upload(result.plot(), loc)
        self.file.write(json.dumps(entry) + "\n")
        self.count += 1

    def _upload(self, image, loc) -> None:
        import cv2

        data = cv2.imencode(".jpg", image)[1].tobytes()
        self.pending.append(self.uploads.submit(self.storage.put_bytes, data, loc, "image/jpeg"))
        while len(self.pending) > 16:  # bounded: memory stays flat if storage is slower than the model
            self.pending.popleft().result()

    def close(self) -> None:
        self.file.close()
        if self.uploads:
            for future in self.pending:
                future.result()
            self.uploads.shutdown()


def run_predictions(model, inputs: Iterator[InputImage], spool: Spool, settings: Settings) -> None:
    device = settings.device or default_device()
    workers = settings.workers if settings.workers else max(2, min(8, 2 * available_cpus()))
    started, reported = time.monotonic(), 0
    watch = StorageWatch()
    for batch in batched(load_ahead(inputs, workers, 2 * settings.predict_batch, watch), settings.predict_batch):
        for item, result, error in predict_batch(model, batch, settings, device):
            spool.add(item, result, error)
        del batch, result  # not held while the next batch is gathered (large photos: memory)
        if spool.count - reported >= 500:
            reported = spool.count
            LOGGER.info("%d images done (%.1f images/s)", spool.count, spool.count / (time.monotonic() - started))
    spool.close()
    watch.check()
    if spool.count == 0 and settings.predict_shard is None:  # a shard may be empty: Shard.select checks the input
        raise BadInput(f"INPUT_URI={settings.input_uri}: no images found")
    LOGGER.info("%d images in %.1f s, %d unreadable", spool.count, time.monotonic() - started, spool.failed)


def write_document(spool: Spool, out, extra: dict) -> None:
    """Stream {"predictions": [...], "count": N, ...} from the spool file to out."""
    out.write('{"predictions": [')
    with spool.path.open(encoding="utf-8") as lines:
        for i, line in enumerate(lines):
            out.write(", " if i else "")
            out.write(line.rstrip("\n"))
    out.write("], " + json.dumps({"count": spool.count, **extra})[1:] + "\n")


def save_document(storage: Storage, spool: Spool, settings: Settings, extra: dict,
                  name: str = "predictions.json") -> str:
    """Write the same document to {PREDICT_OUTPUT_URI}{name} (a shard's: predictions-{index}.json)."""
    path = spool.path.with_name(name)
    with path.open("w", encoding="utf-8") as f:
        write_document(spool, f, extra)
    return storage.upload(path, storage.locate(settings.predict_output_uri + name))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> int:
    if (code := cli.handle(sys.argv[1:], "predict", __doc__)) is not None:  # --help, --check
        return code
    load_dotenv(Path.cwd() / ".env", override=False)
    redact = Redactor.from_environ(os.environ)
    json_out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the real stdout, kept for the document
    # anything else that prints (Ultralytics, C libraries) lands on stderr: with LOG_FORMAT=json as
    # records of its own capture (fd 1 is not a copy of fd 2's pipe then, which kept that pipe open
    # past the exit and cost a 2 s wait), else by pointing fd 1 at stderr
    setup_logging(os.environ, redact, capture_stdout=True)
    if not json_logging():
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    folder = None  # this run's spool folder, removed on every way out
    try:
        settings = load_settings(os.environ, "predict")
        log_configuration(settings)
        storage = Storage(settings.storage)
        offline_environment(settings.work_dir)
        ultralytics_ready = in_background(prepare_ultralytics, settings.work_dir)  # seconds: beside the download
        checkpoint = fetch_checkpoint(storage, settings)
        ultralytics_ready.result()
        model = load_model(checkpoint, settings)
        folder = settings.work_dir / "predict" / f"{os.getpid()}-{time.time_ns()}"
        shard = Shard(settings.predict_shard, settings.predict_shards)
        spool = Spool(folder, storage, settings, shard.images_folder())
        inputs = shard.select(list_inputs(storage, settings), lambda item: item.key, settings.input_uri)
        run_predictions(model, inputs, spool, settings)
        extra = {"failed": spool.failed, "task": model.task, **shard.fields()}
        if shard.sharded:  # the pod's share; a shard without PREDICT_OUTPUT_URI has only stdout
            LOGGER.info("shard %d of %d: %d of the %d images", shard.index, shard.count, shard.taken, shard.listed)
        if settings.predict_output_uri:
            extra["output_uri"] = storage.uri(storage.locate(settings.predict_output_uri))
            LOGGER.info("predictions saved to %s",
                        save_document(storage, spool, settings, extra, shard.document_name()))
    except Exception as e:
        return failure_code(LOGGER, "prediction", e, redact)
    else:
        write_document(spool, json_out, extra)
        json_out.flush()
        return EXIT_OK
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main())  # the job is done and reported: no interpreter teardown (utils.exit_now)
