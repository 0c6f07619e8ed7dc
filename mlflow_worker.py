"""The MLflow worker: a helper process that makes the trainer's MLflow calls, in order, in its own
interpreter. `tracking.Tracker` starts it as the job begins and talks to it over pipes.

Why a process: importing MLflow is 2-3 s of Python, and its calls are Python too. In the trainer's
process they compete with Ultralytics for the GIL and delay the first training batch (measured:
side by side on threads both imports end later than one after the other); here they run on
another core while the trainer imports torch and downloads its dataset.

Protocol: one JSON object per line. The trainer writes requests to stdin:
    {"op": "init", "uri": ...}                                   the tracking URI (never on the command line)
    {"op": "prepare", "experiment", "artifact_location", "job_id"}   look up the experiment and the job's run
    {"op": "start", "id", "experiment", "artifact_location", "job_id", "project_id", "continue"}
                                                                 continue the job's run (a resumed training), or make one
    {"op": "log", "run_id", "action", "params": [[k, v]], "metrics": [[k, v, ms, step]]}
    {"op": "artifact", "id", "run_id", "path", "artifact_path"}
    {"op": "flush", "id"}                                        answered once everything before it is done
    {"op": "end", "id", "run_id", "status"}                      made at once: what is still queued is dropped
    {"op": "warm"}                                               get ready to log the model (below)
    {"op": "log_model", "id", "run_id", "model": {...}}          log a pyfunc model; answers its model URI
    {"op": "register", "id", "model_uri", "name", "tags"}        a new registered version; answers its number
and reads answers on stdout: {"id", "ok": result} or {"id", "error": "Type: message"}, and
{"off": action, "error": ...} when a call without an answer failed (tracking is then off: later
calls are dropped). Everything MLflow prints goes to stderr, which the trainer logs.

A second instance of this process logs the trained model (tracking.Tracker.log_model), so that the
trainer's process never imports MLflow (2 s of Python, then 1.4 s mapping the installed packages
for the model's requirements, which shared the interpreter lock with the final validation and
uploads). `log_model` loads the model and runs the input example, so it needs torch and
Ultralytics: `warm`, sent once the job's run exists, imports them and builds that map on a thread at the
lowest CPU priority (it takes what the training leaves idle), and `log_model` waits for it (or,
without `warm`, makes the same imports at normal priority). A process of its own, because torch
makes it about 520 MB: a crash or an out-of-memory kill of it costs the model, never the run's
numbers and end. This process sees no GPU (CUDA_VISIBLE_DEVICES is emptied when it starts): the
input example runs on the CPU. `log_model`, `register` and `end` run beside the queue, not in it.

Requests are read as they come and queued, so the trainer never waits on a slow server. When stdin
closes (the trainer exited) the queue is given END_WAIT seconds; a run this worker made or
continued and that was not ended is ended KILLED: a trainer killed outright does not leave its
run RUNNING forever. SIGINT and SIGTERM are ignored: the trainer decides how its run ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings

END_WAIT = 10.0  # seconds the queue and the run's end get once the trainer has gone


class Worker:
    def __init__(self, answers) -> None:
        self.answers = answers
        self.answer_lock = threading.Lock()
        self.uri: str | None = None
        self._client = None
        self.prepared = None  # (experiment_id, run or None), or the error the lookup met
        self.started_run: str | None = None  # the run this worker made or continued, until ended
        self.active = True  # False after a failed call: later calls are dropped
        self.ending = False
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self._warming: threading.Thread | None = None
        threading.Thread(target=self._work, name="mlflow-calls", daemon=True).start()

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def answer(self, message: dict) -> None:
        with self.answer_lock:
            try:
                self.answers.write(json.dumps(message) + "\n")
                self.answers.flush()
            except (OSError, ValueError):  # the trainer is gone: nobody waits for the answer
                pass

    # -- reading requests --------------------------------------------------------------------

    def take(self, request: dict) -> None:
        if request["op"] == "init":
            self.uri = request["uri"]
        elif request["op"] == "end":  # at once, beside a call that may hang on a dead server
            threading.Thread(target=self._reply, args=(request, self._end), daemon=True).start()
        elif request["op"] == "warm":
            self.warm()
        elif request["op"] in ("log_model", "register"):  # beside the numbers: they need no order
            call = self._log_model if request["op"] == "log_model" else self._register
            threading.Thread(target=self._reply, args=(request, call), daemon=True).start()
        else:
            with self.cond:
                self.queue.append(request)
                self.cond.notify_all()

    def drain(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.queue, timeout)

    # -- making the calls, in order -------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue)
                request = self.queue[0]
            self._do(request)
            with self.cond:
                self.queue.popleft()
                self.cond.notify_all()

    def _do(self, request: dict) -> None:
        op = request["op"]
        if op == "flush":
            self.answer({"id": request["id"], "ok": True})
        elif op == "prepare":
            try:
                self.prepared = self._lookup(request)
            except Exception as e:
                self.prepared = e
        elif op == "start":
            self._reply(request, self._start)
        elif not self.active or self.ending:
            if "id" in request:
                self.answer({"id": request["id"], "error": "tracking is off"})
        elif op == "artifact":
            self._reply(request, lambda r: self.client.log_artifact(r["run_id"], r["path"], r["artifact_path"]))
        elif op == "log":
            try:
                self._log(request)
            except Exception as e:
                self.active = False
                self.answer({"off": request["action"], "error": describe(e)})

    def _reply(self, request: dict, call) -> None:
        try:
            self.answer({"id": request["id"], "ok": call(request)})
        except Exception as e:
            if request["op"] in ("start", "artifact"):  # the run's own calls: tracking is off after one failed
                self.active = False
            self.answer({"id": request["id"], "error": describe(e)})

    def _lookup(self, request: dict):
        experiment = self.client.get_experiment_by_name(request["experiment"])
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(request["experiment"], request["artifact_location"]))
        runs = self.client.search_runs([experiment_id], f"tags.job_id = '{request['job_id']}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return experiment_id, (runs[0] if runs else None)

    def _start(self, request: dict) -> dict:
        prepared, self.prepared = self.prepared or self._lookup(request), None
        if isinstance(prepared, Exception):
            raise prepared
        experiment_id, found = prepared
        if found and request.get("continue", True):
            run_id, params = found.info.run_id, sorted(found.data.params)
            self.client.update_run(run_id, status="RUNNING")
        else:  # the job's first training, or a new one (RESUME=false, other EPOCHS): its own run
            if found and found.info.status == "RUNNING":  # an attempt that died with its helper (node lost)
                self.client.set_terminated(found.info.run_id, status="KILLED")
            tags = {"job_id": request["job_id"], "project_id": request["project_id"]}
            run_id = self.client.create_run(experiment_id, run_name=f"job-{request['job_id']}", tags=tags).info.run_id
            params = []
        self.started_run = run_id
        return {"run_id": run_id, "experiment_id": str(experiment_id), "params": params,
                "continued": run_id == (found.info.run_id if found else None),
                "earlier": found.info.run_id if found else None}

    def _log(self, request: dict) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(request["run_id"], params=[Param(k, v) for k, v in request.get("params", ())],
                              metrics=[Metric(k, v, ms, step) for k, v, ms, step in request.get("metrics", ())])

    def _end(self, request: dict) -> bool:
        self.ending = True  # what is still queued is dropped
        self.client.set_terminated(request["run_id"], status=request["status"])
        if request["run_id"] == self.started_run:
            self.started_run = None
        return True

    # -- the trained model ---------------------------------------------------------------------

    def warm(self) -> None:
        """Once: import what logging the model needs, at the lowest CPU priority (Linux sets a
        thread's niceness on its own, and threads it starts inherit it), so that it soaks up what
        training leaves idle."""
        if self._warming is None:
            self._warming = threading.Thread(target=_warm_up, args=(True,), name="warm-up", daemon=True)
            self._warming.start()

    def _log_model(self, request: dict) -> str:
        if self._warming is None:  # not asked to get ready: the same imports, at normal priority
            _warm_up(nice=False)
        else:  # (a warm-up not done yet still runs at its low priority: it cannot be raised again)
            self._warming.join()
        import mlflow

        model = request["model"]
        mlflow.set_tracking_uri(self.uri)
        with quiet_mlflow_warnings(), mlflow.start_run(run_id=request["run_id"]):
            info = mlflow.pyfunc.log_model(
                name=model["name"], python_model=model["code"], artifacts={"weights": model["weights"]},
                code_paths=model["code_paths"], pip_requirements=model["pip_requirements"],
                signature=signature(), input_example=[model["input_example"]], model_config=model["config"])
        return info.model_uri

    def _register(self, request: dict) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        version = mlflow.register_model(request["model_uri"], request["name"], tags=request["tags"],
                                        await_registration_for=60)
        return str(version.version)

    def trainer_gone(self) -> None:
        """stdin closed: give the queue its time, then end a run the trainer left open."""
        self.drain(END_WAIT)
        if self.started_run and not self.ending:
            note(f"the trainer exited without ending MLflow run {self.started_run}: ending it KILLED")
            done = threading.Thread(target=self._end, args=({"run_id": self.started_run, "status": "KILLED"},),
                                    daemon=True)
            done.start()
            done.join(END_WAIT)


def _warm_up(nice: bool) -> None:
    """Import MLflow's pyfunc flavour; Ultralytics, torch and torchvision, which the model's input
    example runs on (torchvision alone is 4 s of a first prediction here); and build the map of
    installed packages log_model reads to check the model's requirements (it lists every file of
    every installed package: 1.4 s here). What fails here is done, or fails, in log_model; the
    map's builder is internal to MLflow (without it, log_model builds the map itself)."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(19)
    with contextlib.suppress(Exception):
        import mlflow.pyfunc  # noqa: F401
        import torchvision  # noqa: F401
        from ultralytics import YOLO  # noqa: F401
    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def signature():
    """What YoloPyfunc.predict's type hints say (a list of images in, a list of records out), given
    explicitly: inferring it would load the model and run the input example twice at log time."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Map, Schema

    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), outputs=Schema([ColSpec(Map(AnyType()))]))


@contextlib.contextmanager
def quiet_mlflow_warnings():
    """Keep two expected MLflow warnings out of the job's log (a clean job logs no warning):
    - that YoloPyfunc.predict's list[Any] input is not validated (on purpose: anything image-like
      is welcome), which MLflow issues from inside its own warning filters;
    - that the model's config could not be logged as run parameters: MLflow logs it there, and its
      `batch` (predict.py's batch) differs from the training `batch` already logged, which MLflow
      refuses to change. The config stays in the logged model's MLmodel file, where
      `mlflow.pyfunc.load_model` reads it."""
    show = warnings.showwarning

    def filtered(message, *args, **kwargs):
        if "Any type hint" not in str(message):
            show(message, *args, **kwargs)

    def expected(record: logging.LogRecord) -> bool:  # that refusal only, not a server that failed
        message = record.getMessage()
        return not (message.startswith("Failed to log model config as params") and "Changing param values" in message
                    and "'key': 'batch'" in message)

    model_logger = logging.getLogger("mlflow.models.model")
    warnings.showwarning = filtered
    model_logger.addFilter(expected)
    try:
        yield
    finally:
        warnings.showwarning = show
        model_logger.removeFilter(expected)


def note(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a trainer killed outright took its end of the pipe with it
        pass


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C or a pod's SIGTERM reaches the trainer, which
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ends the run through this worker
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the model's input example runs on the CPU, off the job's GPUs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the job's log
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever MLflow prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    worker = Worker(answers)
    for line in sys.stdin:
        if line.strip():
            worker.take(json.loads(line))
    worker.trainer_gone()
    os._exit(0)  # daemon threads may still hang on a dead server: do not wait for them


if __name__ == "__main__":
    main()
