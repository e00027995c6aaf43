"""Base backups end to end, as the operator runs them: backup-push from "cron" while the
database is busy, a disaster, backup-fetch with a target, start PostgreSQL, compare the data
with its state at the target. Real PostgreSQL 15, walship as archive_command and (written by
backup-fetch itself) restore_command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    Archive,
    archiving_cluster,
    aws_env,
    make_archive,
    switch_and_wait_archived,
    table_checksum,
)
from tests.helpers.pg import PG_BIN, PG_USER, PgCluster, PgFactory, _run_as_pg, chown_pg
from walship import layout, pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _walship(archive: Archive, *args: str, env: Mapping[str, str] | None = None,
             config: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"WALSHIP_CONFIG": str(config or archive.config), **(env or {})}
    return archive.install.run(*args, env=full_env)


def _file_archive(pg_factory: PgFactory, **kwargs: Any) -> Archive:
    archive = make_archive(pg_factory, **kwargs)
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()  # the operator creates the store; a missing one is a mount problem
    chown_pg(store)
    return archive


def _push(archive: Archive, cluster: PgCluster, env: Mapping[str, str] | None = None) -> str:
    proc = _walship(archive, "backup-push", str(cluster.datadir),
                    env={**cluster.libpq_env, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    assert name.startswith("base_"), proc.stdout
    return name


def _background_pgbench(cluster: PgCluster, *args: str) -> subprocess.Popen[str]:
    """pgbench as the postgres user, not waited for."""
    env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", **cluster.libpq_env}
    argv = [str(PG_BIN / "pgbench"), *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", "env",
                *(f"{k}={v}" for k, v in env.items()), *argv]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _restored_cluster(factory: PgFactory, dest: Path, env: Mapping[str, str] | None = None
                      ) -> PgCluster:
    """A cluster object over a restored directory, with its own port and no archiving."""
    copy = factory.cluster("restored", datadir=dest)
    copy.env.update(env or {})
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  archive_mode="off")
    return copy


def _history(cluster: PgCluster) -> str:
    return cluster.psql("select count(*) || ':' || coalesce(sum(delta), 0) from pgbench_history")


def test_pitr_to_a_time_with_a_backup_taken_under_load(pg_factory: PgFactory) -> None:
    """Symmetric key, file store, data checksums; several partitions pushed in parallel."""
    archive = _file_archive(pg_factory, extra={"partition_size": "4MiB", "concurrency": 2})
    primary = archiving_cluster(pg_factory, archive, checksums=True)
    primary.pgbench("-i", "-q", "-s", "3")
    load = _background_pgbench(primary, "-n", "-c", "2", "-j", "2", "-T", "8")
    try:
        name = _push(archive, primary)
    finally:
        _out, err = load.communicate(timeout=120)
    assert load.returncode == 0, err

    time.sleep(1.2)
    target = primary.psql("select now()")
    expected = table_checksum(primary)
    expected_history = _history(primary)
    time.sleep(1.2)
    primary.pgbench("-n", "-c", "2", "-T", "3")
    primary.psql("delete from pgbench_accounts where aid % 3 = 0")  # the disaster
    switch_and_wait_archived(primary)
    primary.stop()

    listing = _walship(archive, "backup-list", "--json")
    assert listing.returncode == 0, listing.stderr
    backups = json.loads(listing.stdout)
    assert [b["name"] for b in backups] == [name]
    entry = backups[0]
    for field in ("start_lsn", "stop_lsn", "timeline", "start_time", "stop_time", "pg_version",
                  "data_bytes", "stored_bytes", "system_identifier", "partitions",
                  "wal_segment_size", "label"):
        assert field in entry
    assert entry["partitions"] > 3 and entry["encrypted"] is True
    assert entry["stored_bytes"] < entry["data_bytes"]

    dest = pg_factory.new_path("restore")
    fetch = _walship(archive, "backup-fetch", str(dest), "LATEST", "--target-time", target)
    assert fetch.returncode == 0, fetch.stderr
    assert dest.stat().st_mode & 0o777 == 0o700
    assert (dest / "backup_label").is_file() and (dest / "recovery.signal").exists()
    assert sorted(os.listdir(dest / "pg_wal")) == ["archive_status"]
    assert not (dest / "postmaster.pid").exists()
    auto = (dest / "postgresql.auto.conf").read_text()
    assert "recovery_target_time" in auto and "wal-fetch %f %p" in auto

    copy = _restored_cluster(pg_factory, dest)
    copy.start()
    copy.wait_recovery_done()
    assert table_checksum(copy) == expected
    assert _history(copy) == expected_history
    assert copy.psql("select timeline_id from pg_control_checkpoint()") in ("1", "2")
    _run_as_pg([str(PG_BIN / "pg_amcheck"), "--install-missing", "--heapallindexed", "-d",
                "postgres"], env=copy.libpq_env)
    copy.stop()
    _run_as_pg([str(PG_BIN / "pg_checksums"), "--check", "-D", str(dest)])


def test_s3_public_key_and_a_remapped_tablespace(pg_factory: PgFactory, s3_store_url: str
                                                  ) -> None:
    """The database host holds only the public key: it pushes and lists but cannot read;
    the restore host holds the private key. A tablespace goes to a new place."""
    env = aws_env()
    archive = make_archive(pg_factory, store_url=s3_store_url, key="public")
    primary = archiving_cluster(pg_factory, archive, env=env)
    ts_dir = pg_factory.scratch_dir("tablespace")
    primary.psql(f"create tablespace ts1 location '{ts_dir}'")
    oid = primary.psql("select oid from pg_tablespace where spcname = 'ts1'")
    primary.psql("create table moved (id int primary key, payload text) tablespace ts1")
    primary.psql("insert into moved select g, md5(g::text) from generate_series(1, 20000) g")
    primary.pgbench("-i", "-q", "-s", "1")
    name = _push(archive, primary, env=env)

    primary.psql("insert into moved select g, 'after' from generate_series(20001, 20100) g")
    expected = table_checksum(primary, "moved", "id")
    expected_accounts = table_checksum(primary)
    switch_and_wait_archived(primary)
    primary.stop()

    listing = _walship(archive, "backup-list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert [b["name"] for b in json.loads(listing.stdout)] == [name]
    assert json.loads(listing.stdout)[0]["tablespaces"] == [int(oid)]
    # The push side cannot restore: it has no private key.
    denied = _walship(archive, "backup-fetch", str(pg_factory.new_path("denied")), name,
                      env=env)
    assert denied.returncode == 10, denied.stderr  # KeyMismatch
    assert "no decryption key" in denied.stderr

    restore = make_archive(pg_factory, store_url=s3_store_url, key="none",
                           extra={"private_key_files": [str(archive.keydir / "walship.key")]})
    dest = pg_factory.new_path("restore")
    new_ts = pg_factory.new_path("tablespace-moved")
    fetch = _walship(restore, "backup-fetch", str(dest), name, "--tablespace", f"{oid}={new_ts}",
                     env=env)
    assert fetch.returncode == 0, fetch.stderr
    assert os.readlink(dest / "pg_tblspc" / oid) == str(new_ts)
    assert (dest / "tablespace_map").read_text() == f"{oid} {new_ts}\n"
    assert any(p.name.startswith("PG_15_") for p in new_ts.iterdir())
    assert list(ts_dir.iterdir())  # the original is untouched (and still the old cluster's)

    copy = _restored_cluster(pg_factory, dest, env)
    copy.start()
    copy.wait_recovery_done()
    assert table_checksum(copy, "moved", "id") == expected
    assert table_checksum(copy) == expected_accounts
    assert copy.psql("select pg_tablespace_location(oid) from pg_tablespace "
                     "where spcname = 'ts1'") == str(new_ts)
    copy.stop()


def _plain_archive_with_backup(pg_factory: PgFactory) -> tuple[Archive, PgCluster, str]:
    archive = _file_archive(pg_factory, key="none")
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table t as select g from generate_series(1, 1000) g")
    return archive, primary, _push(archive, primary)


def test_latest_refusals_and_a_hostile_store(pg_factory: PgFactory) -> None:
    archive, primary, first = _plain_archive_with_backup(pg_factory)
    primary.psql("insert into t select g from generate_series(1001, 2000) g")
    second = _push(archive, primary)
    assert second > first
    listing = json.loads(_walship(archive, "backup-list", "--json").stdout)
    assert [b["name"] for b in listing] == [first, second]
    table = _walship(archive, "backup-list").stdout
    assert first in table and second in table

    # backup-push refuses a directory that is not the server's.
    other = pg_factory.scratch_dir("not-pgdata")
    wrong = _walship(archive, "backup-push", str(other), env=primary.libpq_env)
    assert wrong.returncode == 13 and "not a postgresql data directory" in wrong.stderr

    # LATEST is the second; the restore has no target and recovers to the end of the archive.
    switch_and_wait_archived(primary)
    count = primary.psql("select count(*) from t")
    primary.stop()
    dest = pg_factory.new_path("latest")
    fetch = _walship(archive, "backup-fetch", str(dest), "LATEST")
    assert fetch.returncode == 0, fetch.stderr
    assert (dest / "backup_label").read_text().startswith("START WAL LOCATION: ")
    assert second[5:29] in (dest / "backup_label").read_text()
    copy = _restored_cluster(pg_factory, dest)
    # backup-fetch writes backup_label, then the recovery settings, then recovery.signal last:
    # a restore killed before its end leaves a directory that cannot start, with or without
    # backup_label, rather than one that replays from pg_control's (later) checkpoint.
    (dest / "recovery.signal").rename(dest / "signal.aside")
    with pytest.raises(AssertionError, match="could not locate required checkpoint record"):
        copy.start(timeout=60)
    (dest / "backup_label").rename(dest / "label.aside")
    with pytest.raises(AssertionError, match="could not locate a valid checkpoint record"):
        copy.start(timeout=60)
    (dest / "label.aside").rename(dest / "backup_label")
    (dest / "signal.aside").rename(dest / "recovery.signal")
    copy.start()
    copy.wait_recovery_done()
    assert copy.psql("select count(*) from t") == count
    copy.stop()

    # A non-empty destination is refused (usage error), and left alone.
    busy = pg_factory.scratch_dir("busy")
    (busy / "precious").write_text("keep me")
    chown_pg(busy)
    refused = _walship(archive, "backup-fetch", str(busy), first)
    assert refused.returncode == 2, refused.stderr
    assert "not empty" in refused.stderr and "Traceback" not in refused.stderr
    assert os.listdir(busy) == ["precious"]

    # An unknown backup: exit 1, like wal-fetch's "does not exist".
    missing = _walship(archive, "backup-fetch", str(pg_factory.new_path("missing")),
                       "base_000000010000000000000099_00000028")
    assert missing.returncode == 1, missing.stderr
    bad_time = _walship(archive, "backup-fetch", str(pg_factory.new_path("x")), "LATEST",
                        "--target-time", "not a time")
    assert bad_time.returncode == 2 and "is not a time" in bad_time.stderr

    # A hostile store: the first partition of `first` replaced by a tar that climbs out.
    store = Path(archive.store_url.removeprefix("file://"))
    key = store / layout.backup_partition_key(first, 0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member_name in ("../escaped", "PG_VERSION"):
            info = tarfile.TarInfo(member_name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"evil\n"))
    key.write_bytes(pipeline.encode_bytes(buf.getvalue(), "lz4", None))
    chown_pg(key)
    dest = pg_factory.new_path("hostile")
    hostile = _walship(archive, "backup-fetch", str(dest), first)
    assert hostile.returncode == 9, hostile.stderr  # IntegrityError
    assert "unsafe member name '../escaped'" in hostile.stderr
    assert not (dest.parent / "escaped").exists()
    assert not dest.exists()  # the failed restore removed what it wrote


def test_backup_push_refuses_a_server_whose_archiving_fails(pg_factory: PgFactory) -> None:
    archive = _file_archive(pg_factory, key="none")
    cluster = pg_factory.cluster()
    cluster.initdb()
    cluster.set_conf(archive_mode="on", archive_command="'/bin/false'")
    cluster.start()
    cluster.psql("create table t as select 1")
    cluster.psql("select pg_switch_wal()")
    cluster.wait_for("select failed_count > 0 from pg_stat_archiver", "t")
    refused = _walship(archive, "backup-push", str(cluster.datadir), env=cluster.libpq_env)
    assert refused.returncode == 13, refused.stderr
    assert "archiving is failing" in refused.stderr
    assert cluster.psql("select count(*) from pg_stat_activity where backend_type = "
                        "'client backend' and application_name like 'walship%'") == "0"

    # Archiving works again, but another live walship holds the store's backup lock.
    cluster.set_conf(archive_command=f"'{archive.archive_command}'")
    cluster.psql("select pg_reload_conf()")
    switch_and_wait_archived(cluster)
    lock = Path(archive.store_url.removeprefix("file://")) / layout.lock_key("backup")
    lock.parent.mkdir(exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    lock.write_text(json.dumps({"name": "backup", "token": "x", "command": "backup-push",
                                "host": "db2", "machine": "", "pid": 4242, "acquired": now,
                                "heartbeat": now}))
    chown_pg(lock.parent)
    locked = _walship(archive, "backup-push", str(cluster.datadir), env=cluster.libpq_env)
    assert locked.returncode == 14, locked.stderr
    assert "locked by backup-push (pid 4242 on db2)" in locked.stderr
    lock.unlink()
    _push(archive, cluster)


def _gate_archiving(cluster: PgCluster, archive: Archive, gate: Path) -> None:
    """Hold the archiver: its command waits until `gate` exists, then runs wal-push."""
    command = f"while [ ! -e {gate} ]; do sleep 0.1; done; {archive.archive_command}"
    cluster.set_conf(archive_command=f"'{command}'")
    cluster.psql("select pg_reload_conf()")


def test_backup_push_ships_its_wal_when_the_archiver_lags(pg_factory: PgFactory) -> None:
    # The archiver is held for the whole backup-push: the backup is complete anyway, because
    # backup-push pushes the WAL files still waiting in archive_status/ itself. The archiver's
    # own wal-push of the same files later finds them identical and succeeds.
    archive = _file_archive(pg_factory, extra={"archive_timeout": 30})
    cluster = archiving_cluster(pg_factory, archive)
    cluster.psql("create table t as select generate_series(1, 1000) as i")
    switch_and_wait_archived(cluster)  # the store now archives this cluster
    gate = pg_factory.new_path("gate")
    _gate_archiving(cluster, archive, gate)
    archived_before = cluster.psql("select archived_count from pg_stat_archiver")
    name = _push(archive, cluster)
    assert cluster.psql("select archived_count from pg_stat_archiver") == archived_before
    listed = json.loads(_walship(archive, "backup-list", "--json").stdout)
    info = next(b for b in listed if b["name"] == name)
    store = Path(archive.store_url.removeprefix("file://"))
    assert (store / layout.wal_key(info["stop_wal"])).is_file()
    verified = _walship(archive, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    gate.touch()
    switch_and_wait_archived(cluster)
    assert cluster.psql("select failed_count from pg_stat_archiver") == "0"


def test_a_first_backup_into_a_store_the_archiver_does_not_feed_fails(
        pg_factory: PgFactory) -> None:
    # With nothing archived into the store yet, backup-push must not ship WAL itself: a
    # store the archive_command does not write to would get one backup and never the WAL
    # after it. It waits for the archiver instead, and gives up after archive_timeout.
    archive = _file_archive(pg_factory, extra={"archive_timeout": 3})
    cluster = archiving_cluster(pg_factory, archive)
    gate = pg_factory.new_path("gate")
    _gate_archiving(cluster, archive, gate)
    started = time.monotonic()
    refused = _walship(archive, "backup-push", str(cluster.datadir), env=cluster.libpq_env)
    assert refused.returncode == 13, refused.stderr
    assert "was not archived within 3s" in refused.stderr
    assert time.monotonic() - started < 60
    assert json.loads(_walship(archive, "backup-list", "--json").stdout) == []
    store = Path(archive.store_url.removeprefix("file://"))
    assert not list(store.glob(f"{layout.WAL_PREFIX}*")), "backup-push shipped WAL itself"
    gate.touch()
