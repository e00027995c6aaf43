"""The encode/decode pipeline: round trips at chunk boundaries, and every kind of damage."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walship import codecs, crypto, pipeline
from walship import format as fmt
from walship.errors import IntegrityError, KeyMismatch

C = fmt.CHUNK_SIZE
SEALED = C + fmt.TAG_SIZE
SECRET = crypto.SecretKey(bytes(range(32)))
PRIVATE = crypto.PrivateKey(bytes(range(32, 64)))
OTHER = crypto.SecretKey(bytes(32))
SYM = crypto.Keyring(SECRET, (SECRET,))
PUB = crypto.Keyring(PRIVATE.public, (PRIVATE,))
RINGS = {"nokey": None, "symmetric": SYM, "x25519": PUB}
READ_SIZES = (1, 3, 100, C - 1, C, C + 1, 1 << 20)


def sample(n: int) -> bytes:
    """Half random, half WAL-like repetition: exercises both incompressible and compressible."""
    half = n // 2
    return os.urandom(half) + (b"\x10\xd1walship-wal-record" * (n // 20 + 1))[: n - half]


class ShortReads(io.RawIOBase):
    """A source that returns at most `step` bytes per read, like a socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._step, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def read_varied(stream: io.BufferedIOBase, sizes: tuple[int, ...] = READ_SIZES) -> bytes:
    parts = []
    i = 0
    while True:
        size = sizes[i % len(sizes)]
        data = stream.read(size)
        if not data:
            return b"".join(parts)
        # BufferedIOBase semantics: exact sizes until the end.
        parts.append(data)
        i += 1
        assert len(data) <= size


def cycle_small_reads(n: int) -> tuple[int, ...]:
    return READ_SIZES if n > 4 * C else (1, 2, 3, 5, 8, 13, 1000, C + 3)


@pytest.mark.parametrize("ring_name", list(RINGS))
@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("size", [0, C - 1, C, C + 1, 2 * C + 17, 16 * 1024 * 1024],
                         ids=["0", "C-1", "C", "C+1", "2C+k", "16MiB"])
def test_round_trip(codec: str, ring_name: str, size: int) -> None:
    ring = RINGS[ring_name]
    data = sample(size)
    sizes = cycle_small_reads(size)
    with pipeline.encode(ShortReads(data, 50_000), codec, ring) as enc:  # type: ignore[arg-type]
        blob = read_varied(enc, sizes)
        assert enc.plaintext_size == size
        assert enc.plaintext_sha256 == hashlib.sha256(data).hexdigest()
        assert enc.stored_size == len(blob)
    assert fmt.is_encrypted(blob) == (ring is not None)
    with pipeline.decode(ShortReads(blob, 30_001), ring) as dec:  # type: ignore[arg-type]
        assert read_varied(dec, sizes) == data
        assert dec.plaintext_size == size
        assert dec.plaintext_sha256 == hashlib.sha256(data).hexdigest()
        assert dec.codec == codec
        assert dec.encrypted == (ring is not None)
    assert pipeline.decode_bytes(blob, ring) == data


def test_exact_reads_for_multipart_uploads() -> None:
    data = sample(3 * 1024 * 1024)
    with pipeline.encode(io.BytesIO(data), "none", SYM) as enc:
        parts = iter(lambda: enc.read(1024 * 1024), b"")
        sizes = [len(p) for p in parts]
    assert all(s == 1024 * 1024 for s in sizes[:-1]) and 0 < sizes[-1] <= 1024 * 1024


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3 * C), codec=st.sampled_from(codecs.CODECS),
       ring=st.sampled_from(list(RINGS.values())), read=st.integers(1, 2 * C))
def test_round_trip_arbitrary(data: bytes, codec: str, ring: crypto.Keyring | None,
                              read: int) -> None:
    blob = pipeline.encode_bytes(data, codec, ring)
    with pipeline.decode(io.BytesIO(blob), ring) as dec:
        assert read_varied(dec, (read,)) == data


@pytest.mark.parametrize("head", [fmt.MAGIC + b"data", b"\x04\x22\x4d\x18xx",
                                  b"\x28\xb5\x2f\xfd", b"\x1f\x8b\x08"])
def test_none_that_looks_like_a_frame_is_stored_as_lz4(head: bytes) -> None:
    with pipeline.encode(io.BytesIO(head), "none", None) as enc:
        blob = enc.read()
        assert enc.compression == "lz4"
    assert codecs.sniff(blob) == "lz4"
    assert pipeline.decode_bytes(blob, None) == head


# ---------------------------------------------------------------------------------------
# damage


def must_fail(blob: bytes, ring: crypto.Keyring | None,
              errors: tuple[type[Exception], ...] = (IntegrityError,)) -> Exception:
    with pytest.raises(errors) as exc:
        pipeline.decode_bytes(blob, ring)
    # And streaming it: no read sequence reaches a clean EOF; the error is sticky.
    with pipeline.decode(io.BytesIO(blob), ring) as dec:
        with pytest.raises(errors):
            while dec.read(7000):
                pass
        with pytest.raises(errors):
            dec.read(1)
        with pytest.raises(RuntimeError):
            _ = dec.plaintext_sha256
    assert "\n" not in str(exc.value)
    return exc.value


