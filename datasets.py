"""A job's dataset, from storage to what Ultralytics' `data` takes.

Owns: fetching (an archive, an unpacked prefix, or a local archive or folder) into the shared
dataset cache, finding data.yaml (or a classification folder), rewriting data.yaml and .txt lists
with absolute paths inside the dataset, and the deterministic validation split made when a dataset
has none.
Environment (through Settings): DATASET_ID, DATASET_URI, DATASET_MAX_BYTES, DATASET_MAX_FILES,
VAL_FRACTION, WORK_DIR.
Imports: utils, config, storage, archives, cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cache
from archives import archive_kind, extract_archive, safe_target
from config import Settings, job_dir
from storage import Location, Storage, StorageNotFound
from utils import BadInput, human_size
from zipstream import Landed, extract_while_downloading

LOGGER = logging.getLogger("trainer")

# Ultralytics' own (ultralytics.data.utils.IMG_FORMATS; a test keeps them equal): an image this program
# counts is one Ultralytics trains on, and none of those is left out.
IMAGE_SUFFIXES = {".avif", ".bmp", ".dng", ".heic", ".heif", ".jp2", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff",
                  ".webp"}
# Where Ultralytics looks for a classification dataset's validation split, in its order (check_cls_dataset).
CLASSIFICATION_VAL_NAMES = ("val", "validation", "valid")


def is_image_name(relative: str | Path) -> bool:
    """An image as Ultralytics lists a folder's: an image suffix, and no hidden part in the path
    below the folder (its glob skips those: macOS' `._name.jpg` resource forks, `.thumbnails/`)."""
    parts = Path(relative).parts
    return bool(parts) and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES and not any(
        part.startswith(".") for part in parts)


def image_files(folder: Path) -> list[Path]:
    """Every image under folder, recursively, sorted (hidden files and folders left out, see is_image_name)."""
    return sorted(p for p in folder.rglob("*") if is_image_name(p.relative_to(folder)))


def classification_splits(root: Path) -> dict[str, Path]:
    """A classification folder's splits as Ultralytics finds them: train/, the first of val/,
    validation/ and valid/ (as "val"), and test/."""
    val = next((root / name for name in CLASSIFICATION_VAL_NAMES if (root / name).is_dir()), None)
    splits = {"train": root / "train", "val": val, "test": root / "test"}
    return {split: folder for split, folder in splits.items() if folder is not None and folder.is_dir()}


def find_dataset_root(folder: Path) -> Path:
    """The folder holding data.yaml (or train/ for classification): folder itself or its one top folder."""
    candidates = [folder]
    children = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir():
        candidates.append(children[0])
    for c in candidates:
        if any((c / n).is_file() for n in ("data.yaml", "data.yml")):
            return c
    for c in candidates:
        if (c / "train").is_dir():
            return c
    raise BadInput("the dataset has no data.yaml (at its root or in its one top folder) "
                   "and no train/ folder for classification")


def resolve_data_yaml(root: Path, out: Path, val_fraction: float = 0.1) -> tuple[Path, dict]:
    """Rewrite root's data.yaml with absolute paths into out, so Ultralytics never looks elsewhere.

    Split entries may be folders, .txt lists of images or lists of either; paths may be
    relative to `path`, to the list file, or absolute paths written on another machine (mapped
    into the dataset by their longest existing tail). Lists are rewritten next to out with
    absolute paths. Without a val entry, a deterministic share of the train images becomes the
    validation split (see split_off_validation). Returns the written file and its content.
    """
    import yaml

    src = next(root / n for n in ("data.yaml", "data.yml") if (root / n).is_file())
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"{src.name} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{src.name} must be a mapping with train, val and names")
    if not data.get("val") and data.get("validation"):
        data["val"] = data.pop("validation")  # some exporters write 'validation'
    if not data.get("train"):
        raise BadInput(f"{src.name} has no train entry")
    if data.get("names") is None and data.get("nc") is None:
        raise BadInput(f"{src.name} has neither names nor nc")
    base = _dataset_base(root, data.get("path"))
    out.parent.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test", "minival"):
        if not data.get(split):
            continue
        try:
            data[split] = _rebase(base, root, data[split], split, out.parent)
        except BadInput as e:
            if split in ("train", "val"):
                raise
            # Ultralytics checks val only; exporters (Roboflow) write a test line for a split they left out
            LOGGER.warning("%s; training without a %s split", e, split)
            del data[split]
    if not data.get("val"):
        data["train"], data["val"] = split_off_validation(data["train"], root, out.parent, val_fraction)
    data["path"] = str(base)
    data.pop("download", None)  # never let Ultralytics fetch anything
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out, data


