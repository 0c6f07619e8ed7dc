"""The dataset check made before training, and what a dataset's labels say its task is.

Owns: one report of every problem (the first ten with file and line, then a count, in bounded
memory): data.yaml's names and nc, splits with images, every label line's value count, class and
coordinates for the task, every image readable and at least 10x10; and the task a dataset's
shape implies (class folders, kpt_shape, a vote over label files).
Environment (through Settings): DATASET_CHECK.
Imports: utils, config, datasets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Iterator

from config import Settings
from datasets import classification_splits, image_files, images_of
from utils import BadInput

LOGGER = logging.getLogger("trainer")

@dataclasses.dataclass(frozen=True)
class DatasetShape:
    """What a prepared dataset's layout and labels say about its task."""

    fits: frozenset[str]  # every task its labels are valid for; empty: nothing to tell
    task: str | None  # what the dataset alone suggests, used only when nothing explicit decides
    why: str

    @property
    def ambiguous(self) -> bool:
        return len(self.fits) > 1


def dataset_task(data: Path) -> DatasetShape:
    """The tasks a prepared dataset fits: a classification folder, kpt_shape, or a vote over its
    train label files.

    A label line of 9 values is both an oriented box and a 4-point polygon, so a dataset whose
    labels all have 9 values fits obb and segment alike. Its vote then goes by shape: an oriented
    box is a rotated rectangle, a parallelogram once normalised; a 4-point polygon drawn with a
    polygon tool usually is not. Any longer polygon makes the dataset a segmentation dataset.
    """
    import collections

    import yaml

    if data.is_dir():
        return DatasetShape(frozenset({"classify"}), "classify", "class folders without a data.yaml")
    cfg = yaml.safe_load(data.read_text(encoding="utf-8"))
    if cfg.get("kpt_shape"):
        return DatasetShape(frozenset({"pose"}), "pose", "data.yaml has kpt_shape")
    votes = collections.Counter(_label_file_shape(label_path(image)) for image in images_of(cfg.get("train")))
    votes.pop(None, None)
    quads = votes["rectangles"] + votes["quadrilaterals"]
    if votes["polygons"]:
        return DatasetShape(frozenset({"segment"}), "segment", "its labels are polygons")
    if quads:
        task = "segment" if votes["quadrilaterals"] > votes["rectangles"] else "obb"
        return DatasetShape(frozenset({"obb", "segment"}), task,
                            f"its labels have 9 values, which fit both oriented boxes and 4-point polygons; "
                            f"{votes['rectangles']} of {quads} label files hold only rotated rectangles")
    if votes["boxes"]:
        return DatasetShape(frozenset({"detect"}), "detect", "its labels are boxes (5 values)")
    return DatasetShape(frozenset(), None, "no labels to tell")


def _label_file_shape(label: Path) -> str | None:
    """One label file's vote: boxes, polygons, rectangles (9 values, all parallelograms),
    quadrilaterals (9 values, some not parallelograms), or None (no file, no labels, not text)."""
    counts: set[int] = set()
    skewed = False
    try:
        for _, line in label_lines(label) if label.is_file() else ():
            values = line.split() if line else []
            counts.add(len(values))
            if len(values) == 9 and not skewed:
                skewed = not _is_parallelogram(values[1:])
    except UnicodeDecodeError:
        return None
    if any(n >= 7 and n % 2 and n != 9 for n in counts):
        return "polygons"
    if 9 in counts:
        return "quadrilaterals" if skewed else "rectangles"
    return "boxes" if 5 in counts else None


def _is_parallelogram(coords: list[str], tolerance: float = 0.01) -> bool:
    """Whether 4 corners (x1 y1 ... x4 y4, in order) form a parallelogram: the diagonals share a midpoint."""
    try:
        x1, y1, x2, y2, x3, y3, x4, y4 = (float(v) for v in coords)
    except ValueError:
        return True  # not numbers: the dataset check says so; no vote either way
    return abs(x1 + x3 - x2 - x4) <= tolerance and abs(y1 + y3 - y2 - y4) <= tolerance


