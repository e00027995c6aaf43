"""walship's own working directory next to the WAL: push-ahead markers and prefetched segments.

    <spool>/pushed/<WAL name>     marker: this file, as it is on disk now, is in the store
    <spool>/push/.lock            held (flock) by the one background pusher of this pg_wal
    <spool>/push/.log             the pusher's own log (its stderr), appended to; moved to
                                  .log.1 past 1 MiB (ops/background.py)
    <spool>/push/failed/<name>    the pusher could not push it: wal-push pushes it itself
    <spool>/prefetch/<WAL name>   a segment downloaded ahead, complete and authenticated
    <spool>/prefetch/.want        the newest name restore_command asked for
    <spool>/prefetch/.lock        held (flock) by the one prefetcher of this data directory
    <spool>/prefetch/.log         the prefetcher's own log (its stderr), as the pusher's

The default spool is <pg_wal>/walship. PostgreSQL ignores unknown directories in pg_wal, and
base backups (walship's and pg_basebackup's) skip pg_wal's contents. PostgreSQL's own
archive_status files are never renamed or touched.

Standard library only: cheap to import on the paths PostgreSQL calls once per file.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from walship.config import Config


def spool_dir(config: Config, wal_dir: Path) -> Path:
    """The spool for the pg_wal directory `wal_dir` (the directory of %p)."""
    return config.spool_dir if config.spool_dir is not None else wal_dir / "walship"


@dataclass(frozen=True)
class PushMarker:
    """Proof that the WAL file with this identity on disk is durably in the store that
    `source` names (walship.fastpath.config_source, or 'store=<url>')."""

    source: str
    size: int
    mtime_ns: int
    inode: int
    sha256: str

    @classmethod
    def for_file(cls, source: str, st: os.stat_result, sha256: str) -> PushMarker:
        """The marker for a file whose stat result is `st`."""
        return cls(source, st.st_size, st.st_mtime_ns, st.st_ino, sha256)

    def matches(self, source: str, st: os.stat_result) -> bool:
        """Whether the file (as stat'ed now) is the one this marker vouches for."""
        return (
            self.source == source
            and self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.inode == st.st_ino
        )


def source_key(config: Config, source: str | None) -> str:
    """What markers and prefetched files are tied to: the configuration's source when the
    command was configured from the environment alone (so the fast paths can compare it), else
    the store URL."""
    return source if source is not None else f"store={config.require_store()}"


def marker_path(spool: Path, name: str) -> Path:
    """Where the push marker of WAL file `name` lives."""
    return spool / "pushed" / name


def read_marker(path: Path) -> PushMarker | None:
    """The marker at `path`, or None if absent or unreadable (then the slow path decides)."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(4096))
        return PushMarker(**data)
    except (OSError, ValueError, TypeError, RecursionError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temp file and a rename: readers see the old or
    the new contents, never a part. No fsync: for the spool's small records only."""
    # pid and thread: the background pusher's threads may write the same record at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(path: Path, marker: PushMarker) -> None:
    """Write a marker atomically. No fsync: a marker lost in a crash only costs a re-push."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(marker)))
