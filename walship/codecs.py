"""Streaming lz4 / zstd / gzip / none behind one small protocol.

Every codec writes one standard frame with its own content checksum, so an unencrypted
object is exactly what `lz4 -d`, `zstd -d` or `gzip -d` reads by hand, and a reader can tell
the codec from the first bytes (sniff) without a suffix in the key.

Decompressors are strict where the command-line tools are lenient: one frame only, the
frame must be complete, its checksum must match, and nothing may follow it. Any failure is
an IntegrityError.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import lz4.frame
import zstandard

from walship.errors import IntegrityError

CODECS = ("lz4", "zstd", "gzip", "none")
CODEC_IDS = {"none": 0, "lz4": 1, "zstd": 2, "gzip": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

LZ4_MAGIC = b"\x04\x22\x4d\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# gzip's two magic bytes plus CM=8 (deflate), the only method gzip defines.
GZIP_MAGIC = b"\x1f\x8b\x08"

# Levels measured on pgbench WAL (benchmarks/pipeline.py; see the report in docs/format.md):
# lz4's default fast mode is the point of lz4. zstd 3 is zstd's own default; gzip 6 is
# gzip's default.
ZSTD_LEVEL = 3
GZIP_LEVEL = 6

# Output is produced in bounded steps: lz4 and zlib take a max_length; zstandard's
# decompressobj does not, so it is fed whole blocks, each of which decodes to at most this.
ZSTD_BLOCK_MAX = 128 * 1024


class Compressor(Protocol):
    """Push bytes in, get compressed bytes out; flush() ends the frame."""

    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Decompressor(Protocol):
    """Push compressed bytes in, get plaintext out; finish() checks the frame was whole."""

    def decompress(self, data: bytes) -> bytes: ...

    def finish(self) -> None: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""

    def decompress(self, data: bytes) -> bytes:
        return data

    def finish(self) -> None:
        return None


class _Lz4Compressor:
    def __init__(self, checksum: bool = True) -> None:
        # Content checksum on: it is the only integrity check an unencrypted lz4 object has.
        # Inside an encrypted object every chunk is authenticated, and XXH32 costs more than
        # lz4 itself on pgbench data (0.29 against 0.13 s per 512 MiB), so it is left out
        # there (docs/format.md). Block size 64 KiB and linked blocks are lz4's defaults
        # and what `lz4` writes.
        self._c = lz4.frame.LZ4FrameCompressor(content_checksum=checksum)
        self._begun = False

    def compress(self, data: bytes) -> bytes:
        if not self._begun:
            self._begun = True
            return bytes(self._c.begin()) + bytes(self._c.compress(data))
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        head = b"" if self._begun else bytes(self._c.begin())
        self._begun = True
        return head + bytes(self._c.flush())


class _ZstdCompressor:
    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        return bytes(self._c.flush())


class _GzipCompressor:
    def __init__(self, level: int = GZIP_LEVEL) -> None:
        # wbits 31: a gzip wrapper (header + CRC-32 + ISIZE) around raw deflate.
        self._c = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _BoundedDecompressor:
    """Common strictness: trailing bytes, truncation, library errors -> IntegrityError."""

    codec = ""

    def __init__(self) -> None:
        self.eof = False

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        """Decompress `data`; with max_length >= 0, at most that much (call again with b'')."""
        try:
            out = self._step(data, max_length)
        except IntegrityError:
            raise
        except Exception as exc:  # each library raises its own type for bad data
            raise IntegrityError(f"{self.codec} frame is corrupt: {exc}") from None
        return out

    def _trailing(self) -> IntegrityError:
        return IntegrityError(f"unexpected bytes after the end of the {self.codec} frame")

    @property
    def needs_input(self) -> bool:
        """False while output is pending from input already given (see max_length)."""
        raise NotImplementedError

    def _step(self, data: bytes, max_length: int) -> bytes:
        raise NotImplementedError

    def finish(self) -> None:
        """Raise IntegrityError unless exactly one whole frame was given."""
        if not self.eof:
            raise IntegrityError(f"{self.codec} frame is truncated")


class _Lz4Decompressor(_BoundedDecompressor):
    codec = "lz4"

    def __init__(self) -> None:
        super().__init__()
        self._d = lz4.frame.LZ4FrameDecompressor()

    @property
    def needs_input(self) -> bool:
        return bool(self._d.needs_input)

    def _step(self, data: bytes, max_length: int) -> bytes:
        if self.eof:
            if data:
                raise self._trailing()
            return b""
        out: bytes = self._d.decompress(data, max_length)
        if self._d.eof:
            self.eof = True
            if self._d.unused_data:
                raise self._trailing()
        return out


class _ZstdBlockWalker:
    """Follows a zstd frame's block structure (RFC 8878) to cut input at block boundaries.

    zstandard's decompressobj has no max_length, and one zstd block expands to at most
    128 KiB, however small it is (a 4-byte RLE block does): feeding at most N blocks per call
    bounds the output of that call to N x 128 KiB. Decoding and every check stay zstd's; on
    anything unexpected the walker gives up splitting and zstd reports the error.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # frame header bytes while still incomplete
        self._need = -1  # bytes left in the current field; -1 while parsing the header
        self._in_block_header = False
        self._last = False
        self._checksum = 0
        self.lost = False  # gave up: feed everything

    def _header_size(self) -> int:
        """The frame header's size; 0 while unknown; -1 (and lost) if it is not zstd."""
        h = self._head
        if len(h) < 5:
            return 0
        if bytes(h[:4]) != ZSTD_MAGIC:
            self.lost = True
            return -1
        fhd = h[4]
        single = (fhd >> 5) & 1
        fcs = (0 if not single else 1, 2, 4, 8)[fhd >> 6]
        did = (0, 1, 2, 4)[fhd & 3]
        self._checksum = 4 if fhd & 4 else 0
        return 5 + (0 if single else 1) + did + fcs

    def span(self, buf: memoryview, max_blocks: int) -> int:
        """How many bytes of buf to feed so that at most max_blocks blocks end in them."""
        pos, ends, n = 0, 0, len(buf)
        while pos < n and not self.lost:
            if self._need < 0:  # frame header
                size = self._header_size()
                if size < 0:
                    break
                if size == 0:
                    self._head.append(buf[pos])
                    pos += 1
                    continue
                take = min(size - len(self._head), n - pos)
                self._head += buf[pos : pos + take]
                pos += take
                if len(self._head) == size:
                    self._need, self._in_block_header = 3, True
                    self._head.clear()
                continue
            if self._need == 0 and not self._in_block_header:
                if self._last:  # frame (and checksum) done: the rest is trailing bytes
                    self.lost = True
                    break
                self._need, self._in_block_header = 3, True
            if self._in_block_header:
                take = min(self._need, n - pos)
                self._head += buf[pos : pos + take]
                pos += take
                self._need -= take
                if self._need:
                    continue
                word = int.from_bytes(self._head[:3], "little")
                self._head.clear()
                self._last, kind, size = bool(word & 1), (word >> 1) & 3, word >> 3
                if kind == 3:
                    self.lost = True
                    break
                self._need = 1 if kind == 1 else size
                self._in_block_header = False
                if self._last:
                    self._need += self._checksum
                continue
            take = min(self._need, n - pos)
            pos += take
            self._need -= take
            if self._need == 0:
                ends += 1
                if ends >= max_blocks:
                    break
        return n if self.lost else pos


