"""Real PostgreSQL clusters for tests, run as the `postgres` user (PostgreSQL refuses root).

walship runs inside those clusters as archive_command/restore_command, so the tests install a
copy of the package where `postgres` can read it and a small `walship` wrapper that runs it with
this interpreter. Every cluster lives under one scratch directory that the postgres user owns
and that is removed at the end of the session.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import walship

PG_BIN = Path(os.environ.get("WALSHIP_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"
# Names under the scratch root are unique across every factory of the session (and the
# sockets' ports with them).
_COUNTER = itertools.count(1)


def _run_as_pg(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
    timeout: float = 300,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command as the postgres user (directly when we already are that user)."""
    full_env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    full_env.update(env or {})
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", "env", *(f"{k}={v}" for k, v in full_env.items()),
                *args]
        run_env = None
    else:
        argv = list(args)
        run_env = {**os.environ, **full_env}
    proc = subprocess.run(argv, env=run_env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def chown_pg(path: Path) -> None:
    """Give a file or a whole tree to the postgres user (no-op unless we are root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_USER)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.lchown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class WalshipInstall:
    """A copy of walship the postgres user can execute, and the scratch root for clusters."""

    root: Path
    bin: Path

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run `walship ARGS` as the postgres user."""
        return _run_as_pg([str(self.bin), *args], env=env, cwd=cwd, check=check, timeout=timeout)

    def command(self, config: Path, verb: str) -> str:
        """An archive_command/restore_command one-liner the way an operator writes it."""
        return f"WALSHIP_CONFIG={config} {self.bin} {verb}"


def install_walship(root: Path) -> WalshipInstall:
    """Copy the package under `root` and write a `walship` wrapper that postgres can run."""
    lib = root / "lib"
    shutil.copytree(Path(walship.__file__).parent, lib / "walship",
                    ignore=shutil.ignore_patterns("__pycache__"))
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "walship"
    # A script, not a shell wrapper: walship puts its own path into restore_command, so the
    # path must be directly executable. The copy goes first on sys.path.
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "from walship.__main__ import main\n"
        "sys.exit(main())\n"
    )
    wrapper.chmod(0o755)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == wrapper else 0o644)
    probe = _run_as_pg([str(wrapper), "--version"], check=False)
    if probe.returncode != 0:
        pytest.fail(
            f"the postgres user cannot run walship with {sys.executable}: {probe.stderr.strip()}"
            "\nrun the tests from a virtualenv the postgres user can read (see scripts/test)"
        )
    return WalshipInstall(root, wrapper)


