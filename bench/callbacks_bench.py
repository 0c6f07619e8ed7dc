"""How much a misbehaving backend costs a training job: wall time against a healthy backend.

    python -m bench.callbacks_bench [--epochs 3] [--imgsz 128] [--repeats 1]

Runs `python train.py` (local storage, local MLflow store, 96 generated images, epochs longer
than the slow backend's answers, as real epochs are) against tests/backend_receiver.py
configured as: healthy, down (nothing listening), slow (every answer after 2 s), flaky (15% 500s
and 15% answers lost after the event was stored). Prints wall times and ratios to the healthy
run of the same invocation; the target is <= 1.10 for down and slow.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.sample_data import make_dataset, make_zip  # noqa: E402

SCENARIOS = {
    "healthy": [],
    "down (nothing listening)": None,
    "slow (2 s per answer)": ["--delay", "2"],
    "flaky (15% 500, 15% lost answers)": ["--fail-rate", "0.15", "--hang-rate", "0.15", "--hang-seconds", "5"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(work: Path, options: list[str] | None, args) -> float:
    receiver = None
    port = free_port()
    if options is not None:
        receiver = subprocess.Popen([sys.executable, "-m", "tests.backend_receiver", "--record", str(work / "rec.jsonl"),
                                     *options], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        port = int(receiver.stdout.readline().split()[1])
    job = f"bench{time.time_ns() % 10**8}"
    env = {**os.environ, "JOB_ID": job, "DATASET_URI": str(work / "big.zip"), "MODEL_NAME": "yolo11n.yaml",
           "EPOCHS": str(args.epochs), "IMGSZ": str(args.imgsz), "BATCH_SIZE": "16", "DEVICE": "cpu", "WORKERS": "0",
           "TRAIN_ARGS": '{"plots": false}', "STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(work / "storage"),
           "WORK_DIR": str(work / "work"), "CALLBACK_URL": f"http://127.0.0.1:{port}/internal/training/{job}",
           "CALLBACK_TIMEOUT": "1" if options and "--hang-rate" in options else "10"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py")], env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if receiver:
        receiver.terminate()
        receiver.wait()
    if result.returncode != 0:
        raise SystemExit(f"train.py failed:\n{result.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="runs per scenario; the median counts")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="callbacks-bench-"))
    make_zip(make_dataset(work / "big", "detect", n_train=96, n_val=16), work / "big.zip")
    run_job(work, [], args)  # warm-up: dataset extraction, MLflow database, caches
    walls = {}
    for name, options in SCENARIOS.items():
        times = sorted(run_job(work, options, args) for _ in range(args.repeats))
        walls[name] = times[len(times) // 2]
    base = walls["healthy"]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, {args.epochs} epochs, "
          f"96 images at imgsz {args.imgsz}, median of {args.repeats}\n")
    print("| backend | wall s | ratio to healthy |")
    print("| --- | ---: | ---: |")
    for name, wall in walls.items():
        print(f"| {name} | {wall:.1f} | {wall / base:.2f} |")


if __name__ == "__main__":
    main()
