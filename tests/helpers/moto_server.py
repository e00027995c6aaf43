"""pytest plugin: a real moto S3 server in a subprocess, and a fresh bucket per test.

Fixtures:
  moto_server   (session) the endpoint URL, e.g. "http://127.0.0.1:40123"
  s3_store_url  (function) "s3://<fresh bucket>/some/prefix", with AWS_ENDPOINT_URL, dummy
                credentials and AWS_REGION set in os.environ for the test (subprocesses the
                test starts inherit them)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REGION = "us-east-1"
ACCESS_KEY = "walship-test-key"
SECRET_KEY = "walship-test-secret"
STORE_PREFIX = "some/prefix"
_START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):  # noqa: S310 - http to our own server
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `python -m moto.server` on a free port; yield its endpoint URL; kill it at the end."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path: Path = tmp_path_factory.mktemp("moto") / "moto.log"
    env = dict(os.environ)
    # The server must not pick up a developer's real AWS settings.
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(endpoint):
            if process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {process.returncode}: {log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not answer on {endpoint} within "
                    f"{_START_TIMEOUT:.0f}s: {log_path.read_text()}"
                )
            time.sleep(0.1)
        yield endpoint
    finally:
        process.kill()
        process.wait(timeout=10)


def set_aws_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3 (in this process and its children) at `endpoint` with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Keep a developer's ~/.aws out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def new_bucket(endpoint: str) -> str:
    """Create a uniquely named bucket on the moto server and return its name."""
    import boto3

    bucket = f"walship-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=bucket)
    client.close()
    return bucket


@pytest.fixture
def s3_store_url(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, as `s3://bucket/some/prefix`, with the AWS env set."""
    set_aws_environment(monkeypatch, moto_server)
    return f"s3://{new_bucket(moto_server)}/{STORE_PREFIX}"
