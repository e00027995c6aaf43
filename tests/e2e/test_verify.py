"""walship verify on real archives: damage it finds, and a recoverability window that matches
what point-in-time recovery on PostgreSQL 15 actually reaches.

The window's end is the last archived commit. PostgreSQL's --target-time T replays every
commit up to T and stops *before* the first commit after T (recovery_target_inclusive), so:
a target just before the end stops right before the last commit; restoring without a target
reaches the end itself (the last commit replayed); a target past the end finds no commit to
stop at and ends with FATAL "recovery ended before configured recovery target was reached".
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Archive, archiving_cluster, make_archive, switch_and_wait_archived
from tests.helpers.pg import PgCluster, PgFactory, chown_pg

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _file_archive(factory: PgFactory, **kwargs: Any) -> Archive:
    archive = make_archive(factory, **kwargs)
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()
    chown_pg(store)
    return archive


def _walship(archive: Archive, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return archive.install.run(*args, env={"WALSHIP_CONFIG": str(archive.config), **(env or {})})


def _verify(archive: Archive, *args: str) -> tuple[int, dict[str, Any]]:
    proc = _walship(archive, "verify", "--json", *args)
    assert proc.returncode in (0, 16), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _push_backup(archive: Archive, cluster: PgCluster) -> str:
    proc = _walship(archive, "backup-push", str(cluster.datadir), env=cluster.libpq_env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _restored(factory: PgFactory, dest: Path, **settings: str) -> PgCluster:
    copy = factory.cluster("restored", datadir=dest)
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  **{"archive_mode": "off", **settings})
    return copy


def _fetch(restore: Archive, factory: PgFactory, name: str, *target: str) -> Path:
    dest = factory.new_path("restore")
    proc = _walship(restore, "backup-fetch", str(dest), name, *target)
    assert proc.returncode == 0, proc.stderr
    chown_pg(dest)
    return dest


def _window(report: dict[str, Any], backup: str, timeline: int) -> dict[str, Any]:
    entry = next(b for b in report["backups"] if b["name"] == backup)
    chain = next(c for c in entry["chains"] if c["timeline"] == timeline)
    assert chain["complete"], chain
    window: dict[str, Any] = chain["window"]
    return window


def _pg_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def _ts(text: str) -> datetime:
    """A timestamptz as psql prints it in UTC ('2026-11-21 06:00:00.123456+00')."""
    return datetime.fromisoformat(text + (":00" if text[-3] in "+-" else ""))


def test_window_matches_what_recovery_reaches(pg_factory: PgFactory) -> None:
    """Public-key archive: verify runs with the push side's public key only; the restores
    use the private key. A PITR onto timeline 2 archives into the same store, and verify
    follows the timeline history instead of calling it broken."""
    archive = _file_archive(pg_factory, key="public")
    restore = make_archive(pg_factory, store_url=archive.store_url, key="none",
                           extra={"private_key_files": [str(archive.keydir / "walship.key")]})
    primary = archiving_cluster(pg_factory, archive, autovacuum="off",
                                track_commit_timestamp="on")
    primary.psql("create table t (id int primary key)")
    name = _push_backup(archive, primary)
    for i in range(1, 4):
        time.sleep(0.05)  # distinct commit times
        primary.psql(f"insert into t values ({i})")
    commit = {i: _ts(primary.psql(f"select pg_xact_commit_timestamp(xmin) from t where id = {i}"))
              for i in (2, 3)}
    switch_and_wait_archived(primary)
    primary.stop()

    code, report = _verify(archive)
    assert code == 0, report["problems"]
    window = _window(report, name, 1)
    assert window["status"] == "ok"
    end = datetime.fromisoformat(window["to"])
    assert end == commit[3]  # the last commit, to the microsecond, without downloading WAL
    assert datetime.fromisoformat(window["from"]) < commit[2]
    assert _walship(archive, "verify", "--deep").returncode == 10  # no private key here

    # Past the window's end: nothing to stop at, recovery fails instead of promoting.
    late = _restored(pg_factory, _fetch(restore, pg_factory, name, "--target-time",
                                        _pg_time(end + timedelta(minutes=1))))
    late.start(wait=False)
    deadline = time.monotonic() + 180
    while "recovery ended before configured recovery target was reached" not in late.log_tail():
        assert time.monotonic() < deadline, late.log_tail()
        time.sleep(0.3)

    # The window's end itself: restoring to the end of the archive replays the last commit.
    full = _restored(pg_factory, _fetch(restore, pg_factory, name))
    full.start()
    full.wait_recovery_done()
    assert full.psql("select max(id) from t") == "3"
    assert _ts(full.psql("select pg_last_xact_replay_timestamp()")) == end
    full.stop()

    # Just inside the end: recovery stops right before the last commit; it archives onto
    # timeline 2 (a PITR'd archive), then commits there.
    inside = _restored(pg_factory, _fetch(restore, pg_factory, name, "--target-time",
                                          _pg_time(end - timedelta(microseconds=1))),
                       archive_mode="on", archive_command=f"'{archive.archive_command}'",
                       track_commit_timestamp="on")
    inside.start()
    inside.wait_recovery_done()
    assert inside.psql("select max(id) from t") == "2"
    assert inside.psql("select timeline_id from pg_control_checkpoint()") == "2"
    inside.psql("insert into t values (20)")
    on_two = _ts(inside.psql("select pg_xact_commit_timestamp(xmin) from t where id = 20"))
    switch_and_wait_archived(inside)
    inside.stop()

    code, report = _verify(archive)
    assert code == 0, report["problems"]
    timelines = {t["timeline"]: t for t in report["timelines"]}
    assert timelines[2]["parent"] == 1 and timelines[2]["ancestry"] == "metadata"
    assert datetime.fromisoformat(_window(report, name, 1)["to"]) == end
    assert datetime.fromisoformat(_window(report, name, 2)["to"]) == on_two
    text = _walship(archive, "verify")
    assert text.returncode == 0, text.stderr
    assert f"backup {name}: whole" in text.stdout
    assert "timeline 2, branched from timeline 1" in text.stdout
    assert "can restore to any moment between" in text.stdout


@contextmanager
def _aside(path: Path) -> Iterator[Path]:
    """Move an object out of the way (xattrs and all) and put it back afterwards."""
    saved = path.with_name(path.name + ".saved")
    os.rename(path, saved)
    try:
        yield saved
    finally:
        os.replace(saved, path)


def test_verify_names_what_is_missing_or_damaged(pg_factory: PgFactory) -> None:
    archive = _file_archive(pg_factory, key="symmetric", extra={"partition_size": "2MiB"})
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table big as select g, md5(g::text) from generate_series(1, 60000) g")
    name = _push_backup(archive, primary)
    for _ in range(2):
        primary.psql("insert into big select g, 'x' from generate_series(1, 100) g")
        switch_and_wait_archived(primary)
    primary.stop()
    store = Path(archive.store_url.removeprefix("file://"))
    backup_dir = store / "basebackups" / name

    code, report = _verify(archive)
    assert code == 0, report["problems"]
    assert report["backups"][0]["manifest_checked"] is True
    assert _walship(archive, "verify", "--deep").returncode == 0

    # A deleted segment between the backup's end and the newest segment: a gap, named.
    newest = report["backups"][0]["chains"][0]["unbroken_to"]
    victim = min(p.name for p in (store / "wal").iterdir()
                 if len(p.name) == 24 and report["backups"][0]["stop_wal"] < p.name < newest)
    with _aside(store / "wal" / victim):
        proc = _walship(archive, "verify")
        assert proc.returncode == 16, proc.stderr
        assert victim in proc.stdout and victim in proc.stderr

    # A truncated partition: its size no longer matches the manifest (and the sentinel).
    part = backup_dir / "part_00001.tar"
    with _aside(part) as saved:
        part.write_bytes(saved.read_bytes()[:-100])
        proc = _walship(archive, "verify")
        assert proc.returncode == 16, proc.stderr
        assert "part_00001.tar" in proc.stdout
        part.unlink()

    # A missing sentinel: the backup is no longer complete.
    with _aside(backup_dir / "sentinel.json"):
        proc = _walship(archive, "verify")
        assert proc.returncode == 16, proc.stderr
        assert f"backup {name} has no sentinel" in proc.stdout

    # A flipped byte inside a partition, same size: only --deep sees it.
    with _aside(part) as saved:
        data = bytearray(saved.read_bytes())
        data[len(data) // 2] ^= 0x01
        part.write_bytes(bytes(data))
        assert _walship(archive, "verify").returncode == 0
        proc = _walship(archive, "verify", "--deep")
        assert proc.returncode == 16, proc.stderr
        assert f"backup {name} partition 1" in proc.stdout
        part.unlink()

    assert _walship(archive, "verify").returncode == 0
