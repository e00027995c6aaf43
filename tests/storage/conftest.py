"""Fixtures for the storage suite: one `store` per backend (memory, file, s3 via moto server,
gcs via gcp-storage-emulator)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from walship.config import Config, MiB
from walship.storage import Storage, open_storage
from walship.storage.memory import reset_memory_stores

BACKENDS = ("memory", "file", "s3", "gs")


@pytest.fixture
def config() -> Config:
    """Small multipart settings so that an 11 MiB object takes three parts (5 + 5 + 1 MiB)."""
    return Config(
        s3_multipart_threshold=5 * MiB,
        s3_part_size=5 * MiB,
        concurrency=2,
        retry_budget=3.0,
    )


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("file"),
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("gcs"),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store of each backend kind."""
    kind = request.param
    if kind == "memory":
        name = f"suite-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}/some/prefix"
        reset_memory_stores(name)
    elif kind == "file":
        # A file store is a directory that exists (wal-push creates it on first use); reading
        # one whose directory is missing is an outage, tested in test_local.py.
        (tmp_path / "store").mkdir(mode=0o700)
        yield f"file://{tmp_path}/store"
    elif kind == "gcs":
        yield str(request.getfixturevalue("gcs_store_url"))
    else:
        yield str(request.getfixturevalue("s3_store_url"))


@pytest.fixture
def store(store_url: str, config: Config) -> Iterator[Storage]:
    """The store as services get it: open_storage, so wrapped in the retry wrapper."""
    with open_storage(store_url, config) as opened:
        yield opened


@pytest.fixture
def backend_kind(store_url: str) -> str:
    """'memory', 'file', 's3' or 'gs' (the URL scheme)."""
    return store_url.split("://", 1)[0]
