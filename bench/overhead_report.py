"""The tables bench/overhead_bench.py prints: train.py beside plain Ultralytics (the issue 13 targets),
beside plain Ultralytics with its own per-epoch upload (--upload-reference), where train.py's time
goes by step, and bench/trainer_probe.py's totals (--probe)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.overhead_bench import Run

# train.py's steps, as its log says (the first line matching each), for "where the time goes".
MILESTONES = [
    ("configuration logged (imports, settings)", r"trainer: configuration:"),
    ("dataset download starts", r"downloading s3://"),
    ("dataset downloaded", r"downloaded \S+ in"),
    ("dataset extracted, data.yaml written", r"dataset ready at"),
    ("dataset check done", r"dataset check done"),
    ("MLflow run created", r"MLflow: (run|continuing run)"),
    ("model built, training starts", r"training yolo|resuming yolo|training \S+ on"),
    ("first training batch (Starting training...)", r"Starting training for"),
    ("last epoch over (epochs completed)", r"epochs completed in"),
    ("final validation of best.pt", r"Validating .*best\.pt"),
    ("final uploads start (upload_outputs)", r"uploading best\.pt \("),
    ("MLflow artifacts logged, run ended", r"View run "),
    ("event log uploaded (after the final status)", r"uploading events\.jsonl \("),
    ("job files removed", r"trainer: removed "),
]


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def mb(n: float | None) -> str:
    return "n/a" if n is None or n != n else f"{n / 1e6:.1f} MB"


def report_upload_reference(uploading: list[Run], ours: list[Run]) -> None:
    """train.py against plain Ultralytics that also uploads last.pt every epoch (--upload-reference)."""
    print("\ntrain.py against plain Ultralytics that also puts each epoch's last.pt in the same S3 server "
          "(the upload and the server's CPU on both sides):\n")
    print("| measure | plain + per-epoch upload | train.py | train.py vs it |")
    print("| --- | ---: | ---: | ---: |")
    for name, key in (("time per epoch, s", "per_epoch"), ("CPU s per epoch (the process and its workers)", "cpu_per_epoch"),
                      ("the same, less MLflow's helper process", "cpu_per_epoch_without_helper"),
                      ("whole process, wall s", "wall")):
        a, b = median([getattr(r, key) for r in uploading]), median([getattr(r, key) for r in ours])
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(b / a if a else None, '.3f')}x |")


def report(plain: list[Run], ours: list[Run], args, load: str) -> None:
    p = {k: median([getattr(r, k) for r in plain]) for k in ("wall", "start", "per_epoch", "cpu_per_epoch", "finish",
                                                             "cpu_total", "cpu_per_epoch_without_helper")}
    t = {k: median([getattr(r, k) for r in ours]) for k in p}
    during = median([r.uploads["during"] / args.epochs for r in ours])
    final = median([r.uploads["final"] for r in ours])
    checkpoint = median([r.uploads["checkpoint"] for r in ours])
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.model} on the CPU, {args.train} train + {args.val} val images at imgsz {args.imgsz}, batch {args.batch}, "
          f"workers {args.workers}, {args.epochs} epochs; MLflow {args.mlflow}; S3: moto"
          f"{' (direct)' if args.direct else ' behind the counting proxy'}; "
          f"median of {len(ours)} train.py and {len(plain)} plain runs, alternating; load before: {load}"
          + "".join(f"; {k}={v!r} for train.py" for k, v in args.set) + "\n")
    print("| measure | plain Ultralytics | train.py | train.py vs plain | target | met |")
    print("| --- | ---: | ---: | ---: | --- | --- |")

    def row(name, a, b, kind, target, ok):
        diff = b / a if kind == "ratio" else b - a
        shown = f"{diff:.3f}x" if kind == "ratio" else f"{diff:+.2f} s"
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {shown} | {target} | {'yes' if ok(diff) else '**no**'} |")

    row("time per epoch, s (results.csv, epochs 2..N)", p["per_epoch"], t["per_epoch"], "ratio", "<= 1.03",
        lambda d: d <= 1.03)
    row("CPU s per epoch (the process and its workers)", p["cpu_per_epoch"], t["cpu_per_epoch"], "ratio", "<= 1.03",
        lambda d: d <= 1.03)
    row("the same, less MLflow's helper process (its one-time warm-up for logging the model)",
        p["cpu_per_epoch_without_helper"], t["cpu_per_epoch_without_helper"], "ratio", "<= 1.03", lambda d: d <= 1.03)
    row("start: launch to first batch, s", p["start"], t["start"], "diff", "plain + 2 s", lambda d: d <= 2)
    row("finish: end of last epoch to exit, s", p["finish"], t["finish"], "diff", "plain + 3 s", lambda d: d <= 3)
    row("whole process, wall s", p["wall"], t["wall"], "ratio", "aim < 1.10", lambda d: d < 1.10)
    row("whole process, CPU s", p["cpu_total"], t["cpu_total"], "ratio", "(no target)", lambda d: True)
    if args.direct:
        print("| bytes PUT to storage per epoch | - | n/a (--direct) | | <= one checkpoint | |")
    else:
        ok = during <= (checkpoint or 0) * 1.01
        print(f"| bytes PUT to storage per epoch | - | {mb(during)} | {fmt(during / checkpoint if checkpoint else None)} "
              f"checkpoints (one last.pt: {mb(checkpoint)}) | <= one checkpoint | {'yes' if ok else '**no**'} |")
        print(f"| bytes PUT to storage after training | - | {mb(final)} | | | |")
        keys = ours[-1].uploads["per_key"]
        print("\nper-epoch uploads in the last train.py run: "
              + ", ".join(f"{k} x{n}" for k, n in sorted(keys.items()))
              + f"; server-side copies: {ours[-1].uploads['copies']}")
    print("\nper run (wall s / start s / per-epoch s / CPU per epoch s (of which MLflow's helper) / finish s):")
    for r in plain + ours:
        print(f"- {r.side}: {fmt(r.wall, '.1f')} / {fmt(r.start)} / {fmt(r.per_epoch)} / {fmt(r.cpu_per_epoch)} "
              f"({fmt(r.helper_cpu_per_epoch)}) / {fmt(r.finish)}")

    print("\nWhere train.py's time goes (seconds from launch, median; plain's where it has the step):\n")
    print("| step reached | plain | train.py | since the step before |")
    print("| --- | ---: | ---: | ---: |")
    previous = 0.0
    for name, pattern in MILESTONES:
        at = median([r.first(pattern) for r in ours])
        before = median([r.first(pattern) for r in plain]) if re.search("Starting|epochs completed|Validating", pattern) else None
        print(f"| {name} | {fmt(before)} | {fmt(at)} | {fmt(at - previous if at == at else None)} |")
        previous = at if at == at else previous
    last_p = median([r.lines[-1][0] - r.launch for r in plain if r.lines])
    last_t = median([r.lines[-1][0] - r.launch for r in ours if r.lines])
    print(f"| last line of output | {fmt(last_p)} | {fmt(last_t)} | {fmt(last_t - previous)} |")
    print(f"| process exit | {fmt(p['wall'])} | {fmt(t['wall'])} | {fmt(t['wall'] - last_t)} |")


def report_probe(probe: Path, epochs: int, exited: float) -> None:
    """bench/trainer_probe.py's totals: train.py's own functions, and CPU per thread per epoch."""
    data = json.loads(probe.read_text())
    print(f"\ntrain.main() returned {exited - data['returned']:.2f} s before the process exited; threads still "
          f"alive then: {', '.join(data['threads_at_return']) or 'none'}")
    print("\nInside train.py (one extra run through bench/trainer_probe.py; wall and CPU of the calling thread):\n")
    print("| function | thread | calls | wall s | CPU s | CPU s per epoch |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in sorted(data["functions"], key=lambda r: -r["wall"]):
        if row["wall"] >= 0.005:
            print(f"| {row['function']} | {row['thread']} | {row['calls']} | {row['wall']:.3f} | {row['cpu']:.3f} | "
                  f"{row['cpu'] / epochs:.3f} |")
    samples = {}
    for sample in data["epochs"]:
        if sample["epoch"] <= epochs:
            samples.setdefault(sample["epoch"], sample)
    if len(samples) < 2:
        return
    first, last = samples[min(samples)], samples[max(samples)]
    n = max(samples) - min(samples)
    print(f"\nCPU seconds per epoch by thread (epoch ends {min(samples)} to {max(samples)}):\n")
    print("| thread | CPU s per epoch |")
    print("| --- | ---: |")
    for name in sorted(last["threads"], key=lambda k: -(last["threads"][k] - first["threads"].get(k, 0))):
        print(f"| {name} | {(last['threads'][name] - first['threads'].get(name, 0)) / n:.3f} |")
    print(f"| whole process | {(last['process'] - first['process']) / n:.3f} |")
    if "gc_seconds" in last:
        counts = [b - a for a, b in zip(first["gc_collections"], last["gc_collections"])]
        print(f"\nGarbage collector's pauses: {(last['gc_seconds'] - first['gc_seconds']) / n:.3f} s per epoch "
              f"({'/'.join(str(c) for c in counts)} collections of generations 0/1/2 over {n} epochs)")
