"""What train.py adds to a training job: `python train.py` beside plain Ultralytics training with
the same arguments, both as whole processes, alternating, medians (issue 13's targets).

    python -m bench.overhead_bench [--pairs 3] [--epochs 8] [--train 24] [--val 8] [--imgsz 64]
        [--batch 8] [--workers N] [--model yolo11n.yaml] [--mlflow server|sqlite] [--fresh-work-dir]
        [--direct] [--probe] [--upload-reference] [--set KEY=VALUE ...]
    python -m bench.overhead_bench --pairs 1 --epochs 3 --no-warmup      # a quick check

Services, each its own process (group), started once and stopped at the end:
- moto's S3 server (`python -m moto.server`), behind bench/s3_count_proxy.py, which records every
  request and its body size; train.py talks to the proxy (STORAGE_TYPE=minio);
- tests/backend_receiver.py as the backend (callbacks on, with a token);
- a real `mlflow server` (SQLite store, artifacts in a bucket of the same moto server), or with
  `--mlflow sqlite` train.py's default SQLite store in WORK_DIR.

Each pair runs `python -m bench.plain_train` (YOLO(model).train(...) on the extracted dataset, the
labels cache removed first) and `python train.py` (the same dataset as a zip in the bucket, under a
new key each run so every run downloads and extracts it; WORK_DIR persists between runs as in the
backend's subprocess mode and the image's /work volume, unless --fresh-work-dir), first one then the
other, in turns. One warm-up run of each comes first and is not counted (--no-warmup to skip it).
Both get the same arguments: data, epochs, imgsz, batch, lr0 with AdamW, workers, device=cpu,
seed 0, plots=False; and PYTHONUNBUFFERED=1, as the image sets.

Measured per run, from outside the process: wall time (launch to exit); start (launch to the line
"Starting training for N epochs...", which Ultralytics logs just before the first batch); per-epoch
time (results.csv's elapsed `time` column: the mean of its differences, epochs 2..N); the process's
own CPU seconds per epoch (/proc of it and its data-loader workers, sampled when each results.csv
row appears; the S3 server, proxy, backend and MLflow server are other processes and not in it);
its total CPU (os.wait4); finish (results.csv's last row written, the end of the last epoch, to
exit); and for train.py the bytes it PUT to storage: per epoch (every upload but the last of each
key, over the epochs) and at the end. Prints the table with the issue's targets, then the times at
which train.py reached each of its steps. --direct: train.py talks to moto without the proxy (no byte
counts; shows what the proxy itself costs). --probe: one more train.py run through
bench/trainer_probe.py, with the wall and CPU time of train.py's own functions and threads.
--upload-reference: a third process in each round, plain Ultralytics that also puts each epoch's
last.pt in the same S3 server (bench/plain_train.py's one-callback upload), and a second table of
train.py against it: what train.py adds beyond uploading a checkpoint every epoch, which on a
machine this small includes the S3 server's own CPU (issue 13: keep the store's CPU out of the figure).
The tables are bench/overhead_report.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead_report import median, report, report_probe, report_upload_reference  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.sample_data import make_dataset, make_zip  # noqa: E402

BUCKET = "bench-overhead"
ACCESS_KEY, SECRET_KEY = "bench-access", "bench-secret"
TOKEN = "bench-token"
START_LINE = re.compile(r"Starting training for \d+ epochs")
POLL = 0.025  # seconds between samples of the child's CPU and its results.csv

def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start within {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------
# Services
# ----------------------------------------------------------------------------------------------


class Services:
    """moto S3, the recording proxy, the backend receiver and (optionally) an MLflow server."""

    def __init__(self, work: Path, mlflow: str):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.record = work / "s3-requests.tsv"
        self.callbacks = work / "callbacks.jsonl"
        self.record.touch()
        self.callbacks.touch()
        port = free_port()
        self.s3_direct = f"http://127.0.0.1:{port}"
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], "moto.log")
        import requests

        wait_for(lambda: requests.get(self.s3_direct, timeout=2).status_code < 500, 60, "moto server")
        self.s3_proxy = f"http://127.0.0.1:{self._port_of([sys.executable, '-m', 'bench.s3_count_proxy', '--upstream', self.s3_direct, '--record', str(self.record)])}"
        self.backend = f"http://127.0.0.1:{self._port_of([sys.executable, '-m', 'tests.backend_receiver', '--record', str(self.callbacks), '--token', TOKEN])}"
        self.s3 = self.client(self.s3_direct)
        self.s3.create_bucket(Bucket=BUCKET)
        self.mlflow_uri = None
        if mlflow == "server":
            self.s3.create_bucket(Bucket="mlflow-artifacts")
            port = free_port()
            env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3_direct, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                   "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self._spawn([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow-server.db'}",
                         "--artifacts-destination", "s3://mlflow-artifacts/"], "mlflow-server.log", env)
            self.mlflow_uri = f"http://127.0.0.1:{port}"
            wait_for(lambda: requests.get(f"{self.mlflow_uri}/health", timeout=2).ok, 120, "mlflow server")

    @staticmethod
    def client(endpoint: str):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))

    def _spawn(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.work / log, "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _port_of(self, cmd: list[str]) -> int:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"{cmd[2]} did not start: {line!r}")
        return int(line.split()[1])

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    launch: float = 0.0
    exit: float = 0.0
    code: int | None = None
    cpu_total: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)
    rows: list[tuple[float, float, int, float, float]] = field(default_factory=list)  # (seen, cpu, rows, mtime, helper cpu)
    csv_text: str = ""
    uploads: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.exit - self.launch

    def first(self, pattern: str) -> float | None:
        regex = re.compile(pattern)
        return next((t - self.launch for t, line in self.lines if regex.search(line)), None)

    @property
    def start(self) -> float | None:
        return self.first(START_LINE.pattern)

    def epoch_times(self) -> list[float]:
        lines = [line.split(",") for line in self.csv_text.strip().splitlines()]
        if len(lines) < 2:
            return []
        column = [c.strip() for c in lines[0]].index("time")
        return [float(row[column]) for row in lines[1:]]

    @property
    def per_epoch(self) -> float | None:
        times = self.epoch_times()
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None

    def _cpu_per_epoch(self, which: int) -> float | None:
        by_rows = {}
        for sample in self.rows:
            by_rows.setdefault(sample[2], sample[which])  # the first sample that saw this many rows
        counts = sorted(by_rows)
        if len(counts) < 2 or counts[-1] - counts[0] < 1:
            return None
        return (by_rows[counts[-1]] - by_rows[counts[0]]) / (counts[-1] - counts[0])

    @property
    def cpu_per_epoch(self) -> float | None:
        return self._cpu_per_epoch(1)

    @property
    def helper_cpu_per_epoch(self) -> float | None:
        """Of cpu_per_epoch, MLflow's helper process (mostly its one-time warm-up for logging the model)."""
        return self._cpu_per_epoch(4)

    @property
    def cpu_per_epoch_without_helper(self) -> float | None:
        total, helper = self.cpu_per_epoch, self.helper_cpu_per_epoch
        return None if total is None or helper is None else total - helper

    @property
    def finish(self) -> float | None:
        return self.exit - self.rows[-1][3] if self.rows else None


