"""gs://bucket/prefix: Google Cloud Storage through google-cloud-storage.

The only module that imports google-cloud-storage. Credentials come from Application
Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`,
the metadata server on GCE/GKE/Cloud Run). STORAGE_EMULATOR_HOST points the client at an
emulator (e.g. gcp-storage-emulator); with one, the client uses anonymous credentials and
the project GOOGLE_CLOUD_PROJECT (default "walship-emulator").

Every SDK error is translated here into walship.errors, and the SDK's own retries are off
(`retry=None` on every call): retries live in one place, walship.storage.retrying.

gcp-storage-emulator does not enforce `if_generation_match=0` (it silently overwrites), so
with STORAGE_EMULATOR_HOST set the backend reports `create_if_absent=False` and put(if_absent)
falls back to a non-atomic look-first; services then rely on the stored digest.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import google.auth.exceptions as gauth_exc
import requests
import urllib3.exceptions
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

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
    from walship.config import Config

_log = log.get("storage")
T = TypeVar("T")

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "walship-emulator"
# (connect, read) timeouts per request, as for S3.
TIMEOUT = (10.0, 60.0)
# Resumable upload chunks must be multiples of 256 KiB.
CHUNK_QUANTUM = 256 * 1024
# Bytes fetched per ranged GET while streaming a download (the reader's memory bound).
DOWNLOAD_CHUNK = 8 * 1024 * 1024
# The JSON API accepts at most 100 calls in one batch request.
DELETE_BATCH = 100
CONTENT_TYPE = "application/octet-stream"

_TRANSIENT: tuple[type[BaseException], ...] = (
    gexc.TooManyRequests,
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.GatewayTimeout,
    gexc.ServerError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    gauth_exc.TransportError,
    ConnectionError,
    TimeoutError,
)
_CREDENTIALS_HINT = (
    "check the credentials: GOOGLE_APPLICATION_CREDENTIALS (a service account key file), "
    "`gcloud auth application-default login`, or the instance's service account, and that "
    "it has the roles walship needs on the bucket (storage.objects.create/get/list/delete)"
)


def _detail(exc: gexc.GoogleAPICallError) -> str:
    """The status code and the service's message, without the request URL."""
    message = str(getattr(exc, "message", "") or "").strip()
    code = exc.code if exc.code is not None else "error"
    return f"{int(code) if isinstance(code, int) else code} {message[:200]}".strip()


