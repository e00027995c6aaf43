"""backup-list: complete backups, oldest first, read from their sentinels alone.

A backup is complete when its sentinel exists (written last by backup-push). The sentinel is
plain JSON, not encrypted: names, LSNs, times and sizes are what listing and retention need,
they are not secrets, and a host with only the public key must be able to read them. It is
not trusted for restoring: backup-fetch checks it against the encrypted, authenticated
manifest and refuses a mismatch (docs/backups.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from walship import layout, log, wal
from walship.config import Config
from walship.errors import IntegrityError, ObjectNotFound
from walship.storage import open_storage
from walship.storage.base import Storage

_log = log.get("backup_list")

SENTINEL_FORMAT = 1
LATEST = "LATEST"


@dataclass(frozen=True)
class BackupInfo:
    """One complete backup, as its sentinel describes it."""

    name: str
    start_lsn: int
    stop_lsn: int
    timeline: int
    start_time: datetime
    stop_time: datetime
    pg_version: str
    pg_version_num: int
    system_identifier: int
    wal_segment_size: int
    label: str
    data_bytes: int  # bytes of the files backed up (the restored data directory's size)
    stored_bytes: int  # bytes in the store: partitions, file lists and manifest
    partitions: int
    files: int
    compression: str
    encrypted: bool
    tablespaces: tuple[int, ...] = ()
    walship_version: str = ""

    @property
    def sort_key(self) -> tuple[int, int, str]:
        """Oldest first: timelines only grow, and within one the start LSN orders backups."""
        return (self.timeline, self.start_lsn, self.name)

    @property
    def start_segment(self) -> str:
        """The first WAL segment the backup needs."""
        return wal.segment_for_lsn(self.timeline, self.start_lsn, self.wal_segment_size).name

    @property
    def stop_segment(self) -> str:
        """The last WAL segment the backup needs (the one holding the byte before stop_lsn)."""
        return wal.segment_for_lsn(self.timeline, max(self.stop_lsn - 1, self.start_lsn),
                                   self.wal_segment_size).name

    @property
    def history_file(self) -> str:
        """The .backup history file pg_backup_stop() archives for this backup."""
        return (f"{self.start_segment}.{self.start_lsn % self.wal_segment_size:08X}.backup")

    def to_json(self) -> dict[str, Any]:
        """backup-list --json's object, which is also the sentinel's content."""
        return {
            "name": self.name,
            "start_lsn": wal.format_lsn(self.start_lsn),
            "stop_lsn": wal.format_lsn(self.stop_lsn),
            "timeline": self.timeline,
            "start_time": self.start_time.isoformat(),
            "stop_time": self.stop_time.isoformat(),
            "pg_version": self.pg_version,
            "pg_version_num": self.pg_version_num,
            # A string: 64-bit identifiers lose precision as JSON numbers in many readers.
            "system_identifier": str(self.system_identifier),
            "wal_segment_size": self.wal_segment_size,
            "label": self.label,
            "data_bytes": self.data_bytes,
            "stored_bytes": self.stored_bytes,
            "partitions": self.partitions,
            "files": self.files,
            "compression": self.compression,
            "encrypted": self.encrypted,
            "tablespaces": list(self.tablespaces),
            "start_wal": self.start_segment,
            "stop_wal": self.stop_segment,
            "walship_version": self.walship_version,
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str = "sentinel") -> BackupInfo:
        """Parse to_json()'s form; IntegrityError if malformed."""
        try:
            assert isinstance(data, dict)
            info = cls(
                name=str(data["name"]),
                start_lsn=wal.parse_lsn(str(data["start_lsn"])),
                stop_lsn=wal.parse_lsn(str(data["stop_lsn"])),
                timeline=int(data["timeline"]),
                start_time=_aware(data["start_time"]),
                stop_time=_aware(data["stop_time"]),
                pg_version=str(data["pg_version"]),
                pg_version_num=int(data["pg_version_num"]),
                system_identifier=int(data["system_identifier"]),
                wal_segment_size=wal.check_segment_size(int(data["wal_segment_size"])),
                label=str(data.get("label", "")),
                data_bytes=int(data["data_bytes"]),
                stored_bytes=int(data["stored_bytes"]),
                partitions=int(data["partitions"]),
                files=int(data.get("files", 0)),
                compression=str(data.get("compression", "")),
                encrypted=bool(data.get("encrypted", False)),
                tablespaces=tuple(int(t) for t in data.get("tablespaces", ())),
                walship_version=str(data.get("walship_version", "")),
            )
            assert wal.is_backup_name(info.name) and info.timeline >= 1
            assert info.stop_lsn >= info.start_lsn
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where} is malformed ({type(exc).__name__}: {exc})",
                                 hint="the object is damaged or was not written by walship"
                                 ) from None
        return info

    def same_backup(self, other: BackupInfo) -> bool:
        """Whether two descriptions agree on what identifies and locates the backup."""
        # The times too: LATEST with --target-time chooses by stop_time, so a sentinel whose
        # times were damaged or forged must not pass for the manifest's backup.
        fields = ("name", "start_lsn", "stop_lsn", "timeline", "system_identifier",
                  "wal_segment_size", "partitions", "tablespaces", "pg_version_num",
                  "start_time", "stop_time")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def replace(self, **changes: Any) -> BackupInfo:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _aware(value: Any) -> datetime:
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        raise ValueError(f"time without an offset: {value!r}")
    return parsed


