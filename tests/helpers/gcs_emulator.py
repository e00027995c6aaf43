"""pytest plugin: gcp-storage-emulator in a subprocess, and a fresh bucket per test.

Fixtures:
  gcs_emulator   (session) the emulator's URL, e.g. "http://127.0.0.1:40123"
  gcs_store_url  (function) "gs://<fresh bucket>/some/prefix", with STORAGE_EMULATOR_HOST
                 (and GOOGLE_CLOUD_PROJECT) set in os.environ for the test, so subprocesses
                 the test starts inherit them

The emulator does not enforce if_generation_match=0; walship's GCS backend reports
create_if_absent=False whenever STORAGE_EMULATOR_HOST is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.moto_server import free_port

PROJECT = "walship-test"
STORE_PREFIX = "some/prefix"
_START_TIMEOUT = 30.0


def _emulator_command() -> list[str]:
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gcp_storage_emulator"]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1):  # noqa: S310 - our own server
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start gcp-storage-emulator on a free port, in memory; yield its URL; kill it at the end."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*_emulator_command(), "start", "--host", "127.0.0.1", "--port", str(port),
             "--in-memory"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(endpoint):
            if process.poll() is not None:
                raise RuntimeError(
                    f"gcp-storage-emulator exited with {process.returncode}: "
                    f"{log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gcp-storage-emulator did not answer on {endpoint} within "
                    f"{_START_TIMEOUT:.0f}s: {log_path.read_text()}"
                )
            time.sleep(0.1)
        yield endpoint
    finally:
        process.kill()
        process.wait(timeout=10)


def set_gcs_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point google-cloud-storage (here and in children) at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


def new_gcs_bucket(endpoint: str) -> str:
    """Create a uniquely named bucket on the emulator and return its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"walship-test-{uuid.uuid4().hex[:16]}"
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    try:
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        client.create_bucket(bucket)
        client.close()
    finally:
        if old is None:
            del os.environ["STORAGE_EMULATOR_HOST"]
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
    return bucket


@pytest.fixture
def gcs_store_url(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the emulator, as `gs://bucket/some/prefix`, with the env set."""
    set_gcs_environment(monkeypatch, gcs_emulator)
    return f"gs://{new_gcs_bucket(gcs_emulator)}/{STORE_PREFIX}"


def gcs_env() -> dict[str, str]:
    """The variables gcs_store_url set, for a PostgreSQL server and walship children."""
    names = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
    return {k: os.environ[k] for k in names if k in os.environ}