def tree_cpu(proc: psutil.Process) -> tuple[float, float]:
    """CPU seconds of a process, its reaped children and its live ones (data-loader workers, MLflow's
    helper); and of those, MLflow's helper process's (train.py's mlflow_worker.py)."""
    total, helper = sum(proc.cpu_times()[:4]), 0.0
    for child in proc.children(recursive=True):
        try:
            cpu = sum(child.cpu_times()[:2])
            total += cpu
            if any(part.endswith("mlflow_worker.py") for part in child.cmdline()):
                helper += cpu
        except psutil.Error:
            pass
    return total, helper


def run_process(side: str, cmd: list[str], env: dict, cwd: Path, csv: Path, log: Path, timeout: float) -> Run:
    """Start one training process and watch it: output lines, results.csv rows, CPU, exit."""
    run = Run(side)
    csv.unlink(missing_ok=True)
    run.launch = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def read() -> None:
        with log.open("w") as out:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                run.lines.append((time.time(), line))
                out.write(line + "\n")

    def poll() -> None:
        size = -1
        while not done.is_set():
            try:
                st = csv.stat()
                if st.st_size != size:
                    size, text = st.st_size, csv.read_text()
                    cpu, helper = tree_cpu(ps)
                    rows = max(0, len(text.strip().splitlines()) - 1)
                    if rows:
                        run.csv_text = text
                        run.rows.append((time.time(), cpu, rows, st.st_mtime, helper))
            except (OSError, psutil.Error):
                pass
            time.sleep(POLL)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=poll, daemon=True)]
    for t in threads:
        t.start()
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: the child (its own session) must not outlive the bench
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        raise
    run.exit = time.time()
    killer.cancel()
    done.set()
    proc.returncode = run.code = os.waitstatus_to_exitcode(status)
    run.cpu_total = usage.ru_utime + usage.ru_stime
    for t in threads:
        t.join(10)
    return run