def _dataset_base(root: Path, path: Any) -> Path:
    """data.yaml's `path`, resolved against the extracted folder whatever machine wrote it."""
    if not path or not isinstance(path, str):
        return root
    p = Path(path)
    if not p.is_absolute():
        candidate = (root / p).resolve()
        return candidate if candidate.is_dir() and (candidate == root or root in candidate.parents) else root
    return root  # an absolute path from the exporting machine means nothing here


def _locate(root: Path, value: str, *bases: Path) -> Path | None:
    """A path from data.yaml or a list file, found inside the dataset, or None.

    Relative paths are tried against each base in turn; absolute ones (POSIX or Windows, from the
    exporting machine) by their longest tail that exists in the dataset. Nothing outside root.
    """
    if re.match(r"^([A-Za-z]:)?[\\/]", value):
        parts = [p for p in re.split(r"[\\/]+", value) if p and not re.fullmatch(r"[A-Za-z]:", p)]
        tails = (root.joinpath(*parts[i:]) for i in range(len(parts)) if ".." not in parts[i:])
        return next((t for t in tails if t.exists()), None)
    value = value.replace("\\", "/")
    for base in bases:
        target = (base / value).resolve()
        if (target == root or root in target.parents) and target.exists():
            return target
    return None


def _rebase(base: Path, root: Path, value: Any, split: str, lists: Path) -> Any:
    if isinstance(value, list):
        rebased = [_rebase(base, root, v, f"{split}[{i}]", lists) for i, v in enumerate(value)]
        return rebased
    if not isinstance(value, str):
        raise BadInput(f"data.yaml {split} must be a path or a list of paths")
    # Ultralytics retries '../x' as 'x' below path; so do we.
    target = _locate(root, value, base) or (_locate(root, value[3:], base) if value.startswith("../") else None)
    if target is None:
        tried = [value, value[3:]] if value.startswith("../") else [value]
        outside = not re.match(r"^([A-Za-z]:)?[\\/]", value) and all(
            root not in (base / v).resolve().parents for v in tried)
        raise BadInput(f"data.yaml {split}: {value} " + ("points outside the dataset" if outside
                                                         else "does not exist in the dataset"))
    if target.is_file() and target.suffix == ".txt":
        return str(_rewrite_list(target, base, root, lists / f"{split.replace('[', '-').rstrip(']')}.txt", split))
    return str(target)


def _rewrite_list(listed: Path, base: Path, root: Path, out: Path, split: str) -> Path:
    """A .txt list of images with every line made absolute (Ultralytics reads bare relative lines
    relative to its working directory, which would be wrong here)."""
    found, missing = [], []
    for line in listed.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            target = _locate(root, line, listed.parent, base, root)
            (found if target and target.is_file() else missing).append(str(target) if target else line)
    if missing:
        raise BadInput(f"data.yaml {split}: {listed.name} lists {len(missing)} image(s) that are not in the "
                       f"dataset, e.g. {', '.join(missing[:3])}")
    out.write_text("\n".join(found) + "\n", encoding="utf-8")
    return out


