"""The one retry wrapper: transient storage errors are retried here and nowhere else.

Only walship.errors.TransientStorageError is retried (backends translate throttling, 5xx,
connection resets and timeouts into it). Backoff is exponential with full jitter, starting
around 0.1 s and capped at 10 s, so that many archivers hitting a throttled bucket spread
out instead of retrying in lock step. Each operation gets a time budget
(`config.retry_budget`); when it is used up the last error is raised as StorageUnavailable
saying how many attempts were made over how long.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import BinaryIO, TypeVar, cast

import tenacity

from walship import log
from walship.errors import IntegrityError, StorageUnavailable, TransientStorageError
from walship.storage.base import Capabilities, ObjectInfo, Storage, check_key

T = TypeVar("T")

_log = log.get("storage")
# The step in which read() without a size reads to EOF.
_CHUNK = 1024 * 1024


class RetryPolicy:
    """Retry transient storage errors with jittered exponential backoff within a time budget."""

    def __init__(
        self,
        budget: float,
        *,
        initial: float = 0.1,
        maximum: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if budget < 0:
            raise ValueError("retry budget must not be negative")
        self.budget = budget
        self.initial = initial
        self.maximum = maximum
        self._sleep = sleep

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # Full jitter (uniform between 0 and the exponential ceiling), then clamped to what is
        # left of the budget so that the last attempt still happens before the budget ends.
        ceiling = min(self.maximum, self.initial * 2 ** (state.attempt_number - 1))
        remaining = self.budget - (state.seconds_since_start or 0.0)
        return max(0.0, min(random.uniform(0, ceiling), remaining))  # noqa: S311 - jitter, not crypto

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        return (state.seconds_since_start or 0.0) >= self.budget

    def call(self, fn: Callable[[], T], description: str) -> T:
        """Run `fn`, retrying TransientStorageError until it succeeds or the budget is used.

        `description` names the operation and key for log lines and the final error, e.g.
        "put wal/000000010000000000000001". Any other exception passes through at once.
        """

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            _log.warning(
                "retrying %s after %s (attempt %d, %.1fs of budget %gs)",
                description,
                error,
                state.attempt_number,
                state.seconds_since_start or 0.0,
                self.budget,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientStorageError),
            wait=self._wait,
            stop=self._stop,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=False,
        )
        started = time.monotonic()
        try:
            return retrying(fn)
        except tenacity.RetryError as exc:
            last = exc.last_attempt
            error = last.exception()
            attempts = last.attempt_number
            elapsed = time.monotonic() - started
            raise StorageUnavailable(
                f"{description} failed after {attempts} attempt{'s' if attempts != 1 else ''}"
                f" over {elapsed:.1f}s: {error}",
                hint="the store kept failing transiently (unreachable, throttling or errors); "
                "check its endpoint and health, or raise retry_budget",
            ) from error


class RetryingStorage(Storage):
    """Wraps any backend so that every operation retries transient errors under one policy."""

    def __init__(self, inner: Storage, policy: RetryPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.url = inner.url

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """The backend's capabilities as they are now.

        A property, not a copy: a backend may learn that a capability is missing (S3 stores
        that refuse DeleteObjects) and the wrapper must report what the backend knows now.
        """
        return self.inner.capabilities

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """Store `source`; a seekable source is rewound and the whole put retried."""
        start = _start_position(source)
        if start is None:
            # Cannot replay the bytes: one pass. Backends that stream in parts retry each
            # part themselves with the policy they were given.
            return self.inner.put(key, source, metadata=metadata, if_absent=if_absent)

        def attempt() -> int:
            source.seek(start)
            return self.inner.put(key, source, metadata=metadata, if_absent=if_absent)

        return self.policy.call(attempt, f"put {key}")

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """A stream that reopens the object at the byte reached when a read fails transiently."""
        stream = self.policy.call(lambda: self.inner.get(key, offset), f"get {key}")
        return cast(BinaryIO, _ResumingReader(self.inner, key, offset, stream, self.policy))

    def get_with_info(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """Size and metadata with a stream that resumes as get()'s does."""
        info, stream = self.policy.call(lambda: self.inner.get_with_info(key), f"get {key}")
        return info, cast(BinaryIO, _ResumingReader(self.inner, key, 0, stream, self.policy))

    def stat(self, key: str) -> ObjectInfo:
        """Size and metadata, retried."""
        return self.policy.call(lambda: self.inner.stat(key), f"stat {key}")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """The listing; a transient failure mid-way lists again and skips what was yielded."""
        last: str | None = None
        iterator: Iterator[ObjectInfo] | None = None

        def next_item() -> ObjectInfo | None:
            nonlocal iterator
            try:
                if iterator is None:
                    iterator = iter(self.inner.list(prefix))
                for info in iterator:
                    # Listings are ascending, so everything up to `last` was already yielded.
                    if last is None or info.key > last:
                        return info
                return None
            except TransientStorageError:
                iterator = None
                raise

        while True:
            try:
                # Fast path without a tenacity round trip per object: listings run to
                # hundreds of thousands of WAL segments.
                info = next_item()
            except TransientStorageError:
                info = self.policy.call(next_item, f"list {prefix or '(all)'}")
            if info is None:
                return
            _check_listed(info.key, prefix, self.url)
            last = info.key
            yield info

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete keys, retrying the whole call (deletes are idempotent)."""
        key_list = list(keys)
        return self.policy.call(
            lambda: self.inner.delete_many(key_list), f"delete of {len(key_list)} keys"
        )

    def close(self) -> None:
        """Close the backend."""
        self.inner.close()


def _check_listed(key: str, prefix: str, url: str) -> None:
    """The contract's "never a key outside the prefix", enforced here once for every backend:
    a listing that names one (a buggy server or proxy, a store shared with another tool) is
    refused rather than acted on."""
    try:
        valid = check_key(key).startswith(prefix)
    except ValueError:
        valid = False
    if not valid:
        raise IntegrityError(
            f"listing of {url} returned {key!r}, which is not a key under {prefix or '(all)'!r}",
            hint="the store or a proxy in front of it is misbehaving; do not trust this listing",
        )


def _start_position(source: BinaryIO) -> int | None:
    try:
        if source.seekable():
            return source.tell()
    except (AttributeError, OSError, ValueError):
        pass
    return None


class _ResumingReader(io.BufferedIOBase):
    """A get() stream that survives transient read errors by reopening at the byte reached.

    Safe because stored objects are immutable under their key (an archived name is never
    overwritten with different bytes) and the pipeline authenticates what it reads.
    """

    def __init__(
        self, inner: Storage, key: str, offset: int, stream: BinaryIO, policy: RetryPolicy
    ) -> None:
        super().__init__()
        self._inner = inner
        self._key = key
        self._position = offset
        self._stream: BinaryIO | None = stream
        self._policy = policy

    def readable(self) -> bool:
        return True

    def _read_once(self, size: int) -> bytes:
        if self._stream is None:
            self._stream = self._inner.get(self._key, self._position)
        try:
            return self._stream.read(size)
        except TransientStorageError:
            self._drop()
            raise

    def read(self, size: int | None = -1) -> bytes:
        """`size` bytes, fewer only at the end of the object (as BufferedIOBase promises:
        callers parse what one read(n) returns). An inner read may come back short when
        a body is cut off mid-way: an S3 body then returns what arrived before failing on
        the next read, which this loop turns into a resume. (Found by the fault-proxy
        tests: half a lock object read as "lost the lock", half a sentinel as corrupt.)"""
        if self.closed:
            raise ValueError("read of a closed storage stream")
        n = -1 if size is None else size
        if n < 0:
            # read() means "to EOF", whatever the inner stream returns per call.
            return b"".join(iter(lambda: self.read1(_CHUNK), b""))
        first = self.read1(n)
        if len(first) == n or not first:
            return first
        chunks = [first]
        remaining = n - len(first)
        while remaining > 0:
            data = self.read1(remaining)
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    def read1(self, size: int = -1) -> bytes:
        """At most `size` bytes from one inner read (retried and resumed if it fails)."""
        if self.closed:
            raise ValueError("read of a closed storage stream")
        n = _CHUNK if size is None or size < 0 else size
        try:
            data = self._read_once(n)
        except TransientStorageError:
            data = self._policy.call(
                lambda: self._read_once(n), f"read {self._key} at byte {self._position}"
            )
        self._position += len(data)
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            # The stream already failed; closing it is best effort.
            with contextlib.suppress(Exception):
                stream.close()

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()