def plain_run(n: int, args, work: Path, data_yaml: Path, dataset: Path, env: dict,
              services: Services | None = None) -> Run:
    """Plain Ultralytics; with services, the same plus a checkpoint upload per epoch to their S3 server."""
    for cache in dataset.rglob("*.cache"):  # Ultralytics' labels cache: both sides build it once per run
        cache.unlink()
    side = "plain + upload" if services else "plain"
    project = work / "plain-runs"
    name = f"run{n}{'-upload' if services else ''}"
    shutil.rmtree(project / name, ignore_errors=True)
    train_args = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "lr0": args.lr0,
                  "optimizer": "AdamW", "workers": args.workers, "device": "cpu", "seed": 0, "plots": False}
    cmd = [sys.executable, "-m", "bench.plain_train", str(data_yaml), args.model, str(project), name,
           json.dumps(train_args)]
    if services:  # the same way to the store as train.py's: through the counting proxy unless --direct
        endpoint = services.s3_direct if args.direct else services.s3_proxy
        cmd.append(json.dumps({"endpoint": endpoint, "bucket": BUCKET, "prefix": f"plain/{name}/",
                               "access_key": ACCESS_KEY, "secret_key": SECRET_KEY}))
    run = run_process(side, cmd, env, ROOT, project / name / "results.csv",
                      work / "logs" / f"plain-{n}{'-upload' if services else ''}.log", args.timeout)
    shutil.rmtree(project / name, ignore_errors=True)
    return run


