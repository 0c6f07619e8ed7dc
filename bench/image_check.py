"""The image's contract without Docker: what the Dockerfile builds, run the way a hardened pod runs it.

    sudo python3 -m bench.image_check            # make image-check; 8 to 11 minutes, most of it pip
    sudo python3 -m bench.image_check --keep     # leave the scratch folder (logs, outputs) behind

Everything comes from the Dockerfile itself, so the check follows it when it changes:
1. the build context is the repository less what .dockerignore leaves out; the files the COPY
   lines take from it go into an empty, root-owned app folder (the image's WORKDIR);
2. a fresh virtual environment gets requirements.txt alone, as `RUN pip install` does;
3. the jobs run as an unprivileged user (uid 10001 where it is free, as in the image) with
   HOME=/nonexistent, the Dockerfile's ENV (its /work mapped to a scratch WORK_DIR) and its
   ENTRYPOINT and CMD; where mount namespaces are allowed, every file system is read-only but
   WORK_DIR, the local bucket, /tmp and /dev/shm (what `readOnlyRootFilesystem` with volumes at
   /work, /tmp and /dev/shm does in a pod). /tmp cannot be left out: torch asks for a temporary
   directory when it is imported and fails without one;
4. `train.py` trains a 1-epoch job on a generated dataset in local storage, then `predict.py` runs
   the result on a storage prefix. Both must exit 0 and leave their outputs, and no file the user
   wrote may be left outside WORK_DIR and the bucket, in /tmp neither.

Needs root (it creates the user `yolo-image-check` once, and switches to it with setpriv) and
Linux with util-linux. Exits 0 when the contract holds, 1 when it does not, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK_USER = "yolo-image-check"
IMAGE_UID = 10001  # the Dockerfile's USER; taken when it is free, so file ownership matches a pod's
JOB_ID = "image-check"
BUCKET = "vision-platform"
TRAIN_IMAGES, VAL_IMAGES = 16, 8
JOB_TIMEOUT_S = 1200  # each job takes well under a minute; a hang should not hold CI
# Folders any user may write to on a Debian system; files the job leaves there are looked for
# even where the sandbox makes them read-only.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


class CheckFailed(Exception):
    """The image's contract does not hold; the message says where."""


# ------------------------------------------------------------------------------------------
# The Dockerfile and .dockerignore, read as Docker reads them
# ------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and blank lines dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, also between continuation lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        if logical:
            name, _, args = logical.partition(" ")
            instructions.append((name.upper(), args.strip()))
    return instructions


def _arguments(args: str) -> list[str]:
    """An instruction's arguments, in exec (JSON array) or shell form."""
    return json.loads(args) if args.startswith("[") else args.split()


@dataclass(frozen=True)
class Image:
    """What the check needs from a Dockerfile."""

    python_version: str  # from `FROM python:3.11-...`
    workdir: str
    copies: tuple[tuple[tuple[str, ...], str], ...]  # (sources, destination) of each context COPY
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    command: tuple[str, ...] = ()  # ENTRYPOINT + CMD


