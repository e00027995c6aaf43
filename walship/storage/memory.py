"""memory://name[/prefix]: an in-process store for tests that honours the whole contract.

Stores are process-global by name, so two open_storage("memory://x", ...) calls in one
process see the same objects (as two processes see the same bucket). Nothing is durable.
`reset_memory_stores()` empties them between tests.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from walship.errors import AlreadyExists, ObjectNotFound, UsageError
from walship.storage import redact_url
from walship.storage.base import Capabilities, ObjectInfo, Storage, check_key, check_metadata

if TYPE_CHECKING:
    from walship.config import Config

_READ_CHUNK = 1024 * 1024


@dataclass
class _Object:
    data: bytes
    metadata: dict[str, str]
    modified: float


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    objects: dict[str, _Object] = field(default_factory=dict)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _store(name: str) -> _Store:
    with _STORES_LOCK:
        return _STORES.setdefault(name, _Store())


def reset_memory_stores(name: str | None = None) -> None:
    """Empty one named memory store, or all of them (for tests)."""
    with _STORES_LOCK:
        if name is None:
            _STORES.clear()
        else:
            _STORES.pop(name, None)


class MemoryStorage(Storage):
    """A thread-safe dict of full key -> bytes + metadata, shared per store name."""

    def __init__(self, name: str, prefix: str = "") -> None:
        self.url = f"memory://{name}/{prefix}"
        self.name = name
        self.prefix = prefix
        self.capabilities = Capabilities(create_if_absent=True, bulk_delete=True)
        self._store = _store(name)

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """Store the bytes; if_absent is decided under the store's lock."""
        full = self.prefix + check_key(key)
        meta = check_metadata(metadata)
        buffer = bytearray()
        while chunk := source.read(_READ_CHUNK):
            buffer += chunk
        obj = _Object(bytes(buffer), meta, time.time())
        with self._store.lock:
            if if_absent and full in self._store.objects:
                raise AlreadyExists(f"{self.url}{key} already exists")
            self._store.objects[full] = obj
        return len(obj.data)

    def _lookup(self, key: str) -> _Object:
        full = self.prefix + check_key(key)
        with self._store.lock:
            obj = self._store.objects.get(full)
        if obj is None:
            raise ObjectNotFound(f"{self.url}{key} does not exist")
        return obj

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """A BytesIO over the stored bytes from `offset` (empty past the end)."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        return io.BytesIO(self._lookup(key).data[offset:])

    def stat(self, key: str) -> ObjectInfo:
        """Size and metadata."""
        obj = self._lookup(key)
        return ObjectInfo(key, len(obj.data), dict(obj.metadata), obj.modified)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """A snapshot of the matching keys, ascending."""
        full_prefix = self.prefix + prefix
        with self._store.lock:
            matches = sorted(
                (k, o) for k, o in self._store.objects.items() if k.startswith(full_prefix)
            )
        for full, obj in matches:
            yield ObjectInfo(
                full[len(self.prefix) :], len(obj.data), dict(obj.metadata), obj.modified
            )

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove the keys; absent ones are fine."""
        full_keys = [self.prefix + check_key(k) for k in keys]
        with self._store.lock:
            for full in full_keys:
                self._store.objects.pop(full, None)
        return len(full_keys)


def open_memory(url: str, config: Config) -> MemoryStorage:
    """memory://name or memory://name/prefix."""
    parts = urlsplit(url)
    url = redact_url(url)
    name = parts.netloc or "default"
    prefix = parts.path.strip("/")
    try:
        check_key(name)
        if prefix:
            check_key(prefix)
    except ValueError:
        raise UsageError(f"malformed store URL {url!r}", hint="use memory://name/prefix") from None
    return MemoryStorage(name, prefix + "/" if prefix else "")