class DatasetReport:
    """Problems found in a dataset: the first SHOWN with file and line, then a count.

    Only the shown ones are kept: one broken label file of millions of lines must not hold
    millions of messages in memory.
    """

    SHOWN = 10

    def __init__(self):
        self.problems: list[str] = []  # the first SHOWN problems
        self.count = 0  # every problem found

    def add(self, where: str, what: str) -> None:
        self.count += 1
        if len(self.problems) < self.SHOWN:
            self.problems.append(f"{where}: {what}")

    def __bool__(self) -> bool:
        return self.count > 0

    def text(self) -> str:
        more = self.count - len(self.problems)
        return (f"dataset check found {self.count} problem(s):\n  - " + "\n  - ".join(self.problems)
                + (f"\n  - ... and {more} more" if more else ""))


def check_dataset(data: Path, task: str | None) -> DatasetReport:
    """Check a prepared dataset (a resolved data.yaml, or a classification folder) before training."""
    report = DatasetReport()
    if data.suffix in (".yaml", ".yml"):
        _check_yaml_dataset(data, task, report)
    else:
        _check_classification_dataset(data, report)
    return report


def _check_yaml_dataset(data_yaml: Path, task: str | None, report: DatasetReport) -> None:
    import yaml

    cfg = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    names, nc = cfg.get("names"), cfg.get("nc")
    if isinstance(names, dict):
        keys = sorted(names, key=str)
        if sorted(int(k) if str(k).isdigit() else -1 for k in keys) != list(range(len(keys))):
            report.add("data.yaml", f"names keys must be 0..{len(keys) - 1}, got {keys[:5]}")
    elif names is not None and not isinstance(names, list):
        report.add("data.yaml", "names must be a list or a mapping of class ids to names")
    if nc is not None and (not isinstance(nc, int) or nc < 1):
        report.add("data.yaml", f"nc must be a positive integer, got {nc!r}")
    elif nc is not None and names is not None and isinstance(names, (list, dict)) and nc != len(names):
        report.add("data.yaml", f"nc is {nc} but names lists {len(names)} classes")
    classes = len(names) if isinstance(names, (list, dict)) else (nc if isinstance(nc, int) else 0)
    kpt = cfg.get("kpt_shape")
    if task == "pose" and not (isinstance(kpt, list) and len(kpt) == 2 and kpt[1] in (2, 3) and kpt[0] >= 1):
        report.add("data.yaml", f"a pose dataset needs kpt_shape: [keypoints, 2 or 3], got {kpt!r}")
        kpt = None
    if classes == 0 and isinstance(names, (list, dict)):
        report.add("data.yaml", "names lists no classes")
    images_checked = []
    for split in ("train", "val"):
        images = images_of(cfg.get(split))
        if not images:
            report.add(f"data.yaml {split}", f"no images found in {cfg.get(split)}")
        objects = 0
        for image in images:
            label = label_path(image)
            if label.is_file():
                objects += _check_label_file(label, task, classes, kpt, report)
        if split == "train" and images and not objects:  # unlabelled images are background; only those: nothing to learn
            report.add("data.yaml train", f"none of its {len(images)} images has a label "
                       "(labels/<image name>.txt with one object per line)")
        images_checked.extend(images)
    _check_images(images_checked, report)


def label_path(image: Path) -> Path:
    """Ultralytics' convention: the last /images/ becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


# A label line longer than this is refused unread (a polygon of 20,000 points is about 400 KB).
MAX_LABEL_LINE = 1 << 20


def label_lines(label: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of a label file, read line by line so memory stays flat whatever its
    size; the text is None for a line longer than MAX_LABEL_LINE characters, which is skipped.

    Raises:
        UnicodeDecodeError: the file is not UTF-8 text.
    """
    with label.open(encoding="utf-8", newline=None) as f:
        number = 0
        while line := f.readline(MAX_LABEL_LINE + 1):
            number += 1
            if len(line) > MAX_LABEL_LINE and not line.endswith("\n"):
                while (rest := f.readline(1 << 16)) and not rest.endswith("\n"):
                    pass  # skip to the end of the overlong line, a chunk at a time
                yield number, None
            else:
                yield number, line


