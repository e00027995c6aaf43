"""drill: the automated restore test. Restore a backup into a scratch directory, start
PostgreSQL on it with walship as restore_command, replay, promote, check, report, tear down.

What a drill proves is what a real restore needs: the backup downloads and verifies, every WAL
segment the replay needs fetches intact, the server reaches its target and promotes, and the
result passes amcheck and the operator's own SQL. docs/drill.md is the operator's guide;
walship/ops/scratch_server.py holds the scratch server (its safety: it must never touch
production; who runs it; the key copies restore_command needs).

Verdicts: every check passed -> ok. The server failing before it even began archive recovery
(binaries, shared memory, configuration) -> PostgresError (13): not the archive's fault.
Anything else (a backup that does not restore, a fetch that aborts recovery, a replay that
ends early or times out, amcheck or the user's SQL failing) -> VerificationFailed (16), with a
one-line reason from the evidence (the server log's FATAL line and walship's own error).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from walship import layout, log, wal
from walship.config import Config
from walship.errors import (
    IntegrityError,
    KeyMismatch,
    ObjectNotFound,
    PostgresError,
    VerificationFailed,
    WalshipError,
)
from walship.ops.backup_list import BackupInfo, resolve_backup
from walship.ops.recovery import RecoveryTarget
from walship.ops.scratch_server import (
    PORT,
    Scratch,
    ScratchServer,
    ServerUser,
    chown_tree,
    copy_keys,
    find_pg_bin,
    make_scratch,
    reason_from_log,
    recovery_began,
    server_environ,
    server_settings,
    server_user,
    write_private,
)
from walship.storage import open_storage, redact_url
from walship.storage.base import Storage

_log = log.get("drill")

RECORD_FORMAT = 1
DEFAULT_TIMEOUT = 3600.0
DEFAULT_SAMPLE = 10
_POLL = 0.5
# Errors from the store that say something about the archive itself: a drill that meets one
# failed. Others (store unreachable, access denied, bad configuration) are not a verdict on
# the archive and keep their own exit codes.
_ARCHIVE_ERRORS = (IntegrityError, KeyMismatch, ObjectNotFound)

@dataclass(frozen=True)
class DrillOptions:
    """What to drill: the command line's options."""

    target: RecoveryTarget | None = None  # None: replay the whole archive (--latest)
    backup: str = "LATEST"
    keep: bool = False
    pg_bin: Path | None = None
    check_sql: str | None = None
    check_db: str = "postgres"
    scratch: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    sample: int = DEFAULT_SAMPLE
    db_user: str | None = None
    pg_options: tuple[tuple[str, str], ...] = ()


@dataclass
class Check:
    """One check's result."""

    name: str
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """The check as JSON."""
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class DrillReport:
    """What a drill did and found; also the record kept in the store."""

    when: datetime
    store: str
    target: str
    host: str = field(default_factory=socket.gethostname)
    backup: str | None = None
    backup_start_lsn: int | None = None
    finished: datetime | None = None
    ok: bool = False
    reason: str | None = None
    exit_code: int = VerificationFailed.exit_code
    restore_seconds: float | None = None
    replay_seconds: float | None = None
    replayed_wal_bytes: int | None = None
    reached_lsn: int | None = None
    reached_time: datetime | None = None
    timeline: int | None = None
    checks: list[Check] = field(default_factory=list)
    pg_bin: str | None = None
    server_user: str | None = None
    scratch: str | None = None
    kept: bool = False
    recorded: bool = False

    def fail(self, reason: str, *, exit_code: int = VerificationFailed.exit_code) -> None:
        """Mark the drill failed; the first reason is the one reported."""
        if self.reason is None:
            self.reason = reason
            self.exit_code = exit_code
        self.ok = False

    def to_json(self) -> dict[str, Any]:
        """`drill --json`'s object, which is also what drills/last.json holds."""
        return {
            "format": RECORD_FORMAT,
            "when": self.when.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "host": self.host,
            "store": self.store,
            "backup": self.backup,
            "backup_start_lsn": (wal.format_lsn(self.backup_start_lsn)
                                 if self.backup_start_lsn is not None else None),
            "target": self.target,
            "ok": self.ok,
            "reason": self.reason,
            "exit_code": 0 if self.ok else self.exit_code,
            "figures": {
                "restore_seconds": _round(self.restore_seconds),
                "replay_seconds": _round(self.replay_seconds),
                "replayed_wal_bytes": self.replayed_wal_bytes,
                "reached_lsn": (wal.format_lsn(self.reached_lsn)
                                if self.reached_lsn is not None else None),
                "reached_time": self.reached_time.isoformat() if self.reached_time else None,
                "timeline": self.timeline,
            },
            "checks": [c.to_json() for c in self.checks],
            "pg_bin": self.pg_bin,
            "server_user": self.server_user,
            "scratch": self.scratch,
            "kept": self.kept,
            "recorded": self.recorded,
        }

    def render(self) -> str:
        """The human report."""
        lines = [f"drill {'passed' if self.ok else 'FAILED'}: backup {self.backup or '-'}, "
                 f"target {self.target}"]
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        figures = self.to_json()["figures"]
        for key in ("restore_seconds", "replay_seconds", "replayed_wal_bytes", "reached_lsn",
                    "reached_time", "timeline"):
            if figures[key] is not None:
                lines.append(f"  {key.replace('_', ' ')}: {figures[key]}")
        for check in self.checks:
            lines.append(f"  check {check.name}: {'ok' if check.ok else 'FAILED'}"
                         + (f" ({check.detail})" if check.detail else ""))
        if self.kept and self.scratch:
            lines.append(f"  kept: {self.scratch}")
        if not self.recorded:
            lines.append("  (the result could not be recorded in the store)")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """VerificationFailed (or PostgresError) with the reason, unless the drill passed."""
        if self.ok:
            return
        reason = self.reason or "a check failed"
        if self.exit_code == PostgresError.exit_code:
            raise PostgresError(f"drill: {reason}",
                                hint="the restored server could not start for reasons outside "
                                "the archive; see docs/drill.md")
        raise VerificationFailed(f"drill failed: {reason}",
                                 hint="the archive could not be restored as a drill expects; "
                                 "take a new base backup now and investigate")


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


