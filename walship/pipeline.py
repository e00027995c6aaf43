"""source -> compress -> encrypt -> stored bytes, and back, with digests on the way.

Both directions are pull streams (io.BufferedIOBase): the consumer's read(n) drives the
work, so a storage backend's upload (boto3, shutil.copyfileobj) reads an encoding stream
exactly as it reads a file, and peak memory is bounded whatever the object's size:

- encode holds one source block (BLOCK_SIZE), its compressed form, and less than one
  encryption chunk, plus what the consumer asked for in one read;
- decode holds one source block, the plaintext of one decompression step (at most
  MAX_OUTPUT_STEP, whole zstd blocks for zstd), plus one read: about 40 MiB peak RSS
  decoding 1 GiB of zeros with any codec, whatever the compression ratio.

read(n) returns exactly n bytes until the end (BufferedIOBase semantics): S3 multipart
uploads take a short read for the last part.

A decode stream that hits a problem raises IntegrityError or KeyMismatch at that point and
keeps raising on every later read, so a caller that swallows one error still never sees a
clean EOF on a damaged object.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from walship import codecs
from walship import format as fmt
from walship.crypto import Keyring, StreamDecryptor, StreamEncryptor, new_header, open_header
from walship.errors import IntegrityError, KeyMismatch

KiB = 1024
MiB = 1024 * KiB

# 1 MiB source reads: large enough that per-call Python overhead is noise next to the codec
# (a 16 MiB segment is 16 reads), small enough to keep memory flat.
BLOCK_SIZE = 1 * MiB
MAX_OUTPUT_STEP = 4 * MiB
# SHA-256 (about 1.8 GB/s with SHA-NI) costs half as much as lz4 with its checksum (about
# 1.0 GB/s) on pgbench WAL, so hashed inline the pipeline keeps only ~60% of bare lz4's
# throughput. Both release the GIL, so the digest runs on a helper thread, overlapping the
# codec: ~100% (benchmarks/pipeline.py). Small pieces are hashed inline: a thread hand-off
# costs more than hashing them.
THREADED_HASH_MIN = 256 * KiB


class _Hasher:
    """SHA-256 whose large updates run on one helper thread, in order, overlapping the caller.

    At most one update is in flight, so it holds one extra block of memory at most.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def update(self, data: bytes) -> None:
        self._wait()
        if len(data) < THREADED_HASH_MIN:
            self._sha.update(data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="walship-sha256")
        self._pending = self._pool.submit(self._sha.update, data)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._sha.hexdigest()

    def close(self) -> None:
        """Wait for the update in flight and stop the helper thread."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class _OutputQueue:
    """A FIFO of byte pieces that hands out exactly-sized reads with at most one copy."""

    def __init__(self) -> None:
        self._q: deque[bytes] = deque()
        self._off = 0
        self.avail = 0

    def push(self, piece: bytes) -> None:
        if piece:
            self._q.append(piece)
            self.avail += len(piece)

    def take(self, n: int) -> bytes:
        q = self._q
        if not q:
            return b""
        first = q[0]
        if self._off == 0 and len(first) == n:
            # The common case for large reads of whole pieces: no copy at all.
            q.popleft()
            self.avail -= n
            return first
        parts: list[bytes | memoryview] = []
        need = min(n, self.avail)
        self.avail -= need
        while need:
            first = q[0]
            left = len(first) - self._off
            if left <= need:
                parts.append(memoryview(first)[self._off :] if self._off else first)
                q.popleft()
                self._off = 0
                need -= left
            else:
                parts.append(memoryview(first)[self._off : self._off + need])
                self._off += need
                need = 0
        return b"".join(parts)

    def take_all(self) -> bytes:
        return self.take(self.avail)


class _PullStream(io.BufferedIOBase):
    """read(n) produces until n bytes are queued or the work is done."""

    def __init__(self) -> None:
        super().__init__()
        self._out = _OutputQueue()
        self._finished = False
        self._error: BaseException | None = None
        self._sha = _Hasher()

    def readable(self) -> bool:
        return True

    def _produce(self) -> None:
        raise NotImplementedError

    def _fill(self, n: int) -> None:
        if self._error is not None:
            raise self._error
        try:
            while not self._finished and (n < 0 or self._out.avail < n):
                self._produce()
            if self._finished:
                # Stop the helper thread now rather than at close(), which may come late.
                self._sha.close()
        except BaseException as exc:
            # Sticky: a later read must not return b"" as if the object had ended cleanly.
            self._error = exc
            raise

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes, exactly `size` unless at the end; all the rest if size < 0."""
        if self.closed:
            raise ValueError("read from a closed stream")
        if size is None or size < 0:
            self._fill(-1)
            return self._out.take_all()
        if size == 0:
            return b""
        self._fill(size)
        return self._out.take(size)

    def read1(self, size: int = -1) -> bytes:
        """Same as read(): there is no underlying raw stream to make "one call" on."""
        return self.read(size)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        """Read into a writable buffer; returns the number of bytes read."""
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Close the stream (not the source: the caller owns it) and stop helper threads."""
        try:
            self._sha.close()
        finally:
            super().close()

    def _done(self, name: str) -> None:
        if not self._finished:
            raise RuntimeError(f"{name} is known only after the stream was read to the end")


class EncodeStream(_PullStream):
    """Plaintext from `source` -> stored bytes (compressed, then encrypted if configured)."""

    def __init__(self, source: BinaryIO, compression: str, keyring: Keyring | None, *,
                 random: Callable[[int], bytes] | None = None,
                 block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        if compression not in codecs.CODEC_IDS:
            raise ValueError(f"unknown compression {compression!r}")
        self._source = source
        self._compression = compression
        self._keyring = keyring
        self._random = random or os.urandom
        self._block = block_size
        self._plain = 0
        self._stored = 0
        self._started = False
        self._compressor: codecs.Compressor = codecs.new_compressor(compression)
        self._encryptor: StreamEncryptor | None = None

    @property
    def compression(self) -> str:
        """The codec actually used (see _start for when "none" becomes "lz4")."""
        return self._compression

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self._encryptor is None:
            self._stored += len(data)
            self._out.push(data)
            return
        for chunk in self._encryptor.update(data):
            self._stored += len(chunk)
            self._out.push(chunk)

    def _read_source(self) -> bytes:
        data = self._source.read(self._block)
        if data is None:  # pragma: no cover - a non-blocking source with nothing ready
            raise OSError("source stream returned None (non-blocking streams are not supported)")
        return bytes(data) if not isinstance(data, bytes) else data

    def _start(self) -> bytes:
        self._started = True
        first = self._read_source()
        while 0 < len(first) < len(fmt.MAGIC):
            more = self._read_source()
            if not more:
                break
            first += more
        keyring = self._keyring
        encrypting = keyring is not None and keyring.encrypts
        if self._compression == "none" and not encrypting and (
            fmt.is_encrypted(first) or codecs.sniff(first) != "none"
        ):
            # An unencrypted "none" object is recognised by having no known magic. Plaintext
            # that starts with one would be misread, so it is stored as an lz4 frame instead:
            # still self-describing, still one key (never happens with WAL, whose pages start
            # with xlp_magic).
            self._compression = "lz4"
            self._compressor = codecs.new_compressor("lz4")
        if encrypting:
            assert keyring is not None and keyring.encrypt_to is not None
            header, payload_key = new_header(keyring.encrypt_to,
                                             codecs.CODEC_IDS[self._compression], self._random)
            self._encryptor = StreamEncryptor(payload_key, header)
            self._stored += len(header)
            self._out.push(header)
        return first

    def _produce(self) -> None:
        data = self._start() if not self._started else self._read_source()
        if data:
            self._sha.update(data)
            self._plain += len(data)
            self._emit(self._compressor.compress(data))
            return
        self._emit(self._compressor.flush())
        if self._encryptor is not None:
            last = self._encryptor.finish()
            self._stored += len(last)
            self._out.push(last)
        self._finished = True

    @property
    def plaintext_sha256(self) -> str:
        """Hex SHA-256 of everything read from the source (after EOF)."""
        self._done("plaintext_sha256")
        return self._sha.hexdigest()

    @property
    def plaintext_size(self) -> int:
        """Bytes read from the source (after EOF)."""
        self._done("plaintext_size")
        return self._plain

    @property
    def stored_size(self) -> int:
        """Bytes of the stored object (after EOF)."""
        self._done("stored_size")
        return self._stored


class DecodeStream(_PullStream):
    """Stored bytes from `source` -> plaintext, checking everything on the way."""

    def __init__(self, source: BinaryIO, keyring: Keyring | None, *,
                 block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        self._source = source
        self._keyring = keyring
        self._block = block_size
        self._plain = 0
        self._started = False
        self._source_eof = False
        self._decryptor: StreamDecryptor | None = None
        self._decompressor = codecs.new_bounded_decompressor("none")
        self._pending: deque[bytes] = deque()
        self._codec = "none"
        self._encrypted = False

    @property
    def codec(self) -> str:
        """The object's codec (known after the first read)."""
        return self._codec

    @property
    def encrypted(self) -> bool:
        """Whether the object is encrypted (known after the first read)."""
        return self._encrypted

    def _read_exact(self, n: int) -> bytes:
        """Up to n bytes, fewer only at the end of the source."""
        parts = []
        got = 0
        while got < n:
            data = self._source.read(n - got)
            if not data:
                self._source_eof = True
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _start(self) -> None:
        self._started = True
        head = self._read_exact(len(fmt.MAGIC))
        if fmt.is_encrypted(head):
            self._encrypted = True
            prefix = head + self._read_exact(fmt.PREFIX_SIZE - len(head))
            size = fmt.header_size(prefix)
            raw = prefix + self._read_exact(size - len(prefix))
            header = fmt.parse_header(raw)
            name = codecs.CODEC_NAMES.get(header.codec_id)
            if name is None:
                raise IntegrityError(f"encrypted object names unknown codec {header.codec_id}",
                                     hint="the object is damaged or from a newer walship")
            if self._keyring is None:
                raise KeyMismatch(
                    "object is encrypted but no decryption key is configured",
                    hint="set WALSHIP_KEY_FILE (symmetric) or WALSHIP_PRIVATE_KEY_FILE")
            self._decryptor = StreamDecryptor(open_header(header, raw, self._keyring), raw)
            self._codec = name
        else:
            ring = self._keyring
            if ring is not None and (ring.decrypt_with or ring.encrypts) and \
                    not ring.allow_plaintext:
                raise KeyMismatch(
                    "object is not encrypted, but encryption keys are configured;"
                    " refusing to trust it",
                    hint="anyone who can write to the store could have put it there;"
                    " if the archive predates encryption, read it with the keys unset",
                )
            self._codec = codecs.sniff(head)
            self._pending.append(head)
        self._decompressor = codecs.new_bounded_decompressor(self._codec)

    def _emit(self, data: bytes) -> None:
        if data:
            self._sha.update(data)
            self._plain += len(data)
            self._out.push(data)

    def _produce(self) -> None:
        if not self._started:
            self._start()
            return
        dec = self._decompressor
        if not dec.needs_input:
            self._emit(dec.decompress(b"", MAX_OUTPUT_STEP))
            return
        if self._pending:
            self._emit(dec.decompress(self._pending.popleft(), MAX_OUTPUT_STEP))
            return
        if not self._source_eof:
            data = self._source.read(self._block)
            if not data:
                self._source_eof = True
                if self._decryptor is not None:
                    self._pending.append(self._decryptor.finish())
                return
            if self._decryptor is not None:
                self._pending.extend(self._decryptor.update(data))
            else:
                self._pending.append(data)
            return
        dec.finish()
        self._finished = True

    @property
    def plaintext_sha256(self) -> str:
        """Hex SHA-256 of the plaintext (after a clean EOF)."""
        self._done("plaintext_sha256")
        return self._sha.hexdigest()

    @property
    def plaintext_size(self) -> int:
        """Bytes of plaintext (after a clean EOF)."""
        self._done("plaintext_size")
        return self._plain


