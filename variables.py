"""Every environment variable the trainer reads, in one table: its default (ENV_VARS) and what it
means (ENV_HELP). config.py reads the environment through it; `--help` prints it (cli.py);
.env.example, docs/contract.md and tests/test_config.py follow it.

Environment: none (this is the list of it).
Imports: nothing.
"""

from __future__ import annotations

# Every variable the trainer reads, with its default ("" = unset). .env.example and the README
# list the same names; tests/test_config.py keeps the three in step.
ENV_VARS: dict[str, str] = {
    # job
    "JOB_ID": "",
    "PROJECT_ID": "default",
    "TASK_TYPE": "",
    "MODEL_NAME": "yolo11n",
    "DATASET_ID": "",
    "DATASET_URI": "",
    "EPOCHS": "100",
    "BATCH_SIZE": "16",
    "LEARNING_RATE": "",
    "IMGSZ": "640",
    "DEVICE": "",
    "WORKERS": "",
    "TRAIN_ARGS": "{}",
    "WORK_DIR": "",
    "CACHE_MAX_BYTES": "50000000000",
    "KEEP_JOB_FILES": "false",
    "RESUME": "auto",
    "CHECKPOINT_INTERVAL": "1",
    "SHUTDOWN_TIMEOUT": "20",
    "DATASET_MAX_BYTES": "100000000000",
    "DATASET_MAX_FILES": "5000000",
    "DATASET_CHECK": "strict",
    "VAL_FRACTION": "0.1",
    "PRETRAINED_PREFIX": "models/",
    "WEIGHTS_DOWNLOAD": "true",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "text",
    "PROGRESS_INTERVAL": "5",
    "TLS_CA_BUNDLE": "",
    "TLS_VERIFY": "true",
    # backend callbacks
    "CALLBACK_URL": "",
    "INTERNAL_AUTH_TOKEN": "",
    "CALLBACK_CONNECT_TIMEOUT": "3",
    "CALLBACK_TIMEOUT": "10",
    "CALLBACK_MAX_ATTEMPTS": "8",
    "CALLBACK_FLUSH_TIMEOUT": "10",
    "CALLBACK_HEALTH_INTERVAL": "10",
    "VALIDATION_IMAGES": "50",
    "VALIDATION_CONF": "0.25",
    # storage
    "STORAGE_TYPE": "minio",
    "STORAGE_BUCKET": "vision-platform",
    "MINIO_ENDPOINT": "http://localhost:9000",
    "MINIO_ACCESS_KEY": "",
    "MINIO_SECRET_KEY": "",
    "R2_ENDPOINT": "",
    "R2_ACCESS_KEY_ID": "",
    "R2_SECRET_ACCESS_KEY": "",
    "R2_BUCKET": "",
    "LOCAL_STORAGE_DIR": "storage",
    "STORAGE_MAX_ATTEMPTS": "8",
    "STORAGE_TIMEOUT": "60",
    "STORAGE_CHECKSUM": "when_required",
    # tracking
    "MLFLOW_TRACKING_URI": "",
    "MLFLOW_EXPERIMENT_NAME": "",
    # predict
    "CHECKPOINT_URI": "",
    "INPUT_URI": "",
    "CONF_THRESHOLD": "0.25",
    "IOU_THRESHOLD": "0.7",
    "MAX_DET": "300",
    "PREDICT_BATCH": "16",
    "PREDICT_SHARDS": "1",
    "JOB_COMPLETION_INDEX": "",
    "PREDICT_OUTPUT_URI": "",
    "PREDICT_SAVE_IMAGES": "true",
    # models people ship (exports.py, registry.py, evaluation.py; export.py, evaluate.py)
    "EXPORT_FORMATS": "",
    "EXPORT_OUTPUT_URI": "",
    "EXPORT_VERIFY_IMAGES": "8",
    "MLFLOW_LOG_MODEL": "true",
    "MLFLOW_REGISTERED_MODEL_NAME": "",
    "EVALUATE_TEST": "false",
}


