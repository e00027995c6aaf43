"""The wal-push fast path: confirm a segment that was already pushed ahead, and exit.

Only the plain `walship wal-push PATH` form is handled here (configuration from the
environment and WALSHIP_CONFIG); anything unusual returns None and the full CLI takes over,
so every error is still reported by one code path.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from walship import spool
from walship.config import load
from walship.errors import WalshipError


def try_fast_push(args: list[str]) -> int | None:
    """0 if args are `wal-push PATH` and PATH's push marker vouches for it; else None."""
    if len(args) != 2 or args[0] != "wal-push" or args[1].startswith("-"):
        return None
    try:
        config = load()
    except WalshipError:
        return None
    if not config.store:
        return None
    wal_path = Path(args[1])
    marker_file = spool.marker_path(spool.spool_dir(config, wal_path.parent), wal_path.name)
    marker = spool.read_marker(marker_file)
    if marker is None:
        return None
    try:
        st = os.stat(wal_path)
    except OSError:
        return None
    if not marker.matches(config.store, st):
        return None
    # PostgreSQL marks the file .done once we exit 0; the marker has served its purpose.
    with contextlib.suppress(OSError):
        os.unlink(marker_file)
    return 0
