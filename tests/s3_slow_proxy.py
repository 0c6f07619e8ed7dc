"""A proxy in front of the S3 server that records every request and holds back chosen downloads.

Built on tests/s3_fault_proxy.py with no faults. Each request is written to --requests as
`METHOD PATH`; a GET whose path contains --slow waits --delay seconds before it is forwarded, so
a test can have two jobs ask for the same object while its first download is still running:

    python -m tests.s3_slow_proxy --upstream http://127.0.0.1:9000 --requests requests.log \
        --slow datasets/ds.zip --delay 8

It prints `PORT <n>` on its first line of output once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import ThreadingHTTPServer

from tests.s3_fault_proxy import make_handler


def make_slow_handler(args: argparse.Namespace):
    base = make_handler(argparse.Namespace(upstream=args.upstream, fail_rate=0.0, seed=0, record=args.requests,
                                           log_requests=False, etags="md5", answer=None, hang_file=None))
    lock = threading.Lock()

    class Handler(base):
        def _record_and_wait(self) -> None:
            with lock, open(args.requests, "a") as f:
                f.write(f"{self.command} {self.path}\n")
            if self.command == "GET" and args.slow and args.slow in self.path:
                time.sleep(args.delay)
            self._handle()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _record_and_wait

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--requests", required=True, help="file that receives one line per request")
    parser.add_argument("--slow", default="", help="GETs whose path contains this wait --delay seconds")
    parser.add_argument("--delay", type=float, default=5.0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_slow_handler(args))
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
