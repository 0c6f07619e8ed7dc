"""Models people ship: verified exports, a registered MLflow model, and evaluation on a test split.

One detection job (from scratch, 1 epoch, 64-pixel images) runs once for this module with
EXPORT_FORMATS=onnx,torchscript,openvino (openvino's package is not installed: that export fails),
MLFLOW_REGISTERED_MODEL_NAME and EVALUATE_TEST, against the S3 server, the MLflow server and the
backend receiver, with tests/netguard recording any connection attempt beyond loopback. The tests
below check what it left, run predict.py on its ONNX export and its best.pt, export.py on its
best.pt, and load its registered model in a fresh Python. evaluate.py is compared with Ultralytics'
own `model.val(split="test")` for every task, on untrained checkpoints (no training needed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import FAST_TRAINING, PYTHON, ROOT, SECRETS, Receiver, run_entry, storage_env
from tests.sample_data import NAMES, make_dataset, make_zip

# MLflow switches its usage telemetry off by itself when it sees these (pytest, CI): the job below
# runs without them, so the network check covers what a job in a cluster does.
CI_VARIABLES = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
                "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                "CLOUD_RUN_EXECUTION")
TEST_IMAGES = 8


def run_outside_pytest(script: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """run_entry, without the variables by which MLflow knows it runs under a test or CI."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_", "R2_")) and k not in CI_VARIABLES}
    return subprocess.run([PYTHON, str(ROOT / script)], env={**base, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def job(s3_server, s3, mlflow_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models-out")
    bucket = f"mo-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    source = make_dataset(folder / "shapes", "detect", n_train=16, n_val=8, n_test=TEST_IMAGES)
    s3.upload_file(str(make_zip(source, folder / "shapes.zip")), bucket, "datasets/shapes-t.zip")
    receiver = Receiver(folder)
    job_id = f"mo{uuid.uuid4().hex[:6]}"
    model_name = f"shapes-{job_id}"
    env = {
        **storage_env(s3_server, bucket), **FAST_TRAINING, "EPOCHS": "1", "TRAIN_ARGS": '{"plots": false}',
        "JOB_ID": job_id, "DATASET_ID": "shapes-t", "MODEL_NAME": "yolo11n.yaml", "TASK_TYPE": "object_detection",
        "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": SECRETS[2],
        "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": f"models-{job_id}",
        "EXPORT_FORMATS": "onnx,torchscript,openvino", "MLFLOW_REGISTERED_MODEL_NAME": model_name,
        "EVALUATE_TEST": "true", "WORK_DIR": str(folder / "work"),
        "PYTHONPATH": str(ROOT / "tests" / "netguard"), "NETGUARD_LOG": str(folder / "net.log"),
    }
    result = run_outside_pytest("train.py", env, cwd=folder)
    receiver.stop()
    final = receiver.bodies("status")[-1] if receiver.bodies("status") else {}
    yield {"result": result, "receiver": receiver, "final": final, "bucket": bucket, "job_id": job_id, "s3": s3,
           "s3_server": s3_server, "mlflow": mlflow_server, "model_name": model_name, "folder": folder,
           "source": source, "prefix": f"checkpoints/job-{job_id}/", "net_log": folder / "net.log"}


@pytest.fixture(scope="module")
def best_pt_predictions(job):
    """predict.py on the job's best.pt, the test images (reference for the export and the registered model)."""
    return predict_document(job, f"s3://{job['bucket']}/{job['prefix']}best.pt")


def predict_document(job, checkpoint: str) -> dict:
    env = {**storage_env(job["s3_server"], job["bucket"]), "CHECKPOINT_URI": checkpoint, "IMGSZ": "64",
           "INPUT_URI": str(job["source"] / "images" / "test"), "CONF_THRESHOLD": "0.0", "MAX_DET": "2",
           "DEVICE": "cpu", "WORK_DIR": str(job["folder"] / f"predict-{uuid.uuid4().hex[:6]}")}
    result = run_entry("predict.py", env, cwd=job["folder"])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def same_top_detection(a: dict, b: dict, box_tol: float = 0.5, conf_tol: float = 1e-3) -> bool | None:
    """Both images' most confident detection: same class, box within box_tol px, confidence within
    conf_tol. None when a's top two are too close to call (a tie the two runtimes may break differently)."""
    da, db = a["detections"], b["detections"]
    if len(da) > 1 and da[1]["confidence"] > 0.99 * da[0]["confidence"]:
        return None
    if not da or not db:
        return not da and not db
    x, y = da[0], db[0]
    return (x["class_id"] == y["class_id"] and abs(x["confidence"] - y["confidence"]) <= conf_tol
            and all(abs(x["box"][k] - y["box"][k]) <= box_tol for k in ("x1", "y1", "x2", "y2")))


# ------------------------------------------------------------------------------------------
# The training job's exports
# ------------------------------------------------------------------------------------------


def test_job_completes_with_verified_exports_in_storage_the_final_status_and_mlflow(job):
    from mlflow import MlflowClient

    assert job["result"].returncode == 0, job["result"].stderr[-3000:]
    final, bucket, prefix = job["final"], job["bucket"], job["prefix"]
    assert final["status"] == "completed"
    assert final["exports"] == {"onnx": f"s3://{bucket}/{prefix}export/best.onnx",
                                "torchscript": f"s3://{bucket}/{prefix}export/best.torchscript"}
    for name in ("best.onnx", "best.torchscript"):
        assert job["s3"].head_object(Bucket=bucket, Key=f"{prefix}export/{name}")["ContentLength"] > 100_000
    stderr = job["result"].stderr
    set_up = re.search(r"trainer: training \S+ on ", stderr)  # right before Ultralytics builds the model and loaders
    assert set_up and -1 < stderr.find("helper gets ready to log the model") < set_up.start()  # warming up meanwhile
    for fmt in ("onnx", "torchscript"):  # verified on the validation images before it was reported
        assert f"{fmt} verified on 8 images" in stderr
    logs = [b["message"] for b in job["receiver"].bodies("logs")]
    assert any(m.startswith("exported onnx (verified on 8 images): s3://") for m in logs)
    client = MlflowClient(job["mlflow"])
    exported = {a.path for a in client.list_artifacts(final["mlflow_run_id"], "export")}
    assert exported == {"export/best.onnx", "export/best.torchscript"}
    completed = json.loads(job["s3"].get_object(Bucket=bucket, Key=f"{prefix}completed.json")["Body"].read())
    assert completed["exports"] == final["exports"]  # a pod started again reports the same


def test_failing_export_is_reported_and_the_job_still_completes(job):
    final = job["final"]
    assert job["result"].returncode == 0 and final["status"] == "completed"
    assert set(final["export_errors"]) == {"openvino"}
    assert "No module named 'openvino'" in final["export_errors"]["openvino"]
    assert any(b["level"] == "WARNING" and "export to openvino failed" in b["message"]
               for b in job["receiver"].bodies("logs"))
    assert job["receiver"].refusals() == []


def test_exports_run_offline_without_pip_or_any_outside_connection(job):
    stderr = job["result"].stderr
    assert "AutoUpdate disabled by YOLO_AUTOINSTALL=False" in stderr  # Ultralytics did not try pip for openvino
    assert "AutoUpdate success" not in stderr and "attempting AutoUpdate" not in stderr
    attempts = job["net_log"].read_text() if job["net_log"].exists() else ""
    assert attempts == "", attempts  # neither Ultralytics, the exporters nor MLflow's telemetry


def test_predict_on_the_onnx_export_gives_the_same_answers_as_on_best_pt(job, best_pt_predictions):
    onnx = predict_document(job, f"s3://{job['bucket']}/{job['prefix']}export/best.onnx")
    assert onnx["task"] == best_pt_predictions["task"] == "detect"  # the task came from the export's metadata
    assert onnx["count"] == best_pt_predictions["count"] == TEST_IMAGES
    compared = 0
    for a, b in zip(best_pt_predictions["predictions"], onnx["predictions"]):
        assert (a["image"], a["width"], a["height"]) == (b["image"], b["width"], b["height"])
        verdict = same_top_detection(a, b)
        assert verdict is not False, (a, b)
        compared += verdict is True
    assert compared >= TEST_IMAGES // 2, "too many ties to compare"


def test_an_export_without_task_metadata_needs_task_type(job, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not an onnx graph")
    env = {"STORAGE_TYPE": "local", "CHECKPOINT_URI": str(fake), "WORK_DIR": str(tmp_path / "w"),
           "INPUT_URI": str(job["source"] / "images" / "test")}
    result = run_entry("predict.py", env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "model.onnx is not a checkpoint (.pt), nor an Ultralytics export" in result.stderr


# ------------------------------------------------------------------------------------------
# export.py
# ------------------------------------------------------------------------------------------


def test_export_py_exports_and_verifies_an_existing_checkpoint(job, tmp_path):
    bucket = job["bucket"]
    env = {**storage_env(job["s3_server"], bucket), "CHECKPOINT_URI": f"s3://{bucket}/{job['prefix']}best.pt",
           "EXPORT_FORMATS": "TorchScript", "DATASET_ID": "shapes-t", "EXPORT_OUTPUT_URI": "exports/run-1",
           "DEVICE": "cpu", "WORKERS": "0", "WORK_DIR": str(tmp_path / "work")}
    result = run_entry("export.py", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1  # one JSON document; the exporter's own output went to stderr
    doc = json.loads(result.stdout)
    assert doc["exported"] == {"torchscript": f"s3://{bucket}/exports/run-1/best.torchscript"} and doc["failed"] == {}
    assert doc["task"] == "detect" and doc["imgsz"] == 64  # the size best.pt was trained at
    assert doc["images"] == "validation images of datasets/shapes-t.zip"
    (entry,) = doc["exports"]
    assert entry["ok"] and entry["verification"]["passed"] and entry["verification"]["images"] == 8
    assert entry["verification"]["raw_output_diff"] < 1e-4  # the same network, within float error
    assert job["s3"].head_object(Bucket=bucket, Key="exports/run-1/best.torchscript")["ContentLength"] > 100_000
    assert not list((tmp_path / "work" / "jobs").iterdir())  # its own folder is gone


def test_bad_export_format_names_are_all_listed_and_exit_2(job, tmp_path):
    env = {"STORAGE_TYPE": "local", "CHECKPOINT_URI": "best.pt", "EXPORT_FORMATS": "onnx,onxx,pytorch",
           "WORK_DIR": str(tmp_path / "w")}
    for script in ("export.py", "train.py"):
        result = run_entry(script, {**env, "JOB_ID": "bad-formats", "DATASET_ID": "d"}, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert "EXPORT_FORMATS: 'onxx' (did you mean 'onnx'?), 'pytorch' are not export formats" in result.stderr
        assert result.stdout == ""


def test_export_py_default_output_is_an_export_folder_beside_the_checkpoint(tmp_path):
    from config import load_settings
    from export import output_prefix
    from storage import Storage

    base = {"STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(tmp_path), "EXPORT_FORMATS": "onnx"}
    storage = Storage(load_settings({**base, "CHECKPOINT_URI": "x.pt"}, "export").storage)
    for checkpoint, expected in (("s3://bkt/checkpoints/job-7/best.pt", "s3://bkt/checkpoints/job-7/export/"),
                                 ("models/yolo.pt", "s3://vision-platform/models/export/"),
                                 ("best.pt", "s3://vision-platform/export/")):
        settings = load_settings({**base, "CHECKPOINT_URI": checkpoint}, "export")
        assert output_prefix(storage, settings, Path("unused")) == expected
    local = tmp_path / "here.pt"
    local.write_bytes(b"x")
    assert output_prefix(storage, load_settings({**base, "CHECKPOINT_URI": str(local)}, "export"), local) is None
    settings = load_settings({**base, "CHECKPOINT_URI": str(local), "EXPORT_OUTPUT_URI": "out"}, "export")
    assert output_prefix(storage, settings, local) == "out/"
    assert load_settings({"STORAGE_TYPE": "local", "JOB_ID": "7", "EXPORT_FORMATS": "onnx"},
                         "export").checkpoint_uri == "checkpoints/job-7/best.pt"


def test_export_py_says_generated_when_it_compares_on_no_validation_image(tmp_path):
    """EXPORT_VERIFY_IMAGES=0 made the document say "validation images of ..." while one generated
    image was used (and the dataset was downloaded for nothing)."""
    from config import load_settings
    from export import comparison_images
    from storage import Storage

    settings = load_settings({"STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(tmp_path), "CHECKPOINT_URI": "x.pt",
                              "EXPORT_FORMATS": "onnx", "DATASET_URI": str(tmp_path / "absent.zip"),
                              "EXPORT_VERIFY_IMAGES": "0", "WORK_DIR": str(tmp_path / "w")}, "export")
    assert comparison_images(Storage(settings.storage), settings) == ([], "generated")


@pytest.mark.parametrize("entry", ["export", "evaluate"])
def test_a_file_that_is_not_a_checkpoint_is_bad_input_for_export_and_evaluate(entry, tmp_path):
    """export.py exited 1 (retried by k8s/job.yaml's podFailurePolicy) where train.py, predict.py and
    evaluate.py exit 2."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\xb9" + os.urandom(3000))
    dataset = make_zip(make_dataset(tmp_path / "ds", "detect", n_train=2, n_val=2), tmp_path / "ds.zip")
    env = {"STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(tmp_path / "store"), "CHECKPOINT_URI": str(junk),
           "EXPORT_FORMATS": "onnx", "DATASET_URI": str(dataset), "WORK_DIR": str(tmp_path / "work"), "IMGSZ": "64"}
    result = run_entry(f"{entry}.py", env, cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "junk.pt is not an Ultralytics checkpoint: junk.pt is not a loadable checkpoint" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------
# The MLflow Model Registry
# ------------------------------------------------------------------------------------------

LOAD_REGISTERED = """
import json, sys
import cv2, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1], model_config={"conf": 0.0, "max_det": 2})
image = sys.argv[2]
records = model.predict([image, open(image, "rb").read(), cv2.imread(image)])
meta = model.metadata
print(json.dumps({"records": records, "signature": meta.signature.to_dict() if meta.signature else None,
                  "example": meta.saved_input_example_info, "predict_module": sys.modules["predict"].__file__}))
"""


def test_registered_model_loads_in_a_fresh_python_and_predicts_like_predict_py(job, best_pt_predictions, tmp_path):
    from mlflow import MlflowClient

    final, name = job["final"], job["model_name"]
    assert final["registered_model_name"] == name and final["registered_model_version"] == 1
    assert final["mlflow_model_uri"].startswith("models:/")
    version = MlflowClient(job["mlflow"]).get_model_version(name, "1")
    assert version.tags["job_id"] == job["job_id"] and version.tags["task"] == "detect"
    assert version.tags["primary_metric_name"] == "mAP@0.5"
    assert float(version.tags["primary_metric_value"]) == pytest.approx(final["final_metrics"]["mAP50"], abs=1e-5)
    assert version.run_id == final["mlflow_run_id"]

    image = job["source"] / "images" / "test" / "test_0000.jpg"
    (tmp_path / "load.py").write_text(LOAD_REGISTERED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "PYTHON"))}
    env.update(MLFLOW_TRACKING_URI=job["mlflow"], YOLO_CONFIG_DIR=str(tmp_path / "yolo"))  # no trainer code on the path
    result = subprocess.run([PYTHON, "load.py", f"models:/{name}/1", str(image)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["predict_module"].startswith(str(ROOT))  # predict.py and its modules came with the model
    assert out["signature"]["inputs"] and out["signature"]["outputs"] and out["example"]
    expected = next(p for p in best_pt_predictions["predictions"] if p["image"] == str(image))
    path_record, bytes_record, array_record = out["records"]
    assert path_record == expected  # the same record predict.py prints, field for field
    assert {**bytes_record, "image": expected["image"]} == expected
    assert {**array_record, "image": expected["image"]} == expected
    assert (bytes_record["image"], array_record["image"]) == ("input-1", "input-2")


def test_the_modules_shipped_with_the_model_are_those_its_code_imports_as_parsed():
    """registry.shipped_modules reads import lines with a pattern (parsing cost 0.23 s of the finish):
    it must find what a walk of the parsed modules finds, from predict.py on."""
    import ast

    import registry

    found: dict[str, Path] = {}
    todo = ["predict"]
    while todo:
        name = todo.pop()
        path = ROOT / f"{name}.py"
        if name in found or not path.is_file():
            continue
        found[name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module.split(".")[0])
    assert registry.shipped_modules() == sorted(found.values())
    assert {"predict.py", "storage.py", "config.py"} <= {p.name for p in found.values()}


def test_mlflow_log_model_false_logs_no_model(tmp_path):
    from registry import log_trained_model

    class Tracker:  # a run that exists: only the settings may keep the model out
        run_id, active = "r1", True

    from config import load_settings

    settings = load_settings({"JOB_ID": "1", "DATASET_ID": "d", "STORAGE_TYPE": "local", "MLFLOW_LOG_MODEL": "false"})
    assert log_trained_model(settings, Tracker(), tmp_path / "best.pt", "detect", {}, lambda: False) == {}


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def test_evaluate_test_reports_test_metrics_in_the_final_status_and_mlflow(job):
    from mlflow import MlflowClient

    metrics = job["final"]["test_metrics"]
    for key in ("precision", "recall", "mAP50", "mAP50-95", "mAP@0.5", "fitness"):
        assert 0.0 <= metrics[key] <= 1.0, key
    client = MlflowClient(job["mlflow"])
    run_id = job["final"]["mlflow_run_id"]
    history = client.get_metric_history(run_id, "test/mAP50")
    assert [(m.step, m.value) for m in history] == [(1, metrics["mAP50"])]
    assert "test_evaluation.json" in {a.path for a in client.list_artifacts(run_id)}
    assert any(b["message"].startswith(f"test split: mAP@0.5 = ") and f"on {TEST_IMAGES} images" in b["message"]
               for b in job["receiver"].bodies("logs"))


def untrained_checkpoint(task: str, path: Path) -> Path:
    """A two-class checkpoint of the task, untrained, saved the way Ultralytics saves one."""
    import torch
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel

    kind, cfg = {"detect": (DetectionModel, "yolo11n.yaml"), "segment": (SegmentationModel, "yolo11n-seg.yaml"),
                 "pose": (PoseModel, "yolo11n-pose.yaml"), "obb": (OBBModel, "yolo11n-obb.yaml"),
                 "classify": (ClassificationModel, "yolo11n-cls.yaml")}[task]
    torch.manual_seed(1)
    model = kind(cfg, nc=2, verbose=False, **({"data_kpt_shape": (4, 3)} if task == "pose" else {}))
    model.names = dict(enumerate(sorted(NAMES) if task == "classify" else NAMES))  # class folders sort
    torch.save({"model": model, "train_args": {"task": task, "imgsz": 64}}, path)
    return path


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "obb", "classify"])
def test_evaluate_py_gives_ultralytics_own_test_numbers(task, s3_server, s3, tmp_path):
    from ultralytics import YOLO

    checkpoint = untrained_checkpoint(task, tmp_path / f"{task}.pt")
    root = make_dataset(tmp_path / "ds", task, n_train=2, n_val=2, n_test=TEST_IMAGES)
    # Ultralytics fills its own confusion matrix at the validator's confidence (0.001): the same for ours here
    env = {"CHECKPOINT_URI": str(checkpoint), "DEVICE": "cpu", "WORKERS": "0", "BATCH_SIZE": "4",
           "VALIDATION_CONF": "0.001", "WORK_DIR": str(tmp_path / "work")}
    if task == "detect":  # the dataset from storage, by DATASET_ID, as the platform runs it
        bucket = f"ev-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(make_zip(root, tmp_path / "ds.zip")), bucket, "datasets/ev.zip")
        env.update(storage_env(s3_server, bucket), DATASET_ID="ev")
    else:
        env.update(STORAGE_TYPE="local", DATASET_URI=str(root))
    result = run_entry("evaluate.py", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["split"] == "test" and doc["images"] == TEST_IMAGES and doc["task"] == task

    if task != "classify":
        (root / "data.yaml").write_text((root / "data.yaml").read_text().replace("path: .", f"path: {root}"))
    ultralytics_model = YOLO(str(checkpoint))
    theirs = ultralytics_model.val(data=str(root if task == "classify" else root / "data.yaml"), split="test",
                                       batch=4, device="cpu", workers=0, plots=True, verbose=False,
                                       project=str(tmp_path / "ul"), name="val")
    names = doc["class_names"]
    assert names == [ultralytics_model.names[i] for i in sorted(ultralytics_model.names)]
    from validation import contract_metrics

    expected = contract_metrics(theirs.results_dict, None)
    assert {k: doc["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-9)
    matrix = theirs.confusion_matrix.matrix  # Ultralytics' [predicted][true], with background for detection
    assert doc["confusion_matrix"] == [[int(matrix[p][t]) for p in range(2)] for t in range(2)]
    rows = doc["per_class_metrics"]
    if task == "classify":
        assert doc["primary_metric_value"] == theirs.results_dict["metrics/accuracy_top1"] > 0
        assert [rows[n]["support"] for n in names] == [int(matrix[:, t].sum()) for t in range(2)]
        assert sum(rows[n]["support"] for n in names) == TEST_IMAGES
        return
    # An untrained network finds nothing at IoU 0.5 (its boxes are many strides wide), so its metrics are
    # zeros: what is compared beyond them is every class's support, and the matrix Ultralytics filled.
    assert [rows[n]["support"] for n in names] == [int(v) for v in theirs.nt_per_class]
    assert all(rows[n]["support"] > 0 for n in names)
    # each true box counted once in its class's column, found or missed (the background row)
    assert [int(matrix[:, t].sum()) for t in range(2)] == [rows[n]["support"] for n in names]
    for i, c in enumerate(theirs.ap_class_index):
        row = rows[names[int(c)]]
        assert (row["ap_50"], row["ap_50_95"], row["precision"], row["recall"]) == pytest.approx(
            (theirs.box.ap50[i], theirs.box.ap[i], theirs.box.p[i], theirs.box.r[i]), abs=1e-6)


def test_evaluate_py_takes_val_when_there_is_no_test_split_and_refuses_a_task_mismatch(tmp_path):
    checkpoint = untrained_checkpoint("classify", tmp_path / "cls.pt")
    root = make_dataset(tmp_path / "ds", "classify", n_train=2, n_val=4)
    env = {"CHECKPOINT_URI": str(checkpoint), "DATASET_URI": str(root), "STORAGE_TYPE": "local", "DEVICE": "cpu",
           "WORKERS": "0", "WORK_DIR": str(tmp_path / "work")}
    result = run_entry("evaluate.py", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["split"] == "val" and doc["images"] == 4
    result = run_entry("evaluate.py", {**env, "TASK_TYPE": "object_detection"}, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "TASK_TYPE is detect but cls.pt is a classify model" in result.stderr


# ------------------------------------------------------------------------------------------
# Configuration and the comparison itself
# ------------------------------------------------------------------------------------------


def test_export_formats_are_parsed_with_aliases_and_every_bad_name_at_once():
    from config import load_settings
    from utils import ConfigError

    base = {"JOB_ID": "1", "DATASET_ID": "d", "STORAGE_TYPE": "local"}
    assert load_settings(base).export_formats == ()
    s = load_settings({**base, "EXPORT_FORMATS": " ONNX, torchscript,onnx, TensorRT , tflite,"})
    assert s.export_formats == ("onnx", "torchscript", "engine", "litert")
    with pytest.raises(ConfigError) as info:
        load_settings({**base, "EXPORT_FORMATS": "onnx,onxx,foo", "MLFLOW_REGISTERED_MODEL_NAME": "a/b", "EPOCHS": "0"})
    problems = info.value.problems
    assert any(p.startswith("EXPORT_FORMATS: 'onxx' (did you mean 'onnx'?), 'foo' are not export formats") for p in problems)
    assert any(p.startswith("MLFLOW_REGISTERED_MODEL_NAME='a/b' must be") for p in problems)
    assert any(p.startswith("EPOCHS=0") for p in problems)
    with pytest.raises(ConfigError) as info:
        load_settings({"STORAGE_TYPE": "local", "CHECKPOINT_URI": "x.pt"}, "export")
    assert "EXPORT_FORMATS is required" in info.value.problems
    with pytest.raises(ConfigError) as info:
        load_settings({"STORAGE_TYPE": "local", "CHECKPOINT_URI": "x.pt"}, "evaluate")
    assert "DATASET_ID (or DATASET_URI) is required" in info.value.problems


def test_export_format_names_are_ultralytics_own():
    from ultralytics.engine.exporter import export_formats

    from config import EXPORT_FORMAT_NAMES

    assert EXPORT_FORMAT_NAMES == tuple(export_formats()["Argument"][1:])


def test_verification_rejects_a_network_whose_outputs_differ(job):
    """The comparison is not vacuous: best.pt against a copy whose class scores are shifted (what a broken
    export would give) fails, on the predictions and on the raw outputs; best.pt against itself passes
    with no difference at all."""
    from ultralytics import YOLO

    from exports import VERIFY_CONF, compare_predictions, raw_output_diff, validation_images

    path = job["folder"] / "best.pt"
    job["s3"].download_file(job["bucket"], f"{job['prefix']}best.pt", str(path))
    images = validation_images(job["source"] / "data.yaml", 4)
    assert len(images) == 4
    models = [YOLO(str(path)) for _ in range(3)]
    for branch in models[2].model.model[-1].cv3:  # the class-score branch of each detection level
        branch[-1].bias.data += 1.0
    results = [[m.predict(im, imgsz=64, conf=VERIFY_CONF, device="cpu", verbose=False)[0] for _, im in images]
               for m in models]
    same = compare_predictions([(n, a, b) for (n, _), a, b in zip(images, results[0], results[1])])
    assert same["passed"] and same["compared"] >= 4 and same["max_box_diff_px"] == 0 == same["max_conf_diff"]
    differs = compare_predictions([(n, a, b) for (n, _), a, b in zip(images, results[0], results[2])])
    assert not differs["passed"] and differs["problems"], differs
    assert raw_output_diff(models[0], models[1], [im for _, im in images]) == 0
    assert raw_output_diff(models[0], models[2], [im for _, im in images]) > 0.01
