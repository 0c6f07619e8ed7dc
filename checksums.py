"""How a transfer is verified: the digests S3-compatible stores keep, computed as they write them.

Owns: choosing what an object's transfer is checked against (a full-object checksum the store
keeps, else the ETag where it is the content's MD5, else nothing but the size), and computing
those digests over bytes as they go by or over a file.
Imports: nothing of the trainer's.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Full-object checksums S3 keeps (base64) that Python computes without extra packages, best first.
# CRC32C and CRC64NVME would need awscrt; a composite (per-part) checksum ends in -<parts>.
_CHECKSUM_FIELDS = (("ChecksumSHA256", "sha256"), ("ChecksumSHA1", "sha1"), ("ChecksumCRC32", "crc32"))


def object_digest(meta: Mapping[str, Any], etag: str) -> tuple[str, str] | None:
    """What a transfer of this object is verified against: a full-object checksum the store keeps,
    else the ETag if it is the content's MD5, else None (size only)."""
    if meta.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        for field, algorithm in _CHECKSUM_FIELDS:
            value = meta.get(field)
            if value and "-" not in value:
                return algorithm, value
    if str(meta.get("ServerSideEncryption", "")).startswith("aws:kms") or meta.get("SSECustomerAlgorithm"):
        return None  # S3's ETag of a KMS or customer-key encrypted object is not the content's MD5
    return etag_digest(etag)


def etag_digest(etag: str) -> tuple[str, str] | None:
    """("md5", etag) where the ETag can be an MD5 (32 hex digits; a multipart ETag has a '-')."""
    return ("md5", etag) if re.fullmatch(r"[0-9a-f]{32}", etag or "") else None


class Digest:
    """A digest computed as bytes go by, written as S3 writes it: hex for md5 (the ETag), base64
    for the checksums (sha256, sha1, crc32)."""

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self._crc, self._hash = 0, None if algorithm == "crc32" else hashlib.new(algorithm, usedforsecurity=False)

    def update(self, chunk: bytes) -> None:
        if self._hash is None:
            self._crc = zlib.crc32(chunk, self._crc)
        else:
            self._hash.update(chunk)

    def value(self) -> str:
        import base64

        if self.algorithm == "md5":
            return self._hash.hexdigest()
        raw = self._crc.to_bytes(4, "big") if self._hash is None else self._hash.digest()
        return base64.b64encode(raw).decode()


def file_digest(path: Path, algorithm: str) -> str:
    """A file's digest as S3 writes it (see Digest)."""
    digest = Digest(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.value()
