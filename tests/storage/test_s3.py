"""What only the S3 backend does: SDK error translation, multipart, fallbacks, settings."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, cast

import boto3
import botocore.exceptions as bex
import pytest
import urllib3.exceptions

from tests.helpers.moto_server import free_port
from walship.config import Config, MiB
from walship.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    TransientStorageError,
)
from walship.storage import open_storage, parse_bucket_url, relative_key
from walship.storage.retrying import RetryPolicy
from walship.storage.s3 import S3Storage, _Body, _scrub, translate

pytestmark = pytest.mark.s3


def raw_client() -> Any:
    """A plain boto3 client for the moto server (the environment is set by s3_store_url)."""
    return boto3.client("s3")


@pytest.fixture
def s3(s3_store_url: str, config: Config) -> Iterator[S3Storage]:
    bucket, prefix = parse_bucket_url(s3_store_url, "s3")
    backend = S3Storage(bucket, prefix, config, policy=RetryPolicy(2.0, initial=0.001))
    yield backend
    backend.close()


class ProxyClient:
    """A real client with some methods replaced or instrumented."""

    def __init__(self, real: Any, **overrides: Any) -> None:
        self._real = real
        self._overrides = overrides
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._real, name)


def read(store: S3Storage, key: str) -> bytes:
    with store.get(key) as stream:
        return stream.read()


def client_error(code: str, status: int = 400, operation: str = "Op") -> bex.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bex.ClientError(response, operation)


def test_single_put_sends_settings(s3_store_url: str) -> None:
    config = Config(s3_sse="AES256", s3_storage_class="STANDARD_IA")
    with open_storage(s3_store_url, config) as store:
        store.put("k", io.BytesIO(b"data"), metadata={"sha256": "00"})
    bucket, prefix = parse_bucket_url(s3_store_url, "s3")
    head = raw_client().head_object(Bucket=bucket, Key=prefix + "k")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["Metadata"] == {"sha256": "00"}
    assert "-" not in head["ETag"]  # one PutObject


def test_multipart_put_sends_settings_and_uses_parts(s3_store_url: str) -> None:
    config = Config(
        s3_multipart_threshold=5 * MiB,
        s3_part_size=5 * MiB,
        concurrency=2,
        s3_sse="AES256",
        s3_storage_class="STANDARD_IA",
    )
    data = os.urandom(11 * MiB)
    with open_storage(s3_store_url, config) as store:
        store.put("big", io.BytesIO(data), metadata={"m": "1"})
    bucket, prefix = parse_bucket_url(s3_store_url, "s3")
    head = raw_client().head_object(Bucket=bucket, Key=prefix + "big")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["Metadata"] == {"m": "1"}


class PartsInFlight:
    """A client proxy that records the most upload_part calls running at once."""

    def __init__(self, s3: S3Storage) -> None:
        self.real = s3.client
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.proxy = ProxyClient(self.real, upload_part=self.upload_part)
        s3.client = cast(Any, self.proxy)

    def upload_part(self, **kwargs: Any) -> Any:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return self.real.upload_part(**kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_multipart_keeps_at_most_concurrency_parts_in_flight(s3: S3Storage) -> None:
    counter = PartsInFlight(s3)
    proxy = counter.proxy
    data = os.urandom(21 * MiB)
    s3.put("big", io.BytesIO(data))
    assert 1 <= counter.peak <= s3.config.concurrency
    assert proxy.calls["upload_part"] == 5
    assert read(s3, "big") == data


def test_failed_part_is_retried(s3: S3Storage) -> None:
    real = s3.client
    failures = {"left": 2}

    def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2 and failures["left"]:
            failures["left"] -= 1
            raise client_error("SlowDown", 503)
        return real.upload_part(**kwargs)

    s3.client = cast(Any, ProxyClient(real, upload_part=upload_part))
    data = os.urandom(11 * MiB)
    s3.put("big", io.BytesIO(data))
    assert failures["left"] == 0
    assert read(s3, "big") == data


class BrokenSource(io.RawIOBase):
    def __init__(self, good: int) -> None:
        super().__init__()
        self._left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._left <= 0:
            raise OSError("compressor died")
        n = min(len(buffer), self._left)
        buffer[:n] = b"\0" * n
        self._left -= n
        return n


def test_multipart_is_aborted_when_the_source_fails(s3: S3Storage) -> None:
    with pytest.raises(OSError, match="compressor died"):
        s3.put("big", cast(BinaryIO, BrokenSource(12 * MiB)))
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert uploads.get("Uploads", []) == []
    with pytest.raises(ObjectNotFound):
        s3.stat("big")


def test_multipart_is_aborted_when_a_part_fails_for_good(s3: S3Storage) -> None:
    real = s3.client

    def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise client_error("AccessDenied", 403)
        return real.upload_part(**kwargs)

    s3.client = cast(Any, ProxyClient(real, upload_part=upload_part))
    with pytest.raises(AccessDenied):
        s3.put("big", io.BytesIO(os.urandom(16 * MiB)))
    assert real.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    with pytest.raises(ObjectNotFound):
        s3.stat("big")


def test_complete_whose_response_was_lost_counts_as_done(s3: S3Storage) -> None:
    real = s3.client
    state = {"first": True}

    def complete(**kwargs: Any) -> Any:
        result = real.complete_multipart_upload(**kwargs)
        if state["first"]:
            state["first"] = False
            raise bex.ConnectionClosedError(endpoint_url="http://store")
        return result

    s3.client = cast(Any, ProxyClient(real, complete_multipart_upload=complete))
    data = os.urandom(11 * MiB)
    assert s3.put("big", io.BytesIO(data)) == len(data)
    assert read(s3, "big") == data


def test_body_errors_are_transient() -> None:
    class Dies:
        def read(self, size: int) -> bytes:
            raise urllib3.exceptions.ProtocolError("Connection reset by peer")

        def close(self) -> None:
            pass

    with pytest.raises(TransientStorageError, match=r"failed after 0 of 10 bytes"):
        _Body(Dies(), 10, "s3://b/k").read(5)


def test_short_body_is_transient() -> None:
    body = _Body(io.BytesIO(b"abc"), 10, "s3://b/k")
    assert body.read(100) == b"abc"
    with pytest.raises(TransientStorageError, match=r"ended after 3 of 10 bytes"):
        body.read(100)


def test_read_timeout_resumes_through_open_storage(
    s3_store_url: str, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    with open_storage(s3_store_url, config) as store:
        store.put("k", io.BytesIO(data))
        inner = cast(S3Storage, store.inner)  # type: ignore[attr-defined]
        real_get = inner.client.get_object
        ranges: list[str | None] = []

        def get_object(**kwargs: Any) -> Any:
            ranges.append(kwargs.get("Range"))
            response = real_get(**kwargs)
            if len(ranges) == 1:
                body = response["Body"]

                class TimesOut:
                    def __init__(self) -> None:
                        self.sent = 0

                    def read(self, size: int) -> bytes:
                        if self.sent >= 100_000:
                            raise bex.ReadTimeoutError(endpoint_url="http://store")
                        chunk: bytes = body.read(min(size, 100_000 - self.sent))
                        self.sent += len(chunk)
                        return chunk

                    def close(self) -> None:
                        body.close()

                response["Body"] = TimesOut()
            return response

        inner.client = cast(Any, ProxyClient(inner.client, get_object=get_object))
        with store.get("k") as stream:
            assert stream.read() == data
    assert ranges == [None, "bytes=100000-"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("NoSuchKey", 404), ObjectNotFound),
        (client_error("404", 404), ObjectNotFound),
        (client_error("AccessDenied", 403), AccessDenied),
        (client_error("InvalidAccessKeyId", 403), AccessDenied),
        (client_error("SignatureDoesNotMatch", 403), AccessDenied),
        (client_error("SlowDown", 503), TransientStorageError),
        (client_error("InternalError", 500), TransientStorageError),
        (client_error("RequestTimeout", 400), TransientStorageError),
        (client_error("Throttling", 400), TransientStorageError),
        (client_error("BadGateway", 502), TransientStorageError),
        (client_error("InvalidArgument", 400), StorageError),
        (bex.EndpointConnectionError(endpoint_url="http://x"), TransientStorageError),
        (bex.ConnectTimeoutError(endpoint_url="http://x"), TransientStorageError),
        (bex.ReadTimeoutError(endpoint_url="http://x"), TransientStorageError),
        (bex.ConnectionClosedError(endpoint_url="http://x"), TransientStorageError),
        (urllib3.exceptions.ProtocolError("reset"), TransientStorageError),
        (bex.NoCredentialsError(), AccessDenied),
    ],
)
def test_error_translation(error: Exception, expected: type[Exception]) -> None:
    translated = translate(error, "get s3://b/p/k", "b")
    assert type(translated) is expected


def test_translation_messages() -> None:
    missing = translate(client_error("NoSuchBucket", 404), "get s3://nob/k", "nob")
    assert type(missing) is StorageError
    assert missing.message.startswith("bucket nob does not exist")
    creds = translate(bex.NoCredentialsError(), "put s3://b/k", "b")
    assert creds.hint is not None
    assert "AWS_ACCESS_KEY_ID" in creds.hint
    assert "AWS_PROFILE" in creds.hint
    other = translate(client_error("InvalidArgument"), "put s3://b/k", "b")
    assert other.message == "put s3://b/k failed: InvalidArgument: InvalidArgument happened"
    proxy = translate(
        bex.ProxyConnectionError(proxy_url="http://user:hunter2@proxy:3128", error="refused"),
        "get s3://b/k",
        "b",
    )
    assert "hunter2" not in proxy.message
    assert _scrub("https://AKIA:secret@host/x") == "https://***@host/x"


def test_closed_port_gives_storage_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers.moto_server import set_aws_environment

    set_aws_environment(monkeypatch, f"http://127.0.0.1:{free_port()}")
    config = Config(retry_budget=0.5)
    with open_storage("s3://walship-nowhere/p", config) as store:
        with pytest.raises(StorageUnavailable) as caught:
            store.stat("wal/1")
        assert type(caught.value) is StorageUnavailable
        assert "stat wal/1 failed after" in caught.value.message
        assert "Could not connect to the endpoint URL" in caught.value.message
        with pytest.raises(StorageUnavailable):
            store.put("wal/1", cast(BinaryIO, io.BytesIO(b"x")))
        with pytest.raises(StorageUnavailable):
            list(store.list(""))


def test_missing_bucket_is_a_clear_error(
    moto_server: str, monkeypatch: pytest.MonkeyPatch, config: Config
) -> None:
    from tests.helpers.moto_server import set_aws_environment

    set_aws_environment(monkeypatch, moto_server)
    with open_storage("s3://walship-no-such-bucket/p", config) as store:
        for call in (
            lambda: store.stat("k"),
            lambda: store.get("k"),
            lambda: store.get_with_info("k"),
            lambda: store.put("k", cast(BinaryIO, io.BytesIO(b"x"))),
            lambda: list(store.list("")),
        ):
            with pytest.raises(StorageError) as caught:
                call()
            assert type(caught.value) is StorageError
            assert caught.value.message.startswith("bucket walship-no-such-bucket does not exist")


def test_get_with_info_is_one_request(s3: S3Storage) -> None:
    s3.put("wal/1", cast(BinaryIO, io.BytesIO(b"segment")), metadata={"size": "7"})
    proxy = ProxyClient(s3.client)
    s3.client = cast(Any, proxy)
    info, stream = s3.get_with_info("wal/1")
    with stream:
        assert stream.read() == b"segment"
    assert (info.size, info.metadata) == (7, {"size": "7"})
    # A missing key is told by GetObject's own error (NoSuchKey): no HeadBucket either.
    with pytest.raises(ObjectNotFound):
        s3.get_with_info("wal/2")
    assert proxy.calls == {"get_object": 2}


def test_get_with_info_asks_about_the_bucket_after_a_bare_404(s3: S3Storage) -> None:
    # A store or proxy that answers 404 without an error body: "no such key" and "no such
    # bucket" look the same, so the bucket is checked before the end of the archive is
    # reported (here it is missing, so the answer must not be ObjectNotFound).
    real = s3.client

    def get_object(**kwargs: Any) -> Any:
        raise client_error("404", 404, "GetObject")

    def head_bucket(**kwargs: Any) -> Any:
        raise client_error("404", 404, "HeadBucket")

    proxy = ProxyClient(real, get_object=get_object, head_bucket=head_bucket)
    s3.client = cast(Any, proxy)
    with pytest.raises(StorageError, match="does not exist") as caught:
        s3.get_with_info("wal/1")
    assert not isinstance(caught.value, ObjectNotFound)
    # With the bucket there, the bare 404 is a missing object.
    s3.client = cast(Any, ProxyClient(real, get_object=get_object))
    with pytest.raises(ObjectNotFound):
        s3.get_with_info("wal/1")


def test_listing_refuses_keys_outside_the_prefix(s3: S3Storage) -> None:
    pages = [
        {
            "Contents": [
                {"Key": s3.prefix + "wal/1", "Size": 1},
                {"Key": "elsewhere/wal/2", "Size": 1},
            ]
        }
    ]

    class Paginator:
        def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
            return iter(pages)

    s3.client = cast(Any, ProxyClient(s3.client, get_paginator=lambda name: Paginator()))
    listing = s3.list("wal/")
    assert next(listing).key == "wal/1"
    with pytest.raises(IntegrityError, match=r"outside|does not start"):
        next(listing)
    pages[0]["Contents"] = [{"Key": s3.prefix + "wal/../../etc", "Size": 1}]
    with pytest.raises(IntegrityError, match="invalid key"):
        list(s3.list("wal/"))
    pages[0]["Contents"] = [
        {"Key": s3.prefix + "wal/2", "Size": 1},
        {"Key": s3.prefix + "wal/1", "Size": 1},
    ]
    with pytest.raises(IntegrityError, match="ascending"):
        list(s3.list("wal/"))


def test_hostile_listing_of_a_sibling_prefix(s3_store_url: str, config: Config) -> None:
    # A real server never returns keys outside the requested prefix; a sibling prefix that
    # shares a string prefix must not leak in either.
    bucket, prefix = parse_bucket_url(s3_store_url, "s3")
    raw_client().put_object(Bucket=bucket, Key=prefix.rstrip("/") + "-evil/wal/1", Body=b"x")
    raw_client().put_object(Bucket=bucket, Key=prefix + "wal/1", Body=b"x")
    with open_storage(s3_store_url, config) as store:
        assert [i.key for i in store.list("")] == ["wal/1"]


def test_relative_key() -> None:
    assert relative_key("p/wal/1", "p/", "s3://b/p/") == "wal/1"
    with pytest.raises(IntegrityError):
        relative_key("q/wal/1", "p/", "s3://b/p/")
    with pytest.raises(IntegrityError):
        relative_key("p/../x", "p/", "s3://b/p/")


def test_delete_in_batches(s3: S3Storage) -> None:
    keys = [f"wal/{i:03d}" for i in range(23)]
    for key in keys:
        s3.put(key, io.BytesIO(b"x"))
    s3.delete_batch_size = 10
    proxy = ProxyClient(s3.client)
    s3.client = cast(Any, proxy)
    assert s3.delete_many([*keys, "absent"]) == 24
    assert proxy.calls.get("delete_objects") == 3
    assert list(s3.list("")) == []


def test_delete_falls_back_when_delete_objects_is_refused(
    s3: S3Storage, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [f"wal/{i}" for i in range(5)]
    for key in keys:
        s3.put(key, io.BytesIO(b"x"))

    def refuse(**kwargs: Any) -> Any:
        raise client_error("NotImplemented", 501, "DeleteObjects")

    proxy = ProxyClient(s3.client, delete_objects=refuse)
    s3.client = cast(Any, proxy)
    with caplog.at_level(logging.WARNING, logger="walship.storage"):
        assert s3.delete_many(keys[:3]) == 3
    assert not s3.capabilities.bulk_delete
    assert "refused DeleteObjects (NotImplemented)" in caplog.text
    assert [i.key for i in s3.list("")] == keys[3:]
    assert s3.delete_many([*keys[3:], "absent"]) == 3
    assert proxy.calls["delete_objects"] == 1  # remembered: never asked again
    assert proxy.calls["delete_object"] == 6
    assert list(s3.list("")) == []


def test_delete_reports_per_key_errors(s3: S3Storage) -> None:
    def partial(**kwargs: Any) -> Any:
        return {
            "Errors": [
                {"Key": "p/wal/1", "Code": "AccessDenied", "Message": "no"},
                {"Key": "p/wal/2", "Code": "NoSuchKey", "Message": "gone"},
            ]
        }

    s3.client = cast(Any, ProxyClient(s3.client, delete_objects=partial))
    with pytest.raises(AccessDenied, match=r"1 not deleted, e.g. p/wal/1 \(AccessDenied\)"):
        s3.delete_many(["wal/1", "wal/2"])
    assert s3.capabilities.bulk_delete


def test_if_absent_on_existing_object_via_real_server(s3: S3Storage) -> None:
    s3.put("k", io.BytesIO(b"a"), if_absent=True)
    with pytest.raises(AlreadyExists):
        s3.put("k", io.BytesIO(b"b"), if_absent=True)


def test_tls_verify_off_warns(s3_store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="walship.storage"):
        open_storage(s3_store_url, Config(tls_verify=False)).close()
    assert "TLS certificate verification is off" in caplog.text


def test_client_settings(s3: S3Storage) -> None:
    config = s3.client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.retries["total_max_attempts"] == 1


def test_importing_walship_storage_does_not_import_boto3() -> None:
    code = (
        "import sys, walship.storage, walship.storage.local, walship.storage.memory; "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_store_without_conditional_writes_looks_first(s3_store_url: str) -> None:
    """s3_conditional_writes = false: no If-None-Match is sent, the backend says it cannot
    refuse an overwrite atomically, and a create of a taken key is still refused."""
    from walship.errors import AlreadyExists

    config = Config(s3_conditional_writes=False)
    with open_storage(s3_store_url, config) as store:
        assert store.capabilities.create_if_absent is False
        store.put("wal/k", io.BytesIO(b"first"), if_absent=True)
        with pytest.raises(AlreadyExists):
            store.put("wal/k", io.BytesIO(b"second"), if_absent=True)
        with store.get("wal/k") as fh:
            assert fh.read() == b"first"


def test_concurrent_puts_share_one_part_budget(s3: S3Storage) -> None:
    """Backup partitions upload in parallel: the part buffers of all of them together stay
    within concurrency x part size, and they do not starve each other."""
    counter = PartsInFlight(s3)
    blobs = {f"part-{i}": os.urandom(11 * MiB + i) for i in range(5)}
    with ThreadPoolExecutor(max_workers=5) as pool:
        for future in [pool.submit(s3.put, k, io.BytesIO(v)) for k, v in blobs.items()]:
            future.result(timeout=120)
    assert 1 <= counter.peak <= s3.config.concurrency
    for key, data in blobs.items():
        assert read(s3, key) == data


class _Unseekable(io.RawIOBase):
    """A stream like backup-push's encoder: readable, size unknown."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._inner.readinto(buffer)


