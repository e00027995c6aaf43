"""Property tests for walship.wal: names, LSN arithmetic, segment headers, history files."""

from __future__ import annotations

import struct
from datetime import datetime

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from walship import wal
from walship.wal import WalKind, WalName

U32 = 0xFFFF_FFFF
SEGMENT_SIZES = [1 << bits for bits in range(20, 31)]  # 1 MiB .. 1 GiB, as initdb allows

timelines = st.integers(min_value=1, max_value=U32)
u32s = st.integers(min_value=0, max_value=U32)
lsns = st.integers(min_value=0, max_value=(1 << 64) - 1)
segment_sizes = st.sampled_from(SEGMENT_SIZES)


@st.composite
def wal_names(draw: st.DrawFn) -> WalName:
    """Any WalName PostgreSQL could archive, of every kind."""
    kind = draw(st.sampled_from(list(WalKind)))
    if kind is WalKind.TIMELINE_HISTORY:
        return WalName(draw(timelines), 0, 0, kind)
    offset = draw(u32s) if kind is WalKind.BACKUP_HISTORY else 0
    return WalName(draw(timelines), draw(u32s), draw(u32s), kind, offset)


# --- names --------------------------------------------------------------------------------


@given(wal_names())
def test_name_round_trips(name: WalName) -> None:
    text = name.name
    assert wal.parse_wal_name(text) == name
    assert wal.parse_wal_name(text).name == text
    assert str(name) == text
    assert wal.is_wal_name(text)


@given(timelines, u32s, u32s, u32s)
def test_names_have_postgresql_shape(tli: int, log: int, seg: int, offset: int) -> None:
    segment = WalName(tli, log, seg, WalKind.SEGMENT).name
    assert len(segment) == 24
    assert segment == f"{tli:08X}{log:08X}{seg:08X}"
    assert WalName(tli, log, seg, WalKind.PARTIAL).name == segment + ".partial"
    backup = WalName(tli, log, seg, WalKind.BACKUP_HISTORY, offset).name
    assert backup == f"{segment}.{offset:08X}.backup"
    assert WalName(tli, log, seg, WalKind.BACKUP_HISTORY, offset).segment_name == segment


def test_timeline_one_history_name_parses() -> None:
    # Timeline 1 never has a history file, but the server may still ask restore_command for
    # 00000001.history; wal-fetch must answer "not found" (exit 1), not "bad name" (152).
    assert wal.parse_wal_name("00000001.history") == WalName(1, 0, 0, WalKind.TIMELINE_HISTORY)


def test_known_names() -> None:
    assert wal.parse_wal_name("000000010000000000000002") == WalName(1, 0, 2, WalKind.SEGMENT)
    assert wal.parse_wal_name("0000000200000001000000FF.partial") == WalName(
        2, 1, 0xFF, WalKind.PARTIAL
    )
    assert wal.parse_wal_name("000000010000000000000002.00000028.backup") == WalName(
        1, 0, 2, WalKind.BACKUP_HISTORY, 0x28
    )
    assert wal.parse_wal_name("0000000A.history") == WalName(10, 0, 0, WalKind.TIMELINE_HISTORY)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "00000001000000000000000",  # 23 characters
        "0000000100000000000000001",  # 25 characters
        "0000000100000000000000",
        "0000000100000000000000ff",
        "00000001000000000000000a",
        "0000000100000000000000FG",
        "000000000000000000000001",  # timeline 0
        "000000000000000000000001.partial",
        "000000000000000000000001.00000028.backup",
        "00000000.history",
        "0000000a.history",
        "0000001.history",
        "000000010000000000000002.backup",
        "000000010000000000000002.0000028.backup",
        "000000010000000000000002.00000028.BACKUP",
        "000000010000000000000002.PARTIAL",
        "000000010000000000000002.partial.tmp",
        "pg_wal/000000010000000000000002",
        "/var/lib/postgresql/15/main/pg_wal/000000010000000000000002",
        "./000000010000000000000002",
        "../000000010000000000000002",
        "000000010000000000000002/",
        " 000000010000000000000002",
        "000000010000000000000002 ",
        "archive_status",
        "000000010000000000000002.ready",
        "base_000000010000000000000002_00000028",
    ],
)
def test_parse_wal_name_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_wal_name(text)
    assert not wal.is_wal_name(text)


