"""status: the archive's state at a glance, for operators and for monitoring.

Everything comes from one listing of wal/ and basebackups/ (names, sizes, modified times), the
backups' plain sentinels, and the drills' plain records, so status works on any host that can
read the store, including one holding only the public key. When a server is reachable through
the libpq settings (PGHOST, PGPORT, ... or the configured DSN), its pg_stat_archiver and
current WAL position give the archive lag; an unreachable server is a fact in the report, not
an error.

`--prometheus` prints the node_exporter textfile-collector format: gauges prefixed walship_,
times as unix seconds. A sample whose value is unknown (no backup yet, no drill yet, no
server) is left out rather than given a made-up value, so that absent() alerts work.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from walship import layout, wal
from walship.config import Config
from walship.errors import IntegrityError
from walship.ops.backup_list import BackupInfo, list_backups
from walship.ops.drill import read_record
from walship.ops.identity import read_identity
from walship.storage import open_storage, redact_url
from walship.storage.base import Storage

# Seconds to wait for the server: status runs from cron and monitoring, and a host that
# cannot reach the database must still report the archive.
CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class WalState:
    """What the listing of wal/ says."""

    objects: int
    stored_bytes: int
    newest_segment: str | None
    newest_modified: float | None  # unix seconds, when the store says


@dataclass(frozen=True)
class ServerState:
    """The server's archiver, when one was reachable."""

    reachable: bool
    error: str | None = None
    in_recovery: bool | None = None
    current_wal: str | None = None
    current_lsn: int | None = None
    archived_count: int | None = None
    last_archived_wal: str | None = None
    last_archived_time: datetime | None = None
    failed_count: int | None = None
    last_failed_wal: str | None = None
    last_failed_time: datetime | None = None

    @property
    def failing(self) -> bool | None:
        """Whether the server's last archiving attempt failed."""
        if not self.reachable or self.failed_count is None:
            return None
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time

    def to_json(self) -> dict[str, Any]:
        """The server part of `status --json`."""
        return {
            "reachable": self.reachable,
            "error": self.error,
            "in_recovery": self.in_recovery,
            "current_wal": self.current_wal,
            "current_lsn": wal.format_lsn(self.current_lsn) if self.current_lsn is not None
            else None,
            "archived_count": self.archived_count,
            "last_archived_wal": self.last_archived_wal,
            "last_archived_time": _iso(self.last_archived_time),
            "failed_count": self.failed_count,
            "last_failed_wal": self.last_failed_wal,
            "last_failed_time": _iso(self.last_failed_time),
            "failing": self.failing,
        }


