"""verify: is the archive whole, and to which moments can each backup restore?

What is checked (docs/verify.md), from the listing and object metadata alone unless --deep,
so that it works on the database host with only the public key:

- per timeline, the WAL chain each backup needs: its timeline from its start segment on, and
  every timeline that descends from it (branched at or after the backup's stop LSN), through
  the switch points the .history files give (the segment holding a switch point is read from
  the new timeline, as PostgreSQL does), up to the newest segment archived on that timeline.
  A gap is named. A gap before the backup's stop segment makes the backup unusable;
- each complete backup's objects: every partition and file list, the manifest and the
  sentinel present, their stored sizes adding up to the sentinel's stored_bytes, and each
  one's size against the manifest where the manifest can be decrypted;
- leftovers of backups without a sentinel, timelines without their .history file;
- the recoverability window: for each backup and timeline, from the backup's stop time to
  the last commit in the unbroken WAL after it (the `last-commit` metadata wal-push records,
  stepping back to the newest segment that has one);
- --deep: every object downloaded and authenticated (bounded by `concurrency`), every WAL
  object against its recorded SHA-256 and size, every backup file against the manifest's
  SHA-256. Needs the decryption key.

The report lists problems; verify_archive never raises for what it finds (only for what stops
it from looking: an unreachable store, a missing key with --deep). VerifyReport.raise_for_problems
turns problems into VerificationFailed (exit 16).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO, cast

from walship import layout, log, pipeline, tarstream, wal, walrecords
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import (
    IntegrityError,
    KeyMismatch,
    ObjectNotFound,
    VerificationFailed,
    WalshipError,
)
from walship.ops.backup_fetch import Manifest, read_manifest
from walship.ops.backup_list import BackupInfo, read_backup_info
from walship.ops.identity import read_identity
from walship.ops.locks import BACKUP_LOCK, read_lock
from walship.ops.retention import _backup_position
from walship.ops.wal_push import (
    META_COMMIT_SCAN,
    META_LAST_COMMIT,
    META_PARENT_TIMELINE,
    META_SHA256,
    META_SIZE,
    META_SWITCH_LSN,
)
from walship.storage import open_storage
from walship.storage.base import ObjectInfo, Storage

_log = log.get("verify")

# Missing segment names listed in full in the JSON report; beyond this only the count.
MAX_LISTED_MISSING = 1000
# ... and in the human report.
_MAX_SHOWN_MISSING = 8
_BACKUP_KEY_RE = re.compile(r"^" + re.escape(layout.BACKUP_PREFIX) + r"([^/]+)/(.+)$")
_HISTORY_READ = 1 << 20


# --- The report ---------------------------------------------------------------------------


def _utc(moment: datetime) -> str:
    """A time as the report prints it: UTC, with microseconds (they matter for targets)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


@dataclass(frozen=True)
class Window:
    """Where one backup can restore to on one timeline.

    status: "ok" (start..end), "no-commit" (no transaction committed after the backup in the
    unbroken WAL: only its end is reachable), "unknown" (commit times not recorded),
    "unrestorable" (WAL the backup itself needs is missing).
    """

    status: str
    start: datetime | None
    end: datetime | None
    end_segment: str | None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/verify.md)."""
        return {"status": self.status, "from": _iso(self.start), "to": _iso(self.end),
                "to_segment": self.end_segment, "reason": self.reason or None}


@dataclass(frozen=True)
class Chain:
    """The WAL one backup needs to reach the newest segment of one timeline."""

    timeline: int
    first: str
    last: str | None  # None: no segment of this timeline is archived yet
    segments: int
    missing: tuple[str, ...]
    missing_count: int
    unbroken_to: str | None  # the newest segment reachable without a gap
    window: Window

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/verify.md)."""
        return {"timeline": self.timeline, "from": self.first, "to": self.last,
                "segments": self.segments, "complete": self.missing_count == 0,
                "missing": list(self.missing), "missing_count": self.missing_count,
                "unbroken_to": self.unbroken_to, "window": self.window.to_json()}


