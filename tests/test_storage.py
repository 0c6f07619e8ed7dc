"""Storage against a real S3-compatible HTTP server (moto), through the real boto3 client."""

from __future__ import annotations

import pytest

from tests.conftest import ACCESS_KEY, SECRET_KEY, free_port
from utils import BadInput, Location, Storage, StorageNotFound, StorageSettings, TransientError


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
