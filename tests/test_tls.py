"""TLS: certificates are verified by default; TLS_CA_BUNDLE trusts a private CA; TLS_VERIFY=false is explicit."""

from __future__ import annotations

import signal

import pytest

from backend import Backend
from config import BackendSettings, StorageSettings, load_settings
from storage import Storage
from tests.conftest import ACCESS_KEY, AUTH_TOKEN, SECRET_KEY, Receiver, spawn_server, with_group
from utils import BadInput, Redactor, TransientError


@pytest.fixture
def https_receiver(tls_cert, tmp_path):
    cert, key = tls_cert
    receiver = Receiver(tmp_path, AUTH_TOKEN, "--tls-cert", str(cert), "--tls-key", str(key))
    receiver.base = receiver.base.replace("http://", "https://")
    yield receiver
    receiver.stop()


@pytest.mark.parametrize("verify,delivered", [(True, 0), ("<ca>", 1), (False, 1)])
def test_backend_callbacks_verify_certificates(https_receiver, tls_cert, tmp_path, verify, delivered):
    settings = BackendSettings(url=https_receiver.url("1"), token=AUTH_TOKEN, connect_timeout=1, timeout=2,
                               flush_timeout=3, verify=str(tls_cert[0]) if verify == "<ca>" else verify)
    backend = Backend(settings, Redactor([AUTH_TOKEN]))
    backend.log("over TLS")
    backend.close()
    assert len(https_receiver.requests("logs")) == delivered


@pytest.fixture
def https_s3(s3_server, tls_cert, tmp_path):
    cert, key = tls_cert
    proc, url = spawn_server("tests.s3_fault_proxy", "--upstream", s3_server, "--fail-rate", "0", "--record",
                             str(tmp_path / "faults.log"), "--tls-cert", str(cert), "--tls-key", str(key))
    yield url.replace("http://", "https://")
    with_group(proc, signal.SIGTERM)


def test_storage_refuses_an_untrusted_certificate_as_bad_configuration(https_s3, bucket):
    storage = Storage(StorageSettings("minio", bucket, https_s3, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=1))
    with pytest.raises(BadInput, match="TLS certificate of https://127.0.0.1:\\d+ is not trusted"):
        storage.head(storage.locate("x"))


@pytest.fixture
def broken_tls_endpoint():
    """Factory: an https:// endpoint whose TCP server resets every handshake ('close': accepts and
    closes at once) or answers it with plain text ('garbage'), as a restarting proxy may."""
    import socket
    import threading

    servers = []

    def start(mode: str) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    if mode == "garbage":
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nthis is not TLS" * 20)

        threading.Thread(target=serve, daemon=True).start()
        return f"https://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("mode", ["close", "garbage"])
def test_storage_treats_a_reset_tls_handshake_as_transient(broken_tls_endpoint, mode):
    endpoint = broken_tls_endpoint(mode)
    storage = Storage(StorageSettings("minio", "b", endpoint, ACCESS_KEY, SECRET_KEY, "us-east-1", max_attempts=1,
                                      timeout=2))
    with pytest.raises(TransientError, match=f"TLS handshake with {endpoint} failed while trying to look up"):
        storage.head(storage.locate("x"))


@pytest.mark.parametrize("trust", ["ca-bundle", "verify-off"])
def test_storage_over_tls_with_a_ca_bundle_or_verification_off(https_s3, bucket, tls_cert, tmp_path, trust):
    verify = str(tls_cert[0]) if trust == "ca-bundle" else False
    storage = Storage(StorageSettings("minio", bucket, https_s3, ACCESS_KEY, SECRET_KEY, "us-east-1", verify=verify))
    (tmp_path / "f").write_bytes(b"payload")
    storage.upload(tmp_path / "f", storage.locate("k"))
    assert storage.read_bytes(storage.locate("k")) == b"payload"


def test_tls_settings_reach_storage_and_backend(tls_cert):
    base = {"JOB_ID": "1", "DATASET_ID": "d", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"}
    s = load_settings(base)
    assert s.storage.verify is True and s.backend.verify is True
    s = load_settings({**base, "TLS_CA_BUNDLE": str(tls_cert[0])})
    assert s.storage.verify == s.backend.verify == str(tls_cert[0])
    s = load_settings({**base, "TLS_VERIFY": "false", "TLS_CA_BUNDLE": str(tls_cert[0])})
    assert s.storage.verify is False and s.backend.verify is False


def test_turning_verification_off_is_logged_as_a_warning(caplog):
    import logging

    from config import log_configuration

    caplog.set_level(logging.INFO)
    log_configuration(load_settings({"JOB_ID": "1", "DATASET_ID": "d", "STORAGE_TYPE": "local", "TLS_VERIFY": "off"}))
    assert any(r.levelname == "WARNING" and "TLS certificate verification is OFF" in r.message for r in caplog.records)
