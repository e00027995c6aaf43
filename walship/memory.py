"""Keep glibc's allocator from multiplying the buffers of a multi-threaded command.

glibc gives each thread that allocates concurrently its own malloc arena (up to 8 per core),
and memory freed into one arena is not reused by another. backup-push and backup-fetch move
megabyte-sized buffers (S3 parts, pipeline chunks) between a handful of threads, so with the
default the same bounded set of buffers ends up resident once per arena: 157 MiB peak RSS for
a backup to S3 against 126 MiB with two arenas (benchmarks/backup.py --s3, scale 50,
docs/backups.md). Capping the arenas trades a little lock contention in malloc, which these
commands barely feel (their threads spend their time in lz4, hashing and sockets), for a
peak that stays near the configured buffer budget.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_ARENA_MAX = -8

ARENAS = 2


def limit_arenas(count: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; call before starting threads.

    Returns False where there is nothing to tune (not glibc). Harmless to call twice.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))