# --- Talking to the scratch server ----------------------------------------------------------


def _connect(scratch: Scratch, user: str, dbname: str) -> Any:
    """A psycopg connection to the scratch server (its socket, trust authentication)."""
    import psycopg

    return psycopg.connect(host=str(scratch.socket_dir), port=PORT, user=user, dbname=dbname,
                           connect_timeout=10, autocommit=True,
                           application_name="walship drill")


@dataclass(frozen=True)
class Reached:
    """Where replay ended."""

    lsn: int
    time: datetime | None
    timeline: int


def _wait_promoted(server: ScratchServer, db_user: str, timeout: float) -> tuple[str, Reached]:
    """Poll until the server has left recovery; returns the database to use and where replay
    ended. VerificationFailed/PostgresError when the server dies or the time runs out."""
    import psycopg

    from walship.postgres import first_line

    deadline = time.monotonic() + timeout
    dbname = "postgres"
    last_error = "no connection yet"
    while True:
        status = server.exited()
        if status is not None:
            text = server.log_text()
            reason = reason_from_log(text) or f"the server exited with status {status}"
            if recovery_began(text):
                raise VerificationFailed(f"recovery aborted: {reason}")
            raise PostgresError(f"the restored server did not start: {reason}")
        try:
            with _connect(server.scratch, db_user, dbname) as conn:
                row = conn.execute("select pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    # Static after promotion: where replay ended, and the last commit replayed.
                    lsn, when, walfile = conn.execute(
                        "select pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),"
                        " pg_walfile_name(pg_current_wal_lsn())").fetchone() or (None,) * 3
                    if lsn is None:
                        raise VerificationFailed("the server opened without replaying any WAL")
                    timeline = wal.parse_wal_name(str(walfile)).timeline
                    return dbname, Reached(wal.parse_lsn(str(lsn)), when, timeline)
                last_error = "still in recovery"
        except psycopg.OperationalError as exc:
            message = first_line(exc)
            if f'database "{dbname}" does not exist' in message and dbname != "template1":
                dbname = "template1"
                continue
            if "role" in message and "does not exist" in message:
                raise PostgresError(f"cannot connect to the restored server: {message}",
                                    hint="give --db-user, a superuser of the backed-up "
                                    "cluster") from None
            last_error = message
        if time.monotonic() >= deadline:
            raise VerificationFailed(f"the server was still not promoted after {timeout:.0f}s "
                                     f"({last_error})")
        time.sleep(_POLL)


def _databases(scratch: Scratch, db_user: str, dbname: str) -> list[str]:
    with _connect(scratch, db_user, dbname) as conn:
        rows = conn.execute("select datname from pg_database where datallowconn"
                            " order by datname").fetchall()
    return [str(r[0]) for r in rows]


def _sample_tables(scratch: Scratch, db_user: str, dbname: str, count: int) -> list[str]:
    """Up to `count` user tables of one database, at random: across nightly drills, the
    sample covers every table over time, and each drill stays short."""
    if count <= 0:
        return []
    with _connect(scratch, db_user, dbname) as conn:
        rows = conn.execute(
            "select n.nspname, c.relname from pg_class c join pg_namespace n"
            " on n.oid = c.relnamespace where c.relkind in ('r', 'm')"
            " and c.relpersistence = 'p'"
            " and n.nspname not in ('pg_catalog', 'information_schema')"
            " and n.nspname not like 'pg\\_toast%%' and n.nspname not like 'pg\\_temp%%'"
            " order by random() limit %s", (count,)).fetchall()
    return [f"{r[0]}.{r[1]}" for r in rows]


def _pattern(qualified: str) -> str:
    """A pg_amcheck pattern that matches exactly schema.table (double quotes make it literal)."""
    schema, _, table = qualified.partition(".")
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))