@dataclass
class BackupReport:
    """One complete backup: its objects and its chains."""

    info: BackupInfo
    objects: int = 0
    stored_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    manifest_checked: bool = False
    deep_checked: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/verify.md)."""
        info = self.info
        return {"name": info.name, "timeline": info.timeline,
                "start_wal": info.start_segment, "stop_wal": info.stop_segment,
                "start_lsn": wal.format_lsn(info.start_lsn),
                "stop_lsn": wal.format_lsn(info.stop_lsn), "stop_time": _iso(info.stop_time),
                "objects": self.objects, "stored_bytes": self.stored_bytes,
                "manifest_checked": self.manifest_checked, "deep_checked": self.deep_checked,
                "ok": not self.problems and all(c.missing_count == 0 for c in self.chains),
                "problems": list(self.problems), "chains": [c.to_json() for c in self.chains]}


@dataclass(frozen=True)
class TimelineReport:
    """What the store holds for one timeline."""

    timeline: int
    parent: int | None
    switch_lsn: int | None
    ancestry: str  # "root" (timeline 1), "history" (read from the .history file),
    # "metadata" (from its object metadata), "unknown"
    segments: int
    oldest: str | None
    newest: str | None
    partial: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/verify.md)."""
        return {"timeline": self.timeline, "parent": self.parent,
                "switch_lsn": None if self.switch_lsn is None else wal.format_lsn(self.switch_lsn),
                "ancestry": self.ancestry, "segments": self.segments, "oldest": self.oldest,
                "newest": self.newest, "partial": list(self.partial)}


