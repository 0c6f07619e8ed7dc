"""The job's MLflow run. The trainer owns it (Ultralytics' own MLflow callback is switched off):
one run per job, found again by its `job_id` tag when the job starts again, with the training
arguments as parameters, every epoch's numbers at step = epoch, and the outputs as artifacts.

MLflow runs in a helper process (mlflow_worker.py), started as the job begins (`prepare`): it
imports MLflow and looks up the run on another core while the dataset downloads; parameters and
numbers are queued to it and made in order, so the training thread never waits on the server;
ending the run first waits (bounded) for what is queued. A trainer killed outright leaves no run
RUNNING: the helper sees its pipe close and ends the run KILLED. Any tracking failure logs one
warning and switches tracking off; the run is still ended. The trained model is logged and
registered by a second helper process, started once the run exists (`warm_model_logging`: it
imports torch and Ultralytics at the lowest CPU priority) and asked after training (`log_model`,
`register_model`, for registry.py): the trainer's own process never imports MLflow.
Environment (through Settings): MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TLS_CA_BUNDLE,
TLS_VERIFY; MLflow's own MLFLOW_* variables keep their meaning (its HTTP retries and timeout are
lowered unless set).
Imports: utils, config.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from config import Settings
from utils import Redactor

LOGGER = logging.getLogger("trainer")

MLFLOW_NAME = re.compile(r"[\w\-. :/]+")  # the characters MLflow accepts in a metric name
_STARTING = threading.Lock()


class Tracker:
    """The job's MLflow run: one per job, found again by its `job_id` tag when the job restarts.

    The MLflow calls are made by a helper process (mlflow_worker.py), in order: the trainer's
    threads only queue them, except where an answer is needed (the run's ids, artifacts, the end).
    Any tracking failure logs one warning and switches tracking off; it never fails training.
    The run id is kept after that, so the run is still ended (FINISHED, FAILED, KILLED) rather
    than left RUNNING forever.
    """

    END_TIMEOUT = 10.0  # seconds to wait for the queued calls, and for ending the run
    LOG_MODEL_TIMEOUT = 900.0  # seconds logging the model, or registering it, may take (best.pt goes up too)
    ARTIFACTS_TIMEOUT = 900.0  # seconds the job waits, once completed, for the run's files (checkpoints too)

    def __init__(self, settings: Settings, redact: Redactor):
        self.settings = settings
        self.redact = redact
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False  # the run exists and tracking has not failed
        self._params: set[str] = set()
        self._worker: _WorkerProcess | None = None
        self._model_worker: _WorkerProcess | None = None  # a second helper, for logging the trained model

    def __getstate__(self) -> dict:  # a DDP worker starts its own helper process for the same run
        return {k: v for k, v in self.__dict__.items() if k not in ("_worker", "_model_worker")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _worker=None, _model_worker=None)

    def prepare(self) -> None:
        """Start the helper process now: it imports MLflow (about 2 s) and looks up the job's
        experiment and run on another core while the job downloads its dataset and imports torch.
        `start` then only makes or continues the run. Nothing is created for a job that fails before
        it starts (a bad dataset), apart from the experiment."""
        self._send(self._lookup_request("prepare"))

    def _lookup_request(self, op: str) -> dict:
        s = self.settings
        return {"op": op, "experiment": s.mlflow_experiment, "artifact_location": artifact_location(s),
                "job_id": s.job_id, "project_id": s.project_id}

    def _send(self, request: dict, answer: bool = False) -> Future | None:
        with _STARTING:  # one helper per process, whichever thread calls first (a DDP worker's)
            if self._worker is None:
                self._configure()
                try:
                    self._worker = _WorkerProcess(self.settings.mlflow_tracking_uri, self.redact, self._off)
                except Exception as e:  # tracking never fails training
                    error = WorkerError(f"cannot start MLflow's helper process: {type(e).__name__}: {e}")
                    if not answer:
                        self._off(request.get("action", request["op"]), error)
                        return None
                    future: Future = Future()
                    future.set_exception(error)
                    return future
        return self._worker.send(request, answer)

    def _ask(self, request: dict, timeout: float | None = None):
        """Send a request and wait for its answer (raises the helper's error, or TimeoutError)."""
        return self._send(request, answer=True).result(timeout)

    def _configure(self) -> None:
        # MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) would stall a job for
        # minutes on a dead server. The helper process inherits the environment.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # MLflow 3 reports usage to config.mlflow-telemetry.io once a run is created: a job reaches no outside host.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        verify = self.settings.storage.verify  # TLS_VERIFY / TLS_CA_BUNDLE apply to MLflow too
        if verify is False:
            os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", "true")
        elif isinstance(verify, str):
            os.environ.setdefault("MLFLOW_TRACKING_SERVER_CERT_PATH", verify)

    def start(self, continue_run: bool = True) -> None:
        """Continue the run an earlier start of the job made (a resumed training), or make the job's
        run: its first, or with `continue_run` False (a new training of the job) one of its own."""
        s = self.settings
        try:
            run = self._ask({**self._lookup_request("start"), "continue": continue_run})
            self.run_id, self.experiment_id = run["run_id"], run["experiment_id"]
            self._params = set(run["params"])
            if run["continued"]:
                LOGGER.info("MLflow: continuing run %s of job %s", self.run_id, s.job_id)
            elif run.get("earlier"):
                LOGGER.info("MLflow: a new training of job %s, in a new run %s (the earlier run %s stays as it was)",
                            s.job_id, self.run_id, run["earlier"])
            else:
                LOGGER.info("MLflow: run %s in experiment %r at %s", self.run_id, s.mlflow_experiment,
                            self.redact(s.mlflow_tracking_uri))
            self.active = True
        except Exception as e:
            self._off("start", e)

    def status_fields(self) -> dict:
        """The MLflow ids every status carries once the run exists (the UI links to the run)."""
        if not self.run_id:
            return {}
        return {"mlflow_experiment_id": str(self.experiment_id), "mlflow_run_id": str(self.run_id)}

    @property
    def url(self) -> str | None:
        uri = self.settings.mlflow_tracking_uri
        if not self.run_id or not uri.startswith(("http://", "https://")):
            return None
        return f"{self.redact(uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: dict) -> None:
        """Log parameters not logged before (MLflow refuses to change a logged value)."""
        if not self.active:
            return
        new = [(k, self.redact(v)[:6000]) for k, v in sorted(params.items()) if k not in self._params]
        self._params.update(k for k, _ in new)
        for i in range(0, len(new), 100):
            self._send({"op": "log", "action": "log parameters", "run_id": self.run_id, "params": new[i:i + 100]})

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log numbers at this step; names MLflow refuses (the UI's `mAP@0.5`, `precision(M)`) are left out:
        the same numbers are there under the contract's names."""
        if not self.active:
            return
        stamp = int(time.time() * 1000)
        points = [(k, float(v), stamp, int(step)) for k, v in metrics.items() if MLFLOW_NAME.fullmatch(k)]
        self._send({"op": "log", "action": "log metrics", "run_id": self.run_id, "metrics": points})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call was made (or dropped); False if the timeout came first."""
        if self._worker is None:
            return True
        try:
            self._ask({"op": "flush"}, timeout)
            return True
        except TimeoutError:
            return False
        except Exception:  # the helper is gone: nothing is queued any more
            return True

    def log_artifacts(self, files: list[Path], artifact_path: str | None = None) -> None:
        for f in files:
            if not self.active:
                return
            try:
                self._ask({"op": "artifact", "run_id": self.run_id, "path": str(f), "artifact_path": artifact_path})
            except Exception as e:
                self._off(f"upload {f.name}", e)

    # -- the trained model, in a second helper process -------------------------------------------
    # Logging the model loads torch there (about 520 MB once warm): a helper of its own, so that a
    # crash or an out-of-memory kill of it costs the model only, never the run's numbers and end.

    def warm_model_logging(self) -> None:
        """Start the model's helper now: it imports what logging the model needs (torch, Ultralytics,
        MLflow's pyfunc) at the lowest CPU priority while training is set up and runs (mlflow_worker.Worker.warm)."""
        if self.active:
            LOGGER.info("MLflow: the model's helper gets ready to log the model (at the lowest CPU priority)")
            self._model_send({"op": "warm"})

    def log_model(self, model: dict, should_stop: Callable[[], bool]) -> str:
        """Log a pyfunc model into the run, in the model's helper (the trainer's process never imports
        MLflow); `model` as mlflow_worker's `log_model` takes it. Returns its model URI; raises
        WorkerError, TimeoutError after LOG_MODEL_TIMEOUT, or Stopped once `should_stop()` (the
        helper is then stopped: nothing it would still write can outlast the job)."""
        return self._model_wait({"op": "log_model", "run_id": self.run_id, "model": model}, should_stop)

    def register_model(self, model_uri: str, name: str, tags: dict, should_stop: Callable[[], bool]) -> str:
        """A new version of `name` in the Model Registry (the model created if new); returns the version."""
        return self._model_wait({"op": "register", "model_uri": model_uri, "name": name, "tags": tags}, should_stop)

    def _model_send(self, request: dict, answer: bool = False) -> Future | None:
        with _STARTING:
            if self._model_worker is None:
                try:
                    self._model_worker = _WorkerProcess(self.settings.mlflow_tracking_uri, self.redact,
                                                        lambda action, error: None)  # sends no "off"
                except Exception as e:
                    if not answer:
                        LOGGER.warning("MLflow: cannot start the model's helper process (%s: %s)", type(e).__name__, e)
                        return None
                    future: Future = Future()
                    future.set_exception(WorkerError(f"cannot start MLflow's helper process: {type(e).__name__}: {e}"))
                    return future
        return self._model_worker.send(request, answer)

    def _model_wait(self, request: dict, should_stop: Callable[[], bool]):
        future = self._model_send(request, answer=True)
        deadline = time.monotonic() + self.LOG_MODEL_TIMEOUT
        while True:
            try:
                return future.result(min(1.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if should_stop() or time.monotonic() >= deadline:
                    self._stop_model_worker()
                    if should_stop():
                        raise Stopped("the job is stopping") from None
                    raise TimeoutError(f"no answer in {self.LOG_MODEL_TIMEOUT:g} s") from None

    def _stop_model_worker(self) -> None:
        if self._model_worker is not None:
            self._model_worker.close(run_made=False)  # killed: what it was still doing is abandoned

    def finish(self, status: str) -> None:
        """End the run with FINISHED, FAILED or KILLED, also after a failure switched tracking off
        (waiting at most END_TIMEOUT then: the server may be the thing that failed)."""
        try:
            if not self.run_id:
                return
            wait = self.END_TIMEOUT if status == "FINISHED" else self.END_TIMEOUT / 5  # a stopped job has seconds
            if self.active and not self.flush(wait):
                LOGGER.warning("MLflow: numbers still queued after %g s are not logged", wait)
            was_active, self.active = self.active, False
            try:
                self._ask({"op": "end", "run_id": self.run_id, "status": status}, self.END_TIMEOUT)
            except Exception as e:
                if was_active:
                    self._off("end the run", e)
                else:
                    LOGGER.warning("MLflow: could not mark run %s %s either (%s)", self.run_id, status,
                                   self.redact(_describe(e))[:500])
        finally:
            self._stop_model_worker()  # its work is done or abandoned by now (a warm-up of a job that failed)
            if self._worker is not None:
                self._worker.close(run_made=self.run_id is not None)

    def _off(self, action: str, error: Exception) -> None:
        """Stop tracking (the run id stays, to end the run)."""
        LOGGER.warning("MLflow: failed to %s (%s); tracking is off for the rest of this job", action,
                       self.redact(_describe(error))[:500])
        self.active = False


class WorkerError(Exception):
    """An MLflow call failed in the helper process (its message names the original error)."""


class Stopped(Exception):
    """The job stopped while waiting for the helper's answer."""


def _describe(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) if isinstance(error, WorkerError) else f"{type(error).__name__}: {error}"


class _WorkerProcess:
    """The helper process (mlflow_worker.py) and its pipes: requests written as JSON lines, answers
    read on a thread and handed to the futures waiting for them, its stderr logged (redacted)."""

    def __init__(self, uri: str, redact: Redactor, off: Callable[[str, Exception], None]):
        self.redact, self.off = redact, off
        self.lock = threading.Lock()
        self.waiting: dict[int, Future] = {}
        self.ids = itertools.count(1)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mlflow_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace")
        threading.Thread(target=self._read_answers, name="mlflow-answers", daemon=True).start()
        threading.Thread(target=self._read_stderr, name="mlflow-stderr", daemon=True).start()
        self.send({"op": "init", "uri": uri})

    def send(self, request: dict, answer: bool = False) -> Future | None:
        future = Future() if answer else None
        with self.lock:
            if future is not None:
                request = {**request, "id": next(self.ids)}
                self.waiting[request["id"]] = future
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # the helper is gone (or closed)
                error = WorkerError(f"the MLflow helper process is not running ({type(e).__name__})")
                if future is None:
                    self.off(request.get("action", request["op"]), error)
                else:
                    self.waiting.pop(request["id"], None)
                    future.set_exception(error)
        return future

    def _read_answers(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "off" in message:
                self.off(message["off"], WorkerError(message["error"]))
                continue
            with self.lock:
                future = self.waiting.pop(message.get("id"), None)
            if future is not None:
                if "error" in message:
                    future.set_exception(WorkerError(message["error"]))
                else:
                    future.set_result(message["ok"])
        code = self.proc.wait()
        with self.lock:
            waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            future.set_exception(WorkerError(f"the MLflow helper process ended (exit code {code})"))

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            if line.strip():
                LOGGER.info("MLflow: %s", self.redact(line.rstrip()))

    def close(self, run_made: bool, wait: float = 2.0) -> None:
        """No more requests. Without a run (a job that failed first) the helper is stopped: what it
        would still look up is of no use. Otherwise it finishes what it has and exits, waited for
        `wait` seconds (it ends by itself, within mlflow_worker.END_WAIT and a call, if it is stuck)."""
        if not run_made:
            self.proc.kill()
        with self.lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts: WORK_DIR/mlartifacts when the tracking URI is a
    database the trainer writes to directly (MLflow's default there is ./mlruns in the working
    directory, which is not writable in the image and not the job's folder); None lets a tracking
    server decide."""
    scheme = settings.mlflow_tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        return (settings.work_dir / "mlartifacts").as_uri()
    return None