def images_of(value: Any) -> list[Path]:
    """Every image of a resolved split entry (folders searched recursively, lists read)."""
    if isinstance(value, list):
        return [img for v in value for img in images_of(v)]
    path = Path(value)
    if path.is_dir():
        return image_files(path)
    if path.suffix == ".txt" and path.is_file():
        return [Path(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return []


def _validation_share(images: list[Path], root: Path, fraction: float) -> set[Path]:
    """The same images every time: those whose SHA-1 of their path inside the dataset sorts first."""
    ranked = sorted(images, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())
    return set(ranked[: max(1, round(len(ranked) * fraction))]) if len(ranked) > 1 else set()


def split_off_validation(train: Any, root: Path, lists: Path, fraction: float) -> tuple[str, str]:
    """A dataset with only a train split: VAL_FRACTION of its images (at least one) become val.

    The choice is deterministic (by hash of each image's path inside the dataset), so a resumed
    or repeated job validates on the same images. Writes train.txt and val.txt lists.
    """
    images = images_of(train)
    val = _validation_share(images, root, fraction)
    if not val:
        raise BadInput("data.yaml has no val entry and train has too few images to split one off")
    LOGGER.info("no val split in data.yaml: %d of %d train images become the validation split", len(val), len(images))
    (lists / "train-split.txt").write_text("\n".join(str(p) for p in images if p not in val) + "\n", encoding="utf-8")
    (lists / "val-split.txt").write_text("\n".join(str(p) for p in sorted(val)) + "\n", encoding="utf-8")
    return str(lists / "train-split.txt"), str(lists / "val-split.txt")


def prepare_classification(root: Path, out: Path, fraction: float = 0.1) -> Path:
    """A classification folder as Ultralytics wants it. With train/ but no validation split (val/,
    validation/, valid/) nor test/, a deterministic share of each class's images becomes val/
    (symbolic links under out)."""
    if set(classification_splits(root)) != {"train"}:
        return root
    shutil.rmtree(out, ignore_errors=True)
    classes = {cls: image_files(cls)
               for cls in sorted(p for p in (root / "train").iterdir() if p.is_dir())}
    if not any(classes.values()):
        raise BadInput("the dataset has no data.yaml, and its train/ folder has no class folders holding images "
                       "(a classification dataset is train/<class>/<image>, with val/<class>/<image> optional)")
    moved = 0
    for cls, images in classes.items():
        val = _validation_share(images, root, fraction)
        for image in images:
            link = out / ("val" if image in val else "train") / cls.name / image.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image)
        moved += len(val)
    LOGGER.info("no val/ folder: %d train images (%.0f%% of each class) become the validation split", moved,
                100 * fraction)
    return out


def download_dataset(storage: Storage, settings: Settings) -> tuple[Path, Path]:
    """Fetch and unpack the dataset (cached by ETag); return what Ultralytics' `data` takes, and
    the dataset's root folder (where data.yaml, or train/ for classification, is).

    DATASET_URI (or datasets/{DATASET_ID}.zip) may be an archive in storage, an unpacked prefix in
    storage (ending in /), or a local archive or folder.
    """
    uri = settings.dataset_uri
    local = Path(uri).expanduser()
    if not uri.startswith("s3://") and local.exists():
        stat = local.stat()
        folder = local.resolve() if local.is_dir() else _extract_cached(local, settings, f"{stat.st_size}-{stat.st_mtime_ns}")
    elif uri.endswith("/"):
        folder = _download_prefix(storage, storage.locate(uri), settings)
    else:
        loc = storage.locate(uri)
        if not archive_kind(loc.key):
            raise BadInput(f"dataset {storage.uri(loc)} must be a .zip, .tar, .tar.gz or .tgz archive, "
                           "or a prefix ending in /")
        info = storage.head(loc)
        if info is None:
            raise StorageNotFound(f"dataset {storage.uri(loc)} does not exist")
        if info.size > settings.dataset_max_bytes:
            raise BadInput(f"dataset {storage.uri(loc)} is {info.size} bytes, more than DATASET_MAX_BYTES="
                           f"{settings.dataset_max_bytes}")
        folder = _cache_dir(settings, loc.key, info.etag)

        def fill() -> None:
            archive = cache.download_dir(settings) / (folder.name + archive_kind(loc.key))
            try:
                if archive_kind(loc.key) == ".zip" and storage.settings.type != "local" and info.size >= storage.STREAM_BELOW:
                    extract_while_downloading(storage, loc, info, archive,
                                              lambda landed: _extract_into(archive, folder, settings, landed))
                else:
                    storage.download(loc, archive, info)
                    _extract_into(archive, folder, settings)
            finally:
                archive.unlink(missing_ok=True)

        if not cache.provide(settings, folder, fill, info.size):
            LOGGER.info("dataset %s already extracted at %s", storage.uri(loc), folder)
    root = find_dataset_root(folder)
    if not any((root / n).is_file() for n in ("data.yaml", "data.yml")):
        LOGGER.info("dataset at %s is a classification folder (train/, val/)", root)
        return prepare_classification(root, job_dir(settings) / "classify", settings.val_fraction), root
    data_yaml, data = resolve_data_yaml(root, job_dir(settings) / "data.yaml", settings.val_fraction)
    LOGGER.info("dataset ready at %s: %d classes, train=%s val=%s", root, len(data.get("names") or []) or data.get("nc", 0),
                data["train"], data["val"])
    return data_yaml, root


PREFIX_THREADS = 32  # parallel GETs for a prefix dataset (the storage client keeps 32 connections)


def _download_prefix(storage: Storage, prefix: Location, settings: Settings) -> Path:
    """An unpacked dataset under a storage prefix, downloaded by PREFIX_THREADS threads, cached by its listing."""
    objects = list(storage.list(prefix))
    if not objects:
        raise StorageNotFound(f"dataset prefix {storage.uri(prefix)} holds no objects")
    total = sum(info.size for _, info in objects)
    if len(objects) > settings.dataset_max_files or total > settings.dataset_max_bytes:
        raise BadInput(f"dataset prefix {storage.uri(prefix)} holds {len(objects)} objects, {total} bytes: over "
                       f"DATASET_MAX_FILES={settings.dataset_max_files} or DATASET_MAX_BYTES={settings.dataset_max_bytes}")
    _check_prefix_names(storage.uri(prefix), [loc.key[len(prefix.key):] for loc, _ in objects])
    listing = "\n".join(f"{loc.key} {info.etag} {info.size}" for loc, info in objects)
    folder = _cache_dir(settings, prefix.key.rstrip("/") or prefix.bucket, hashlib.sha256(listing.encode()).hexdigest())

    def fill() -> None:
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        LOGGER.info("downloading %d objects (%s) under %s", len(objects), human_size(total), storage.uri(prefix))
        try:
            targets = [(loc, info, safe_target(tmp.resolve(), loc.key[len(prefix.key):])) for loc, info in objects]
            with ThreadPoolExecutor(PREFIX_THREADS) as pool:  # small objects: the network waits, not the CPU
                list(pool.map(lambda t: storage.download(t[0], t[2], t[1], quiet=True), targets))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if not cache.provide(settings, folder, fill, total):
        LOGGER.info("dataset %s already downloaded at %s", storage.uri(prefix), folder)
    return folder


def _check_prefix_names(uri: str, names: list[str]) -> None:
    """Object names that cannot all be files of one folder are bad input, found before any download:
    S3 lets `images` be an object and `images/a.jpg` another (an archive's entries are checked alike,
    archives.py)."""
    local = {name: posixpath.normpath(name.replace("\\", "/")) for name in names}  # as safe_target places them
    objects = set(local.values())
    for name, path in local.items():
        parts = path.split("/")
        if any(len(part.encode()) > 200 for part in parts):  # (the file system's 255 bytes, less a .part suffix)
            raise BadInput(f"dataset prefix {uri}: the name {name[:80]}... is too long for a local file")
        for i in range(1, len(parts)):
            if (folder := "/".join(parts[:i])) in objects:
                raise BadInput(f"dataset prefix {uri}: {folder} is an object, and also the folder of {name}")


def _cache_dir(settings: Settings, name: str, version: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[:60]
    digest = hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:16]
    return settings.work_dir / "datasets" / f"{stem}-{digest}"


def _extract_cached(archive: Path, settings: Settings, version: str) -> Path:
    folder = _cache_dir(settings, str(archive.resolve()), version)
    cache.provide(settings, folder, lambda: _extract_into(archive, folder, settings), archive.stat().st_size)
    return folder


def _extract_into(archive: Path, folder: Path, settings: Settings, landed: Landed | None = None) -> None:
    """Extract next to folder, then rename: a half-extracted dataset never looks complete. With
    `landed`, the archive is still downloading: the rename waits until it is there and verified.

    Called under the entry's fill lock (cache.provide), so no other job extracts the same folder.
    """
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        LOGGER.info("extracting %s%s", archive.name, " as it downloads" if landed else "")
        extract_archive(archive, tmp, settings.dataset_max_bytes, settings.dataset_max_files, landed)
        if landed is not None:
            landed.wait()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
