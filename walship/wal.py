"""WAL file names, timelines, LSN arithmetic, and the small files PostgreSQL archives. Pure.

Names (PostgreSQL's xlog_internal.h):
  segment          TTTTTTTTXXXXXXXXYYYYYYYY             timeline, log id, segment within log
  partial segment  TTTTTTTTXXXXXXXXYYYYYYYY.partial     the last, unfinished segment of a
                                                        timeline a standby was promoted from
  backup history   TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup   written by pg_backup_stop(); named
                                                        after the backup's first segment and
                                                        the start LSN's offset in it
  timeline history TTTTTTTT.history
A segment number counts segments from LSN 0: segno = lsn // segment_size. In a name, the
log id is segno // segments_per_log and the segment is segno % segments_per_log, where
segments_per_log = 2**32 // segment_size.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from datetime import datetime

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024

_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_PARTIAL_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.partial$")
_BACKUP_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.([0-9A-F]{8})\.backup$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


class WalKind(enum.Enum):
    """The kinds of file PostgreSQL hands to archive_command and asks of restore_command."""

    SEGMENT = "segment"
    PARTIAL = "partial"
    BACKUP_HISTORY = "backup"
    TIMELINE_HISTORY = "history"


_KIND_ORDER = {"history": 0, "segment": 1, "backup": 2, "partial": 3}


@dataclass(frozen=True)
class WalName:
    """A parsed WAL file name. `log` and `seg` are 0 for timeline history files."""

    timeline: int
    log: int
    seg: int
    kind: WalKind
    # For backup history files: the backup's start LSN offset within its first segment.
    offset: int = 0

    @property
    def name(self) -> str:
        """The file name PostgreSQL uses."""
        if self.kind is WalKind.TIMELINE_HISTORY:
            return f"{self.timeline:08X}.history"
        base = f"{self.timeline:08X}{self.log:08X}{self.seg:08X}"
        if self.kind is WalKind.PARTIAL:
            return base + ".partial"
        if self.kind is WalKind.BACKUP_HISTORY:
            return f"{base}.{self.offset:08X}.backup"
        return base

    @property
    def segment_name(self) -> str:
        """The 24-character segment part of the name (not meaningful for history files)."""
        return f"{self.timeline:08X}{self.log:08X}{self.seg:08X}"

    def segno(self, segment_size: int) -> int:
        """Segment number counted from LSN 0."""
        return self.log * segments_per_log(segment_size) + self.seg

    def __str__(self) -> str:
        return self.name

    def sort_key(self) -> tuple[int, int, int, int, int]:
        """WAL order: by timeline and position; a segment before its .backup and .partial."""
        return (self.timeline, self.log, self.seg, _KIND_ORDER[self.kind.value], self.offset)

    def __lt__(self, other: WalName) -> bool:
        return self.sort_key() < other.sort_key()


def parse_wal_name(name: str) -> WalName:
    """Parse any name PostgreSQL archives; ValueError for anything else (paths included)."""
    for regex, kind in (
        (_SEGMENT_RE, WalKind.SEGMENT),
        (_PARTIAL_RE, WalKind.PARTIAL),
        (_BACKUP_RE, WalKind.BACKUP_HISTORY),
    ):
        match = regex.fullmatch(name)
        if match:
            tli, log, seg = (int(g, 16) for g in match.groups()[:3])
            offset = int(match.group(4), 16) if kind is WalKind.BACKUP_HISTORY else 0
            if tli == 0:
                raise ValueError(f"not a WAL file name (timeline 0): {name!r}")
            return WalName(tli, log, seg, kind, offset)
    match = _HISTORY_RE.fullmatch(name)
    if match:
        tli = int(match.group(1), 16)
        if tli == 0:
            raise ValueError(f"not a timeline history file name: {name!r}")
        # Timeline 1 never has a history file, but the server still asks restore_command for
        # 00000001.history when it picks a new timeline: the answer is "not found".
        return WalName(tli, 0, 0, WalKind.TIMELINE_HISTORY)
    raise ValueError(f"not a WAL file name: {name!r}")


def is_wal_name(name: str) -> bool:
    """Whether `name` is a file name PostgreSQL archives."""
    try:
        parse_wal_name(name)
    except ValueError:
        return False
    return True


def check_segment_size(segment_size: int) -> int:
    """PostgreSQL allows powers of two from 1 MiB to 1 GiB."""
    if (
        segment_size < MIN_SEGMENT_SIZE
        or segment_size > MAX_SEGMENT_SIZE
        or segment_size & (segment_size - 1)
    ):
        raise ValueError(f"invalid WAL segment size {segment_size}")
    return segment_size


def segments_per_log(segment_size: int) -> int:
    """How many segments one log id spans (256 for 16 MiB segments)."""
    return 0x1_0000_0000 // check_segment_size(segment_size)


def segment_from_segno(timeline: int, segno: int, segment_size: int) -> WalName:
    """The segment `segno` (counted from LSN 0) on `timeline`."""
    per_log = segments_per_log(segment_size)
    return WalName(timeline, segno // per_log, segno % per_log, WalKind.SEGMENT)


def segment_for_lsn(timeline: int, lsn: int, segment_size: int) -> WalName:
    """The segment that holds the byte at `lsn`."""
    return segment_from_segno(timeline, lsn // segment_size, segment_size)


def next_segment(name: WalName, segment_size: int) -> WalName:
    """The segment after `name` on the same timeline."""
    return segment_from_segno(name.timeline, name.segno(segment_size) + 1, segment_size)


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> int. ValueError for anything else."""
    match = _LSN_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """int -> '16/B374D848', as PostgreSQL prints it."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# --- Backup names -------------------------------------------------------------------------

_BACKUP_NAME_RE = re.compile(r"^base_([0-9A-F]{24})_([0-9A-F]{8})$")


def backup_name(timeline: int, start_lsn: int, segment_size: int) -> str:
    """`base_<start segment>_<offset>`: sorts in WAL order within a timeline (DESIGN.md)."""
    seg = segment_for_lsn(timeline, start_lsn, segment_size)
    return f"base_{seg.segment_name}_{start_lsn % segment_size:08X}"


def is_backup_name(name: str) -> bool:
    """Whether `name` has the form backup_name() produces."""
    return _BACKUP_NAME_RE.fullmatch(name) is not None


def parse_backup_name(name: str) -> tuple[WalName, int]:
    """The backup's first segment and the start LSN's offset in it."""
    match = _BACKUP_NAME_RE.fullmatch(name)
    if not match:
        raise ValueError(f"not a backup name: {name!r} (expected base_<24 hex>_<8 hex>)")
    return parse_wal_name(match.group(1)), int(match.group(2), 16)


# --- The long page header at the start of every segment -----------------------------------

# XLogLongPageHeaderData (access/xlog_internal.h): the standard header
#   uint16 xlp_magic, uint16 xlp_info, uint32 xlp_tli, uint64 xlp_pageaddr, uint32 xlp_rem_len
# padded to 24 bytes, then uint64 xlp_sysid, uint32 xlp_seg_size, uint32 xlp_xlog_blcksz.
# Written in the server's byte order; every platform PostgreSQL supports today is little-endian
# in practice, and we refuse to guess otherwise.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
LONG_HEADER_SIZE = _LONG_HEADER.size
_XLP_LONG_HEADER = 0x0002


@dataclass(frozen=True)
class SegmentHeader:
    """What the first page of a segment says about the cluster that wrote it."""

    magic: int
    timeline: int
    pageaddr: int
    system_identifier: int
    segment_size: int
    block_size: int


def parse_segment_header(head: bytes) -> SegmentHeader:
    """Parse a segment's long page header; ValueError if it is not one."""
    if len(head) < LONG_HEADER_SIZE:
        raise ValueError("too short for a WAL segment header")
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG_HEADER.unpack_from(head)
    if not info & _XLP_LONG_HEADER:
        raise ValueError("first page has no long header")
    # XLOG_PAGE_MAGIC: 0xD097 in PostgreSQL 10, 0xD098 in 11, 0xD1xx since 12.
    if not 0xD097 <= magic <= 0xD1FF:
        raise ValueError(f"unknown WAL page magic {magic:#06x}")
    check_segment_size(seg_size)
    if blcksz not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise ValueError(f"implausible WAL block size {blcksz}")
    return SegmentHeader(magic, tli, pageaddr, sysid, seg_size, blcksz)


