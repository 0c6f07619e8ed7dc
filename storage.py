"""One storage client for the job's bucket: MinIO, Cloudflare R2 or AWS S3 through boto3, or
a local folder with the same layout.

Owns: addressing (`s3://bucket/key` or a key in STORAGE_BUCKET), verified transfers (a download
lands as a .part file renamed only once its size and checksum match; uploads are checked by the
store's answer or a HEAD), listings across pages; storage errors become bad input (missing,
refused, an untrusted certificate) or transient failures (everything else) in storage_errors.
Environment (through config.StorageSettings): STORAGE_TYPE, STORAGE_BUCKET, MINIO_*, R2_*,
LOCAL_STORAGE_DIR, STORAGE_MAX_ATTEMPTS, STORAGE_TIMEOUT, STORAGE_CHECKSUM, TLS_CA_BUNDLE,
TLS_VERIFY, PROGRESS_INTERVAL; AWS_* for STORAGE_TYPE=s3.
Imports: utils, config, progress, checksums (the digests a transfer is verified against), storage_errors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from checksums import Digest, etag_digest, file_digest, object_digest
from config import StorageSettings
from progress import TransferProgress
from storage_errors import StorageNotFound, classified
from utils import BadInput, TransientError, human_size

LOGGER = logging.getLogger("trainer")


@dataclasses.dataclass(frozen=True)
class Location:
    bucket: str
    key: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    digest: tuple[str, str] | None = None  # (algorithm, value) a transfer is verified against; None: size only
    listed: bool = False  # from a listing, which says nothing of encryption: the object's HEAD has the last word


class DigestMismatch(TransientError):
    """A transfer's bytes do not match the object's digest; `got` is the digest they have."""

    def __init__(self, message: str, got: str | None):
        super().__init__(message)
        self.got = got


class Storage:
    """One client for the job's bucket: MinIO, R2, S3 through boto3, or a local folder."""

    STREAM_BELOW = 8 * 1024 * 1024  # objects under boto3's multipart threshold: one streamed GET
    THREADS = 10  # boto3's own concurrency for one object's parts
    COPY_IN_ONE = 5 * 1024**3  # S3's limit for a server-side copy in one CopyObject request
    PUT_IN_ONE_UP_TO = 128 * 1024 * 1024  # upload(in_one=True): one request up to this size, parts above

    def __init__(self, settings: StorageSettings, interrupt: Callable[[], None] | None = None):
        self.settings = settings
        self.interrupt = interrupt  # called as transfers progress; what it raises (a stop) ends the transfer
        self.bucket = settings.bucket
        self._s3 = None if settings.type == "local" else self._client(settings)
        self._buckets_seen: set[str] = set()
        self._etags_not_md5 = False  # learnt from a store whose MD5-looking ETags are not MD5s (see _mismatch)
        self._stored: dict[Location, ObjectInfo] = {}  # what this client stored (verified) at a location

    @staticmethod
    def _client(s: StorageSettings):
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if s.type == "minio" else "auto"},
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=min(s.timeout, 10),
            read_timeout=s.timeout,
            max_pool_connections=32,  # predict.py reads images from several threads
            # boto3 >= 1.36 sends CRC checksums by default, which R2 and older MinIO reject.
            request_checksum_calculation=s.checksum,
            response_checksum_validation=s.checksum,
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=s.endpoint, aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key,
            # None keeps boto3's own default (AWS_CA_BUNDLE, else its bundled CAs)
            region_name=s.region, config=config, verify=None if s.verify is True else s.verify)

    # -- addressing -------------------------------------------------------------------------

    def locate(self, ref: str) -> Location:
        """`s3://bucket/key` or a key in the job's bucket."""
        if ref.startswith("s3://"):
            bucket, _, key = ref[5:].partition("/")
            if not bucket or not key:
                raise BadInput(f"{ref!r} is not an s3://bucket/key URI")
            return Location(bucket, key)
        key = ref.lstrip("/")
        if not key or ".." in PurePosixPath(key).parts:
            raise BadInput(f"{ref!r} is not a valid storage key")
        return Location(self.bucket, key)

    def uri(self, loc: Location) -> str:
        if self.settings.type == "local":
            return self._path(loc).as_uri()
        return f"s3://{loc.bucket}/{loc.key}"

    def _path(self, loc: Location) -> Path:
        return self.settings.local_dir / loc.bucket / loc.key

    # -- operations ---------------------------------------------------------------------------

    def head(self, loc: Location) -> ObjectInfo | None:
        """Size and ETag of an object, None if it does not exist."""
        if self._s3 is None:
            path = self._path(loc)
            if not path.is_file():
                return None
            st = path.stat()
            return ObjectInfo(st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")
        try:
            with self._errors("look up", loc):
                # ChecksumMode: the full-object checksum the store keeps, if it keeps one
                meta = self._s3.head_object(Bucket=loc.bucket, Key=loc.key, ChecksumMode="ENABLED")
        except StorageNotFound:
            self._check_bucket(loc)  # a HEAD cannot tell a missing object from a missing bucket
            return None
        etag = meta.get("ETag", "").strip('"')
        return ObjectInfo(meta["ContentLength"], etag, object_digest(meta, etag))

    def check_bucket(self, bucket: str | None = None) -> None:
        """The bucket exists and these credentials may use it (`--check`): BadInput if not, TransientError
        if storage cannot be reached. A local store's bucket is a folder: StorageNotFound if it is missing."""
        loc = Location(bucket or self.bucket, "")
        if self._s3 is None:
            if not self._path(loc).is_dir():
                raise StorageNotFound(f"{self._path(loc)} does not exist")
            return
        self._buckets_seen.discard(loc.bucket)
        self._check_bucket(loc)

    def _check_bucket(self, loc: Location) -> None:
        if loc.bucket in self._buckets_seen:
            return
        try:
            with self._errors("look up", Location(loc.bucket, "")):
                self._s3.head_bucket(Bucket=loc.bucket)
        except StorageNotFound:
            raise BadInput(f"bucket {loc.bucket} does not exist (check STORAGE_BUCKET and the URIs)") from None
        self._buckets_seen.add(loc.bucket)

    def download(self, loc: Location, dest: Path, info: ObjectInfo | None = None, quiet: bool = False,
                 previous: str | None = None) -> Path:
        """Download to dest atomically: a .part file, renamed once its size and digest are verified.

        The digest is the store's full-object checksum (SHA-256, SHA-1, CRC32) where it keeps one,
        else the ETag where that is the content's MD5 (a plain single-part ETag of an object without
        KMS or customer-key encryption), else there is none and the size check stands alone: an
        object whose ETag cannot be an MD5 is transferred once. A mismatch downloads again, a
        second one fails as transient. See _mismatch for a store whose ETags only look like MD5s.
        """
        info = info or self.head(loc)
        if info is None:
            raise StorageNotFound(f"{self.uri(loc)} does not exist")
        part = dest.with_name(dest.name + f".part-{os.getpid()}-{threading.get_ident()}")
        if any(len(os.fsencode(p)) > 255 for p in part.parts):  # (the file system's limit, the .part name's too)
            raise BadInput(f"{self.uri(loc)}: its name is too long for a local file ({dest.name[:40]}...)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        log = LOGGER.debug if quiet else LOGGER.info
        log("downloading %s (%s) to %s", self.uri(loc), human_size(info.size), dest)
        start = time.monotonic()  # previous: the digest an earlier transfer of it gave (see _mismatch)
        try:
            for attempt in (1, 2):
                streamed = None  # the digest computed while the bytes came in, if they came in order
                if self._s3 is None:
                    shutil.copyfile(self._path(loc), part)
                elif info.size < self.STREAM_BELOW:
                    streamed = self._get_streamed(loc, part, info.digest[0] if info.digest else None)
                else:
                    with self._errors("download", loc):
                        self._s3.download_file(loc.bucket, loc.key, str(part), Config=self._parts(info.size),
                                               Callback=self._progress("downloading", loc, info.size))
                got = part.stat().st_size
                if got != info.size:
                    raise TransientError(f"download of {self.uri(loc)} is incomplete: {got} of {info.size} bytes")
                problem, previous = self._mismatch(part, info, previous, streamed)
                if problem and info.listed:  # a listing's ETag may be an encrypted object's: ask the object
                    info = self.head(loc) or info
                    problem, previous = self._mismatch(part, info, None)
                if not problem:
                    break
                if attempt == 2:
                    raise TransientError(f"download of {self.uri(loc)} is corrupt: {problem}")
                fresh = self.head(loc)
                if fresh is not None and fresh.etag != info.etag:  # replaced meanwhile (a checkpoint each epoch):
                    LOGGER.info("%s was replaced while it downloaded; downloading the new one", self.uri(loc))
                    info, previous = fresh, None  # the new object's digest; no verdict on this store's ETags
                    continue
                LOGGER.warning("download of %s does not match (%s); downloading again", self.uri(loc), problem)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        log("downloaded %s in %.1f s", dest.name, time.monotonic() - start)
        return dest

    @classmethod
    def _parts(cls, size: int, in_one: bool = False):
        """boto3's transfer settings for an object of `size` bytes: about one part per thread, parts of
        8 to 64 MB (boto3's fixed 8 MB parts make a 300 MB archive 38 requests, each with its own
        latency; s5cmd uses 50 MB parts), or with `in_one` one request up to PUT_IN_ONE_UP_TO.
        Measured in docs/performance.md."""
        from boto3.s3.transfer import TransferConfig

        if in_one and size <= cls.PUT_IN_ONE_UP_TO:
            return TransferConfig(multipart_threshold=cls.PUT_IN_ONE_UP_TO + 1, max_concurrency=1)
        mb = 1024 * 1024
        part = min(64 * mb, max(cls.STREAM_BELOW, -(-size // cls.THREADS // mb) * mb))
        return TransferConfig(multipart_threshold=cls.STREAM_BELOW, multipart_chunksize=part,
                              max_concurrency=cls.THREADS)

    def read_range(self, loc: Location, start: int, end: int, etag: str) -> bytes:
        """Bytes [start, end) of the object whose ETag is `etag` (a changed object fails, as transient).
        A store that answers with other bytes (a gateway that ignores Range) is a TransientError,
        found before its body is read."""
        with self._errors("download", loc):
            response = self._s3.get_object(Bucket=loc.bucket, Key=loc.key, Range=f"bytes={start}-{end - 1}",
                                           IfMatch=f'"{etag}"')
            if response.get("ContentLength") != end - start:
                response["Body"].close()
                raise TransientError(f"{self.uri(loc)}: asked for {end - start} bytes at {start}, the store "
                                     f"answers {response.get('ContentLength')}")
            data = response["Body"].read()
        if len(data) != end - start:
            raise TransientError(f"{self.uri(loc)}: a range of {end - start} bytes came {len(data)} bytes long")
        return data

    def download_into(self, loc: Location, info: ObjectInfo, file, path: Path) -> None:
        """Download the object whose ETag is info.etag into `file`, an open seekable file that is `path`,
        in parts written at their offsets (what they are written through sees each one land; the
        caller checks they cover the object); then verify path's digest as `download` does.
        Raises DigestMismatch if it does not match."""
        from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager
        from s3transfer.subscribers import BaseSubscriber

        class Known(BaseSubscriber):  # the HEAD's answers: no second HEAD, and every part asks If-Match it
            def on_queued(self, future, **kwargs) -> None:
                future.meta.provide_transfer_size(info.size)
                future.meta.provide_object_etag(f'"{info.etag}"')

        progress = ProgressCallbackInvoker(self._progress("downloading", loc, info.size))
        with self._errors("download", loc), create_transfer_manager(self._s3, self._parts(info.size)) as manager:
            manager.download(loc.bucket, loc.key, file, subscribers=[Known(), progress]).result()
        problem, got = self._mismatch(path, info, None)
        if problem:
            raise DigestMismatch(f"download of {self.uri(loc)} does not match: {problem}", got)

    def _get_streamed(self, loc: Location, part: Path, algorithm: str | None) -> str | None:
        """One GET streamed to disk, hashed on the way: for small objects, half the requests of boto3's
        managed download (which asks for the size first) and no second pass over the file."""
        digest = Digest(algorithm) if algorithm else None
        with self._errors("download", loc):
            response = self._s3.get_object(Bucket=loc.bucket, Key=loc.key)
            progress = self._progress("downloading", loc, response.get("ContentLength") or 0)
            with part.open("wb") as f:
                for chunk in response["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
                    if digest:
                        digest.update(chunk)
                    progress(len(chunk))
        return digest.value() if digest else None

    def _progress(self, action: str, loc: Location, size: int, stoppable: bool = True) -> Callable[[int], None]:
        """boto3's transfer callback: progress for people (progress.py, every PROGRESS_INTERVAL
        seconds of a long transfer), and a safe point to stop at (what `interrupt` raises, a stop,
        ends the transfer) where the transfer is `stoppable`."""
        progress = TransferProgress(f"{action} {loc.name}", size, self.settings.progress_interval)

        def callback(transferred: int) -> None:
            progress(transferred)
            if self.interrupt and stoppable:
                self.interrupt()

        return callback

    def _mismatch(self, path: Path, info: ObjectInfo, previous: str | None,
                  computed: str | None = None) -> tuple[str | None, str | None]:
        """(why path is not the object's content or None, the MD5 computed for the next call);
        `computed` is the digest of info's algorithm already taken while downloading.

        Some gateways give ETags that look like MD5s but are not, and say nothing of it: when two
        transfers give the same bytes and the same mismatch, the ETag is no MD5, the size check
        stands alone, and the store is remembered as such for the rest of the process.
        """
        if info.digest is None or (info.digest[0] == "md5" and self._etags_not_md5):
            return None, None
        algorithm, expected = info.digest
        got = computed or file_digest(path, algorithm)
        if got == expected:
            return None, None
        if algorithm == "md5" and got == previous:
            self._etags_not_md5 = True
            LOGGER.warning("two transfers gave the same bytes and the same mismatch: this store's ETags are not "
                           "MD5s of the content; verifying sizes only from now on")
            return None, None
        return f"{algorithm} {got} != {expected}", got

    def fetch(self, loc: Location, dest: Path) -> Path:
        """Download unless dest already holds this exact object (same ETag), e.g. after a restart."""
        info = self.head(loc)
        if info is None:
            raise StorageNotFound(f"{self.uri(loc)} does not exist")
        stamp = dest.with_name(dest.name + ".etag")
        if dest.is_file() and stamp.is_file() and stamp.read_text() == info.etag and dest.stat().st_size == info.size:
            LOGGER.info("using cached %s for %s", dest, self.uri(loc))
            return dest
        self.download(loc, dest, info)
        stamp.write_text(info.etag)
        return dest

    def upload(self, path: Path, loc: Location, in_one: bool = False, stoppable: bool = True) -> str:
        """Upload a file and verify what the store holds (size, and MD5 where the ETag is one).

        Readers see the old object or the whole new one, never a part: S3 replaces objects
        atomically, and the local store writes a temporary file and renames it. A file under 8 MB
        goes in one PutObject, and so does one up to PUT_IN_ONE_UP_TO with `in_one` (for uploads in
        the background whose duration matters less, the per-epoch checkpoints: half the store's CPU
        of the parts for a 52 MB file, docs/performance.md); the store's answer (its ETag, the
        content's MD5) is verified against the file, with no HEAD. Such a request logs no progress,
        and a stop (`interrupt`) is looked at before it starts, not during it. Larger files go up in
        parts side by side, verified by a HEAD (the final upload waits for them). A stop does not end
        an upload that is not `stoppable` (the last finished epoch's checkpoint: the job's stop waits
        for it, within SHUTDOWN_TIMEOUT).
        """
        size = path.stat().st_size
        LOGGER.info("uploading %s (%s) to %s", path.name, human_size(size), self.uri(loc))
        if self._s3 is None:
            return self._write_local(loc, lambda part: shutil.copyfile(path, part))
        in_one = size < self.STREAM_BELOW or (in_one and size <= self.PUT_IN_ONE_UP_TO)
        previous = None
        self._stored.pop(loc, None)  # known again once this upload is verified
        for attempt in (1, 2):
            if in_one:
                stored = self._put_file(path, loc, size, stoppable)
                if stored.digest is None or (stored.digest[0] == "md5" and self._etags_not_md5):
                    stored = self.head(loc)  # the answer cannot vouch for the content (SSE-KMS): the size
            else:
                with self._errors("upload", loc):
                    self._s3.upload_file(str(path), loc.bucket, loc.key, Config=self._parts(size),
                                         Callback=self._progress("uploading", loc, size, stoppable))
                stored = self.head(loc)
            if stored is None or stored.size != size:
                problem = f"upload of {path.name} to {self.uri(loc)} is incomplete"
            else:
                mismatch, previous = self._mismatch(path, stored, previous)
                if not mismatch:
                    self._stored[loc] = stored
                    return self.uri(loc)
                problem = f"upload of {path.name} to {self.uri(loc)} does not match ({mismatch})"
            if attempt == 2:
                raise TransientError(problem)
            LOGGER.warning("%s; uploading again", problem)
        return self.uri(loc)

    def _put_file(self, path: Path, loc: Location, size: int, stoppable: bool = True) -> ObjectInfo:
        """One PutObject of a file; the store's answer names what it stored (its ETag, a checksum it
        keeps), which the caller verifies against the file."""
        if self.interrupt and stoppable:  # a safe point to stop at, as a transfer's progress is
            self.interrupt()
        with self._errors("upload", loc), path.open("rb") as body:
            answer = self._s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=body)
        etag = answer.get("ETag", "").strip('"')
        return ObjectInfo(size, etag, object_digest(answer, etag))

    def copy(self, source: Location, dest: Location) -> str:
        """A server-side copy of an object (no bytes through this machine), verified by size.

        S3, MinIO and R2 copy within the store: one CopyObject request, conditional on the source's
        ETag, up to 5 GB (boto3's managed copy would make a 25 MB checkpoint seven requests: a HEAD
        and a multipart copy), parts side by side above; the local store copies the file and
        renames it into place. A source this client has just uploaded needs no HEAD (its ETag is
        known), and a copy whose answer gives the source's MD5 ETag needs none either: the same
        content (one request per epoch for best.pt, instead of three).
        """
        LOGGER.info("copying %s to %s in storage", self.uri(source), self.uri(dest))
        if self._s3 is None:
            return self._write_local(dest, lambda part: shutil.copyfile(self._path(source), part))
        original = self._stored.get(source) or self.head(source)
        if original is None:
            raise StorageNotFound(f"{self.uri(source)} does not exist")
        copied = None
        try:
            with self._errors("copy", dest):
                if original.size < self.COPY_IN_ONE:  # one request, of the version just looked up (or stored)
                    answer = self._s3.copy_object(Bucket=dest.bucket, Key=dest.key, CopySourceIfMatch=f'"{original.etag}"',
                                                  CopySource={"Bucket": source.bucket, "Key": source.key})
                    copied = answer.get("CopyObjectResult", {}).get("ETag", "").strip('"')
                else:  # CopyObject's limit: parts copied side by side
                    self._s3.copy({"Bucket": source.bucket, "Key": source.key}, dest.bucket, dest.key,
                                  Config=self._parts(original.size))
        except Exception:
            self._stored.pop(source, None)  # replaced by someone else, perhaps: look it up next time
            raise
        if copied and copied == original.etag and etag_digest(copied) and not self._etags_not_md5:
            return self.uri(dest)
        stored = self.head(dest)
        if stored is None or stored.size != original.size:
            raise TransientError(f"copy of {self.uri(source)} to {self.uri(dest)} is incomplete")
        return self.uri(dest)

    def read_bytes(self, loc: Location) -> bytes:
        """A small object's content, in memory (images for predict.py)."""
        if self._s3 is None:
            try:
                return self._path(loc).read_bytes()
            except FileNotFoundError:
                raise StorageNotFound(f"{self.uri(loc)} does not exist") from None
        with self._errors("read", loc):
            return self._s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()

    def put_bytes(self, data: bytes, loc: Location, content_type: str = "application/octet-stream") -> str:
        """Store a small object from memory (annotated images)."""
        if self._s3 is None:
            return self._write_local(loc, lambda part: part.write_bytes(data))
        self._stored.pop(loc, None)
        with self._errors("upload", loc):
            self._s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType=content_type)
        return self.uri(loc)

    def delete(self, loc: Location) -> None:
        """Remove an object (one that does not exist is no error, as in S3)."""
        self._stored.pop(loc, None)
        if self._s3 is None:
            self._path(loc).unlink(missing_ok=True)
            return
        with self._errors("delete", loc):
            self._s3.delete_object(Bucket=loc.bucket, Key=loc.key)

    def _write_local(self, loc: Location, write: Callable[[Path], Any]) -> str:
        """Local store: write a temporary file, then rename it over the object (atomic for readers)."""
        dest = self._path(loc)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + f".part-{os.getpid()}-{threading.get_ident()}")
        write(part)
        os.replace(part, dest)
        return self.uri(loc)

    def list(self, prefix: Location) -> Iterator[tuple[Location, ObjectInfo]]:
        """Every object under a prefix, across as many listing pages as it takes.

        Folder markers (keys ending in '/', which consoles' "create folder" writes) are not
        objects to download: they are left out.
        """
        if self._s3 is None:
            root = self._path(Location(prefix.bucket, ""))
            base = self._path(prefix)
            folder = base if prefix.key.endswith("/") or base.is_dir() else base.parent
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                rel = path.relative_to(root).as_posix()
                if path.is_file() and rel.startswith(prefix.key) and ".part-" not in path.name:
                    yield Location(prefix.bucket, rel), ObjectInfo(path.stat().st_size, "")
            return
        paginator = self._s3.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        if obj.get("Size"):
                            LOGGER.warning("skipping %s: a folder marker with content", obj["Key"])
                        continue
                    etag = obj.get("ETag", "").strip('"')
                    yield Location(prefix.bucket, obj["Key"]), ObjectInfo(obj["Size"], etag, etag_digest(etag), True)

    def _errors(self, action: str, loc: Location):
        """boto3's errors as BadInput (missing, refused) or TransientError (everything else)."""
        return classified(action, self.uri(loc), self.settings.endpoint)


def fetch_file(storage: Storage, ref: str, work_dir: Path) -> Path:
    """A file given as a local path, an s3:// URI or a storage key: a local file as it is, else
    the storage object, downloaded once into WORK_DIR/weights/files (cached by ETag).

    Raises:
        StorageNotFound: neither a local file nor a storage object.
    """
    local = Path(ref).expanduser()
    if not ref.startswith("s3://") and local.is_file():
        return local.resolve()
    loc = storage.locate(ref)
    return storage.fetch(loc, work_dir / "weights" / "files" / loc.bucket / loc.key)
