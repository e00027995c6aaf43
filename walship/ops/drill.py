"""drill: the automated restore test. Restore a backup into a scratch directory, start
PostgreSQL on it with walship as restore_command, replay, promote, check, report, tear down.

What a drill proves is what a real restore needs: the backup downloads and verifies, every WAL
segment the replay needs fetches intact, the server reaches its target and promotes, and the
result passes amcheck and the operator's own SQL. docs/drill.md is the operator's guide.

Safety of the scratch server (it must never touch production):
- it listens on no TCP address, only on a unix socket in a private (0700) directory inside
  the scratch directory, with its own pg_hba.conf (trust, which the 0700 socket directory makes
  private to the server's user and root);
- archive_mode is off (a promoted drill must never push a new timeline into the archive), and
  every setting that could reach outside the scratch directory (external_pid_file, ssl files,
  recovery_end_command, archive_cleanup_command, synchronous_standby_names) is overridden on
  the command line, which wins over postgresql.conf and postgresql.auto.conf;
- tablespaces are restored into the scratch directory, never to their original locations.

Who runs it: PostgreSQL refuses root, so when walship runs as root the server runs as the
`postgres` user (subprocess user=, no supplementary groups) and the scratch tree is chowned
to it. The decryption key files restore_command needs may be unreadable to that user: they
are copied into <scratch>/keys (0700 directory, 0600 files, owned by that user), and removed
at teardown even with --keep (the kept directory has finished recovery and needs no key).

Verdicts: every check passed -> ok. The server failing before it even began archive recovery
(binaries, shared memory, configuration) -> PostgresError (13): not the archive's fault.
Anything else (a backup that does not restore, a fetch that aborts recovery, a replay that
ends early or times out, amcheck or the user's SQL failing) -> VerificationFailed (16), with a
one-line reason from the evidence (the server log's FATAL line and walship's own error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
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
    LocalIOError,
    ObjectNotFound,
    PostgresError,
    UsageError,
    VerificationFailed,
    WalshipError,
)
from walship.ops.backup_list import BackupInfo, resolve_backup
from walship.ops.recovery import RecoveryTarget
from walship.storage import open_storage, redact_url
from walship.storage.base import Storage

_log = log.get("drill")

RECORD_FORMAT = 1
SERVER_USER = "postgres"
# The server's port only names its socket file: the socket directory is private.
PORT = 5432
DEFAULT_TIMEOUT = 3600.0
DEFAULT_SAMPLE = 10
_POLL = 0.5
# Seconds the server gets for a fast shutdown (--keep) before an immediate one, and an
# immediate one before SIGKILL.
_STOP_GRACE = 60.0
# Errors from the store that say something about the archive itself: a drill that meets one
# failed. Others (store unreachable, access denied, bad configuration) are not a verdict on
# the archive and keep their own exit codes.
_ARCHIVE_ERRORS = (IntegrityError, KeyMismatch, ObjectNotFound)
# Server log lines that say archive recovery has begun: a server that dies before any of them
# never got to the archive (PostgresError); one that dies after failed the drill.
_RECOVERY_BEGAN = ("starting point-in-time recovery", "starting archive recovery",
                   "restored log file", "could not restore file", "redo starts")
_SEVERE_RE = re.compile(r"\b(FATAL|PANIC):\s+(.*)$")
_WALSHIP_ERROR_RE = re.compile(r"walship: error: (.*)$")
# FATAL lines that the drill's own polling connections cause while the server starts.
_STARTUP_NOISE = ("the database system is starting up", "the database system is not yet accepting",
                  "the database system is in recovery mode", "the database system is shutting down",
                  "terminating connection")


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


# --- Finding PostgreSQL -----------------------------------------------------------------------


def _major_of(version_num: int) -> int:
    return version_num // 10000 if version_num >= 100000 else version_num // 100


def _binary_major(bindir: Path) -> int | None:
    """The major version of bindir/postgres, or None if there is none that runs."""
    try:
        proc = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                              text=True, timeout=30, check=False)
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", proc.stdout)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def find_pg_bin(explicit: Path | None, version_num: int, search_path: str) -> Path:
    """The directory of PostgreSQL binaries matching the backup's major version.

    --pg-bin wins (and must match); then `postgres` on PATH (symlinks resolved, so that
    pg_amcheck is found beside it), `pg_config --bindir`, and the distributions' versioned
    directories (/usr/lib/postgresql/N/bin, /usr/pgsql-N/bin). PostgresError if none fits.
    """
    major = _major_of(version_num)
    if explicit is not None:
        found = _binary_major(explicit)
        if found != major:
            what = f"PostgreSQL {found}" if found else "no runnable postgres"
            raise PostgresError(f"--pg-bin {explicit} holds {what}; the backup needs "
                                f"PostgreSQL {major}",
                                hint="give --pg-bin the bin directory of the backup's major "
                                "version")
        return explicit
    candidates: list[Path] = []
    on_path = shutil.which("postgres", path=search_path)
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config", path=search_path)
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates += [Path(f"/usr/lib/postgresql/{major}/bin"), Path(f"/usr/pgsql-{major}/bin")]
    seen: set[Path] = set()
    for bindir in candidates:
        if bindir in seen or not (bindir / "postgres").exists():
            continue
        seen.add(bindir)
        if _binary_major(bindir) == major:
            return bindir
    raise PostgresError(f"no PostgreSQL {major} binaries found (the backup is PostgreSQL "
                        f"{major})", hint="install them or give --pg-bin DIR")


# --- Who runs the server --------------------------------------------------------------------


@dataclass(frozen=True)
class ServerUser:
    """The OS user the scratch server runs as; switch is False when that is us."""

    name: str
    uid: int
    gid: int
    home: str
    switch: bool

    def popen_args(self) -> dict[str, Any]:
        """subprocess arguments that run a child as this user."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def server_user() -> ServerUser:
    """Ourselves, or `postgres` when we are root (PostgreSQL refuses to run as root)."""
    uid = os.geteuid()
    if uid != 0:
        pw = pwd.getpwuid(uid)
        return ServerUser(pw.pw_name, uid, os.getegid(), pw.pw_dir, False)
    try:
        pw = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresError(f"running as root, but there is no {SERVER_USER!r} user to run "
                            "PostgreSQL as", hint="create it, or run walship drill as the "
                            "user that runs PostgreSQL") from None
    return ServerUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, True)


