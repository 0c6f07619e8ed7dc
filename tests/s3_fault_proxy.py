"""A proxy in front of the S3 server that fails a share of requests, run as its own process.

The failures alternate: one answers 503 SlowDown (S3's throttling answer), the next drops the
connection without answering. Everything else is forwarded unchanged. The number of injected
faults is written to --record, one line each, so a test can check faults really happened:

    python -m tests.s3_fault_proxy --upstream http://127.0.0.1:9000 --fail-rate 0.2 --record faults.log \
        [--hang-file /tmp/silent]   # while that file exists, requests are accepted and never answered

Options for other stores and faults:
- `--log-requests`: also record every request as `REQ <method> <path>` (to count transfers);
- `--etags kms`: ETags as AWS gives them for SSE-KMS objects (32 hex digits that are not the
  content's MD5, and the `x-amz-server-side-encryption: aws:kms` header); `--etags opaque`: the
  same ETags without the header (a gateway whose ETags are not MD5s and says nothing);
- `--answer STATUS:CODE:METHOD:TEXT` (repeatable): requests with that method (or `ANY`) whose path
  contains TEXT get that status with S3's XML error CODE, e.g. `404:NoSuchKey:GET:/b/in/x.jpg`
  (an object deleted after it was listed).

It prints `PORT <n>` on its first line of output once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def make_handler(args: argparse.Namespace):
    upstream = urlparse(args.upstream)
    rng = random.Random(args.seed)
    lock = threading.Lock()
    kinds, faults = ("503", "drop"), [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _fault(self, kind: str) -> None:
            with lock, open(args.record, "a") as f:
                f.write(f"{kind} {self.command} {self.path}\n")

        def _log(self) -> None:
            if args.log_requests:
                with lock, open(args.record, "a") as f:
                    copy = " copy" if self.headers.get("x-amz-copy-source") else ""  # a server-side copy
                    f.write(f"REQ {self.command} {self.path} {self.headers.get('Content-Length') or 0}{copy}\n")

        def _answer(self) -> bool:
            """A configured --answer for this request: sent, and True."""
            for rule in args.answer or []:
                status, code, method, text = rule.split(":", 3)
                if method in ("ANY", self.command) and text in self.path:
                    self._fault(status)
                    error = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code></Error>'.encode()
                    self.send_response(int(status))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return True
            return False

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            self._log()
            if getattr(args, "hang_file", None) and os.path.exists(args.hang_file):  # silent: accepts, never answers
                self._fault("hang")
                time.sleep(3600)
                return
            if self._answer():
                return
            with lock:  # a share of requests fails, alternately with each kind (not left to chance)
                kind = None
                if rng.random() < args.fail_rate:
                    kind = kinds[faults[0] % 2]
                    faults[0] += 1
            if kind == "503":
                self._fault("503")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            if kind == "drop":
                self._fault("drop")
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if args.etags != "md5":  # listings carry ETags too
                data = re.sub(rb"<ETag>(.*?)</ETag>", lambda m: b"<ETag>" + not_md5(m.group(1)) + b"</ETag>", data)
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() == "etag" and args.etags != "md5":
                    v = not_md5(v.encode()).decode()
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if args.etags == "kms":
                self.send_header("x-amz-server-side-encryption", "aws:kms")
            declared = response.getheader("Content-Length")
            self.send_header("Content-Length", declared if self.command == "HEAD" and declared else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


def not_md5(etag: bytes) -> bytes:
    """The ETag with its 32 hex digits replaced by others (as for SSE-KMS objects); quotes kept."""
    return re.sub(rb"[0-9a-f]{32}", lambda m: hashlib.md5(b"kms:" + m.group(0)).hexdigest().encode(), etag)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--record", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-file", help="while this file exists, accept requests and never answer them")
    parser.add_argument("--log-requests", action="store_true", help="record every request as REQ <method> <path>")
    parser.add_argument("--etags", choices=("md5", "kms", "opaque"), default="md5",
                        help="kms/opaque: ETags that are not the content's MD5, with/without the SSE-KMS header")
    parser.add_argument("--answer", action="append", metavar="STATUS:CODE:METHOD:TEXT",
                        help="answer matching requests with this status and S3 error code")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args))
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # dropped connections are the point
    if args.tls_cert:  # serve HTTPS with this certificate
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
