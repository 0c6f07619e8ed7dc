"""Storage against a real S3-compatible HTTP server (moto), through the real boto3 client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from config import StorageSettings
from storage import Location, ObjectInfo, Storage, StorageNotFound
from tests.conftest import ACCESS_KEY, SECRET_KEY, free_port, spawn_server, with_group
from utils import BadInput, TransientError


@pytest.fixture
def storage(s3_server, bucket) -> Storage:
    return Storage(StorageSettings("minio", bucket, s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=2))


def test_upload_then_download_round_trips(storage, tmp_path):
    src = tmp_path / "w.pt"
    src.write_bytes(b"x" * 70_000)
    uri = storage.upload(src, storage.locate("checkpoints/job-1/w.pt"))
    assert uri == f"s3://{storage.bucket}/checkpoints/job-1/w.pt"
    dest = storage.download(storage.locate(uri), tmp_path / "out" / "w.pt")
    assert dest.read_bytes() == src.read_bytes()
    assert not list((tmp_path / "out").glob("*.part-*"))  # no partial file left behind


def test_head_reports_size_and_etag_or_none(storage, tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    storage.upload(tmp_path / "a", storage.locate("a"))
    info = storage.head(storage.locate("a"))
    assert info.size == 3 and info.etag
    assert storage.head(storage.locate("missing")) is None


def test_download_of_missing_object_is_bad_input(storage, tmp_path):
    with pytest.raises(StorageNotFound) as info:
        storage.download(storage.locate("datasets/nope.zip"), tmp_path / "x")
    assert isinstance(info.value, BadInput)
    assert f"s3://{storage.bucket}/datasets/nope.zip does not exist" in str(info.value)


def test_fetch_downloads_once_then_uses_the_cache_until_the_object_changes(storage, tmp_path):
    src = tmp_path / "m.pt"
    src.write_bytes(b"v1")
    loc = storage.locate("models/m.pt")
    storage.upload(src, loc)
    dest = tmp_path / "cache" / "m.pt"
    storage.fetch(loc, dest)
    dest.write_bytes(b"v9")  # same size: only the ETag tells the cache is current
    assert storage.fetch(loc, dest).read_bytes() == b"v9"  # not downloaded again
    src.write_bytes(b"v2")
    storage.upload(src, loc)
    assert storage.fetch(loc, dest).read_bytes() == b"v2"  # new ETag: downloaded again


def test_listing_follows_pagination_past_1000_keys(storage, s3):
    for i in range(1005):
        s3.put_object(Bucket=storage.bucket, Key=f"many/{i:05d}.jpg", Body=b"i")
    keys = [loc.key for loc, _ in storage.list(storage.locate("many/"))]
    assert len(keys) == 1005 and keys[0] == "many/00000.jpg" and keys[-1] == "many/01004.jpg"


def test_listing_leaves_out_folder_markers(storage, s3):
    for key in ("ds/", "ds/images/", "ds/images/a.jpg"):
        s3.put_object(Bucket=storage.bucket, Key=key, Body=b"" if key.endswith("/") else b"jpg")
    assert [loc.key for loc, _ in storage.list(storage.locate("ds/"))] == ["ds/images/a.jpg"]


def test_prefix_dataset_with_folder_markers_is_downloaded_whole(storage, s3, s3_server, tmp_path):
    import datasets
    from config import load_settings
    from tests.conftest import storage_env
    from tests.sample_data import make_dataset

    root = make_dataset(tmp_path / "src", "detect", n_train=2, n_val=1)
    for folder in ("", "images/", "images/train/", "labels/"):  # as a console's "create folder" writes them
        s3.put_object(Bucket=storage.bucket, Key=f"datasets/marked/{folder}", Body=b"")
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), storage.bucket, f"datasets/marked/{f.relative_to(root).as_posix()}")
    settings = load_settings({**storage_env(s3_server, storage.bucket), "JOB_ID": "m1", "DATASET_URI": "datasets/marked/",
                              "WORK_DIR": str(tmp_path / "work")})
    data_yaml, _ = datasets.download_dataset(storage, settings)
    folder = Path(yaml.safe_load(data_yaml.read_text())["path"])
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_prefix_names_that_cannot_be_local_files_are_bad_input(storage, s3, s3_server, tmp_path):
    """S3 lets `images` and `images/a.jpg` both be objects, and a key part be 1,024 bytes long: such a
    prefix dataset ended in IsADirectoryError or 'File name too long', exit 1."""
    import datasets
    from config import load_settings
    from tests.conftest import storage_env

    def fetch(prefix: str):
        settings = load_settings({**storage_env(s3_server, storage.bucket), "JOB_ID": "n1", "DATASET_URI": prefix,
                                  "WORK_DIR": str(tmp_path / "work")})
        return datasets.download_dataset(storage, settings)

    for key in ("clash/images", "clash/images/a.jpg"):
        s3.put_object(Bucket=storage.bucket, Key=key, Body=b"x")
    with pytest.raises(BadInput, match="clash/: images is an object, and also the folder of images/a.jpg"):
        fetch("clash/")
    s3.put_object(Bucket=storage.bucket, Key="long/images/" + "a" * 240 + ".jpg", Body=b"x")
    with pytest.raises(BadInput, match="is too long for a local file"):
        fetch("long/")
    for key in ("backslash/labels", "backslash/labels\\a.txt"):  # Windows tools' separator, as archives have it
        s3.put_object(Bucket=storage.bucket, Key=key, Body=b"x")
    with pytest.raises(BadInput, match="labels is an object, and also the folder of"):
        fetch("backslash/")


def test_an_object_replaced_while_it_downloads_is_taken_new_and_the_store_still_trusted(storage, s3, tmp_path):
    """Replaced by one of the same size between the HEAD and the GET (a checkpoint uploaded each epoch
    while predict.py fetches it): the second transfer used to give the same 'mismatch' and the store's
    ETags were judged not to be MD5s, so nothing was checked by MD5 for the rest of the process."""
    loc = Location(storage.bucket, "race/best.pt")
    s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=b"A" * 1000)
    old = storage.head(loc)
    s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=b"B" * 1000)  # replaced after the HEAD
    got = storage.download(loc, tmp_path / "best.pt", old)
    assert got.read_bytes() == b"B" * 1000 and not storage._etags_not_md5


def test_s3_uri_with_another_bucket_is_honoured(storage):
    assert storage.locate("s3://elsewhere/a/b.pt") == Location("elsewhere", "a/b.pt")
    assert storage.locate("/a/b.pt") == Location(storage.bucket, "a/b.pt")


@pytest.mark.parametrize("ref", ["s3://bucket-only", "s3:///key", "a/../../b", ""])
def test_malformed_references_are_bad_input(storage, ref):
    with pytest.raises(BadInput):
        storage.locate(ref)


def test_missing_bucket_is_bad_input_not_transient(s3_server, tmp_path):
    storage = Storage(StorageSettings("minio", "no-such-bucket-x", s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1"))
    (tmp_path / "f").write_bytes(b"1")
    with pytest.raises(BadInput) as info:
        storage.upload(tmp_path / "f", storage.locate("f"))
    assert not isinstance(info.value, TransientError) and "no-such-bucket-x" in str(info.value)


def test_unreachable_storage_is_transient(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    storage = Storage(StorageSettings("minio", "b", dead, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=1, timeout=2))
    with pytest.raises(TransientError) as info:
        storage.head(storage.locate("x"))
    assert SECRET_KEY not in str(info.value)


@pytest.fixture
def proxied(s3_server, bucket, tmp_path):
    """Factory: a Storage reaching the S3 server through tests/s3_fault_proxy.py, which records every
    request and gives ETags as a store of that kind does (md5, kms, opaque); returns it and a
    function counting the requests of a method for a key."""
    procs = []

    def start(etags: str):
        record = tmp_path / f"requests-{etags}.log"
        proc, url = spawn_server("tests.s3_fault_proxy", "--upstream", s3_server, "--fail-rate", "0", "--record",
                                 str(record), "--log-requests", "--etags", etags)
        procs.append(proc)

        def count(method: str, key: str) -> int:
            lines = record.read_text().splitlines() if record.exists() else []
            return sum(line.split()[:2] == ["REQ", method] and line.split()[2].split("?")[0] == f"/{bucket}/{key}"
                       for line in lines)

        return Storage(StorageSettings("minio", bucket, url, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=2)), count

    yield start
    for proc in procs:
        with_group(proc, 15)
        proc.wait(10)


def put_without_checksum(s3_server, bucket, key, data):
    """As a client that sends no checksum writes it (the store then keeps none)."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                                 request_checksum_calculation="when_required"))
    client.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize("etags,kind", [("kms", "no-checksum"), ("kms", "crc32"), ("md5", "multipart")])