# What each variable of ENV_VARS means, one line each: `train.py --help` and `predict.py --help`
# print it (cli.py) with the default from ENV_VARS. A meaning that starts with "train.py:" or
# "predict.py:" is read by that entry point only. tests/test_config.py checks every variable has one.
ENV_HELP: dict[str, str] = {
    # job
    "JOB_ID": "the training job's id (required by train.py); names checkpoints/job-{JOB_ID}/; letters, digits, . _ -",
    "PROJECT_ID": "train.py: the project the job belongs to; tags the MLflow run, names the default experiment",
    "TASK_TYPE": "object_detection, instance_segmentation, image_classification, pose_estimation, "
                 "oriented_detection (or detect, segment, classify, pose, obb); unset = inferred",
    "MODEL_NAME": "train.py: pretrained name (yolo11n), a config to train from scratch (yolo11n.yaml), "
                  "or a .pt checkpoint: s3://bucket/key.pt, a storage key or a local path",
    "DATASET_ID": "train.py: the dataset is datasets/{DATASET_ID}.zip in the bucket (required unless DATASET_URI)",
    "DATASET_URI": "train.py: the dataset instead of DATASET_ID: s3://bucket/key.zip|.tar|.tar.gz, a prefix "
                   "ending in /, a storage key, or a local archive or folder",
    "EPOCHS": "train.py: epochs in total (>= 1)",
    "BATCH_SIZE": "train.py: batch size; -1 = AutoBatch; a fraction in (0, 1) = that share of GPU memory",
    "LEARNING_RATE": "train.py: initial learning rate (lr0), 0 < x < 1; set = AdamW unless TRAIN_ARGS names an "
                     "optimizer; unset = Ultralytics' optimizer=auto chooses both",
    "IMGSZ": "training and inference image size (32-8192); unset in predict.py, evaluate.py and export.py: the "
             "size the model was trained at",
    "DEVICE": "cpu, 0, 0,1,2,3 or mps; unset = the first GPU if there is one, else cpu",
    "WORKERS": "data loader workers of train.py (unset: min(8, CPUs)); image loading threads of predict.py "
               "(unset: 2 x CPUs, 2 to 8)",
    "TRAIN_ARGS": "train.py: any other Ultralytics training argument as a JSON object, e.g. {\"patience\": 20}",
    "WORK_DIR": "where datasets, weights, Ultralytics settings and run outputs go (unset: <temp dir>/yolo-trainer)",
    "CACHE_MAX_BYTES": "train.py: cap in bytes on WORK_DIR/datasets + WORK_DIR/weights, least recently used "
                       "evicted first; 0 = no cap",
    "KEEP_JOB_FILES": "train.py: true keeps WORK_DIR/jobs/job-{JOB_ID}/ after the job ends, for debugging",
    "RESUME": "train.py: auto = resume from the job's last.pt in storage when resumable; false = start fresh",
    "CHECKPOINT_INTERVAL": "train.py: upload last.pt every N epochs (best.pt whenever it improves)",
    "SHUTDOWN_TIMEOUT": "train.py: seconds from SIGTERM (or a failure) to exit; keep below the pod's grace period",
    "DATASET_MAX_BYTES": "train.py: cap on a dataset's download and uncompressed size, in bytes",
    "DATASET_MAX_FILES": "train.py: cap on the entries of a dataset archive or the objects under a dataset prefix",
    "DATASET_CHECK": "train.py: strict = a dataset problem fails the job (exit 2); warn = report and train; off",
    "VAL_FRACTION": "train.py: share of train images that become the validation split when a dataset has none",
    "PRETRAINED_PREFIX": "train.py: storage prefix where pretrained weights are looked up by name",
    "WEIGHTS_DOWNLOAD": "train.py: last resort for a pretrained name: Ultralytics' download from the internet",
    "LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR",
    "LOG_FORMAT": "text, or json: one JSON object per line on stderr (time, level, logger, job_id, message, epoch)",
    "PROGRESS_INTERVAL": "seconds between progress lines of a storage transfer that runs longer than that; "
                         "0 = none (on a terminal: a progress bar)",
    "TLS_CA_BUNDLE": "a PEM bundle to trust for storage, backend and MLflow (a private CA); unset = the system's",
    "TLS_VERIFY": "false turns certificate checks off for storage, backend and MLflow (with a warning)",
    # backend callbacks
    "CALLBACK_URL": "train.py: base URL of the job's callback routes; unset = no callbacks, events are only logged",
    "INTERNAL_AUTH_TOKEN": "train.py: sent as X-Internal-Auth on every callback (secret)",
    "CALLBACK_CONNECT_TIMEOUT": "train.py: seconds to connect to the backend",
    "CALLBACK_TIMEOUT": "train.py: seconds to wait for the backend's answer",
    "CALLBACK_MAX_ATTEMPTS": "train.py: tries per callback event",
    "CALLBACK_FLUSH_TIMEOUT": "train.py: seconds to deliver queued events at exit before giving up",
    "CALLBACK_HEALTH_INTERVAL": "train.py: seconds between GET {CALLBACK_URL}/health polls (cancelled stops the "
                                "job); 0 = never",
    "VALIDATION_IMAGES": "train.py: per epoch, per-image results of this many validation images; 0 = none",
    "VALIDATION_CONF": "train.py: confidence threshold of those results and of the detection confusion matrix",
    # storage
    "STORAGE_TYPE": "minio, r2, s3 (AWS: credentials from the usual AWS_* chain) or local (a folder)",
    "STORAGE_BUCKET": "bucket for datasets, weights and checkpoints (R2_BUCKET wins for r2)",
    "MINIO_ENDPOINT": "MinIO URL; host:port is taken as http://host:port",
    "MINIO_ACCESS_KEY": "MinIO access key (required for minio)",
    "MINIO_SECRET_KEY": "MinIO secret key (required for minio; secret)",
    "R2_ENDPOINT": "https://<account>.r2.cloudflarestorage.com (required for r2)",
    "R2_ACCESS_KEY_ID": "R2 access key id (required for r2)",
    "R2_SECRET_ACCESS_KEY": "R2 secret access key (required for r2; secret)",
    "R2_BUCKET": "bucket on R2; wins over STORAGE_BUCKET",
    "LOCAL_STORAGE_DIR": "with STORAGE_TYPE=local: objects are files at <dir>/<bucket>/<key>",
    "STORAGE_MAX_ATTEMPTS": "tries per storage request (boto3 standard retry mode)",
    "STORAGE_TIMEOUT": "seconds a storage read may stall before it is retried",
    "STORAGE_CHECKSUM": "boto3 checksums: when_required (R2, older MinIO) or when_supported",
    # tracking
    "MLFLOW_TRACKING_URI": "train.py: MLflow tracking server; unset = a SQLite store in WORK_DIR",
    "MLFLOW_EXPERIMENT_NAME": "train.py: MLflow experiment (unset: project-{PROJECT_ID})",
    # predict
    "CHECKPOINT_URI": "predict.py: the weights: s3:// URI, storage key or local path "
                      "(unset: checkpoints/job-{JOB_ID}/best.pt)",
    "INPUT_URI": "predict.py: an image or folder, local or in storage (s3://bucket/key, or a prefix ending in /); "
                 "required",
    "CONF_THRESHOLD": "predict.py: confidence threshold",
    "IOU_THRESHOLD": "predict.py: NMS IoU threshold",
    "MAX_DET": "predict.py: most detections per image",
    "PREDICT_BATCH": "predict.py: images per inference batch",
    "PREDICT_SHARDS": "predict.py: the number of shards the input is split into (a Kubernetes Indexed Job's "
                      "completions); each pod takes the images whose key hashes to its JOB_COMPLETION_INDEX",
    "JOB_COMPLETION_INDEX": "predict.py: this pod's shard, 0 to PREDICT_SHARDS - 1 (Kubernetes sets it in an "
                            "Indexed Job); unset = all images",
    "PREDICT_OUTPUT_URI": "predict.py: storage prefix that receives predictions.json (predictions-{index}.json "
                          "for a shard) and annotated images; unset = stdout only",
    "PREDICT_SAVE_IMAGES": "predict.py: with PREDICT_OUTPUT_URI, also store annotated images",
    # models: exports, the MLflow model, evaluation
    "EXPORT_FORMATS": "formats to export best.pt to after training, and export.py's formats, e.g. onnx,torchscript "
                      "(Ultralytics' names; tested here: onnx, torchscript); empty = no exports",
    "EXPORT_OUTPUT_URI": "export.py: storage prefix for the exported files; unset = export/ beside the checkpoint",
    "EXPORT_VERIFY_IMAGES": "validation images each export is compared with the checkpoint on; 0 = one generated image",
    "MLFLOW_LOG_MODEL": "train.py: log the trained model to the job's MLflow run as a pyfunc model",
    "MLFLOW_REGISTERED_MODEL_NAME": "train.py: register that model in MLflow's Model Registry under this name; "
                                    "unset = not registered",
    "EVALUATE_TEST": "train.py: after training, also evaluate best.pt on the dataset's test split (test_metrics)",
}