class _ZstdDecompressor(_BoundedDecompressor):
    codec = "zstd"

    def __init__(self) -> None:
        super().__init__()
        self._d = zstandard.ZstdDecompressor().decompressobj()
        # Input given but not yet fed: a view, so stepping through it copies nothing.
        self._pending = memoryview(b"")
        self._walker = _ZstdBlockWalker()

    @property
    def needs_input(self) -> bool:
        return not self._pending

    def _step(self, data: bytes, max_length: int) -> bytes:
        if self.eof:
            if data or self._pending:
                raise self._trailing()
            return b""
        if self._pending:
            if data:
                self._pending = memoryview(bytes(self._pending) + bytes(data))
        else:
            self._pending = memoryview(data)
        if max_length < 0:
            step = len(self._pending)
        else:
            step = self._walker.span(self._pending, max(1, max_length // ZSTD_BLOCK_MAX))
        chunk, self._pending = self._pending[:step], self._pending[step:]
        out: bytes = self._d.decompress(chunk)
        if self._d.eof:
            self.eof = True
            if self._d.unused_data or self._pending:
                raise self._trailing()
        return out


class _GzipDecompressor(_BoundedDecompressor):
    codec = "gzip"

    def __init__(self) -> None:
        super().__init__()
        self._d = zlib.decompressobj(31)

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    def _step(self, data: bytes, max_length: int) -> bytes:
        if self.eof:
            if data:
                raise self._trailing()
            return b""
        tail = self._d.unconsumed_tail
        buf = tail + bytes(data) if tail else data
        out = self._d.decompress(buf, max_length) if max_length > 0 else self._d.decompress(buf)
        if self._d.eof:
            self.eof = True
            if self._d.unused_data or self._d.unconsumed_tail:
                raise self._trailing()
        return out


class _IdentityDecompressor(_BoundedDecompressor):
    codec = "none"

    def __init__(self) -> None:
        super().__init__()
        # The identity "frame" ends when the input does.
        self.eof = True

    @property
    def needs_input(self) -> bool:
        return True

    def _step(self, data: bytes, max_length: int) -> bytes:
        return data


def _check(name: str) -> None:
    if name not in CODEC_IDS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


def new_compressor(name: str, *, checksum: bool = True) -> Compressor:
    """A streaming compressor writing one standard frame of codec `name` (see CODECS).

    checksum=False leaves lz4's content checksum out (for frames inside encrypted objects,
    which are authenticated chunk by chunk); the other codecs keep theirs.
    """
    _check(name)
    if name == "lz4":
        return _Lz4Compressor(checksum)
    if name == "zstd":
        return _ZstdCompressor()
    if name == "gzip":
        return _GzipCompressor()
    return _Identity()


def new_decompressor(name: str) -> Decompressor:
    """A strict streaming decompressor for one frame of codec `name`.

    decompress() accepts an optional `max_length` (>= 0 bounds the output of one call; call
    again with b"" while `needs_input` is False). finish() raises IntegrityError if the frame
    is incomplete. Library errors, checksum failures and trailing bytes are IntegrityError.
    """
    return new_bounded_decompressor(name)


def new_bounded_decompressor(name: str) -> _BoundedDecompressor:
    """new_decompressor with its concrete type, for the pipeline's bounded-output loop."""
    _check(name)
    if name == "lz4":
        return _Lz4Decompressor()
    if name == "zstd":
        return _ZstdDecompressor()
    if name == "gzip":
        return _GzipDecompressor()
    return _IdentityDecompressor()


def sniff(head: bytes) -> str:
    """The codec of an unencrypted object from its first bytes; "none" if no magic matches."""
    head = bytes(head[:4])
    if head == LZ4_MAGIC:
        return "lz4"
    if head == ZSTD_MAGIC:
        return "zstd"
    if head[:3] == GZIP_MAGIC:
        return "gzip"
    return "none"
