"""A stand-in for the platform backend's internal training routes, run as its own process.

It implements the contract's callback routes under any base path, checks the
X-Internal-Auth header, validates every body against the backend's schemas
(tests/contract_schemas.py) and answers a bad one with 422 and a FastAPI-style `detail`, as the
platform's FastAPI backend does, answers `validation-results` with a `validation_result_id`, and
appends every request it receives (with its outcome) to a JSON-lines file. Faults are options, so
tests can make it flaky, slow, route-less or cancelling:

    python -m tests.backend_receiver --record /tmp/requests.jsonl --token secret \
        [--fail-rate 0.3] [--hang-rate 0.1] [--delay 2] [--missing-route validation-results] \
        [--fail-route validation-results [--fail-while FILE]] [--reset-final-once] [--cancel-after-epoch 1] [--seed 0]

It prints `PORT <n>` on its first line of output once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.contract_schemas import SCHEMAS, problems

ROUTES = {*SCHEMAS, ("GET", "health")}


def make_handler(args: argparse.Namespace):
    lock = threading.Lock()
    rng = random.Random(args.seed)
    state = {"epochs_seen": 0, "result_ids": set()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # keep the test output quiet
            pass

        def _handle(self, method: str) -> None:
            self.arrived = time.time()  # the request's headers are in; its body is read next
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            route = self.path.rstrip("/").rsplit("/", 1)[-1]
            if len(raw) < length:  # the client went away mid-body (a killed job): no request, as for FastAPI
                self._record(method, route, None, "incomplete")
                self.close_connection = True
                return
            with lock:
                roll = rng.random()
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = {"_invalid_json": raw.decode("utf-8", "replace")}
            final = route == "status" and isinstance(body, dict) and body.get("status") in ("completed", "failed", "cancelled")
            if final and args.reset_final_once and not state.get("reset_done"):
                state["reset_done"] = True
                self._record(method, route, body, "reset")
                self.close_connection = True  # the connection drops without an answer, as a restarting proxy does
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if (method, route) not in ROUTES or route in args.missing_route:
                code, answer = 404, {"detail": "Not Found"}
            elif route in args.fail_route and (not args.fail_while or os.path.exists(args.fail_while)):
                code, answer = 500, {"detail": "this route always fails"}
            elif args.token and self.headers.get("X-Internal-Auth") != args.token:
                code, answer = 403, {"detail": "bad internal auth"}
            elif route != "health" and roll < args.hang_rate:
                self._record(method, route, body, "lost-answer")  # stored, but the answer never comes
                time.sleep(args.hang_seconds)  # the client times out and sends the same event again
                return
            elif route != "health" and roll < args.hang_rate + args.fail_rate:
                code, answer = 500, {"detail": "injected failure"}
            elif route != "health" and (detail := problems(method, route, body) or self._unknown_result(body)):
                code, answer = 422, {"detail": detail}
            else:
                if route == "validation-results":
                    with lock:
                        state["epochs_seen"] = max(state["epochs_seen"], int(body.get("epoch", 0)))
                cancelled = args.cancel_after_epoch and state["epochs_seen"] >= args.cancel_after_epoch
                code, answer = 200, ({"job_status": "cancelled" if cancelled else "running"} if route == "health" else {"ok": True})
                if route == "validation-results":
                    with lock:
                        result_id = len(state["result_ids"]) + 1
                        state["result_ids"].add(result_id)
                    answer = {"id": result_id, "validation_result_id": result_id}
                if args.delay:
                    time.sleep(args.delay)
            self._record(method, route, body, code, answer)  # before the answer: a client that has it finds it recorded
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _unknown_result(self, body) -> list[dict]:
            """Image results must name a validation result this backend stored (a foreign key)."""
            if not isinstance(body, list):
                return []
            with lock:
                known = set(state["result_ids"])
            return [{"type": "foreign_key", "loc": ["body", i, "validation_result_id"], "msg": "no such validation result"}
                    for i, element in enumerate(body) if element.get("validation_result_id") not in known]

        def _record(self, method: str, route: str, body, outcome, answer=None) -> None:
            entry = {"time": time.time(), "arrived": self.arrived, "method": method, "path": self.path, "route": route,
                     "auth": self.headers.get("X-Internal-Auth"), "body": body, "outcome": outcome, "answer": answer}
            with lock, open(args.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PATCH(self):
            self._handle("PATCH")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="answer 500 to this share of requests")
    parser.add_argument("--hang-rate", type=float, default=0.0, help="store but never answer this share of requests")
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--delay", type=float, default=0.0, help="answer every request after this many seconds")
    parser.add_argument("--missing-route", action="append", default=[], help="answer 404 on this route")
    parser.add_argument("--fail-route", action="append", default=[], help="answer 500 on this route, always")
    parser.add_argument("--fail-while", help="--fail-route fails only while this file exists")
    parser.add_argument("--reset-final-once", action="store_true",
                        help="drop the connection without answering the first final status")
    parser.add_argument("--cancel-after-epoch", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args))
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # clients that hang up at exit are expected
    if args.tls_cert:  # serve HTTPS with this certificate
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
