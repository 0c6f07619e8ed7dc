"""A proxy in front of the S3 server that fails a share of requests, run as its own process.

Half of the failures answer 503 SlowDown (S3's throttling answer), the other half drop the
connection without answering. Everything else is forwarded unchanged. The number of injected
faults is written to --record, one line each, so a test can check faults really happened:

    python -m tests.s3_fault_proxy --upstream http://127.0.0.1:9000 --fail-rate 0.2 --record faults.log \
        [--hang-file /tmp/silent]   # while that file exists, requests are accepted and never answered

It prints `PORT <n>` on its first line of output once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import os
import time
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def make_handler(args: argparse.Namespace):
    upstream = urlparse(args.upstream)
    rng = random.Random(args.seed)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _fault(self, kind: str) -> None:
            with lock, open(args.record, "a") as f:
                f.write(f"{kind} {self.command} {self.path}\n")

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if args.hang_file and os.path.exists(args.hang_file):  # a silent endpoint: accepts, never answers
                self._fault("hang")
                time.sleep(3600)
                return
            with lock:
                roll = rng.random()
            if roll < args.fail_rate / 2:
                self._fault("503")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            if roll < args.fail_rate:
                self._fault("drop")
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            declared = response.getheader("Content-Length")
            self.send_header("Content-Length", declared if self.command == "HEAD" and declared else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--record", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-file", help="while this file exists, accept requests and never answer them")
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
