"""The first and last transaction commit times in one WAL segment, from its bytes. Pure, stdlib.

wal-push records them in each segment's metadata (docs/layout.md) so that `walship verify`
can tell the recoverability window without downloading WAL. The layout is PostgreSQL's
(access/xlog_internal.h, access/xlogrecord.h, access/xact.h), little-endian:

- pages of XLOG_BLCKSZ bytes (from the long page header at the segment's start), each with a
  header: xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr u64, xlp_rem_len u32, padded
  to 24 bytes; the first page's long header adds xlp_sysid u64, xlp_seg_size u32,
  xlp_xlog_blcksz u32 (40 bytes). XLP_FIRST_IS_CONTRECORD says the page starts with the
  xlp_rem_len remaining bytes of a record begun on an earlier page;
- records start MAXALIGNed (8) and may straddle pages (the next page's header is skipped);
  XLogRecord: xl_tot_len u32, xl_xid u32, xl_prev u64, xl_info u8, xl_rmid u8, 2 pad,
  xl_crc u32 (24 bytes), then block headers, then the main data at the record's end;
- a commit is rmid RM_XACT_ID (1) with (xl_info & 0x70) COMMIT (0x00) or COMMIT_PREPARED
  (0x30); its main data starts with xact_time, int64 microseconds since 2000-01-01 UTC.

Cost: wal-push runs this on every segment, so it does not decode a busy segment record by
record (one Python step per record is about 1 us; a busy 16 MiB segment holds ~150,000). It
walks forward from the segment's start to the first commit, and for the last commit walks
back page by page: each page header says where the first record starting on it is, so a
walk from there to what was already scanned finds the page's commits. A segment without any
commit costs one full forward walk and no backward one.

Trust: page headers are checked (magic, page address), continuation pages must carry the
flag and the exact remaining length, and within a walk each record's xl_prev must point at
the record before, so zeros after a switch end the walk and a recycled segment's old bytes
are never read as records. CRCs are not computed (no CRC-32C in the standard library); the
answer is a report, not a replay. Anything unexpected ends the walk or skips the record; no
input makes these functions raise.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

_SHORT_HEADER = struct.Struct("<HHIQI")  # padded to 24 bytes on disk
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
SHORT_HEADER_SIZE = 24
LONG_HEADER_SIZE = 40
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002

_RECORD_HEADER = struct.Struct("<IIQBB2xI")
RECORD_HEADER_SIZE = 24
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")

RM_XACT_ID = 1
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_COMMIT = 0x00
XLOG_XACT_COMMIT_PREPARED = 0x30
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252
# XLogRecordMaxSize (PostgreSQL 16; 15 has no explicit limit, but allocations cap at 1 GB).
_MAX_RECORD = 1020 * 1024 * 1024
# A commit record's ids and main-data length come first: at most 24 + 3 (origin) + 5
# (toplevel xid) + 5 (long data header) bytes, then the 8 bytes of xact_time.
_COMMIT_PREFIX = RECORD_HEADER_SIZE + 3 + 5 + 5 + 8
_BLOCK_SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
# The newest xact_time we accept as a time at all: year 9999 (datetime's limit).
_MAX_XACT_TIME = (datetime(9999, 12, 31, tzinfo=timezone.utc) - PG_EPOCH) // timedelta(
    microseconds=1)

Buffer = bytes | bytearray | memoryview | mmap.mmap


@dataclass(frozen=True)
class CommitTimes:
    """xact_time of the first and the last commit record that begin in a segment,
    as microseconds since 2000-01-01 UTC (PostgreSQL's TimestampTz)."""

    first: int
    last: int

    @property
    def first_time(self) -> datetime:
        """The first commit's time, UTC."""
        return pg_time(self.first)

    @property
    def last_time(self) -> datetime:
        """The last commit's time, UTC."""
        return pg_time(self.last)


def pg_time(micros: int) -> datetime:
    """A TimestampTz (microseconds since 2000-01-01 UTC) as an aware UTC datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


def format_time(moment: datetime) -> str:
    """ISO 8601 UTC with microseconds: '2026-11-21T06:00:00.123456Z' (object metadata)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """format_time's inverse; ValueError for anything else."""
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC time: {text!r}")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def _maxalign(n: int) -> int:
    return (n + 7) & ~7


class _Segment:
    """One segment's bytes and the geometry its first page header gives."""

    def __init__(self, buf: Buffer, size: int, magic: int, blcksz: int, start: int) -> None:
        self.buf = buf
        self.size = size
        self.magic = magic
        self.blcksz = blcksz
        self.start = start  # the LSN of the segment's first byte

    @classmethod
    def open(cls, buf: Buffer) -> _Segment | None:
        size = len(buf)
        if size < LONG_HEADER_SIZE:
            return None
        magic, info, _tli, pageaddr, _rem, _sysid, seg_size, blcksz = \
            _LONG_HEADER.unpack_from(buf, 0)
        if not info & XLP_LONG_HEADER or not 0xD097 <= magic <= 0xD1FF:
            return None
        if blcksz not in _BLOCK_SIZES or seg_size < blcksz or seg_size & (seg_size - 1) \
                or pageaddr % seg_size:
            return None
        # A .partial file is a whole segment too; anything longer is not one segment.
        return cls(buf, min(size, seg_size), magic, blcksz, pageaddr)

    def page(self, offset: int) -> tuple[int, int, int] | None:
        """(xlp_info, xlp_rem_len, header size) of the page at `offset`, if it is genuine."""
        header = LONG_HEADER_SIZE if offset == 0 else SHORT_HEADER_SIZE
        if offset % self.blcksz or offset + header > self.size:
            return None
        magic, info, _tli, pageaddr, rem_len = _SHORT_HEADER.unpack_from(self.buf, offset)
        if magic != self.magic or pageaddr != self.start + offset:
            return None
        if bool(info & XLP_LONG_HEADER) != (offset == 0):
            return None
        return info, rem_len, header

    def first_record_on_page(self, index: int) -> int | None:
        """Offset of the first record that begins on page `index`, or None."""
        offset = index * self.blcksz
        page = self.page(offset)
        if page is None:
            return None
        info, rem_len, header = page
        begin = offset + header
        if info & XLP_FIRST_IS_CONTRECORD:
            skip = _maxalign(rem_len)
            if skip >= self.blcksz - header:
                return None  # the continuation fills the page: no record begins here
            begin += skip
        if begin + RECORD_HEADER_SIZE > self.size:
            return None
        return begin

    def live(self, index: int) -> bool:
        """Whether page `index` holds WAL: a genuine header and not the zeros after the end."""
        begin = self.first_record_on_page(index)
        if begin is None:
            return self.page(index * self.blcksz) is not None
        tot_len: int = _U32.unpack_from(self.buf, begin)[0]
        return tot_len != 0

    def last_live_page(self) -> int:
        """The last page holding WAL, -1 if none. A binary search: in a segment, the pages
        holding WAL come first, then zeros (after a switch) or stale bytes (the tail of a
        .partial file), never WAL again."""
        low, high = 0, self.size // self.blcksz - 1
        if high < 0 or not self.live(0):
            return -1
        while low < high:
            mid = (low + high + 1) // 2
            if self.live(mid):
                low = mid
            else:
                high = mid - 1
        return low

    def read(self, offset: int, length: int) -> bytes | None:
        """The first `length` bytes of the record at `offset`, across page headers."""
        parts = []
        remaining = length
        pos = offset
        while remaining:
            room = self.blcksz - pos % self.blcksz
            take = min(room, remaining)
            if pos + take > self.size:
                return None
            parts.append(bytes(self.buf[pos:pos + take]))
            remaining -= take
            pos += take
            if remaining:
                page = self.page(pos)
                if page is None or not page[0] & XLP_FIRST_IS_CONTRECORD:
                    return None
                pos += page[2]
        return b"".join(parts)

    def record_end(self, offset: int, tot_len: int) -> int | None:
        """Offset just past the record at `offset`; None if it leaves the segment or a
        continuation page does not carry it on."""
        remaining = tot_len
        pos = offset
        while True:
            room = self.blcksz - pos % self.blcksz
            if remaining <= room:
                end = pos + remaining
                return end if end <= self.size else None
            remaining -= room
            pos += room
            page = self.page(pos)
            if page is None:
                return None
            info, rem_len, header = page
            if not info & XLP_FIRST_IS_CONTRECORD or rem_len != remaining:
                return None
            pos += header

    def commit_time(self, offset: int, tot_len: int) -> int | None:
        """xact_time of the commit record at `offset`, or None if its layout is unexpected."""
        data = self.read(offset, min(tot_len, _COMMIT_PREFIX))
        if data is None:
            return None
        pos = RECORD_HEADER_SIZE
        while pos < len(data):
            block_id = data[pos]
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                if pos + 2 > len(data):
                    return None
                main_len = data[pos + 1]
                pos += 2
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                if pos + 5 > len(data):
                    return None
                main_len = _U32.unpack_from(data, pos + 1)[0]
                pos += 5
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                pos += 3
            elif block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                pos += 5
            else:
                return None  # block references: not a commit record as PostgreSQL writes one
        else:
            return None
        # No block data: the main data follows the headers and ends the record.
        if main_len < 8 or pos + main_len != tot_len or pos + 8 > len(data):
            return None
        xact_time: int = _I64.unpack_from(data, pos)[0]
        if not 0 <= xact_time <= _MAX_XACT_TIME:
            return None
        return xact_time

    def walk(self, offset: int, limit: int, *, stop_at_first: bool) -> tuple[int | None, int]:
        """Follow the records beginning at `offset`, up to the first one at or past `limit`.

        Returns (the first commit time seen if stop_at_first, else the last one; the offset
        where the walk ended). Ends at the zeros after the last record, at a record that
        leaves the segment, and at anything that does not chain (page header, xl_prev).
        """
        blcksz = self.blcksz
        buf = self.buf
        found: int | None = None
        prev_lsn: int | None = None
        pos = offset
        while pos < limit:
            in_page = pos % blcksz
            if in_page == 0:
                page = self.page(pos)
                if page is None or page[0] & XLP_FIRST_IS_CONTRECORD:
                    break
                pos += page[2]
            if pos + RECORD_HEADER_SIZE <= self.size and \
                    blcksz - pos % blcksz >= RECORD_HEADER_SIZE:
                tot_len, _xid, xl_prev, info, rmid, _crc = _RECORD_HEADER.unpack_from(buf, pos)
            else:
                head = self.read(pos, RECORD_HEADER_SIZE)
                if head is None:
                    break
                tot_len, _xid, xl_prev, info, rmid, _crc = _RECORD_HEADER.unpack(head)
            if tot_len < RECORD_HEADER_SIZE or tot_len > _MAX_RECORD:
                break  # zeros: the end of the WAL in this segment (or garbage)
            if prev_lsn is not None and xl_prev != prev_lsn:
                break
            end = self.record_end(pos, tot_len)
            if end is None:
                break  # continues into the next segment, or the chain is broken
            if rmid == RM_XACT_ID and info & XLOG_XACT_OPMASK in (XLOG_XACT_COMMIT,
                                                                  XLOG_XACT_COMMIT_PREPARED):
                when = self.commit_time(pos, tot_len)
                if when is not None:
                    found = when
                    if stop_at_first:
                        return found, pos
            prev_lsn = self.start + pos
            pos = _maxalign(end)
        return found, pos

    def first_commit(self) -> int | None:
        """The first commit's time: walk forward from the first record of the segment."""
        for index in range(self.size // self.blcksz):
            begin = self.first_record_on_page(index)
            if begin is not None:
                return self.walk(begin, self.size, stop_at_first=True)[0]
            if self.page(index * self.blcksz) is None:
                break
        return None

    def last_commit(self) -> int | None:
        """The last commit's time: walk back page by page from the last page holding WAL."""
        scanned_from = self.size  # records beginning at or after this were already walked
        for index in range(self.last_live_page(), -1, -1):
            begin = self.first_record_on_page(index)
            if begin is None or begin >= scanned_from:
                continue
            found, _ = self.walk(begin, scanned_from, stop_at_first=False)
            if found is not None:
                return found
            scanned_from = begin
        return None


def commit_times(buf: Buffer) -> CommitTimes | None:
    """The first and last commit times of the records that begin in this segment.

    `buf` is the whole segment (or .partial file), e.g. an mmap of it. None when it holds no
    commit, or is not a WAL segment at all. Never raises for any input.
    """
    try:
        segment = _Segment.open(buf)
        if segment is None:
            return None
        first = segment.first_commit()
        if first is None:
            return None  # the forward walk saw every record: there is no commit
        last = segment.last_commit()
        # The backward walk finds at least the first commit again; if it could not (a
        # damaged page between), the first commit is the last one known. First and last
        # are by position: backends take xact_time before inserting, so the times of
        # neighbouring commits may be out of order by a few microseconds.
        return CommitTimes(first, last if last is not None else first)
    except (struct.error, IndexError, ValueError, OverflowError, TypeError):
        # Defence in depth: the bounds checks above should make these impossible, and
        # wal-push must never fail because of this report.
        return None
