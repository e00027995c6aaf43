"""GCS end to end on gcp-storage-emulator: archive_command into gs://, backup-push, a PITR to
a target time, and overwrite refusal through the stored digest (the emulator does not
enforce if_generation_match=0, so the digest is the only defence there)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Archive,
    archiving_cluster,
    make_archive,
    switch_and_wait_archived,
    table_checksum,
)
from tests.helpers.gcs_emulator import gcs_env
from tests.helpers.pg import PgCluster, PgFactory, chown_pg

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _walship(archive: Archive, *args: str, env: Mapping[str, str],
             cwd: Path | None = None) -> object:
    return archive.run(*args, env=env, cwd=cwd)


def _restored(factory: PgFactory, dest: Path, env: Mapping[str, str]) -> PgCluster:
    copy = factory.cluster("restored", datadir=dest)
    copy.env.update(env)
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  archive_mode="off")
    return copy


def test_gcs_pitr_and_overwrite_refusal(pg_factory: PgFactory, gcs_store_url: str) -> None:
    env = gcs_env()
    assert env["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    # Small upload thresholds so that backup partitions go through resumable uploads.
    archive = make_archive(pg_factory, store_url=gcs_store_url, extra={
        "partition_size": "4MiB", "concurrency": 2,
        "s3_multipart_threshold": "5MiB", "s3_part_size": "5MiB"})
    primary = archiving_cluster(pg_factory, archive, env=env)
    primary.pgbench("-i", "-q", "-s", "2")
    push = _walship(archive, "backup-push", str(primary.datadir),
                    env={**primary.libpq_env, **env})
    assert push.returncode == 0, push.stderr  # type: ignore[attr-defined]
    name = push.stdout.strip()  # type: ignore[attr-defined]
    assert name.startswith("base_")

    primary.pgbench("-n", "-c", "2", "-T", "2")
    time.sleep(1.2)
    target = primary.psql("select now()")
    expected = table_checksum(primary)
    time.sleep(1.2)
    primary.psql("delete from pgbench_accounts where aid % 3 = 0")  # the disaster
    switch_and_wait_archived(primary)
    archived_segment = switch_and_wait_archived(primary)
    primary.stop()

    listing = _walship(archive, "backup-list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr  # type: ignore[attr-defined]
    assert [b["name"] for b in json.loads(listing.stdout)] == [name]  # type: ignore[attr-defined]

    dest = pg_factory.new_path("restore")
    fetch = _walship(archive, "backup-fetch", str(dest), "LATEST", "--target-time", target,
                     env=env)
    assert fetch.returncode == 0, fetch.stderr  # type: ignore[attr-defined]
    assert "recovery_target_time" in (dest / "postgresql.auto.conf").read_text()
    copy = _restored(pg_factory, dest, env)
    copy.start()
    copy.wait_recovery_done()
    assert table_checksum(copy) == expected
    copy.stop()

    # Overwrite refusal through the digest: the same name pushed again with other bytes.
    work = pg_factory.scratch_dir("repush")
    (work / "pg_wal").mkdir()
    chown_pg(work / "pg_wal")
    got = _walship(archive, "wal-fetch", archived_segment, "pg_wal/RECOVERYXLOG",
                   env={**env, "WALSHIP_PREFETCH": "0"}, cwd=work)
    assert got.returncode == 0, got.stderr  # type: ignore[attr-defined]
    segment = work / "pg_wal" / archived_segment
    os.replace(work / "pg_wal" / "RECOVERYXLOG", segment)
    original = segment.read_bytes()
    same = _walship(archive, "wal-push", str(segment), env=env)
    assert same.returncode == 0, same.stderr  # type: ignore[attr-defined]
    assert "identical" in same.stderr  # type: ignore[attr-defined]
    changed = bytearray(original)
    changed[100_000] ^= 1
    segment.write_bytes(bytes(changed))
    refused = _walship(archive, "wal-push", str(segment), env=env)
    assert refused.returncode == 11, refused.stderr  # type: ignore[attr-defined]
    assert "different contents" in refused.stderr  # type: ignore[attr-defined]
    # The archived bytes are untouched.
    again = _walship(archive, "wal-fetch", archived_segment, "pg_wal/AGAIN",
                     env={**env, "WALSHIP_PREFETCH": "0"}, cwd=work)
    assert again.returncode == 0, again.stderr  # type: ignore[attr-defined]
    assert (work / "pg_wal" / "AGAIN").read_bytes() == original
