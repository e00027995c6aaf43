"""The scratch server of `walship drill`: a throwaway PostgreSQL started on a restored backup,
with walship as its restore_command. Finding binaries of the backup's major version, the OS
user that runs the server, the scratch directory, the server's settings and process, and what
its log says about why it stopped. walship/ops/drill.py runs the drill with it.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walship import log
from walship.config import Config
from walship.errors import LocalIOError, PostgresError, UsageError

# The drill's logger: the scratch server's warnings are the drill's.
_log = log.get("drill")

SERVER_USER = "postgres"
# The server's port only names its socket file: the socket directory is private.
PORT = 5432
# Seconds the server gets for a fast shutdown (--keep) before an immediate one, and an
# immediate one before SIGKILL.
_STOP_GRACE = 60.0
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


def chown_tree(path: Path, user: ServerUser) -> None:
    """Give the tree at `path` (not following symlinks) to the server's user, if not us."""
    if not user.switch:
        return
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.uid, user.gid)
    os.lchown(path, user.uid, user.gid)


def server_environ(environ: Mapping[str, str], user: ServerUser) -> dict[str, str]:
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


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (0600; never an existing file or a symlink) holding `data`."""
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
            write_private(target, source.read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read key file {source}: {exc.strerror}") from None
        os.lchown(target, user.uid, user.gid)
        copies.append(target)
    os.lchown(scratch.keys, user.uid, user.gid)
    key_file = copies.pop(0) if config.key_file else None
    return dataclasses.replace(fetch_config, key_file=key_file, private_key_files=tuple(copies))


# --- The scratch server -------------------------------------------------------------------


def server_settings(scratch: Scratch, extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The server's command-line settings (they win over the restored configuration files):
    the safety settings of this module's docstring, then the operator's `extra` ones."""
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