@dataclass
class PgCluster:
    """One throwaway cluster: initdb'd, listening on a private unix socket only."""

    datadir: Path
    sockdir: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def libpq_env(self) -> dict[str, str]:
        """libpq settings that reach this cluster."""
        return {"PGHOST": str(self.sockdir), "PGPORT": str(self.port), "PGUSER": PG_USER,
                "PGDATABASE": "postgres"}

    def initdb(self, *, checksums: bool = False, options: tuple[str, ...] = ()) -> None:
        """Create the cluster and give it a configuration suitable for archiving tests;
        `options` go to initdb as they are (e.g. ("--wal-segsize=1",) for 1 MiB segments)."""
        self.datadir.mkdir(mode=0o700)
        self.sockdir.mkdir(mode=0o755, exist_ok=True)
        chown_pg(self.datadir)
        chown_pg(self.sockdir)
        args = [str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", PG_USER, "-A", "trust",
                "--no-sync"]
        if checksums:
            args.append("--data-checksums")
        args.extend(options)
        _run_as_pg(args)
        self.set_conf(
            listen_addresses="''",
            unix_socket_directories=f"'{self.sockdir}'",
            port=str(self.port),
            fsync="off",
            synchronous_commit="off",
            full_page_writes="on",
            wal_level="replica",
            max_wal_size="'256MB'",
            shared_buffers="'64MB'",
            log_min_messages="info",
            logging_collector="off",
        )

    def set_conf(self, **settings: str) -> None:
        """Append settings to postgresql.conf (values are written as given)."""
        path = self.datadir / "postgresql.conf"
        with open(path, "a") as fh:
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")
        chown_pg(path)

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    def start(self, *, wait: bool = True, timeout: int = 120) -> None:
        """Start the server; with wait, until it accepts connections (recovery may still run)."""
        self.logfile.touch()
        chown_pg(self.logfile)
        args = [str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                "-t", str(timeout), "start"]
        if not wait:
            args.insert(-1, "-W")
        proc = _run_as_pg(args, env=self.env, check=False, timeout=timeout + 30)
        if proc.returncode != 0:
            raise AssertionError(f"pg_ctl start failed:\n{proc.stdout}{proc.stderr}\n"
                                 f"log:\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast, immediate)."""
        _run_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-t", "120",
                    "stop"], check=False)

    def is_running(self) -> bool:
        """Whether pg_ctl sees a server on this data directory."""
        proc = _run_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "status"],
                          check=False)
        return proc.returncode == 0

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server log, for assertion messages."""
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def psql(self, sql: str, *, db: str = "postgres", check: bool = True) -> str:
        """Run SQL; returns unaligned, tuples-only output."""
        proc = _run_as_pg(
            [str(PG_BIN / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", db, "-c", sql],
            env=self.libpq_env, check=check,
        )
        return proc.stdout.strip()

    def pgbench(self, *args: str) -> str:
        """Run pgbench against this cluster."""
        return _run_as_pg([str(PG_BIN / "pgbench"), *args], env=self.libpq_env).stdout

    def wait_for(self, sql: str, expected: str, timeout: float = 120) -> None:
        """Poll `sql` until it returns `expected`."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            last = self.psql(sql, check=False)
            if last == expected:
                return
            if not self.is_running():
                raise AssertionError(f"the server stopped while waiting for {sql!r}\n"
                                     f"{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"{sql!r} returned {last!r}, expected {expected!r}\n"
                             f"{self.log_tail()}")

    def wait_recovery_done(self, timeout: float = 300) -> None:
        """Wait until recovery has ended and the server accepts writes."""
        self.wait_for("select pg_is_in_recovery()", "f", timeout)


class PgFactory:
    """Makes clusters under one scratch root; stops them all at the end."""

    def __init__(self, install: WalshipInstall) -> None:
        self.install = install
        self.clusters: list[PgCluster] = []

    def new_path(self, name: str) -> Path:
        """A fresh path under the scratch root that the postgres user may create."""
        return self.install.root / f"{name}-{next(_COUNTER)}"

    def scratch_dir(self, name: str) -> Path:
        """A fresh directory owned by postgres (for a file store, key files, configs)."""
        path = self.new_path(name)
        path.mkdir(mode=0o700)
        chown_pg(path)
        return path

    def cluster(self, name: str = "pg", *, datadir: Path | None = None) -> PgCluster:
        """A cluster object (not yet initdb'd) with its own port and socket directory."""
        count = next(_COUNTER)
        datadir = datadir or self.install.root / f"{name}-{count}"
        sockdir = self.install.root / f"sock-{count}"
        sockdir.mkdir(exist_ok=True)
        chown_pg(sockdir)
        cluster = PgCluster(datadir=datadir, sockdir=sockdir, port=20000 + (os.getpid() * 7
                            + count) % 20000)
        self.clusters.append(cluster)
        return cluster

    def write_config(self, path: Path, settings: Mapping[str, object]) -> Path:
        """A walship TOML config file, readable by postgres."""
        lines = []
        for key, value in settings.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            elif isinstance(value, (list, tuple)):
                lines.append(f"{key} = [{', '.join(repr(str(v)) for v in value)}]")
            else:
                lines.append(f'{key} = "{value}"')
        path.write_text("\n".join(lines) + "\n")
        chown_pg(path)
        return path

    def close(self) -> None:
        for cluster in self.clusters:
            if cluster.datadir.exists():
                cluster.stop("immediate")


@pytest.fixture(scope="session")
def walship_install() -> Iterator[WalshipInstall]:
    """walship installed where the postgres user can run it."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL binaries not found in {PG_BIN} (set WALSHIP_TEST_PG_BIN)")
    root = Path(tempfile.mkdtemp(prefix="walship-pg-", dir="/tmp"))
    root.chmod(0o755)
    install = install_walship(root)
    chown_pg(root)
    yield install
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_factory(walship_install: WalshipInstall) -> Iterator[PgFactory]:
    """Makes throwaway clusters; every one is stopped when the test ends."""
    factory = PgFactory(walship_install)
    yield factory
    factory.close()