@dataclass
class StatusReport:
    """Everything `walship status` reports. `now` is when it was taken (unix seconds)."""

    store: str
    now: float
    wal: WalState
    backups: list[BackupInfo]
    backup_stored_bytes: int
    server: ServerState | None = None
    last_drill: dict[str, Any] | None = None
    last_successful_drill: dict[str, Any] | None = None
    wal_segment_size: int | None = None
    notes: list[str] = field(default_factory=list)

    # -- derived figures ----------------------------------------------------------------

    @property
    def newest_wal_age(self) -> float | None:
        """Seconds since the newest segment was stored."""
        modified = self.wal.newest_modified
        return max(0.0, self.now - modified) if modified is not None else None

    def lag(self) -> tuple[int, int] | None:
        """(segments, bytes) the server has written but the store does not hold yet: complete
        segments after the newest archived one up to the server's current one (which is still
        being written), and the bytes from the end of the newest archived segment to the
        server's current position. None when unknown (no server, a standby, other timeline)."""
        server = self.server
        newest = self.wal.newest_segment
        size = self.wal_segment_size
        if (server is None or not server.reachable or server.in_recovery
                or server.current_lsn is None or server.current_wal is None or newest is None
                or size is None):
            return None
        current = wal.parse_wal_name(server.current_wal)
        archived = wal.parse_wal_name(newest)
        if current.timeline != archived.timeline:
            return None
        segments = max(0, current.segno(size) - archived.segno(size) - 1)
        archived_end = (archived.segno(size) + 1) * size
        return segments, max(0, server.current_lsn - archived_end)

    @staticmethod
    def _backup_json(info: BackupInfo | None, now: float) -> dict[str, Any] | None:
        if info is None:
            return None
        return {"name": info.name, "stop_time": info.stop_time.isoformat(),
                "age_seconds": round(max(0.0, now - info.stop_time.timestamp()), 3),
                "timeline": info.timeline, "stored_bytes": info.stored_bytes}

    def to_json(self) -> dict[str, Any]:
        """`status --json`."""
        lag = self.lag()
        age = self.newest_wal_age
        return {
            "store": self.store,
            "time": datetime.fromtimestamp(self.now, timezone.utc).isoformat(),
            "wal": {
                "objects": self.wal.objects,
                "newest": self.wal.newest_segment,
                "newest_modified": _iso_unix(self.wal.newest_modified),
                "newest_age_seconds": round(age, 3) if age is not None else None,
            },
            "backups": {
                "count": len(self.backups),
                "newest": self._backup_json(self.backups[-1] if self.backups else None,
                                            self.now),
                "oldest": self._backup_json(self.backups[0] if self.backups else None,
                                            self.now),
            },
            "stored_bytes": {"wal": self.wal.stored_bytes, "backups": self.backup_stored_bytes,
                             "total": self.wal.stored_bytes + self.backup_stored_bytes},
            "server": self.server.to_json() if self.server is not None else None,
            "archive_lag": {"segments": lag[0], "bytes": lag[1]} if lag is not None else None,
            "last_drill": self.last_drill,
            "last_successful_drill": _drill_summary(self.last_successful_drill),
            "notes": self.notes,
        }

    def render(self) -> str:
        """The human report."""
        doc = self.to_json()
        lines = [f"store: {self.store}"]
        w = doc["wal"]
        if w["newest"]:
            lines.append(f"newest WAL: {w['newest']}, stored {_age(w['newest_age_seconds'])} ago"
                         f" ({w['objects']} WAL objects)")
        else:
            lines.append("newest WAL: none archived")
        if self.server is not None:
            if not self.server.reachable:
                lines.append(f"server: unreachable ({self.server.error})")
            else:
                lag = doc["archive_lag"]
                text = (f"{lag['segments']} segment(s), {lag['bytes']} bytes behind"
                        if lag else "lag unknown")
                lines.append(f"server: current WAL {self.server.current_wal}, {text}"
                             + (", ARCHIVING IS FAILING" if self.server.failing else ""))
        b = doc["backups"]
        if b["count"]:
            lines.append(f"backups: {b['count']}; newest {b['newest']['name']} "
                         f"({_age(b['newest']['age_seconds'])} ago), oldest "
                         f"{b['oldest']['name']} ({_age(b['oldest']['age_seconds'])} ago)")
        else:
            lines.append("backups: none")
        sizes = doc["stored_bytes"]
        lines.append(f"stored: {sizes['wal']} bytes of WAL, {sizes['backups']} bytes of backups")
        drill = self.last_drill
        if drill is None:
            lines.append("last drill: never")
        else:
            verdict = "passed" if drill.get("ok") else f"FAILED: {drill.get('reason')}"
            lines.append(f"last drill: {drill.get('when')} on backup {drill.get('backup')}: "
                         f"{verdict}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _iso_unix(value: float | None) -> str | None:
    return datetime.fromtimestamp(value, timezone.utc).isoformat() if value is not None else None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _drill_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: record.get(k) for k in ("when", "backup", "target", "ok")}


# --- Gathering --------------------------------------------------------------------------------


def wal_state(storage: Storage) -> WalState:
    """One listing of wal/: object count and bytes, and the newest segment (by WAL order)."""
    objects = size = 0
    newest: wal.WalName | None = None
    newest_modified: float | None = None
    for obj in storage.list(layout.WAL_PREFIX):
        objects += 1
        size += obj.size
        name = layout.wal_name_from_key(obj.key)
        if name is None:
            continue
        parsed = wal.parse_wal_name(name)
        if parsed.kind is wal.WalKind.SEGMENT and (newest is None or newest < parsed):
            newest, newest_modified = parsed, obj.modified
    return WalState(objects, size, newest.name if newest else None, newest_modified)


