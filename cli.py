"""`--help` and `--check` for train.py and predict.py: what an operator runs before a job.

    python train.py --help      # what it does, and every variable it reads with its default and meaning
    python train.py --check     # validate the configuration, then reach out without training
    python predict.py --check

`--check` reads ./.env like a job does (real environment variables win), then prints one line per
check: its status (ok, warn, skipped, problem, unreachable), the seconds it took and what it found.
Train: configuration, work folder, storage bucket, dataset, weights (MODEL_NAME), backend health,
MLflow, GPUs. Predict: configuration, work folder, storage bucket, checkpoint, input, GPUs.
It exits with the contract's codes: 0 when nothing is wrong (warnings allowed), 2 for bad
configuration or a missing object (retrying cannot help; wins over 75), 75 when something is
unreachable. Storage requests get at most 2 tries of at most 10 s here, so an unreachable store is
reported in seconds rather than after a job's full retries.

Environment: every variable of variables.ENV_VARS (through load_settings); MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, for an MLflow server that wants them.
Imports: utils, variables, config, storage, archives; models and predict inside the checks that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Mapping, TextIO

from archives import archive_kind
from config import Settings, load_settings
from variables import ENV_HELP, ENV_VARS
from storage import Location, Storage, StorageNotFound
from utils import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TRANSIENT,
    BadInput,
    ConfigError,
    Redactor,
    TransientError,
    human_size,
    setup_logging,
)

LOGGER = logging.getLogger("trainer")

USAGE = "usage: python {script} [--help | --check]"


OPTIONS = """\
options:
  --help    this text
  --check   validate the configuration, then reach storage, the {objects}, the backend,
            MLflow and the GPUs without {doing}; one line per check; exit 0 when nothing is wrong,
            2 for bad configuration or a missing object, 75 when something is unreachable"""


OK, WARN, SKIPPED, PROBLEM, UNREACHABLE, ERROR = "ok", "warn", "skipped", "problem", "unreachable", "error"


def handle(argv: list[str], entry: str, description: str) -> int | None:
    """What the entry point's main() calls first: an exit code for --help, --check or unknown
    arguments, None to run the job."""
    script = f"{entry}.py"
    if not argv:
        return None
    if argv in (["--help"], ["-h"]):
        print(help_text(entry, description))
        return EXIT_OK
    if argv == ["--check"]:
        return check(entry)
    print(f"{USAGE.format(script=script)}\n{script}: unknown arguments: {' '.join(argv)}", file=sys.stderr)
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------


def help_text(entry: str, description: str) -> str:
    """The entry point's docstring, its options, and every variable it reads (variables.ENV_HELP)."""
    script = f"{entry}.py"
    objects = {"train": "dataset, the weights", "predict": "checkpoint, the input",
               "evaluate": "checkpoint, the dataset", "export": "checkpoint"}[entry]
    doing = {"train": "training", "predict": "predicting", "evaluate": "evaluating", "export": "exporting"}[entry]
    lines = [description.strip(), "", USAGE.format(script=script), "",
             OPTIONS.format(objects=objects, doing=doing), "",
             f"environment variables {script} reads (real environment variables win over ./.env):"]
    for name in entry_variables(entry):
        default = ENV_VARS[name]
        meaning = re.sub(r"^\w+\.py: ", "", ENV_HELP.get(name, "(no description)"))  # its own, or one it borrows
        lines.append(f"  {name}" + (f" (default: {default})" if default else ""))
        lines.extend(textwrap.wrap(meaning, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


# What evaluate.py and export.py read of the variables whose help names another entry point.
BORROWED = {"train": set(), "predict": set(),
            "evaluate": {"CHECKPOINT_URI", "DATASET_ID", "DATASET_URI", "VAL_FRACTION", "VALIDATION_CONF", "BATCH_SIZE"},
            "export": {"CHECKPOINT_URI", "DATASET_ID", "DATASET_URI"}}

# train.py's (its exports after training) and export.py's, though their help names no entry point.
NOT_READ = {"predict": {"EXPORT_FORMATS", "EXPORT_VERIFY_IMAGES"}, "evaluate": {"EXPORT_FORMATS", "EXPORT_VERIFY_IMAGES"}}


def entry_variables(entry: str) -> list[str]:
    """The variables an entry point reads: those for every entry point, its own ("<entry>.py: ..."),
    and what it borrows of another's."""
    def meant_for(name: str) -> str | None:
        found = re.match(r"^(\w+)\.py: ", ENV_HELP.get(name, ""))
        return found[1] if found else None

    return [name for name in ENV_VARS if (meant_for(name) in (None, entry) or name in BORROWED[entry])
            and name not in NOT_READ.get(entry, ())]


# ----------------------------------------------------------------------------------------------
# --check
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    name: str
    status: str
    seconds: float
    detail: str


def check(entry: str) -> int:
    """`--check` as the entry points run it: ./.env, logging (warnings only), then run_checks."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    redact = Redactor.from_environ(os.environ)
    setup_logging(os.environ, redact)
    if (os.environ.get("LOG_LEVEL") or "").upper() != "DEBUG":
        for handler in logging.getLogger().handlers:  # the checks' own lines are the report
            handler.setLevel(logging.WARNING)
    as_json = (os.environ.get("LOG_FORMAT") or "").strip().lower() == "json"
    sys.stdout.flush()
    report = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the real stdout: the report's lines only
    os.dup2(2, 1)  # what else prints (Ultralytics' first-run settings notice, C libraries) goes to stderr
    sys.stdout = sys.stderr
    try:
        return run_checks(entry, os.environ, report, as_json)
    finally:  # fd 1 back: a copy of LOG_FORMAT=json's capture pipe left there would hold its reader at exit
        sys.stderr.flush()
        os.dup2(report.fileno(), 1)
        sys.stdout = sys.__stdout__


def run_checks(entry: str, environ: Mapping[str, str], out: TextIO, as_json: bool = False) -> int:
    """Validate the configuration, then run every check of `entry`; returns the exit code."""
    redact = Redactor.from_environ(environ)
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcome.detail = redact(outcome.detail)
        outcomes.append(outcome)
        if as_json:
            out.write(json.dumps(dataclasses.asdict(outcome) | {"seconds": round(outcome.seconds, 3)}) + "\n")
        else:
            out.write(f"{outcome.status:<12}{outcome.name:<16}{outcome.seconds:6.2f} s  {outcome.detail}\n")
        out.flush()

    started = time.monotonic()
    try:
        settings = load_settings(environ, entry, check_train_args=_train_args_checker() if entry == "train" else None)
    except ConfigError as e:
        record(Outcome("configuration", PROBLEM, time.monotonic() - started, "; ".join(e.problems)))
        return _summary(outcomes, out, as_json)
    record(Outcome("configuration", OK, time.monotonic() - started, _describe(settings, entry)))
    checker = Checker(settings, environ)
    for name, step in checker.steps(entry):
        record(checker.run(name, step))
    return _summary(outcomes, out, as_json)


def _train_args_checker() -> Callable:
    from models import ultralytics_arg_problems

    return ultralytics_arg_problems


def _describe(settings: Settings, entry: str) -> str:
    if entry == "train":
        return f"JOB_ID={settings.job_id}, {settings.epochs} epochs of {settings.model_name} on {settings.dataset_uri}"
    if entry == "evaluate":
        return f"{settings.checkpoint_uri} on {settings.dataset_uri}"
    if entry == "export":
        return f"{settings.checkpoint_uri} to {', '.join(settings.export_formats)}"
    shard = (f", shard {settings.predict_shard} of {settings.predict_shards}" if settings.predict_shard is not None
             else "")
    return f"{settings.checkpoint_uri} on {settings.input_uri}{shard}"


def exit_code(outcomes: list[Outcome]) -> int:
    """2 for a problem (fix the configuration first), else 75 for something unreachable, else 1
    for a check that failed unexpectedly, else 0."""
    statuses = {o.status for o in outcomes}
    for status, code in ((PROBLEM, EXIT_BAD_INPUT), (UNREACHABLE, EXIT_TRANSIENT), (ERROR, EXIT_ERROR)):
        if status in statuses:
            return code
    return EXIT_OK


def _summary(outcomes: list[Outcome], out: TextIO, as_json: bool) -> int:
    code = exit_code(outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in (OK, WARN, SKIPPED, PROBLEM, UNREACHABLE, ERROR)}
    if as_json:
        out.write(json.dumps({"summary": {s: n for s, n in counts.items() if n}, "exit_code": code}) + "\n")
    else:
        out.write(f"check: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}; exit {code}\n")
    out.flush()
    return code


class Checker:
    """The checks after the configuration, each (status, what was found) or an exception:
    BadInput is a problem, TransientError unreachable. Storage requests get 2 tries of 10 s."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]):
        self.settings = settings
        self.environ = environ
        quick = dataclasses.replace(settings.storage, max_attempts=min(2, settings.storage.max_attempts),
                                    timeout=min(10.0, settings.storage.timeout))
        self.storage = Storage(quick)
        self.storage_down = False  # set when the bucket check found storage unreachable

    def steps(self, entry: str) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        if entry == "train":
            return [("work folder", self.work_folder), ("storage", self.bucket), ("dataset", self.dataset),
                    ("weights", self.weights), ("backend", self.backend), ("mlflow", self.mlflow), ("gpu", self.gpu)]
        middle = {"predict": [("input", self.input)], "evaluate": [("dataset", self.dataset)],
                  "export": [("dataset", self.dataset)] if self.settings.dataset_uri else []}[entry]
        return [("work folder", self.work_folder), ("storage", self.bucket), ("checkpoint", self.checkpoint),
                *middle, ("gpu", self.gpu)]

    def run(self, name: str, step: Callable[[], tuple[str, str]]) -> Outcome:
        started = time.monotonic()
        try:
            status, detail = step()
        except BadInput as e:
            status, detail = PROBLEM, str(e)
        except TransientError as e:
            status, detail = UNREACHABLE, str(e)
        except Exception as e:  # a check must not crash the report: say what happened
            status, detail = ERROR, f"{type(e).__name__}: {e}"
        return Outcome(name, status, time.monotonic() - started, detail)

    # -- the checks -------------------------------------------------------------------------------

    def work_folder(self) -> tuple[str, str]:
        folder = self.settings.work_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
                pass
        except OSError as e:
            raise BadInput(f"WORK_DIR {folder} is not writable: {e.strerror or e}") from None
        return OK, f"{folder} is writable, {human_size(shutil.disk_usage(folder).free)} free"

    def bucket(self) -> tuple[str, str]:
        storage = self.storage
        where = storage.uri(Location(storage.bucket, ""))
        kind = self.settings.storage.type + (f" at {self.settings.storage.endpoint}" if self.settings.storage.endpoint
                                             else "")
        try:
            storage.check_bucket()
        except StorageNotFound:  # only a local store says so: its bucket folder is missing
            return WARN, f"{where} does not exist yet ({kind}); uploads create it"
        except TransientError:
            self.storage_down = True
            raise
        return OK, f"{where} ({kind})"

    def dataset(self) -> tuple[str, str]:
        uri = self.settings.dataset_uri
        local = Path(uri).expanduser()
        if not uri.startswith("s3://") and local.exists():
            return OK, _local_description(local)
        if self.storage_down:
            return SKIPPED, "storage is unreachable"
        loc = self.storage.locate(uri)
        if uri.endswith("/"):
            if next(iter(self.storage.list(loc)), None) is None:
                raise StorageNotFound(f"dataset prefix {self.storage.uri(loc)} holds no objects")
            return OK, f"{self.storage.uri(loc)} (a prefix with objects)"
        if not archive_kind(loc.key):
            raise BadInput(f"dataset {self.storage.uri(loc)} must be a .zip, .tar, .tar.gz or .tgz archive, "
                           "or a prefix ending in /")
        info = self.storage.head(loc)
        if info is None:
            raise StorageNotFound(f"dataset {self.storage.uri(loc)} does not exist")
        if info.size > self.settings.dataset_max_bytes:
            raise BadInput(f"dataset {self.storage.uri(loc)} is {info.size} bytes, more than DATASET_MAX_BYTES="
                           f"{self.settings.dataset_max_bytes}")
        return OK, f"{self.storage.uri(loc)} ({human_size(info.size)})"

    def weights(self) -> tuple[str, str]:
        """MODEL_NAME as models.resolve_model reads it: a config name, a file or object, a pretrained name."""
        name = self.settings.model_name
        config_name = (name.endswith((".yaml", ".yml")) and not name.startswith("s3://") and "/" not in name
                       and not Path(name).expanduser().is_file())
        if config_name:
            return OK, _model_config(name, self.settings.work_dir)
        if name.endswith((".yaml", ".yml", ".pt")) or name.startswith("s3://"):
            return self._file(name, "MODEL_NAME")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise BadInput(f"MODEL_NAME={name!r} is not a model name, a .yaml config, or a .pt checkpoint")
        cached = self.settings.work_dir / "weights" / f"{name}.pt"
        loc = self.storage.locate(f"{self.settings.pretrained_prefix}{name}.pt")
        info = None if self.storage_down else self.storage.head(loc)
        if info is not None:
            return OK, f"pretrained {name}: {self.storage.uri(loc)} ({human_size(info.size)})"
        if cached.is_file():
            return OK, f"pretrained {name}: cached {cached} ({human_size(cached.stat().st_size)})"
        if self.storage_down:
            return SKIPPED, f"storage is unreachable, and {name}.pt is not cached in {cached.parent}"
        if self.settings.weights_download:
            return WARN, (f"{name}.pt is neither in {self.storage.uri(loc)} nor in {cached}: the job will try "
                          "Ultralytics' download from the internet (upload the weights to storage to avoid it)")
        raise BadInput(f"pretrained weights {name}.pt not found: not in {self.storage.uri(loc)}, not in {cached}, "
                       "and WEIGHTS_DOWNLOAD is off")

    def checkpoint(self) -> tuple[str, str]:
        return self._file(self.settings.checkpoint_uri, "CHECKPOINT_URI")

    def input(self) -> tuple[str, str]:
        """At least one image in INPUT_URI, found the way predict.py lists it (first image only:
        listing a large prefix whole is the job's work)."""
        from predict import list_inputs

        ref = self.settings.input_uri
        if self.storage_down and (ref.startswith("s3://") or not Path(ref).expanduser().exists()):
            return SKIPPED, "storage is unreachable"
        first = next(itertools.islice(list_inputs(self.storage, self.settings), 1), None)
        if first is None:
            raise BadInput(f"INPUT_URI={ref}: no images found")
        return OK, f"images found, the first {first.name}"

    def backend(self) -> tuple[str, str]:
        """GET {CALLBACK_URL}/health with the job's token, as the job's health poll does."""
        import requests

        s = self.settings.backend
        if not s.url:
            return SKIPPED, "CALLBACK_URL is unset: events are only logged"
        url = f"{s.url}/health"
        response = _get(url, headers={"X-Internal-Auth": s.token} if s.token else {},
                        timeout=(s.connect_timeout, s.timeout), verify=s.verify)
        code = response.status_code
        if code == 404:
            return WARN, (f"{url} answered 404: the backend has no health route (the job cannot be cancelled "
                          "from it), or CALLBACK_URL is wrong")
        if code in (401, 403):
            raise BadInput(f"{url} answered {code}: the backend refuses INTERNAL_AUTH_TOKEN")
        if code in (408, 425, 429) or code >= 500:
            raise TransientError(f"{url} answered {code}")
        if not response.ok:
            raise BadInput(f"{url} answered {code}")
        try:
            job_status = response.json().get("job_status")
        except (ValueError, AttributeError, requests.RequestException):
            return WARN, f"{url} answered {code} without a JSON job_status"
        if job_status == "cancelled":
            return WARN, f"{url}: job_status cancelled (a job started now stops at once)"
        return OK, f"{url}: job_status {job_status}"

    def mlflow(self) -> tuple[str, str]:
        """An HTTP tracking server: its REST API, with the credentials the job would send."""
        uri = self.settings.mlflow_tracking_uri
        if not uri.startswith(("http://", "https://")):
            return SKIPPED, f"MLFLOW_TRACKING_URI is a database ({uri.split(':', 1)[0]}): nothing to reach"
        base = uri.rstrip("/")
        experiment = self.settings.mlflow_experiment
        response = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment},
                        headers=_mlflow_auth(self.environ), timeout=(5, 15), verify=self.settings.storage.verify)
        code = response.status_code
        if code == 200:
            found = response.json().get("experiment", {})
            return OK, f"{base}: experiment {experiment!r} exists (id {found.get('experiment_id')})"
        if code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text:
            return OK, f"{base}: reachable; experiment {experiment!r} will be created"
        if code in (401, 403):
            raise BadInput(f"{base} answered {code}: set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
        if code in (408, 425, 429) or code >= 500:
            raise TransientError(f"{base} answered {code}")
        raise BadInput(f"{base} answered {code} to MLflow's REST API: is MLFLOW_TRACKING_URI an MLflow server?")

    def gpu(self) -> tuple[str, str]:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        seen = "; ".join(f"{i}: {p.name} ({p.total_memory / 2**30:.0f} GiB)"
                         for i, p in ((i, torch.cuda.get_device_properties(i)) for i in range(count)))
        seen = f"{count} GPU(s) seen" + (f": {seen}" if seen else "")
        device = self.settings.device
        if device is None:
            return OK, f"{seen}; DEVICE unset: the job uses " + ("GPU 0" if count else "the CPU")
        if device == "cpu":
            return OK, f"{seen}; DEVICE=cpu"
        if device == "mps":
            if not torch.backends.mps.is_available():
                raise BadInput("DEVICE=mps but Apple's MPS is not available here")
            return OK, "DEVICE=mps: available"
        wanted = [int(i) for i in device.replace("cuda:", "").split(",")]
        missing = [i for i in wanted if i >= count]
        if missing:
            raise BadInput(f"DEVICE={device} but {seen} (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return OK, f"{seen}; DEVICE={device}"

    # -- helpers ----------------------------------------------------------------------------------

    def _file(self, ref: str, variable: str) -> tuple[str, str]:
        """A local file, else a storage object (as storage.fetch_file looks for it)."""
        local = Path(ref).expanduser()
        if not ref.startswith("s3://") and local.is_file():
            return OK, _local_description(local)
        if self.storage_down:
            return SKIPPED, "storage is unreachable"
        loc = self.storage.locate(ref)
        info = self.storage.head(loc)
        if info is None:
            raise StorageNotFound(f"{variable}={ref}: no local file and no storage object {self.storage.uri(loc)}")
        return OK, f"{self.storage.uri(loc)} ({human_size(info.size)})"


def _local_description(path: Path) -> str:
    if path.is_dir():
        return f"local folder {path.resolve()}"
    return f"local file {path.resolve()} ({human_size(path.stat().st_size)})"


def _model_config(name: str, work_dir: Path) -> str:
    """An Ultralytics model config name (yolo11n.yaml): one Ultralytics ships."""
    from models import prepare_ultralytics

    with contextlib.redirect_stdout(sys.stderr):  # what Ultralytics prints on first import stays out of the report
        prepare_ultralytics(work_dir)
    from ultralytics.nn.tasks import yaml_model_load

    try:
        config = yaml_model_load(name)
    except Exception as e:
        raise BadInput(f"MODEL_NAME={name} is not a model config Ultralytics knows ({e})") from None
    return f"{name}: Ultralytics' model config (scale {config.get('scale') or '-'}), trained from scratch"


def _mlflow_auth(environ: Mapping[str, str]) -> dict:
    """The headers MLflow's client would send for these standard variables."""
    import base64

    token = environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _get(url: str, **kwargs):
    """requests.get, with a connection that fails as TransientError, or BadInput for an untrusted
    TLS certificate (TLS_CA_BUNDLE fixes that; retrying does not)."""
    import requests

    try:
        return requests.get(url, **kwargs)
    except requests.exceptions.SSLError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            raise BadInput(f"the TLS certificate of {url} is not trusted (set TLS_CA_BUNDLE to its CA)") from None
        raise TransientError(f"TLS handshake with {url} failed: {e}") from None
    except requests.RequestException as e:
        raise TransientError(f"{url} is unreachable ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    """The useful end of a requests error: 'Connection refused', 'timed out'..."""
    import requests

    if isinstance(error, requests.Timeout):
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return found.group(1).strip() if found else type(error).__name__
