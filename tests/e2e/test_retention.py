"""`walship delete` end to end with real PostgreSQL 15: three backups with WAL between them,
`delete retain 2` as a dry run and then for real, and the oldest kept backup restored and
replayed to the end of the archive. Then a PITR branch (timeline 2) that retention keeps."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.e2e.conftest import Archive, archiving_cluster, make_archive, switch_and_wait_archived
from tests.helpers.pg import PgCluster, PgFactory, chown_pg
from walship import config as config_mod
from walship import layout, wal
from walship.crypto import Keyring
from walship.ops import retention
from walship.storage import open_storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _walship(archive: Archive, *args: str, env: Mapping[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return archive.install.run(*args, env={"WALSHIP_CONFIG": str(archive.config), **(env or {})})


def _file_archive(pg_factory: PgFactory, **kwargs: object) -> tuple[Archive, Path]:
    archive = make_archive(pg_factory, **kwargs)  # type: ignore[arg-type]
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()
    chown_pg(store)
    return archive, store


def _push(archive: Archive, cluster: PgCluster) -> str:
    proc = _walship(archive, "backup-push", str(cluster.datadir), env=cluster.libpq_env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _keys(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()
            and not str(p.relative_to(store)).startswith(layout.LOCK_PREFIX)}


def _restore_and_replay(pg_factory: PgFactory, archive: Archive, name: str) -> PgCluster:
    dest = pg_factory.new_path("restore")
    fetch = _walship(archive, "backup-fetch", str(dest), name)
    assert fetch.returncode == 0, fetch.stderr
    copy = pg_factory.cluster("restored", datadir=dest)
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  archive_mode="off")
    copy.start()
    copy.wait_recovery_done()
    return copy


def _three_backups(pg_factory: PgFactory) -> tuple[Archive, Path, PgCluster, list[str]]:
    archive, store = _file_archive(pg_factory, key="symmetric")
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table t (id int primary key, step int)")
    names = []
    for step in range(3):
        primary.psql(f"insert into t select g, {step} from generate_series({step * 1000 + 1}, "
                     f"{step * 1000 + 1000}) g")
        switch_and_wait_archived(primary)
        names.append(_push(archive, primary))
    return archive, store, primary, names


def test_retain_2_deletes_the_oldest_backup_and_only_the_wal_before_the_second(
        pg_factory: PgFactory) -> None:
    archive, store, primary, (b1, b2, b3) = _three_backups(pg_factory)
    primary.psql("insert into t select g, 3 from generate_series(3001, 3500) g")
    switch_and_wait_archived(primary)
    expected = primary.psql("select count(*) || ':' || sum(step) from t")
    primary.stop()

    before = _keys(store)
    dry = _walship(archive, "delete", "retain", "2")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout and layout.sentinel_key(b1) in dry.stdout
    assert _keys(store) == before

    as_json = _walship(archive, "delete", "retain", "2", "--json")
    assert as_json.returncode == 0, as_json.stderr
    plan = json.loads(as_json.stdout)
    assert plan["dry_run"] is True
    assert plan["deleted_backups"] == [b1] and plan["kept_backups"] == [b2, b3]
    assert _keys(store) == before

    # Exactly b1's objects and the WAL before b2's start segment (b1's .backup file with it).
    b2_start, _ = wal.parse_backup_name(b2)
    expected_gone = {k for k in before if k.startswith(layout.backup_prefix(b1))}
    for key in before:
        name = layout.wal_name_from_key(key)
        if name is None or name.endswith(".history"):
            continue
        parsed = wal.parse_wal_name(name)
        if (parsed.timeline, parsed.log, parsed.seg) < (b2_start.timeline, b2_start.log,
                                                         b2_start.seg):
            expected_gone.add(key)
    assert {d["key"] for d in plan["deletions"]} == expected_gone

    done = _walship(archive, "delete", "retain", "2", "--confirm")
    assert done.returncode == 0, done.stderr
    assert f"deleted {len(expected_gone)} object(s)" in done.stdout
    assert before - _keys(store) == expected_gone
    listing = json.loads(_walship(archive, "backup-list", "--json").stdout)
    assert [b["name"] for b in listing] == [b2, b3]
    # In process: the server's own .backup files (decrypted) agree with the sentinels.
    config = config_mod.load(config_path=archive.config)
    keyring = Keyring.from_config(config)
    with open_storage(config.require_store(), config) as storage:
        inventory = retention.gather_inventory(storage, keyring)
        assert retention.cross_check(storage, keyring, inventory.backups) == 2
        assert retention.plan_deletion(inventory, retention.policy_retain(2)).deletions == ()
    again = _walship(archive, "delete", "retain", "2", "--confirm")
    assert again.returncode == 0 and "deleted 0 object(s)" in again.stdout

    copy = _restore_and_replay(pg_factory, archive, b2)
    assert copy.psql("select count(*) || ':' || sum(step) from t") == expected
    copy.stop()

    bad = _walship(archive, "delete", "retain-window", "a while")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    bad_time = _walship(archive, "delete", "before", "yesterday")
    assert bad_time.returncode == 2 and "not a time" in bad_time.stderr


def test_a_gap_is_refused_before_anything_is_deleted(pg_factory: PgFactory) -> None:
    archive, store, primary, (_b1, b2, _b3) = _three_backups(pg_factory)
    primary.stop()
    b2_start, _ = wal.parse_backup_name(b2)
    victim = store / layout.wal_key(b2_start.name)
    victim.unlink()
    before = _keys(store)
    refused = _walship(archive, "delete", "retain", "2", "--confirm")
    assert refused.returncode == 15, refused.stderr
    assert b2_start.name in refused.stderr
    assert _keys(store) == before


def test_a_pitr_branch_after_the_kept_backup_is_kept(pg_factory: PgFactory) -> None:
    archive, store, primary, (_b1, b2, b3) = _three_backups(pg_factory)
    time.sleep(1.1)
    target = primary.psql("select now()")
    state = primary.psql("select count(*) || ':' || sum(step) from t")
    time.sleep(1.1)
    primary.psql("insert into t select g, 9 from generate_series(9001, 9500) g")
    switch_and_wait_archived(primary)
    primary.stop()

    # PITR from b3 to `target`: the restored server promotes onto timeline 2 and archives.
    dest = pg_factory.new_path("pitr")
    fetch = _walship(archive, "backup-fetch", str(dest), b3, "--target-time", target)
    assert fetch.returncode == 0, fetch.stderr
    branch = pg_factory.cluster("branch", datadir=dest)
    branch.set_conf(port=str(branch.port), unix_socket_directories=f"'{branch.sockdir}'",
                    archive_mode="on", archive_command=f"'{archive.archive_command}'")
    branch.start()
    branch.wait_recovery_done()
    assert branch.psql("select count(*) || ':' || sum(step) from t") == state
    branch.psql("insert into t select g, 20 from generate_series(20001, 20300) g")
    switch_and_wait_archived(branch)
    on_branch = branch.psql("select count(*) || ':' || sum(step) from t")
    branch.stop()
    assert "wal/00000002.history" in _keys(store)

    done = _walship(archive, "delete", "retain", "1", "--confirm", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kept_backups"] == [b3]
    assert b2 in result["deleted_backups"]
    left = _keys(store)
    assert "wal/00000002.history" in left
    tl2 = [k for k in left if k.startswith("wal/00000002") and not k.endswith(".history")]
    assert tl2, left
    assert not any(d["key"].startswith("wal/00000002") for d in result["deletions"])

    # b3 still restores, follows the history to timeline 2 and replays to its end.
    copy = _restore_and_replay(pg_factory, archive, b3)
    assert copy.psql("select count(*) || ':' || sum(step) from t") == on_branch
    copy.stop()
