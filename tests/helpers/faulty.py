"""A fault-injecting Storage proxy: transient failures on demand, then the real backend.

    faulty = FaultyStorage(inner, failures={"put": 2, "stat": 1})
    faulty = FaultyStorage(inner, read_failures=3, read_fail_every=1000)

The first N calls of each named method raise TransientStorageError before reaching the
inner store. With read_failures, each get() stream raises TransientStorageError from read()
once it has delivered `read_fail_every` bytes, until `read_failures` such faults have been
injected across all streams: that exercises the retry wrapper's resume from an offset.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO, cast

from walship.errors import TransientStorageError
from walship.storage.base import Capabilities, ObjectInfo, Storage


class InjectedFaultError(TransientStorageError):
    """The marker exception: a failure the test injected, never a real one."""


class FaultyStorage(Storage):
    """Delegates to `inner`, failing transiently where told to."""

    def __init__(
        self,
        inner: Storage,
        failures: Mapping[str, int] | None = None,
        *,
        read_failures: int = 0,
        read_fail_every: int = 1,
        list_fail_after: int | None = None,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.remaining = Counter(failures or {})
        self.read_failures_left = read_failures
        self.read_fail_every = read_fail_every
        # Fail a listing (once per remaining "list" failure) after yielding this many items.
        self.list_fail_after = list_fail_after
        self.calls: Counter[str] = Counter()
        self.get_offsets: list[int] = []
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """The inner store's capabilities."""
        return self.inner.capabilities

    def _maybe_fail(self, method: str, key: str) -> None:
        with self._lock:
            self.calls[method] += 1
            if self.remaining[method] > 0:
                self.remaining[method] -= 1
                raise InjectedFaultError(f"injected fault in {method} {key}")

    def take_read_fault(self) -> bool:
        """Whether the next read should fail (consumes one fault)."""
        with self._lock:
            if self.read_failures_left > 0:
                self.read_failures_left -= 1
                return True
            return False

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """Fail or delegate; a failed put reads part of the source first, as a real one would."""
        with self._lock:
            self.calls["put"] += 1
            fail = self.remaining["put"] > 0
            if fail:
                self.remaining["put"] -= 1
        if fail:
            source.read(7)  # consume something, so that the wrapper must rewind
            raise InjectedFaultError(f"injected fault in put {key}")
        return self.inner.put(key, source, metadata=metadata, if_absent=if_absent)

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """Fail or return a stream that may fail mid-read."""
        self._maybe_fail("get", key)
        self.get_offsets.append(offset)
        stream = self.inner.get(key, offset)
        if self.read_failures_left <= 0:
            return stream
        return cast(BinaryIO, _FaultyReader(stream, self))

    def stat(self, key: str) -> ObjectInfo:
        """Fail or delegate."""
        self._maybe_fail("stat", key)
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Fail at the start, or after `list_fail_after` items, or delegate."""
        if self.list_fail_after is None:
            self._maybe_fail("list", prefix)
            yield from self.inner.list(prefix)
            return
        with self._lock:
            self.calls["list"] += 1
        for count, info in enumerate(self.inner.list(prefix)):
            if count == self.list_fail_after:
                with self._lock:
                    fail = self.remaining["list"] > 0
                    if fail:
                        self.remaining["list"] -= 1
                if fail:
                    raise InjectedFaultError(f"injected fault in list {prefix} after {count} items")
            yield info

    def delete_many(self, keys: Iterable[str]) -> int:
        """Fail or delegate."""
        key_list = list(keys)
        self._maybe_fail("delete_many", ",".join(key_list[:3]))
        return self.inner.delete_many(key_list)

    def close(self) -> None:
        """Close the inner store."""
        self.inner.close()


class _FaultyReader(io.RawIOBase):
    """Delivers `read_fail_every` bytes, then raises InjectedFaultError if a fault is left."""

    def __init__(self, stream: BinaryIO, owner: FaultyStorage) -> None:
        super().__init__()
        self._stream = stream
        self._owner = owner
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._delivered >= self._owner.read_fail_every and self._owner.take_read_fault():
            raise InjectedFaultError(f"injected read fault after {self._delivered} bytes")
        n = -1 if size is None else size
        room = self._owner.read_fail_every - self._delivered
        if room > 0:
            # Stop at the fault point so that the fault lands at an exact byte offset.
            n = room if n < 0 else min(n, room)
        data = self._stream.read(n)
        self._delivered += len(data)
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()