def translate(exc: BaseException, action: str) -> WalshipError:
    """An SDK exception as a walship error; `action` is e.g. "get gs://b/p/wal/0001".

    Anything that is not an SDK or network error is re-raised unchanged (a bug, not an
    operator problem).
    """
    if isinstance(exc, WalshipError):
        return exc
    if isinstance(exc, gexc.NotFound):
        return ObjectNotFound(f"{action}: no such object")
    if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
        return AccessDenied(f"access denied: {action} ({_detail(exc)})", hint=_CREDENTIALS_HINT)
    if isinstance(exc, gexc.GoogleAPICallError):
        if isinstance(exc, _TRANSIENT) or exc.code in (408, 429):
            return TransientStorageError(f"{action}: {_detail(exc)}")
        return StorageError(f"{action} failed: {_detail(exc)}")
    if isinstance(exc, gauth_exc.DefaultCredentialsError):
        return AccessDenied(f"no usable Google credentials for {action}", hint=_CREDENTIALS_HINT)
    if isinstance(exc, gauth_exc.RefreshError):
        # The message may quote the token endpoint's answer, never the key itself.
        return AccessDenied(
            f"cannot obtain an access token for {action}: {str(exc)[:200]}",
            hint=_CREDENTIALS_HINT,
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return StorageError(
            f"TLS error for {action}: {type(exc).__name__}",
            hint="check the endpoint's certificate (REQUESTS_CA_BUNDLE)",
        )
    if isinstance(exc, _TRANSIENT):
        return TransientStorageError(f"{action}: {type(exc).__name__}: {str(exc)[:200]}")
    raise exc


class _Prepended(io.RawIOBase):
    """`head` then the rest of `source`, with tell() (the resumable upload asks for it)."""

    def __init__(self, head: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._head: bytes | None = head
        self._head_pos = 0
        self._source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        n = -1 if size is None else size
        parts = bytearray()
        if self._head is not None:
            end = len(self._head) if n < 0 else min(len(self._head), self._head_pos + n)
            parts += self._head[self._head_pos : end]
            self._head_pos = end
            if self._head_pos >= len(self._head):
                self._head = None  # free the head as soon as it has been sent
        if n < 0:
            parts += self._source.read()
        elif len(parts) < n:
            parts += read_exactly(self._source, n - len(parts))
        self._position += len(parts)
        return bytes(parts)


class GcsStorage(Storage):
    """One bucket and prefix on Google Cloud Storage (or an emulator)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        config: Config,
        *,
        client: storage.Client | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.bucket_name = bucket
        self.prefix = prefix
        self.url = f"gs://{bucket}/{prefix}"
        self.config = config
        self.policy = policy if policy is not None else RetryPolicy(config.retry_budget)
        self.emulator = bool(os.environ.get(EMULATOR_ENV))
        # The emulator accepts if_generation_match=0 and overwrites anyway: say so, so that
        # services look at the stored digest first.
        self.capabilities = Capabilities(
            create_if_absent=not self.emulator, bulk_delete=True, consistent_list=True
        )
        # Upload settings shared with S3: below the threshold one request, else a resumable
        # upload in chunks of the part size (rounded up to the 256 KiB quantum GCS requires).
        self.threshold = max(config.s3_multipart_threshold, 1)
        quanta = -(-config.s3_part_size // CHUNK_QUANTUM)
        self.chunk_size = quanta * CHUNK_QUANTUM
        self.client = client if client is not None else self._make_client()
        self.bucket = self.client.bucket(bucket)

    def _make_client(self) -> storage.Client:
        from google.api_core.client_info import ClientInfo

        agent = f"walship/{__version__}"
        info = ClientInfo(user_agent=agent)  # type: ignore[no-untyped-call]
        try:
            if self.emulator:
                project = os.environ.get("GOOGLE_CLOUD_PROJECT") or EMULATOR_PROJECT
                return storage.Client(
                    project=project,
                    credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                    client_info=info,
                )
            return storage.Client(client_info=info)
        except gauth_exc.DefaultCredentialsError:
            raise AccessDenied(
                f"no Google credentials found for {self.url}", hint=_CREDENTIALS_HINT
            ) from None
        except Exception as exc:
            raise StorageError(
                f"cannot set up the GCS client: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self.prefix}{key}"

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except WalshipError:
            raise
        except Exception as exc:
            raise translate(exc, action) from exc

    def _missing(self, action: str, error: WalshipError) -> WalshipError:
        """A 404 on an object: report a missing bucket as such, never as a missing object
        (wal-fetch would take that for the end of the archive)."""
        if not isinstance(error, ObjectNotFound):
            return error
        try:
            self.client.get_bucket(self.bucket_name, timeout=TIMEOUT, retry=None)
        except gexc.NotFound:
            return StorageError(
                f"bucket {self.bucket_name} does not exist ({action})",
                hint="create the bucket, or check the bucket name in the store URL (and "
                f"{EMULATOR_ENV} when using an emulator)",
            )
        except Exception:  # noqa: S110 - e.g. no storage.buckets.get: the object answer stands
            pass
        return error

    # -- put ---------------------------------------------------------------------------

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """One request below the threshold, else a resumable upload in chunks.

        Peak memory: about threshold + chunk size (the head read to choose the path, then
        one chunk at a time). Create-if-absent is `if_generation_match=0`; a 412 becomes
        AlreadyExists. Where the store does not enforce it (emulator), the key is looked
        up first, which is not atomic.
        """
        full = self._full(key)
        meta = check_metadata(metadata)
        where = self._where(key)
        if if_absent and not self.capabilities.create_if_absent:
            try:
                self.stat(key)
            except ObjectNotFound:
                pass
            else:
                raise AlreadyExists(f"{where} already exists")
        head = read_exactly(source, self.threshold)
        if len(head) < self.threshold:
            # The bytes are in memory, so the backend retries this put itself even when the
            # caller's source cannot be rewound.
            self.policy.call(
                lambda: self._upload(where, full, io.BytesIO(head), len(head), meta, if_absent),
                f"put {key}",
            )
            return len(head)
        stream = _Prepended(head, source)
        head = b""  # the stream holds the head until it is sent
        # A resumable upload of a stream of unknown length. Not retried here: the retry
        # wrapper rewinds a seekable source and retries the whole put.
        self._upload(where, full, cast(BinaryIO, stream), None, meta, if_absent)
        return stream.tell()

    def _upload(
        self,
        where: str,
        full: str,
        body: BinaryIO,
        size: int | None,
        meta: dict[str, str],
        if_absent: bool,
    ) -> None:
        blob = self.bucket.blob(full, chunk_size=None if size is not None else self.chunk_size)
        blob.metadata = meta or None
        try:
            blob.upload_from_file(
                body,
                size=size,
                content_type=CONTENT_TYPE,
                if_generation_match=0 if if_absent else None,
                timeout=TIMEOUT,
                retry=None,
            )
        except gexc.PreconditionFailed:
            if if_absent:
                raise AlreadyExists(f"{where} already exists") from None
            raise StorageError(f"put {where} failed: precondition failed") from None
        except Exception as exc:
            error = translate(exc, f"put {where}")
            if isinstance(error, ObjectNotFound):
                # An upload's 404 can only mean the bucket.
                error = self._missing(f"put {where}", error)
            raise error from exc

    # -- read --------------------------------------------------------------------------

    def _reload(self, key: str, action: str) -> Any:
        blob = self.bucket.blob(self._full(key))
        try:
            blob.reload(timeout=TIMEOUT, retry=None)
        except Exception as exc:
            raise self._missing(action, translate(exc, action)) from exc
        return blob

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """Ranged GETs of one generation of the object, DOWNLOAD_CHUNK bytes at a time."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        where = self._where(key)
        blob = self._reload(key, f"get {where}")
        size = int(blob.size or 0)
        if offset >= size:
            return cast(BinaryIO, io.BytesIO(b""))
        return cast(BinaryIO, _RangeReader(blob, offset, size, where))

    def stat(self, key: str) -> ObjectInfo:
        """The object's size, custom metadata and update time."""
        blob = self._reload(key, f"stat {self._where(key)}")
        updated = blob.updated
        return ObjectInfo(
            key,
            int(blob.size or 0),
            dict(blob.metadata or {}),
            updated.timestamp() if updated is not None else None,
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under the prefix, ascending; every name is checked against the prefix."""
        full_prefix = self.prefix + prefix
        where = f"gs://{self.bucket_name}/{full_prefix}"
        try:
            blobs = iter(
                self.client.list_blobs(
                    self.bucket_name, prefix=full_prefix, timeout=TIMEOUT, retry=None
                )
            )
        except Exception as exc:
            raise translate(exc, f"list {where}") from exc
        last: str | None = None
        while True:
            try:
                blob = next(blobs)
            except StopIteration:
                return
            except Exception as exc:
                error = translate(exc, f"list {where}")
                if isinstance(error, ObjectNotFound):
                    error = self._missing(f"list {where}", error)
                raise error from exc
            name = str(blob.name)
            if not name.startswith(full_prefix):
                raise IntegrityError(
                    f"listing of {where} returned {name!r}, which does not start with the "
                    "requested prefix",
                    hint="the store or a proxy in front of it is misbehaving; do not trust "
                    "this listing",
                )
            key = relative_key(name, self.prefix, where)
            if last is not None and key <= last:
                raise IntegrityError(
                    f"listing of {where} is not in ascending key order ({key!r} after {last!r})",
                    hint="the store does not behave like GCS; walship cannot trust it",
                )
            last = key
            updated = blob.updated
            yield ObjectInfo(
                key,
                int(blob.size or 0),
                {},
                updated.timestamp() if updated is not None else None,
            )

    # -- delete ------------------------------------------------------------------------

    def delete_many(self, keys: Iterable[str]) -> int:
        """Batch requests of up to 100 deletes; a 404 for a key is fine."""
        full_keys = [self._full(k) for k in keys]
        for start in range(0, len(full_keys), DELETE_BATCH):
            batch = full_keys[start : start + DELETE_BATCH]
            self.policy.call(
                lambda batch=batch: self._delete_batch(batch),  # type: ignore[misc]
                f"delete of {len(batch)} keys",
            )
        return len(full_keys)

    def _delete_batch(self, batch: Sequence[str]) -> None:
        action = f"delete of {len(batch)} keys under gs://{self.bucket_name}/{self.prefix}"
        try:
            with self.client.batch(raise_exception=False) as deferred:
                for full in batch:
                    self.bucket.delete_blob(full, timeout=TIMEOUT, retry=None)
        except Exception as exc:
            raise translate(exc, action) from exc
        responses: Any = getattr(deferred, "_responses", None) or []
        errors: Any = [
            (name, r) for name, r in zip(batch, responses, strict=False)
            if not 200 <= int(r.status_code) < 300 and int(r.status_code) != 404
        ]
        if not errors:
            return
        translated = [
            translate(gexc.from_http_response(r), f"delete {n}")  # type: ignore[no-untyped-call]
            for n, r in errors
        ]
        sample = ", ".join(str(e) for e in translated[:3])
        message = f"{action}: {len(errors)} not deleted, e.g. {sample}"
        if all(isinstance(e, AccessDenied) for e in translated):
            raise AccessDenied(message, hint=_CREDENTIALS_HINT)
        if all(isinstance(e, TransientStorageError) for e in translated):
            raise TransientStorageError(message)
        raise StorageError(message)

    def close(self) -> None:
        """Close the client's HTTP session."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


class _RangeReader(io.RawIOBase):
    """Reads one generation of an object with ranged GETs, one chunk in memory at a time.

    Pinned to the generation seen by the reload, so an object replaced mid-read fails
    loudly instead of splicing two versions. Network failures are TransientStorageError,
    which the retry wrapper resumes from the byte reached.
    """

    def __init__(self, blob: Any, offset: int, size: int, where: str) -> None:
        super().__init__()
        self._blob = blob
        self._position = offset
        self._size = size
        self._where = where
        self._buffer = b""
        self._buffer_pos = 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        start = self._position
        end = min(self._size, start + DOWNLOAD_CHUNK) - 1
        action = f"read {self._where} at byte {start}"
        try:
            data = self._blob.download_as_bytes(
                start=start,
                end=end,
                if_generation_match=self._blob.generation,
                checksum=None,
                timeout=TIMEOUT,
                retry=None,
            )
        except (gexc.NotFound, gexc.PreconditionFailed):
            raise StorageError(
                f"{self._where} was deleted or replaced while it was being read",
                hint="something else writes under this prefix; archived objects must not change",
            ) from None
        except Exception as exc:
            raise translate(exc, action) from exc
        if not data:
            raise TransientStorageError(
                f"reading {self._where}: the body ended at byte {start} of {self._size}"
            )
        self._buffer = bytes(data)
        self._buffer_pos = 0

    def read(self, size: int | None = -1) -> bytes:
        n = -1 if size is None else size
        if n < 0:
            return b"".join(iter(lambda: self.read(DOWNLOAD_CHUNK), b""))
        if n == 0 or self._position >= self._size:
            return b""
        if self._buffer_pos >= len(self._buffer):
            self._fill()
        data = self._buffer[self._buffer_pos : self._buffer_pos + n]
        self._buffer_pos += len(data)
        self._position += len(data)
        if self._buffer_pos >= len(self._buffer):
            self._buffer = b""
            self._buffer_pos = 0
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def open_gcs(url: str, config: Config) -> GcsStorage:
    """gs://bucket/prefix, with credentials from ADC (or anonymous for an emulator)."""
    bucket, prefix = parse_bucket_url(url, "gs")
    return GcsStorage(bucket, prefix, config)