def _client_env(env: Mapping[str, str]) -> dict[str, str]:
    # The restored configuration's timeouts must not cut the checks short.
    return {**env, "PGOPTIONS": "-c statement_timeout=0 -c lock_timeout=0",
            "PGCONNECT_TIMEOUT": "10"}


def run_amcheck(server: ScratchServer, db_user: str, database: str, tables: Sequence[str]
                ) -> Check:
    """pg_amcheck on the catalogs (with their indexes and TOAST) and the sampled tables."""
    scratch = server.scratch
    argv = [str(server.bindir / "pg_amcheck"), "--install-missing", "-h", str(scratch.socket_dir),
            "-p", str(PORT), "-U", db_user, "-d", database, "-s", "pg_catalog"]
    for table in tables:
        argv += ["-t", _pattern(table)]
    env = {k: v for k, v in server.env.items() if not k.startswith("PG")}
    env.update(HOME=server.env.get("HOME", "/"))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env=_client_env(env), cwd=scratch.root, **server.user.popen_args())
    except OSError as exc:
        return Check(f"amcheck {database}", False, f"cannot run pg_amcheck: {exc.strerror}")
    what = f"catalogs and {len(tables)} table(s)"
    if proc.returncode == 0:
        detail = what + (": " + ", ".join(tables) if tables else "")
        return Check(f"amcheck {database}", True, detail)
    output = (proc.stdout.strip() or proc.stderr.strip() or f"exit {proc.returncode}")
    return Check(f"amcheck {database}", False,
                 f"{what}: pg_amcheck exit {proc.returncode}: {output.splitlines()[0]}")


def run_check_sql(scratch: Scratch, db_user: str, database: str, sql: str) -> Check:
    """The operator's SQL must run without error; a single boolean result must be true."""
    import psycopg

    from walship.postgres import first_line

    try:
        with _connect(scratch, db_user, database) as conn:
            conn.execute("set statement_timeout = 0")
            cur = conn.execute(sql.encode())  # the operator's own SQL, as given
            rows = cur.fetchall() if cur.description is not None else []
    except psycopg.Error as exc:
        return Check("check-sql", False, f"error: {first_line(exc)}")
    if len(rows) == 1 and len(rows[0]) == 1 and isinstance(rows[0][0], bool):
        return Check("check-sql", rows[0][0], f"returned {str(rows[0][0]).lower()}")
    return Check("check-sql", True, f"ran without error ({len(rows)} row(s))")


def newest_archived_segment(storage: Storage, min_timeline: int) -> wal.WalName | None:
    """The newest segment on the highest timeline (>= min_timeline) in the archive: where a
    replay of the whole archive must end (recovery_target_timeline = 'latest' follows it)."""
    best: wal.WalName | None = None
    for obj in storage.list(layout.WAL_PREFIX):
        name = layout.wal_name_from_key(obj.key)
        if name is None:
            continue
        parsed = wal.parse_wal_name(name)
        if parsed.kind is not wal.WalKind.SEGMENT or parsed.timeline < min_timeline:
            continue
        if best is None or best < parsed:
            best = parsed
    return best


# --- The record in the store ----------------------------------------------------------------


def record_result(storage: Storage, report: DrillReport) -> None:
    """Write drills/last.json (and drills/last-success.json when the drill passed)."""
    data = json.dumps(report.to_json(), indent=2).encode() + b"\n"
    keys = [layout.drill_result_key()]
    if report.ok:
        keys.append(layout.drill_result_key(success_only=True))
    for key in keys:
        storage.put(key, io.BytesIO(data))


