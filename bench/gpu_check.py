"""The GPU checks, in one run of under 5 minutes on a machine with CUDA: prints a table of timings.

    python -m bench.gpu_check [--epochs 5] [--images 500]

1. single-GPU training end to end: `python train.py` with DEVICE=0 (local storage, local MLflow
   store, tests/backend_receiver.py as the backend), checked for `completed`, one validation
   result per epoch and both checkpoints;
2. SIGTERM during GPU training: exit 143 and a resumable last.pt in storage;
3. `python predict.py` on the GPU: images per second over --images images;
4. with two or more GPUs: the same training with DEVICE=0,1 (Ultralytics DDP), checked the same
   way plus one MLflow run with one point per epoch (the callbacks ran in the rank-0 worker).

Exits 1 if a check fails, 2 if there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.sample_data import make_dataset, make_zip  # noqa: E402


class Receiver:
    def __init__(self, folder: Path):
        self.record = folder / "requests.jsonl"
        self.record.touch()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.backend_receiver", "--record", str(self.record)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}"

    def bodies(self, route: str) -> list[dict]:
        rows = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [r["body"] for r in rows if r["route"] == route and r["outcome"] == 200]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def job_env(work: Path, receiver: Receiver, job_id: str, **extra) -> dict:
    return {**os.environ, "JOB_ID": job_id, "DATASET_URI": str(work / "shapes.zip"), "MODEL_NAME": "yolo11n.yaml",
            "IMGSZ": "320", "BATCH_SIZE": "32", "STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(work / "storage"),
            "WORK_DIR": str(work / "work"), "CALLBACK_URL": f"{receiver.base}/internal/training/{job_id}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": f"gpu-{job_id}", **extra}


def check_training(work: Path, receiver: Receiver, job_id: str, epochs: int) -> list[str]:
    problems = []
    statuses = [b["status"] for b in receiver.bodies("status") if b.get("event_id")]
    epochs_seen = [b["epoch"] for b in receiver.bodies("validation-results")]
    if not statuses or statuses[-1] != "completed":
        problems.append(f"{job_id}: final status {statuses[-1:] or 'missing'}")
    if epochs_seen != list(range(1, epochs + 1)):
        problems.append(f"{job_id}: validation results for epochs {epochs_seen}")
    folder = work / "storage" / "vision-platform" / "checkpoints" / f"job-{job_id}"
    for name in ("best.pt", "last.pt"):
        if not (folder / name).is_file():
            problems.append(f"{job_id}: {name} missing in storage")
    return problems


def timed(cmd: list[str], env: dict, cwd: Path, log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    make_zip(make_dataset(work / "shapes", "detect", n_train=256, n_val=64, size=320), work / "shapes.zip")
    receiver = Receiver(work)
    rows, problems = [], []
    try:
        code, wall = timed([sys.executable, str(ROOT / "train.py")],
                           job_env(work, receiver, "gpu1", EPOCHS=str(args.epochs), DEVICE="0"), work, work / "gpu1.log")
        rows.append(("train.py, 1 GPU", f"{args.epochs} epochs, 256 images at 320", wall, code))
        problems += check_training(work, receiver, "gpu1", args.epochs) if code == 0 else [f"gpu1 exit {code}"]

        receiver.record.write_text("")
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")],
                                env=job_env(work, receiver, "gputerm", EPOCHS="50", DEVICE="0"), cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not receiver.bodies("validation-results") and proc.poll() is None:
            time.sleep(0.2)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        rows.append(("SIGTERM during training", "exit code, seconds to exit", time.perf_counter() - sent, code))
        last = work / "storage" / "vision-platform" / "checkpoints" / "job-gputerm" / "last.pt"
        if code != 143 or torch.load(last, map_location="cpu", weights_only=False).get("optimizer") is None:
            problems.append(f"SIGTERM: exit {code}, resumable last.pt: {last.is_file()}")

        images = make_dataset(work / "predict", "detect", n_train=1, n_val=args.images, size=320) / "images" / "val"
        env = {**os.environ, "STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(work / "storage"), "JOB_ID": "gpu1",
               "INPUT_URI": str(images), "IMGSZ": "320", "DEVICE": "0", "WORK_DIR": str(work / "work")}
        code, wall = timed([sys.executable, str(ROOT / "predict.py")], env, work, work / "predict.log")
        rows.append(("predict.py, 1 GPU", f"{args.images} images: {args.images / wall:.0f} images/s", wall, code))
        problems += [] if code == 0 else [f"predict exit {code}"]

        if gpus > 1:
            receiver.record.write_text("")
            code, wall = timed([sys.executable, str(ROOT / "train.py")],
                               job_env(work, receiver, "ddp", EPOCHS=str(args.epochs), DEVICE="0,1"), work, work / "ddp.log")
            rows.append(("train.py, DDP on 2 GPUs", f"{args.epochs} epochs, 256 images at 320", wall, code))
            problems += check_training(work, receiver, "ddp", args.epochs) if code == 0 else [f"ddp exit {code}"]
            from mlflow import MlflowClient

            client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
            runs = client.search_runs([client.get_experiment_by_name("gpu-ddp").experiment_id])
            steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "mAP50")] if len(runs) == 1 else []
            if steps != list(range(1, args.epochs + 1)):
                problems.append(f"ddp: {len(runs)} MLflow runs, mAP50 steps {steps}")
        else:
            rows.append(("train.py, DDP", "skipped: one GPU", 0.0, 0))
    finally:
        receiver.stop()

    print(f"\n{time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}\n")
    print("| check | what | seconds | exit |")
    print("| --- | --- | ---: | ---: |")
    for name, what, seconds, code in rows:
        print(f"| {name} | {what} | {seconds:.1f} | {code} |")
    print("\n" + ("all checks passed" if not problems else "FAILED:\n  " + "\n  ".join(problems)))
    print(f"logs in {work}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