def trainer_run(n: int, args, work: Path, services: Services, archive: Path, env: dict, probe: Path | None = None) -> Run:
    job = f"ovh{n}-{os.getpid()}"
    key = f"datasets/bench-{job}.zip"
    services.s3.upload_file(str(archive), BUCKET, key)  # a new key: a cache miss, a real download
    work_dir = work / (f"trainer-work-{n}" if args.fresh_work_dir else "trainer-work")
    job_env = {**env, "JOB_ID": job, "DATASET_URI": f"s3://{BUCKET}/{key}", "MODEL_NAME": args.model,
               "EPOCHS": str(args.epochs), "IMGSZ": str(args.imgsz), "BATCH_SIZE": str(args.batch),
               "LEARNING_RATE": str(args.lr0), "DEVICE": "cpu", "WORKERS": str(args.workers),
               "TRAIN_ARGS": json.dumps({"seed": 0, "plots": False}), "STORAGE_TYPE": "minio",
               "MINIO_ENDPOINT": services.s3_direct if args.direct else services.s3_proxy, "MINIO_ACCESS_KEY": ACCESS_KEY, "MINIO_SECRET_KEY": SECRET_KEY,
               "STORAGE_BUCKET": BUCKET, "WORK_DIR": str(work_dir),
               "CALLBACK_URL": f"{services.backend}/internal/training/{job}", "INTERNAL_AUTH_TOKEN": TOKEN,
               "MLFLOW_EXPERIMENT_NAME": "overhead-bench"}
    if services.mlflow_uri:
        job_env["MLFLOW_TRACKING_URI"] = services.mlflow_uri
    job_env.update(args.set)  # --set: an ablation (a variable changed, or unset with KEY=)
    job_env = {k: v for k, v in job_env.items() if v != ""}
    cmd = [sys.executable, str(ROOT / "train.py")]
    if probe:
        cmd, job_env["BENCH_PROBE_OUT"] = [sys.executable, "-m", "bench.trainer_probe"], str(probe)
        job_env["PYTHONPATH"] = str(ROOT)
    csv = work_dir / "jobs" / f"job-{job}" / "train" / "results.csv"
    run = run_process("train.py", cmd, job_env, work, csv, work / "logs" / f"trainer-{n}{'-probe' if probe else ''}.log",
                      args.timeout)
    run.uploads = uploads_of(services.record, run)
    if job_env.get("CALLBACK_URL"):
        check_callbacks(services.callbacks, job, args.epochs, run)
    services.s3.delete_object(Bucket=BUCKET, Key=key)
    if args.fresh_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return run


