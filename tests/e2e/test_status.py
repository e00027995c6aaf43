"""walship status on a real archive: the database host holds only the public key and still
reports the newest WAL, the archive lag against its server, the backups, the stored bytes and
the last drill (run by the restore host, as the invoking user, here `postgres`)."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.conftest import archiving_cluster, make_archive, switch_and_wait_archived
from tests.helpers.pg import PgFactory, chown_pg

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_SAMPLE_RE = re.compile(r'^(walship_[a-z_]+)(\{kind="(wal|backup)"\})? (\S+)$')


def _samples(text: str) -> dict[str, float]:
    """Parse the textfile format strictly: HELP and TYPE before each family's samples."""
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge", line
            declared.add(name)
            continue
        match = _SAMPLE_RE.match(line)
        assert match, line
        assert match.group(1) in declared, line
        key = match.group(1) + (f"/{match.group(3)}" if match.group(3) else "")
        samples[key] = float(match.group(4))
    return samples


def test_status_reports_the_archive_the_server_and_the_last_drill(pg_factory: PgFactory
                                                                   ) -> None:
    archive = make_archive(pg_factory, key="public")
    store = Path(archive.store_url.removeprefix("file://"))
    store.mkdir()
    chown_pg(store)
    primary = archiving_cluster(pg_factory, archive)
    primary.psql("create table t as select g as id from generate_series(1, 1000) g")
    pushed = []
    for _ in range(2):
        proc = archive.run("backup-push", str(primary.datadir), env=primary.libpq_env)
        assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
        pushed.append(proc.stdout.strip())  # type: ignore[attr-defined]
    primary.psql("insert into t select g from generate_series(1001, 2000) g")
    last = switch_and_wait_archived(primary)

    # Before any drill: reported as never, and no drill samples at all.
    before = archive.run("status", "--prometheus", env=primary.libpq_env)
    assert before.returncode == 0, before.stderr  # type: ignore[attr-defined]
    assert "walship_last_drill" not in before.stdout  # type: ignore[attr-defined]

    # The restore host (private key) drills as the invoking user: the server runs as itself.
    restore = pg_factory.write_config(
        pg_factory.scratch_dir("restore") / "walship.toml",
        {"store": archive.store_url,
         "private_key_files": [str(archive.keydir / "walship.key")]})
    scratch = pg_factory.scratch_dir("drill-scratch")
    drill = archive.run("drill", "--json", "--scratch", str(scratch), "--sample", "2",
                        config=restore)
    assert drill.returncode == 0, (drill.stdout, drill.stderr)  # type: ignore[attr-defined]
    drilled = json.loads(drill.stdout)  # type: ignore[attr-defined]
    assert drilled["server_user"] == "postgres" and drilled["backup"] == pushed[-1]
    assert list(scratch.iterdir()) == []

    started = time.time()
    proc = archive.run("status", "--json", env=primary.libpq_env)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    doc = json.loads(proc.stdout)  # type: ignore[attr-defined]
    assert doc["wal"]["newest"] == last
    assert 0 <= doc["wal"]["newest_age_seconds"] < time.time() - started + 600
    assert doc["backups"]["count"] == 2
    assert doc["backups"]["newest"]["name"] == pushed[-1]
    assert doc["backups"]["oldest"]["name"] == pushed[0]
    wal_bytes = sum(p.stat().st_size for p in (store / "wal").iterdir())
    backup_bytes = sum(p.stat().st_size for p in (store / "basebackups").rglob("*")
                       if p.is_file())
    assert doc["stored_bytes"] == {"wal": wal_bytes, "backups": backup_bytes,
                                   "total": wal_bytes + backup_bytes}
    server = doc["server"]
    assert server["reachable"] is True and server["in_recovery"] is False
    assert server["last_archived_wal"] == last and server["failing"] is False
    assert doc["archive_lag"]["segments"] == 0
    assert doc["last_drill"]["ok"] is True and doc["last_drill"]["backup"] == pushed[-1]
    assert doc["last_successful_drill"]["when"] == drilled["when"]

    prom = archive.run("status", "--prometheus", env=primary.libpq_env)
    assert prom.returncode == 0, prom.stderr  # type: ignore[attr-defined]
    samples = _samples(prom.stdout)  # type: ignore[attr-defined]
    assert samples["walship_backup_count"] == 2
    assert samples["walship_stored_bytes/wal"] == wal_bytes
    assert samples["walship_stored_bytes/backup"] == backup_bytes
    assert samples["walship_last_drill_success"] == 1
    assert samples["walship_server_up"] == 1 and samples["walship_archive_lag_segments"] == 0
    newest_mtime = (store / "wal" / last).stat().st_mtime
    assert samples["walship_last_archived_wal_timestamp_seconds"] == pytest.approx(newest_mtime)
    assert samples["walship_last_drill_timestamp_seconds"] == pytest.approx(
        datetime.fromisoformat(drilled["when"]).timestamp())

    # No server where the libpq settings point: a fact in the report, not an error.
    primary.stop()
    down = archive.run("status", "--json", env=primary.libpq_env)
    assert down.returncode == 0, down.stderr  # type: ignore[attr-defined]
    doc = json.loads(down.stdout)  # type: ignore[attr-defined]
    assert doc["server"]["reachable"] is False and doc["server"]["error"]
    assert doc["archive_lag"] is None and doc["wal"]["newest"] == last
    text = archive.run("status", env=primary.libpq_env)
    assert text.returncode == 0  # type: ignore[attr-defined]
    assert "server: unreachable" in text.stdout  # type: ignore[attr-defined]
    assert "last drill:" in text.stdout and "passed" in text.stdout  # type: ignore[attr-defined]

    # Retention never deletes the drill records.
    delete = archive.run("delete", "retain", "1", "--confirm")
    assert delete.returncode == 0, delete.stderr  # type: ignore[attr-defined]
    after = json.loads(archive.run("status", "--json").stdout)  # type: ignore[attr-defined]
    assert after["backups"]["count"] == 1
    assert after["last_drill"] == doc["last_drill"]
    assert (store / "drills" / "last.json").is_file()