def sentinel_bytes(info: BackupInfo) -> bytes:
    """The sentinel object's content."""
    return json.dumps({"format": SENTINEL_FORMAT, **info.to_json()}, indent=2).encode() + b"\n"


def read_backup_info(storage: Storage, name: str) -> BackupInfo:
    """The sentinel of backup `name`; ObjectNotFound if there is no complete backup of that name."""
    if not wal.is_backup_name(name):
        raise ObjectNotFound(
            f"{name!r} is not a backup name",
            hint="names look like base_000000010000000000000002_00000028; walship backup-list "
            "shows them, or use LATEST",
        )
    key = layout.sentinel_key(name)
    try:
        with storage.get(key) as fh:
            raw = fh.read(1 << 20)
    except ObjectNotFound:
        raise ObjectNotFound(
            f"backup {name} does not exist in {storage.url} (or it never completed)",
            hint="walship backup-list shows the complete backups",
        ) from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"sentinel of backup {name} is not JSON") from None
    if isinstance(data, dict) and int(data.get("format", 0) or 0) > SENTINEL_FORMAT:
        raise IntegrityError(f"backup {name} was written by a newer walship",
                             hint="upgrade walship on this host")
    info = BackupInfo.from_json(data, where=f"sentinel of backup {name}")
    if info.name != name:
        raise IntegrityError(f"sentinel of backup {name} describes backup {info.name}",
                             hint="the store was tampered with or objects were moved")
    return info


def list_backups(storage: Storage) -> list[BackupInfo]:
    """Every complete backup in the store, oldest first. Malformed sentinels are skipped with
    a warning (the listing must still show the good ones at 3 a.m.)."""
    backups = []
    for obj in storage.list(layout.BACKUP_PREFIX):
        name = layout.backup_name_from_sentinel_key(obj.key)
        if name is None:
            continue
        try:
            backups.append(read_backup_info(storage, name))
        except (IntegrityError, ObjectNotFound) as exc:
            _log.warning("skipping backup %s: %s", name, exc.message)
    backups.sort(key=lambda b: b.sort_key)
    return backups


@contextmanager
def _storage_of(config_or_storage: Config | Storage) -> Iterator[Storage]:
    if isinstance(config_or_storage, Storage):
        yield config_or_storage
        return
    storage = open_storage(config_or_storage.require_store(), config_or_storage)
    try:
        yield storage
    finally:
        storage.close()


def backup_list(config: Config) -> list[BackupInfo]:
    """Complete backups in the configured store, oldest first. Needs no decryption key."""
    with _storage_of(config) as storage:
        return list_backups(storage)


def resolve_backup(config_or_storage: Config | Storage, name: str,
                   before: datetime | None = None, *, before_lsn: int | None = None
                   ) -> BackupInfo:
    """Backup `name`, or for LATEST the newest complete backup; with `before`, the newest
    that finished before that time (so that recovery can reach it), with `before_lsn` the
    newest that ends at or before that LSN. ObjectNotFound when there is none."""
    with _storage_of(config_or_storage) as storage:
        if name.upper() != LATEST:
            return read_backup_info(storage, name)
        candidates = list_backups(storage)
        if before is not None:
            candidates = [b for b in candidates if b.stop_time < before]
        if before_lsn is not None:
            candidates = [b for b in candidates if b.stop_lsn <= before_lsn]
        if not candidates:
            if before is not None or before_lsn is not None:
                limit = before.isoformat() if before is not None else \
                    wal.format_lsn(before_lsn or 0)
                raise ObjectNotFound(
                    f"no complete backup in {storage.url} finished before {limit}",
                    hint="recovery must start from a backup that ended before the target; "
                    "walship backup-list shows what there is",
                )
            raise ObjectNotFound(f"there are no complete backups in {storage.url}",
                                 hint="take one with walship backup-push PGDATA")
        return candidates[-1]


def format_size(n: float) -> str:
    """A byte count for people: 12 B, 3.4 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_table(backups: list[BackupInfo]) -> str:
    """backup-list's human table: one line per backup, oldest first."""
    if not backups:
        return "no backups"
    header = ("name", "timeline", "start_lsn", "stop_lsn", "stop_time", "pg", "data", "stored")
    rows = [header] + [
        (b.name, str(b.timeline), wal.format_lsn(b.start_lsn), wal.format_lsn(b.stop_lsn),
         b.stop_time.isoformat(timespec="seconds"), b.pg_version, format_size(b.data_bytes),
         format_size(b.stored_bytes))
        for b in backups
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
