"""walship.walrecords against PostgreSQL's own reading of the same WAL (pg_waldump).

A throwaway cluster writes real segments: a bulk load (segments without a commit), pgbench
(busy segments, commits straddling pages), a prepared transaction (COMMIT_PREPARED), a
switch (a segment that ends in zeros) and an in-progress segment copied as a .partial file.
Then corrupted, truncated and random inputs must never raise.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.pg import PG_BIN, PgFactory, WalshipInstall, chown_pg
from walship import walrecords
from walship.walrecords import CommitTimes, commit_times

# pg_waldump prints "desc: COMMIT 2026-11-21 06:00:00.123456 UTC" (and "COMMIT_PREPARED 5:
# ..." for prepared transactions), in the time zone of its environment.
_WALDUMP_COMMIT = re.compile(
    r"desc: COMMIT(?:_PREPARED \d+:)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


@dataclass(frozen=True)
class Corpus:
    """Real WAL files and what pg_waldump says about each."""

    directory: Path
    # file name -> (first, last) commit times per pg_waldump, or None without a commit
    expected: dict[str, tuple[datetime, datetime] | None]
    switch_segment: str
    no_commit: list[str]
    partial: str
    prepared: str


def _waldump_commits(path: Path, segment_name: str) -> tuple[datetime, datetime] | None:
    # pg_waldump takes the segment number from the file name: give a .partial its segment's.
    work = path.parent / "waldump"
    work.mkdir(exist_ok=True)
    target = work / segment_name
    shutil.copyfile(path, target)
    try:
        proc = subprocess.run([str(PG_BIN / "pg_waldump"), str(target)], capture_output=True,
                              text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
                              check=False)
    finally:
        target.unlink()
    # pg_waldump exits 1 at the end of the WAL it can read ("invalid record length"): fine.
    times = [datetime.fromisoformat(t).replace(tzinfo=timezone.utc)
             for t in _WALDUMP_COMMIT.findall(proc.stdout)]
    assert proc.stdout or "could not find a valid record" in proc.stderr, proc.stderr
    return (times[0], times[-1]) if times else None


@pytest.fixture(scope="module")
def corpus(walship_install: WalshipInstall) -> Iterator[Corpus]:
    factory = PgFactory(walship_install)
    try:
        archive = factory.scratch_dir("wal-archive")
        cluster = factory.cluster()
        cluster.initdb()
        cluster.set_conf(archive_mode="on", archive_command=f"'cp %p {archive}/%f'",
                         max_prepared_transactions="2", min_wal_size="'32MB'")
        cluster.start()
        # A bulk load writes segments in which no transaction ends.
        cluster.pgbench("-i", "-q", "-s", "3")
        cluster.pgbench("-n", "-c", "2", "-T", "2")
        cluster.psql("create table x (i int)")
        prepared_segment = cluster.psql("select pg_walfile_name(pg_current_wal_insert_lsn())")
        cluster.psql("begin; insert into x values (1); prepare transaction 'p1'")
        cluster.psql("commit prepared 'p1'")
        cluster.psql("insert into x values (2)")
        switch_segment = cluster.psql("select pg_walfile_name(pg_current_wal_insert_lsn())")
        cluster.psql("select pg_switch_wal()")
        cluster.psql("insert into x values (3)")
        # The insert position: the write position sits at the segment boundary after a switch
        # (synchronous_commit is off), which pg_walfile_name gives as the segment before.
        current = cluster.psql("select pg_walfile_name(pg_current_wal_insert_lsn())")
        cluster.psql("checkpoint")  # the in-progress segment's pages reach the file
        cluster.wait_for(f"select last_archived_wal >= '{switch_segment}' from pg_stat_archiver",
                         "t")
        partial = f"{current}.partial"
        shutil.copyfile(cluster.datadir / "pg_wal" / current, archive / partial)
        cluster.stop()
        chown_pg(archive)
        expected: dict[str, tuple[datetime, datetime] | None] = {}
        for path in sorted(archive.iterdir()):
            if path.is_file():
                expected[path.name] = _waldump_commits(path, path.name[:24])
        no_commit = [n for n, v in expected.items() if v is None]
        assert no_commit, "the bulk load should have written a segment without a commit"
        assert expected[switch_segment] is not None and expected[partial] is not None
        yield Corpus(archive, expected, switch_segment, no_commit, partial, prepared_segment)
    finally:
        factory.close()


def _times(path: Path) -> CommitTimes | None:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return commit_times(buf)


def _as_datetimes(result: CommitTimes | None) -> tuple[datetime, datetime] | None:
    return None if result is None else (result.first_time, result.last_time)


@pytest.mark.slow
def test_matches_pg_waldump_on_every_segment(corpus: Corpus) -> None:
    assert len(corpus.expected) >= 5
    for name, expected in corpus.expected.items():
        assert _as_datetimes(_times(corpus.directory / name)) == expected, name


@pytest.mark.slow
def test_segment_kinds(corpus: Corpus) -> None:
    # A segment ended by pg_switch_wal: its last commit is before the zeros.
    switched = _times(corpus.directory / corpus.switch_segment)
    assert switched is not None
    # The .partial copy of the segment in progress holds the commit after the switch.
    partial = _times(corpus.directory / corpus.partial)
    assert partial is not None and partial.first > switched.last
    # Bulk-load segments: no commit at all.
    for name in corpus.no_commit:
        assert _times(corpus.directory / name) is None
    # bytes, memoryview and mmap give the same answer.
    data = (corpus.directory / corpus.switch_segment).read_bytes()
    assert commit_times(data) == commit_times(memoryview(data)) == switched


@pytest.mark.slow
def test_commit_prepared_is_a_commit(corpus: Corpus) -> None:
    name = corpus.prepared
    proc = subprocess.run([str(PG_BIN / "pg_waldump"), str(corpus.directory / name)],
                          capture_output=True, text=True, env={"TZ": "UTC"}, check=False)
    assert "COMMIT_PREPARED" in proc.stdout
    assert _as_datetimes(_times(corpus.directory / name)) == corpus.expected[name]


@pytest.mark.slow
def test_a_stale_tail_is_not_read_as_records(corpus: Corpus) -> None:
    """Replace everything after the switch segment's last commit page with the bytes of a
    busy segment (what a recycled file holds): page addresses differ, nothing changes."""
    data = bytearray((corpus.directory / corpus.switch_segment).read_bytes())
    busy = max((n for n, v in corpus.expected.items() if v is not None and n != corpus.partial),
               key=lambda n: os.path.getsize(corpus.directory / n))
    other = (corpus.directory / busy).read_bytes()
    before = commit_times(bytes(data))
    assert before is not None
    segment = walrecords._Segment.open(bytes(data))
    assert segment is not None
    end = (segment.last_live_page() + 1) * segment.blcksz
    assert 0 < end < len(data)
    data[end:] = other[end:]
    assert commit_times(bytes(data)) == before


def test_not_wal_and_tiny_inputs() -> None:
    assert commit_times(b"") is None
    assert commit_times(bytes(40)) is None
    assert commit_times(bytes(16 * 1024 * 1024)) is None
    assert commit_times(b"\xff" * 100) is None


def test_time_formatting_round_trips() -> None:
    moment = walrecords.pg_time(847_000_000_123_456)
    text = walrecords.format_time(moment)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    assert walrecords.parse_time(text) == moment
    with pytest.raises(ValueError):
        walrecords.parse_time("2026-11-21T06:00:00.000000+01:00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=20000))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert commit_times(data) is None or isinstance(commit_times(data), CommitTimes)


def _long_header(blcksz: int = 8192, seg_size: int = 1 << 20) -> bytes:
    import struct
    return struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, 0, 0, 1, seg_size, blcksz)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40000))
def test_random_records_behind_a_valid_header_never_raise(tail: bytes) -> None:
    """A genuine long header in front of random bytes: the walk must end safely."""
    data = _long_header() + tail
    result = commit_times(data)
    assert result is None or isinstance(result, CommitTimes)


@pytest.mark.slow
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_corrupted_and_truncated_segments_never_raise(corpus: Corpus, data: st.DataObject
                                                      ) -> None:
    name = data.draw(st.sampled_from(sorted(corpus.expected)))
    segment = bytearray((corpus.directory / name).read_bytes())
    for _ in range(data.draw(st.integers(0, 20))):
        pos = data.draw(st.integers(0, len(segment) - 1))
        segment[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(segment)), st.integers(0, len(segment))))
    result = commit_times(bytes(segment[:cut]))
    assert result is None or isinstance(result, CommitTimes)
