"""Generate small, learnable YOLO datasets for tests, benchmarks and the demo.

Every image shows one to three coloured shapes on a noisy grey background:
class 0 is a red rectangle, class 1 a blue ellipse. Colour alone separates the
classes, so a from-scratch model learns something within a few epochs even at
a 64-pixel image size.

    python -m tests.sample_data --task detect --out /tmp/shapes --zip /tmp/shapes.zip
"""

from __future__ import annotations

import argparse
import math
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np

TASKS = ("detect", "segment", "pose", "obb", "classify")
NAMES = ["rectangle", "ellipse"]
COLOURS = [(40, 40, 220), (220, 60, 40)]  # BGR: red rectangle, blue ellipse
KPT_COUNT = 4  # pose: four extreme points of each shape (top, right, bottom, left)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey canvas with mild noise, so the model cannot key on flat pixels."""
    img = rng.normal(128, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_shape(rng: np.random.Generator, size: int, rotate: bool) -> dict:
    """One shape: class, centre, half-sizes and angle, fully inside the image."""
    cls = int(rng.integers(0, len(NAMES)))
    hw, hh = rng.uniform(0.12, 0.25, 2) * size
    angle = float(rng.uniform(0, 180)) if rotate else 0.0
    r = math.hypot(hw, hh) if rotate else max(hw, hh)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    return {"cls": cls, "cx": cx, "cy": cy, "hw": hw, "hh": hh, "angle": angle}


def _outline(shape: dict, points: int = 16) -> np.ndarray:
    """Polygon of the shape's outline in pixels (4 corners or an ellipse)."""
    if shape["cls"] == 0:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * [shape["hw"], shape["hh"]]
    else:
        t = np.linspace(0, 2 * math.pi, points, endpoint=False)
        corners = np.stack([np.cos(t) * shape["hw"], np.sin(t) * shape["hh"]], 1)
    a = math.radians(shape["angle"])
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return corners @ rot.T + [shape["cx"], shape["cy"]]


def _draw(img: np.ndarray, shape: dict) -> None:
    poly = np.round(_outline(shape, 48)).astype(np.int32)
    cv2.fillPoly(img, [poly], COLOURS[shape["cls"]])


def _label(shape: dict, task: str, size: int) -> str:
    """One YOLO label line for the shape, coordinates normalised to [0, 1]."""
    poly = _outline(shape)
    x1, y1 = poly.min(0)
    x2, y2 = poly.max(0)
    box = [(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size]
    if task == "detect":
        values = box
    elif task == "segment":
        values = (poly / size).ravel().tolist()
    elif task == "obb":
        values = (_outline({**shape, "cls": 0}) / size).ravel().tolist()
    elif task == "pose":
        extremes = [poly[poly[:, 1].argmin()], poly[poly[:, 0].argmax()], poly[poly[:, 1].argmax()], poly[poly[:, 0].argmin()]]
        values = box + [v for p in extremes for v in (p[0] / size, p[1] / size, 2)]
    else:
        raise ValueError(task)
    return " ".join([str(shape["cls"])] + [f"{min(max(v, 0.0), 1.0):.6f}" if not isinstance(v, int) else str(v) for v in values])


def _write_split(root: Path, split: str, count: int, task: str, size: int, rng: np.random.Generator) -> None:
    if task == "classify":
        for i in range(count):
            img = _background(rng, size)
            shape = _random_shape(rng, size, rotate=False)
            _draw(img, shape)
            folder = root / split / NAMES[shape["cls"]]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}_{i:04d}.jpg"), img)
        return
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = _background(rng, size)
        shapes = [_random_shape(rng, size, rotate=task == "obb") for _ in range(int(rng.integers(1, 3)))]
        for shape in shapes:
            _draw(img, shape)
        cv2.imwrite(str(root / "images" / split / f"{split}_{i:04d}.jpg"), img)
        lines = [_label(s, task, size) for s in shapes]
        (root / "labels" / split / f"{split}_{i:04d}.txt").write_text("\n".join(lines) + "\n")


def _data_yaml(task: str, test: bool = False) -> str:
    lines = ["path: .", "train: images/train", "val: images/val"] + (["test: images/test"] if test else []) + ["names:"]
    lines += [f"  {i}: {name}" for i, name in enumerate(NAMES)]
    if task == "pose":
        lines += [f"kpt_shape: [{KPT_COUNT}, 3]", "flip_idx: [0, 3, 2, 1]"]
    return "\n".join(lines) + "\n"


def make_dataset(root: Path, task: str = "detect", n_train: int = 32, n_val: int = 16, size: int = 64, seed: int = 0,
                 n_test: int = 0) -> Path:
    """Write a dataset of the task's Ultralytics format under root and return root (with n_test > 0,
    also a test split: images/test and `test:` in data.yaml, or test/<class>/ for classification)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_split(root, "train", n_train, task, size, rng)
    _write_split(root, "val", n_val, task, size, rng)
    if n_test:
        _write_split(root, "test", n_test, task, size, rng)
    if task != "classify":
        (root / "data.yaml").write_text(_data_yaml(task, test=n_test > 0))
    return root


def make_zip(folder: Path, zip_path: Path, top: str | None = None) -> Path:
    """Zip folder's contents; with top, nest them in one top folder as many export tools do."""
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                rel = f.relative_to(folder).as_posix()
                zf.write(f, f"{top}/{rel}" if top else rel)
    return zip_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="detect", choices=TASKS)
    parser.add_argument("--out", required=True, type=Path, help="folder to write the dataset to")
    parser.add_argument("--zip", type=Path, help="also write the dataset as this zip archive")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    make_dataset(args.out, args.task, args.train, args.val, args.size, args.seed)
    if args.zip:
        make_zip(args.out, args.zip)
    print(args.zip or args.out)


if __name__ == "__main__":
    main()
