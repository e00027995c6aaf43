"""Everything that talks to PostgreSQL: one session for a base backup, and the checks before it.

A non-exclusive backup lives as long as the session that started it: if walship dies, the
connection drops and the server forgets the backup by itself. So the session is held open
for the whole copy, with TCP keepalives so that a dead network path is noticed, and with the
session timeouts that could kill an idle-looking session (statement_timeout,
idle_session_timeout) turned off for it.

psycopg reads the libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, ...) itself; walship
only passes `config.dsn` when one is set.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from walship import wal
from walship.errors import LocalIOError, PostgresError

# Seconds: notice a dead peer within about 30 + 6 x 10 = 90 s instead of the kernel's hours.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
APPLICATION_NAME = "walship backup-push"
_CONNECT_HINT = ("set PGHOST, PGPORT, PGUSER (and PGPASSWORD or ~/.pgpass), or give --dsn; "
                 "backup-push runs on the database host")


@dataclass(frozen=True)
class ServerInfo:
    """What backup-push needs to know about the server before it starts."""

    version_num: int  # server_version_num, e.g. 150006
    version: str  # e.g. "15.6"
    data_directory: Path
    in_recovery: bool
    archive_mode: str
    archive_command: str
    archive_library: str
    system_identifier: int | None  # None when pg_control_system() is not granted
    catalog_version: int | None
    wal_segment_size: int

    @property
    def major(self) -> int:
        """The major version (10, 11, ... 17)."""
        return self.version_num // 10000

    @property
    def tablespace_version_dir(self) -> str:
        """The directory a tablespace holds for this server (TABLESPACE_VERSION_DIRECTORY)."""
        if self.catalog_version is None:
            raise PostgresError("cannot read the catalog version (pg_control_system())",
                                hint="grant execute on function pg_control_system() to the "
                                "backup role, or run backup-push as a superuser")
        return f"PG_{self.major}_{self.catalog_version}"


@dataclass(frozen=True)
class ArchiverStatus:
    """pg_stat_archiver."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None

    @property
    def failing(self) -> bool:
        """Whether the last attempt failed (a failure newer than the last success)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


@dataclass(frozen=True)
class BackupStart:
    """What pg_backup_start said."""

    lsn: int
    timeline: int
    time: datetime


@dataclass(frozen=True)
class BackupStop:
    """What pg_backup_stop said: the files to write into the restored data directory."""

    lsn: int
    backup_label: str
    tablespace_map: str
    time: datetime


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (psycopg's carry DETAIL/HINT lines after)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Session:
    """One connection to the server, held for the duration of a backup."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, dsn: str | None) -> Session:
        """Connect with `dsn` or the libpq environment; PostgresError if that fails."""
        try:
            conn = psycopg.connect(dsn or "", autocommit=True, application_name=APPLICATION_NAME,
                                   keepalives=1, keepalives_idle=KEEPALIVE_IDLE,
                                   keepalives_interval=KEEPALIVE_INTERVAL,
                                   keepalives_count=KEEPALIVE_COUNT)
        except psycopg.Error as exc:
            raise PostgresError(f"cannot connect to postgresql: {first_line(exc)}",
                                hint=_CONNECT_HINT) from None
        session = cls(conn)
        # The copy can take hours while this session sits idle; the role's or database's
        # timeouts must not end it (that would abort the backup).
        session._execute("set statement_timeout = 0")
        if conn.info.server_version >= 140000:
            session._execute("set idle_session_timeout = 0")
        return session

    def close(self) -> None:
        """Close the connection (aborts a backup in progress, which is what we want then)."""
        self._conn.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _execute(self, sql: str, params: tuple[Any, ...] = (), *, what: str | None = None
                 ) -> list[tuple[Any, ...]]:
        try:
            with self._conn.cursor() as cur:
                cur.execute(sql.encode(), params)  # bytes: a constant, never composed
                return cur.fetchall() if cur.description is not None else []
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PostgresError(
                f"{what or 'query'} refused: {first_line(exc)}",
                hint="run backup-push as a superuser, or grant the backup role "
                "pg_read_all_settings, pg_monitor and execute on the backup functions",
            ) from None
        except psycopg.OperationalError as exc:
            raise PostgresError(f"lost the connection to postgresql during {what or 'a query'}: "
                                f"{first_line(exc)}") from None
        except psycopg.Error as exc:
            raise PostgresError(f"{what or 'query'} failed: {first_line(exc)}") from None

    def _one(self, sql: str, params: tuple[Any, ...] = (), *, what: str) -> tuple[Any, ...]:
        rows = self._execute(sql, params, what=what)
        if not rows:
            raise PostgresError(f"{what} returned no rows")
        return rows[0]

    def server_info(self) -> ServerInfo:
        """Version, data directory, archiving settings, identity."""
        version_num, version, datadir, in_recovery, archive_mode, archive_command = self._one(
            "select current_setting('server_version_num')::int, current_setting('server_version'),"
            " current_setting('data_directory'), pg_is_in_recovery(),"
            " current_setting('archive_mode'), current_setting('archive_command')",
            what="reading server settings")
        archive_library = ""
        if version_num >= 150000:
            (archive_library,) = self._one("select current_setting('archive_library')",
                                           what="reading archive_library")
        sysid: int | None = None
        catversion: int | None = None
        # Not granted to every backup role: then the pg_control file check is skipped.
        with contextlib.suppress(PostgresError):
            sysid, catversion = self._one(
                "select system_identifier, catalog_version_no from pg_control_system()",
                what="reading pg_control_system()")
        (segment_size,) = self._one("select bytes_per_wal_segment from pg_control_init()",
                                    what="reading the WAL segment size")
        return ServerInfo(
            version_num=int(version_num),
            version=str(version).split()[0],
            data_directory=Path(datadir),
            in_recovery=bool(in_recovery),
            archive_mode=str(archive_mode),
            archive_command=str(archive_command or ""),
            archive_library=str(archive_library or ""),
            system_identifier=int(sysid) if sysid is not None else None,
            catalog_version=int(catversion) if catversion is not None else None,
            wal_segment_size=int(segment_size),
        )

    def archiver_status(self) -> ArchiverStatus:
        """The server's pg_stat_archiver row."""
        row = self._one(
            "select archived_count, last_archived_wal, last_archived_time, failed_count,"
            " last_failed_wal, last_failed_time from pg_stat_archiver",
            what="reading pg_stat_archiver")
        return ArchiverStatus(int(row[0]), row[1], row[2], int(row[3]), row[4], row[5])

    def database_bytes(self) -> int | None:
        """Roughly how much there is to copy (for the progress display), if we may know."""
        try:
            (total,) = self._one(
                "select sum(pg_database_size(oid))::bigint from pg_database where datallowconn",
                what="sizing databases")
        except PostgresError:
            return None
        return int(total) if total is not None else None

    def now(self) -> datetime:
        """The server's clock, with its offset."""
        (value,) = self._one("select clock_timestamp()", what="reading the clock")
        assert isinstance(value, datetime)
        return value

    def backup_start(self, label: str, fast: bool, version_num: int) -> BackupStart:
        """Start a non-exclusive backup in this session."""
        started = self.now()
        if version_num >= 150000:
            sql, params = "select pg_backup_start(%s, %s)::text", (label, fast)
        else:
            sql, params = "select pg_start_backup(%s, %s, false)::text", (label, fast)
        (lsn_text,) = self._one(sql, params, what="starting the backup")
        lsn = wal.parse_lsn(lsn_text)
        (walfile,) = self._one("select pg_walfile_name(%s::pg_lsn)", (lsn_text,),
                               what="reading the timeline")
        return BackupStart(lsn, int(str(walfile)[:8], 16), started)

    def backup_stop(self, version_num: int) -> BackupStop:
        """Stop the backup; the server switches to a new segment and archives .backup.

        wait_for_archive is false: walship waits for the archive itself, with a timeout,
        by looking in the store (the server's own wait never gives up).
        """
        if version_num >= 150000:
            sql = "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)"
        else:
            sql = "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, false)"
        lsn_text, label, spcmap = self._one(sql, what="stopping the backup")
        return BackupStop(wal.parse_lsn(lsn_text), str(label), str(spcmap or ""), self.now())


