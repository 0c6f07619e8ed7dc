"""Safe extraction of dataset archives (zip, tar, tar.gz, tgz), treating every entry as hostile.

Owns: the checks made on every entry before anything is written (paths that would land outside
the folder, names a file system refuses, a name that is both a file and a folder, unreadable or
encrypted zip entries, the size and entry caps and the free disk space), skipping links and
special files, and counting the bytes really written against the cap (a zip bomb stops at it).
Environment: none directly (DATASET_MAX_BYTES and DATASET_MAX_FILES arrive as arguments).
Imports: utils.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

from utils import BadInput, TransientError, human_size

LOGGER = logging.getLogger("trainer")

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def extract_archive(archive: Path, dest: Path, max_bytes: int = 10**14, max_files: int = 10**8,
                    landed=None) -> Path:
    """Extract a zip or tar archive into dest, treating every entry as hostile.

    Every entry is checked before anything is written: a path that would land outside dest
    ('..', absolute, a drive letter, backslash tricks) refuses the archive; so does a name the
    file system cannot hold (a part over 255 bytes), a name used both as a file and as a folder,
    and a zip entry that cannot be read (encrypted, or compressed with a method such as Deflate64
    that Python lacks). The entry count (files and folders) and the declared uncompressed total
    must be within the caps (DATASET_MAX_FILES, DATASET_MAX_BYTES) and fit on the disk. Links,
    devices and other special entries are skipped with a warning. While writing, the real byte
    count is enforced too, so an archive whose headers understate its size (a zip bomb) stops at
    the cap; an entry that still fails to be written is a bad-input error naming it.

    `landed` (a zipstream.Landed) is for a zip still downloading: each entry is written once its
    bytes have landed; the central directory must be there already.
    """
    import gzip
    import lzma

    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with _open_zip(archive, unbuffered=landed is not None) as zf:
                infos = zf.infolist()
                try:  # on the directory alone: a zip still downloading is refused before its entries land
                    if len(infos) > max_files:
                        raise BadInput(f"{archive.name} holds {len(infos)} entries (files and folders), more than "
                                       f"DATASET_MAX_FILES={max_files}")
                    entries = [(info, info.filename, safe_target(root, info.filename), _zip_kind(info))
                               for info in infos]
                    _check_entries(archive, root, entries)
                    _check_caps(archive, dest, [i.file_size for i, _, _, kind in entries if kind == "file"],
                                max_bytes, reserve=landed.size if landed else 0)  # the archive lands beside it
                except BadInput as e:
                    raise DirectoryRefused(str(e)) from None
                budget = _Budget(archive, max_bytes)
                files = []
                for info, name, target, kind in entries:
                    if kind == "file":
                        files.append((info, name, target))
                    elif kind == "dir":
                        with _writing(archive, name):
                            target.mkdir(parents=True, exist_ok=True)
                    else:
                        LOGGER.warning("skipping %s in %s: a %s", name, archive.name, kind)
                _extract_zip_files(zf, archive, files, budget, landed)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _tar_members(tf, archive, max_files)  # every header, before anything is written
                entries = [(m, m.name, safe_target(root, m.name), _tar_kind(m)) for m in members]
                _check_entries(archive, root, entries)
                _check_caps(archive, dest, [m.size for m, _, _, kind in entries if kind == "file"], max_bytes)
                budget = _Budget(archive, max_bytes)
                for member, name, target, kind in entries:
                    with _writing(archive, name):
                        if kind == "dir":
                            target.mkdir(parents=True, exist_ok=True)
                        elif kind == "file":
                            with tf.extractfile(member) as src:
                                budget.copy(src, target)
                        else:
                            LOGGER.warning("skipping %s in %s: a %s", name, archive.name, kind)
        else:
            raise BadInput(f"{archive.name} is not a zip or tar archive")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            gzip.BadGzipFile, lzma.LZMAError) as e:
        raise BadInput(f"{archive.name} is corrupt or truncated: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    return dest


@contextlib.contextmanager
def _open_zip(archive: Path, unbuffered: bool):
    """A ZipFile; unbuffered for an archive still downloading, so that no read-ahead keeps the bytes
    a region held before they landed."""
    if not unbuffered:
        with zipfile.ZipFile(archive) as zf:
            yield zf
        return
    with open(archive, "rb", buffering=0) as raw, zipfile.ZipFile(raw) as zf:
        yield zf


EXTRACT_THREADS = min(4, os.cpu_count() or 1)  # zip entries written at once: inflating and writing release the GIL

DIRECT_MAX = 64 * 1024 * 1024  # entries up to this size are inflated in one call from the mapped archive


def _extract_zip_files(zf: zipfile.ZipFile, archive: Path, files: list, budget: _Budget, landed=None) -> None:
    """Write the zip's files from EXTRACT_THREADS threads (a dataset is thousands of small files: one
    thread waits on each file's creation in turn), each as soon as its bytes have landed when the
    zip is still downloading. The first failure stops the rest and is raised.

    Stored and deflated entries up to DIRECT_MAX are read straight from the archive mapped in memory
    and inflated in one call, their CRC checked (`_inflate`): a quarter less CPU than zipfile's
    streamed reader, whose per-entry objects and 1 MB reads cost more than inflating a 40 KB image.
    Larger entries, and the other methods, go through one ZipFile, which reads under its own lock.
    """
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    def extract(item) -> None:
        info, name, target = item
        with _writing(archive, name):
            if view is not None and info.compress_type in _DIRECT and info.file_size <= DIRECT_MAX:
                budget.write(_inflate(view, info), target)
            else:
                with zf.open(info) as src:
                    budget.copy(src, target)

    items = files
    if landed is not None:
        span = _entry_spans([i.header_offset for i in zf.infolist()], getattr(zf, "start_dir", None))
        items = landed.as_they_land(files, [span(info.header_offset) for info, _, _ in files])
    with open(archive, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(archive) else None
    view = memoryview(mapped) if mapped is not None else None
    pool = ThreadPoolExecutor(EXTRACT_THREADS, thread_name_prefix="extract")
    failed = threading.Event()
    try:
        futures = []
        for item in items:
            if failed.is_set():
                break
            futures.append(pool.submit(extract, item))
            futures[-1].add_done_callback(lambda f: f.cancelled() or f.exception() is None or failed.set())
        for future in futures:
            future.result()
    except BaseException:
        budget.stop()  # entries being written end at their next chunk; queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a slice still held by a traceback: closed when freed
                view.release()
                mapped.close()


def _entry_spans(offsets: list[int], directory: int | None):
    """For each zip entry, by where it starts: the bytes it may use, up to the next entry's start (the
    central directory's for the last one)."""
    import bisect

    starts = sorted(set(offsets) | ({directory} if directory is not None else set()))

    def span(offset: int) -> tuple[int, int]:
        i = bisect.bisect_right(starts, offset)
        return offset, starts[i] if i < len(starts) else (directory or offset)

    return span