def server_state(dsn: str | None) -> ServerState:
    """The server's archiver and WAL position through libpq; unreachable is a state."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    try:
        conninfo = make_conninfo(dsn or "", connect_timeout=CONNECT_TIMEOUT,
                                 application_name="walship status")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(
                "select pg_is_in_recovery(), archived_count, last_archived_wal,"
                " last_archived_time, failed_count, last_failed_wal, last_failed_time"
                " from pg_stat_archiver").fetchone()
            assert row is not None
            current_lsn: int | None = None
            current_wal: str | None = None
            if not row[0]:
                lsn_text, current_wal = conn.execute(
                    "select pg_current_wal_lsn()::text,"
                    " pg_walfile_name(pg_current_wal_lsn())").fetchone() or (None, None)
                current_lsn = wal.parse_lsn(str(lsn_text)) if lsn_text else None
    except (psycopg.Error, psycopg.ProgrammingError) as exc:
        text = str(exc).strip()
        return ServerState(False, text.splitlines()[0] if text else type(exc).__name__)
    return ServerState(True, None, bool(row[0]), current_wal, current_lsn, int(row[1]), row[2],
                       row[3], int(row[4]), row[5], row[6])


def _read_drill(storage: Storage, notes: list[str], *, success_only: bool
                ) -> dict[str, Any] | None:
    try:
        return read_record(storage, success_only=success_only)
    except IntegrityError as exc:
        notes.append(exc.message)
        return None


def status(config: Config, *, server: bool = True) -> StatusReport:
    """Gather the report from the configured store (and the server, when `server`)."""
    url = config.require_store()
    storage = open_storage(url, config)
    notes: list[str] = []
    try:
        wal_info = wal_state(storage)
        backup_bytes = sum(obj.size for obj in storage.list(layout.BACKUP_PREFIX))
        backups = list_backups(storage)
        last = _read_drill(storage, notes, success_only=False)
        last_ok = _read_drill(storage, notes, success_only=True)
        segment_size = backups[-1].wal_segment_size if backups else _identity_size(storage)
    finally:
        storage.close()
    return StatusReport(
        store=redact_url(url), now=time.time(), wal=wal_info, backups=backups,
        backup_stored_bytes=backup_bytes,
        server=server_state(config.dsn) if server else None, last_drill=last,
        last_successful_drill=last_ok, wal_segment_size=segment_size, notes=notes)


def _identity_size(storage: Storage) -> int | None:
    """The segment size from identity.json (plain JSON), for an archive without backups."""
    try:
        identity = read_identity(storage)
    except (IntegrityError, ValueError, KeyError, TypeError):
        return None
    return identity.wal_segment_size if identity else None


# --- Prometheus -------------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Metrics:
    """Collects samples and prints each metric family once, HELP and TYPE first."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, help_text: str, value: float | None,
            labels: dict[str, str] | None = None, kind: str = "gauge") -> None:
        if value is None:
            return
        full = "walship_" + name
        family = self._families.setdefault(full, (help_text, kind, []))
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{_escape_label(v)}"'
                                        for k, v in sorted(labels.items())) + "}"
        family[2].append(f"{full}{label_text} {_number(value)}")

    def text(self) -> str:
        out = []
        for name, (help_text, kind, samples) in self._families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n" if out else ""


def _drill_time(record: dict[str, Any] | None, key: str = "when") -> float | None:
    if record is None or not record.get(key):
        return None
    try:
        return datetime.fromisoformat(str(record[key])).timestamp()
    except ValueError:
        return None


def format_prometheus(report: StatusReport) -> str:
    """The report in the node_exporter textfile-collector format."""
    m = _Metrics()
    m.add("status_timestamp_seconds", "When walship status read the store.", report.now)
    m.add("wal_objects", "Objects under wal/ in the store.", report.wal.objects)
    m.add("last_archived_wal_timestamp_seconds",
          "When the store last wrote the newest archived WAL segment.",
          report.wal.newest_modified)
    m.add("last_archived_wal_age_seconds", "Seconds since the newest WAL segment was stored.",
          report.newest_wal_age)
    m.add("backup_count", "Complete base backups in the store.", len(report.backups))
    if report.backups:
        m.add("newest_backup_timestamp_seconds", "When the newest complete backup finished.",
              report.backups[-1].stop_time.timestamp())
        m.add("oldest_backup_timestamp_seconds", "When the oldest complete backup finished.",
              report.backups[0].stop_time.timestamp())
    m.add("stored_bytes", "Bytes stored, by kind.", report.wal.stored_bytes, {"kind": "wal"})
    m.add("stored_bytes", "Bytes stored, by kind.", report.backup_stored_bytes,
          {"kind": "backup"})
    server = report.server
    if server is not None:
        m.add("server_up", "Whether the database server answered (1) or not (0).",
              1 if server.reachable else 0)
        failing = server.failing
        m.add("archiver_failing", "Whether the server's last archiving attempt failed.",
              None if failing is None else int(failing))
        m.add("archiver_failed_count", "pg_stat_archiver.failed_count.", server.failed_count)
        m.add("archiver_last_archived_timestamp_seconds",
              "pg_stat_archiver.last_archived_time.",
              server.last_archived_time.timestamp() if server.last_archived_time else None)
    lag = report.lag()
    if lag is not None:
        m.add("archive_lag_segments", "Complete WAL segments the server wrote that the store "
              "does not hold yet.", lag[0])
        m.add("archive_lag_bytes", "WAL bytes between the end of the newest archived segment "
              "and the server's current position.", lag[1])
    last = report.last_drill
    if last is not None:
        m.add("last_drill_timestamp_seconds", "When the last drill started.", _drill_time(last))
        m.add("last_drill_success", "Whether the last drill passed (1) or failed (0).",
              1 if last.get("ok") else 0)
        figures = last.get("figures") or {}
        duration = sum(float(figures.get(k) or 0) for k in ("restore_seconds", "replay_seconds"))
        m.add("last_drill_duration_seconds", "Restore plus replay time of the last drill.",
              duration if last.get("ok") else None)
        replayed = figures.get("replayed_wal_bytes")
        m.add("last_drill_replayed_wal_bytes", "WAL bytes the last drill replayed.",
              int(replayed) if isinstance(replayed, int) else None)
    m.add("last_successful_drill_timestamp_seconds", "When the last successful drill started.",
          _drill_time(report.last_successful_drill))
    return m.text()