def read_record(storage: Storage, *, success_only: bool = False) -> dict[str, Any] | None:
    """The last drill's record (or the last successful one's), None if there is none. Plain
    JSON: readable with only the public key. IntegrityError if it is not a drill record."""
    key = layout.drill_result_key(success_only=success_only)
    try:
        with storage.get(key) as fh:
            raw = fh.read(1 << 20)
    except ObjectNotFound:
        return None
    try:
        doc = json.loads(raw)
        assert isinstance(doc, dict) and isinstance(doc.get("ok"), bool)
        datetime.fromisoformat(str(doc["when"]))
    except (ValueError, AssertionError, KeyError):
        raise IntegrityError(f"{key} is not a walship drill record",
                             hint="remove it; the next drill writes a new one") from None
    return doc


# --- The drill ------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_root_warning() -> Iterator[None]:
    """backup-fetch warns that a tree restored as root needs a chown; the drill does it."""
    logger = log.get("backup_fetch")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("restored as root")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _prepare_datadir(scratch: Scratch, user: ServerUser) -> None:
    """Files the scratch server needs that a backup may not carry, and the ownership."""
    pgdata = scratch.pgdata
    conf = pgdata / "postgresql.conf"
    if not conf.exists():  # Debian keeps it in /etc/postgresql, outside the data directory
        write_private(conf, b"# written by walship drill: the backup had none\n")
    # Recovery, then promotion: a backup of a standby must not come back as a standby.
    with contextlib.suppress(FileNotFoundError):
        (pgdata / "standby.signal").unlink()
    write_private(scratch.hba_file, b"# walship drill: only the server's user and root can "
                   b"reach the 0700 socket directory\nlocal all all trust\n")
    write_private(scratch.ident_file, b"")
    scratch.socket_dir.mkdir(mode=0o700)
    chown_tree(scratch.root, user)


