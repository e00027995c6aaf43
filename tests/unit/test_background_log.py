"""The detached workers' log: appended across workers, rotated once past its limit."""

from __future__ import annotations

from pathlib import Path

from walship.ops import background


def test_rotation_keeps_one_previous_log(tmp_path: Path) -> None:
    log = tmp_path / ".log"
    background._rotate(log)  # no log yet: nothing to do
    assert not log.exists()
    log.write_bytes(b"x" * background.LOG_ROTATE_BYTES)
    background._rotate(log)  # at the limit: kept, the next worker appends to it
    assert log.stat().st_size == background.LOG_ROTATE_BYTES
    log.write_bytes(b"y" * (background.LOG_ROTATE_BYTES + 1))
    background._rotate(log)
    assert not log.exists()
    assert (tmp_path / ".log.1").read_bytes()[:1] == b"y"
    log.write_bytes(b"z" * (background.LOG_ROTATE_BYTES + 1))
    background._rotate(log)  # the older .log.1 is replaced: at most two files
    assert (tmp_path / ".log.1").read_bytes()[:1] == b"z"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".log.1"]