def read_dockerfile(text: str) -> Image:
    """The image a Dockerfile builds, for the instructions this project uses."""
    python_version, workdir, copies, env, user = "", "/", [], {}, "root"
    entrypoint: list[str] = []
    cmd: list[str] = []
    for name, args in dockerfile_instructions(text):
        if name == "FROM":
            base = [word for word in args.split() if not word.startswith("--")][0]  # past --platform=...
            match = re.match(r"python:(\d+\.\d+)", base)
            python_version = match.group(1) if match else ""
        elif name == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, args))
        elif name in ("COPY", "ADD"):
            parts = _arguments(args)
            flags = [p for p in parts if p.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not from the build context
            paths = [p for p in parts if not p.startswith("--")]
            # `./`, `.` and `dir/` name a folder to copy into; anything else is the file's new name
            into_folder = paths[-1].endswith("/") or posixpath.basename(paths[-1]) in (".", "..")
            dest = posixpath.normpath(posixpath.join(workdir, paths[-1]))
            copies.append((tuple(paths[:-1]), dest + "/" if into_folder else dest))
        elif name == "ENV":
            env.update(_env_pairs(args))
        elif name == "USER":
            user = args.split(":")[0]
        elif name == "ENTRYPOINT":
            entrypoint, cmd = _arguments(args), []  # a new ENTRYPOINT resets CMD, as in Docker
        elif name == "CMD":
            cmd = _arguments(args)
    return Image(python_version, workdir, tuple(copies), env, user, tuple(entrypoint + cmd))


def _env_pairs(args: str) -> dict[str, str]:
    """ENV in its `K=V K2="v 2"` form or the legacy `K value` form."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


class DockerIgnore:
    """A build context filter with Docker's .dockerignore rules (moby/patternmatcher).

    Patterns are cleaned like paths (a leading or trailing `/` and `./` do not count) and match
    from the context's root; `*` and `?` stop at `/`, `**` spans any number of folders; a pattern
    that matches a folder leaves out everything in it; `!` lets a path back in; the last matching
    line decides.
    """

    def __init__(self, text: str):
        self.rules: list[tuple[bool, str, re.Pattern]] = []  # (lets back in, pattern, its regex)
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            back_in = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if back_in else line).lstrip("/")
            self.rules.append((back_in, pattern, re.compile(_pattern_regex(pattern))))

    def excludes(self, path: str) -> bool:
        """Whether path (relative to the context's root, `/`-separated) stays out of the context."""
        parts = posixpath.normpath(path).split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its folders
        excluded = False
        for back_in, _, regex in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not back_in
        return excluded

    def lets_back_in_below_top_level(self) -> bool:
        """Whether some `!` line could reach inside a folder, so a left-out folder must be walked."""
        return any(back_in and ("/" in pattern or "**" in pattern) for back_in, pattern, _ in self.rules)


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression, translated as moby's patternmatcher does."""
    regex, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1  # `**/` is `**`
            regex += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            regex += re.escape(pattern[i])
        elif char == "[":
            end = pattern.find("]", i + 1)
            regex += pattern[i : end + 1] if end > i else re.escape(char)
            i = end if end > i else i
        else:
            regex += re.escape(char)
        i += 1
    return regex + "$"


def context_files(root: Path, ignore: DockerIgnore) -> list[str]:
    """Every file a build of root would send, as `/`-separated paths relative to root."""
    walk_excluded = ignore.lets_back_in_below_top_level()
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        rel = (lambda name: name) if rel_folder == "." else (lambda name: f"{rel_folder}/{name}")
        # A left-out folder is not walked unless a `!` line could let something inside it back in
        # (Docker does the same): this is what keeps a .venv of several GB out of the walk.
        dirs[:] = [d for d in dirs if walk_excluded or not ignore.excludes(rel(d))]
        # A link to a folder is sent as a link, not followed; it counts as one entry.
        files += [rel(n) for n in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
                  if not ignore.excludes(rel(n))]
    return sorted(files)


def copied_files(root: Path, image: Image, ignore: DockerIgnore) -> dict[str, str]:
    """{path in the image: path in the context} for every file the COPY lines take from the context."""
    context = context_files(root, ignore)
    result = {}
    for sources, dest in image.copies:
        for source in sources:
            matched = _expand(source, context)
            if not matched:
                raise CheckFailed(f"COPY {source}: nothing in the build context matches it "
                                  "(missing, or left out by .dockerignore)")
            several = len(sources) > 1 or len(matched) > 1 or any(c in source for c in "*?[")
            for dest_name, rel, in_folder in matched:
                into = dest.endswith("/") or several or in_folder  # else the one file gets dest's name
                result[posixpath.normpath(posixpath.join(dest, dest_name)) if into else dest] = rel
    return result


def _expand(source: str, context: list[str]) -> list[tuple[str, str, bool]]:
    """(name under the destination, context path, from a folder) for a COPY source: a file, a glob
    or a folder (whose contents are copied, not the folder itself)."""
    source = posixpath.normpath(source).lstrip("/")
    depth = source.count("/") + 1
    matches = [rel for rel in context if rel.count("/") + 1 == depth
               and all(fnmatchcase(part, pat) for part, pat in zip(rel.split("/"), source.split("/")))]
    if matches:
        return [(posixpath.basename(rel), rel, False) for rel in matches]
    prefix = "" if source == "." else source + "/"
    return [(rel[len(prefix):], rel, True) for rel in context if rel.startswith(prefix)]


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------

@dataclass
class Sandbox:
    """How the job processes are started: as the unprivileged user, inside a read-only view if allowed."""

    uid: int
    gid: int
    writable: tuple[Path, ...]
    read_only_root: bool

    def command(self, argv: list[str]) -> list[str]:
        drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--no-new-privs", "--inh-caps=-all", "--"]
        if not self.read_only_root:
            return drop + argv
        # Parents first: a bind mount of /tmp made after one of /tmp/x/work would hide it.
        writable = sorted(self.writable, key=lambda p: len(p.parts))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY_VIEW, "sh",
                ":".join(map(str, writable)), *drop, *argv]


# Inside a private mount namespace: the writable folders become mounts of their own, then every
# other mount is remounted read-only but /proc, /sys and /dev, which a container runtime provides
# (/dev/shm is the pod's emptyDir). Only this process tree sees the change.
_READ_ONLY_VIEW = r"""
set -eu
writable=$1; shift
IFS=:; for path in $writable; do mount --bind "$path" "$path"; done; unset IFS
findmnt -rn -o TARGET | while read -r target; do
  case ":$writable:" in *":$target:"*) continue ;; esac
  case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$target" || echo "image-check: $target stays writable" >&2
done
exec "$@"
"""


def ensure_user() -> tuple[int, int]:
    """The unprivileged user's uid and gid, creating the user without a home on the first run."""
    try:
        entry = pwd.getpwnam(CHECK_USER)
    except KeyError:
        try:
            pwd.getpwuid(IMAGE_UID)
            uid_args = []
        except KeyError:
            uid_args = ["--uid", str(IMAGE_UID)]
        subprocess.run(["useradd", "--no-log-init", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--user-group", *uid_args, CHECK_USER], check=True)
        entry = pwd.getpwnam(CHECK_USER)
    return entry.pw_uid, entry.pw_gid


def mount_namespaces_allowed() -> bool:
    """Whether this machine lets us make a read-only view (root in a container often may not)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro / && ! touch /.image-check-probe 2>/dev/null"],
                           capture_output=True)
    Path("/.image-check-probe").unlink(missing_ok=True)  # only there if the remount did not hold
    return probe.returncode == 0


def pick_python(requested: str | None, version: str, sandbox: Sandbox) -> str:
    """A Python of the image's version that the unprivileged user can run and that can make a venv."""
    candidates = [requested] if requested else [shutil.which(f"python{version}"), f"/usr/bin/python{version}",
                                                 f"/usr/local/bin/python{version}"]
    tried = []
    for candidate in dict.fromkeys(os.path.realpath(c) for c in candidates if c):
        if not os.path.exists(candidate):
            continue
        # Through a shell: setpriv itself may still look the program up with root's rights.
        probe = subprocess.run(sandbox.command(["sh", "-c", 'exec "$0" -c "$1"', candidate,
                                                "import sys, ensurepip, venv; print('%d.%d' % sys.version_info[:2])"]),
                               capture_output=True, text=True, cwd="/")
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
        tried.append(f"{candidate}: {probe.stdout.strip() or (probe.stderr.strip().splitlines() or ['no output'])[-1]}")
    raise CheckFailed(f"no Python {version} that {CHECK_USER} can run with venv and ensurepip "
                      f"(one under /root is out of its reach); tried {tried or 'nothing'}: pass --python")


def build_app(image: Image, scratch: Path) -> tuple[Path, dict[str, str]]:
    """The image's WORKDIR: exactly the files its COPY lines take, root-owned and read-only to others."""
    copies = copied_files(ROOT, image, DockerIgnore(_read(ROOT / ".dockerignore")))
    app = scratch / "app"
    for target, rel in copies.items():
        if not (target == image.workdir or target.startswith(image.workdir.rstrip("/") + "/")):
            raise CheckFailed(f"COPY to {target}: the check maps only files copied under WORKDIR {image.workdir}")
        dest = app / posixpath.relpath(target, image.workdir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    return app, copies


def install_requirements(python: str, app: Path, venv: Path) -> None:
    """A fresh virtual environment with the requirements the image copies, and nothing else."""
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--root-user-action=ignore", "-r", str(app / "requirements.txt")], check=True)


def make_storage(venv: Path, scratch: Path, uid: int, gid: int) -> tuple[Path, int]:
    """A local bucket with a generated dataset and the validation images under an input prefix."""
    storage, data = scratch / "storage", scratch / "data"
    bucket = storage / BUCKET
    subprocess.run([str(venv / "bin/python"), "-m", "tests.sample_data", "--task", "detect",
                    "--train", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES), "--out", str(data),
                    "--zip", str(bucket / "datasets" / f"{JOB_ID}.zip")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    inputs = bucket / "inputs" / JOB_ID
    shutil.copytree(data / "images" / "val", inputs)
    for path in [storage, *storage.rglob("*")]:
        os.chown(path, uid, gid)  # the bucket stands in for S3: the job writes checkpoints there
    return storage, len(list(inputs.iterdir()))


def job_environment(image: Image, venv: Path, work: Path, storage: Path) -> dict[str, str]:
    """The image's environment: its ENV with /work mapped to the scratch WORK_DIR, HOME unwritable."""
    image_work = image.env.get("WORK_DIR", "/work")
    env = {"PATH": f"{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/nonexistent", "LANG": "C.UTF-8"}  # LANG as the python base image sets it
    for key, value in image.env.items():
        if value == image_work or value.startswith(image_work + "/"):
            value = str(work) + value[len(image_work):]
        env[key] = value
    env.update({"JOB_ID": JOB_ID, "STORAGE_TYPE": "local", "LOCAL_STORAGE_DIR": str(storage),
                "STORAGE_BUCKET": BUCKET, "IMGSZ": "64", "DEVICE": "cpu", "WORKERS": "0"})
    return env


def run_job(sandbox: Sandbox, argv: list[str], env: dict, app: Path, log: Path, stdout=None) -> int:
    """One entry point as the image runs it, from its WORKDIR; stderr to log."""
    with open(log, "w") as err:
        try:
            return subprocess.run(sandbox.command(argv), env=env, cwd=app, stdout=stdout or subprocess.DEVNULL,
                                  stderr=err, timeout=JOB_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            err.write(f"\nimage-check: stopped after {JOB_TIMEOUT_S} s\n")
            return 124


def files_left_outside(uid: int, since: Path, allowed: tuple[Path, ...]) -> list[str]:
    """Files the user created or changed during the run outside the allowed folders."""
    folders = [f for f in (*SHARED_WRITABLE, "/nonexistent") if os.path.isdir(f)]
    found = subprocess.run(["find", *folders, "-user", str(uid), "-newer", str(since)],
                           capture_output=True, text=True).stdout.split()
    return [f for f in found if not any(Path(f) == a or a in Path(f).parents for a in allowed)]


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def check(args: argparse.Namespace, scratch: Path, timings: list[tuple[str, float]]) -> list[str]:
    """Run every step; return the problems found (an empty list when the contract holds)."""

    def step(name, fn, *a):
        start = time.monotonic()
        result = fn(*a)
        timings.append((name, time.monotonic() - start))
        return result

    image = read_dockerfile((ROOT / "Dockerfile").read_text())
    problems = []
    if image.user in ("root", "0"):
        problems.append("the Dockerfile's last USER is root")
    uid, gid = ensure_user()
    work = scratch / "work"
    work.mkdir()
    os.chown(work, uid, gid)
    work.chmod(0o700)
    storage = scratch / "storage"
    read_only = mount_namespaces_allowed()
    # /tmp as a pod's emptyDir there: writable, and checked for leftovers below.
    sandbox = Sandbox(uid, gid, (work, storage, Path("/tmp")), read_only)
    print(f"image-check: user {CHECK_USER} (uid {uid}), scratch {scratch}")
    print("image-check: " + ("every file system read-only but WORK_DIR, the bucket, /tmp and /dev/shm" if read_only else
                             "mount namespaces are not allowed here, so /tmp and the like stay writable; "
                             "files the jobs leave there are still looked for"))

    app, copies = step("copy the Dockerfile's files", build_app, image, scratch)
    print(f"image-check: {len(copies)} files copied to {image.workdir}: {', '.join(sorted(copies.values()))}")
    venv = Path(args.venv) if args.venv else scratch / "venv"
    if not args.venv:
        python = pick_python(args.python, image.python_version, Sandbox(uid, gid, (), False))
        print(f"image-check: fresh virtual environment from {python}, requirements.txt only")
        step("venv + pip install -r requirements.txt", install_requirements, python, app, venv)
    storage, n_inputs = step("generate the dataset", make_storage, venv, scratch, uid, gid)
    env = job_environment(image, venv, work, storage)
    app_before = sorted(p.relative_to(app).as_posix() for p in app.rglob("*"))
    since = scratch / "started"
    since.touch()
    time.sleep(1)  # find -newer compares whole seconds on some file systems

    train_env = {**env, "DATASET_ID": JOB_ID, "MODEL_NAME": "yolo11n.yaml", "TASK_TYPE": "object_detection",
                 "EPOCHS": "1", "BATCH_SIZE": "8", "LEARNING_RATE": "0.01"}
    code = step("train.py (1 epoch)", run_job, sandbox, list(image.command), train_env, app, scratch / "train.log")
    checkpoints = storage / BUCKET / "checkpoints" / f"job-{JOB_ID}"
    if code != 0:
        problems.append(f"train.py exited {code}:\n{_tail(scratch / 'train.log')}")
    for name in ("best.pt", "last.pt"):
        if not (checkpoints / name).is_file() or (checkpoints / name).stat().st_size == 0:
            problems.append(f"train.py left no {name} in storage ({checkpoints})")

    if not problems:
        predict_env = {**env, "INPUT_URI": f"inputs/{JOB_ID}/", "PREDICT_OUTPUT_URI": f"predictions/{JOB_ID}/"}
        predict_argv = list(image.command[:-1]) + ["predict.py"]  # `docker run IMAGE predict.py`
        with open(scratch / "predictions.json", "w") as out:
            code = step("predict.py", run_job, sandbox, predict_argv, predict_env, app, scratch / "predict.log", out)
        if code != 0:
            problems.append(f"predict.py exited {code}:\n{_tail(scratch / 'predict.log')}")
        else:
            document = json.loads((scratch / "predictions.json").read_text())
            if document.get("count") != n_inputs:
                problems.append(f"predict.py counted {document.get('count')} images, not {n_inputs}")
            if not (storage / BUCKET / "predictions" / JOB_ID / "predictions.json").is_file():
                problems.append("predict.py stored no predictions.json under PREDICT_OUTPUT_URI")

    if sorted(p.relative_to(app).as_posix() for p in app.rglob("*")) != app_before:
        problems.append(f"the jobs wrote into the image's WORKDIR ({app})")
    if os.path.exists("/nonexistent"):
        problems.append("/nonexistent exists: something created HOME")
    strays = files_left_outside(uid, since, (work, storage))
    if strays:
        problems.append("files written outside WORK_DIR and the bucket: " + ", ".join(strays[:20]))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="interpreter for the fresh venv (default: a python3.X matching "
                                         "the Dockerfile's FROM that the unprivileged user can run)")
    parser.add_argument("--venv", help="reuse this virtual environment instead of a fresh one "
                                       "(for iterating on the check; the real check makes a fresh one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, outputs)")
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="where the scratch folder goes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("image-check: needs root, to create an unprivileged user and run the jobs as it", file=sys.stderr)
        return 2
    if not (shutil.which("setpriv") and shutil.which("unshare")):
        print("image-check: needs setpriv and unshare (util-linux)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="yolo-image-check-", dir=args.scratch))
    scratch.chmod(0o755)  # the unprivileged user must reach the app, the venv and its WORK_DIR
    try:
        problems = run_check(args, scratch)
    finally:
        if args.keep:
            print(f"image-check: kept {scratch}")
        else:
            start = time.monotonic()
            shutil.rmtree(scratch, ignore_errors=True)  # mostly the venv: several GB of CUDA libraries
            print(f"image-check: {time.monotonic() - start:7.1f} s  removing the scratch folder")
    return 1 if problems else 0


def run_check(args: argparse.Namespace, scratch: Path) -> list[str]:
    """The check with its timings and verdict printed; the problems found."""
    timings: list[tuple[str, float]] = []
    started = time.monotonic()
    try:
        problems = check(args, scratch, timings)
    except CheckFailed as e:
        problems = [str(e)]
    except subprocess.CalledProcessError as e:  # a setup step (venv, pip, the dataset) failed
        problems = [f"{' '.join(map(str, e.cmd))} exited {e.returncode}"]
    for name, seconds in timings:
        print(f"image-check: {seconds:7.1f} s  {name}")
    print(f"image-check: {time.monotonic() - started:7.1f} s  in all")
    for problem in problems:
        print(f"image-check: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("image-check: ok: the image's files, requirements, user, ENV and entry points train and predict")
    return problems

if __name__ == "__main__":
    sys.exit(main())