def _preflight(walship_command: str, scratch: Scratch, user: ServerUser,
               env: Mapping[str, str]) -> None:
    """The server's user must reach the scratch directory and run walship, or every fetch
    fails: say so now, before the download."""
    script = f"cd {shlex.quote(str(scratch.root))} && {walship_command} --version"
    try:
        proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                              env=dict(env), timeout=120, check=False, **user.popen_args())
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresError(f"cannot run a shell as {user.name}: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
        raise PostgresError(
            f"user {user.name} cannot run walship in {scratch.root}: {detail.splitlines()[-1]}",
            hint=f"install walship where {user.name} can execute it, and give --scratch a "
            f"directory {user.name} can reach (not under /root)")


def _remove_scratch(scratch: Scratch, keep: bool, config: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(scratch.keys)  # never leave key copies behind, even with --keep
    if keep:
        return
    # A prefetcher started by restore_command leaves once recovery.signal is gone; give it a
    # moment so that it does not write into a tree being removed.
    from walship import spool
    from walship.ops import background, prefetch

    pf_lock = prefetch.prefetch_dir(spool.spool_dir(config, scratch.pgdata / "pg_wal")) / ".lock"
    with contextlib.suppress(FileNotFoundError):
        (scratch.pgdata / "recovery.signal").unlink()

    deadline = time.monotonic() + 5
    with contextlib.suppress(OSError):
        while pf_lock.exists() and background.is_locked(pf_lock) and time.monotonic() < deadline:
            time.sleep(0.1)
    shutil.rmtree(scratch.root, ignore_errors=True)
    if scratch.root.exists():
        _log.warning("could not remove the drill's scratch directory %s", scratch.root)


def drill(config: Config, options: DrillOptions, *, walship_command: Callable[[Config], str],
          environ: Mapping[str, str]) -> DrillReport:
    """Run one drill; returns the report (already recorded in the store when possible).

    `walship_command(config)` is how PostgreSQL should run walship with that configuration
    (restore_command becomes '<it> wal-fetch %f %p'); `environ` is the environment the server
    and restore_command inherit (minus walship's and libpq's variables). Store and
    configuration errors that say nothing about the archive are raised as they are; verdicts
    (ok, VerificationFailed, PostgresError) come back in the report: see raise_for_failure().
    """
    target = options.target
    report = DrillReport(when=datetime.now(timezone.utc), store=redact_url(config.require_store()),
                         target=target.describe() if target else "latest")
    storage = open_storage(config.require_store(), config)
    try:
        try:
            info = resolve_backup(storage, options.backup, target.time if target else None,
                                  before_lsn=target.lsn if target else None)
        except _ARCHIVE_ERRORS as exc:
            report.fail(f"no backup to restore: {exc.message}")
            info = None
        if info is not None:
            report.backup, report.backup_start_lsn = info.name, info.start_lsn
            try:
                bindir = find_pg_bin(options.pg_bin, info.pg_version_num,
                                     environ.get("PATH", os.defpath))
                report.pg_bin = str(bindir)
                user = server_user()
                report.server_user = user.name
            except PostgresError as exc:
                report.fail(exc.message, exit_code=PostgresError.exit_code)
            else:
                try:
                    _drill_backup(config, options, storage, info, bindir, user, report,
                                  walship_command, environ)
                except PostgresError as exc:
                    report.fail(exc.message, exit_code=PostgresError.exit_code)
        report.ok = report.reason is None
        report.finished = datetime.now(timezone.utc)
        try:
            record_result(storage, report)
            report.recorded = True
        except WalshipError as exc:
            _log.warning("could not record the drill's result in the store: %s", exc.message)
    finally:
        storage.close()
    return report


def _drill_backup(config: Config, options: DrillOptions, storage: Storage, info: BackupInfo,
                  bindir: Path, user: ServerUser, report: DrillReport,
                  walship_command: Callable[[Config], str], environ: Mapping[str, str]) -> None:
    """Everything from the scratch directory to the checks; the scratch tree is torn down on
    every way out (failure, Ctrl-C, SIGTERM) unless --keep."""
    from walship.ops.backup_fetch import backup_fetch

    scratch = make_scratch(options.scratch)
    report.scratch = str(scratch.root)
    report.kept = options.keep
    server: ScratchServer | None = None
    env = server_environ(environ, user)
    try:
        chown_tree(scratch.root, user)
        fetch_config = copy_keys(config, scratch, user)
        command = walship_command(fetch_config)
        _preflight(command, scratch, user, env)
        started = time.monotonic()
        try:
            with _quiet_root_warning():
                backup_fetch(config, scratch.pgdata, info.name, target=options.target,
                             tablespaces={oid: scratch.tablespaces / str(oid)
                                          for oid in info.tablespaces},
                             walship_command=command)
        except _ARCHIVE_ERRORS as exc:
            report.fail(f"the backup did not restore: {exc.message}")
            return
        report.restore_seconds = time.monotonic() - started
        _prepare_datadir(scratch, user)
        server = ScratchServer(bindir, scratch, user, env,
                               server_settings(scratch, options.pg_options))
        started = time.monotonic()
        server.start()
        db_user = options.db_user or user.name
        try:
            dbname, reached = _wait_promoted(server, db_user, options.timeout)
        except VerificationFailed as exc:
            report.fail(exc.message)
            return
        except PostgresError as exc:
            report.fail(exc.message, exit_code=PostgresError.exit_code)
            return
        report.replay_seconds = time.monotonic() - started
        report.reached_lsn, report.reached_time = reached.lsn, reached.time
        report.timeline = reached.timeline
        report.replayed_wal_bytes = reached.lsn - info.start_lsn
        report.checks.append(Check("promoted", True, "pg_is_in_recovery() is false"))
        report.checks.append(_reach_check(storage, info, options.target, reached))
        for database in _databases(scratch, db_user, dbname):
            tables = _sample_tables(scratch, db_user, database, options.sample)
            report.checks.append(run_amcheck(server, db_user, database, tables))
        if options.check_sql:
            report.checks.append(run_check_sql(scratch, db_user, options.check_db,
                                               options.check_sql))
        failed = [c for c in report.checks if not c.ok]
        if failed:
            report.fail(f"check {failed[0].name} failed: {failed[0].detail}")
    finally:
        if server is not None:
            server.stop(fast=options.keep)
        _remove_scratch(scratch, options.keep, config)


def _reach_check(storage: Storage, info: BackupInfo, target: RecoveryTarget | None,
                 reached: Reached) -> Check:
    """Did replay get where it should? --latest: the newest archived segment (a replay that
    stopped at a gap promotes silently: PostgreSQL takes a missing file for the end of the
    archive). --target-time: no transaction after the target was replayed."""
    reached_text = wal.format_lsn(reached.lsn)
    if target is None:
        newest = newest_archived_segment(storage, info.timeline)
        if newest is None:
            return Check("reached end of archive", False, "no WAL segments in the archive")
        segment = wal.segment_for_lsn(1, max(reached.lsn - 1, 0), info.wal_segment_size)
        ok = segment.segno(info.wal_segment_size) >= newest.segno(info.wal_segment_size)
        return Check("reached end of archive", ok,
                     f"replayed to {reached_text}; newest archived segment {newest.name}")
    if target.kind == "time":
        when = target.time
        assert when is not None
        ok = reached.time is None or reached.time <= when
        last = reached.time.isoformat() if reached.time else "none"
        return Check("reached target", ok,
                     f"replayed to {reached_text}, last transaction {last}")
    return Check("reached target", True, f"replayed to {reached_text}")
