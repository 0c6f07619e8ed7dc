"""Extracting a zip dataset while it downloads, instead of after.

Owns: fetching the archive's central directory first (a zip lists its entries at its end), then
the whole object in parts (boto3's managed download, each part written at its offset into a file
laid out at full size), and handing each entry to extraction as soon as its bytes have landed.
The download and the extraction overlap: on a dataset of many small files the extraction (file
creation) takes about as long as the download, so this nearly halves the fetch.

The archive is still verified whole (size, and checksum where the store gives one) before the
extracted folder is put in place. Anything unexpected on this path falls back to the plain one,
whose result or error is the definitive one: a zip whose end cannot be parsed, or a failed or
mismatched download, is downloaded again whole, then extracted; an extraction that failed on an
archive downloaded and verified is run again on it. Only a stop (Cancelled) is raised as it is,
and a refusal on the zip's directory alone (archives.DirectoryRefused: an entry's name or kind, the
entry count, the declared size) once a second read of the directory gives the same bytes: the
download is stopped then, so a refused archive of any size costs about its directory's reads.
Imports: utils, storage, archives.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from storage import Location, ObjectInfo, Storage
from archives import DirectoryRefused, NotEnoughDisk
from utils import Cancelled, TransientError, human_size

LOGGER = logging.getLogger("trainer")

T = TypeVar("T")

TAIL_BYTES = 1 << 20  # first read of the archive's end: the central directory of about 12,000 entries


class Landed:
    """The byte ranges of a file written so far (by boto3's writer thread), and what waits on them."""

    def __init__(self, size: int = 0):
        self.size = size  # of the whole file, once landed
        self._ranges: list[list[int]] = []  # disjoint [start, end), sorted
        self._cond = threading.Condition()
        self._version = 0
        self.done = False
        self.error: BaseException | None = None

    def add(self, start: int, end: int) -> None:
        with self._cond:
            kept = []
            for r in self._ranges:
                if r[1] < start or r[0] > end:
                    kept.append(r)
                else:  # overlapping or touching: merge (a retried part writes its bytes again)
                    start, end = min(start, r[0]), max(end, r[1])
            kept.append([start, end])
            self._ranges = sorted(kept)
            self._version += 1
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.done, self.error = True, error
            self._cond.notify_all()

    def wait(self) -> None:
        """Until the download has ended; raises its error if it failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.done)
        if self.error is not None:
            raise self.error

    def ranges(self) -> list[tuple[int, int]]:
        with self._cond:
            return [(a, b) for a, b in self._ranges]

    def as_they_land(self, items: Sequence[T], spans: Sequence[tuple[int, int]]) -> Iterator[T]:
        """Yield each item once the byte span [start, end) it needs has landed, in the order they land;
        the rest as they are once the download has ended. Raises the download's error if it failed."""
        order = sorted(range(len(items)), key=lambda i: spans[i][0])
        starts = [spans[i][0] for i in order]
        waiting = set(range(len(order)))  # positions in `order` not yielded yet
        cursor: dict[int, int] = {}  # a landed range's start -> the next position to look at in it
        seen = -1
        while waiting:
            with self._cond:
                self._cond.wait_for(lambda last=seen: self._version != last or self.done, timeout=1.0)
                seen, done, error, ranges = self._version, self.done, self.error, [tuple(r) for r in self._ranges]
            if error is not None:
                raise error
            ready = []
            for start, end in ranges:
                i = cursor.get(start, bisect.bisect_left(starts, start))
                while i < len(order) and spans[order[i]][1] <= end:
                    if i in waiting:
                        waiting.discard(i)
                        ready.append(order[i])
                    i += 1
                cursor[start] = i
            if done and not ready:  # spans past the file's end: their reads will tell
                ready, waiting = [order[i] for i in sorted(waiting)], set()
            for j in ready:
                yield items[j]


class Abandoned(Exception):
    """Raised into boto3's download by LandingFile.write once the archive is refused."""


class LandingFile:
    """What boto3's download writes through: an unbuffered file (the bytes are in the page cache,
    visible to the extraction's mapping, the moment write returns) that records each range."""

    def __init__(self, raw, landed: Landed):
        self._raw, self._landed, self._pos = raw, landed, 0
        self.written = Landed()  # what the download itself wrote (the file is laid out at full size)
        self.abandon = threading.Event()  # set: the next write ends the download (Abandoned)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        if self.abandon.is_set():
            raise Abandoned("the archive was refused; its download is stopped")
        view, start = memoryview(data), self._pos
        while view:
            view = view[self._raw.write(view):]
        self._pos = start + len(data)
        self.written.add(start, self._pos)
        self._landed.add(start, self._pos)
        return len(data)


def central_directory_start(tail: bytes, tail_start: int) -> int | None:
    """Where the central directory begins, from the archive's last bytes (which hold the end record,
    and for ZIP64 its locator); None if they hold no readable end record."""
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    size = struct.unpack_from("<I", tail, at + 12)[0]
    start = tail_start + at - size  # the directory ends where the end record begins (prepended data too)
    locator = at - 20
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # ZIP64: its own end record says
        record = struct.unpack_from("<Q", tail, locator + 8)[0] - tail_start
        if record < 0 or tail[record:record + 4] != b"PK\x06\x06":
            return None
        start = tail_start + record - struct.unpack_from("<Q", tail, record + 40)[0]
    elif size == 0xFFFFFFFF:
        return None
    return start if start >= 0 else None


def extract_while_downloading(storage: Storage, loc: Location, info: ObjectInfo, archive: Path,
                              extract: Callable[[Landed | None], None]) -> None:
    """Download the zip `loc` to `archive` and run `extract` on it as its bytes land; fall back to
    downloading it whole and then extracting (logged) when anything on the way goes wrong.

    `extract(landed)` must extract `archive` into its final place only once `landed.done` without
    error: it is handed the Landed of this download, or None on the plain path.
    """
    landed = Landed(info.size)
    try:
        _overlapped(storage, loc, info, archive, extract, landed)
        return
    except (Cancelled, NotEnoughDisk):  # a stop; a disk too small for the plain path as well
        raise
    except DirectoryRefused as e:  # its directory, read twice the same, refuses it: the rest is not downloaded
        LOGGER.info("%s is refused on its directory; the rest of it was not downloaded (%s landed of %s)",
                    loc.name, human_size(sum(end - start for start, end in landed.ranges())), human_size(info.size))
        raise e from None
    except Exception as e:
        downloaded = landed.done and landed.error is None  # whole and verified: only the extraction failed
        LOGGER.warning("extracting %s while it downloads failed (%s); %s", loc.name, f"{type(e).__name__}: {e}"[:300],
                       "extracting the downloaded archive" if downloaded else "downloading it whole, then extracting")
    if not downloaded:
        archive.unlink(missing_ok=True)
        # a digest that did not match is handed on: a store whose ETags only look like MD5s is then
        # recognised after one more download, not two
        storage.download(loc, archive, info, previous=getattr(landed.error, "got", None))
    extract(None)


def _overlapped(storage: Storage, loc: Location, info: ObjectInfo, archive: Path,
                extract: Callable[[Landed | None], None], landed: Landed) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    LOGGER.info("downloading %s (%s), extracting it as it lands", storage.uri(loc), human_size(info.size))
    with open(archive, "w+b", buffering=0) as raw:
        raw.truncate(info.size)
        tail_start = max(0, info.size - TAIL_BYTES)
        tail = storage.read_range(loc, tail_start, info.size, info.etag)
        start = central_directory_start(tail, tail_start)
        if start is None:
            raise ValueError("no zip end record in its last bytes")
        if start < tail_start:  # a directory larger than the first read
            tail = storage.read_range(loc, start, tail_start, info.etag) + tail
            tail_start = start
        view = memoryview(tail)
        while view:
            view = view[os.pwrite(raw.fileno(), view, tail_start + len(tail) - len(view)):]
        landed.add(tail_start, info.size)

        target = LandingFile(raw, landed)

        def download() -> None:
            try:
                storage.download_into(loc, info, target, archive)
                if target.written.ranges() != [(0, info.size)]:  # the file was laid out at full size
                    raise TransientError(f"download of {storage.uri(loc)} is incomplete: it wrote "
                                         f"{target.written.ranges()[:3]} of {info.size} bytes")
                landed.finish()
            except BaseException as e:  # handed to the extraction, which raises it
                landed.finish(e)

        worker = threading.Thread(target=download, name="zip-download", daemon=True)
        worker.start()
        try:
            extract(landed)
        except DirectoryRefused:
            target.abandon.set()  # the rest of the archive is of no use: the download stops at its next write
            worker.join()
            if storage.read_range(loc, tail_start, info.size, info.etag) != tail:  # definitive if read the same twice
                raise TransientError(f"the directory of {storage.uri(loc)} read differently twice") from None
            raise
        finally:
            worker.join()
    if landed.error is not None:
        raise landed.error
