"""The benchmarks keep working as the code moves: they reach into the trainer's modules by name, so a
renamed or moved function must fail here, not on the day someone measures."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_probe_wraps_functions_that_exist_where_their_callers_look_them_up():
    import bench.trainer_probe as probe  # its table of wrapped functions is resolved on import

    assert all(callable(getattr(owner, name)) for owner, name in probe.WRAPPED)


def test_the_fetch_benchmark_runs_end_to_end_on_a_tiny_dataset(tmp_path):
    """s5cmd, the trainer's own fetch and a boto3 loop against a local S3 server, one small round."""
    result = subprocess.run([sys.executable, "-m", "bench.fetch_bench", "--rounds", "1", "--archive-mb", "2",
                             "--files", "20", "--workdir", str(tmp_path), "--download-variants"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer / s5cmd" in result.stdout or "s5cmd" in result.stdout, result.stdout[-2000:]
    assert "the trainer's parts" in result.stdout


def test_the_fetch_benchmark_sends_every_client_through_the_delaying_proxy(tmp_path):
    """--latency-ms: s5cmd, the trainer and the boto3 loop all fetch through the proxy that holds each request."""
    result = subprocess.run([sys.executable, "-m", "bench.fetch_bench", "--rounds", "1", "--files", "10",
                             "--archive-mb", "1", "--shapes", "prefix", "--latency-ms", "20", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every request held 20 ms" in result.stdout, result.stdout[-2000:]
    gets = [line.split("\t") for line in (tmp_path / "proxy-requests.tsv").read_text().splitlines()]
    gets = [r for r in gets if r[2] == "GET" and "images-prefix/" in r[3] and "list-type" not in r[3]]
    assert len(gets) >= 3 * 11, len(gets)  # each of the 11 objects, by each of the three clients
    assert all(float(r[1]) - float(r[0]) >= 0.02 for r in gets)
