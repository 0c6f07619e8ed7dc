"""End to end: `python predict.py` as the backend runs it, on checkpoints and images in real S3."""

from __future__ import annotations

import json
import os
import time
import uuid

import cv2
import numpy as np
import pytest

from tests.conftest import run_entry, storage_env
from tests.sample_data import make_dataset

TASK_CONFIGS = {"detect": "yolo11n.yaml", "segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml",
                "obb": "yolo11n-obb.yaml", "classify": "yolo11n-cls.yaml"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Factory: an untrained checkpoint of a task, saved by Ultralytics (no download needed)."""
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("weights")
    made = {}

    def make(task: str = "detect"):
        if task not in made:
            import torch

            torch.manual_seed(1)  # the same untrained weights every run (seed 0 gives a seg model with no boxes)
            made[task] = folder / f"{task}.pt"
            YOLO(TASK_CONFIGS[task]).save(str(made[task]))
        return made[task]

    return make


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sorted((make_dataset(tmp_path_factory.mktemp("ds"), "detect", n_train=1, n_val=5) / "images" / "val").iterdir())


def predict_env(s3_server, bucket, tmp_path, **extra) -> dict:
    return {**storage_env(s3_server, bucket), "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "MAX_DET": "5",
            "DEVICE": "cpu", "WORK_DIR": str(tmp_path / "work"), **extra}


def run_predict(env, tmp_path, code=0) -> dict | None:
    result = run_entry("predict.py", env, cwd=tmp_path, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    if code:
        assert result.stdout == "", "a failed run prints no document"
        return {"stderr": result.stderr}
    assert result.stdout.count("\n") == 1  # exactly one JSON document, nothing else on stdout
    doc = json.loads(result.stdout)
    assert "configuration: {" in result.stderr  # logs went to stderr
    return doc


def assert_valid_detections(prediction: dict) -> None:
    w, h = prediction["width"], prediction["height"]
    for d in prediction["detections"]:
        assert 0.0 <= d["confidence"] <= 1.0
        box = d["box"]
        assert 0 <= box["x1"] <= box["x2"] <= w and 0 <= box["y1"] <= box["y2"] <= h
        assert isinstance(d["class_id"], int) and isinstance(d["class_name"], str)


def test_prefix_of_images_in_storage_in_several_batches(s3_server, s3, bucket, weights, images, tmp_path):
    for f in images:
        s3.upload_file(str(f), bucket, f"inputs/batch-1/{f.name}")
    s3.put_object(Bucket=bucket, Key="inputs/batch-1/notes.txt", Body=b"not an image, skipped")
    job_id = f"p{uuid.uuid4().hex[:6]}"
    s3.upload_file(str(weights()), bucket, f"checkpoints/job-{job_id}/best.pt")  # the default CHECKPOINT_URI
    doc = run_predict(predict_env(s3_server, bucket, tmp_path, JOB_ID=job_id, PREDICT_BATCH="2",
                                  INPUT_URI=f"s3://{bucket}/inputs/batch-1/"), tmp_path)
    assert doc["count"] == 5 == len(doc["predictions"]) and doc["failed"] == 0 and doc["task"] == "detect"
    assert [p["image"] for p in doc["predictions"]] == [f"s3://{bucket}/inputs/batch-1/{f.name}" for f in images]
    for p in doc["predictions"]:
        assert (p["width"], p["height"]) == (64, 64)
        assert 1 <= len(p["detections"]) <= 5  # conf 0 and MAX_DET 5
        assert_valid_detections(p)


def test_local_file_and_checkpoint(weights, images, tmp_path):
    doc = run_predict({"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "INPUT_URI": str(images[0]),
                       "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "WORK_DIR": str(tmp_path / "w")}, tmp_path)
    assert doc["count"] == 1 and doc["predictions"][0]["image"] == str(images[0])
    assert len(doc["predictions"][0]["detections"]) == 3


def test_corrupt_image_is_reported_and_the_rest_continue(s3_server, s3, bucket, weights, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in images[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "val_0001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "zz_empty.png").write_bytes(b"")
    doc = run_predict(predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI=str(folder)),
                      tmp_path)
    assert doc["count"] == 4 and doc["failed"] == 2
    by_name = {p["image"].rsplit("/", 1)[1]: p for p in doc["predictions"]}
    assert "cannot decode the image" in by_name["val_0001.jpg"]["error"]
    assert "cannot decode the image" in by_name["zz_empty.png"]["error"]
    assert all("error" not in by_name[n] and by_name[n]["detections"] for n in ("val_0000.jpg", "val_0002.jpg"))


def test_unreadable_local_inputs_are_error_entries_and_the_rest_continue(weights, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in images[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a dangling link
    (folder / "folder.jpg").mkdir()  # a folder with an image's name
    doc = run_predict({"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "INPUT_URI": str(folder),
                       "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "WORK_DIR": str(tmp_path / "w")}, tmp_path)
    assert doc["count"] == 4 and doc["failed"] == 2
    by_name = {p["image"].rsplit("/", 1)[1]: p for p in doc["predictions"]}
    assert by_name["gone.jpg"]["error"] == "cannot be read: No such file or directory"
    assert by_name["folder.jpg"]["error"] == "is a folder, not an image"
    assert all(by_name[f.name]["detections"] and "error" not in by_name[f.name] for f in images[:2])


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header declares width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_one_image_opencv_refuses_is_an_error_entry_and_hidden_files_are_skipped(weights, images, tmp_path):
    """A photo over OpenCV's 2^30-pixel limit (an orthophoto) made cv2.imdecode raise, which ended
    the whole run with exit 1 and no document; macOS' `._name.jpg` files became error entries."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for f in images[:2]:
        (folder / "sub" / f.name).write_bytes(f.read_bytes())
    (folder / "huge.png").write_bytes(png_claiming(50_000, 50_000))
    (folder / "._huge.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.jpg").write_bytes(images[0].read_bytes())
    doc = run_predict({"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "INPUT_URI": str(folder),
                       "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "WORK_DIR": str(tmp_path / "w")}, tmp_path)
    assert [p["image"] for p in doc["predictions"]] == [str(folder / "huge.png")] + [
        str(folder / "sub" / f.name) for f in images[:2]]
    assert doc["count"] == 3 and doc["failed"] == 1
    assert doc["predictions"][0]["error"].startswith("cannot decode the image: (-215:Assertion failed) pixels <=")
    assert all(p["detections"] and "error" not in p for p in doc["predictions"][1:])


def test_without_imgsz_the_model_runs_at_the_size_it_was_trained_at(weights, images, tmp_path):
    """predict.py ran at 640 whatever the model was trained at (a model trained at 64 then gave
    hundreds of confident boxes of nothing); evaluate.py, export.py and Ultralytics itself use the
    training size when none is asked for."""
    import torch

    ckpt = torch.load(weights(), map_location="cpu", weights_only=False)
    ckpt["train_args"] = {**(ckpt.get("train_args") or {}), "imgsz": 64, "task": "detect"}
    trained = tmp_path / "trained-at-64.pt"
    torch.save(ckpt, trained)
    base = {"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(trained), "INPUT_URI": str(images[0]),
            "CONF_THRESHOLD": "0.0", "MAX_DET": "5", "WORK_DIR": str(tmp_path / "w"), "DEVICE": "cpu"}
    unset = run_predict(base, tmp_path)["predictions"][0]["detections"]
    assert unset == run_predict({**base, "IMGSZ": "64"}, tmp_path)["predictions"][0]["detections"]
    assert unset != run_predict({**base, "IMGSZ": "640"}, tmp_path)["predictions"][0]["detections"]


def test_images_held_ahead_of_the_model_are_bounded_by_their_bytes():
    """Up to 2 x PREDICT_BATCH images are loaded ahead; of 100-megapixel photos that was 20 GB.
    Both the window ahead and a batch stop at a byte budget."""
    import threading

    from predict import InputImage, StorageWatch, batched, load_ahead

    encoded = cv2.imencode(".png", np.full((200, 200, 3), 127, np.uint8))[1].tobytes()  # 120,000 bytes decoded
    started = []
    lock = threading.Lock()

    def read() -> bytes:
        with lock:
            started.append(1)
        return encoded

    inputs = (InputImage(f"i{n}.png", read, f"i{n}.png") for n in range(30))
    ahead, taken = [], 0
    for _, image, error in load_ahead(inputs, workers=2, window=64, watch=StorageWatch(), budget=300_000):
        assert error is None and image.nbytes == 120_000
        taken += 1
        ahead.append(len(started) - taken)
    assert taken == 30 and max(ahead) <= 3 + 2, ahead  # 3 decoded (the third crosses the budget), 2 loading
    import weakref

    second = threading.Event()  # the listing's next page takes until the check below

    def listing():
        yield InputImage("i0.png", read, "i0.png")
        second.wait(30)
        yield InputImage("i1.png", read, "i1.png")

    loads = load_ahead(listing(), workers=2, window=64, watch=StorageWatch())
    _, image, _ = next(loads)
    handed = weakref.ref(image)
    del image
    waiting = threading.Thread(target=next, args=(loads,))
    waiting.start()  # the consumer asks for the next image, which is still downloading
    time.sleep(0.5)
    assert handed() is None  # the image handed out is not held by the loader while the next is awaited
    second.set()
    waiting.join(30)
    loaded = [(None, np.zeros((200, 200, 3), np.uint8), None)] * 7 + [(None, None, "unreadable")] * 2
    assert [len(b) for b in batched(loaded, size=4, budget=300_000)] == [3, 3, 3]
    assert [len(b) for b in batched(loaded, size=4)] == [4, 4, 1]


def test_local_file_names_that_are_not_utf8_are_printed_as_valid_text():
    from predict import printable

    name = os.fsdecode(b"/in/caf\xe9.jpg")  # Latin-1 bytes: Python keeps them as a lone surrogate
    assert printable(name) == "/in/caf\ufffd.jpg" and printable("/in/café.jpg") == "/in/café.jpg"
    json.dumps(printable(name)).encode("utf-8")  # the document's text encodes; the raw name cannot
    with pytest.raises(UnicodeEncodeError):
        name.encode("utf-8")


@pytest.fixture
def s3_proxy(s3_server, tmp_path):
    """Factory: tests/s3_fault_proxy.py in front of the S3 server, answering as told (--answer ...)."""
    from tests.conftest import spawn_server, with_group

    procs = []

    def start(*answers: str) -> str:
        args = [a for answer in answers for a in ("--answer", answer)]
        proc, url = spawn_server("tests.s3_fault_proxy", "--upstream", s3_server, "--fail-rate", "0", "--record",
                                 str(tmp_path / "faults.log"), *args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        with_group(proc, 15)
        proc.wait(10)


def test_images_storage_cannot_give_are_error_entries_and_folder_markers_are_skipped(s3_proxy, s3, bucket, weights,
                                                                                     images, tmp_path):
    for f in images[:4]:
        s3.upload_file(str(f), bucket, f"inputs/{f.name}")
    for marker in ("inputs/", "inputs/more.jpg/"):  # folder markers, one with an image's suffix
        s3.put_object(Bucket=bucket, Key=marker, Body=b"")
    gone, failing = images[1].name, images[2].name
    url = s3_proxy(f"404:NoSuchKey:GET:/{bucket}/inputs/{gone}",  # deleted after it was listed
                   f"503:SlowDown:GET:/{bucket}/inputs/{failing}")  # storage keeps failing for this one
    env = predict_env(url, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI="inputs/", STORAGE_MAX_ATTEMPTS="2")
    doc = run_predict(env, tmp_path)
    assert doc["count"] == 4 and doc["failed"] == 2
    by_name = {p["image"].rsplit("/", 1)[1]: p for p in doc["predictions"]}
    assert by_name[gone]["error"] == "does not exist (deleted after it was listed?)"
    assert by_name[failing]["error"].startswith(f"storage failed to give it: storage failed to read s3://{bucket}/")
    assert all(by_name[f.name]["detections"] for f in (images[0], images[3]))


def test_storage_outage_for_every_image_fails_the_run_as_transient(s3_proxy, s3, bucket, weights, images, tmp_path):
    for f in images[:3]:
        s3.upload_file(str(f), bucket, f"inputs/{f.name}")
    url = s3_proxy(f"503:SlowDown:GET:/{bucket}/inputs/")  # listing works, every read fails
    env = predict_env(url, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI="inputs/", STORAGE_MAX_ATTEMPTS="2")
    out = run_predict(env, tmp_path, code=75)
    assert "no image could be read from storage" in out["stderr"]


def test_ten_storage_failures_in_a_row_are_an_outage_not_ten_error_entries():
    from predict import StorageWatch
    from utils import TransientError

    watch = StorageWatch()
    for _ in range(3):
        for _ in range(StorageWatch.OUTAGE - 1):  # one image short of an outage, then one read works
            assert watch.read_failed(TransientError("SlowDown")).startswith("storage failed to give it")
        watch.read_ok()
    watch.check()  # images were read: the failures were single images
    for _ in range(StorageWatch.OUTAGE - 1):
        watch.read_failed(TransientError("SlowDown"))
    with pytest.raises(TransientError, match="the last 10 images could not be read"):
        watch.read_failed(TransientError("SlowDown"))


def test_spool_folder_is_removed_after_success_and_after_failure(weights, images, tmp_path):
    base = {"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "IMGSZ": "64", "WORK_DIR": str(tmp_path / "w")}
    run_predict({**base, "INPUT_URI": str(images[0])}, tmp_path)
    assert list((tmp_path / "w" / "predict").iterdir()) == []
    (tmp_path / "empty").mkdir()
    out = run_predict({**base, "INPUT_URI": str(tmp_path / "empty")}, tmp_path, code=2)  # fails after spooling began
    assert "no images found" in out["stderr"]
    assert list((tmp_path / "w" / "predict").iterdir()) == []


def test_predict_logs_no_deprecation_warning(weights, images, tmp_path):
    result = run_entry("predict.py", {"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "IMGSZ": "64",
                                      "INPUT_URI": str(images[0]), "WORK_DIR": str(tmp_path / "w")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecated" not in result.stderr.lower()


def test_output_prefix_gets_the_document_and_annotated_images(s3_server, s3, bucket, weights, images, tmp_path):
    doc = run_predict(predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI=str(images[0].parent),
                                  PREDICT_OUTPUT_URI="predictions/run-1"), tmp_path)
    assert doc["output_uri"] == f"s3://{bucket}/predictions/run-1/"
    saved = json.loads(s3.get_object(Bucket=bucket, Key="predictions/run-1/predictions.json")["Body"].read())
    assert saved == doc
    for p in doc["predictions"]:
        key = p["annotated_image"].split(f"s3://{bucket}/", 1)[1]
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)


@pytest.mark.parametrize("task", ["segment", "pose", "obb", "classify"])
def test_each_task_adds_its_fields(task, weights, images, tmp_path):
    doc = run_predict({"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights(task)), "INPUT_URI": str(images[0]),
                       "IMGSZ": "64", "CONF_THRESHOLD": "0.0", "MAX_DET": "3", "WORK_DIR": str(tmp_path / "w")}, tmp_path)
    (p,) = doc["predictions"]
    assert doc["task"] == task
    if task == "classify":
        top = p["classifications"]
        assert len(top) == 5 and top == sorted(top, key=lambda c: -c["confidence"])
        assert all(0 <= c["confidence"] <= 1 and isinstance(c["class_name"], str) for c in top)
        return
    assert p["detections"]
    assert_valid_detections(p)
    for d in p["detections"]:
        if task == "segment":  # a detection whose mask is empty has an empty polygon
            assert len(d["polygon"]) >= 3 or d["polygon"] == []
            assert all(0 <= x <= 64 and 0 <= y <= 64 for x, y in d["polygon"])
        if task == "pose":
            assert len(d["keypoints"]) == 17 and all(0 <= k["confidence"] <= 1 for k in d["keypoints"])
        if task == "obb":
            r = d["rotated_box"]
            assert len(r["points"]) == 4 and r["width"] >= 0 and r["height"] >= 0


def test_missing_checkpoint_is_bad_input(s3_server, bucket, images, tmp_path):
    env = predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI="checkpoints/job-none/best.pt", INPUT_URI=str(images[0]))
    out = run_predict(env, tmp_path, code=2)
    assert f"checkpoint not found: s3://{bucket}/checkpoints/job-none/best.pt" in out["stderr"]


def test_file_that_is_not_a_checkpoint_is_bad_input(s3_server, bucket, images, tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"definitely not a torch file")
    out = run_predict(predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI=str(fake), INPUT_URI=str(images[0])),
                      tmp_path, code=2)
    assert "fake.pt is not an Ultralytics checkpoint" in out["stderr"]


def test_empty_input_prefix_is_bad_input(s3_server, s3, bucket, weights, tmp_path):
    s3.put_object(Bucket=bucket, Key="inputs/empty/readme.txt", Body=b"no images here")
    env = predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI="inputs/empty/")
    out = run_predict(env, tmp_path, code=2)
    assert "INPUT_URI=inputs/empty/: no images found" in out["stderr"]


def test_missing_input_object_is_bad_input(s3_server, bucket, weights, tmp_path):
    env = predict_env(s3_server, bucket, tmp_path, CHECKPOINT_URI=str(weights()), INPUT_URI="inputs/nope.jpg")
    out = run_predict(env, tmp_path, code=2)
    assert f"no storage object s3://{bucket}/inputs/nope.jpg" in out["stderr"]


def test_task_type_mismatch_is_bad_input(weights, images, tmp_path):
    env = {"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights()), "INPUT_URI": str(images[0]),
           "TASK_TYPE": "classification", "WORK_DIR": str(tmp_path / "w")}
    out = run_predict(env, tmp_path, code=2)
    assert "TASK_TYPE is classify but detect.pt is a detect model" in out["stderr"]
