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
