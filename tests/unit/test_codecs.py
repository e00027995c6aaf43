"""Codecs: standard frames the real CLIs read, strict decompression, sniffing."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from walship import codecs
from walship.errors import IntegrityError

DATA = os.urandom(100_000) + bytes(300_000) + b"walship " * 10_000
CLI = {"lz4": ["lz4", "-d", "-c"], "zstd": ["zstd", "-d", "-c", "-q"], "gzip": ["gzip", "-d", "-c"]}


def compress(name: str, data: bytes, step: int = 65_000) -> bytes:
    comp = codecs.new_compressor(name)
    out = [comp.compress(data[i : i + step]) for i in range(0, len(data), step)]
    out.append(comp.flush())
    return b"".join(out)


def decompress(name: str, blob: bytes, step: int = 7_000) -> bytes:
    dec = codecs.new_decompressor(name)
    out = [dec.decompress(blob[i : i + step]) for i in range(0, len(blob), step)]
    dec.finish()
    return b"".join(out)


@pytest.mark.parametrize("name", codecs.CODECS)
@pytest.mark.parametrize("data", [b"", b"x", DATA], ids=["empty", "one", "mixed"])
def test_round_trip(name: str, data: bytes) -> None:
    blob = compress(name, data)
    assert decompress(name, blob) == data
    assert codecs.sniff(blob) == (name if name != "none" or not data else codecs.sniff(data))


@pytest.mark.parametrize("name", ["lz4", "zstd", "gzip"])
@pytest.mark.parametrize("data", [b"", DATA], ids=["empty", "mixed"])
def test_real_cli_reads_our_frames(name: str, data: bytes) -> None:
    if shutil.which(CLI[name][0]) is None:  # pragma: no cover - the image has them
        pytest.skip(f"{CLI[name][0]} not installed")
    blob = compress(name, data)
    result = subprocess.run(CLI[name], input=blob, capture_output=True, check=True)
    assert result.stdout == data


@pytest.mark.parametrize("name", ["lz4", "zstd", "gzip"])
def test_truncation_trailing_and_corruption(name: str) -> None:
    blob = compress(name, DATA)
    for cut in (1, 4, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            decompress(name, blob[:cut])
    for tail in (b"x", bytes(8), blob):
        with pytest.raises(IntegrityError):
            decompress(name, blob + tail)
    damaged = bytearray(blob)
    damaged[len(blob) - 6] ^= 0x40  # inside the last block or the checksum
    with pytest.raises(IntegrityError):
        decompress(name, bytes(damaged))


def test_bounded_output() -> None:
    zeros = bytes(20 * 1024 * 1024)
    for name in ("lz4", "gzip", "zstd"):
        blob = compress(name, zeros, step=len(zeros))
        dec = codecs.new_bounded_decompressor(name)
        got = 0
        piece = dec.decompress(blob, 1 << 20)
        while True:
            assert len(piece) <= 1 << 20
            got += len(piece)
            if dec.needs_input:
                break
            piece = dec.decompress(b"", 1 << 20)
        dec.finish()
        assert got == len(zeros)


def test_sniff() -> None:
    assert codecs.sniff(b"\x04\x22\x4d\x18rest") == "lz4"
    assert codecs.sniff(b"\x28\xb5\x2f\xfd") == "zstd"
    assert codecs.sniff(b"\x1f\x8b\x08\x00") == "gzip"
    assert codecs.sniff(b"\x1f\x8b") == "none"
    assert codecs.sniff(b"\x10\xd1\x02\x00") == "none"  # a WAL page header
    assert codecs.sniff(b"") == "none"


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.new_compressor("brotli")
    assert codecs.CODEC_IDS == {"none": 0, "lz4": 1, "zstd": 2, "gzip": 3}
    assert set(codecs.CODECS) == set(codecs.CODEC_IDS)


@pytest.mark.parametrize("params", [
    {"write_content_size": True},  # single-segment frame header with a content size
    {"write_content_size": False, "level": 1},
    {"write_checksum": False},
    {"level": 19},
])
def test_zstd_bounded_steps_across_frame_header_variants(params: dict[str, object]) -> None:
    import zstandard

    data = DATA + bytes(2_000_000) + os.urandom(50_000)
    blob = zstandard.ZstdCompressor(**params).compress(data)  # type: ignore[arg-type]
    for feed in (1, 7, 4096, len(blob)):
        dec = codecs.new_bounded_decompressor("zstd")
        out = []
        for i in range(0, len(blob), feed):
            out.append(dec.decompress(blob[i : i + feed], 256 * 1024))
            while not dec.needs_input:
                piece = dec.decompress(b"", 256 * 1024)
                assert len(piece) <= 3 * 128 * 1024
                out.append(piece)
        dec.finish()
        assert b"".join(out) == data
