"""The bad-input entries that need a real PostgreSQL: backup-push given another server's data
directory, backup-push while PostgreSQL is down, and two backup-pushes at once. Each gets one
line, its exit code, and leaves the store as it was (no lock, no partial backup listed).

The rest of the catalogue needs no server: tests/cli/test_bad_input_cli.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Archive, archiving_cluster, make_archive
from tests.helpers.pg import PG_USER, PgCluster, PgFactory, WalshipInstall, chown_pg
from walship import layout

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Setup:
    factory: PgFactory
    archive: Archive
    cluster: PgCluster
    store: Path

    def push(self, pgdata: Path) -> subprocess.CompletedProcess[str]:
        return self.archive.install.run(
            "backup-push", str(pgdata),
            env={"WALSHIP_CONFIG": str(self.archive.config), **self.cluster.libpq_env})

    def stored(self) -> list[str]:
        """Every object in the store but WAL and the identity (those the archiver adds)."""
        return sorted(str(p.relative_to(self.store)) for p in self.store.rglob("*")
                      if p.is_file() and p.parent.name != "wal"
                      and p.name != layout.IDENTITY_KEY)


@pytest.fixture(scope="module")
def setup(walship_install: WalshipInstall) -> Iterator[Setup]:
    factory = PgFactory(walship_install)
    archive = make_archive(factory, key="symmetric", extra={"push_ahead": 0})
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()
    chown_pg(store)
    cluster = archiving_cluster(factory, archive)
    cluster.psql("create table t as select g from generate_series(1, 10000) g")
    yield Setup(factory, archive, cluster, store)
    factory.close()


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("walship: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_pgdata_of_another_server(setup: Setup) -> None:
    """A real data directory, initdb'd, but not the one of the server walship connects to."""
    other = setup.factory.cluster("other")
    other.initdb()
    proc = setup.push(other.datadir)
    assert proc.returncode == 13, proc.stderr
    assert "is not the data directory of the server" in _one_line(proc.stderr)
    assert setup.stored() == []  # no lock left, no backup object
    assert setup.cluster.psql("select count(*) from pg_stat_activity where "
                              "application_name like 'walship%'") == "0"


def test_a_second_backup_push_while_one_runs(setup: Setup) -> None:
    """Two real backup-pushes: the first is frozen (SIGSTOP) while it holds the store lock,
    the second is refused naming it, and the first, thawed, completes."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           "WALSHIP_CONFIG": str(setup.archive.config), **setup.cluster.libpq_env}
    # Started as the postgres user directly, not through runuser: runuser stops itself when
    # its child stops and may then never be continued (a stopped wrapper, a zombie child).
    as_pg = {"user": PG_USER, "group": PG_USER, "extra_groups": []} if os.geteuid() == 0 \
        else {}
    first = subprocess.Popen([str(setup.archive.install.bin), "backup-push",
                              str(setup.cluster.datadir)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **as_pg)  # type: ignore[call-overload]
    lock = setup.store / layout.lock_key("backup")
    try:
        deadline = time.monotonic() + 60
        while not lock.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first backup-push never took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        second = setup.push(setup.cluster.datadir)
        assert second.returncode == 14, second.stderr
        line = _one_line(second.stderr)
        assert "locked by backup-push (pid" in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    name = out.strip()
    listing = setup.archive.install.run("backup-list", "--json",
                                        env={"WALSHIP_CONFIG": str(setup.archive.config)})
    assert listing.returncode == 0 and name in listing.stdout
    assert not lock.exists()


def test_postgresql_not_running(setup: Setup) -> None:
    before = setup.stored()
    setup.cluster.stop()
    try:
        proc = setup.push(setup.cluster.datadir)
        assert proc.returncode == 13, proc.stderr
        assert "cannot connect to postgresql" in _one_line(proc.stderr)
        assert setup.stored() == before  # no lock left behind, no partial backup
    finally:
        setup.cluster.start()