def test_a_seekable_source_below_the_threshold_is_one_put_retried_from_its_start(
        s3_store_url: str) -> None:
    # wal-push hands over its encoded segment as a seekable buffer: one PutObject straight
    # from it, whatever its size next to s3_part_size, and a retry resends it from where it
    # started (not from where the failed attempt left it).
    bucket, prefix = parse_bucket_url(s3_store_url, "s3")
    config = Config(s3_multipart_threshold=64 * MiB, s3_part_size=5 * MiB, concurrency=2)
    store = S3Storage(bucket, prefix, config, policy=RetryPolicy(2.0, initial=0.001))
    real = store.client
    failures = {"left": 1}

    def put_object(**kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            kwargs["Body"].read(3 * MiB)  # a failure after part of the body was sent
            raise client_error("SlowDown", 503)
        return real.put_object(**kwargs)

    proxy = ProxyClient(real, put_object=put_object)
    store.client = cast(Any, proxy)
    data = os.urandom(12 * MiB)
    source = io.BytesIO(b"skipped" + data)
    source.seek(7)
    assert store.put("wal/000000010000000000000001", source) == len(data)
    assert failures["left"] == 0
    assert "create_multipart_upload" not in proxy.calls
    assert read(store, "wal/000000010000000000000001") == data

    # The same bytes from a stream of unknown size take the part path.
    assert store.put("other", cast(BinaryIO, _Unseekable(data))) == len(data)
    assert proxy.calls["create_multipart_upload"] == 1
    assert read(store, "other") == data
    store.close()
