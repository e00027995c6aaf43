"""open_storage: the scheme registry, URL checks, lazy imports, and the wrapper it adds."""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest

from walship.config import Config
from walship.errors import UsageError
from walship.storage import SCHEMES, open_storage, parse_bucket_url
from walship.storage.memory import MemoryStorage, reset_memory_stores
from walship.storage.retrying import RetryingStorage


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "malformed store URL"),
        ("/var/lib/walship", "malformed store URL"),
        ("ftp://host/x", "unknown store scheme 'ftp'"),
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
        ("s3://Bad_Bucket/p", "invalid bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://key:secret@bucket/p", "malformed store URL"),
        ("s3://bucket:9000/p", "malformed store URL"),
        ("memory://bad name", "malformed store URL"),
    ],
)
def test_bad_urls_are_usage_errors(url: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        open_storage(url, Config())
    assert "\n" not in caught.value.message
    assert caught.value.hint
    assert "secret" not in caught.value.message


def test_parse_bucket_url() -> None:
    assert parse_bucket_url("s3://bucket", "s3") == ("bucket", "")
    assert parse_bucket_url("s3://bucket/", "s3") == ("bucket", "")
    assert parse_bucket_url("s3://bucket/a/b/", "s3") == ("bucket", "a/b/")
    assert parse_bucket_url("gs://my.bucket/x", "gs") == ("my.bucket", "x/")


def test_gs_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        installed = importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:
        installed = False
    if installed and importlib.util.find_spec("walship.storage.gcs") is not None:
        pytest.skip("the gcs backend and its SDK are installed")
    with pytest.raises(UsageError) as caught:
        open_storage("gs://bucket/prefix", Config())
    assert "walship[gcs]" in (caught.value.hint or "")


def test_missing_sdk_module_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend module that imports a missing SDK, as gcs.py does without google-cloud-storage.
    monkeypatch.setitem(sys.modules, "walship_test_fake_gcs", None)  # import fails
    monkeypatch.setitem(
        SCHEMES,
        "gs",
        SCHEMES["gs"].__class__(
            "walship_test_fake_gcs", "open_gcs", "gcs", ("walship_test_fake_gcs",)
        ),
    )
    with pytest.raises(UsageError, match="need the walship_test_fake_gcs package") as caught:
        open_storage("gs://bucket/p", Config())
    assert caught.value.hint == "install walship[gcs] (pip install 'walship[gcs]')"


def test_open_storage_wraps_with_the_configured_budget() -> None:
    store = open_storage("memory://registry-test/p", Config(retry_budget=7.5))
    try:
        assert isinstance(store, RetryingStorage)
        assert store.policy.budget == 7.5
        assert isinstance(store.inner, MemoryStorage)
        assert store.url == "memory://registry-test/p/"
        store.put("k", io.BytesIO(b"x"))
        # Same name, another prefix: a separate namespace in the same store.
        other = open_storage("memory://registry-test/q", Config())
        assert list(other.list("")) == []
    finally:
        reset_memory_stores("registry-test")


def test_memory_reset() -> None:
    open_storage("memory://reset-test", Config()).put("k", io.BytesIO(b"x"))
    reset_memory_stores("reset-test")
    assert list(open_storage("memory://reset-test", Config()).list("")) == []
