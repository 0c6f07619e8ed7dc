"""Real parts for the tests, on 127.0.0.1 and free ports, started and stopped here.

- `s3_server`: moto's S3-compatible HTTP server, used through the real boto3 client exactly
  like MinIO (the MinIO binary is not installable from the package registries here);
- `mlflow_server`: a real `mlflow server` process (SQLite backend, artifacts proxied to S3);
- `receiver`: tests/backend_receiver.py as its own process, recording every callback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config

from tests.sample_data import make_dataset, make_zip

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Distinctive values, so a test can prove none of them leaks anywhere.
ACCESS_KEY = "AKIAQUX7TESTACCESS01"
SECRET_KEY = "tEsT-s3cr3t-Valu3-do-not-leak-9f2"
AUTH_TOKEN = "cb-token-Zx81-do-not-leak"
SECRETS = (ACCESS_KEY, SECRET_KEY, AUTH_TOKEN)

FAST_TRAINING = {"EPOCHS": "3", "IMGSZ": "64", "BATCH_SIZE": "16", "WORKERS": "0", "DEVICE": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


# ------------------------------------------------------------------------------------------
# S3
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(url, timeout=2).status_code < 500, 20, "moto server")
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))


@pytest.fixture(scope="session")
def s3_auth_server():
    """A second S3 server that checks credentials (moto with IAM authentication on): any key is unknown."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(url, timeout=2).status_code, 30, "moto server with authentication")
    yield url
    with_group(proc, signal.SIGTERM)
    proc.wait(10)


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def storage_env(s3_server: str, bucket: str) -> dict:
    return {"STORAGE_TYPE": "minio", "MINIO_ENDPOINT": s3_server, "MINIO_ACCESS_KEY": ACCESS_KEY,
            "MINIO_SECRET_KEY": SECRET_KEY, "STORAGE_BUCKET": bucket}


# ------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_server(s3_server, s3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    s3.create_bucket(Bucket="mlflow-artifacts")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow-artifacts/"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{url}/health", timeout=2).ok, 90, "mlflow server")
        yield url
    finally:
        with_group(proc, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with_group(proc, signal.SIGKILL)
            proc.wait(10)
        log.close()


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem): the CA bundle is the cert itself."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


# ------------------------------------------------------------------------------------------
# Backend receiver
# ------------------------------------------------------------------------------------------


def spawn_server(module: str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start a tests/ server module as its own process; returns it and its http://127.0.0.1:port."""
    proc = subprocess.Popen([PYTHON, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("PORT "), f"{module} did not start: {line!r}"
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


class Receiver:
    """A running tests/backend_receiver.py process and what it recorded."""

    def __init__(self, folder: Path, token: str = AUTH_TOKEN, *options: str):
        self.refusals_expected = False  # tests that send bad bodies on purpose set it
        self.record = folder / f"requests-{uuid.uuid4().hex[:8]}.jsonl"
        self.record.touch()
        self.proc, self.base = spawn_server("tests.backend_receiver", "--record", str(self.record), "--token", token,
                                            *options)

    def url(self, job_id: str) -> str:
        return f"{self.base}/internal/training/{job_id}"

    def requests(self, route: str | None = None, stored_only: bool = True) -> list[dict]:
        """What the receiver got; stored_only: what it kept (answered 200, or stored before hanging)."""
        entries = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [e for e in entries if (route is None or e["route"] == route)
                and (not stored_only or e["outcome"] in (200, "lost-answer"))]

    def bodies(self, route: str) -> list[dict]:
        return [e["body"] for e in self.requests(route)]

    def refusals(self) -> list[dict]:
        """Requests the backend answered 422: their body did not match the contract's schema."""
        return [e for e in self.requests(stored_only=False) if e["outcome"] == 422]

    def stop(self) -> None:
        with_group(self.proc, signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def receiver_factory(tmp_path):
    started = []

    def start(*options: str, token: str = AUTH_TOKEN) -> Receiver:
        r = Receiver(tmp_path, token, *options)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
    refused = [(e["route"], e["body"]) for r in started if not r.refusals_expected for e in r.refusals()]
    assert not refused, f"the backend refused bodies with 422 (contract mismatch): {str(refused)[:2000]}"


@pytest.fixture
def receiver(receiver_factory) -> Receiver:
    return receiver_factory()


# ------------------------------------------------------------------------------------------
# Datasets, weights and running the entry points
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dataset_zip(tmp_path_factory):
    """Factory: a zipped sample dataset of a task, generated once per session."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("datasets")

    def make(task: str = "detect", top: str | None = None) -> Path:
        key = (task, top)
        if key not in cache:
            root = make_dataset(folder / f"{task}-src", task)
            cache[key] = make_zip(root, folder / f"{task}-{top or 'flat'}.zip", top=top)
        return cache[key]

    return make


def run_entry(script: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py or predict.py as the backend does: a subprocess with the job's environment.

    cwd is a test folder, so no developer's .env is picked up by accident.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_", "R2_"))}
    return subprocess.run([PYTHON, str(ROOT / script)], env={**base, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def start_entry(script: str, env: dict, cwd: Path) -> subprocess.Popen:
    """Start train.py or predict.py in the background (for signals); output goes to cwd/<script>.log."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "YOLO_", "MINIO_", "R2_"))}
    log = open(cwd / f"{Path(script).stem}-{uuid.uuid4().hex[:6]}.log", "w")
    proc = subprocess.Popen([PYTHON, str(ROOT / script)], env={**base, **env}, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)
    return proc
