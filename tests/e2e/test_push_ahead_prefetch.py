"""Push-ahead and prefetch: never report archived what is not stored, survive kill -9, and
leave nothing behind."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Archive, make_archive
from tests.helpers.pg import PgFactory, WalshipInstall, chown_pg
from walship.config import Config
from walship.storage import open_storage

pytestmark = pytest.mark.e2e

SEGMENTS = 12


@dataclass
class Backlog:
    """A stopped cluster's pg_wal holding SEGMENTS segments with .ready files, never archived."""

    factory: PgFactory
    wal_dir: Path
    names: list[str]


@pytest.fixture(scope="module")
def backlog_source(walship_install: WalshipInstall) -> Iterator[Backlog]:
    factory = PgFactory(walship_install)
    cluster = factory.cluster("backlog")
    cluster.initdb()
    # An archiver that always fails: PostgreSQL keeps every segment and its .ready file.
    cluster.set_conf(archive_mode="on", archive_command="'/bin/false'", wal_keep_size="'1GB'")
    cluster.start()
    cluster.psql("create table t (x int, pad text)")
    for _ in range(SEGMENTS):
        cluster.psql("insert into t select g, repeat('x', 200) from generate_series(1, 20000) g")
        cluster.psql("select pg_switch_wal()")
    cluster.stop()
    wal_dir = cluster.datadir / "pg_wal"
    ready = sorted(p.name[:-6] for p in (wal_dir / "archive_status").glob("*.ready"))
    assert len(ready) >= SEGMENTS, ready
    yield Backlog(factory, wal_dir, ready)
    factory.close()


def _fresh_pg_wal(backlog: Backlog, factory: PgFactory) -> Path:
    """A copy of the backlog's data directory layout: DATADIR/pg_wal with archive_status."""
    datadir = factory.scratch_dir("datadir")
    shutil.copytree(backlog.wal_dir, datadir / "pg_wal")
    chown_pg(datadir)
    return datadir / "pg_wal"


def _objects(archive: Archive) -> dict[str, str]:
    config = Config(store=archive.store_url)
    with open_storage(archive.store_url, config) as storage:
        return {info.key.removeprefix("wal/"): storage.stat(info.key).metadata["sha256"]
                for info in storage.list("wal/")}


def _check_markers_are_true(archive: Archive, pg_wal: Path) -> int:
    """Every push marker names an object that is in the store with the file's digest."""
    import hashlib

    stored = _objects(archive)
    markers = list((pg_wal / "walship" / "pushed").glob("0*"))
    for marker in markers:
        digest = hashlib.sha256((pg_wal / marker.name).read_bytes()).hexdigest()
        assert stored.get(marker.name) == digest, f"marker for {marker.name} but not stored"
    return len(markers)


def _push(archive: Archive, pg_wal: Path, name: str) -> subprocess.CompletedProcess[str]:
    return archive.install.run("wal-push", f"pg_wal/{name}", cwd=pg_wal.parent,
                               env={"WALSHIP_CONFIG": str(archive.config)})


def _archiver(archive: Archive, pg_wal: Path, names: list[str]) -> None:
    """What PostgreSQL's archiver does: push in order, mark .done after each success."""
    status = pg_wal / "archive_status"
    for name in names:
        proc = _push(archive, pg_wal, name)
        assert proc.returncode == 0, proc.stderr
        os.replace(status / f"{name}.ready", status / f"{name}.done")


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def _pusher_pids(pg_wal: Path) -> list[int]:
    return _pids(f"walship.ops.push_ahead.*{pg_wal}")


def test_background_pusher_then_fast_path(backlog_source: Backlog,
                                          pg_factory: PgFactory) -> None:
    archive = make_archive(pg_factory, extra={"concurrency": 2})
    pg_wal = _fresh_pg_wal(backlog_source, pg_factory)
    names = backlog_source.names
    pushed = pg_wal / "walship" / "pushed"
    proc = _push(archive, pg_wal, names[0])
    assert proc.returncode == 0, proc.stderr
    # The pusher goes on in the background until every ready file is stored.
    _wait(lambda: all((pushed / n).exists() for n in names))
    assert _check_markers_are_true(archive, pg_wal) == len(names)
    log = (pg_wal / "walship" / "push" / ".log").read_text()
    assert log.count("pushed ahead") == len(names), log
    os.replace(pg_wal / "archive_status" / f"{names[0]}.ready",
               pg_wal / "archive_status" / f"{names[0]}.done")
    _archiver(archive, pg_wal, names[1:])
    assert set(names) <= set(_objects(archive))
    # Markers go once PostgreSQL has moved past them, and the idle pusher exits.
    _wait(lambda: not list(pushed.iterdir()) and not _pusher_pids(pg_wal))