_DIRECT = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


def _inflate(view: memoryview, info: zipfile.ZipInfo) -> bytes:
    """An entry's content, read from the mapped archive at its local header and checked: its CRC, and
    no more bytes than its header declares (a zip bomb's understated size stops there).

    Raises zipfile.BadZipFile or zlib.error for a damaged or truncated archive.
    """
    import struct

    offset = info.header_offset
    header = view[offset:offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {_short(info.filename)}")
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    start = offset + 30 + name_length + extra_length
    raw = view[start:start + info.compress_size]
    if len(raw) < info.compress_size:
        raise zipfile.BadZipFile(f"{_short(info.filename)} is truncated")
    if info.compress_type == zipfile.ZIP_STORED:
        data = raw
    else:
        inflater = zlib.decompressobj(-15)
        data = inflater.decompress(raw, info.file_size + 1)
        if len(data) > info.file_size:
            raise zipfile.BadZipFile(f"{_short(info.filename)} holds more than its header declares")
        if not inflater.eof:
            raise zipfile.BadZipFile(f"{_short(info.filename)} is truncated or damaged")
    if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 or size for {_short(info.filename)}")
    return data


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """file, dir, link or special file; many tools write no Unix file type at all (plain files)."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "link"
    if info.is_dir():
        return "dir"
    if kind not in (0, stat.S_IFREG):
        return "special file"
    return "file"


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.isfile():
        return "file"
    return "link" if member.issym() or member.islnk() else "special file"


def _tar_members(tf: tarfile.TarFile, archive: Path, max_files: int) -> list[tarfile.TarInfo]:
    """Every header of a tar, stopping as soon as there are more than max_files (each costs memory)."""
    members = []
    for member in tf:
        members.append(member)
        if len(members) > max_files:
            raise BadInput(f"{archive.name} holds more than DATASET_MAX_FILES={max_files} entries (files and folders)")
    return members


# Compression methods Python's zipfile reads; others (Deflate64, which Windows Explorer writes for
# large files, Implode, PPMd...) would fail mid-extraction.
ZIP_READABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


ZIP_METHOD_NAMES = {6: "Implode", 9: "Deflate64", 10: "PKWARE Implode", 93: "Zstandard", 95: "XZ", 96: "JPEG",
                    97: "WavPack", 98: "PPMd", 99: "AES encryption"}


NAME_MAX = 255  # bytes in one path part, on every common Linux file system


PATH_MAX = 4096


class _Stopped(Exception):
    """An entry ended because another one failed (that failure is the one raised)."""


def _check_entries(archive: Path, root: Path, entries: list[tuple[Any, str, Path, str]]) -> None:
    """Refuse, before anything is written, an archive with an entry that could not be extracted."""
    files: dict[Path, str] = {}
    folders: set[Path] = set()
    for info, name, target, kind in entries:
        if kind not in ("file", "dir"):
            continue  # skipped: never written
        problem = _name_problem(target)
        if not problem and kind == "file" and isinstance(info, zipfile.ZipInfo):
            problem = _zip_problem(info)
        if problem:
            raise BadInput(f"{archive.name}: entry {_short(name)} {problem}")
        if kind == "file":
            files.setdefault(target, name)
        _add_folders(folders, root, target if kind == "dir" else target.parent)
    clash = next((target for target in files if target in folders), None)
    if clash is not None:
        raise BadInput(f"{archive.name}: entry {_short(files[clash])} is a file, but other entries use it as a folder")


def _add_folders(folders: set[Path], root: Path, folder: Path) -> None:
    """Add folder and its parents up to root; a folder already there has its parents there too."""
    while folder != root and root in folder.parents and folder not in folders:
        folders.add(folder)
        folder = folder.parent


def _name_problem(target: Path) -> str | None:
    longest = max((len(os.fsencode(part)) for part in target.parts), default=0)
    if longest > NAME_MAX:
        return f"has a name part of {longest} bytes; file systems allow {NAME_MAX}"
    if len(os.fsencode(str(target))) >= PATH_MAX:
        return f"has a path longer than {PATH_MAX} bytes once extracted"
    return None


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return "is encrypted: the trainer cannot decrypt it (re-create the archive without a password)"
    if info.compress_type not in ZIP_READABLE:
        method = ZIP_METHOD_NAMES.get(info.compress_type, f"number {info.compress_type}")
        return (f"is compressed with {method}, which cannot be read (re-create the archive with standard "
                "Deflate, e.g. `zip -r` or 7-Zip's Deflate method)")
    return None


def _short(name: str, limit: int = 80) -> str:
    """An entry name for a message: quoted, and cut short if very long."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


@contextlib.contextmanager
def _writing(archive: Path, name: str):
    """An entry that fails to be written despite the checks: bad input naming it, unless the disk is full."""
    import errno
    import gzip

    try:
        yield
    except gzip.BadGzipFile:
        raise  # the archive itself is corrupt: the caller says so
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransientError(f"the disk filled up while extracting {archive.name} ({e.strerror})") from None
        raise BadInput(f"{archive.name}: entry {_short(name)} cannot be extracted: {e.strerror or e}") from None
    except (NotImplementedError, RuntimeError) as e:  # zipfile: an unsupported method, encryption
        raise BadInput(f"{archive.name}: entry {_short(name)} cannot be extracted: {e}") from None


def _check_caps(archive: Path, dest: Path, sizes: list[int], max_bytes: int, reserve: int = 0) -> None:
    """The declared total within DATASET_MAX_BYTES, and on the disk with `reserve` bytes more (an
    archive still downloading beside the extraction)."""
    total = sum(sizes)
    if total > max_bytes:
        raise BadInput(f"{archive.name} expands to {human_size(total)}, more than DATASET_MAX_BYTES={max_bytes}")
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if total + reserve > free:
        also = f" (and the archive itself, {human_size(reserve)}, is still downloading)" if reserve else ""
        raise NotEnoughDisk(f"{archive.name} expands to {human_size(total)}{also} but only {human_size(free)} "
                            f"is free in {dest.parent}")


class DirectoryRefused(BadInput):
    """A zip refused on its central directory alone (an entry's name or kind, the entry count, the
    declared size), before any entry's bytes were read: for a zip still downloading, the rest of it
    is of no use (zipstream stops the download)."""


class NotEnoughDisk(TransientError):
    """The dataset does not fit on the disk (another node, or a larger volume, may do)."""


class _Budget:
    """Counts the bytes really written while extracting, against DATASET_MAX_BYTES (from several
    threads: the count is shared)."""

    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.left = archive, max_bytes
        self._made: set[Path] = set()  # folders made so far: one mkdir per folder, not per file
        self._lock = threading.Lock()
        self._stopped = False

    def stop(self) -> None:
        """Another entry failed: end the others at their next chunk."""
        self._stopped = True

    def _folder(self, target: Path) -> None:
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)

    def _take(self, size: int) -> None:
        with self._lock:
            self.left -= size
            over = self.left < 0
        if over:
            raise BadInput(f"{self.archive.name} expands beyond DATASET_MAX_BYTES (its headers understate its size)")
        if self._stopped:
            raise _Stopped()

    def write(self, data, target: Path) -> None:
        """Write a whole entry held in memory."""
        self._take(len(data))
        self._folder(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def copy(self, src, target: Path) -> None:
        self._folder(target)
        with open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                self._take(len(chunk))
                out.write(chunk)


def safe_target(root: Path, name: str) -> Path:
    """Where an archive entry would land; refuses any that would land outside root.

    Decided on the names alone (no file system calls, which were a third of the checks' time on
    datasets of many small files): `root` is a resolved folder the trainer has just created, and
    links in archives are never written, so no link inside it can redirect an entry.
    """
    name = name.replace("\\", "/")  # Windows tools write backslashes; they must not hide a '..'
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise BadInput(f"archive entry {name!r} has an absolute path")
    base = str(root)
    target = os.path.normpath(os.path.join(base, name))
    if target != base and not target.startswith(base.rstrip(os.sep) + os.sep):
        raise BadInput(f"archive entry {name!r} points outside the dataset folder")
    return Path(target)