ENCRYPTED = {
    (name, codec): pipeline.encode_bytes(os.urandom(3 * C + 1000), codec, RINGS[name])
    for name in ("symmetric", "x25519") for codec in ("none", "lz4")
}


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(list(ENCRYPTED)), where=st.floats(0, 1), bit=st.integers(0, 7),
       header_pos=st.integers(0, fmt.MAX_HEADER_SIZE - 1), in_header=st.booleans())
def test_every_flipped_bit_is_detected(key: tuple[str, str], where: float, bit: int,
                                       header_pos: int, in_header: bool) -> None:
    blob = bytearray(ENCRYPTED[key])
    ring = RINGS[key[0]]
    size = fmt.HEADER_SIZES[blob[9]]
    pos = header_pos % size if in_header else min(int(where * len(blob)), len(blob) - 1)
    blob[pos] ^= 1 << bit
    # A flipped key id is indistinguishable from an object for another key.
    must_fail(bytes(blob), ring, (IntegrityError, KeyMismatch))


def test_every_header_byte_flip() -> None:
    for (name, _codec), original in ENCRYPTED.items():
        for pos in range(fmt.HEADER_SIZES[original[9]]):
            blob = bytearray(original)
            blob[pos] ^= 0x80
            err = must_fail(bytes(blob), RINGS[name], (IntegrityError, KeyMismatch))
            if isinstance(err, KeyMismatch):
                # magic (now a plaintext object, refused), key id, or the mode selecting the key
                assert pos < 8 or 16 <= pos < 24 or pos == 9