# --- Timeline history and backup history files --------------------------------------------


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a timeline history file: `parent` ended at `switch_lsn`."""

    parent: int
    switch_lsn: int
    reason: str


def parse_timeline_history(text: str) -> list[TimelineSwitch]:
    """Parse TTTTTTTT.history: lines of 'parent_tli<TAB>switch_lsn<TAB>reason', '#' comments."""
    switches = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2:
            raise ValueError(f"malformed timeline history line: {raw!r}")
        reason = fields[2] if len(fields) > 2 else ""
        switches.append(TimelineSwitch(int(fields[0]), parse_lsn(fields[1]), reason))
    return switches


@dataclass(frozen=True)
class BackupHistory:
    """The contents of a .backup history file that pg_backup_stop() archives."""

    start_lsn: int
    stop_lsn: int
    checkpoint_lsn: int | None
    start_time: datetime | None
    stop_time: datetime | None
    start_timeline: int
    stop_timeline: int
    label: str




def _parse_pg_time(text: str) -> datetime | None:
    # PostgreSQL writes e.g. '2026-11-21 06:01:02 UTC' (log_timezone); keep the offset when
    # it is numeric, otherwise return a naive time in the zone the server named.
    text = text.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            pass
    parts = text.rsplit(" ", 1)
    if len(parts) == 2:
        try:
            return datetime.strptime(parts[0], "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None
    return None


def parse_backup_history(text: str) -> BackupHistory:
    """Parse the 'KEY: value' lines of a .backup file; ValueError if essentials are missing."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().upper()] = value.strip()
    try:
        start = parse_lsn(fields["START WAL LOCATION"].split()[0])
        stop = parse_lsn(fields["STOP WAL LOCATION"].split()[0])
    except (KeyError, IndexError) as exc:
        raise ValueError(f"backup history file lacks {exc}") from None
    checkpoint = fields.get("CHECKPOINT LOCATION")
    start_tli = int(fields.get("START TIMELINE", "1"))
    return BackupHistory(
        start_lsn=start,
        stop_lsn=stop,
        checkpoint_lsn=parse_lsn(checkpoint) if checkpoint else None,
        start_time=_parse_pg_time(fields.get("START TIME", "")),
        stop_time=_parse_pg_time(fields.get("STOP TIME", "")),
        start_timeline=start_tli,
        stop_timeline=int(fields.get("STOP TIMELINE", str(start_tli))),
        label=fields.get("LABEL", ""),
    )