def test_object_whose_etag_is_no_md5_is_downloaded_once(proxied, s3, s3_server, bucket, tmp_path, etags, kind):
    data = bytes(range(256)) * 4096 * (6 if kind == "multipart" else 1)  # 1 MB, or 6 MB in two parts
    if kind == "no-checksum":  # SSE-KMS: S3's ETag is no MD5, and no checksum to verify against: size only
        put_without_checksum(s3_server, bucket, "obj", data)
    elif kind == "crc32":  # SSE-KMS, but the store keeps a CRC32: verified with it
        s3.put_object(Bucket=bucket, Key="obj", Body=data, ChecksumAlgorithm="CRC32")
    else:  # a multipart ETag ('<md5 of the part MD5s>-2'): size only
        upload = s3.create_multipart_upload(Bucket=bucket, Key="obj")["UploadId"]
        parts = [s3.upload_part(Bucket=bucket, Key="obj", UploadId=upload, PartNumber=n, Body=chunk)["ETag"]
                 for n, chunk in ((1, data[: 5 << 20]), (2, data[5 << 20:]))]
        s3.complete_multipart_upload(Bucket=bucket, Key="obj", UploadId=upload, MultipartUpload={
            "Parts": [{"ETag": etag, "PartNumber": n} for n, etag in enumerate(parts, 1)]})
    storage, count = proxied(etags)
    storage.download(storage.locate("obj"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert count("GET", "obj") == 1


def test_download_not_matching_the_stores_checksum_is_transient(storage, s3, tmp_path):
    s3.put_object(Bucket=storage.bucket, Key="obj", Body=b"payload", ChecksumAlgorithm="SHA256")
    info = storage.head(storage.locate("obj"))
    assert info.digest[0] == "sha256"
    wrong = ObjectInfo(info.size, info.etag, ("sha256", "AAAA" + info.digest[1][4:]))
    with pytest.raises(TransientError, match="is corrupt: sha256 .* != AAAA"):
        storage.download(storage.locate("obj"), tmp_path / "out", wrong)
    assert not (tmp_path / "out").exists()


def test_listed_encrypted_object_is_downloaded_once(proxied, s3_server, bucket, tmp_path):
    put_without_checksum(s3_server, bucket, "ds/a.jpg", b"x" * 5000)
    storage, count = proxied("kms")
    ((loc, info),) = storage.list(storage.locate("ds/"))  # a listing says nothing of encryption
    storage.download(loc, tmp_path / "a.jpg", info)  # so the mismatch is checked with the object's HEAD
    assert count("GET", "ds/a.jpg") == 1 and count("HEAD", "ds/a.jpg") == 1


def test_upload_to_an_encrypting_store_is_sent_once(proxied, tmp_path):
    (tmp_path / "best.pt").write_bytes(b"w" * 70_000)
    storage, count = proxied("kms")
    storage.upload(tmp_path / "best.pt", storage.locate("checkpoints/job-1/best.pt"))
    assert count("PUT", "checkpoints/job-1/best.pt") == 1
    assert count("HEAD", "checkpoints/job-1/best.pt") == 1  # the answer's ETag is no MD5: the size is asked


def test_upload_is_verified_by_the_stores_answer_and_a_wrong_one_is_sent_again(proxied, s3, bucket, tmp_path):
    """A PutObject's ETag is the MD5 of what the store keeps: compared with the file's, no HEAD is
    needed. A store whose MD5-looking ETags are not MD5s gets the file a second time, then is known."""
    data = os.urandom(70_000)
    (tmp_path / "best.pt").write_bytes(data)
    storage, count = proxied("md5")
    storage.upload(tmp_path / "best.pt", storage.locate("c/best.pt"))
    assert (count("PUT", "c/best.pt"), count("HEAD", "c/best.pt")) == (1, 0)
    storage.copy(storage.locate("c/best.pt"), storage.locate("c/copy.pt"))  # its ETag is known: no HEAD either
    assert (count("HEAD", "c/best.pt"), count("HEAD", "c/copy.pt")) == (0, 0)
    assert s3.get_object(Bucket=bucket, Key="c/copy.pt")["Body"].read() == data
    opaque, count = proxied("opaque")
    opaque.upload(tmp_path / "best.pt", opaque.locate("c/other.pt"))
    opaque.upload(tmp_path / "best.pt", opaque.locate("c/third.pt"))
    assert (count("PUT", "c/other.pt"), count("PUT", "c/third.pt")) == (2, 1)
    assert s3.get_object(Bucket=bucket, Key="c/third.pt")["Body"].read() == data


def test_store_whose_etags_only_look_like_md5s_costs_one_extra_download_once(proxied, s3_server, bucket, tmp_path):
    for key in ("a", "b"):
        put_without_checksum(s3_server, bucket, key, key.encode() * 3000)
    storage, count = proxied("opaque")  # no header says so: only a second identical download tells
    storage.download(storage.locate("a"), tmp_path / "a")
    storage.download(storage.locate("b"), tmp_path / "b")
    assert (count("GET", "a"), count("GET", "b")) == (2, 1)
    assert (tmp_path / "b").read_bytes() == b"b" * 3000


@pytest.fixture
def skewed_s3():
    """An S3 stand-in for a node whose clock is an hour slow: every request is refused with S3's
    RequestTimeTooSkewed (403), and the Date header carries the server's time, an hour ahead."""
    import threading
    import time
    from email.utils import formatdate
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>RequestTimeTooSkewed</Code><Message>The '
            b"difference between the request time and the current time is too large.</Message></Error>")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def date_time_string(self, timestamp=None):
            return formatdate(time.time() + 3600, usegmt=True)

        def _refuse(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = _refuse

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_clock_skew_is_transient_and_names_the_node_clock(skewed_s3):
    storage = Storage(StorageSettings("minio", "b", skewed_s3, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=1))
    with pytest.raises(TransientError, match="RequestTimeTooSkewed: this node's clock is 60 minutes behind"):
        storage.read_bytes(storage.locate("x.jpg"))  # a GET: the error code says it
    with pytest.raises(TransientError, match="403: this node's clock is 60 minutes behind the storage server's"):
        storage.head(storage.locate("x.jpg"))  # a HEAD has no error body: the server's Date says it


def test_local_storage_keeps_the_same_layout(tmp_path):
    storage = Storage(StorageSettings("local", "vision-platform", local_dir=tmp_path / "store"))
    (tmp_path / "f.pt").write_bytes(b"data")
    uri = storage.upload(tmp_path / "f.pt", storage.locate("checkpoints/job-1/best.pt"))
    assert (tmp_path / "store" / "vision-platform" / "checkpoints" / "job-1" / "best.pt").read_bytes() == b"data"
    assert uri.startswith("file://")
    assert storage.head(storage.locate("checkpoints/job-1/best.pt")).size == 4
    assert [loc.key for loc, _ in storage.list(storage.locate("checkpoints/"))] == ["checkpoints/job-1/best.pt"]
    with pytest.raises(StorageNotFound):
        storage.download(storage.locate("nope"), tmp_path / "n")


def test_a_stop_at_a_transfers_safe_point_ends_it_as_a_stop_not_a_storage_failure(s3_server, bucket, tmp_path):
    """SIGTERM only sets a flag; transfers check it in boto3's progress callback. The stop must come out
    as itself (exit 143), not wrapped as a retryable network error or a transient storage failure."""
    from utils import Cancelled

    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * (9 * 1024 * 1024))  # several chunks, so the callback runs mid-transfer
    plain = Storage(StorageSettings("minio", bucket, s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1"))
    plain.upload(src, plain.locate("big.bin"))
    calls = []

    def stop_requested() -> None:
        calls.append(1)
        raise Cancelled("received SIGTERM")

    storage = Storage(StorageSettings("minio", bucket, s3_server, ACCESS_KEY, SECRET_KEY, "us-east-1"),
                      interrupt=stop_requested)
    with pytest.raises(Cancelled):
        storage.download(storage.locate("big.bin"), tmp_path / "out" / "big.bin")
    with pytest.raises(Cancelled):
        storage.upload(src, storage.locate("again.bin"))
    assert calls and not list((tmp_path / "out").glob("*"))  # no partial file left behind


def test_server_side_copy_is_one_request_of_the_version_looked_up(proxied, s3, bucket):
    """A checkpoint's best.pt copy: one CopyObject (conditional on the source's ETag), not boto3's
    managed copy (HEAD, then a multipart copy: seven requests for 25 MB)."""
    storage, count = proxied("md5")
    data = os.urandom(9 * 1024 * 1024)  # over boto3's 8 MB multipart threshold
    s3.put_object(Bucket=bucket, Key="c/last.pt", Body=data)
    storage.copy(storage.locate("c/last.pt"), storage.locate("c/best.pt"))
    assert s3.get_object(Bucket=bucket, Key="c/best.pt")["Body"].read() == data
    assert count("PUT", "c/best.pt") == 1 and count("POST", "c/best.pt") == 0


def test_copy_asks_for_the_version_it_looked_up(storage, s3, bucket):
    """The copy is conditional on the source's ETag (`x-amz-copy-source-if-match`): S3, MinIO and R2
    refuse it (412, transient) if the source was replaced after its HEAD. moto does not enforce the
    condition, so the test reads the header from the request boto3 sends."""
    s3.put_object(Bucket=bucket, Key="c/src.pt", Body=b"old" * 100)
    sent = []
    storage._s3.meta.events.register("before-send.s3.CopyObject", lambda request, **kw: sent.append(request.headers))
    storage.copy(storage.locate("c/src.pt"), storage.locate("c/dst.pt"))
    etag = s3.head_object(Bucket=bucket, Key="c/src.pt")["ETag"]
    assert len(sent) == 1 and sent[0]["x-amz-copy-source-if-match"] in (etag, etag.encode())


def test_zip_from_a_store_whose_etags_only_look_like_md5s_is_downloaded_twice_not_three_times(
        storage, s3, bucket, tmp_path, monkeypatch, caplog):
    """The overlapped download's mismatch hands its digest to the plain download that follows, which
    then recognises the store at its first attempt. (The store's ETag is taken for an MD5 it is not:
    the digest the job expects is made wrong on purpose.)"""
    import dataclasses
    import io
    import logging
    import zipfile

    import zipstream
    from archives import extract_archive

    monkeypatch.setattr(zipstream, "TAIL_BYTES", 16 * 1024)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(40):
            zf.writestr(f"images/{i}.jpg", os.urandom(25_000))
    s3.put_object(Bucket=bucket, Key="d.zip", Body=buffer.getvalue())
    loc = storage.locate("d.zip")
    info = dataclasses.replace(storage.head(loc), digest=("md5", "0" * 32))
    calls = []

    def extract(landed):
        calls.append(landed)
        extract_archive(tmp_path / "d.zip", tmp_path / f"out-{len(calls)}", landed=landed)
        if landed is not None:
            landed.wait()

    with caplog.at_level(logging.INFO, logger="trainer"):
        zipstream.extract_while_downloading(storage, loc, info, tmp_path / "d.zip", extract)
    assert "does not match: md5" in caplog.text and "downloading it whole" in caplog.text
    assert "this store's ETags are not MD5s" in caplog.text
    assert "downloading again" not in caplog.text  # the plain download's first attempt was accepted
    assert len(list((tmp_path / f"out-{len(calls)}" / "images").iterdir())) == 40
