"""The fault proxy does what it says: each kind of fault reaches a real S3 client (boto3,
against the moto server) as the failure it imitates, is counted, and is transient for
walship's S3 backend; with no faults it is a transparent proxy."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions as bex
import pytest
from botocore.config import Config as BotoConfig

from tests.helpers.fault_proxy import FaultProxy, classify
from tests.helpers.moto_server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket
from walship import layout
from walship.config import Config
from walship.errors import AlreadyExists, StorageUnavailable, TransientStorageError
from walship.ops.backup_push import _BackupRun
from walship.ops.locks import read_lock, store_lock
from walship.storage.retrying import RetryingStorage, RetryPolicy
from walship.storage.s3 import S3Storage

pytestmark = pytest.mark.s3


def _client(endpoint: str, read_timeout: float = 5.0) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=BotoConfig(retries={"total_max_attempts": 1}, read_timeout=read_timeout,
                          connect_timeout=5),
    )


@pytest.fixture
def bucket(moto_server: str) -> str:
    name = new_bucket(moto_server)
    client = _client(moto_server)
    client.put_object(Bucket=name, Key="k", Body=b"x" * 5000)
    client.close()
    return name


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server, rate=0.0, seed=1, stall_seconds=2.0) as p:
        yield p


def test_classify() -> None:
    assert classify("GET", "/b/wal/1") == "GET"
    assert classify("GET", "/b?list-type=2&prefix=p") == "LIST"
    assert classify("GET", "/b/") == "LIST"
    assert classify("PUT", "/b/k?partNumber=2&uploadId=u") == "UPLOAD_PART"
    assert classify("PUT", "/b/p/k") == "PUT"
    assert classify("POST", "/b/k?uploads") == "CREATE_MULTIPART"
    assert classify("POST", "/b/k?uploadId=u") == "COMPLETE_MULTIPART"
    assert classify("POST", "/b?delete") == "DELETE"
    assert classify("DELETE", "/b/k?uploadId=u") == "ABORT_MULTIPART"
    assert classify("DELETE", "/b/k") == "DELETE"
    assert classify("HEAD", "/b/k") == "HEAD"
    assert classify("HEAD", "/b") == "HEAD_BUCKET"


def test_transparent_without_faults(proxy: FaultProxy, bucket: str) -> None:
    client = _client(proxy.endpoint)
    client.put_object(Bucket=bucket, Key="a/b", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b")["Body"].read() == b"hello"
    assert client.head_object(Bucket=bucket, Key="a/b")["ContentLength"] == 5
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a/b", "k"]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a/b"}]})
    with pytest.raises(bex.ClientError) as missing:
        client.head_object(Bucket=bucket, Key="a/b")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert proxy.total_faults() == 0
    assert proxy.requests["PUT"] == 1 and proxy.requests["DELETE"] == 1
    assert proxy.requests["HEAD"] == 2 and proxy.requests["LIST"] == 1


@pytest.mark.parametrize(("kind", "code"), [("500", "InternalError"),
                                            ("503", "ServiceUnavailable"),
                                            ("slowdown", "SlowDown")])
def test_error_answers(moto_server: str, bucket: str, kind: str, code: str) -> None:
    with FaultProxy(moto_server, rate=1.0, kinds=[kind]) as p:
        client = _client(p.endpoint)
        with pytest.raises(bex.ClientError) as put:
            client.put_object(Bucket=bucket, Key="new", Body=b"data")
        assert put.value.response["Error"]["Code"] == code
        with pytest.raises(bex.ClientError) as head:
            client.head_object(Bucket=bucket, Key="k")
        assert head.value.response["ResponseMetadata"]["HTTPStatusCode"] in (500, 503)
        assert p.faults == {(kind, "PUT"): 1, (kind, "HEAD"): 1}
    # Answered before the store saw it: nothing was stored.
    with pytest.raises(bex.ClientError):
        _client(moto_server).head_object(Bucket=bucket, Key="new")


def test_drops_stalls_and_truncation(moto_server: str, bucket: str) -> None:
    with FaultProxy(moto_server, rate=1.0, kinds=["rst"], seed=3) as p:
        with pytest.raises((bex.ConnectionClosedError, bex.EndpointConnectionError,
                            bex.ReadTimeoutError, bex.HTTPClientError)):
            _client(p.endpoint).get_object(Bucket=bucket, Key="k")
        assert p.faults[("rst", "GET")] == 1
    with FaultProxy(moto_server, rate=1.0, kinds=["close"], seed=3) as p:
        with pytest.raises((bex.ConnectionClosedError, bex.EndpointConnectionError,
                            bex.HTTPClientError)):
            _client(p.endpoint).list_objects_v2(Bucket=bucket)
        assert p.faults[("close", "LIST")] == 1
    with FaultProxy(moto_server, rate=1.0, kinds=["stall"], stall_seconds=3.0) as p:
        with pytest.raises(bex.ReadTimeoutError):
            _client(p.endpoint, read_timeout=1.0).head_object(Bucket=bucket, Key="k")
        assert p.faults[("stall", "HEAD")] == 1
        assert p.after_store["stall"] == 1
    with FaultProxy(moto_server, rate=1.0, kinds=["truncate"]) as p:
        body = _client(p.endpoint).get_object(Bucket=bucket, Key="k")["Body"]
        with pytest.raises((bex.IncompleteReadError, bex.ResponseStreamingError)):
            body.read()
        assert p.faults[("truncate", "GET")] == 1


@pytest.mark.parametrize("kind", ["500", "503", "slowdown", "close", "rst", "stall",
                                  "truncate"])
def test_every_kind_is_transient_for_walship(moto_server: str, bucket: str, kind: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """walship's S3 backend reports each fault as TransientStorageError, the one its retry
    wrapper retries; none is mistaken for "not found" or a permanent failure."""
    with FaultProxy(moto_server, rate=1.0, kinds=[kind], stall_seconds=2.0) as p:
        # A zero budget: the backend's own per-request retries (puts, parts, deletes) make
        # one attempt and report it as StorageUnavailable caused by the transient error.
        storage = S3Storage(bucket, "", Config(s3_read_timeout=0.5),
                            client=_client(p.endpoint, read_timeout=0.5),
                            policy=RetryPolicy(0.0))
        calls: list[Callable[[], object]] = [
            lambda: storage.put("put-me", io.BytesIO(b"payload")),
            lambda: storage.stat("k"),
            lambda: storage.get("k").read(),
            lambda: list(storage.list("")),
            lambda: storage.delete_many(["k"]),
        ]
        for call in calls:
            with pytest.raises(StorageUnavailable) as failed:
                call()
            error = failed.value
            assert isinstance(error, TransientStorageError) or isinstance(
                error.__cause__, TransientStorageError), repr(error)
        storage.close()
        assert p.total_faults() == 5


@pytest.mark.parametrize("kind", ["503", "rst"])
def test_a_failed_bucket_check_is_transient(moto_server: str, bucket: str, kind: str) -> None:
    """stat() of a missing key asks HeadBucket (a missing bucket must not read as "no such
    object"); when that request fails transiently, so does the stat, to be retried. It used
    to escape as a raw ConnectionClosedError: wal-fetch's "internal error", exit 153."""
    with FaultProxy(moto_server, rate=1.0, kinds=[kind], operations=["HEAD_BUCKET"]) as p:
        storage = S3Storage(bucket, "", Config(), client=_client(p.endpoint),
                            policy=RetryPolicy(0.0))
        with pytest.raises(TransientStorageError):
            storage.stat("missing")
        storage.close()
        assert p.faults == {(kind, "HEAD_BUCKET"): 1}


def test_a_cut_off_body_still_reads_whole(moto_server: str, bucket: str) -> None:
    """read(n) through the retry wrapper returns n bytes (or up to the end) even when the
    body is cut off: it used to return the half that arrived, and callers that parse one
    read (lock objects, sentinels, identity.json) took it for a malformed object."""
    with FaultProxy(moto_server, rate=1.0, kinds=["truncate"], operations=["GET"],
                    limit=3) as p:
        inner = S3Storage(bucket, "", Config(), client=_client(p.endpoint))
        storage = RetryingStorage(inner, RetryPolicy(30.0))
        for _ in range(3):
            with storage.get("k") as fh:
                assert fh.read(65536) == b"x" * 5000
        storage.close()
        assert p.faults[("truncate", "GET")] == 3


def test_a_lock_whose_create_answer_was_lost_is_ours(moto_server: str, bucket: str) -> None:
    """The lock's create-if-absent put is stored but its answer lost (the connection closes
    after the store applied it); the retry finds the name taken, by our own token. It used to
    report "the store is locked by backup-push (pid <its own pid>)"."""
    with FaultProxy(moto_server, rate=1.0, kinds=["close"], operations=["PUT"],
                    after_store_share=1.0, limit=1) as p:
        inner = S3Storage(bucket, "locks-test/", Config(), client=_client(p.endpoint))
        storage = RetryingStorage(inner, RetryPolicy(30.0))
        with store_lock(storage, "backup", "backup-push") as lock:
            lock.check()
        assert p.after_store["close"] == 1
        assert read_lock(storage, "backup") is None  # released
        storage.close()


def test_a_sentinel_whose_create_answer_was_lost_is_published(moto_server: str,
                                                              bucket: str) -> None:
    """backup-push's last step, the sentinel's create-if-absent, is stored but its answer is
    lost; the retry finds the name taken by the same bytes: the backup is complete. It used
    to exit 8 ("already exists") for a backup that was complete and listed. Other bytes under
    that name are still refused."""
    name = "base_000000010000000000000002_00000028"
    with FaultProxy(moto_server, rate=1.0, kinds=["rst"], operations=["PUT"],
                    after_store_share=1.0, limit=1) as p:
        inner = S3Storage(bucket, "sentinel-test/", Config(), client=_client(p.endpoint))
        storage = RetryingStorage(inner, RetryPolicy(30.0))
        run = _BackupRun.__new__(_BackupRun)  # only its storage is used by _publish
        run.storage = storage
        run._publish(name, b'{"sentinel": 1}\n')
        assert p.after_store["rst"] == 1
        with storage.get(layout.sentinel_key(name)) as fh:
            assert fh.read() == b'{"sentinel": 1}\n'
        with pytest.raises(AlreadyExists):
            run._publish(name, b'{"sentinel": 2}\n')
        storage.close()