def variable(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def check_callbacks(record: Path, job: str, epochs: int, run: Run) -> None:
    """The job really reported: one validation result per epoch and a `completed` status."""
    rows = [json.loads(line) for line in record.read_text().splitlines() if f"/training/{job}/" in line]
    results = [r for r in rows if r["route"] == "validation-results" and r["outcome"] == 200]
    final = [r["body"].get("status") for r in rows if r["route"] == "status" and isinstance(r["body"], dict)]
    if len(results) != epochs or not final or final[-1] != "completed":
        raise SystemExit(f"train.py job {job}: {len(results)} validation results for {epochs} epochs, "
                         f"statuses {final[-3:]}; see its log")


def uploads_of(record: Path, run: Run) -> dict:
    """train.py's uploads during its run, from the proxy's record: what went up per epoch and at the end.

    An upload is a PutObject or one multipart upload (all its parts); a CopyObject moves no bytes.
    Each key's last upload is the final one (upload_outputs, the completion marker, the event log);
    the ones before it are the per-epoch background uploads.
    """
    groups: dict[str, dict] = {}
    copies = 0
    for line in record.read_text().splitlines():
        started, _, method, path, bytes_in, _, status, copy = line.split("\t")
        if not run.launch <= float(started) <= run.exit or method != "PUT" or not status.startswith("2"):
            continue
        url = urlparse(path)
        key = url.path.split("/", 2)[-1]
        if copy != "-":
            copies += 1
            continue
        if "partNumber" not in url.query and url.query:  # a bucket-level or other sub-resource PUT
            continue
        upload_id = parse_qs(url.query).get("uploadId", [f"put-{started}"])[0]
        group = groups.setdefault(upload_id, {"key": key, "started": float(started), "bytes": 0})
        group["started"] = min(group["started"], float(started))
        group["bytes"] += int(bytes_in)
    by_key: dict[str, list[dict]] = {}
    for group in sorted(groups.values(), key=lambda g: g["started"]):
        by_key.setdefault(group["key"], []).append(group)
    during = sum(g["bytes"] for gs in by_key.values() for g in gs[:-1])
    final = sum(gs[-1]["bytes"] for gs in by_key.values())
    checkpoint = [g["bytes"] for k, gs in by_key.items() if k.endswith("/last.pt") for g in gs[:-1]]
    names = {k.rsplit("/", 1)[-1]: len(gs) - 1 for k, gs in by_key.items() if len(gs) > 1}
    return {"during": during, "final": final, "checkpoint": median(checkpoint) if checkpoint else None,
            "copies": copies, "per_key": names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs; medians are reported")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=24, help="generated training images")
    parser.add_argument("--val", type=int, default=8, help="generated validation images")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr0", type=float, default=0.01, help="LEARNING_RATE (and lr0 with AdamW for plain)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers, both sides (default: train.py's own default here)")
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--mlflow", choices=("server", "sqlite"), default="server")
    parser.add_argument("--fresh-work-dir", action="store_true", help="a new WORK_DIR for every train.py run (a new pod)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--direct", action="store_true", help="train.py talks to moto directly: no byte counts")
    parser.add_argument("--probe", action="store_true",
                        help="one more train.py run through bench/trainer_probe.py: where its time goes, by function")
    parser.add_argument("--upload-reference", action="store_true",
                        help="a third run per round: plain Ultralytics that uploads last.pt every epoch")
    parser.add_argument("--set", type=variable, action="append", default=[], metavar="KEY=VALUE",
                        help="a variable for train.py (repeatable; KEY= unsets it): to see what one part costs, "
                             "e.g. --set CALLBACK_URL= --set CHECKPOINT_INTERVAL=1000")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    parser.add_argument("--workdir", type=Path, help="keep logs and files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.workers is None:
        from utils import available_cpus

        args.workers = min(8, available_cpus())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(work / "shapes", "detect", n_train=args.train, n_val=args.val, size=args.imgsz)
    archive = make_zip(dataset, work / "shapes.zip")
    data_yaml = work / "plain-data.yaml"
    data_yaml.write_text((dataset / "data.yaml").read_text().replace("path: .", f"path: {dataset}"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_"))},
           "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1", "MPLCONFIGDIR": str(work / "matplotlib")}
    plain_env = {**env, "YOLO_CONFIG_DIR": str(work / "plain-ultralytics")}
    services = Services(work, args.mlflow)
    print(f"logs in {work / 'logs'}", file=sys.stderr)
    try:
        if not args.no_warmup:
            plain_run(0, args, work, data_yaml, dataset, plain_env)
            trainer_run(0, args, work, services, archive, env)
            if args.upload_reference:
                plain_run(0, args, work, data_yaml, dataset, plain_env, services)
        runs: dict[str, list[Run]] = {"plain": [], "train.py": [], "plain + upload": []}
        sides = list(runs) if args.upload_reference else ["plain", "train.py"]
        probe_run = None
        signal.signal(signal.SIGTERM, interrupted)  # `timeout` ends a long run: report the pairs done
        try:
            for n in range(1, args.pairs + 1):
                order = sides[(n - 1) % len(sides):] + sides[:(n - 1) % len(sides)]  # each side leads in turn
                for side in order:
                    if side == "train.py":
                        run = trainer_run(n, args, work, services, archive, env)
                    else:
                        run = plain_run(n, args, work, data_yaml, dataset, plain_env,
                                        services if side == "plain + upload" else None)
                    if run.code != 0:
                        raise SystemExit(f"{side} run {n} exited {run.code}; see {work / 'logs'}")
                    runs[side].append(run)
                    print(f"round {n}: {side} {run.wall:.1f} s", file=sys.stderr)
            if args.probe:
                probe_run = trainer_run(args.pairs + 1, args, work, services, archive, env, probe=work / "probe.json")
        except KeyboardInterrupt:
            print("interrupted: reporting the runs completed so far", file=sys.stderr)
    finally:
        services.stop()
    plain, ours = runs["plain"], runs["train.py"]
    if not plain or not ours:
        raise SystemExit("no complete run on each side: nothing to report")
    report(plain, ours, args, load)
    if runs["plain + upload"]:
        report_upload_reference(runs["plain + upload"], ours)
    if probe_run:
        report_probe(work / "probe.json", args.epochs, probe_run.exit)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