def _check_label_file(label: Path, task: str | None, classes: int, kpt: list | None, report: DatasetReport) -> int:
    """Check one label file; returns how many objects (non-empty lines) it holds."""
    where = "/".join(label.parts[-3:])
    objects = 0
    try:
        for number, line in label_lines(label):
            if line is None:
                report.add(f"{where} line {number}", f"is longer than {MAX_LABEL_LINE} characters")
            elif line.strip():
                objects += 1
                problem = _label_problem(line.split(), task, classes, kpt)
                if problem:
                    report.add(f"{where} line {number}", problem)
    except UnicodeDecodeError:
        report.add(where, "is not a text file")
    return objects


def _label_problem(values: list[str], task: str | None, classes: int, kpt: list | None) -> str | None:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return "has a value that is not a number"
    n = len(numbers)
    if task == "obb" and n != 9:
        return f"has {n} values; an oriented box is: class x1 y1 x2 y2 x3 y3 x4 y4"
    if task == "pose" and kpt and n != 5 + kpt[0] * kpt[1]:
        return f"has {n} values; a pose label is: class x y w h and {kpt[0]} keypoints of {kpt[1]} values"
    if task == "segment" and (n < 7 or n % 2 == 0):
        return f"has {n} values; a segment label is: class and at least 3 x y points"
    if task in (None, "detect") and n != 5 and (n < 7 or n % 2 == 0):
        return f"has {n} values; a box label is: class x_center y_center width height"
    cls = numbers[0]
    if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls < max(classes, 1):
        return f"class {values[0]} is out of range (the dataset has {classes} classes: 0..{classes - 1})"
    coords = numbers[1:]
    if task == "pose" and kpt and kpt[1] == 3:  # every third keypoint value is a visibility flag
        coords = numbers[1:5] + [v for i, v in enumerate(numbers[5:]) if i % 3 != 2]
    bad = next((v for v in coords if not (math.isfinite(v) and 0.0 <= v <= 1.0)), None)
    if bad is not None:
        return f"coordinate {bad:g} is outside [0, 1] (labels are normalised to the image size)"
    return None


def _check_images(images: list[Path], report: DatasetReport) -> None:
    """Every image opens and is at least 10x10 pixels (what Ultralytics requires)."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(path: Path) -> str | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
                width, height = im.size
        except Exception as e:
            return f"cannot be read as an image ({type(e).__name__})"
        return "is smaller than 10x10 pixels" if min(width, height) < 10 else None

    with ThreadPoolExecutor(8) as pool:
        for path, found in zip(images, pool.map(problem, images)):
            if found:
                report.add("/".join(path.parts[-3:]), found)


def _check_classification_dataset(root: Path, report: DatasetReport) -> None:
    splits = classification_splits(root)
    if "train" not in splits:
        report.add(str(root.name), "a classification dataset needs a train/ folder of class folders")
        return
    if "val" not in splits and "test" not in splits:
        report.add(str(root.name), "a classification dataset needs a val/ (or validation/, valid/, test/) folder "
                                   "of class folders")
    train_classes = {p.name for p in splits["train"].iterdir() if p.is_dir()}
    if not train_classes:
        report.add("train/", "has no class folders")
    images = []
    for split, folder in splits.items():
        count = len(images)
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            found = image_files(cls)
            if not found and split == "train":
                report.add(f"{folder.name}/{cls.name}/", "has no images")
            if split != "train" and cls.name not in train_classes:
                report.add(f"{folder.name}/{cls.name}/", "is a class that train/ does not have")
            images.extend(found)
        if split != "train" and len(images) == count:  # Ultralytics would validate on it (val/ before test/)
            report.add(f"{folder.name}/", "has no class folders holding images")
    _check_images(images, report)


def check_dataset_or_fail(data: Path, task: str, settings: Settings) -> None:
    """DATASET_CHECK=strict: any problem fails the job with one report; warn: report and go on."""
    if settings.dataset_check == "off":
        return
    started = time.monotonic()
    report = check_dataset(data, task)
    LOGGER.info("dataset check done in %.1f s", time.monotonic() - started)
    if report and settings.dataset_check == "strict":
        raise BadInput(report.text())
    if report:
        LOGGER.warning("%s", report.text())  # (on the backend's logs route too: backend.LogForwarder)
