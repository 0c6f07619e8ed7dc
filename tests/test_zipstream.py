"""A zip dataset extracted while it downloads (zipstream.py), against the moto S3 server through
boto3: the result, the overlap itself, and each way back to the plain path."""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest

import archives
import datasets
import storage as storage_module
import zipstream
from config import load_settings
from storage import Storage
from tests.conftest import storage_env
from utils import BadInput, TransientError
from zipstream import Landed, central_directory_start


def zip_bytes(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def dataset_entries(images: int = 300, seed: int = 0) -> dict[str, bytes]:
    """A detection dataset of `images` incompressible 'images' of 3-9 KB, with labels and data.yaml."""
    import random

    rng = random.Random(seed)
    entries = {"data.yaml": b"path: .\ntrain: images/train\nval: images/train\nnames: [a]\n"}
    for i in range(images):
        entries[f"images/train/{i:04d}.jpg"] = rng.randbytes(rng.randint(3000, 9000))
        entries[f"labels/train/{i:04d}.txt"] = b"0 0.5 0.5 0.2 0.2\n"
    return entries


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 256 KB and a 16 KB first read of the end, so a 2 MB zip takes several parts and a
    second read for its directory (what a 300 MB archive does at full size)."""
    monkeypatch.setattr(Storage, "STREAM_BELOW", 256 * 1024)
    monkeypatch.setattr(zipstream, "TAIL_BYTES", 16 * 1024)


def fetch(s3_server: str, bucket: str, key: str, work: Path):
    settings = load_settings({**storage_env(s3_server, bucket), "JOB_ID": "zs", "DATASET_URI": key,
                              "WORK_DIR": str(work)}, "train")
    storage = Storage(settings.storage)
    try:
        _, root = datasets.download_dataset(storage, settings)
    finally:
        import cache

        cache.release_entries()
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_zip_is_extracted_while_it_downloads(s3_server, s3, bucket, small_parts, monkeypatch, tmp_path, caplog):
    entries = dataset_entries()
    s3.put_object(Bucket=bucket, Key="datasets/d.zip", Body=zip_bytes(entries))
    events: list[tuple[str, float]] = []
    finish, write = Landed.finish, archives._Budget.write
    monkeypatch.setattr(Landed, "finish", lambda self, error=None: (events.append(("downloaded", time.monotonic())),
                                                                     finish(self, error))[-1])
    monkeypatch.setattr(archives._Budget, "write", lambda self, data, target: (
        events.append(("written", time.monotonic())), write(self, data, target))[-1])
    with caplog.at_level(logging.INFO, logger="trainer"):
        root = fetch(s3_server, bucket, "datasets/d.zip", tmp_path)
    assert tree(root) == entries
    assert "as it downloads" in caplog.text and "downloading it whole" not in caplog.text
    downloaded = next(t for what, t in events if what == "downloaded")
    assert any(what == "written" and t < downloaded for what, t in events), "no entry was written before the download ended"
    assert not list((tmp_path / "jobs").rglob("*.zip")), "the archive is deleted once extracted"


def test_object_replaced_once_its_directory_was_read_is_a_transient_failure(s3_server, s3, bucket, small_parts,
                                                                             monkeypatch, tmp_path, caplog):
    """Every part asks If-Match the ETag the job saw: parts of a replaced object are refused (412)
    instead of mixed with the directory already read; the plain path then finds the object changed
    too, and the job fails as transient (a retry sees the new object) with nothing half-made kept."""
    s3.put_object(Bucket=bucket, Key="datasets/r.zip", Body=zip_bytes(dataset_entries(seed=1)))
    download_into = Storage.download_into

    def replace_first(self, loc, info, file, path):
        s3.put_object(Bucket=bucket, Key="datasets/r.zip", Body=zip_bytes(dataset_entries(seed=2)))
        return download_into(self, loc, info, file, path)

    monkeypatch.setattr(Storage, "download_into", replace_first)
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(TransientError, match="r.zip (is incomplete|does not match)"):
        fetch(s3_server, bucket, "datasets/r.zip", tmp_path)
    assert "did not match expected ETag.); downloading it whole" in caplog.text
    assert not [p for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")], "nothing left half-made"


def test_damaged_entry_falls_back_and_the_plain_path_gives_the_error(s3_server, s3, bucket, small_parts, tmp_path,
                                                                     caplog):
    entries = dataset_entries()
    data = bytearray(zip_bytes(entries, zipfile.ZIP_STORED))
    victim = entries["images/train/0100.jpg"]
    data[data.index(victim) + 10] ^= 0xFF
    s3.put_object(Bucket=bucket, Key="datasets/bad.zip", Body=bytes(data))
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(BadInput, match=r"bad.zip\S* is corrupt.*0100\.jpg"):
        fetch(s3_server, bucket, "datasets/bad.zip", tmp_path)
    assert "0100.jpg'); extracting the downloaded archive" in caplog.text  # not downloaded twice
    assert not re.search(r"downloading s3://\S+ \([^)]*\) to ", caplog.text)  # the plain download's line
    assert not [p for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")], "nothing left half-made"


def test_a_zip_refused_on_its_directory_stops_downloading_and_is_not_fetched_again(s3_server, s3, bucket, small_parts,
                                                                                    monkeypatch, tmp_path, caplog):
    """An entry that would land outside the dataset folder refuses the archive from its directory
    alone: its download stops there (not run to the end, then again whole by the plain path)."""
    entries = {"../outside.txt": b"x", **dataset_entries(images=2000)}  # listed first: refused at once
    data = zip_bytes(entries, zipfile.ZIP_STORED)  # about 12 MB: some 47 parts of 256 KB
    s3.put_object(Bucket=bucket, Key="datasets/evil.zip", Body=data)
    written: list[int] = []
    write = zipstream.LandingFile.write
    monkeypatch.setattr(zipstream.LandingFile, "write", lambda self, chunk: written.append(write(self, chunk)))
    with caplog.at_level(logging.INFO, logger="trainer"), \
            pytest.raises(BadInput, match=r"outside.txt' points outside the dataset folder"):
        fetch(s3_server, bucket, "datasets/evil.zip", tmp_path)
    assert sum(written) < len(data) / 2, f"{sum(written)} of {len(data)} bytes downloaded"
    assert "refused on its directory" in caplog.text and "downloading it whole" not in caplog.text
    assert not [p for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")], "nothing left half-made"


def test_a_file_named_zip_that_is_not_one_falls_back_to_a_clear_error(s3_server, s3, bucket, small_parts, tmp_path):
    s3.put_object(Bucket=bucket, Key="datasets/not.zip", Body=os.urandom(600_000))
    with pytest.raises(BadInput, match=r"not.zip\S* is not a zip or tar archive"):
        fetch(s3_server, bucket, "datasets/not.zip", tmp_path)


def test_landed_yields_each_item_once_its_span_has_landed_in_landing_order():
    landed = Landed()
    items = ["a", "b", "c", "d"]
    spans = [(0, 10), (10, 20), (20, 30), (30, 40)]
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(landed.as_they_land(items, spans)))
    reader.start()
    landed.add(20, 35)  # c lands first (d is only partly there)
    wait_for(lambda: got == ["c"])
    landed.add(0, 5)
    landed.add(0, 12)  # written again, and further (a retried part): a
    wait_for(lambda: got == ["c", "a"])
    landed.add(12, 20)  # touches both neighbours: b, and the ranges merge
    wait_for(lambda: got == ["c", "a", "b"])
    assert landed.ranges() == [(0, 35)]
    landed.add(35, 40)
    landed.finish()
    reader.join(5)
    assert got == ["c", "a", "b", "d"]


def test_landed_raises_the_download_error_to_the_extraction():
    landed = Landed()
    landed.add(0, 10)
    landed.finish(RuntimeError("connection reset"))
    with pytest.raises(RuntimeError, match="connection reset"):
        list(landed.as_they_land(["a", "b"], [(0, 10), (10, 20)]))
    with pytest.raises(RuntimeError, match="connection reset"):
        landed.wait()


@pytest.mark.parametrize("zip64", [False, True])
def test_central_directory_is_found_from_the_end_record(zip64, monkeypatch):
    if zip64:  # what Python writes past 65,535 entries, without writing that many
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
    data = zip_bytes({f"f{i}.txt": b"x" * 100 for i in range(10)})
    assert (b"PK\x06\x06" in data) == zip64
    expected = zipfile.ZipFile(io.BytesIO(data)).start_dir
    assert central_directory_start(data, 0) == expected
    tail_start = len(data) - 700
    assert central_directory_start(data[tail_start:], tail_start) == expected
    assert central_directory_start(b"no end record here" * 10, 0) is None


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_storage_module_keeps_the_plain_download_for_small_zips(s3_server, s3, bucket, tmp_path, monkeypatch):
    """Under STREAM_BELOW a zip is one streamed GET, then extracted: no ranged reads."""
    calls = []
    monkeypatch.setattr(storage_module.Storage, "read_range", lambda *a, **k: calls.append(a))
    entries = dataset_entries(images=5)
    s3.put_object(Bucket=bucket, Key="datasets/small.zip", Body=zip_bytes(entries))
    assert tree(fetch(s3_server, bucket, "datasets/small.zip", tmp_path)) == entries and not calls


def test_a_download_that_left_bytes_unwritten_is_not_taken(s3_server, s3, bucket, small_parts, monkeypatch, tmp_path,
                                                            caplog):
    """The file is laid out at full size, so its size proves nothing: what the download wrote must
    cover it. A transfer that wrote nothing falls back to the plain download."""
    entries = dataset_entries()
    s3.put_object(Bucket=bucket, Key="datasets/hole.zip", Body=zip_bytes(entries, zipfile.ZIP_STORED))
    monkeypatch.setattr(Storage, "download_into", lambda self, loc, info, file, path: None)
    with caplog.at_level(logging.INFO, logger="trainer"):
        root = fetch(s3_server, bucket, "datasets/hole.zip", tmp_path)
    assert "is incomplete: it wrote []" in caplog.text and "downloading it whole" in caplog.text
    assert tree(root) == entries


def test_a_disk_too_small_for_the_archive_and_its_files_fails_at_once(s3_server, s3, bucket, small_parts, monkeypatch,
                                                                      tmp_path, caplog):
    """The archive downloads beside its extraction: both must fit. Not enough room is transient and
    final (the plain path needs the same room), with no second download."""
    import shutil
    from collections import namedtuple

    entries = dataset_entries()
    data = zip_bytes(entries, zipfile.ZIP_STORED)
    s3.put_object(Bucket=bucket, Key="datasets/big.zip", Body=data)
    extracted = sum(len(v) for v in entries.values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, extracted + len(data) // 2))
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(TransientError, match="still downloading"):
        fetch(s3_server, bucket, "datasets/big.zip", tmp_path)
    assert "downloading it whole" not in caplog.text
