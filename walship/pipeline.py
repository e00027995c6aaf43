"""source -> compress -> encrypt -> stored bytes, and back, with digests on the way.

Both directions are pull streams (io.BufferedIOBase): the consumer's read(n) drives the
work, so a storage backend's upload (boto3, shutil.copyfileobj) reads an encoding stream
exactly as it reads a file, and peak memory is bounded whatever the object's size:

- encode holds two source blocks (BLOCK_SIZE: one being compressed, one read ahead), two
  compressed blocks and less than one encryption chunk, plus what the consumer asked for
  in one read;
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
import threading
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from queue import SimpleQueue
from typing import BinaryIO, Generic, Protocol, TypeVar, cast

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
# 1.1 GB/s) on pgbench WAL, so hashed inline the pipeline keeps only ~60% of bare lz4's
# throughput. Both release the GIL, so the digest runs on a helper thread, overlapping the
# codec (benchmarks/pipeline.py). Small pieces are hashed inline: a thread hand-off costs
# more than hashing them.
THREADED_HASH_MIN = 256 * KiB

T = TypeVar("T")


def _serve(jobs: SimpleQueue[Callable[[], object] | None],
           results: SimpleQueue[tuple[object, BaseException | None]]) -> None:
    """The helper thread: run jobs in order until the None sentinel; never raises."""
    while (job := jobs.get()) is not None:
        try:
            results.put((job(), None))
        except BaseException as exc:  # handed to the caller by _Helper.result()
            results.put((None, exc))
        del job


class _Helper(Generic[T]):
    """One helper thread, started on first use, that runs jobs in submission order.

    result() returns the results in the same order (re-raising a job's exception). The
    thread holds no reference to the stream that owns it: when that stream is closed,
    fails, or is garbage-collected unclosed, close() (or the finalizer) stops the thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: SimpleQueue[Callable[[], object] | None] = SimpleQueue()
        self._results: SimpleQueue[tuple[object, BaseException | None]] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[..., _Helper[T]] | None = None
        self.pending = 0

    @property
    def started(self) -> bool:
        return self._thread is not None

    def submit(self, job: Callable[[], T]) -> None:
        if self._thread is None:
            # Daemon, so an unclosed stream still referenced at exit cannot hang the
            # interpreter; the finalizer stops the thread when this object goes away.
            thread = threading.Thread(target=_serve, args=(self._jobs, self._results),
                                      name=self._name, daemon=True)
            thread.start()
            self._thread = thread
            self._finalizer = weakref.finalize(self, self._jobs.put, None)
        self._jobs.put(job)
        self.pending += 1

    def result(self) -> T:
        """The result of the oldest job not yet collected (waits for it)."""
        assert self.pending > 0
        value, exc = self._results.get()
        self.pending -= 1
        if exc is not None:
            raise exc
        return cast(T, value)

    def close(self) -> None:
        """Let the jobs already queued finish, then stop the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        assert self._finalizer is not None
        self._finalizer()  # queues the sentinel, once
        thread.join()
        self.pending = 0
        self._results = SimpleQueue()


class _HexDigest(Protocol):
    def hexdigest(self) -> str: ...


class _Hasher:
    """SHA-256 whose large updates run on a helper thread, in order, overlapping the caller.

    At most one update is in flight, so it holds one extra block of memory at most.
    """

    def __init__(self, helper: _Helper[None]) -> None:
        self._sha = hashlib.sha256()
        self._helper = helper

    def update(self, data: bytes) -> None:
        self._wait()
        if len(data) < THREADED_HASH_MIN:
            self._sha.update(data)
            return
        self._helper.submit(partial(self._sha.update, data))

    def _wait(self) -> None:
        while self._helper.pending:
            self._helper.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._sha.hexdigest()


def _read_block(source: BinaryIO, size: int) -> bytes:
    data = source.read(size)
    if data is None:  # pragma: no cover - a non-blocking source with nothing ready
        raise OSError("source stream returned None (non-blocking streams are not supported)")
    return bytes(data) if not isinstance(data, bytes) else data


def _encode_job(source: BinaryIO, size: int, sha: hashlib._Hash | None, unhashed: bytes | None,
                sealer: StreamEncryptor | None, held: bytes) -> tuple[bytes, list[bytes]]:
    """EncodeStream's helper-thread work for one block: seal the compressed bytes `held`,
    hash `unhashed` if given, then read and hash the next block. Returns (next block,
    sealed chunks). A module function, so the thread never holds a reference to the stream.
    """
    chunks = sealer.update(held) if sealer is not None and held else []
    if sha is not None and unhashed is not None:
        sha.update(unhashed)
    data = _read_block(source, size)
    if sha is not None:
        sha.update(data)
    return data, chunks


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

    def take_into(self, view: memoryview) -> int:
        """Move up to len(view) queued bytes into `view`, releasing each piece once copied."""
        q = self._q
        filled = 0
        want = len(view)
        while filled < want and q:
            first = q[0]
            n = min(len(first) - self._off, want - filled)
            view[filled:filled + n] = memoryview(first)[self._off:self._off + n]
            filled += n
            if self._off + n == len(first):
                q.popleft()
                self._off = 0
            else:
                self._off += n
        self.avail -= filled
        return filled


class _PullStream(io.BufferedIOBase):
    """read(n) produces until n bytes are queued or the work is done."""

    def __init__(self) -> None:
        super().__init__()
        self._out = _OutputQueue()
        self._finished = False
        self._error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def _produce(self) -> None:
        raise NotImplementedError

    def _stop_helper(self) -> None:
        raise NotImplementedError

    def _fill(self, n: int) -> None:
        """Produce until `n` bytes are queued (all of them if n < 0) or the work is done."""
        if self._error is not None:
            raise self._error
        try:
            while not self._finished and (n < 0 or self._out.avail < n):
                self._produce()
            if self._finished:
                # Stop the helper thread now rather than at close(), which may come late.
                self._stop_helper()
        except BaseException as exc:
            # Sticky: a later read must not return b"" as if the object had ended cleanly.
            self._error = exc
            self._stop_helper()
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
        """Fill `buffer` (short only at the end); returns the number of bytes read.

        Output is copied into `buffer` as it is produced, so a large read (an 8 MiB S3
        part) never has its bytes queued as pieces and then joined: read(n) holds up to
        2 x n at its peak, readinto about n plus one block.
        """
        if self.closed:
            raise ValueError("read from a closed stream")
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._out.avail:
                if self._finished:
                    break
                self._fill(1)
                continue
            filled += self._out.take_into(view[filled:])
        return filled

    def close(self) -> None:
        """Close the stream (not the source: the caller owns it) and stop helper threads."""
        try:
            self._stop_helper()
        finally:
            super().close()

    def _done(self, name: str) -> None:
        if not self._finished:
            raise RuntimeError(f"{name} is known only after the stream was read to the end")

    def _hexdigest(self, sha: _HexDigest | None) -> str:
        """plaintext_sha256 of either direction: after EOF, and only if one was kept."""
        self._done("plaintext_sha256")
        if sha is None:
            raise RuntimeError("this stream was made with digest=False")
        return sha.hexdigest()


class EncodeStream(_PullStream):
    """Plaintext from `source` -> stored bytes (compressed, then encrypted if configured).

    With blocks of THREADED_HASH_MIN or more, the work is split over two threads: this one
    compresses block k while the helper seals (encrypts) the compressed block k-1, then
    reads block k+1 from the source and hashes it. lz4, SHA-256 and file reads release the
    GIL, and sealing lz4 output is small next to compressing, so the two overlap: this
    thread does little but compress (benchmarks/pipeline.py). The source is still read by
    one thread at a time, in order. What is in flight is two source blocks, one compressed
    block and one block's sealed chunks. With "none" the sealing stays on this thread: it
    is then the only work this thread has.
    """

    def __init__(self, source: BinaryIO, compression: str, keyring: Keyring | None, *,
                 random: Callable[[int], bytes] | None = None,
                 block_size: int = BLOCK_SIZE, digest: bool = True) -> None:
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
        # Made by _start (which every path runs first), once the codec and whether to
        # encrypt are decided.
        self._compressor: codecs.Compressor
        self._encryptor: StreamEncryptor | None = None
        self._sha = hashlib.sha256() if digest else None
        self._helper: _Helper[tuple[bytes, list[bytes]]] = _Helper("walship-encode")
        # The next source block, read (and hashed) ahead by the helper thread.
        self._ahead = b""
        # Compressed bytes that the next helper job seals (when sealing on the helper).
        self._held = b""
        self._seal_on_helper = False

    @property
    def compression(self) -> str:
        """The codec actually used (see _start for when "none" becomes "lz4")."""
        return self._compression

    def _push(self, data: bytes) -> None:
        self._stored += len(data)
        self._out.push(data)

    def _emit(self, data: bytes) -> None:
        """Queue compressed bytes, sealing them here if encrypting."""
        if not data:
            return
        if self._encryptor is None:
            self._push(data)
            return
        for chunk in self._encryptor.update(data):
            self._push(chunk)

    def _read_source(self) -> bytes:
        return _read_block(self._source, self._block)

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
        # Inside an encrypted object the frame is authenticated by the AEAD, so it goes
        # without lz4's checksum (codecs._Lz4Compressor).
        self._compressor = codecs.new_compressor(self._compression, checksum=not encrypting)
        if encrypting:
            assert keyring is not None and keyring.encrypt_to is not None
            header, payload_key = new_header(keyring.encrypt_to,
                                             codecs.CODEC_IDS[self._compression], self._random)
            self._encryptor = StreamEncryptor(payload_key, header)
            self._push(header)
            self._seal_on_helper = self._compression != "none"
        return first

    def _produce(self) -> None:
        helper = self._helper
        if not self._started:
            data, hashed = self._start(), False
        elif helper.started:
            data, hashed, self._ahead = self._ahead, True, b""
        else:
            data, hashed = self._read_source(), False
        if not data:
            self._end()
            return
        self._plain += len(data)
        if not helper.started and len(data) < THREADED_HASH_MIN:
            # Small objects (and small first reads) never start a thread.
            if self._sha is not None:
                self._sha.update(data)
            self._emit(self._compressor.compress(data))
            return
        # From here on the helper reads and hashes every block (so the digest stays in
        # order) while this thread compresses the block it read before.
        sealer = self._encryptor if self._seal_on_helper else None
        held, self._held = self._held, b""
        helper.submit(partial(_encode_job, self._source, self._block, self._sha,
                              None if hashed else data, sealer, held))
        compressed = self._compressor.compress(data)
        self._ahead, chunks = helper.result()
        for chunk in chunks:
            self._push(chunk)
        if sealer is not None:
            self._held = compressed
        else:
            self._emit(compressed)

    def _end(self) -> None:
        held, self._held = self._held, b""
        self._emit(held)
        self._emit(self._compressor.flush())
        if self._encryptor is not None:
            self._push(self._encryptor.finish())
        self._finished = True

    def _stop_helper(self) -> None:
        self._helper.close()

    @property
    def plaintext_sha256(self) -> str:
        """Hex SHA-256 of everything read from the source (after EOF)."""
        return self._hexdigest(self._sha)

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
                 block_size: int = BLOCK_SIZE, digest: bool = True) -> None:
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
        self._helper: _Helper[None] = _Helper("walship-sha256")
        self._sha = _Hasher(self._helper) if digest else None

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
            if self._sha is not None:
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

    def _stop_helper(self) -> None:
        self._helper.close()

    @property
    def plaintext_sha256(self) -> str:
        """Hex SHA-256 of the plaintext (after a clean EOF)."""
        return self._hexdigest(self._sha)

    @property
    def plaintext_size(self) -> int:
        """Bytes of plaintext (after a clean EOF)."""
        self._done("plaintext_size")
        return self._plain


def encode(source: BinaryIO, compression: str, keyring: Keyring | None, *,
           random: Callable[[int], bytes] | None = None, digest: bool = True) -> EncodeStream:
    """A readable stream of the stored form of `source`: compressed, encrypted if the keyring
    encrypts. `random` replaces os.urandom (tests and golden vectors only). With
    digest=False there is no plaintext_sha256 (a full pass of SHA-256 saved, for callers
    that hash what they need themselves)."""
    return EncodeStream(source, compression, keyring, random=random, digest=digest)


def decode(source: BinaryIO, keyring: Keyring | None, *, digest: bool = True) -> DecodeStream:
    """A readable stream of the plaintext of a stored object read from `source`.

    The codec and encryption are discovered from the object's first bytes. Raises
    IntegrityError (damage, truncation, trailing bytes) or KeyMismatch (no matching key,
    or a plaintext object while keys are configured) from read(), where the problem is found.
    """
    return DecodeStream(source, keyring, digest=digest)


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
