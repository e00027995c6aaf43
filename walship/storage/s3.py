"""s3://bucket/prefix: Amazon S3 and S3-compatible stores (MinIO, Ceph RGW, GCS interop, moto).

The only module that imports boto3/botocore. Credentials, endpoint and region come from the
standard AWS chain as boto3 reads them (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION/AWS_REGION, ~/.aws/config). Every SDK error is
translated here into walship.errors; the SDK's own retries are off because retries live in
one place, walship.storage.retrying.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
import botocore.exceptions as bex
import urllib3.exceptions
from botocore.config import Config as BotoConfig

from walship import __version__, log
from walship.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    WalshipError,
)
from walship.storage import parse_bucket_url, relative_key
from walship.storage.base import (
    Capabilities,
    ObjectInfo,
    Storage,
    check_key,
    check_metadata,
    read_exactly,
)
from walship.storage.retrying import RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client  # type: ignore[import-not-found, unused-ignore]

    from walship.config import Config

_log = log.get("storage")

# S3 accepts at most 1000 keys per DeleteObjects request, and 10000 parts per upload.
DELETE_BATCH = 1000
MAX_PARTS = 10_000
# Connect fast or report the endpoint as down. Reads wait longer (config.s3_read_timeout,
# 60 s by default) because a busy store may take a while to start sending a large part's
# response (the timeout is per socket read).
CONNECT_TIMEOUT = 10.0

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "500",
        "502",
        "503",
        "504",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "InvalidToken",
        "ExpiredToken",
        "AccountProblem",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
# Stores that do not implement DeleteObjects, or reject its request shape (some S3-compatible
# stores want Content-MD5 where boto3 >= 1.36 sends a CRC), answer with one of these.
_NO_BULK_DELETE_CODES = frozenset(
    {
        "NotImplemented",
        "MethodNotAllowed",
        "MalformedXML",
        "AccessDenied",
        "MissingContentMD5",
        "InvalidDigest",
        "XAmzContentSHA256Mismatch",
    }
)
# Read errors of a response body: the connection died mid-object.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    bex.ReadTimeoutError,
    bex.ResponseStreamingError,
    bex.IncompleteReadError,
    bex.ConnectionClosedError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.SSLError,
    http.client.IncompleteRead,
    ConnectionError,
    TimeoutError,
)

_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")


def _scrub(text: str) -> str:
    """Remove user:password@ from any URL in `text` (proxy or endpoint URLs may carry one)."""
    return _USERINFO_RE.sub(r"\1***@", text)


def _client_error_code(exc: bex.ClientError) -> tuple[str, str, int]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(error.get("Code") or status or "unknown")
    message = str(error.get("Message") or "")
    return code, message[:200], status


def translate(exc: BaseException, action: str, bucket: str) -> WalshipError:
    """An SDK exception as a walship error. `action` is e.g. "get s3://b/p/wal/0001"."""
    if isinstance(exc, WalshipError):
        return exc
    if isinstance(exc, bex.ClientError):
        code, message, status = _client_error_code(exc)
        detail = f"{code}: {message}" if message else code
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"{action}: no such object")
        if code == "NoSuchBucket":
            return StorageError(
                f"bucket {bucket} does not exist ({action})",
                hint="create the bucket, or check the bucket name in the store URL and the "
                "endpoint (AWS_ENDPOINT_URL) and region",
            )
        if code in _DENIED_CODES or status == 403:
            return AccessDenied(
                f"access denied: {action} ({detail})",
                hint="check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, the instance role) "
                "and that the bucket policy allows this operation",
            )
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStorageError(f"{action}: {detail}")
        return StorageError(f"{action} failed: {detail}")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return AccessDenied(
            f"no usable AWS credentials for {action}",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a "
            "profile in ~/.aws/credentials, or run with an instance role",
        )
    if isinstance(exc, bex.SSLError):
        return StorageError(
            f"TLS error for {action}: {_scrub(str(exc))}",
            hint="check the endpoint's certificate and AWS_CA_BUNDLE (tls_verify = false turns "
            "verification off, for test setups only)",
        )
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, *_STREAM_ERRORS)):
        return TransientStorageError(f"{action}: {_scrub(str(exc))}")
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"{action} failed: {_scrub(str(exc))}")
    raise exc


def _seekable_size(source: BinaryIO) -> int | None:
    """Bytes from the current position to the end of a seekable source; None otherwise."""
    try:
        if not source.seekable():
            return None
        position = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(position)
    except (AttributeError, OSError, ValueError):
        return None
    return max(end - position, 0)


def _read_part(source: BinaryIO, size: int) -> bytes | bytearray:
    """One multipart part of up to `size` bytes (fewer only at EOF), read straight into its
    buffer where the source can (walship's pipeline streams copy into it as they produce:
    no queue of pieces joined into a second part-sized buffer)."""
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        return read_exactly(source, size)
    buffer = bytearray(size)
    with memoryview(buffer) as view:
        filled = 0
        while filled < size:
            n = readinto(view[filled:])
            if not n:
                break
            filled += n
    if filled < size:
        del buffer[filled:]
    return buffer


def _object_info(key: str, response: Mapping[str, Any]) -> ObjectInfo:
    """ObjectInfo from a HeadObject or GetObject answer (both carry the same headers)."""
    modified = response.get("LastModified")
    return ObjectInfo(key, int(response["ContentLength"]), dict(response.get("Metadata", {})),
                      modified.timestamp() if modified is not None else None)


class S3Storage(Storage):
    """One bucket and prefix. Thread-safe: boto3 clients are, and the rest is immutable."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        config: Config,
        *,
        client: S3Client | None = None,
        policy: RetryPolicy | None = None,
        delete_batch_size: int = DELETE_BATCH,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self.config = config
        # Parts and delete batches are retried here, one at a time; whole operations are
        # retried by the wrapper around this backend.
        self.policy = policy if policy is not None else RetryPolicy(config.retry_budget)
        self.delete_batch_size = delete_batch_size
        # Stores that ignore If-None-Match (older MinIO, Ceph RGW before conditional writes)
        # overwrite silently; `walship check` finds out, s3_conditional_writes = false adapts.
        self.capabilities = Capabilities(create_if_absent=config.s3_conditional_writes,
                                         bulk_delete=True)
        self._bulk_lock = threading.Lock()
        # The part-buffer budget shared by every upload of this store (see put()).
        self._slots = threading.BoundedSemaphore(config.concurrency)
        self.client: S3Client = client if client is not None else self._make_client(config)

    @staticmethod
    def _make_client(config: Config) -> S3Client:
        if not config.tls_verify:
            _log.warning("TLS certificate verification is off for the S3 endpoint (tls_verify)")
            # Said once above; urllib3 would add a multi-line warning per request to the log.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        boto_config = BotoConfig(
            # boto3 >= 1.36 sends and checks CRC checksums by default, which MinIO, Ceph and
            # the GCS interop API reject or do not return; ask only when an API requires it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # One attempt: walship's retry wrapper is the only place that retries, with a
            # time budget the operator controls; SDK retries would multiply it.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=config.s3_read_timeout,
            max_pool_connections=max(10, config.concurrency * 2),
            user_agent_extra=f"walship/{__version__}",
            # MinIO and Ceph RGW usually serve buckets only in the path (no wildcard DNS).
            s3=cast(Any, {"addressing_style": config.s3_addressing_style}),
        )
        # boto3 reads AWS_DEFAULT_REGION but not AWS_REGION, which the other AWS SDKs and
        # most operators use; honour it the way they do (AWS_DEFAULT_REGION wins if both).
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
        session = boto3.session.Session()
        try:
            return session.client(
                "s3", region_name=region, config=boto_config, verify=config.tls_verify
            )
        except bex.BotoCoreError as exc:
            raise StorageError(f"cannot set up the S3 client: {_scrub(str(exc))}") from exc

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _call(self, action: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except WalshipError:
            raise
        except Exception as exc:
            raise translate(exc, action, self.bucket) from exc

    def _put_args(self, metadata: dict[str, str]) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Metadata": metadata}
        if self.config.s3_sse:
            args["ServerSideEncryption"] = self.config.s3_sse
        if self.config.s3_sse_kms_key_id:
            args["SSEKMSKeyId"] = self.config.s3_sse_kms_key_id
        if self.config.s3_storage_class:
            args["StorageClass"] = self.config.s3_storage_class
        return args

    # -- put ---------------------------------------------------------------------------

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """One PutObject for a seekable source with less than s3_multipart_threshold bytes
        left, or any other source smaller than min(s3_multipart_threshold, s3_part_size);
        otherwise a multipart upload.

        Peak memory: s3_part_size x concurrency for the whole process, however many puts run
        at once: every part buffer, including the first read that decides between the two
        paths, holds one slot of a budget shared by all uploads of this store. (A put holds at
        most one slot before its first part is submitted, and submitted parts always finish,
        so puts cannot starve each other into a deadlock.)
        """
        full = self._full(key)
        meta = check_metadata(metadata)
        if if_absent and not self.capabilities.create_if_absent:
            # Look first (not atomic: the stored digest is what services rely on here), and
            # do not send a header the store does not honour.
            try:
                self.stat(key)
            except ObjectNotFound:
                pass
            else:
                raise AlreadyExists(f"{self._where(key)} already exists")
            if_absent = False
        part_size = self.config.s3_part_size
        # At least one byte, so that an empty source always takes the single-put path.
        threshold = max(self.config.s3_multipart_threshold, 1)
        size = _seekable_size(source)
        if size is not None and size < threshold:
            # A file or buffer of known size (wal-push's encoded segment, whatever its size
            # next to s3_part_size): one PutObject read straight from it, so no part buffer
            # and no slot.
            self._put_single(key, full, source, meta, if_absent, size=size)
            return size
        self._slots.acquire()
        try:
            chunk = read_exactly(source, part_size)
        except BaseException:
            self._slots.release()
            raise
        eof = len(chunk) < part_size
        if eof and len(chunk) < threshold:
            try:
                self._put_single(key, full, chunk, meta, if_absent)
            finally:
                self._slots.release()
            return len(chunk)
        # The first part keeps its slot; _upload_parts gives it back when it is uploaded.
        # No reference may stay here: this frame lives as long as the whole upload, and
        # holding the first part kept one part per upload in memory beyond the budget
        # (32 MiB with four 1 GiB partitions in flight; found with tracemalloc).
        head = [chunk]
        del chunk
        return self._put_multipart(key, full, head, None if eof else source, meta, if_absent)

    def _put_single(
        self, key: str, full: str, body: bytes | BinaryIO, meta: dict[str, str],
        if_absent: bool, *, size: int | None = None,
    ) -> None:
        args = self._put_args(meta)
        args.update(Key=full, Body=body)
        if size is not None:
            args["ContentLength"] = size
        if if_absent:
            args["IfNoneMatch"] = "*"
        action = f"put {self._where(key)}"
        start = None if isinstance(body, bytes) else body.tell()

        def attempt() -> None:
            if start is not None:
                cast(BinaryIO, body).seek(start)  # each attempt sends the same bytes
            try:
                self.client.put_object(**args)
            except bex.ClientError as exc:
                if if_absent and _client_error_code(exc)[0] in _CONFLICT_CODES:
                    raise AlreadyExists(f"{self._where(key)} already exists") from None
                raise translate(exc, action, self.bucket) from exc
            except Exception as exc:
                raise translate(exc, action, self.bucket) from exc

        # The bytes are in memory or seekable, so the backend can retry the put itself.
        self.policy.call(attempt, f"put {key}")

    def _put_multipart(
        self,
        key: str,
        full: str,
        head: list[bytes],
        source: BinaryIO | None,
        meta: dict[str, str],
        if_absent: bool,
    ) -> int:
        where = self._where(key)
        args = self._put_args(meta)
        try:
            created = self.policy.call(
                lambda: self._call(
                    f"start multipart upload of {where}",
                    lambda: self.client.create_multipart_upload(Key=full, **args),
                ),
                f"start multipart upload of {key}",
            )
        except BaseException:
            for _ in head:
                self._slots.release()  # the head parts' slots, never to be uploaded
            raise
        upload_id: str = created["UploadId"]
        try:
            parts, total = self._upload_parts(key, full, upload_id, head, source)
            self._complete(key, full, upload_id, parts, total, if_absent)
        except BaseException:
            self._abort(key, full, upload_id)
            raise
        return total

    def _upload_parts(
        self,
        key: str,
        full: str,
        upload_id: str,
        head: list[bytes],
        source: BinaryIO | None,
    ) -> tuple[list[dict[str, Any]], int]:
        part_size = self.config.s3_part_size
        concurrency = self.config.concurrency
        # Memory bound: a slot of the store-wide budget is taken before a part is read and
        # given back when its upload ends (the head part arrives holding one already).
        slots = self._slots
        head_slots = len(head)
        failed = threading.Event()
        futures: list[Future[dict[str, Any]]] = []
        total = 0

        def upload(number: int, data: bytes | bytearray) -> dict[str, Any]:
            try:
                if failed.is_set():
                    raise StorageError("multipart upload cancelled after another part failed")
                action = f"upload part {number} of {self._where(key)}"
                response = self.policy.call(
                    lambda: self._call(
                        action,
                        lambda: self.client.upload_part(
                            Bucket=self.bucket,
                            Key=full,
                            UploadId=upload_id,
                            PartNumber=number,
                            # botocore takes a bytearray (validate.py accepts bytes,
                            # bytearray, str or a file); its stubs name only bytes.
                            Body=cast(bytes, data),
                        ),
                    ),
                    f"upload part {number} of {key}",
                )
                return {"ETag": response["ETag"], "PartNumber": number}
            except BaseException:
                failed.set()
                raise

        def release(_: Future[dict[str, Any]]) -> None:
            slots.release()

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="walship-s3") as pool:
            number = 0
            while not failed.is_set():
                if head_slots:
                    head_slots -= 1  # taken by put() before it read this part
                else:
                    slots.acquire()
                if failed.is_set():
                    slots.release()
                    break
                data: bytes | bytearray
                try:
                    if head:
                        data = head.pop(0)
                    elif source is not None:
                        data = _read_part(source, part_size)
                        if len(data) < part_size:
                            source = None  # EOF: this is the last part
                    else:
                        data = b""
                except BaseException:
                    slots.release()
                    failed.set()
                    raise
                if not data:
                    slots.release()
                    break
                number += 1
                if number > MAX_PARTS:
                    slots.release()
                    failed.set()
                    raise StorageError(
                        f"{self._where(key)} needs more than {MAX_PARTS} parts of "
                        f"{part_size} bytes, the S3 limit",
                        hint="raise s3_part_size (or lower partition_size)",
                    )
                total += len(data)
                future = pool.submit(upload, number, data)
                future.add_done_callback(release)
                futures.append(future)
                del data
        # The pool has drained; the first failure, if any, is the one to report.
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [f.result() for f in futures], total

    def _complete(
        self,
        key: str,
        full: str,
        upload_id: str,
        parts: list[dict[str, Any]],
        total: int,
        if_absent: bool,
    ) -> None:
        where = self._where(key)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        if if_absent:
            args["IfNoneMatch"] = "*"
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self.client.complete_multipart_upload(**args)
            except bex.ClientError as exc:
                code = _client_error_code(exc)[0]
                if if_absent and code in _CONFLICT_CODES:
                    raise AlreadyExists(f"{where} already exists") from None
                if code == "NoSuchUpload" and attempts > 1 and self._has_size(full, total):
                    return  # an earlier attempt completed it; only its response was lost
                raise translate(exc, f"complete multipart upload of {where}", self.bucket) from exc
            except Exception as exc:
                raise translate(exc, f"complete multipart upload of {where}", self.bucket) from exc

        self.policy.call(attempt, f"complete multipart upload of {key}")

    def _has_size(self, full: str, size: int) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except Exception:
            return False
        return int(head["ContentLength"]) == size

    def _abort(self, key: str, full: str, upload_id: str) -> None:
        # One attempt, no retries: we are already failing and should report it promptly.
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as exc:
            _log.warning(
                "could not abort the multipart upload of %s (%s); its parts stay billed until "
                "a lifecycle rule with AbortIncompleteMultipartUpload removes them",
                self._where(key),
                translate(exc, "abort", self.bucket),
            )

    # -- read --------------------------------------------------------------------------

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """GetObject (with a Range from `offset`); the body reports read failures as transient."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        full = self._full(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if offset:
            args["Range"] = f"bytes={offset}-"
        try:
            response = self.client.get_object(**args)
        except bex.ClientError as exc:
            if offset and _client_error_code(exc)[0] == "InvalidRange":
                # The object exists and ends at or before `offset`: nothing left to read
                # (a resumed read whose connection died right after the last byte).
                return cast(BinaryIO, io.BytesIO(b""))
            raise translate(exc, f"get {self._where(key)}", self.bucket) from exc
        except Exception as exc:
            raise translate(exc, f"get {self._where(key)}", self.bucket) from exc
        body = _Body(response["Body"], int(response["ContentLength"]), self._where(key))
        return cast(BinaryIO, body)

    def get_with_info(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """One GetObject: its answer carries the size and metadata that stat would ask a
        HeadObject for, and its error body tells NoSuchKey from NoSuchBucket, which a
        HEAD's bodiless 404 cannot (stat then asks HeadBucket)."""
        action = f"get {self._where(key)}"
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            raise self._lookup_error(exc, action) from exc
        info = _object_info(key, response)
        return info, cast(BinaryIO, _Body(response["Body"], info.size, self._where(key)))

    def stat(self, key: str) -> ObjectInfo:
        """HeadObject (a 404 is checked against the bucket: _lookup_error)."""
        full = self._full(key)
        action = f"stat {self._where(key)}"
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise self._lookup_error(exc, action) from exc
        return _object_info(key, head)

    def _lookup_error(self, exc: Exception, action: str) -> WalshipError:
        """translate(), except that a 404 which does not say NoSuchKey is checked against
        the bucket first: a HEAD's 404 has no body, and a proxy may drop a GET's, so it could
        be a missing bucket, which wal-fetch must not take for the end of the archive."""
        error = translate(exc, action, self.bucket)
        if isinstance(error, ObjectNotFound) and not (
            isinstance(exc, bex.ClientError) and _client_error_code(exc)[0] == "NoSuchKey"
        ):
            self._check_bucket(action)
        return error

    def _check_bucket(self, action: str) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bex.ClientError as exc:
            code = _client_error_code(exc)[0]
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise translate(
                    bex.ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"),
                    action,
                    self.bucket,
                ) from None
            error = translate(exc, action, self.bucket)
            if isinstance(error, TransientStorageError):
                # Not known yet whether the bucket is there: the retry wrapper asks again
                # rather than let a 503 turn "no bucket" into "no such object".
                raise error from exc
            # Anything else (e.g. no s3:ListBucket permission): the object answer stands.
        except Exception as exc:
            # A reset or timeout of the HeadBucket itself (found by the fault-proxy tests: it
            # escaped untranslated and wal-fetch exited with an internal error).
            raise translate(exc, action, self.bucket) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """ListObjectsV2 pages; every key must be under our prefix and in ascending order."""
        full_prefix = self.prefix + prefix
        where = f"s3://{self.bucket}/{full_prefix}"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)
        last: str | None = None
        iterator = iter(pages)
        while True:
            try:
                page = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise translate(exc, f"list {where}", self.bucket) from exc
            for item in page.get("Contents", []):
                full_key = item["Key"]
                if not full_key.startswith(full_prefix):
                    raise IntegrityError(
                        f"listing of {where} returned {full_key!r}, which does not start "
                        "with the requested prefix",
                        hint="the store or a proxy in front of it is misbehaving; do not "
                        "trust this listing",
                    )
                key = relative_key(full_key, self.prefix, where)
                if last is not None and key <= last:
                    raise IntegrityError(
                        f"listing of {where} is not in ascending key order ({key!r} after "
                        f"{last!r})",
                        hint="the store does not behave like S3; walship cannot trust it",
                    )
                last = key
                modified = item.get("LastModified")
                yield ObjectInfo(
                    key,
                    int(item.get("Size", 0)),
                    {},
                    modified.timestamp() if modified is not None else None,
                )

    # -- delete ------------------------------------------------------------------------

    def delete_many(self, keys: Iterable[str]) -> int:
        """DeleteObjects in batches (Quiet), falling back to DeleteObject per key for stores
        that refuse the batch call; the fallback is remembered for this backend's lifetime."""
        full_keys = [self._full(k) for k in keys]
        size = self.delete_batch_size
        for start in range(0, len(full_keys), size):
            batch = full_keys[start : start + size]
            if self.capabilities.bulk_delete:
                try:
                    self.policy.call(
                        lambda batch=batch: self._delete_batch(batch),  # type: ignore[misc]
                        f"delete of {len(batch)} keys",
                    )
                    continue
                except _BulkDeleteRefusedError as refused:
                    self._disable_bulk_delete(refused.code)
            for full in batch:
                self.policy.call(
                    lambda full=full: self._delete_one(full),  # type: ignore[misc]
                    f"delete {full}",
                )
        return len(full_keys)

    def _delete_batch(self, batch: Sequence[str]) -> None:
        action = f"delete of {len(batch)} keys under s3://{self.bucket}/{self.prefix}"
        try:
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
        except bex.ClientError as exc:
            code = _client_error_code(exc)[0]
            if code in _NO_BULK_DELETE_CODES:
                raise _BulkDeleteRefusedError(code) from exc
            raise translate(exc, action, self.bucket) from exc
        except Exception as exc:
            raise translate(exc, action, self.bucket) from exc
        errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if not errors:
            return
        codes = {str(e.get("Code")) for e in errors}
        sample = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:3])
        message = f"{action}: {len(errors)} not deleted, e.g. {sample}"
        if codes <= _DENIED_CODES:
            raise AccessDenied(message, hint="the credentials may not delete these objects")
        if codes <= _TRANSIENT_CODES:
            raise TransientStorageError(message)
        raise StorageError(message)

    def _delete_one(self, full: str) -> None:
        self._call(
            f"delete s3://{self.bucket}/{full}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=full),
        )

    def _disable_bulk_delete(self, code: str) -> None:
        with self._bulk_lock:
            if self.capabilities.bulk_delete:
                _log.warning(
                    "the store refused DeleteObjects (%s); deleting one key per request", code
                )
                self.capabilities = replace(self.capabilities, bulk_delete=False)

    def close(self) -> None:
        """Close the client's connection pool."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


class _BulkDeleteRefusedError(Exception):
    """DeleteObjects is not usable on this store: fall back to one DeleteObject per key."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Body(io.RawIOBase):
    """A GetObject body whose read failures are TransientStorageError, short bodies included."""

    def __init__(self, body: Any, length: int, where: str) -> None:
        super().__init__()
        self._body = body
        self._length = length
        self._received = 0
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)
        if size == 0 or self._received >= self._length:
            return b""
        try:
            data: bytes = self._body.read(size)
        except _STREAM_ERRORS as exc:
            raise TransientStorageError(
                f"reading {self._where} failed after {self._received} of {self._length} "
                f"bytes: {_scrub(str(exc))}"
            ) from exc
        if not data:
            raise TransientStorageError(
                f"reading {self._where}: the body ended after {self._received} of "
                f"{self._length} bytes"
            )
        self._received += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            # Closing a dead connection is best effort.
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


def open_s3(url: str, config: Config) -> S3Storage:
    """s3://bucket/prefix, with the client configured from the standard AWS chain."""
    bucket, prefix = parse_bucket_url(url, "s3")
    return S3Storage(bucket, prefix, config)
