"""The job's MLflow run. The trainer owns it (Ultralytics' own MLflow callback is switched off):
one run per job, found again by its `job_id` tag when the job starts again, with the training
arguments as parameters, every epoch's numbers at step = epoch, and the outputs as artifacts.

MLflow is imported and the run looked up on a helper thread while the dataset downloads
(`prepare`); parameters and numbers go to the server from one background thread, in order, so
the training thread never waits on it; ending the run first waits (bounded) for what is queued.
Any tracking failure logs one warning and switches tracking off; the run is still ended.
Environment (through Settings): MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TLS_CA_BUNDLE,
TLS_VERIFY; MLflow's own MLFLOW_* variables keep their meaning (its HTTP retries and timeout are
lowered unless set).
Imports: utils, config.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from pathlib import Path

from config import Settings
from utils import Redactor

LOGGER = logging.getLogger("trainer")

MLFLOW_NAME = re.compile(r"[\w\-. :/]+")  # the characters MLflow accepts in a metric name


class Tracker:
    """The job's MLflow run: one per job, found again by its `job_id` tag when the job restarts.

    Any tracking failure logs one warning and switches tracking off; it never fails training.
    The run id is kept after that, so the run is still ended (FINISHED, FAILED, KILLED) rather
    than left RUNNING forever.
    """

    END_TIMEOUT = 10.0  # seconds to wait for ending the run once tracking has failed

    def __init__(self, settings: Settings, redact: Redactor):
        self.settings = settings
        self.redact = redact
        self._client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False  # the run exists and tracking has not failed
        self._params: set[str] = set()
        self._preparing: threading.Thread | None = None  # the lookup `prepare` started
        self._prepared = None  # what it found, or the error it met
        self._init_queue()

    def _init_queue(self) -> None:
        self._jobs: collections.deque = collections.deque()  # (action, call): MLflow calls not made yet
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict:
        # a DDP worker makes its own client (and queue) for the same run
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_client", "_jobs", "_cond", "_worker", "_preparing", "_prepared")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _client=None, _preparing=None, _prepared=None)
        self._init_queue()

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.settings.mlflow_tracking_uri)
        return self._client

    def prepare(self) -> None:
        """Import MLflow and look up the job's experiment and run on a helper thread, while the job
        downloads its dataset (network waits, mostly outside the GIL): importing MLflow alone takes
        about 2 s. `start` then only makes or continues the run. Nothing is created for a job that
        fails before it starts (a bad dataset), apart from the experiment."""
        self._configure()
        self._preparing = threading.Thread(target=self._prepare, name="mlflow-prepare", daemon=True)
        self._preparing.start()

    def _configure(self) -> None:
        # MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) would stall a job for
        # minutes on a dead server.
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

    def _prepare(self) -> None:
        """The experiment (made if new) and the job's run if it has one: (experiment id, run or None)."""
        try:
            s = self.settings
            experiment = self.client.get_experiment_by_name(s.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(s.mlflow_experiment, artifact_location(s)))
            runs = self.client.search_runs([experiment_id], f"tags.job_id = '{s.job_id}'", max_results=1,
                                           order_by=["attributes.start_time DESC"])
            self._prepared = (experiment_id, runs[0] if runs else None)
        except Exception as e:
            self._prepared = e

    def start(self) -> None:
        """Make the job's run, or continue the one a previous start of the job made."""
        if self._preparing is None:
            self._configure()
            self._prepare()
        else:
            self._preparing.join()
            self._preparing = None
        prepared, self._prepared = self._prepared or RuntimeError("the lookup ended without an answer"), None
        try:
            if isinstance(prepared, Exception):
                raise prepared
            s = self.settings
            self.experiment_id, found = prepared
            if found:
                self.run_id = found.info.run_id
                self._params = set(found.data.params)
                self.client.update_run(self.run_id, status="RUNNING")
                LOGGER.info("MLflow: continuing run %s of job %s", self.run_id, s.job_id)
            else:
                run = self.client.create_run(self.experiment_id, run_name=f"job-{s.job_id}",
                                             tags={"job_id": s.job_id, "project_id": s.project_id})
                self.run_id = run.info.run_id
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
        from mlflow.entities import Param

        new = [Param(k, self.redact(v)[:6000]) for k, v in sorted(params.items()) if k not in self._params]
        self._params.update(p.key for p in new)
        for i in range(0, len(new), 100):
            self._later("log parameters", self.client.log_batch, self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log numbers at this step; names MLflow refuses (the UI's `mAP@0.5`, `precision(M)`) are left out:
        the same numbers are there under the contract's names."""
        if not self.active:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(k, v, stamp, step) for k, v in metrics.items() if MLFLOW_NAME.fullmatch(k)]
        self._later("log metrics", self.client.log_batch, self.run_id, metrics=points)

    def _later(self, action: str, call, *args, **kwargs) -> None:
        """Make an MLflow call on the tracker's background thread, after those queued before it."""
        with self._cond:
            self._jobs.append((action, lambda: call(*args, **kwargs)))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs)
                action, call = self._jobs[0]
            if self.active:  # after a failure, what is queued is dropped (tracking is off)
                try:
                    call()
                except Exception as e:
                    self._off(action, e)
            with self._cond:
                self._jobs.popleft()
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call was made (or dropped); False if the timeout came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs, timeout)

    def log_artifacts(self, files: list[Path], artifact_path: str | None = None) -> None:
        for f in files:
            if not self.active:
                return
            try:
                self.client.log_artifact(self.run_id, str(f), artifact_path)
            except Exception as e:
                self._off(f"upload {f.name}", e)

    def finish(self, status: str) -> None:
        """End the run with FINISHED, FAILED or KILLED, also after a failure switched tracking off
        (waiting at most END_TIMEOUT then: the server may be the thing that failed)."""
        if not self.run_id:
            return
        wait = self.END_TIMEOUT if status == "FINISHED" else self.END_TIMEOUT / 5  # a stopped job has seconds
        if self.active and not self.flush(wait):
            LOGGER.warning("MLflow: numbers still queued after %g s are not logged", wait)
        if self.active:
            self._end(status)
            return
        worker = threading.Thread(target=self._end, args=(status,), name="mlflow-end", daemon=True)
        worker.start()
        worker.join(self.END_TIMEOUT)

    def _end(self, status: str) -> None:
        was_active = self.active
        try:
            self.client.set_terminated(self.run_id, status=status)
            self.active = False
        except Exception as e:
            if was_active:
                self._off("end the run", e)
            else:
                LOGGER.warning("MLflow: could not mark run %s %s either (%s)", self.run_id, status,
                               self.redact(f"{type(e).__name__}: {e}")[:500])

    def _off(self, action: str, error: Exception) -> None:
        """Stop tracking (the run id stays, to end the run)."""
        LOGGER.warning("MLflow: failed to %s (%s); tracking is off for the rest of this job", action,
                       self.redact(f"{type(error).__name__}: {error}")[:500])
        self.active = False


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts: WORK_DIR/mlartifacts when the tracking URI is a
    database the trainer writes to directly (MLflow's default there is ./mlruns in the working
    directory, which is not writable in the image and not the job's folder); None lets a tracking
    server decide."""
    scheme = settings.mlflow_tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        return (settings.work_dir / "mlartifacts").as_uri()
    return None