@dataclass
class VerifyReport:
    """Everything verify found."""

    store: str
    deep: bool
    checked_at: datetime
    segment_size: int
    timelines: list[TimelineReport] = field(default_factory=list)
    backups: list[BackupReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deep_objects: int = 0
    deep_bytes: int = 0

    @property
    def all_problems(self) -> list[str]:
        """Store-wide problems, then each backup's and each gap, in report order."""
        result = list(self.problems)
        for backup in self.backups:
            result.extend(backup.problems)
        return result

    @property
    def ok(self) -> bool:
        """Whether everything is whole."""
        return not self.all_problems

    def to_json(self) -> str:
        """`verify --json` (docs/verify.md)."""
        data = {
            "ok": self.ok, "store": self.store, "deep": self.deep,
            "checked_at": _iso(self.checked_at), "wal_segment_size": self.segment_size,
            "timelines": [t.to_json() for t in self.timelines],
            "backups": [b.to_json() for b in self.backups],
            "problems": self.all_problems, "notes": list(self.notes),
        }
        if self.deep:
            data["deep_objects"] = self.deep_objects
            data["deep_bytes"] = self.deep_bytes
        return json.dumps(data, indent=2)

    def render(self) -> str:
        """The human report: timelines, then each backup and its windows, then problems."""
        lines = [f"store {self.store}, checked {_utc(self.checked_at)}"
                 + (" (deep: every object downloaded and authenticated)" if self.deep else "")]
        for tl in self.timelines:
            where = ""
            if tl.parent is not None and tl.switch_lsn is not None:
                where = f", branched from timeline {tl.parent} at {wal.format_lsn(tl.switch_lsn)}"
            elif tl.ancestry == "unknown":
                where = ", ancestry unknown"
            span = f"{tl.oldest} .. {tl.newest}" if tl.oldest else "no segments yet"
            partial = f", partial: {', '.join(tl.partial)}" if tl.partial else ""
            lines.append(f"timeline {tl.timeline}{where}: {_n(tl.segments, 'segment')}, "
                         f"{span}{partial}")
        if not self.backups:
            lines.append("no complete backups")
        for backup in self.backups:
            info = backup.info
            state = "whole" if not backup.problems else "BROKEN"
            checked = "deep-checked" if backup.deep_checked else \
                "sizes checked against the manifest" if backup.manifest_checked else \
                "sizes checked against the sentinel"
            lines.append(f"backup {info.name}: {state} ({_n(info.partitions, 'partition')}, "
                         f"{_n(backup.objects, 'object')}, {backup.stored_bytes} bytes stored, "
                         f"{checked}); "
                         f"ended {_utc(info.stop_time)} on timeline {info.timeline}")
            for chain in backup.chains:
                lines.append("  " + _render_chain(info, chain))
        problems = self.all_problems
        for note in self.notes:
            lines.append(f"note: {note}")
        if any(c.window.status == "ok" for b in self.backups for c in b.chains):
            lines.append("note: with --target-time T, PostgreSQL replays up to T and stops at the "
                         "first commit after T, so T must be before the window's end; to include "
                         "the last commit, restore without a target (to the end of the archive)")
        if problems:
            lines.append(f"{_n(len(problems), 'problem')}:")
            lines.extend(f"  - {p}" for p in problems)
        else:
            lines.append("everything is whole")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """VerificationFailed (exit 16) when anything is missing or broken."""
        problems = self.all_problems
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise VerificationFailed(
                f"the archive is not whole: {problems[0]}{more}",
                hint="treat the archive as not recoverable past the reported point; take a new "
                "backup-push at once and investigate",
            )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _render_chain(info: BackupInfo, chain: Chain) -> str:
    window = chain.window
    head = f"timeline {chain.timeline}: "
    if chain.missing_count:
        shown = ", ".join(chain.missing[:_MAX_SHOWN_MISSING])
        extra = chain.missing_count - min(len(chain.missing), _MAX_SHOWN_MISSING)
        gap = f"WAL gap: {_n(chain.missing_count, 'segment')} missing ({shown}" + \
            (f", and {extra} more" if extra > 0 else "") + ")"
    else:
        gap = f"WAL complete from {chain.first} to {chain.last or chain.first}"
    if window.status == "ok":
        assert window.start is not None and window.end is not None
        says = (f"can restore to any moment between {_utc(window.start)} and "
                f"{_utc(window.end)}")
    elif window.status == "no-commit":
        says = (f"can restore only to the end of the backup ({_utc(info.stop_time)}): "
                f"{window.reason}")
    elif window.status == "unknown":
        says = f"can restore from {_utc(info.stop_time)}, end unknown: {window.reason}"
    else:
        says = f"CANNOT restore: {window.reason}"
    return f"{head}{says}; {gap}"


# --- Reading the store ----------------------------------------------------------------------


@dataclass
class _Wal:
    """The archived WAL as the listing shows it."""

    objects: dict[str, ObjectInfo]
    segments: dict[int, dict[int, str]]  # timeline -> segno -> name
    partial: dict[int, list[str]]
    histories: dict[int, str]  # timeline -> name


def _list_wal(storage: Storage, segment_size: int) -> _Wal:
    objects: dict[str, ObjectInfo] = {}
    segments: dict[int, dict[int, str]] = {}
    partial: dict[int, list[str]] = {}
    histories: dict[int, str] = {}
    for info in storage.list(layout.WAL_PREFIX):
        name = layout.wal_name_from_key(info.key)
        if name is None:
            continue
        objects[name] = info
        parsed = wal.parse_wal_name(name)
        if parsed.kind is wal.WalKind.SEGMENT:
            segments.setdefault(parsed.timeline, {})[parsed.segno(segment_size)] = name
        elif parsed.kind is wal.WalKind.PARTIAL:
            partial.setdefault(parsed.timeline, []).append(name)
        elif parsed.kind is wal.WalKind.TIMELINE_HISTORY:
            histories[parsed.timeline] = name
    return _Wal(objects, segments, partial, histories)


class _Metadata:
    """Object metadata: from the listing where the backend includes it (local, GCS), else
    one stat per object, cached (S3 lists no metadata)."""

    def __init__(self, storage: Storage, objects: Mapping[str, ObjectInfo]) -> None:
        self.storage = storage
        self.objects = objects
        self.cache: dict[str, Mapping[str, str]] = {}
        self.lock = threading.Lock()

    def known(self, name: str) -> Mapping[str, str] | None:
        """The metadata if the listing had it or it was asked for already; None otherwise."""
        with self.lock:
            if name in self.cache:
                return self.cache[name]
        listed = self.objects.get(name)
        if listed is not None and META_SHA256 in listed.metadata:
            return listed.metadata
        return None

    def get(self, name: str) -> Mapping[str, str]:
        meta = self.known(name)
        if meta is not None:
            return meta
        try:
            meta = self.storage.stat(layout.wal_key(name)).metadata
        except ObjectNotFound:
            meta = {}
        with self.lock:
            self.cache[name] = meta
        return meta


@dataclass(frozen=True)
class _Parent:
    parent: int
    switch_lsn: int
    source: str  # "history" or "metadata"


def _read_parent(storage: Storage, keyring: Keyring, name: str,
                 metadata: _Metadata) -> _Parent | None:
    """A timeline's parent and switch point: from the .history file where it can be read
    (plain, or a key is configured), else from the metadata wal-push recorded."""
    try:
        with storage.get(layout.wal_key(name)) as fh:
            blob = fh.read(_HISTORY_READ)
        text = pipeline.decode_bytes(blob, keyring).decode("utf-8", "replace")
        switches = wal.parse_timeline_history(text)
        if switches:
            return _Parent(switches[-1].parent, switches[-1].switch_lsn, "history")
    except (KeyMismatch, IntegrityError, ObjectNotFound, ValueError) as exc:
        _log.debug("cannot read %s: %s", name, getattr(exc, "message", exc))
    meta = metadata.get(name)
    try:
        return _Parent(int(meta[META_PARENT_TIMELINE]), wal.parse_lsn(meta[META_SWITCH_LSN]),
                       "metadata")
    except (KeyError, ValueError):
        return None


class _Graph:
    """Timelines and their parents, as far as the history files (or metadata) tell."""

    def __init__(self, parents: Mapping[int, _Parent | None]) -> None:
        self.parents = parents

    def path(self, backup: BackupInfo, timeline: int) -> list[tuple[int, int]] | None:
        """[(timeline, LSN where recovery starts reading it)] from the backup's timeline to
        `timeline`; None if recovery from the backup cannot reach it or it is unknown."""
        steps: list[tuple[int, int]] = []
        current = timeline
        while current != backup.timeline:
            if current < backup.timeline:
                return None
            parent = self.parents.get(current)
            if parent is None or parent.parent >= current:
                return None
            steps.append((current, parent.switch_lsn))
            current = parent.parent
        # Recovery must reach the backup's end before it can follow a switch.
        if steps and steps[-1][1] < backup.stop_lsn:
            return None
        steps.append((backup.timeline, backup.start_lsn))
        return list(reversed(steps))

    def unknown_descendant(self, backup: BackupInfo, timeline: int) -> bool:
        """Whether `timeline`'s ancestry is unknown somewhere above the backup's timeline."""
        current = timeline
        while current > backup.timeline:
            parent = self.parents.get(current)
            if parent is None:
                return True
            current = parent.parent
        return False


# --- The checks ---------------------------------------------------------------------------


class _Verifier:
    def __init__(self, storage: Storage, keyring: Keyring, deep: bool) -> None:
        self.storage = storage
        self.keyring = keyring
        self.deep = deep
        self.deep_lock = threading.Lock()
        self.deep_objects = 0
        self.deep_bytes = 0

    # -- backups ---------------------------------------------------------------------------

    def backup_objects(self) -> dict[str, dict[str, ObjectInfo]]:
        result: dict[str, dict[str, ObjectInfo]] = {}
        for info in self.storage.list(layout.BACKUP_PREFIX):
            match = _BACKUP_KEY_RE.match(info.key)
            if match:
                result.setdefault(match.group(1), {})[match.group(2)] = info
        return result

    def check_backup_objects(self, report: BackupReport, objects: Mapping[str, ObjectInfo]
                             ) -> Manifest | None:
        """Presence and sizes; returns the manifest when it could be read."""
        info = report.info
        name = info.name
        expected = [layout.backup_partition_key(name, i) for i in range(info.partitions)]
        expected += [layout.backup_partition_files_key(name, i) for i in range(info.partitions)]
        expected.append(layout.backup_manifest_key(name))
        prefix = layout.backup_prefix(name)
        sizes: dict[str, int] = {}
        for key in expected:
            obj = objects.get(key[len(prefix):])
            if obj is None:
                report.problems.append(f"backup {name}: {key[len(prefix):]} is missing")
            else:
                sizes[key] = obj.size
        report.objects = len(sizes) + 1  # and the sentinel
        report.stored_bytes = sum(sizes.values())
        manifest: Manifest | None = None
        try:
            # A missing manifest is reported above: no GET for it, no second report.
            if layout.MANIFEST_NAME in objects:
                manifest = read_manifest(self.storage, self.keyring, info)
        except KeyMismatch:
            if self.deep:
                raise
        except IntegrityError as exc:
            report.problems.append(f"backup {name}: {exc.message}")
        if manifest is not None:
            report.manifest_checked = True
            for part in manifest.partitions:
                index = int(part["index"])
                for key, want in ((layout.backup_partition_key(name, index), part["stored_bytes"]),
                                  (layout.backup_partition_files_key(name, index),
                                   part["files_stored_bytes"])):
                    if key in sizes and sizes[key] != int(want):
                        report.problems.append(
                            f"backup {name}: {key[len(prefix):]} is {sizes[key]} bytes, the "
                            f"manifest says {int(want)}")
        # The sentinel's stored_bytes covers partitions, file lists and the manifest: a check
        # that needs no key.
        if len(sizes) == len(expected) and report.stored_bytes != info.stored_bytes:
            report.problems.append(
                f"backup {name}: its objects hold {report.stored_bytes} bytes, the sentinel "
                f"says {info.stored_bytes} (an object is truncated or was replaced)")
        return manifest

    def deep_partition(self, name: str, part: Mapping[str, Any]) -> list[str]:
        """Download a partition and its file list; check every file's size and SHA-256."""
        index = int(part["index"])
        where = f"backup {name} partition {index}"
        try:
            with self.storage.get(layout.backup_partition_files_key(name, index)) as fh:
                blob = fh.read()
            plain = pipeline.decode_bytes(blob, self.keyring)
            self._count(len(blob))
            if hashlib.sha256(plain).hexdigest() != part["files_sha256"]:
                return [f"{where}: its file list does not match the manifest"]
            doc = json.loads(plain)
            records = {r.path: r for r in (tarstream.FileRecord.from_json(x)
                                           for x in doc["files"])}
            tar_sha = part.get("tar_sha256")  # older backups only: new ones store null
            with self.storage.get(layout.backup_partition_key(name, index)) as raw, \
                    pipeline.decode(raw, self.keyring, digest=tar_sha is not None) as stream:
                problems = _check_tar(cast(BinaryIO, stream), records, where)
                while stream.read(tarstream.READ_SIZE):
                    pass  # to the end: the last chunk is authenticated (and hashed)
                if tar_sha is not None and stream.plaintext_sha256 != tar_sha:
                    problems.append(f"{where}: the tar stream does not match the manifest")
            self._count(int(part.get("stored_bytes", 0)))
            return problems
        except KeyMismatch:
            raise
        except (WalshipError, ValueError, KeyError, TypeError) as exc:
            return [f"{where}: {getattr(exc, 'message', exc)}"]

    def _count(self, n: int) -> None:
        with self.deep_lock:
            self.deep_objects += 1
            self.deep_bytes += n

    # -- WAL -------------------------------------------------------------------------------

    def deep_wal(self, name: str, metadata: _Metadata, segment_size: int) -> list[str]:
        """Download one WAL object: authenticated, and the SHA-256 and size wal-push recorded."""
        key = layout.wal_key(name)
        try:
            # Metadata not listed nor seen yet comes with the download (one GetObject on
            # S3) rather than from a stat of its own.
            known = metadata.known(name)
            if known is None:
                info, raw = self.storage.get_with_info(key)
                meta: Mapping[str, str] = info.metadata
            else:
                raw, meta = self.storage.get(key), known
            with raw, pipeline.decode(raw, self.keyring) as stream:
                while stream.read(tarstream.READ_SIZE):
                    pass
                digest, size = stream.plaintext_sha256, stream.plaintext_size
            self._count(size)
        except KeyMismatch:
            raise
        except WalshipError as exc:
            return [f"WAL {name}: {exc.message}"]
        problems = []
        if meta.get(META_SHA256) and meta[META_SHA256] != digest:
            problems.append(f"WAL {name}: its content does not match the SHA-256 recorded "
                            "when it was pushed")
        if meta.get(META_SIZE) and meta[META_SIZE] != str(size):
            problems.append(f"WAL {name}: {size} bytes, {meta[META_SIZE]} when pushed")
        if wal.parse_wal_name(name).kind is wal.WalKind.SEGMENT and size != segment_size:
            problems.append(f"WAL {name}: {size} bytes, segments are {segment_size}")
        return problems


def _check_tar(stream: BinaryIO, expected: Mapping[str, tarstream.FileRecord], where: str
               ) -> list[str]:
    """Read a tar stream without writing anything: every member as the file list says."""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            for member in tar:
                record = expected.get(member.name)
                if record is None or member.name in seen:
                    return [f"{where}: member {member.name!r} is not in its file list"]
                seen.add(member.name)
                if record.is_dir:
                    if not member.isdir():
                        return [f"{where}: member {member.name!r} has the wrong type"]
                    continue
                if not member.isfile() or member.size != record.size:
                    return [f"{where}: member {member.name!r} is {member.size} bytes, the "
                            f"file list says {record.size}"]
                data = tar.extractfile(member)
                assert data is not None
                digest = hashlib.sha256()
                while chunk := data.read(tarstream.READ_SIZE):
                    digest.update(chunk)
                if digest.hexdigest() != record.sha256:
                    return [f"{where}: {member.name} does not match its SHA-256 in the manifest"]
    except tarfile.TarError as exc:
        return [f"{where}: not a valid tar stream ({exc})"]
    missing = expected.keys() - seen
    if missing:
        return [f"{where}: {len(missing)} files are missing, e.g. {sorted(missing)[0]}"]
    return []


def _chain(backup: BackupInfo, timeline: int, path: list[tuple[int, int]], wal_: _Wal,
           metadata: _Metadata, segment_size: int) -> tuple[Chain, list[str]]:
    """The segments recovery from `backup` reads to reach the newest of `timeline`."""
    needed: list[tuple[int, int]] = []  # (timeline, segno), in replay order
    last_segno = max(wal_.segments.get(timeline, {}), default=None)
    for i, (tli, begin_lsn) in enumerate(path):
        begin = begin_lsn // segment_size
        if i + 1 < len(path):
            # The segment holding the next switch point is read from the next timeline.
            end = path[i + 1][1] // segment_size
        else:
            end = max(last_segno + 1 if last_segno is not None else begin, begin)
        needed.extend((tli, s) for s in range(begin, end))
    stop_segno = max(backup.stop_lsn - 1, backup.start_lsn) // segment_size
    if not needed or needed[-1][1] < stop_segno:
        # Nothing archived yet on the last timeline: at least the backup's own WAL is needed.
        tli = path[-1][0] if len(path) > 1 else backup.timeline
        have_to = needed[-1][1] + 1 if needed else backup.start_lsn // segment_size
        needed.extend((tli, s) for s in range(have_to, stop_segno + 1))

    def name_of(tli: int, segno: int) -> str:
        return wal.segment_from_segno(tli, segno, segment_size).name

    missing = [(t, s) for t, s in needed if s not in wal_.segments.get(t, {})]
    missing_names = tuple(name_of(t, s) for t, s in missing[:MAX_LISTED_MISSING])
    problems: list[str] = []
    first_gap = needed.index(missing[0]) if missing else len(needed)
    unbroken = needed[:first_gap]
    if missing and missing[0][1] <= stop_segno:
        window = Window("unrestorable", None, None, None,
                        f"{name_of(*missing[0])}, which the backup itself needs, is missing")
        problems.append(f"backup {backup.name}: WAL segment {name_of(*missing[0])} is missing: "
                        "the backup cannot be restored")
    else:
        window = _window(backup, unbroken, metadata, name_of, stop_segno, gap=bool(missing))
        if missing:
            count = len(missing)
            problems.append(
                f"backup {backup.name}, timeline {timeline}: WAL gap of {_n(count, 'segment')} "
                f"starting at {name_of(*missing[0])}: recovery stops at "
                f"{name_of(*unbroken[-1]) if unbroken else 'the backup start'}")
    chain = Chain(timeline=timeline, first=name_of(*needed[0]),
                  last=name_of(*needed[-1]) if last_segno is not None else None,
                  segments=len(needed), missing=missing_names, missing_count=len(missing),
                  unbroken_to=name_of(*unbroken[-1]) if unbroken else None, window=window)
    return chain, problems


def _window(backup: BackupInfo, unbroken: list[tuple[int, int]], metadata: _Metadata,
            name_of: Callable[[int, int], str], stop_segno: int, *, gap: bool) -> Window:
    """From the backup's stop time to the last commit in the unbroken WAL after it."""
    start = backup.stop_time
    none = ("no transaction committed after it in the archived WAL before the gap" if gap
            else "no transaction committed after it in the archived WAL")
    for tli, segno in reversed(unbroken):
        name = name_of(tli, segno)
        meta = metadata.get(name)
        text = meta.get(META_LAST_COMMIT)
        if text:
            try:
                end = walrecords.parse_time(text)
            except ValueError:
                return Window("unknown", start, None, None,
                              f"{name} carries a malformed last-commit ({text!r})")
            if end <= start:
                return Window("no-commit", start, start, name, none)
            return Window("ok", start, end, name)
        if META_COMMIT_SCAN not in meta:
            return Window("unknown", start, None, None,
                          f"{name} was archived without commit times (by a walship older than "
                          "this one, or before the upgrade); they are known for segments "
                          "pushed from now on")
        if segno < stop_segno:
            break  # older WAL cannot hold a commit after the backup's end
    return Window("no-commit", start, start, None, none)


def _timelines(wal_: _Wal, parents: Mapping[int, _Parent | None]) -> list[TimelineReport]:
    result = []
    for tli in sorted(set(wal_.segments) | set(wal_.histories) | set(wal_.partial)):
        segs = wal_.segments.get(tli, {})
        names = [segs[s] for s in sorted(segs)]
        parent = parents.get(tli)
        ancestry = "root" if tli == 1 else parent.source if parent else "unknown"
        result.append(TimelineReport(
            tli, parent.parent if parent else None, parent.switch_lsn if parent else None,
            ancestry, len(names), names[0] if names else None, names[-1] if names else None,
            tuple(sorted(wal_.partial.get(tli, ())))))
    return result


def _run_pool(jobs: Iterable[Callable[[], list[str]]], workers: int) -> list[str]:
    """Run `jobs` on `workers` threads; their problems in job order. KeyMismatch stops all."""
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                problems.extend(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return problems


def verify_archive(config: Config, *, deep: bool = False) -> VerifyReport:
    """Check the configured store (see the module docstring); never raises for what it finds."""
    keyring = Keyring.from_config(config)
    with open_storage(config.require_store(), config) as store:
        return _verify(config, store, keyring, deep)


def _verify(config: Config, storage: Storage, keyring: Keyring, deep: bool) -> VerifyReport:
    if deep and not keyring.decrypt_with and keyring.encrypts:
        raise KeyMismatch("verify --deep downloads and decrypts every object, and no "
                          "decryption key is configured",
                          hint="run it where the private key (or the secret key) is configured;"
                          " without --deep, verify needs only the public key")
    verifier = _Verifier(storage, keyring, deep)
    identity = read_identity(storage)
    backup_objects = verifier.backup_objects()
    infos: list[BackupInfo] = []
    problems: list[str] = []
    notes: list[str] = []
    incomplete: list[str] = []
    for name, objects in sorted(backup_objects.items()):
        if layout.SENTINEL_NAME not in objects:
            incomplete.append(name)
            continue
        try:
            infos.append(read_backup_info(storage, name))
        except (IntegrityError, ObjectNotFound) as exc:
            problems.append(f"backup {name}: {exc.message}")
    infos.sort(key=lambda b: b.sort_key)
    segment_size = identity.wal_segment_size if identity else \
        infos[-1].wal_segment_size if infos else wal.DEFAULT_SEGMENT_SIZE
    wal_ = _list_wal(storage, segment_size)
    metadata = _Metadata(storage, wal_.objects)
    report = VerifyReport(store=storage.url, deep=deep, checked_at=datetime.now(timezone.utc),
                          segment_size=segment_size, problems=problems, notes=notes)

    # Backups without a sentinel: a push in progress (it holds the lock) or a push that died
    # (or a sentinel deleted): not usable either way.
    lock = read_lock(storage, BACKUP_LOCK) if incomplete else None
    newest = infos[-1].sort_key[:2] if infos else (0, 0)
    for name in incomplete:
        if lock is not None and _position(name, segment_size) > newest:
            notes.append(f"backup {name} has no sentinel yet: {lock.describe()} is pushing it")
        else:
            problems.append(f"backup {name} has no sentinel (sentinel.json): its push died or the "
                            "sentinel was deleted; it cannot be restored")
    if not infos and not problems:
        problems.append("there is no complete backup in the store: nothing can be restored "
                        "(take one with walship backup-push)")

    # Timelines.
    parents: dict[int, _Parent | None] = {}
    for tli, name in wal_.histories.items():
        parents[tli] = _read_parent(storage, keyring, name, metadata)
        if parents[tli] is None:
            notes.append(f"timeline {tli}: {name} cannot be read (encrypted, no decryption key,"
                         " and pushed without the parent-timeline metadata): its ancestry is "
                         "unknown")
    for tli in sorted(wal_.segments):
        if tli > 1 and tli not in wal_.histories:
            problems.append(f"timeline {tli} has WAL but {tli:08X}.history is not in the "
                            "archive: recovery cannot follow it")
    graph = _Graph(parents)
    report.timelines = _timelines(wal_, parents)

    # Each backup: objects, then chains and windows.
    manifests: dict[str, Manifest] = {}
    for info in infos:
        backup = BackupReport(info)
        report.backups.append(backup)
        manifest = verifier.check_backup_objects(backup, backup_objects.get(info.name, {}))
        if manifest is not None:
            manifests[info.name] = manifest
        timelines = sorted(set(wal_.segments) | set(wal_.histories) | {info.timeline})
        for tli in timelines:
            path = graph.path(info, tli)
            if path is None:
                if tli > info.timeline and graph.unknown_descendant(info, tli):
                    notes.append(f"backup {info.name}: timeline {tli} not checked, its "
                                 "ancestry is unknown")
                continue
            chain, chain_problems = _chain(info, tli, path, wal_, metadata, segment_size)
            backup.chains.append(chain)
            backup.problems.extend(chain_problems)

    if deep:
        jobs: list[Callable[[], list[str]]] = []
        for info in infos:
            manifest = manifests.get(info.name)
            if manifest is None:
                continue
            for part in manifest.partitions:
                jobs.append(functools.partial(verifier.deep_partition, info.name, part))
        for name in sorted(wal_.objects):
            jobs.append(functools.partial(verifier.deep_wal, name, metadata, segment_size))
        found = _run_pool(jobs, max(1, config.concurrency))
        for backup in report.backups:
            backup.deep_checked = backup.info.name in manifests
            mine = f"backup {backup.info.name} "
            backup.problems.extend(p for p in found if p.startswith(mine))
        report.problems.extend(p for p in found if not p.startswith("backup "))
        report.deep_objects = verifier.deep_objects
        report.deep_bytes = verifier.deep_bytes
    return report


def _position(name: str, segment_size: int) -> tuple[int, int]:
    try:
        return _backup_position(name, segment_size)
    except ValueError:
        return (0, 0)
