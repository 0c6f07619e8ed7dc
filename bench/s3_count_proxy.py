"""A pass-through proxy in front of an S3 server that records every request and its body size.

    python -m bench.s3_count_proxy --upstream http://127.0.0.1:9000 --record requests.tsv

Used by bench/overhead_bench.py to count the bytes train.py uploads (tests/s3_fault_proxy.py
records methods and paths, not sizes). Bodies are streamed in 1 MiB chunks both ways, nothing is
held in memory, and `Expect: 100-continue` is answered here, so the proxy adds one local hop and
no waiting. One tab-separated line per request, written when the answer is complete:

    started  finished  method  path?query  bytes_in  bytes_out  status  copy_source

`started`/`finished` are time.time(); `bytes_in` is the request body (a PutObject's or an
UploadPart's content; 0 for a server-side CopyObject, whose `copy_source` names the source).
It prints `PORT <n>` on its first line of output once it listens on 127.0.0.1.

`--delay-ms N` holds every request N ms before forwarding it, as a store N ms away would (one round
trip per request; requests in flight side by side wait side by side): bench/fetch_bench.py
--latency-ms uses it to compare clients against a distant store.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CHUNK = 1 << 20
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "expect"}


def make_handler(upstream: str, record: str, delay: float = 0.0):
    target = urlparse(upstream)
    lock = threading.Lock()
    local = threading.local()  # one upstream connection per proxy thread, kept alive

    def connection() -> http.client.HTTPConnection:
        if getattr(local, "conn", None) is None:
            local.conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120, blocksize=CHUNK)
        return local.conn

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _body(self, length: int):
            """The request body as an iterator of chunks, counted as it goes."""
            left = length
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                self.bytes_in += len(chunk)
                yield chunk

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            for attempt in (1, 2):  # a kept-alive upstream connection the server closed: reconnect once
                conn = connection()
                try:
                    conn.request(self.command, self.path, body=self._body(length) if length else None, headers=headers)
                    return conn.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    conn.close()
                    local.conn = None
                    if attempt == 2 or self.bytes_in:
                        raise

        def _handle(self) -> None:
            started, self.bytes_in, bytes_out = time.time(), 0, 0
            if delay:
                time.sleep(delay)
            response = self._forward()
            declared = response.getheader("Content-Length")
            whole = None
            if declared is None and self.command != "HEAD":  # a chunked answer: framed again with its length
                whole = response.read()
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if whole is not None:
                self.send_header("Content-Length", str(len(whole)))
            self.end_headers()
            if whole is not None:
                self.wfile.write(whole)
                bytes_out = len(whole)
            elif self.command != "HEAD":
                left = int(declared)
                while left > 0 and (chunk := response.read(min(CHUNK, left))):
                    self.wfile.write(chunk)
                    bytes_out += len(chunk)
                    left -= len(chunk)
            response.close()
            copy = self.headers.get("x-amz-copy-source", "-")
            line = (f"{started:.6f}\t{time.time():.6f}\t{self.command}\t{self.path}\t{self.bytes_in}\t{bytes_out}\t"
                    f"{response.status}\t{copy}\n")
            with lock, open(record, "a") as f:
                f.write(line)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the S3 server's URL, http://host:port")
    parser.add_argument("--record", required=True, help="file to append one line per request to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold every request this long (a distant store)")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args.upstream, args.record, args.delay_ms / 1000))
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
