"""The MLflow worker: a helper process that makes the trainer's MLflow calls, in order, in its own
interpreter. `tracking.Tracker` starts it as the job begins and talks to it over pipes.

Why a process: importing MLflow is 2-3 s of Python, and its calls are Python too. In the trainer's
process they compete with Ultralytics for the GIL and delay the first training batch (measured:
side by side on threads both imports end later than one after the other); here they run on
another core while the trainer imports torch and downloads its dataset.

Protocol: one JSON object per line. The trainer writes requests to stdin:
    {"op": "init", "uri": ...}                                   the tracking URI (never on the command line)
    {"op": "prepare", "experiment", "artifact_location", "job_id"}   look up the experiment and the job's run
    {"op": "start", "id", "experiment", "artifact_location", "job_id", "project_id"}
    {"op": "log", "run_id", "action", "params": [[k, v]], "metrics": [[k, v, ms, step]]}
    {"op": "artifact", "id", "run_id", "path", "artifact_path"}
    {"op": "flush", "id"}                                        answered once everything before it is done
    {"op": "end", "id", "run_id", "status"}                      made at once: what is still queued is dropped
and reads answers on stdout: {"id", "ok": result} or {"id", "error": "Type: message"}, and
{"off": action, "error": ...} when a call without an answer failed (tracking is then off: later
calls are dropped). Everything MLflow prints goes to stderr, which the trainer logs.

Requests are read as they come and queued, so the trainer never waits on a slow server. When stdin
closes (the trainer exited) the queue is given END_WAIT seconds; a run this worker made or
continued and that was not ended is ended KILLED: a trainer killed outright does not leave its
run RUNNING forever. SIGINT and SIGTERM are ignored: the trainer decides how its run ends.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading

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
            if request["op"] != "end":
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
        if found:
            run_id, params = found.info.run_id, sorted(found.data.params)
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {"job_id": request["job_id"], "project_id": request["project_id"]}
            run_id = self.client.create_run(experiment_id, run_name=f"job-{request['job_id']}", tags=tags).info.run_id
            params = []
        self.started_run = run_id
        return {"run_id": run_id, "experiment_id": str(experiment_id), "params": params, "continued": bool(found)}

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

    def trainer_gone(self) -> None:
        """stdin closed: give the queue its time, then end a run the trainer left open."""
        self.drain(END_WAIT)
        if self.started_run and not self.ending:
            note(f"the trainer exited without ending MLflow run {self.started_run}: ending it KILLED")
            done = threading.Thread(target=self._end, args=({"run_id": self.started_run, "status": "KILLED"},),
                                    daemon=True)
            done.start()
            done.join(END_WAIT)


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