@pytest.mark.parametrize(
    "text",
    [
        "000000010000000000000002\n",
        "000000010000000000000002.partial\n",
        "000000010000000000000002.00000028.backup\n",
        "00000002.history\n",
    ],
)
def test_parse_wal_name_rejects_trailing_newline(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_wal_name(text)


@given(st.text(max_size=40))
@example("000000010000000000000001")
def test_parse_wal_name_accepts_only_what_it_prints(text: str) -> None:
    try:
        parsed = wal.parse_wal_name(text)
    except ValueError:
        return
    assert parsed.name == text


def test_names_of_one_segment_sort() -> None:
    names = [
        wal.parse_wal_name("000000010000000000000002.00000028.backup"),
        wal.parse_wal_name("000000010000000000000002"),
    ]
    assert sorted(names)[0].segment_name == "000000010000000000000002"


# --- segment numbers ----------------------------------------------------------------------


def test_segments_per_log_follows_postgresql() -> None:
    for size in SEGMENT_SIZES:
        assert wal.segments_per_log(size) == 2**32 // size
    assert wal.segments_per_log(16 * 1024 * 1024) == 256
    assert wal.segments_per_log(1024 * 1024 * 1024) == 4


@pytest.mark.parametrize(
    "size",
    [0, 1, 512 * 1024, 1024 * 1024 - 1, 3 * 1024 * 1024, 24 * 1024 * 1024, 2 * 1024**3, -16],
)
def test_invalid_segment_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        wal.check_segment_size(size)
    with pytest.raises(ValueError):
        wal.segments_per_log(size)


@given(timelines, st.integers(min_value=0, max_value=(1 << 44)), segment_sizes)
def test_segno_round_trips(tli: int, segno: int, size: int) -> None:
    per_log = 2**32 // size
    assume(segno // per_log <= U32)
    name = wal.segment_from_segno(tli, segno, size)
    assert name.kind is WalKind.SEGMENT
    assert (name.log, name.seg) == divmod(segno, per_log)
    assert name.seg < per_log
    assert name.segno(size) == segno
    assert wal.parse_wal_name(name.name).segno(size) == segno


@given(timelines, u32s, segment_sizes)
def test_next_segment_follows_postgresql(tli: int, log: int, size: int) -> None:
    per_log = 2**32 // size
    assume(log < U32)
    last = WalName(tli, log, per_log - 1, WalKind.SEGMENT)
    after = wal.next_segment(last, size)
    # Crossing a log boundary: the segment wraps to 0 and the log id moves on.
    assert (after.timeline, after.log, after.seg) == (tli, log + 1, 0)
    first = WalName(tli, log, 0, WalKind.SEGMENT)
    assert wal.next_segment(first, size) == WalName(tli, log, 1, WalKind.SEGMENT)


def test_next_segment_known_values() -> None:
    mib16 = 16 * 1024 * 1024
    last = wal.parse_wal_name("0000000100000000000000FF")
    assert wal.next_segment(last, mib16).name == "000000010000000100000000"
    gib = 1024**3
    assert wal.next_segment(wal.parse_wal_name("000000010000000000000003"), gib).name == (
        "000000010000000100000000"
    )
    mib1 = 1024 * 1024
    assert wal.next_segment(wal.parse_wal_name("000000010000000000000FFF"), mib1).name == (
        "000000010000000100000000"
    )
    assert wal.next_segment(wal.parse_wal_name("0000000300000007000000FE"), mib16).name == (
        "0000000300000007000000FF"
    )


@given(timelines, st.integers(min_value=0, max_value=(1 << 40)), segment_sizes)
def test_next_segment_is_segno_plus_one(tli: int, segno: int, size: int) -> None:
    name = wal.segment_from_segno(tli, segno, size)
    assert wal.next_segment(name, size).segno(size) == segno + 1


# --- LSNs ---------------------------------------------------------------------------------


@given(lsns)
def test_lsn_round_trips(lsn: int) -> None:
    text = wal.format_lsn(lsn)
    assert wal.parse_lsn(text) == lsn
    assert wal.parse_lsn(text.lower()) == lsn
    high, low = text.split("/")
    assert high == f"{lsn >> 32:X}" and low == f"{lsn & U32:X}"


def test_known_lsns() -> None:
    assert wal.parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert wal.format_lsn(0x2000028) == "0/2000028"
    assert wal.format_lsn(0) == "0/0"
    assert wal.parse_lsn("FFFFFFFF/FFFFFFFF") == (1 << 64) - 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "0/",
        "/0",
        "0",
        "0x0/0",
        "0/0/0",
        "1 /2",
        "123456789/0",
        "0/123456789",
        "G/0",
        "-1/0",
        "0/-1",
        "+1/0",
        "0:0",
        "16/B374D848 junk",
        "１/0",  # full-width digit
    ],
)
def test_parse_lsn_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_lsn(text)


