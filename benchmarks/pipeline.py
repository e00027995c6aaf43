"""Throughput of the encode/decode pipeline on real WAL, against bare lz4 in the same run.

    python benchmarks/pipeline.py [WAL_DIR] [--repeat 5]

Without WAL_DIR, makes 8 segments with benchmarks/make_wal.py in a temporary directory.
Prints MB/s (MB = 10^6 bytes of plaintext per second; median of the repetitions) and the
ratio against bare lz4 (compress, or decompress for the decode table), then the import
time of the pipeline, and checks that it does not import boto3.

The machine may be shared, so every repetition of a case runs right after a repetition of
bare lz4, and "vs bare lz4" is the median of those per-pair ratios (slow drift in what the
neighbours do cancels out). "cpu vs bare" compares the CPU time of the calling thread
alone: what the ratio would be with a free core for the helper thread. When the two
columns disagree, the helper thread did not get a core.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lz4.frame

sys.path.insert(0, str(Path(__file__).resolve().parent))

from walship import crypto, pipeline

Case = Callable[[bytes], object]


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls (one warm-up call first)."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _pair(fn: Callable[[], object], bare: Callable[[], object],
          repeat: int) -> tuple[float, float, float]:
    """(median seconds of fn, median of bare/fn wall ratios, median of bare/fn ratios of
    the calling thread's CPU time), each fn call right after a bare call."""
    fn()
    secs, walls, cpus = [], [], []
    for _ in range(repeat):
        samples = []
        for f in (bare, fn):
            start, cpu = time.perf_counter(), time.thread_time()
            f()
            samples.append((time.perf_counter() - start, time.thread_time() - cpu))
        (bw, bc), (fw, fc) = samples
        secs.append(fw)
        walls.append(bw / fw)
        cpus.append(bc / fc)
    return statistics.median(secs), statistics.median(walls), statistics.median(cpus)


def _encode(seg: bytes, codec: str, ring: crypto.Keyring | None) -> int:
    # Read as a storage backend would: 8 MiB parts (boto3's default multipart chunk).
    with pipeline.encode(io.BytesIO(seg), codec, ring) as stream:
        total = 0
        while data := stream.read(8 * 1024 * 1024):
            total += len(data)
        _ = stream.plaintext_sha256
        return total


def _decode(blob: bytes, ring: crypto.Keyring | None) -> int:
    with pipeline.decode(io.BytesIO(blob), ring) as stream:
        total = 0
        while data := stream.read(1024 * 1024):
            total += len(data)
        _ = stream.plaintext_sha256
        return total


def _import_time(code: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(wal_dir: Path, repeat: int) -> None:
    """Measure and print the tables."""
    segments = [p.read_bytes() for p in sorted(wal_dir.iterdir()) if p.is_file()]
    if not segments:
        raise SystemExit(f"no WAL segments in {wal_dir}")
    total = sum(len(s) for s in segments)
    secret = crypto.SecretKey(os.urandom(32))
    private = crypto.PrivateKey(os.urandom(32))
    sym = crypto.Keyring(secret, (secret,))
    pub = crypto.Keyring(private.public, (private,))

    cases: list[tuple[str, str, crypto.Keyring | None]] = [
        ("lz4", "lz4", None),
        ("lz4 + symmetric", "lz4", sym),
        ("lz4 + public key", "lz4", pub),
        ("zstd", "zstd", None),
        ("gzip", "gzip", None),
        ("none + symmetric", "none", sym),
    ]

    def bare_compress() -> None:
        for seg in segments:
            lz4.frame.compress(seg, content_checksum=True)

    lz4_blobs = [lz4.frame.compress(seg, content_checksum=True) for seg in segments]

    def bare_decompress() -> None:
        for blob in lz4_blobs:
            lz4.frame.decompress(blob)

    print(f"{len(segments)} WAL segments, {total / 1e6:.0f} MB; median of {repeat} runs;"
          f" Python {sys.version.split()[0]}")
    rows = []
    base = _time(bare_compress, repeat)
    stored = sum(len(b) for b in lz4_blobs)
    rows.append(("bare lz4.frame.compress", total / base / 1e6, 1.0, 1.0, total / stored))
    for name, codec, ring in cases:
        t, rel, cpu = _pair(lambda c=codec, r=ring: [_encode(s, c, r) for s in segments],
                            bare_compress, repeat)
        size = sum(_encode(s, codec, ring) for s in segments)
        rows.append((f"encode {name}", total / t / 1e6, rel, cpu, total / size))
    print("\n| encode | MB/s | vs bare lz4 | cpu vs bare | ratio |\n|---|---:|---:|---:|---:|")
    for label, mbs, rel, cpu, ratio in rows:
        print(f"| {label} | {mbs:.0f} | {rel:.2f} | {cpu:.2f} | {ratio:.2f} |")

    rows = []
    base = _time(bare_decompress, repeat)
    rows.append(("bare lz4.frame.decompress", total / base / 1e6, 1.0, 1.0, 0.0))
    for name, codec, ring in cases:
        blobs = [pipeline.encode_bytes(s, codec, ring) for s in segments]
        t, rel, cpu = _pair(lambda b=blobs, r=ring: [_decode(x, r) for x in b],
                            bare_decompress, repeat)
        rows.append((f"decode {name}", total / t / 1e6, rel, cpu, 0.0))
    print("\n| decode | MB/s | vs bare lz4 | cpu vs bare |\n|---|---:|---:|---:|")
    for label, mbs, rel, cpu, _ in rows:
        print(f"| {label} | {mbs:.0f} | {rel:.2f} | {cpu:.2f} |")

    reps = max(repeat, 7)
    bare = _import_time("pass", reps)
    ours = _import_time("import walship.pipeline, walship.crypto", reps)
    print(f"\nimport time: python -c pass {bare * 1000:.0f} ms; with walship.pipeline +"
          f" walship.crypto {ours * 1000:.0f} ms (+{(ours - bare) * 1000:.0f} ms)")
    check = ("import sys, walship.pipeline, walship.crypto; "
             "assert 'boto3' not in sys.modules, 'boto3 imported'; "
             "assert 'botocore' not in sys.modules, 'botocore imported'")
    subprocess.run([sys.executable, "-c", check], check=True)
    print("boto3 not imported by walship.pipeline/walship.crypto: ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wal_dir", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", type=int, default=8, help="segments to make without WAL_DIR")
    args = parser.parse_args(argv)
    if args.wal_dir is not None:
        run(args.wal_dir, args.repeat)
        return 0
    from make_wal import make_wal

    tmp = Path(tempfile.mkdtemp(prefix="walship-bench-"))
    try:
        make_wal(tmp, args.count)
        run(tmp, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
