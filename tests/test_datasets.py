"""Dataset archives: safe extraction, finding data.yaml, rewriting its paths."""

from __future__ import annotations

import io
import math
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from archives import extract_archive
from datasets import find_dataset_root, resolve_data_yaml
from tests.sample_data import make_dataset, make_zip
from utils import BadInput


@pytest.fixture(scope="module")
def detect_folder(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("src") / "shapes", "detect", n_train=4, n_val=2)


def test_zip_with_one_top_folder_is_found_and_paths_made_absolute(detect_folder, tmp_path):
    archive = make_zip(detect_folder, tmp_path / "d.zip", top="export-2024")
    out = extract_archive(archive, tmp_path / "x")
    root = find_dataset_root(out)
    assert root == out / "export-2024"
    written, data = resolve_data_yaml(root, tmp_path / "job" / "data.yaml")
    assert data["path"] == str(root)
    assert data["train"] == str(root / "images" / "train") and data["val"] == str(root / "images" / "val")
    assert yaml.safe_load(written.read_text()) == data


def test_absolute_paths_from_the_exporting_machine_are_rebased(detect_folder, tmp_path):
    folder = tmp_path / "ds"
    make_dataset(folder, "detect", n_train=2, n_val=1)
    (folder / "data.yaml").write_text(
        "path: /home/alice/datasets/shapes\ntrain: /home/alice/datasets/shapes/images/train\n"
        "val: C:/Users/alice/shapes/images/val\nnames: [a, b]\ndownload: https://example.com/x.zip\n")
    _, data = resolve_data_yaml(folder, tmp_path / "data.yaml")
    assert data["train"] == str(folder / "images" / "train")
    assert data["val"] == str(folder / "images" / "val")
    assert "download" not in data


def test_list_of_train_folders_is_rewritten(tmp_path):
    folder = make_dataset(tmp_path / "ds", "detect", n_train=2, n_val=1)
    (folder / "data.yaml").write_text("train: [images/train, images/val]\nval: images/val\nnames: {0: a, 1: b}\n")
    _, data = resolve_data_yaml(folder, tmp_path / "data.yaml")
    assert data["train"] == [str(folder / "images" / "train"), str(folder / "images" / "val")]


