"""Entry point: `walship ...` and `python -m walship ...`.

PostgreSQL starts one wal-push or wal-fetch per WAL file, forever, so the common cases (a
segment the background pusher already stored, a segment the prefetcher already downloaded)
are answered by walship.fastpath without importing click, boto3 or the pipeline: the cost is
little more than starting Python.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run walship; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    from walship.fastpath import try_fast

    code = try_fast(args)
    if code is not None:
        return code
    from walship.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