@pytest.mark.parametrize("lsn", [-1, 1 << 64])
def test_format_lsn_rejects_out_of_range(lsn: int) -> None:
    with pytest.raises(ValueError):
        wal.format_lsn(lsn)


@given(timelines, lsns, segment_sizes)
def test_segment_for_lsn(tli: int, lsn: int, size: int) -> None:
    name = wal.segment_for_lsn(tli, lsn, size)
    start = name.segno(size) * size
    assert start <= lsn < start + size
    # The log id is the high half of the LSN, as in PostgreSQL's XLByteToSeg/XLogFileName.
    assert name.log == lsn >> 32
    assert name.seg == (lsn & U32) // size
    assert wal.segment_for_lsn(tli, wal.parse_lsn(wal.format_lsn(lsn)), size) == name


def test_segment_for_known_lsn() -> None:
    mib16 = 16 * 1024 * 1024
    assert wal.segment_for_lsn(1, wal.parse_lsn("0/2000028"), mib16).name == (
        "000000010000000000000002"
    )
    assert wal.segment_for_lsn(1, wal.parse_lsn("16/B374D848"), mib16).name == (
        "0000000100000016000000B3"
    )


# --- backup names -------------------------------------------------------------------------


def test_backup_name_known_value() -> None:
    mib16 = 16 * 1024 * 1024
    name = wal.backup_name(1, wal.parse_lsn("0/2000028"), mib16)
    assert name == "base_000000010000000000000002_00000028"
    assert wal.is_backup_name(name)
    assert wal.parse_backup_name(name) == (wal.parse_wal_name("000000010000000000000002"), 0x28)


@given(timelines, lsns, lsns, segment_sizes)
def test_backup_names_sort_in_wal_order(tli: int, a: int, b: int, size: int) -> None:
    name_a, name_b = wal.backup_name(tli, a, size), wal.backup_name(tli, b, size)
    assert (name_a < name_b) == (a < b)
    assert (name_a == name_b) == (a == b)


@given(timelines, lsns, segment_sizes)
def test_backup_name_round_trips(tli: int, lsn: int, size: int) -> None:
    name = wal.backup_name(tli, lsn, size)
    assert wal.is_backup_name(name)
    segment, offset = wal.parse_backup_name(name)
    assert segment == wal.segment_for_lsn(tli, lsn, size)
    assert segment.segno(size) * size + offset == lsn


@pytest.mark.parametrize(
    "text",
    [
        "base_000000010000000000000002",
        "base_000000010000000000000002_0000002",
        "base_000000010000000000000002_00000028_x",
        "base_000000010000000000000002_0000002a",
        "BASE_000000010000000000000002_00000028",
        "base_000000000000000000000002_00000028",  # timeline 0
        "000000010000000000000002_00000028",
        "LATEST",
    ],
)
def test_parse_backup_name_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_backup_name(text)


# --- segment headers ----------------------------------------------------------------------

PG15_MAGIC = 0xD110
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004