@pytest.mark.parametrize("key", list(ENCRYPTED))
def test_truncation_everywhere(key: tuple[str, str]) -> None:
    blob = ENCRYPTED[key]
    ring = RINGS[key[0]]
    hsize = fmt.HEADER_SIZES[blob[9]]
    cuts = {0, 1, 8, 9, 10, hsize - 1, hsize, hsize + 1, hsize + 15, hsize + 16, len(blob) - 1}
    for i in range(1, (len(blob) - hsize) // SEALED + 1):
        boundary = hsize + i * SEALED
        cuts |= {boundary - 1, boundary, boundary + 1, boundary - SEALED // 2}
    for cut in sorted(c for c in cuts if 0 <= c < len(blob)):
        if cut < 8:
            # Too short to carry the magic: read as a plaintext object, refused with a key.
            must_fail(blob[:cut], ring, (KeyMismatch,))
        else:
            must_fail(blob[:cut], ring)


@pytest.mark.parametrize("key", list(ENCRYPTED))
def test_reorder_duplicate_drop_append(key: tuple[str, str]) -> None:
    blob = ENCRYPTED[key]
    ring = RINGS[key[0]]
    hsize = fmt.HEADER_SIZES[blob[9]]
    header, body = blob[:hsize], blob[hsize:]
    chunks = [body[i : i + SEALED] for i in range(0, len(body), SEALED)]
    assert len(chunks) >= 3
    variants = [
        [chunks[1], chunks[0], *chunks[2:]],
        [chunks[0], chunks[0], *chunks[1:]],
        [chunks[0], *chunks[2:]],
        [*chunks[:-1]],
        [*chunks, chunks[-1]],
        [*chunks[:-2], chunks[-1], chunks[-2]],
    ]
    for chunk_list in variants:
        must_fail(header + b"".join(chunk_list), ring)
    for tail in (b"\x00", bytes(16), bytes(SEALED)):
        must_fail(blob + tail, ring)
    # A chunk spliced in from another object under the same key.
    other = pipeline.encode_bytes(sample(3 * C + 1000), key[1], ring)
    must_fail(header + other[hsize : hsize + SEALED] + b"".join(chunks[1:]), ring)


def test_wrong_and_missing_keys() -> None:
    sym_blob = ENCRYPTED[("symmetric", "lz4")]
    pub_blob = ENCRYPTED[("x25519", "lz4")]
    other_ring = crypto.Keyring(OTHER, (OTHER,))
    err = must_fail(sym_blob, other_ring, (KeyMismatch,))
    assert SECRET.key_id.hex() in str(err) and OTHER.key_id.hex() in str(err)
    must_fail(pub_blob, SYM, (KeyMismatch,))
    must_fail(sym_blob, PUB, (KeyMismatch,))
    err = must_fail(sym_blob, None, (KeyMismatch,))
    assert "no decryption key" in str(err)
    push_only = crypto.Keyring(PRIVATE.public)
    must_fail(pub_blob, push_only, (KeyMismatch,))
    # Rotation: any configured key that matches works.
    rotated = crypto.Keyring(OTHER, (OTHER, SECRET, PRIVATE))
    assert pipeline.decode_bytes(sym_blob, rotated) == pipeline.decode_bytes(sym_blob, SYM)
    assert pipeline.decode_bytes(pub_blob, rotated) == pipeline.decode_bytes(pub_blob, PUB)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_plaintext_object_refused_when_keys_configured(codec: str) -> None:
    blob = pipeline.encode_bytes(b"substituted " * 100, codec, None)
    for ring in (SYM, PUB, crypto.Keyring(PRIVATE.public)):
        err = must_fail(blob, ring, (KeyMismatch,))
        assert "not encrypted" in str(err)
    allowing = crypto.Keyring(SECRET, (SECRET,), allow_plaintext=True)
    assert pipeline.decode_bytes(blob, allowing) == b"substituted " * 100


@pytest.mark.parametrize("codec", ["lz4", "zstd", "gzip"])
def test_unencrypted_damage(codec: str) -> None:
    blob = pipeline.encode_bytes(sample(200_000), codec, None)
    for cut in (len(blob) // 2, len(blob) - 1):
        must_fail(blob[:cut], None)
    must_fail(blob + b"\x00", None)
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    must_fail(bytes(damaged), None)


def test_future_version_is_named() -> None:
    blob = bytearray(ENCRYPTED[("symmetric", "none")])
    blob[8] = 2
    err = must_fail(bytes(blob), SYM)
    assert "version 2 is newer" in str(err)


def test_unknown_codec_id() -> None:
    # An authenticated header would fail anyway, but the codec id is checked first.
    blob = bytearray(ENCRYPTED[("symmetric", "none")])
    blob[11] = 9
    assert "unknown codec" in str(must_fail(bytes(blob), SYM))


# ---------------------------------------------------------------------------------------
# plumbing


def test_copy_stream_and_copyfileobj() -> None:
    data = sample(5 * C)
    enc = pipeline.encode(io.BytesIO(data), "zstd", PUB)
    out = io.BytesIO()
    shutil.copyfileobj(enc, out)
    dst = io.BytesIO()
    n = pipeline.copy_stream(pipeline.decode(io.BytesIO(out.getvalue()), PUB), dst, 1000)
    assert n == len(data) and dst.getvalue() == data


def test_readinto_and_digests_before_eof() -> None:
    enc = pipeline.encode(io.BytesIO(b"x" * 1000), "lz4", None)
    assert enc.readable() and not enc.seekable()
    with pytest.raises(RuntimeError):
        _ = enc.plaintext_sha256
    buf = bytearray(5)
    assert enc.readinto(buf) == 5
    assert bytes(buf) == b"\x04\x22\x4d\x18"[:4] + bytes(buf[4:5])
    enc.close()
    with pytest.raises(ValueError):
        enc.read(1)


def test_encode_is_deterministic_with_injected_randomness() -> None:
    def fixed(n: int) -> bytes:
        return b"\x07" * n

    for ring in (SYM, PUB):
        a = pipeline.encode_bytes(b"abc" * 1000, "lz4", ring, random=fixed)
        b = pipeline.encode_bytes(b"abc" * 1000, "lz4", ring, random=fixed)
        c = pipeline.encode_bytes(b"abc" * 1000, "lz4", ring)
        assert a == b != c


def test_no_boto3_on_import() -> None:
    code = ("import sys, walship.pipeline, walship.crypto; "
            "sys.exit(1 if 'boto3' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _iter_chunks(blob: bytes) -> Iterator[bytes]:  # pragma: no cover - helper for debugging
    yield from (blob[i : i + SEALED] for i in range(0, len(blob), SEALED))


@pytest.mark.parametrize("ring_name", list(RINGS))
@pytest.mark.parametrize("size", [0, 1000, 3 * 1024 * 1024 + 5])
def test_digest_off_stores_the_same_format(ring_name: str, size: int) -> None:
    # Backup partitions skip the stream digest (each file carries its own): the stored form
    # must be exactly what a digesting stream writes, and decoding must still authenticate.
    data = sample(size)
    ring = RINGS[ring_name]
    with pipeline.encode(io.BytesIO(data), "lz4", ring, random=bytes, digest=False) as enc:
        blob = enc.read()
        assert enc.plaintext_size == size
        with pytest.raises(RuntimeError, match="digest=False"):
            _ = enc.plaintext_sha256
    assert blob == pipeline.encode_bytes(data, "lz4", ring, random=bytes)
    with pipeline.decode(io.BytesIO(blob), ring, digest=False) as dec:
        assert dec.read() == data
        with pytest.raises(RuntimeError, match="digest=False"):
            _ = dec.plaintext_sha256
    if ring is not None and size:
        damaged = bytearray(blob)
        damaged[-20] ^= 1
        with pytest.raises(IntegrityError), \
                pipeline.decode(io.BytesIO(bytes(damaged)), ring, digest=False) as dec:
            dec.read()
