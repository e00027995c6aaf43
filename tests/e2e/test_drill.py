"""walship drill end to end, run as root the way cron runs it: the drill restores into a
scratch directory, runs PostgreSQL 15 as `postgres` with walship as restore_command, replays,
promotes, checks and tears everything down; it passes on a good archive and fails with exit
16 and the evidence on a corrupted one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Archive, archiving_cluster, make_archive, switch_and_wait_archived
from tests.helpers.pg import PgCluster, PgFactory, chown_pg
from walship import layout, wal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _file_archive(pg_factory: PgFactory) -> Archive:
    archive = make_archive(pg_factory)  # symmetric key
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()
    chown_pg(store)
    return archive


def _root_config(pg_factory: PgFactory, archive: Archive) -> Path:
    """The restore host's configuration: the store, and the secret key in a directory only
    root can read (so the drill must hand the server's user a copy)."""
    keydir = pg_factory.new_path("root-keys")
    keydir.mkdir(mode=0o700)
    key = keydir / "secret.key"
    key.write_bytes((archive.keydir / "secret.key").read_bytes())
    key.chmod(0o600)
    config = keydir / "walship.toml"
    config.write_text(f'store = "{archive.store_url}"\nkey_file = "{key}"\n')
    return config


def _drill_as_invoker(config: Path, *args: str, install_bin: Path
                      ) -> subprocess.CompletedProcess[str]:
    """`walship drill` as the user running the tests (root on CI: the server then runs as
    postgres), with only WALSHIP_CONFIG set for walship."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "PG"))}
    env["WALSHIP_CONFIG"] = str(config)
    return subprocess.run([str(install_bin), "drill", *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"not JSON ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                             ) from None
    assert isinstance(doc, dict)
    return doc


def _count(cluster: PgCluster) -> int:
    return int(cluster.psql("select count(*) from t"))


def test_drill_passes_reaches_targets_and_fails_on_a_corrupted_segment(
        pg_factory: PgFactory) -> None:
    archive = _file_archive(pg_factory)
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table t (id int primary key, payload text)")
    primary.psql("insert into t select g, md5(g::text) from generate_series(1, 5000) g")
    proc = archive.run("backup-push", str(primary.datadir), env=primary.libpq_env)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    backup = proc.stdout.strip()  # type: ignore[attr-defined]

    primary.psql("insert into t select g, 'after' from generate_series(5001, 6000) g")
    time.sleep(1.1)
    target = primary.psql("select now()")
    at_target = _count(primary)
    time.sleep(1.1)
    primary.psql("insert into t select g, 'late' from generate_series(6001, 6500) g")
    last_lsn = wal.parse_lsn(primary.psql("select pg_current_wal_insert_lsn()"))
    needed = primary.psql("select pg_walfile_name(pg_current_wal_lsn())")
    switch_and_wait_archived(primary)
    final = _count(primary)
    primary.stop()

    config = _root_config(pg_factory, archive)
    scratch = pg_factory.scratch_dir("drill-scratch")
    store = Path(archive.store_url.removeprefix("file://"))

    # The whole archive, with the operator's own check.
    good = _drill_as_invoker(config, "--json", "--scratch", str(scratch),
                             "--check-sql", f"select count(*) = {final} from t",
                             install_bin=archive.install.bin)
    doc = _report(good)
    assert good.returncode == 0, (doc, good.stderr)
    assert doc["ok"] is True and doc["reason"] is None and doc["backup"] == backup
    assert doc["target"] == "latest" and doc["server_user"] == "postgres"
    figures = doc["figures"]
    assert wal.parse_lsn(figures["reached_lsn"]) >= last_lsn
    assert figures["replayed_wal_bytes"] == (wal.parse_lsn(figures["reached_lsn"])
                                             - wal.parse_lsn(doc["backup_start_lsn"]))
    assert figures["restore_seconds"] > 0 and figures["replay_seconds"] > 0
    assert figures["reached_time"] is not None and figures["timeline"] == 2
    names = [c["name"] for c in doc["checks"]]
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert names[:2] == ["promoted", "reached end of archive"]
    assert "amcheck postgres" in names and "check-sql" in names
    amcheck = next(c for c in doc["checks"] if c["name"] == "amcheck postgres")
    assert "public.t" in amcheck["detail"]
    assert list(scratch.iterdir()) == []  # torn down, key copy included
    recorded = json.loads((store / layout.DRILL_LAST_KEY).read_text())
    assert recorded["ok"] is True and recorded["backup"] == backup
    assert (store / layout.DRILL_LAST_SUCCESS_KEY).exists()

    # To a time: the data as it was then, and no transaction after it.
    timed = _drill_as_invoker(config, "--json", "--scratch", str(scratch), "--target-time",
                              target, "--check-sql", f"select count(*) = {at_target} from t",
                              "--sample", "0", install_bin=archive.install.bin)
    doc = _report(timed)
    assert timed.returncode == 0, (doc, timed.stderr)
    assert doc["target"].startswith("time ") and doc["ok"] is True
    assert "reached target" in [c["name"] for c in doc["checks"]]
    reached = doc["figures"]["reached_time"]
    from walship.ops.recovery import parse_target_time

    assert parse_target_time(reached) <= parse_target_time(target)
    assert wal.parse_lsn(doc["figures"]["reached_lsn"]) < last_lsn

    # A byte flipped in a segment the replay needs: the fetch aborts recovery.
    obj = store / layout.wal_key(needed)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    with open(obj, "r+b") as fh:  # in place: the object's metadata (xattrs) stays
        fh.write(data)
    bad = _drill_as_invoker(config, "--json", "--scratch", str(scratch), "--sample", "0",
                            install_bin=archive.install.bin)
    doc = _report(bad)
    assert bad.returncode == 16, (doc, bad.stderr)
    assert doc["ok"] is False and doc["exit_code"] == 16
    reason = doc["reason"]
    assert f'could not restore file "{needed}"' in reason, reason
    assert "exit code 159" in reason and "walship:" in reason, reason
    errors = [line for line in bad.stderr.splitlines() if line.startswith("walship: error:")]
    assert len(errors) == 1 and "drill failed: recovery aborted" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr
    assert list(scratch.iterdir()) == []
    recorded = json.loads((store / layout.DRILL_LAST_KEY).read_text())
    assert recorded["ok"] is False and recorded["reason"] == reason
    # The last success is still the one before.
    success = json.loads((store / layout.DRILL_LAST_SUCCESS_KEY).read_text())
    assert success["ok"] is True and success["target"].startswith("time ")


def test_drill_keep_leaves_a_clean_promoted_directory_and_no_key(pg_factory: PgFactory) -> None:
    """--keep: the promoted data directory stays (shut down cleanly), the key copy does not;
    a --check-sql that returns false fails the drill with exit 16."""
    archive = _file_archive(pg_factory)
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table t as select g as id from generate_series(1, 100) g")
    proc = archive.run("backup-push", str(primary.datadir), env=primary.libpq_env)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    switch_and_wait_archived(primary)
    primary.stop()

    config = _root_config(pg_factory, archive)
    scratch = pg_factory.scratch_dir("drill-scratch")
    kept = _drill_as_invoker(config, "--json", "--keep", "--scratch", str(scratch),
                             "--check-sql", "select count(*) = 99 from t", "--sample", "0",
                             install_bin=archive.install.bin)
    doc = _report(kept)
    assert kept.returncode == 16, (doc, kept.stderr)
    assert doc["reason"] == "check check-sql failed: returned false", doc["reason"]
    assert doc["kept"] is True
    root = Path(doc["scratch"])
    assert root.parent == scratch and root.is_dir()
    assert not (root / "keys").exists()
    pgdata = root / "pgdata"
    assert not (pgdata / "postmaster.pid").exists()  # stopped
    assert not (pgdata / "recovery.signal").exists()  # promoted
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert pgdata.stat().st_uid != 0  # the server's user owns it

    # Ctrl-C while the server runs: the server is stopped and the scratch tree removed.
    interrupted = pg_factory.scratch_dir("drill-interrupted")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "PG"))}
    env["WALSHIP_CONFIG"] = str(config)
    proc = subprocess.Popen([str(archive.install.bin), "drill", "--scratch", str(interrupted),
                             "--check-sql", "select pg_sleep(120) is not null"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _wait_for_postmaster(interrupted)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "walship: error: interrupted" in err
    assert list(interrupted.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # An interrupted drill is not a result: the record is still the failed check's.
    store = Path(archive.store_url.removeprefix("file://"))
    assert json.loads((store / layout.DRILL_LAST_KEY).read_text())["reason"] == doc["reason"]

    # No PostgreSQL of the backup's version where --pg-bin points: 13, not a verdict on the
    # archive, but recorded so that status shows the drill did not happen.
    nobin = _drill_as_invoker(config, "--json", "--pg-bin", str(interrupted),
                              install_bin=archive.install.bin)
    assert nobin.returncode == 13, nobin.stderr
    assert "holds no runnable postgres; the backup needs PostgreSQL 15" in nobin.stderr
    assert json.loads((store / layout.DRILL_LAST_KEY).read_text())["exit_code"] == 13


def _wait_for_postmaster(scratch: Path, timeout: float = 120) -> int:
    """The drill's postmaster pid, once its server has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pidfile in scratch.glob("walship-drill-*/pgdata/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(pidfile.read_text().splitlines()[0])
        time.sleep(0.05)
    raise AssertionError(f"no drill server started under {scratch}")