def long_header(
    *,
    magic: int = PG15_MAGIC,
    info: int = XLP_LONG_HEADER | XLP_BKP_REMOVABLE,
    tli: int = 1,
    pageaddr: int = 0x2000000,
    rem_len: int = 0,
    sysid: int = 7_312_345_678_901_234_567,
    seg_size: int = 16 * 1024 * 1024,
    blcksz: int = 8192,
) -> bytes:
    """XLogLongPageHeaderData as a little-endian server writes it (see wal.py)."""
    short = struct.pack("<HHIQI", magic, info, tli, pageaddr, rem_len) + b"\0" * 4  # to 24
    return short + struct.pack("<QII", sysid, seg_size, blcksz)


def test_long_header_layout() -> None:
    assert wal.LONG_HEADER_SIZE == 40
    assert len(long_header()) == 40


@given(
    tli=timelines,
    pageaddr=st.integers(min_value=0, max_value=(1 << 64) - 1),
    sysid=st.integers(min_value=0, max_value=(1 << 64) - 1),
    seg_size=segment_sizes,
    blcksz=st.sampled_from([1024, 2048, 4096, 8192, 16384, 32768, 65536]),
    magic=st.sampled_from([0xD101, 0xD106, 0xD10D, PG15_MAGIC, 0xD113, 0xD116]),
    tail=st.binary(max_size=64),
)
def test_parse_segment_header(
    tli: int, pageaddr: int, sysid: int, seg_size: int, blcksz: int, magic: int, tail: bytes
) -> None:
    head = long_header(
        magic=magic, tli=tli, pageaddr=pageaddr, sysid=sysid, seg_size=seg_size, blcksz=blcksz
    )
    parsed = wal.parse_segment_header(head + tail)
    assert parsed == wal.SegmentHeader(magic, tli, pageaddr, sysid, seg_size, blcksz)


@pytest.mark.parametrize("magic", [0xD097, 0xD098])
def test_parse_segment_header_accepts_pg10_and_pg11(magic: int) -> None:
    assert wal.parse_segment_header(long_header(magic=magic)).magic == magic


@pytest.mark.parametrize(
    "head",
    [
        b"",
        long_header()[:39],
        b"\0" * 40,
        b"\xff" * 8192,
        long_header(info=0),  # a short header: not the first page of a segment
        long_header(magic=0x1234),
        long_header(magic=0xD200),
        long_header(seg_size=0),
        long_header(seg_size=3 * 1024 * 1024),
        long_header(seg_size=2 * 1024**3),
        long_header(blcksz=0),
        long_header(blcksz=1000),
        long_header(blcksz=131072),
        long_header()[::-1],
        struct.pack(">HHIQI4xQII", PG15_MAGIC, 2, 1, 0, 0, 1, 16 * 1024 * 1024, 8192),
    ],
)
def test_parse_segment_header_rejects_garbage(head: bytes) -> None:
    with pytest.raises(ValueError):
        wal.parse_segment_header(head)


@given(st.binary(max_size=80))
def test_parse_segment_header_never_crashes(head: bytes) -> None:
    try:
        parsed = wal.parse_segment_header(head)
    except ValueError:
        return
    assert parsed.segment_size in SEGMENT_SIZES


# --- timeline history files ---------------------------------------------------------------


def test_parse_timeline_history_pg15() -> None:
    # 00000002.history as PostgreSQL 15 writes it after one promotion.
    text = "1\t0/3000000\tno recovery target specified\n"
    assert wal.parse_timeline_history(text) == [
        wal.TimelineSwitch(1, 0x3000000, "no recovery target specified")
    ]


def test_parse_timeline_history_several_switches() -> None:
    # 00000003.history: the parent's lines, then a blank line and the new switch
    # (writeTimeLineHistory() starts each appended entry with a newline).
    text = (
        "1\t0/3000000\tno recovery target specified\n"
        "\n"
        "2\t0/50000A0\tbefore 2026-11-21 06:30:00+00\n"
    )
    assert wal.parse_timeline_history(text) == [
        wal.TimelineSwitch(1, 0x3000000, "no recovery target specified"),
        wal.TimelineSwitch(2, 0x50000A0, "before 2026-11-21 06:30:00+00"),
    ]