def _chown_tree(path: Path, user: ServerUser) -> None:
    if not user.switch:
        return
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.uid, user.gid)
    os.lchown(path, user.uid, user.gid)


def _server_environ(environ: Mapping[str, str], user: ServerUser) -> dict[str, str]:
    """The server's (and so restore_command's) environment: ours without walship's and
    libpq's variables (restore_command carries walship's whole configuration itself, and a
    WALSHIP_CONFIG the server's user cannot read would break every fetch)."""
    env = {k: v for k, v in environ.items()
           if not k.startswith(("WALSHIP_", "PG")) and k != "PYTHONPATH"}
    env.setdefault("PATH", "/usr/bin:/bin")
    if user.switch:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


# --- The scratch directory -----------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    """The paths of one drill's scratch directory."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def tablespaces(self) -> Path:
        return self.root / "tablespaces"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def hba_file(self) -> Path:
        return self.root / "pg_hba.conf"

    @property
    def ident_file(self) -> Path:
        return self.root / "pg_ident.conf"


def make_scratch(parent: Path | None) -> Scratch:
    """A fresh 0700 directory under `parent` (default: the system's temporary directory)."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    try:
        base.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="walship-drill-", dir=base))
    except OSError as exc:
        raise LocalIOError(f"cannot create a scratch directory in {base}: {exc.strerror}",
                           hint="give --scratch DIR on a filesystem with room for the "
                           "restored database") from None
    return Scratch(root.absolute())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def copy_keys(config: Config, scratch: Scratch, user: ServerUser) -> Config:
    """The Config restore_command uses: with key copies the server's user can read, when that
    user is not us (0600, owned by it, in a 0700 directory of the scratch tree)."""
    fetch_config = dataclasses.replace(config, public_key_file=None)  # fetches never encrypt
    if not user.switch:
        return fetch_config
    scratch.keys.mkdir(mode=0o700)
    copies: list[Path] = []
    sources = ([config.key_file] if config.key_file else []) + list(config.private_key_files)
    for index, source in enumerate(sources):
        target = scratch.keys / f"{index}-{source.name}"
        try:
            _write_private(target, source.read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read key file {source}: {exc.strerror}") from None
        os.lchown(target, user.uid, user.gid)
        copies.append(target)
    os.lchown(scratch.keys, user.uid, user.gid)
    key_file = copies.pop(0) if config.key_file else None
    return dataclasses.replace(fetch_config, key_file=key_file, private_key_files=tuple(copies))


# --- The scratch server -------------------------------------------------------------------


def _server_settings(scratch: Scratch, extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    settings = [
        ("listen_addresses", ""),
        ("unix_socket_directories", str(scratch.socket_dir)),
        ("unix_socket_permissions", "0700"),
        ("port", str(PORT)),
        ("hba_file", str(scratch.hba_file)),
        ("ident_file", str(scratch.ident_file)),
        ("archive_mode", "off"),
        ("archive_command", ""),
        ("archive_cleanup_command", ""),
        ("recovery_end_command", ""),
        ("synchronous_standby_names", ""),
        ("external_pid_file", ""),
        ("ssl", "off"),
        ("huge_pages", "try"),
        ("logging_collector", "off"),
        ("log_destination", "stderr"),
        ("log_line_prefix", "%m [%p] "),
        ("log_min_messages", "warning"),
        ("lc_messages", "C"),
        ("cluster_name", "walship-drill"),
    ]
    return settings + list(extra)


class ScratchServer:
    """The postmaster of one drill, a child of this process in a session of its own (so that a
    Ctrl-C reaches walship, which then stops it, rather than the server directly)."""

    def __init__(self, bindir: Path, scratch: Scratch, user: ServerUser,
                 env: Mapping[str, str], settings: Sequence[tuple[str, str]]) -> None:
        self.bindir = bindir
        self.scratch = scratch
        self.user = user
        self.env = dict(env)
        self.settings = list(settings)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the postmaster (it returns at once; recovery runs in the background)."""
        argv = [str(self.bindir / "postgres"), "-D", str(self.scratch.pgdata)]
        for name, value in self.settings:
            argv += ["-c", f"{name}={value}"]
        fd = os.open(self.scratch.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            if self.user.switch:
                os.fchown(fd, self.user.uid, self.user.gid)
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                         cwd=self.scratch.pgdata, env=self.env,
                                         start_new_session=True, **self.user.popen_args())
        except OSError as exc:
            raise PostgresError(f"cannot start {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def exited(self) -> int | None:
        """The postmaster's exit status once it has exited."""
        return self.proc.poll() if self.proc is not None else None

    def stop(self, *, fast: bool) -> None:
        """Stop the postmaster: fast shutdown (a clean directory, for --keep) or immediate
        (the directory is thrown away), then SIGKILL if it does not go."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        signals = ([signal.SIGINT] if fast else []) + [signal.SIGQUIT, signal.SIGKILL]
        for sig in signals:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=_STOP_GRACE)
                return
            except subprocess.TimeoutExpired:
                _log.warning("the drill's server did not stop on %s", sig.name)

    def log_text(self) -> str:
        """The server log so far."""
        try:
            return self.scratch.logfile.read_text(errors="replace")
        except OSError:
            return ""


def recovery_began(log_text: str) -> bool:
    """Whether the server log shows archive recovery under way."""
    return any(marker in log_text for marker in _RECOVERY_BEGAN)


def reason_from_log(log_text: str) -> str | None:
    """One line that says why the server stopped: its first FATAL or PANIC message, with the
    walship error restore_command printed just before it when there is one."""
    walship_error: str | None = None
    for line in log_text.splitlines():
        found = _WALSHIP_ERROR_RE.search(line)
        if found:
            walship_error = found.group(1).strip()
            continue
        severe = _SEVERE_RE.search(line)
        if severe and not any(noise in severe.group(2) for noise in _STARTUP_NOISE):
            message = f"{severe.group(1)}: {severe.group(2).strip()}"
            return f"{message} (walship: {walship_error})" if walship_error else message
    return f"walship: {walship_error}" if walship_error else None


# --- Talking to the scratch server ----------------------------------------------------------


def _connect(scratch: Scratch, user: str, dbname: str) -> Any:
    """A psycopg connection to the scratch server (its socket, trust authentication)."""
    import psycopg

    return psycopg.connect(host=str(scratch.socket_dir), port=PORT, user=user, dbname=dbname,
                           connect_timeout=10, autocommit=True,
                           application_name="walship drill")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
            message = _first_line(exc)
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

    try:
        with _connect(scratch, db_user, database) as conn:
            conn.execute("set statement_timeout = 0")
            cur = conn.execute(sql.encode())  # the operator's own SQL, as given
            rows = cur.fetchall() if cur.description is not None else []
    except psycopg.Error as exc:
        return Check("check-sql", False, f"error: {_first_line(exc)}")
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
        _write_private(conf, b"# written by walship drill: the backup had none\n")
    # Recovery, then promotion: a backup of a standby must not come back as a standby.
    with contextlib.suppress(FileNotFoundError):
        (pgdata / "standby.signal").unlink()
    _write_private(scratch.hba_file, b"# walship drill: only the server's user and root can "
                   b"reach the 0700 socket directory\nlocal all all trust\n")
    _write_private(scratch.ident_file, b"")
    scratch.socket_dir.mkdir(mode=0o700)
    _chown_tree(scratch.root, user)


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


def _remove_scratch(scratch: Scratch, keep: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(scratch.keys)  # never leave key copies behind, even with --keep
    if keep:
        return
    # A prefetcher started by restore_command leaves once recovery.signal is gone; give it a
    # moment so that it does not write into a tree being removed.
    pf_lock = scratch.pgdata / "pg_wal" / "walship" / "prefetch" / ".lock"
    with contextlib.suppress(FileNotFoundError):
        (scratch.pgdata / "recovery.signal").unlink()
    from walship.ops import background

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
    env = _server_environ(environ, user)
    try:
        _chown_tree(scratch.root, user)
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
                               _server_settings(scratch, options.pg_options))
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
        _remove_scratch(scratch, options.keep)


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
