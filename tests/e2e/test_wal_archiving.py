"""WAL archiving end to end: real PostgreSQL 15 runs walship as archive_command and
restore_command, exactly as an operator configures it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Archive,
    archiving_cluster,
    aws_env,
    make_archive,
    switch_and_wait_archived,
    table_checksum,
)
from tests.helpers.pg import PG_BIN, PgCluster, PgFactory, _run_as_pg, chown_pg

pytestmark = pytest.mark.e2e


def _base_copy(factory: PgFactory, source: PgCluster) -> PgCluster:
    """pg_basebackup without WAL: the copy can only become consistent through the archive."""
    copy = factory.cluster("copy")
    _run_as_pg([str(PG_BIN / "pg_basebackup"), "-D", str(copy.datadir), "-X", "none",
                "-c", "fast", "--no-sync"], env=source.libpq_env)
    # pg_basebackup copies postgresql.conf; the copy needs its own port and socket.
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  archive_mode="off")
    return copy


def _start_recovery(copy: PgCluster, archive: Archive, **settings: str) -> None:
    copy.set_conf(restore_command=f"'{archive.restore_command}'", **settings)
    signal = copy.datadir / "recovery.signal"
    signal.touch()
    chown_pg(signal)
    copy.start()


def _archived_names(store_dir: Path) -> list[str]:
    return sorted(os.listdir(store_dir / "wal"))


def _load(cluster: PgCluster, scale: int, seconds: int, min_segments: int = 0) -> None:
    """pgbench: an initial load, then runs of `seconds` until WAL reaches `min_segments`."""
    cluster.pgbench("-i", "-q", "-n", "-s", str(scale))
    while True:
        cluster.pgbench("-n", "-c", "2", "-j", "2", "-T", str(seconds))
        segno = int(cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")[16:], 16)
        if segno >= min_segments:
            return


def _replay_and_compare(factory: PgFactory, primary: PgCluster, archive: Archive,
                        copy: PgCluster) -> None:
    for _ in range(3):
        last = switch_and_wait_archived(primary)
    expected = table_checksum(primary)
    history = primary.psql("select count(*) from pgbench_history")
    assert primary.psql("select failed_count from pg_stat_archiver") == "0"
    primary.stop()
    _start_recovery(copy, archive)
    copy.wait_recovery_done()
    assert table_checksum(copy) == expected
    assert copy.psql("select count(*) from pgbench_history") == history
    # Recovery ran to the end of the archive: the last archived segment was replayed.
    replayed = copy.psql("select pg_walfile_name(pg_current_wal_lsn())")
    assert replayed[8:] >= last[8:], (replayed, last)


def test_archive_replay_file_store_symmetric(pg_factory: PgFactory) -> None:
    archive = make_archive(pg_factory, key="symmetric")
    primary = archiving_cluster(pg_factory, archive)
    copy = _base_copy(pg_factory, primary)
    _load(primary, scale=10, seconds=4, min_segments=31)
    store = Path(archive.store_url.removeprefix("file://"))
    _replay_and_compare(pg_factory, primary, archive, copy)
    segments = [n for n in _archived_names(store) if len(n) == 24]
    assert len(segments) >= 30, len(segments)
    assert any(n.endswith(".backup") for n in _archived_names(store))
    # Objects are encrypted: no lz4 frame magic at the start, walship's header instead.
    with open(store / "wal" / segments[0], "rb") as fh:
        assert fh.read(4) != b"\x04\x22\x4d\x18"
    # Push-ahead markers and the prefetch spool are gone once PostgreSQL moved past them.
    assert not list((primary.datadir / "pg_wal" / "walship" / "pushed").glob("0*"))
    assert not (copy.datadir / "pg_wal" / "walship" / "prefetch").exists()


def test_archive_replay_s3_public_key(pg_factory: PgFactory, s3_store_url: str) -> None:
    """S3 through a real (moto) server; the database host holds only the public key."""
    env = aws_env()
    archive = make_archive(pg_factory, store_url=s3_store_url, key="public")
    primary = archiving_cluster(pg_factory, archive, env=env)
    copy = _base_copy(pg_factory, primary)
    copy.env.update(env)
    _load(primary, scale=4, seconds=4)
    # The restore side holds the private key; the push side's config cannot decrypt.
    restore = make_archive(pg_factory, store_url=s3_store_url, key="none",
                           extra={"private_key_files": [str(archive.keydir / "walship.key")]})
    _replay_and_compare(pg_factory, primary, restore, copy)


def test_promoted_standby_partial_and_history(pg_factory: PgFactory) -> None:
    """A streaming standby is promoted: it archives 00000002.history and the old timeline's
    last segment as .partial; a restore from the archive follows the new timeline to its end."""
    archive = make_archive(pg_factory, key="symmetric")
    primary = archiving_cluster(pg_factory, archive)
    copy = _base_copy(pg_factory, primary)
    standby = _base_copy(pg_factory, primary)
    standby.set_conf(
        archive_mode="on", archive_command=f"'{archive.archive_command}'",
        primary_conninfo=f"'host={primary.sockdir} port={primary.port} user=postgres'",
        restore_command=f"'{archive.restore_command}'",
    )
    (standby.datadir / "standby.signal").touch()
    chown_pg(standby.datadir)
    standby.start()
    primary.pgbench("-i", "-q", "-n", "-s", "2")
    switch_and_wait_archived(primary)
    lsn = primary.psql("select pg_current_wal_lsn()")
    standby.wait_for(f"select pg_last_wal_replay_lsn() >= '{lsn}'", "t")
    primary.stop()
    _run_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(standby.datadir), "promote", "-w"])
    standby.wait_recovery_done()
    standby.psql("create table after_promotion as select g from generate_series(1, 5000) g")
    last = switch_and_wait_archived(standby)
    assert last.startswith("00000002")
    expected = table_checksum(standby, "after_promotion", "g")
    accounts = table_checksum(standby)
    store = Path(archive.store_url.removeprefix("file://"))
    # The archiver's order between the .partial and the new timeline's segments is the
    # server's business; wait for it rather than assume it.
    deadline = time.monotonic() + 60
    while True:
        names = _archived_names(store)
        partials = [n for n in names if n.endswith(".partial")]
        if partials or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "00000002.history" in names
    assert partials and partials[0].startswith("00000001"), (names, standby.log_tail())
    # The .partial round-trips through wal-fetch (the server never asks for it by itself).
    work = pg_factory.scratch_dir("partial")
    proc = archive.install.run("wal-fetch", partials[0], str(work / partials[0]),
                               env={"WALSHIP_CONFIG": str(archive.config)}, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / partials[0]).stat().st_size == 16 * 1024 * 1024
    standby.stop()
    # Restore the base copy taken on timeline 1; recovery_target_timeline defaults to latest.
    _start_recovery(copy, archive)
    copy.wait_recovery_done()
    assert table_checksum(copy, "after_promotion", "g") == expected
    assert table_checksum(copy) == accounts
    assert copy.psql("select timeline_id from pg_control_checkpoint()") == "3"