def test_parse_timeline_history_comments_and_empty() -> None:
    assert wal.parse_timeline_history("") == []
    assert wal.parse_timeline_history("# a comment\n\n") == []
    assert wal.parse_timeline_history("# c\n1\t0/3000000\n") == [
        wal.TimelineSwitch(1, 0x3000000, "")
    ]


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=U32),
            lsns,
            st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
        ),
        max_size=8,
    )
)
def test_parse_timeline_history_round_trips(entries: list[tuple[int, int, str]]) -> None:
    text = "".join(f"{tli}\t{wal.format_lsn(lsn)}\t{reason}\n\n" for tli, lsn, reason in entries)
    parsed = wal.parse_timeline_history(text)
    assert [(s.parent, s.switch_lsn, s.reason) for s in parsed] == entries


@pytest.mark.parametrize(
    "text", ["1\n", "x\t0/3000000\treason\n", "1\tnot-an-lsn\treason\n", "1\t0/3000000/1\n"]
)
def test_parse_timeline_history_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_timeline_history(text)


# --- backup history files -----------------------------------------------------------------

PG15_BACKUP_HISTORY = (
    "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    "STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2000060\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: primary\n"
    "START TIME: 2026-11-21 06:00:01 UTC\n"
    "LABEL: x\n"
    "START TIMELINE: 1\n"
    "STOP TIME: 2026-11-21 06:00:02 UTC\n"
    "STOP TIMELINE: 1\n"
)


def test_parse_backup_history_pg15() -> None:
    history = wal.parse_backup_history(PG15_BACKUP_HISTORY)
    assert history.start_lsn == 0x2000028
    assert history.stop_lsn == 0x2000100
    assert history.checkpoint_lsn == 0x2000060
    assert history.start_timeline == 1
    assert history.stop_timeline == 1
    assert history.label == "x"
    assert history.start_time is not None and history.stop_time is not None
    assert history.start_time.replace(tzinfo=None) == datetime(2026, 11, 21, 6, 0, 1)
    assert history.stop_time.replace(tzinfo=None) == datetime(2026, 11, 21, 6, 0, 2)
    assert history.start_time < history.stop_time


def test_parse_backup_history_numeric_offset_and_label_with_colon() -> None:
    text = (
        PG15_BACKUP_HISTORY.replace("UTC", "+0100")
        .replace("LABEL: x", "LABEL: nightly: 2026-11-21 06:00")
        .replace("STOP TIMELINE: 1", "STOP TIMELINE: 2")
    )
    history = wal.parse_backup_history(text)
    assert history.label == "nightly: 2026-11-21 06:00"
    assert history.start_time is not None and history.start_time.utcoffset() is not None
    assert history.start_time.utcoffset().total_seconds() == 3600  # type: ignore[union-attr]
    assert history.stop_timeline == 2


def test_parse_backup_history_matches_its_file_name() -> None:
    # The .backup file is named after the start segment and the start LSN's offset in it.
    history = wal.parse_backup_history(PG15_BACKUP_HISTORY)
    size = 16 * 1024 * 1024
    segment = wal.segment_for_lsn(history.start_timeline, history.start_lsn, size)
    name = WalName(1, segment.log, segment.seg, WalKind.BACKUP_HISTORY, history.start_lsn % size)
    assert name.name == "000000010000000000000002.00000028.backup"
    assert wal.backup_name(1, history.start_lsn, size) == "base_000000010000000000000002_00000028"


def test_parse_backup_history_minimal() -> None:
    history = wal.parse_backup_history(
        "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
        "STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n"
    )
    assert (history.start_lsn, history.stop_lsn) == (0x2000028, 0x2000100)
    assert history.checkpoint_lsn is None
    assert history.start_time is None and history.stop_time is None
    assert (history.start_timeline, history.stop_timeline) == (1, 1)
    assert history.label == ""


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage\n",
        PG15_BACKUP_HISTORY.replace("START WAL LOCATION", "START WAL"),
        PG15_BACKUP_HISTORY.replace("STOP WAL LOCATION: 0/2000100", "STOP WAL LOCATION:"),
        PG15_BACKUP_HISTORY.replace("0/2000100", "zz/2000100"),
        PG15_BACKUP_HISTORY.replace("START TIMELINE: 1", "START TIMELINE: one"),
    ],
)
def test_parse_backup_history_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        wal.parse_backup_history(text)
