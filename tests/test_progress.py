"""Progress people can read: a long storage transfer logs progress (or draws a bar on a terminal),
and the epoch summary line has the fields `kubectl logs` readers look for."""

from __future__ import annotations

import io
import logging
import re

import pytest

import progress
from config import StorageSettings
from progress import TransferProgress, duration, epoch_summary
from storage import Storage
from tests.conftest import ACCESS_KEY, SECRET_KEY

SIZE = 24 * 1024 * 1024  # several parts of a multipart transfer: callbacks from several threads


def progress_lines(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what}: ")]


def test_a_long_transfer_logs_percent_bytes_speed_and_eta_and_still_stops_at_its_safe_points(
        s3_server, bucket, tmp_path, caplog):
    src = tmp_path / "big.bin"
    src.write_bytes(b"\x01" * SIZE)
    calls = []
    storage = Storage(StorageSettings("minio", bucket, s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1",
                                      progress_interval=0.01), interrupt=lambda: calls.append(1))
    caplog.set_level(logging.INFO, logger="trainer")
    storage.upload(src, storage.locate("data/big.bin"))
    storage.download(storage.locate("data/big.bin"), tmp_path / "out" / "big.bin")
    line = re.compile(r"^(uploading|downloading) big\.bin: (\d+)% \((\d+\.\d|\d+) (B|KB|MB) of 24\.0 MB\) "
                      r"at \d+\.\d (B|KB|MB|GB)/s, ETA (\d+ s|\d+ min \d\d s|unknown)$")
    for what in ("uploading big.bin", "downloading big.bin"):
        lines = progress_lines(caplog, what)
        assert lines, f"no progress line for {what}"
        assert all(line.match(x) for x in lines), lines
        percents = [int(line.match(x)[2]) for x in lines]
        assert all(0 <= p < 100 for p in percents)
    assert calls  # the stop signal's hook still runs at every callback


def test_a_short_transfer_logs_no_progress(s3_server, bucket, tmp_path, caplog):
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 10_000)
    storage = Storage(StorageSettings("minio", bucket, s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1"))  # 5 s
    caplog.set_level(logging.INFO, logger="trainer")
    storage.upload(src, storage.locate("small.bin"))
    storage.download(storage.locate("small.bin"), tmp_path / "small-copy.bin")
    assert not progress_lines(caplog, "uploading small.bin") and not progress_lines(caplog, "downloading small.bin")


def test_progress_counts_retried_parts_back_and_interval_0_is_silent(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="trainer")
    p = TransferProgress("uploading x.pt", 1000, interval=3600, bar=False)
    p(600)
    p(-200)  # s3transfer reports a retried part's bytes as negative
    assert p.done == 400 and p.line().startswith("uploading x.pt: 40% (400 B of 1000 B) at ")
    silent = TransferProgress("downloading y.pt", 1000, interval=0, bar=False)
    monkeypatch.setattr(progress.time, "monotonic", lambda: 1e9)  # long after the start
    silent(500)
    assert silent.done == 0 and not caplog.records


def test_a_terminal_gets_a_tqdm_bar_instead_of_lines(caplog, monkeypatch):
    monkeypatch.setattr(progress, "BAR_AFTER", 0.0)
    caplog.set_level(logging.INFO, logger="trainer")
    out = io.StringIO()
    p = TransferProgress("downloading shapes.zip", 2 * 1024 * 1024, interval=0.001, bar=True, file=out)
    for _ in range(4):
        p(512 * 1024)
    text = out.getvalue()
    assert "downloading shapes.zip:" in text and "%|" in text and "/2.00M" in text  # tqdm's bar, in bytes
    assert not progress_lines(caplog, "downloading shapes.zip")


def test_durations_read_naturally():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 180)] == ["0 s", "59 s", "1 min 01 s", "59 min 59 s",
                                                                          "2 h 03 min"]


def test_epoch_summary_has_epoch_losses_primary_metric_time_and_eta():
    line = epoch_summary(3, 10, {"box_loss": 1.23456, "cls_loss": 2.5, "dfl_loss": 1.0}, ("mAP@0.5", 0.45678), 12.34, 98)
    assert line == "epoch 3/10 | train loss box 1.235 cls 2.500 dfl 1.000 | mAP@0.5 0.4568 | 12.3 s, ETA 1 min 38 s"
    assert epoch_summary(1, 1, {}, ("accuracy", None), None, None) == "epoch 1/1 | accuracy - | - s, ETA unknown"


@pytest.mark.parametrize("stderr_tty,expected", [(False, False), (True, True)])
def test_bars_only_on_a_terminal(monkeypatch, stderr_tty, expected):
    monkeypatch.setattr(progress.sys, "stderr", type("S", (), {"isatty": lambda self: stderr_tty})())
    assert progress.on_terminal() is expected
