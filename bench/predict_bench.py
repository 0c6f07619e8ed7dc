"""Benchmark predict.py against a plain Ultralytics predict loop, and its memory at scale.

    python -m bench.predict_bench [--images 500] [--large 5000] [--imgsz 320] [--size 320]

Each run is a separate process started the same way (`python predict.py` with the job's
environment, or `python -m bench.plain_predict`); wall time covers the whole process, peak
memory is that process's maximum resident set size (os.wait4). Prints a markdown table with
throughput and memory ratios against the reference run in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(len(list(folder.glob("*.jpg"))), count):
        img = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, size - 40, 2)
            cv2.rectangle(img, (int(x), int(y)), (int(x) + 40, int(y) + 30), (40, 40, 220), -1)
        cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), img)
    return folder


def run(cmd: list[str], env: dict) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS in MiB, and the parsed JSON output of one process."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed with {proc.returncode}")
        out.seek(0)
        return wall, usage.ru_maxrss / 1024, json.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--size", type=int, default=320, help="side of the generated images in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "yolo-trainer-bench")
    args = parser.parse_args()

    work = args.workdir
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics"))
    from ultralytics import YOLO

    weights = work / "yolo11n-untrained.pt"
    if not weights.exists():
        YOLO("yolo11n.yaml").save(str(weights))
    small = make_images(work / f"images-{args.images}", args.images, args.size)
    large = make_images(work / f"images-{args.large}", args.large, args.size)

    env = {**os.environ, "YOLO_CONFIG_DIR": str(work / "ultralytics"), "YOLO_OFFLINE": "1"}
    predict_env = {**env, "STORAGE_TYPE": "local", "CHECKPOINT_URI": str(weights), "IMGSZ": str(args.imgsz),
                   "DEVICE": "cpu", "PREDICT_BATCH": str(args.batch), "WORK_DIR": str(work / "predict-work")}
    rows = []
    plain = run([sys.executable, "-m", "bench.plain_predict", str(weights), str(small), str(args.imgsz)], env)
    rows.append(("plain `model.predict` loop", args.images, *plain))
    ours = run([sys.executable, "predict.py"], {**predict_env, "INPUT_URI": str(small)})
    rows.append(("predict.py", args.images, *ours))
    big = run([sys.executable, "predict.py"], {**predict_env, "INPUT_URI": str(large)})
    rows.append(("predict.py", args.large, *big))
    for _, n, _, _, doc in rows:
        assert doc["count"] == n, (doc["count"], n)

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch on CPU, imgsz {args.imgsz}, {args.size}x{args.size} JPEGs, batch {args.batch}\n")
    print("| run | images | wall s | images/s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, n, wall, rss, _ in rows:
        print(f"| {name} | {n} | {wall:.1f} | {n / wall:.1f} | {rss:.0f} |")
    print(f"\nthroughput predict.py / plain loop at {args.images} images: "
          f"{(args.images / ours[0]) / (args.images / plain[0]):.2f}x (target >= 0.95x)")
    print(f"peak memory predict.py {args.large} / {args.images} images: {big[1] / ours[1]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