@pytest.mark.parametrize("content,message", [
    ("val: images/val\nnames: [a]\n", "no train entry"),
    ("train: images/train\nval: images/val\n", "neither names nor nc"),
    ("train: ../../../etc\nval: images/val\nnames: [a]\n", "points outside the dataset"),
    ("train: images/nope\nval: images/val\nnames: [a]\n", "does not exist"),
    ("train: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_broken_data_yaml_is_a_clear_bad_input(tmp_path, content, message):
    folder = make_dataset(tmp_path / "ds", "detect", n_train=1, n_val=1)
    (folder / "data.yaml").write_text(content)
    with pytest.raises(BadInput, match=message):
        resolve_data_yaml(folder, tmp_path / "data.yaml")


def test_archive_without_data_yaml_or_train_folder_is_bad_input(tmp_path):
    (tmp_path / "x" / "a" / "b").mkdir(parents=True)
    (tmp_path / "x" / "readme.txt").write_text("hi")
    with pytest.raises(BadInput, match="no data.yaml"):
        find_dataset_root(tmp_path / "x")


def test_classification_folder_is_found(tmp_path):
    folder = make_dataset(tmp_path / "c" / "top", "classify", n_train=4, n_val=2)
    assert find_dataset_root(tmp_path / "c") == folder


def test_tar_gz_is_extracted(detect_folder, tmp_path):
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(detect_folder, arcname="shapes")
    out = extract_archive(archive, tmp_path / "x")
    assert (find_dataset_root(out) / "data.yaml").is_file()


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt"])
def test_zip_entries_escaping_the_folder_are_refused(tmp_path, name):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(name, "pwned")
    with pytest.raises(BadInput, match="outside|absolute"):
        extract_archive(archive, tmp_path / "x")
    assert not (tmp_path / "evil.txt").exists()


def test_tar_symlink_is_skipped_not_followed(tmp_path):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        payload = b"ok"
        info = tarfile.TarInfo("data/file.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    out = extract_archive(archive, tmp_path / "x")
    assert (out / "data" / "file.txt").read_bytes() == b"ok"
    assert not os.path.lexists(out / "data" / "link")


def test_truncated_archive_is_bad_input(detect_folder, tmp_path):
    archive = make_zip(detect_folder, tmp_path / "d.zip")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="corrupt|not a zip"):
        extract_archive(archive, tmp_path / "x")


def test_zip_entries_without_a_unix_file_type_are_plain_files(tmp_path):
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("data.yaml")
        info.external_attr = 0  # as Windows tools write it
        zf.writestr(info, "names: [a]")
        with zf.open("big.bin", "w") as f:  # Python writes permissions only
            f.write(b"x" * 10)
    out = extract_archive(archive, tmp_path / "x")
    assert (out / "data.yaml").read_text() == "names: [a]" and (out / "big.bin").stat().st_size == 10


def test_caps_refuse_before_anything_is_written(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(20):
            zf.writestr(f"f{i}.txt", "x" * 100)
    with pytest.raises(BadInput, match=r"holds 20 entries \(files and folders\), more than DATASET_MAX_FILES=10"):
        extract_archive(archive, tmp_path / "a", max_files=10)
    with pytest.raises(BadInput, match="expands to 2.0 KB, more than DATASET_MAX_BYTES=1000"):
        extract_archive(archive, tmp_path / "b", max_bytes=1000)
    assert not list((tmp_path / "a").glob("*")) and not list((tmp_path / "b").glob("*"))


def test_folders_count_against_the_file_cap_before_anything_is_written(tmp_path):
    archive = tmp_path / "folders.tar"
    with tarfile.open(archive, "w") as tf:
        for i in range(3000):
            info = tarfile.TarInfo(f"d{i:04d}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    with pytest.raises(BadInput, match="folders.tar holds more than DATASET_MAX_FILES=10 entries"):
        extract_archive(archive, tmp_path / "x", max_files=10)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_an_entry_that_cannot_be_written_is_bad_input_naming_it(tmp_path):
    archive = tmp_path / "dot.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(".", b"a file where the extraction folder itself is")
    with pytest.raises(BadInput, match="dot.zip: entry '.' cannot be extracted: Is a directory"):
        extract_archive(archive, tmp_path / "x")


@pytest.mark.parametrize("task,line,problem", [
    ("obb", "0 0.1 0.1 0.2 0.1 0.2 0.2", "has 7 values; an oriented box is"),
    ("segment", "0 0.1 0.1 0.2 0.2", "has 5 values; a segment label is"),
    ("pose", "0 0.5 0.5 0.2 0.2 0.1 0.1 2", "has 8 values; a pose label is"),
    ("pose", "0 0.5 0.5 0.2 0.2 " + " ".join(["0.1 0.1 2"] * 3) + " 1.2 0.1 2", "coordinate 1.2 is outside"),
    ("detect", "1.5 0.5 0.5 0.2 0.2", "class 1.5 is out of range"),
    ("detect", "0 nan 0.5 0.2 0.2", "coordinate nan is outside"),
])
def test_label_lines_are_checked_for_the_task(task, line, problem):
    from dataset_check import _label_problem

    assert problem in _label_problem(line.split(), task, classes=2, kpt=[4, 3])


def test_pose_visibility_flags_are_not_coordinates():
    from dataset_check import _label_problem

    line = "0 0.5 0.5 0.2 0.2 " + " ".join(["0.1 0.1 2"] * 4)
    assert _label_problem(line.split(), "pose", classes=1, kpt=[4, 3]) is None


def test_sample_datasets_of_every_task_pass_the_check(tmp_path):
    from dataset_check import check_dataset

    for task in ("detect", "segment", "pose", "obb"):
        root = make_dataset(tmp_path / task, task, n_train=3, n_val=2)
        data_yaml, _ = resolve_data_yaml(root, tmp_path / f"{task}.yaml")
        assert not check_dataset(data_yaml, task), check_dataset(data_yaml, task).text()
    assert not check_dataset(make_dataset(tmp_path / "cls", "classify", n_train=6, n_val=4), "classify")


def test_report_shows_ten_examples_then_a_count():
    from dataset_check import DatasetReport

    report = DatasetReport()
    for i in range(25):
        report.add(f"labels/x{i}.txt line 1", "bad")
    text = report.text()
    assert text.startswith("dataset check found 25 problem(s):") and text.count("line 1: bad") == 10
    assert text.endswith("... and 15 more")


def test_report_memory_stays_bounded_however_many_problems():
    from dataset_check import DatasetReport

    report = DatasetReport()
    for i in range(2_000_000):
        report.add(f"labels/big.txt line {i + 1}", "class 9 is out of range")
    assert len(report.problems) == DatasetReport.SHOWN and report.count == 2_000_000
    assert report.text().startswith("dataset check found 2000000 problem(s):")
    assert report.text().endswith("... and 1999990 more")


def test_label_file_is_read_line_by_line_in_bounded_memory(tmp_path):
    import tracemalloc

    from dataset_check import MAX_LABEL_LINE, DatasetReport, _check_label_file

    label = tmp_path / "labels" / "train" / "big.txt"
    label.parent.mkdir(parents=True)
    with label.open("w") as f:
        f.write("0 " + "0.5 " * MAX_LABEL_LINE + "\n")  # one line of 4 MB
        for _ in range(100_000):  # 1.8 MB of lines, each with a class out of range
            f.write("9 0.5 0.5 0.1 0.1\n")
    report = DatasetReport()
    tracemalloc.start()
    try:
        _check_label_file(label, "detect", 2, None, report)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.count == 100_001
    assert report.problems[0] == f"labels/train/big.txt line 1: is longer than {MAX_LABEL_LINE} characters"
    assert report.problems[1].startswith("labels/train/big.txt line 2: class 9 is out of range")
    assert peak < 3 * 2**20, f"checking a 6 MB label file took {peak / 2**20:.1f} MB"


def test_dataset_with_only_train_gets_a_deterministic_validation_split(tmp_path):
    folder = make_dataset(tmp_path / "ds", "detect", n_train=20, n_val=1)
    (folder / "data.yaml").write_text("train: images/train\nnames: [a, b]\n")
    _, first = resolve_data_yaml(folder, tmp_path / "one" / "data.yaml")
    _, again = resolve_data_yaml(folder, tmp_path / "two" / "data.yaml")
    train = Path(first["train"]).read_text().split()
    val = Path(first["val"]).read_text().split()
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert Path(again["val"]).read_text().split() == val  # the same images every time


def test_txt_lists_are_rewritten_with_absolute_paths(tmp_path):
    folder = make_dataset(tmp_path / "ds", "detect", n_train=3, n_val=2)
    names = sorted(p.name for p in (folder / "images" / "train").iterdir())
    (folder / "train.txt").write_text(f"./images/train/{names[0]}\nimages/train/{names[1]}\n"
                                      f"/home/bob/export/images/train/{names[2]}\n")
    (folder / "data.yaml").write_text("train: train.txt\nval: images/val\nnames: [a, b]\n")
    _, data = resolve_data_yaml(folder, tmp_path / "job" / "data.yaml")
    listed = Path(data["train"]).read_text().split()
    assert listed == [str(folder / "images" / "train" / n) for n in names]


def test_list_naming_missing_images_is_bad_input(tmp_path):
    folder = make_dataset(tmp_path / "ds", "detect", n_train=1, n_val=1)
    (folder / "train.txt").write_text("images/train/nope.jpg\n")
    (folder / "data.yaml").write_text("train: train.txt\nval: images/val\nnames: [a]\n")
    with pytest.raises(BadInput, match="train.txt lists 1 image\\(s\\) that are not in the dataset"):
        resolve_data_yaml(folder, tmp_path / "job" / "data.yaml")


def test_classification_with_only_train_gets_a_val_folder_of_links(tmp_path):
    from datasets import prepare_classification

    folder = make_dataset(tmp_path / "c", "classify", n_train=20, n_val=1)
    import shutil as _shutil

    _shutil.rmtree(folder / "val")
    out = prepare_classification(folder, tmp_path / "split")
    val = list((out / "val").rglob("*.jpg"))
    train = list((out / "train").rglob("*.jpg"))
    assert val and len(val) + len(train) == 20 and all(p.is_symlink() for p in val)
    assert prepare_classification(make_dataset(tmp_path / "d", "classify"), tmp_path / "x") == tmp_path / "d"


def test_image_suffixes_are_ultralytics_own():
    """An image this program counts (dataset check, validation split, predict's listing) is one
    Ultralytics trains on, and the other way round: .avif, .heif and .jp2 were left out once."""
    from ultralytics.data.utils import IMG_FORMATS

    from datasets import IMAGE_SUFFIXES

    assert IMAGE_SUFFIXES == {f".{s}" for s in IMG_FORMATS}


def test_roboflow_export_without_its_test_split_trains_without_one(tmp_path, caplog):
    """Roboflow writes `test: ../test/images` even for a version without a test split; Ultralytics
    checks only train and val, so a missing test split is a warning, not a refused dataset."""
    folder = tmp_path / "rf"
    make_dataset(folder / "src", "detect", n_train=2, n_val=1)
    for split, src in (("train", "train"), ("valid", "val")):
        (folder / split).mkdir()
        (folder / "src" / "images" / src).rename(folder / split / "images")
        (folder / "src" / "labels" / src).rename(folder / split / "labels")
    (folder / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                      "nc: 2\nnames: [a, b]\n")
    with caplog.at_level("WARNING", logger="trainer"):
        written, data = resolve_data_yaml(folder, tmp_path / "job" / "data.yaml")
    assert data["train"] == str(folder / "train" / "images") and data["val"] == str(folder / "valid" / "images")
    assert "test" not in data and "test" not in yaml.safe_load(written.read_text())
    assert "data.yaml test: ../test/images does not exist in the dataset; training without a test split" in caplog.text
    (folder / "data.yaml").write_text("train: ../train/images\nval: ../nope/images\nnames: [a, b]\n")
    with pytest.raises(BadInput, match="val: ../nope/images does not exist in the dataset"):  # val stays required
        resolve_data_yaml(folder, tmp_path / "job" / "data.yaml")


@pytest.mark.parametrize("name", ["valid", "validation"])
def test_classification_validation_folder_under_ultralytics_other_names_is_used(name, tmp_path):
    """Ultralytics validates a classification dataset on val/, else validation/, else valid/: such a
    folder is the validation split, not replaced by a share of train/."""
    from dataset_check import check_dataset
    from datasets import prepare_classification

    folder = make_dataset(tmp_path / "c", "classify", n_train=6, n_val=4)
    (folder / "val").rename(folder / name)
    assert prepare_classification(folder, tmp_path / "split") == folder
    assert not check_dataset(folder, "classify"), check_dataset(folder, "classify").text()
    (folder / name).rename(folder / "elsewhere")
    assert "needs a val/ (or validation/, valid/, test/) folder" in check_dataset(folder, "classify").text()


def test_hidden_files_beside_the_images_are_left_out_as_ultralytics_does(tmp_path):
    """macOS' AppleDouble files (`._name.jpg`, not images) and hidden folders are skipped by
    Ultralytics' glob; the check, the validation split and predict's listing skip them too."""
    from dataset_check import check_dataset
    from datasets import image_files

    root = make_dataset(tmp_path / "d", "detect", n_train=3, n_val=2)
    for folder in (root / "images" / "train", root / "images" / "val"):
        (folder / f"._{sorted(folder.iterdir())[0].name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (root / "images" / "train" / ".thumbs").mkdir()
    (root / "images" / "train" / ".thumbs" / "t.jpg").write_bytes(b"not decoded")
    data_yaml, _ = resolve_data_yaml(root, tmp_path / "d.yaml")
    assert not check_dataset(data_yaml, "detect"), check_dataset(data_yaml, "detect").text()
    assert [p.name for p in image_files(root / "images" / "train")] == [f"train_000{i}.jpg" for i in range(3)]
    cls = make_dataset(tmp_path / "c", "classify", n_train=4, n_val=2)
    first_class = sorted((cls / "train").iterdir())[0]
    (first_class / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert not check_dataset(cls, "classify"), check_dataset(cls, "classify").text()


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "obb", "classify"])
def test_dataset_task_is_recognised(task, tmp_path):
    from dataset_check import dataset_task

    root = make_dataset(tmp_path / task, task, n_train=3, n_val=2)
    data = root if task == "classify" else resolve_data_yaml(root, tmp_path / "d.yaml")[0]
    assert dataset_task(data).task == task


RECTANGLE = "0 0.2 0.2 0.6 0.2 0.6 0.5 0.2 0.5"  # 9 values: an oriented box, or a 4-point polygon
DIAMOND = "1 0.5 0.2 0.8 0.5 0.5 0.8 0.2 0.5"  # a rotated rectangle: still a parallelogram
QUADRILATERAL = "0 0.1 0.1 0.7 0.15 0.9 0.8 0.15 0.6"  # a document in perspective: no oriented box
POLYGON = "1 " + " ".join(f"{0.5 + 0.3 * math.cos(a * math.pi / 8):.4f} {0.5 + 0.3 * math.sin(a * math.pi / 8):.4f}"
                          for a in range(16))
BOX = "0 0.5 0.5 0.2 0.2"


def labelled(folder: Path, *files: list[str]) -> Path:
    """A prepared data.yaml (absolute paths) over train images whose label files hold these lines."""
    for i, lines in enumerate(files):
        for kind, suffix, content in (("images", "jpg", b"jpg"), ("labels", "txt", "\n".join(lines).encode())):
            (folder / kind / "train").mkdir(parents=True, exist_ok=True)
            (folder / kind / "train" / f"{i:03d}.{suffix}").write_bytes(content)
    (folder / "data.yaml").write_text(f"train: {folder / 'images' / 'train'}\nval: {folder / 'images' / 'train'}\n"
                                      "names: [a, b]\n")
    return folder / "data.yaml"


@pytest.mark.parametrize("lines,fits,vote", [
    ([[RECTANGLE], [DIAMOND, RECTANGLE]], {"obb", "segment"}, "obb"),
    ([[QUADRILATERAL], [QUADRILATERAL, RECTANGLE], [DIAMOND]], {"obb", "segment"}, "segment"),
    ([[RECTANGLE], [RECTANGLE, POLYGON], [RECTANGLE]], {"segment"}, "segment"),  # 4-point and longer polygons
    ([[BOX], [BOX, BOX]], {"detect"}, "detect"),
])
def test_dataset_task_votes_over_every_label_file(tmp_path, lines, fits, vote):
    from dataset_check import dataset_task

    shape = dataset_task(labelled(tmp_path, *lines))
    assert (set(shape.fits), shape.task) == (fits, vote)


@pytest.mark.parametrize("task_type,model,lines,expected", [
    ("instance_segmentation", "yolo11n-seg.yaml", [[RECTANGLE], [DIAMOND]], "segment"),  # explicit, and 9 values fit
    ("oriented_detection", "yolo11n-obb.yaml", [[QUADRILATERAL]], "obb"),  # explicit wins over the dataset's vote
    (None, "yolo11n-seg.yaml", [[RECTANGLE]], "segment"),  # the model's task is explicit too
    (None, "yolo11n-seg.yaml", [[RECTANGLE], [POLYGON, RECTANGLE]], "segment"),
    (None, "<unreadable.pt>", [[RECTANGLE], [DIAMOND]], "obb"),  # nothing explicit: the dataset's vote
    (None, "<unreadable.pt>", [[QUADRILATERAL], [RECTANGLE, QUADRILATERAL]], "segment"),
    (None, "yolo11n-pose.yaml", [[BOX]], "the dataset is a detect dataset"),  # a real contradiction
    ("instance_segmentation", "yolo11n-seg.yaml", [[BOX]], "the dataset is a detect dataset"),
])
def test_task_resolution_explicit_settings_win_and_ambiguity_never_contradicts(tmp_path, caplog, task_type, model,
                                                                               lines, expected):
    import models
    from config import load_settings

    if model == "<unreadable.pt>":
        model = str(tmp_path / "unreadable.pt")
        Path(model).write_bytes(b"a checkpoint whose task cannot be read")
    settings = load_settings({"JOB_ID": "1", "DATASET_ID": "d", "STORAGE_TYPE": "local", "MODEL_NAME": model,
                              **({"TASK_TYPE": task_type} if task_type else {})})
    data = labelled(tmp_path / "ds", *lines)
    caplog.set_level("INFO", logger="trainer")
    if expected.startswith("the dataset"):
        with pytest.raises(BadInput, match=expected):
            models.resolve_task(settings, model, data)
        return
    assert models.resolve_task(settings, model, data) == expected
    if any(line[0] in (RECTANGLE, DIAMOND, QUADRILATERAL) for line in lines) and not any(POLYGON in f for f in lines):
        assert "the dataset is ambiguous: its labels have 9 values, which fit both oriented boxes and 4-point " \
               "polygons" in caplog.text


def test_segment_labels_of_four_points_pass_the_check():
    from dataset_check import _label_problem

    assert _label_problem(QUADRILATERAL.split(), "segment", classes=2, kpt=None) is None
    assert _label_problem(RECTANGLE.split(), "obb", classes=2, kpt=None) is None


def _zip_of(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_entry_whose_bytes_were_damaged_is_corrupt(method, tmp_path):
    content = os.urandom(5000)  # incompressible: a deflated entry holds these bytes nearly as they are
    archive = _zip_of(tmp_path / "d.zip", {"a.txt": b"fine", "images/x.jpg": content}, method)
    data = bytearray(archive.read_bytes())
    at = data.index(content[1000:1100]) + 50
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=r"d.zip is corrupt or truncated: .*images/x\.jpg"):
        extract_archive(archive, tmp_path / "x")


def test_zip_entry_larger_than_its_header_declares_is_refused(tmp_path):
    """A zip bomb's trick: the central directory understates an entry. Extraction stops at the
    declared size instead of writing what the data inflates to."""
    import struct

    archive = _zip_of(tmp_path / "bomb.zip", {"zeros.bin": bytes(1 << 20)})
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)  # uncompressed size: 1000 bytes instead of 1 MB
    archive.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="bomb.zip is corrupt or truncated: 'zeros.bin' holds more than its header"):
        extract_archive(archive, tmp_path / "x")
    assert not (tmp_path / "x" / "zeros.bin").exists()


def test_every_zip_method_and_size_extracts_the_same_bytes(tmp_path, monkeypatch):
    """Small stored and deflated entries are inflated from the mapped archive; larger ones, and
    bzip2 and LZMA, through zipfile's reader: all must give the archive's bytes."""
    import archives

    monkeypatch.setattr(archives, "DIRECT_MAX", 3000)  # so that some entries take the streamed way
    entries = {f"d{i % 3}/f{i}.bin": os.urandom(i * 97) + b"y" * (i * 50) for i in range(60)}
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
        for i, (name, data) in enumerate(entries.items()):
            zf.writestr(name, data, compress_type=methods[i % 4])
    out = extract_archive(archive, tmp_path / "x")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == entries


def test_only_errors_ultralytics_raises_about_its_input_are_bad_input():
    """Ultralytics' own refusals while it sets up training become bad input (exit 2) with their first
    line, colour codes removed; the same error types raised elsewhere, or out of memory, stay
    unexpected errors (exit 1)."""
    from ultralytics.data.utils import check_det_dataset

    import models

    try:
        check_det_dataset("/nonexistent/data.yaml")
    except Exception as e:
        refused = e
    assert models.ultralytics_refusal(refused) is not None and "\x1b" not in models.ultralytics_refusal(refused)
    try:
        int("not a number")
    except ValueError as e:
        assert models.ultralytics_refusal(e) is None  # raised outside Ultralytics
    assert models.ultralytics_refusal(RuntimeError("CUDA out of memory")) is None
    assert models.ultralytics_refusal(KeyError("x")) is None


def test_ultralytics_errors_read_as_one_plain_line_in_a_status(tmp_path):
    """A junk weights file made the status say "ERROR ❌️ /long/local/path/x.pt is not a loadable
    checkpoint ... Recommended fixes are to re-download ... 'yolo predict model=yolo26n.pt'"."""
    from ultralytics import YOLO

    import models

    junk = tmp_path / "weights" / "junk.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"\xb9" + os.urandom(2000))
    with pytest.raises(Exception) as caught:
        YOLO(str(junk))
    message = models.ultralytics_message(caught.value, junk)
    assert message.startswith("junk.pt is not a loadable checkpoint"), message
    assert "\n" not in message and "ERROR" not in message and "❌" not in message and str(tmp_path) not in message
    assert models.ultralytics_message(ValueError("\x1b[31mWARNING ⚠️ bad value\x1b[0m\nmore")) == "bad value"
