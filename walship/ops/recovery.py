"""Recovery targets and the recovery settings backup-fetch writes into a restored directory.

What backup-fetch writes (docs/backups.md, "What backup-fetch writes"):

- always restore_command = '<walship> wal-fetch %f %p' and recovery_target_timeline =
  'latest', and recovery.signal: a restored directory without them cannot even start (its
  pg_wal is empty), and "restore, start, get the database back up to the end of the archive"
  is what an operator expects, as pgBackRest's restore does. To make a standby instead,
  add standby.signal and primary_conninfo; standby mode wins over recovery.signal;
- with a target, the target and recovery_target_action = 'promote', so the server opens for
  writes on a new timeline when it reaches the target rather than pausing.

Settings go into postgresql.auto.conf (PostgreSQL 12 and later), after commenting out any
recovery settings the backup carried from an earlier restore: left in place they would
combine with the new target ("multiple recovery targets specified") or override it. For
PostgreSQL 10 and 11 they go into recovery.conf instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from walship import wal
from walship.errors import LocalIOError, UsageError

TARGET_KINDS = ("time", "lsn", "xid", "name", "immediate")

_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,6})\d*)?)?)?"
    r"\s*(Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?$",
    re.IGNORECASE,
)
# Restore point names: at most MAXFNAMELEN - 1 bytes (pg_create_restore_point).
_MAX_RESTORE_POINT = 63
_MAX_XID = (1 << 64) - 1

# Settings backup-fetch owns: commented out where an earlier restore left them behind.
_RECOVERY_KEY_RE = re.compile(r"^\s*(restore_command|recovery_target\w*)\s*(=|\s)", re.I)


def parse_target_time(text: str) -> datetime:
    """'2026-11-21 06:00:00+00', ISO 8601 with T or a space, Z/UTC or an offset, or none
    (then the local time zone of this host). UsageError in one line otherwise."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise UsageError(
            f"{text!r} is not a time",
            hint="use YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM], e.g. '2026-11-21 06:00:00+00'",
        )
    year, month, day, hour, minute, second, frac, zone = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), int((frac or "0").ljust(6, "0")))
    except ValueError as exc:
        raise UsageError(f"{text!r} is not a time: {exc}") from None
    if zone is None:
        # The operator's wall clock; written to PostgreSQL with the offset made explicit, so
        # that the server and the choice of LATEST agree whatever the server's TimeZone.
        return moment.astimezone()
    if zone.upper() in ("Z", "UTC", "GMT"):
        return moment.replace(tzinfo=timezone.utc)
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
    if hours > 15 or minutes > 59:
        raise UsageError(f"{text!r} has an impossible time zone offset {zone}")
    return moment.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops: kind is one of time, lsn, xid, name, immediate.

    `value` is normalised on construction (an LSN as PostgreSQL prints it, a time in ISO form
    with its offset); construction raises UsageError for a value that is not of its kind.
    """

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        kind = self.kind.lower()
        value = self.value.strip() if self.value else ""
        if kind not in TARGET_KINDS:
            raise UsageError(f"unknown recovery target kind {self.kind!r}",
                             hint=f"use one of {', '.join(TARGET_KINDS)}")
        if kind == "time":
            value = parse_target_time(value).isoformat(sep=" ")
        elif kind == "lsn":
            try:
                value = wal.format_lsn(wal.parse_lsn(value))
            except ValueError:
                raise UsageError(f"{self.value!r} is not an LSN",
                                 hint="an LSN looks like 0/3000060 (see pg_current_wal_lsn())"
                                 ) from None
        elif kind == "xid":
            if not value.isdigit() or not 3 <= int(value) <= _MAX_XID:
                raise UsageError(f"{self.value!r} is not a transaction id",
                                 hint="give a number such as 7654 (see txid_current())")
            value = str(int(value))
        elif kind == "name":
            if not value:
                raise UsageError("the restore point name is empty")
            if len(value.encode()) > _MAX_RESTORE_POINT or "\n" in value or "\r" in value:
                raise UsageError(f"{self.value!r} is not a restore point name",
                                 hint="restore point names are at most 63 bytes, one line")
            value = self.value  # names are exact, spaces included
        else:
            value = ""
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", value)

    @classmethod
    def parse(cls, kind: str, value: str | None = None) -> RecoveryTarget:
        """From a command-line option: parse("time", "2026-11-21 06:00:00+00")."""
        return cls(kind, value or "")

    @property
    def time(self) -> datetime | None:
        """The target time, for a time target."""
        return datetime.fromisoformat(self.value) if self.kind == "time" else None

    @property
    def lsn(self) -> int | None:
        """The target LSN, for an LSN target."""
        return wal.parse_lsn(self.value) if self.kind == "lsn" else None

    def settings(self) -> dict[str, str]:
        """The recovery_target* settings (unquoted values)."""
        if self.kind == "immediate":
            return {"recovery_target": "immediate"}
        return {f"recovery_target_{self.kind}": self.value}

    def describe(self) -> str:
        """'time 2026-11-21 06:00:00+00:00'."""
        return self.kind if self.kind == "immediate" else f"{self.kind} {self.value}"


def quote(value: str) -> str:
    """A postgresql.conf string literal: single quotes, quotes doubled, backslashes escaped."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise UsageError(f"setting value {value[:60]!r} spans lines",
                         hint="recovery settings must be one line")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(restore_command: str, target: RecoveryTarget | None) -> dict[str, str]:
    """The settings backup-fetch writes, in order (values unquoted)."""
    settings = {"restore_command": restore_command}
    if target is not None:
        settings.update(target.settings())
        settings["recovery_target_action"] = "promote"
    settings["recovery_target_timeline"] = "latest"
    return settings


def _write(path: Path, text: str, *, exclusive: bool) -> None:
    """Create `path` (exclusive) or replace it atomically; mode 0600 either way."""
    temp = path if exclusive else path.with_name(f".{path.name}.walship.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        if not exclusive:
            temp.replace(path)
    except OSError as exc:
        raise LocalIOError(f"cannot write {path}: {exc.strerror}") from None


def _comment_out_recovery(text: str, why: str) -> str:
    lines = []
    for line in text.splitlines():
        if _RECOVERY_KEY_RE.match(line):
            lines.append(f"# {line}  # {why}")
        else:
            lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


def write_recovery_config(datadir: Path, restore_command: str, target: RecoveryTarget | None,
                          *, pg_version_num: int, comment: str = "") -> Path:
    """Write the recovery settings (and recovery.signal) into a restored data directory.

    Returns the file the settings went into.
    """
    settings = recovery_settings(restore_command, target)
    body = "".join(f"{key} = {quote(value)}\n" for key, value in settings.items())
    header = f"# recovery settings written by walship backup-fetch{comment}\n"
    if pg_version_num < 120000:
        path = datadir / "recovery.conf"
        _write(path, header + body, exclusive=True)
        return path
    path = datadir / "postgresql.auto.conf"
    try:
        existing = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise LocalIOError(f"cannot read {path}: {exc.strerror}") from None
    kept = _comment_out_recovery(existing, "replaced by walship backup-fetch")
    if kept and not kept.endswith("\n"):
        kept += "\n"
    _write(path, kept + header + body, exclusive=False)
    # Not exclusive: an empty signal file is the same whoever made it.
    _write(datadir / "recovery.signal", "", exclusive=False)
    return path