def test_kill_9_pusher_and_wal_push_leaves_no_false_marker(backlog_source: Backlog,
                                                          pg_factory: PgFactory) -> None:
    rng = random.Random(20261121)
    archive = make_archive(pg_factory, extra={"concurrency": 2})
    pg_wal = _fresh_pg_wal(backlog_source, pg_factory)
    names = backlog_source.names
    store = Path(archive.store_url.removeprefix("file://"))
    for trial in range(8):
        proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", "env", f"WALSHIP_CONFIG={archive.config}",
             str(archive.install.bin), "wal-push", f"pg_wal/{names[0]}"],
            cwd=pg_wal.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        time.sleep(rng.uniform(0.1, 0.8))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _pusher_pids(pg_wal):
            os.kill(pid, signal.SIGKILL)
        _check_markers_are_true(archive, pg_wal)
        if (store / "wal").exists():
            # A pusher killed mid-write leaves its dot-prefixed temp file (the store never
            # lists those; see tests/e2e/test_crash.py): only names are checked here, and
            # the contents of every named object after the archiver run below.
            for obj in (store / "wal").iterdir():
                assert obj.name.startswith(".") or obj.name in names, (trial, obj)
    # After the crashes a normal archiver run completes, and every object is whole.
    _archiver(archive, pg_wal, names)
    _check_markers_are_true(archive, pg_wal)
    for name in names:
        work = pg_factory.scratch_dir("verify")
        (work / "pg_wal").mkdir()
        chown_pg(work)
        got = archive.install.run("wal-fetch", name, "pg_wal/x", cwd=work,
                                  env={"WALSHIP_CONFIG": str(archive.config),
                                       "WALSHIP_PREFETCH": "0"})
        assert got.returncode == 0, got.stderr
        assert (work / "pg_wal" / "x").read_bytes() == (pg_wal / name).read_bytes()
    _wait(lambda: not _pusher_pids(pg_wal), what="the pushers to exit")


def _recovery_dir(pg_factory: PgFactory) -> Path:
    datadir = pg_factory.scratch_dir("recovering")
    (datadir / "pg_wal").mkdir()
    (datadir / "recovery.signal").touch()
    chown_pg(datadir)
    return datadir


def _fetch(archive: Archive, datadir: Path, name: str) -> subprocess.CompletedProcess[str]:
    return archive.install.run("wal-fetch", name, "pg_wal/RECOVERYXLOG", cwd=datadir,
                               env={"WALSHIP_CONFIG": str(archive.config),
                                    "WALSHIP_LOG_LEVEL": "debug"})


def _wait(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")


def _prefetcher_pids(spool: Path) -> list[int]:
    return _pids(f"walship.ops.prefetch.*{spool}")


def test_prefetch_serves_ahead_survives_kill_and_cleans_up(backlog_source: Backlog,
                                                           pg_factory: PgFactory) -> None:
    archive = make_archive(pg_factory, extra={"prefetch": 4, "push_ahead": 0})
    pg_wal = _fresh_pg_wal(backlog_source, pg_factory)
    names = backlog_source.names[:SEGMENTS]
    _archiver(archive, pg_wal, names)
    datadir = _recovery_dir(pg_factory)
    spool = datadir / "pg_wal" / "walship"
    prefetch = spool / "prefetch"

    def deliver(name: str) -> str:
        proc = _fetch(archive, datadir, name)
        assert proc.returncode == 0, proc.stderr
        got = datadir / "pg_wal" / "RECOVERYXLOG"
        assert got.read_bytes() == (pg_wal / name).read_bytes()
        got.unlink()
        return proc.stderr

    deliver(names[0])
    _wait(lambda: all((prefetch / n).exists() for n in names[1:5]))
    # Served by the fast path: renamed out of the spool, silently, without the full CLI.
    assert deliver(names[1]) == ""
    assert not (prefetch / names[1]).exists()
    # kill -9 the prefetcher while it works; what it leaves is never served half-written.
    deliver(names[2])
    for pid in _prefetcher_pids(spool):
        os.kill(pid, signal.SIGKILL)
    for entry in prefetch.iterdir():
        if not entry.name.startswith("."):
            assert entry.stat().st_size == 16 * 1024 * 1024
    for name in names[3:8]:
        deliver(name)
    # Recovery ends: the server removes recovery.signal; the prefetcher exits and cleans up.
    (datadir / "recovery.signal").unlink()
    _wait(lambda: not prefetch.exists() or not _prefetcher_pids(spool), timeout=30)
    # The next wal-push after promotion removes whatever is left.
    if prefetch.exists():
        pg_wal2 = datadir / "pg_wal"
        shutil.copy(pg_wal / names[8], pg_wal2 / names[8])
        chown_pg(pg_wal2)
        assert _push(archive, pg_wal2, names[8]).returncode == 0
    assert not prefetch.exists()
    assert not _prefetcher_pids(spool)