def check_archiving(info: ServerInfo, status: ArchiverStatus) -> None:
    """Refuse to back up a server whose WAL is not being archived: the backup would be
    unrestorable. PostgresError with what to fix."""
    if info.in_recovery:
        raise PostgresError(
            "the server is in recovery (a standby)",
            hint="run backup-push against the primary; backups from a standby are not "
            "supported yet",
        )
    if info.archive_mode not in ("on", "always"):
        raise PostgresError(
            f"archive_mode is {info.archive_mode}: the server does not archive WAL, so a "
            "backup could not be restored",
            hint="set archive_mode = on and archive_command = 'walship wal-push %p', "
            "then restart postgresql",
        )
    if info.archive_library:
        raise PostgresError(
            f"the server archives through archive_library {info.archive_library!r}, not "
            "walship",
            hint="set archive_library = '' and archive_command = 'walship wal-push %p'",
        )
    command = info.archive_command.strip()
    if not command or command == "(disabled)":
        raise PostgresError(
            "archive_command is empty: WAL is not being archived",
            hint="set archive_command = 'walship wal-push %p' and reload postgresql",
        )
    if status.failing:
        raise PostgresError(
            f"archiving is failing: {status.last_failed_wal} failed at "
            f"{status.last_failed_time} and nothing was archived since",
            hint="fix archive_command first (see the server log); a backup needs its WAL "
            "archived",
        )


def read_control_system_identifier(pgdata: Path) -> int:
    """The system identifier in PGDATA/global/pg_control (its first field, native order)."""
    path = pgdata / "global" / "pg_control"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise LocalIOError(
            f"cannot read {path}: {exc.strerror}",
            hint="give backup-push the server's data directory, and run it as its owner",
        ) from None
    if len(head) != 8:
        raise LocalIOError(f"{path} is truncated")
    (sysid,) = struct.unpack("=Q", head)
    return int(sysid)


def check_pgdata(pgdata: Path, info: ServerInfo) -> None:
    """Refuse a PGDATA that is not the connected server's data directory."""
    if not (pgdata / "PG_VERSION").is_file():
        raise PostgresError(f"{pgdata} is not a postgresql data directory (no PG_VERSION)",
                            hint="give backup-push the server's data directory")
    try:
        same = pgdata.samefile(info.data_directory)
    except OSError:
        same = False
    if not same:
        raise PostgresError(
            f"{pgdata} is not the data directory of the server walship connected to "
            f"(that is {info.data_directory})",
            hint="check PGHOST/PGPORT or --dsn, and run backup-push on the database host",
        )
    if info.system_identifier is not None:
        on_disk = read_control_system_identifier(pgdata)
        if on_disk != info.system_identifier:
            raise PostgresError(
                f"{pgdata} belongs to cluster {on_disk}, but the server is cluster "
                f"{info.system_identifier}",
                hint="check PGHOST/PGPORT or --dsn",
            )
