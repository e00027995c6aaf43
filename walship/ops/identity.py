"""Archive identity: one store prefix archives exactly one cluster.

The first segment pushed into an empty prefix records the cluster's system identifier and
WAL segment size in identity.json; every later segment is checked against it. This is what
stops the classic loss of two clusters archiving into one prefix and overwriting, or
interleaving, each other's history. The record is plain JSON (not encrypted): listing and
verification must work with only a public key, and a system identifier is not a secret.
A verified identity is cached in the spool so that the check costs no request per push.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import walship
from walship import layout
from walship.errors import (
    AlreadyExists,
    ForeignArchive,
    IntegrityError,
    ObjectNotFound,
    StorageUnavailable,
)
from walship.spool import write_atomic
from walship.storage.base import Storage
from walship.wal import SegmentHeader

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArchiveIdentity:
    """Which cluster a store prefix belongs to."""

    system_identifier: int
    wal_segment_size: int

    def to_json(self) -> dict[str, object]:
        """The stored form."""
        return {
            "format": FORMAT_VERSION,
            # A string: 64-bit identifiers lose precision as JSON numbers in many readers.
            "system_identifier": str(self.system_identifier),
            "wal_segment_size": self.wal_segment_size,
        }

    @classmethod
    def from_json(cls, data: object) -> ArchiveIdentity:
        """Parse the stored form; IntegrityError if it is not one."""
        try:
            assert isinstance(data, dict)
            return cls(int(data["system_identifier"]), int(data["wal_segment_size"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise IntegrityError(f"{layout.IDENTITY_KEY} in the store is malformed") from None


def read_identity(storage: Storage) -> ArchiveIdentity | None:
    """The store's identity, or None for a store nothing has been pushed to."""
    try:
        with storage.get(layout.IDENTITY_KEY) as fh:
            raw = fh.read(65536)
    except ObjectNotFound:
        return None
    try:
        return ArchiveIdentity.from_json(json.loads(raw))
    except ValueError:
        raise IntegrityError(f"{layout.IDENTITY_KEY} in the store is not JSON") from None


def _cache_path(spool: Path) -> Path:
    return spool / "identity.json"


def _cached(spool: Path, store: str) -> ArchiveIdentity | None:
    try:
        with open(_cache_path(spool), "rb") as fh:
            data = json.loads(fh.read(4096))
        if data.get("store") != store:
            return None
        return ArchiveIdentity.from_json(data)
    except (OSError, ValueError, IntegrityError, AttributeError):
        return None


def _remember(spool: Path, store: str, identity: ArchiveIdentity) -> None:
    try:
        spool.mkdir(parents=True, exist_ok=True)
        write_atomic(_cache_path(spool), json.dumps({"store": store, **identity.to_json()}))
    except OSError:
        pass  # only a cache: the next push asks the store again


def check_identity(storage: Storage, header: SegmentHeader, spool: Path, name: str) -> None:
    """Refuse a segment from another cluster; claim an empty prefix for this one."""
    mine = ArchiveIdentity(header.system_identifier, header.segment_size)
    known = _cached(spool, storage.url)
    if known is None:
        try:
            known = read_identity(storage)
        except StorageUnavailable:
            # A file store whose directory does not exist yet cannot be read, only created;
            # claiming it below creates it, and in a real outage the put fails the same way.
            known = None
        if known is None:
            record = {
                **mine.to_json(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "created_by": f"walship {walship.__version__}",
            }
            body = io.BytesIO(json.dumps(record, indent=2).encode() + b"\n")
            try:
                storage.put(layout.IDENTITY_KEY, body, if_absent=True)
                known = mine
            except AlreadyExists:
                known = read_identity(storage)
                if known is None:
                    raise IntegrityError(f"{layout.IDENTITY_KEY} vanished while claiming "
                                         "the store") from None
        _remember(spool, storage.url, known)
    ensure_same_cluster(known, mine, name, storage.url)


def ensure_same_cluster(known: ArchiveIdentity, mine: ArchiveIdentity, what: str,
                        url: str) -> None:
    """ForeignArchive unless `what` (a WAL file, a server) is of the cluster the store archives."""
    if known.system_identifier != mine.system_identifier:
        raise ForeignArchive(
            f"{what} belongs to cluster {mine.system_identifier} but {url} "
            f"archives cluster {known.system_identifier}",
            hint="give every cluster its own store prefix (after pg_upgrade or a new initdb too)",
        )
    if known.wal_segment_size != mine.wal_segment_size:
        raise ForeignArchive(
            f"{what} has WAL segment size {mine.wal_segment_size} but {url} archives "
            f"segments of {known.wal_segment_size} bytes",
            hint="give every cluster its own store prefix",
        )