def encode(source: BinaryIO, compression: str, keyring: Keyring | None, *,
           random: Callable[[int], bytes] | None = None) -> EncodeStream:
    """A readable stream of the stored form of `source`: compressed, encrypted if the keyring
    encrypts. `random` replaces os.urandom (tests and golden vectors only)."""
    return EncodeStream(source, compression, keyring, random=random)


def decode(source: BinaryIO, keyring: Keyring | None) -> DecodeStream:
    """A readable stream of the plaintext of a stored object read from `source`.

    The codec and encryption are discovered from the object's first bytes. Raises
    IntegrityError (damage, truncation, trailing bytes) or KeyMismatch (no matching key,
    or a plaintext object while keys are configured) from read(), where the problem is found.
    """
    return DecodeStream(source, keyring)


def encode_bytes(data: bytes, compression: str, keyring: Keyring | None, *,
                 random: Callable[[int], bytes] | None = None) -> bytes:
    """The stored form of `data` (for small objects: history files, sentinels, tests)."""
    with encode(io.BytesIO(data), compression, keyring, random=random) as stream:
        return stream.read()


def decode_bytes(blob: bytes, keyring: Keyring | None) -> bytes:
    """The plaintext of a stored object held in memory; raises rather than return a part."""
    with decode(io.BytesIO(blob), keyring) as stream:
        return stream.read()


def copy_stream(src: BinaryIO | io.BufferedIOBase, dst: BinaryIO, bufsize: int = 1 * MiB) -> int:
    """Copy src to EOF into dst in bufsize reads; returns the number of bytes copied."""
    total = 0
    while True:
        data = src.read(bufsize)
        if not data:
            return total
        dst.write(data)
        total += len(data)
