"""What reading commit times costs wal-push per segment, against a full record-by-record walk.

    python benchmarks/walrecords.py [WAL_DIR] [--repeat 5]

Without WAL_DIR, makes 8 busy segments with benchmarks/make_wal.py (pgbench) in a temporary
directory. For each segment: walrecords.commit_times through an mmap (what wal-push does),
and, as the baseline measured in the same run, a walk over every record of the segment (what
a naive reader would do). Prints the median ms per segment of each, their ratio, and the
ratio against reading the segment's 16 MiB once (the least any push does: encode reads every
byte). Segments without a commit (a bulk load) cost one full walk; pass a directory of them
to see that case.
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from walship import walrecords


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of `repeat` runs."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _full_walk(buf: mmap.mmap) -> int | None:
    """Every record from the segment's first to its last (the baseline): the last commit."""
    segment = walrecords._Segment.open(buf)
    if segment is None:
        return None
    for index in range(segment.size // segment.blcksz):
        begin = segment.first_record_on_page(index)
        if begin is not None:
            return segment.walk(begin, segment.size, stop_at_first=False)[0]
    return None


def _read_all(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(len(chunk) for chunk in iter(lambda: fh.read(1 << 20), b""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wal_dir", type=Path, nargs="?")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    work: Path | None = None
    if args.wal_dir is None:
        import make_wal

        work = Path(tempfile.mkdtemp(prefix="walship-bench-walrecords-"))
        paths = make_wal.make_wal(work, 8)
    else:
        paths = sorted(p for p in args.wal_dir.iterdir()
                       if p.is_file() and len(p.name) == 24)
    try:
        rows = []
        for path in paths:
            with open(path, "rb") as fh, \
                    mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                result = walrecords.commit_times(buf)
                # The same answer as the full walk: the benchmark measures a correct reader.
                assert (result.last if result else None) == _full_walk(buf), path.name
                ours = _time(lambda buf=buf: walrecords.commit_times(buf), args.repeat)  # type: ignore[misc]
                full = _time(lambda buf=buf: _full_walk(buf), args.repeat)  # type: ignore[misc]
            read = _time(lambda path=path: _read_all(path), args.repeat)  # type: ignore[misc]
            rows.append((path.name, ours, full, read, result is not None))
        print(f"{'segment':<26}{'commit_times':>14}{'full walk':>12}{'read 16 MiB':>13}"
              f"{'commits':>9}")
        for name, ours, full, read, has in rows:
            print(f"{name:<26}{ours * 1000:>11.2f} ms{full * 1000:>9.2f} ms{read * 1000:>10.2f} ms"
                  f"{'yes' if has else 'no':>9}")
        ours_med = statistics.median(r[1] for r in rows)
        full_med = statistics.median(r[2] for r in rows)
        read_med = statistics.median(r[3] for r in rows)
        print(f"median per segment: commit_times {ours_med * 1000:.2f} ms, full walk "
              f"{full_med * 1000:.2f} ms ({full_med / ours_med:.0f}x), reading the file once "
              f"{read_med * 1000:.2f} ms (commit_times = {ours_med / read_med:.2f}x of that)")
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
