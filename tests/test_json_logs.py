"""LOG_FORMAT=json: every line on stderr is one JSON object with time, level, logger, job_id and
message (and epoch where there is one), whatever wrote it; secrets stay masked."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import uuid

from jsonlog import JsonFormatter
from tests.conftest import AUTH_TOKEN, FAST_TRAINING, ROOT, SECRETS, Receiver, run_entry, storage_env
from utils import Redactor, _RedactingFilter

FIELDS = {"time", "level", "logger", "job_id", "message"}


def parse_every_line(text: str) -> list[dict]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"stderr line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and FIELDS <= set(entry), entry
        entries.append(entry)
    return entries


def test_formatter_writes_the_fields_the_epoch_and_the_exception_with_secrets_masked():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("j-7"))
    handler.addFilter(_RedactingFilter(Redactor(["s3cr3t-value"])))
    logger = logging.getLogger("trainer.json-test")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("\x1b[34m\x1b[1mtrain: \x1b[0mepoch done", extra={"epoch": 3})
        try:
            raise ValueError("token s3cr3t-value refused")
        except ValueError:
            logger.exception("upload failed with s3cr3t-value")
    finally:
        logger.removeHandler(handler)
    first, second = parse_every_line(out.getvalue())
    assert first["message"] == "train: epoch done" and first["epoch"] == 3  # colours stripped
    assert (first["level"], first["logger"], first["job_id"]) == ("INFO", "trainer.json-test", "j-7")
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "ERROR" and second["message"] == "upload failed with ***" and "epoch" not in second
    assert second["exception"].startswith("Traceback") and "ValueError: token *** refused" in second["exception"]
    assert "s3cr3t-value" not in out.getvalue()


CAPTURED = """
import logging, os, sys, threading, warnings
sys.path.insert(0, {root!r})
from utils import Redactor, setup_logging
setup_logging({{"LOG_FORMAT": "json", "JOB_ID": "j-9"}}, Redactor(["hunter2-secret"]), capture_stdout=True)
logging.getLogger("trainer").info("hello %s", "hunter2-secret", extra={{"epoch": 2}})
print("a print to stdout")
sys.stderr.write("a raw line on stderr\\n")
os.write(2, b"written by C code\\n")
os.write(1, b"scan \\r\\x1b[K 50% \\r\\x1b[K 100% done\\n")  # a progress bar's frames, then its end
warnings.warn("careful")
thread = threading.Thread(target=lambda: 1 / 0)
thread.start(); thread.join()
os.system("echo from a child process hunter2-secret >&2")
"""


def test_everything_the_process_writes_becomes_json_lines(tmp_path):
    result = subprocess.run([sys.executable, "-c", CAPTURED.format(root=str(ROOT))], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # train.py's stdout is captured too
    entries = parse_every_line(result.stderr)
    by_message = {e["message"]: e for e in entries}
    assert by_message["hello ***"]["epoch"] == 2 and by_message["hello ***"]["job_id"] == "j-9"
    assert by_message["a print to stdout"]["logger"] == "stdout"
    assert by_message["a raw line on stderr"]["logger"] == "stderr"
    assert by_message["written by C code"]["logger"] == "stderr"
    assert "100% done" in by_message  # only the bar's last frame
    assert not any("50%" in m for m in by_message)
    warning = next(e for e in entries if e["logger"] == "py.warnings")
    assert warning["level"] == "WARNING" and "careful" in warning["message"]
    (traceback,) = [e for e in entries if e["level"] == "ERROR"]  # a raw traceback is one record
    assert traceback["message"].startswith("Exception in thread") and "\nTraceback (most recent call last):\n" in \
        traceback["message"] and traceback["message"].endswith("\nZeroDivisionError: division by zero")
    assert by_message["from a child process ***"]["logger"] == "stderr"
    assert "hunter2-secret" not in result.stderr


def test_a_training_job_in_json_mode_writes_only_json_lines_to_stderr(s3_server, s3, dataset_zip, tmp_path):
    bucket = f"json-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(dataset_zip("detect")), bucket, "datasets/ds.zip")
    receiver = Receiver(tmp_path)
    job_id = f"json{uuid.uuid4().hex[:6]}"
    env = {**storage_env(s3_server, bucket), **FAST_TRAINING, "EPOCHS": "2", "TRAIN_ARGS": '{"plots": false}',
           "JOB_ID": job_id, "DATASET_ID": "ds", "MODEL_NAME": "yolo11n.yaml", "LOG_FORMAT": "json",
           "CALLBACK_URL": receiver.url(job_id), "INTERNAL_AUTH_TOKEN": AUTH_TOKEN, "WORK_DIR": str(tmp_path / "w"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    try:
        result = run_entry("train.py", env, cwd=tmp_path, timeout=600)
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""  # Ultralytics' bars and prints went to stderr as JSON lines
    entries = parse_every_line(result.stderr)
    assert {e["job_id"] for e in entries} == {job_id}
    loggers = {e["logger"] for e in entries}
    assert {"trainer", "ultralytics", "stdout"} <= loggers  # the trainer's, Ultralytics' and its progress bars
    summaries = [e for e in entries if e["message"].startswith("epoch ") and e["logger"] == "trainer"]
    assert [(e["epoch"], e["message"].split(" | ")[0]) for e in summaries] == [(1, "epoch 1/2"), (2, "epoch 2/2")]
    assert all(" | train loss box " in e["message"] and " | mAP@0.5 " in e["message"] and ", ETA " in e["message"]
               for e in summaries)
    assert any("configuration: {" in e["message"] for e in entries)
    assert not any(secret in result.stderr for secret in SECRETS)
    assert receiver.bodies("status")[-1]["status"] == "completed"


def test_json_mode_never_draws_a_terminal_bar(monkeypatch):
    import progress

    monkeypatch.setattr(progress.sys, "stderr", type("Tty", (), {"isatty": lambda self: True})())
    assert progress.on_terminal()
    handler = logging.NullHandler()
    handler.json_lines = True  # what jsonlog.json_handler marks its handler with
    logging.getLogger().addHandler(handler)
    try:
        assert not progress.on_terminal()
    finally:
        logging.getLogger().removeHandler(handler)


def test_exit_now_keeps_the_code_and_every_line_and_does_not_wait_for_idle_thread_pools():
    """The entry points end with utils.exit_now (no interpreter teardown). With JSON logs the process's
    own stdout and stderr are pipes drained by threads; an idle thread pool nobody shut down (MLflow
    leaves one) must not hold the exit for exit_now's 30 s bound."""
    code = (
        "import logging, os, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from utils import Redactor, exit_now, setup_logging\n"
        "setup_logging(os.environ, Redactor([]), capture_stdout=True)\n"
        "pool = ThreadPoolExecutor(2)\n"
        "pool.submit(lambda: 1).result()\n"  # kept, never shut down: its idle worker is a non-daemon thread
        "logging.getLogger('trainer').warning('last record')\n"
        "print('printed last', end='')\n"  # no newline, not flushed: exit_now must get it out
        "exit_now(7)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20,
                            env={"PATH": "/usr/bin:/bin", "LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 7, result.stderr
    messages = [e["message"] for e in parse_every_line(result.stderr)]
    assert messages[-2:] == ["last record", "printed last"], messages


ULTRALYTICS_LINES = """
import logging, os, sys
from models import prepare_ultralytics
from utils import Redactor, setup_logging
setup_logging(os.environ, Redactor([]))
prepare_ultralytics(__import__("pathlib").Path(sys.argv[1]))
from ultralytics.utils import LOGGER
LOGGER.info("an info line of Ultralytics")
LOGGER.warning("\\x1b[34m\\x1b[1ma coloured warning\\x1b[0m of Ultralytics")
"""


def test_log_level_governs_ultralytics_and_text_logs_carry_no_colour_codes(tmp_path):
    """LOG_LEVEL=WARNING left Ultralytics' 50-odd INFO lines of a short job (its logger keeps its own
    level), and text logs to a file or a pod's log carried its terminal colour codes."""
    env = {"PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path), "LOG_LEVEL": "WARNING",
           "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", ULTRALYTICS_LINES, str(tmp_path / "work")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "an info line" not in done.stderr
    assert "WARNING ultralytics: a coloured warning of Ultralytics" in done.stderr and "\x1b" not in done.stderr
