"""The storage interface: small, byte-oriented, and the same for every backend.

A backend knows nothing of WAL, compression or keys. Keys are '/'-separated ASCII paths
relative to the store's prefix (e.g. 'wal/000000010000000000000001'); the backend adds the
prefix. Each backend translates its SDK's errors into walship.errors inside the backend:
ObjectNotFound, AccessDenied, TransientStorageError (throttling, 5xx, connection reset,
timeout: the retry wrapper retries these and only these), AlreadyExists, StorageError.

Contract per method (tests/storage/ runs one suite over every backend to hold them to it):

put(key, source, metadata=, if_absent=)
    Read `source` to EOF and store the bytes under `key` with the given user metadata.
    When put returns, the object is durable and complete; readers never see a partial object
    (a crash mid-put leaves either nothing or the previous object). With if_absent=True the
    put fails with AlreadyExists if the key exists, decided atomically by the store where
    `capabilities.create_if_absent` is True. Returns the number of bytes stored.
    If `source` is seekable the retry wrapper rewinds it and retries the whole put; a
    backend that uploads a non-seekable source in parts buffers one part at a time and
    retries each part through the policy it was given.
get(key, offset=0)
    A readable binary stream of the object's bytes from `offset` to the end; the caller
    closes it. ObjectNotFound if the key does not exist. A transient failure while reading
    raises TransientStorageError from read(); the retry wrapper resumes from the byte reached.
stat(key)
    ObjectInfo with size and user metadata. ObjectNotFound if absent.
get_with_info(key)
    (ObjectInfo, stream of the whole object): what stat and get return, in one request
    where the store answers both at once (S3's GetObject carries the size and the metadata;
    a missing key and a missing bucket are told apart by the error itself). The default
    asks stat, then get. wal-fetch and the prefetcher read every segment this way.
list(prefix)
    Every object whose key starts with `prefix`, as ObjectInfo (metadata may be empty),
    in ascending byte order of key. Keys outside the store's prefix are never yielded: a
    listing that names one raises IntegrityError (a hostile or misconfigured store).
delete_many(keys)
    Delete the keys, in batches where the store allows; keys already absent are fine.
    Returns the number of keys the call asked the store to delete.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

# Metadata travels as S3 x-amz-meta-*, GCS custom metadata and local extended attributes:
# keep names to what all three accept unchanged.
METADATA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# S3 allows 2 KiB of user metadata in all; leave room for the SDK's own headers.
METADATA_MAX_BYTES = 1536

KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says about one object."""

    key: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Seconds since the epoch when the store last wrote the object, where it says.
    modified: float | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees, so services can adapt instead of assuming."""

    # put(if_absent=True) is atomic in the store itself (S3 If-None-Match, O_EXCL/link,
    # GCS generation match). Where False, the stored digest is the only defence.
    create_if_absent: bool = True
    # delete_many uses one request per batch rather than one per key.
    bulk_delete: bool = True
    # Listing is strongly consistent with puts and deletes.
    consistent_list: bool = True


def read_exactly(source: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes: fewer only at EOF (a pipe's or socket's read() may be short)."""
    first = source.read(size)
    if len(first) == size or not first:
        return first
    buffer = bytearray(first)
    while len(buffer) < size:
        chunk = source.read(size - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


def check_key(key: str) -> str:
    """Reject keys that could escape the prefix or that some store would mangle."""
    if not KEY_RE.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Validate user metadata names and size; returns a plain dict copy."""
    result = dict(metadata or {})
    total = 0
    for name, value in result.items():
        if not METADATA_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid metadata name {name!r}")
        if not value.isascii() or not value.isprintable():
            raise ValueError(f"metadata {name!r} must be printable ASCII")
        total += len(name) + len(value)
    if total > METADATA_MAX_BYTES:
        raise ValueError(f"metadata too large: {total} bytes > {METADATA_MAX_BYTES}")
    return result


class Storage(abc.ABC):
    """One store: a backend at a URL. See the module docstring for each method's contract."""

    url: str
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """Store `source` under `key`, durably and atomically; returns bytes stored."""

    @abc.abstractmethod
    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """A stream of the object's bytes from `offset`; ObjectNotFound if absent."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and metadata of one object; ObjectNotFound if absent."""

    def get_with_info(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """Size and metadata with a stream of the whole object; ObjectNotFound if absent."""
        info = self.stat(key)
        return info, self.get(key)

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under `prefix`, ascending by key."""

    @abc.abstractmethod
    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete keys (absent ones are fine); returns how many were asked for."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections and threads."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
