"""status --prometheus: the node_exporter textfile-collector format, and the lag arithmetic."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from walship import wal
from walship.ops.backup_list import BackupInfo
from walship.ops.status import (
    ServerState,
    StatusReport,
    WalState,
    _escape_label,
    format_prometheus,
)

SEG = 16 * 1024 * 1024
NOW = 1_800_000_000.0
# One sample line of the exposition format: name, optional labels, a number.
_SAMPLE = re.compile(r'^(walship_[a-z_]+)(\{[a-z]+="(?:[^"\\\n]|\\[\\n"])*"(,[a-z]+="[^"]*")*\})?'
                     r" (-?[0-9.e+]+|NaN|[+-]Inf)$")


def _backup(segno: int, stop: datetime) -> BackupInfo:
    start_lsn = segno * SEG + 0x28
    return BackupInfo(
        name=wal.backup_name(1, start_lsn, SEG), start_lsn=start_lsn, stop_lsn=start_lsn + 0x100,
        timeline=1, start_time=stop - timedelta(seconds=5), stop_time=stop,
        pg_version="15.6", pg_version_num=150006, system_identifier=7, wal_segment_size=SEG,
        label="", data_bytes=1000, stored_bytes=400, partitions=1, files=10,
        compression="lz4", encrypted=True)


def _drill(ok: bool, when: datetime) -> dict[str, Any]:
    return {"format": 1, "when": when.isoformat(), "backup": "b", "target": "latest", "ok": ok,
            "reason": None if ok else "recovery aborted: FATAL: x",
            "figures": {"restore_seconds": 1.5, "replay_seconds": 2.25,
                        "replayed_wal_bytes": 123456}}


def _report(**changes: Any) -> StatusReport:
    t0 = datetime.fromtimestamp(NOW, timezone.utc)
    fields: dict[str, Any] = {
        "store": "file:///s",
        "now": NOW,
        "wal": WalState(12, 3_000_000, "000000010000000000000007", NOW - 30.5),
        "backups": [_backup(2, t0 - timedelta(days=2)), _backup(5, t0 - timedelta(hours=3))],
        "backup_stored_bytes": 800,
        "server": ServerState(True, None, False, "000000010000000000000009",
                              9 * SEG + 0x100, 20, "000000010000000000000007",
                              t0 - timedelta(seconds=31), 0, None, None),
        "last_drill": _drill(True, t0 - timedelta(hours=1)),
        "last_successful_drill": _drill(True, t0 - timedelta(hours=1)),
        "wal_segment_size": SEG,
    }
    fields.update(changes)
    return StatusReport(**fields)


def _parse(text: str) -> dict[str, str]:
    """Check the grammar (HELP then TYPE then the family's samples, each family once) and
    return sample -> value."""
    assert text.endswith("\n")
    samples: dict[str, str] = {}
    families: list[str] = []
    current = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"{name} declared twice"
            assert lines[i + 1] == f"# TYPE {name} gauge"
            families.append(name)
            current = name
            i += 2
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        assert match.group(1) == current, f"{line!r} outside its family"
        key, _, value = line.rpartition(" ")
        samples[key] = value
        i += 1
    return samples


def test_every_figure_with_help_type_and_unix_seconds() -> None:
    report = _report()
    samples = _parse(format_prometheus(report))
    t0 = datetime.fromtimestamp(NOW, timezone.utc)
    assert samples == {
        "walship_status_timestamp_seconds": repr(NOW),
        "walship_wal_objects": "12",
        "walship_last_archived_wal_timestamp_seconds": repr(NOW - 30.5),
        "walship_last_archived_wal_age_seconds": "30.5",
        "walship_backup_count": "2",
        "walship_newest_backup_timestamp_seconds": repr((t0 - timedelta(hours=3)).timestamp()),
        "walship_oldest_backup_timestamp_seconds": repr((t0 - timedelta(days=2)).timestamp()),
        'walship_stored_bytes{kind="wal"}': "3000000",
        'walship_stored_bytes{kind="backup"}': "800",
        "walship_server_up": "1",
        "walship_archiver_failing": "0",
        "walship_archiver_failed_count": "0",
        "walship_archiver_last_archived_timestamp_seconds": repr(NOW - 31),
        # Segments 8 is complete and not archived; 9 is being written.
        "walship_archive_lag_segments": "1",
        "walship_archive_lag_bytes": str(9 * SEG + 0x100 - 8 * SEG),
        "walship_last_drill_timestamp_seconds": repr(NOW - 3600),
        "walship_last_drill_success": "1",
        "walship_last_drill_duration_seconds": "3.75",
        "walship_last_drill_replayed_wal_bytes": "123456",
        "walship_last_successful_drill_timestamp_seconds": repr(NOW - 3600),
    }


def test_unknown_values_are_left_out_not_invented() -> None:
    """An empty store, no drill, an unreachable server: no backup times, no drill samples,
    no lag; server_up says 0."""
    report = _report(wal=WalState(0, 0, None, None), backups=[], backup_stored_bytes=0,
                     server=ServerState(False, "connection refused"), last_drill=None,
                     last_successful_drill=None, wal_segment_size=None)
    samples = _parse(format_prometheus(report))
    assert samples == {
        "walship_status_timestamp_seconds": repr(NOW),
        "walship_wal_objects": "0",
        "walship_backup_count": "0",
        'walship_stored_bytes{kind="wal"}': "0",
        'walship_stored_bytes{kind="backup"}': "0",
        "walship_server_up": "0",
    }
    assert report.to_json()["server"]["reachable"] is False
    assert "server: unreachable (connection refused)" in report.render()
    assert "last drill: never" in report.render()


def test_a_failed_drill_and_no_server_checked() -> None:
    t0 = datetime.fromtimestamp(NOW, timezone.utc)
    report = _report(server=None, last_drill=_drill(False, t0 - timedelta(minutes=10)),
                     last_successful_drill=_drill(True, t0 - timedelta(days=8)))
    samples = _parse(format_prometheus(report))
    assert samples["walship_last_drill_success"] == "0"
    assert "walship_last_drill_duration_seconds" not in samples
    assert samples["walship_last_successful_drill_timestamp_seconds"] == repr(NOW - 8 * 86400)
    assert not any(k.startswith(("walship_server", "walship_archive")) for k in samples)
    assert "FAILED: recovery aborted: FATAL: x" in report.render()


def test_lag_only_on_the_same_timeline_of_a_primary() -> None:
    report = _report()
    assert report.lag() == (1, 9 * SEG + 0x100 - 8 * SEG)
    standby = ServerState(True, None, True, None, None, 0, None, None, 0, None, None)
    assert _report(server=standby).lag() is None
    other = ServerState(True, None, False, "000000020000000000000009", 9 * SEG, 0, None, None,
                        0, None, None)
    assert _report(server=other).lag() is None
    caught_up = ServerState(True, None, False, "000000010000000000000008", 8 * SEG, 0, None,
                            None, 0, None, None)
    assert _report(server=caught_up).lag() == (0, 0)


def test_failing_archiver_and_label_escaping() -> None:
    t0 = datetime.fromtimestamp(NOW, timezone.utc)
    failing = ServerState(True, None, False, "000000010000000000000009", 9 * SEG, 20,
                          "000000010000000000000007", t0 - timedelta(minutes=5), 3,
                          "000000010000000000000008", t0 - timedelta(minutes=1))
    samples = _parse(format_prometheus(_report(server=failing)))
    assert samples["walship_archiver_failing"] == "1"
    assert samples["walship_archiver_failed_count"] == "3"
    assert _escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
