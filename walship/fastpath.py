"""Fast paths: answer PostgreSQL's commonest calls without importing click, the configuration
loader, the pipeline or any cloud SDK. Standard library only; every import here is paid by
every archive_command and restore_command call.

- `wal-push PATH` when the background pusher already stored PATH (its push marker vouches for
  the file as it is on disk now, for this configuration): exit 0.
- `wal-fetch NAME DEST` when the running prefetcher already downloaded and authenticated NAME:
  check the segment header, rename it into place, record what is wanted next: exit 0.

Only the plain forms with configuration from the environment (WALSHIP_* and WALSHIP_CONFIG)
are handled; anything unusual returns None and the full CLI takes over, so every error is still
reported by one code path. "This configuration" is `config_source()`: the WALSHIP_* and endpoint
variables plus the identity of the config file (device, inode, size, mtime), so editing the
file or pointing at another store invalidates every marker and prefetched file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct

# Variables that decide which store a command talks to, besides WALSHIP_*.
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST")
# Variables that do not change where objects go.
_IRRELEVANT = ("WALSHIP_LOG_LEVEL", "WALSHIP_PREFETCH", "WALSHIP_PUSH_AHEAD",
               "WALSHIP_CONCURRENCY", "WALSHIP_RETRY_BUDGET")

# The segment's long page header (see walship.wal, kept in step with parse_segment_header).
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
_HEX = frozenset("0123456789ABCDEF")
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def config_source(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """A string that changes whenever the configuration's source may name another store."""
    items = sorted(
        (k, v) for k, v in environ.items()
        if (k.startswith("WALSHIP_") and k not in _IRRELEVANT) or k in _ENDPOINT_VARIABLES
    )
    path = environ.get("WALSHIP_CONFIG")
    if path:
        try:
            st = os.stat(path)
        except OSError:
            return None
        items.append(("config-file", f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"))
    if not any(k in ("WALSHIP_STORE", "WALSHIP_CONFIG") for k, _ in items):
        return None
    return json.dumps(items, separators=(",", ":"))


def _spool(environ: os._Environ[str], wal_dir: str) -> str:
    return environ.get("WALSHIP_SPOOL_DIR") or os.path.join(wal_dir, "walship")


def try_fast_push(args: list[str]) -> int | None:
    """0 if args are `wal-push PATH` and PATH's push marker vouches for it; else None."""
    if len(args) != 2 or args[0] != "wal-push" or args[1].startswith("-"):
        return None
    source = config_source(os.environ)
    if source is None:
        return None
    path = args[1]
    marker_file = os.path.join(_spool(os.environ, os.path.dirname(path)), "pushed",
                               os.path.basename(path))
    try:
        with open(marker_file, "rb") as fh:
            marker = json.loads(fh.read(4096))
        st = os.stat(path)
        vouches = (
            marker["source"] == source
            and marker["size"] == st.st_size
            and marker["mtime_ns"] == st.st_mtime_ns
            and marker["inode"] == st.st_ino
        )
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    # The marker stays until PostgreSQL has renamed the .ready file: removing it now would let
    # the background pusher, which lists .ready files, push the same file again.
    return 0 if vouches else None


def _is_segment_name(name: str) -> bool:
    return len(name) == 24 and _HEX.issuperset(name) and name[:8] != "00000000"


def _segment_size_if_valid(path: str, name: str) -> int | None:
    with open(path, "rb") as fh:
        head = fh.read(_LONG_HEADER.size)
        size = os.fstat(fh.fileno()).st_size
    if len(head) < _LONG_HEADER.size:
        return None
    magic, info, _tli, pageaddr, _rem, _sysid, seg_size, _blcksz = _LONG_HEADER.unpack(head)
    if not info & 0x0002 or not 0xD097 <= magic <= 0xD1FF:
        return None
    if seg_size < 1 << 20 or seg_size > 1 << 30 or seg_size & (seg_size - 1) or size != seg_size:
        return None
    segno = int(name[8:16], 16) * (0x1_0000_0000 // seg_size) + int(name[16:], 16)
    return seg_size if pageaddr == segno * seg_size else None


def try_fast_fetch(args: list[str]) -> int | None:
    """0 if args are `wal-fetch NAME DEST` and a running prefetcher has NAME ready; else None."""
    if len(args) != 3 or args[0] != "wal-fetch" or not _is_segment_name(args[1]):
        return None
    if os.environ.get("WALSHIP_PREFETCH") == "0":
        return None
    source = config_source(os.environ)
    if source is None:
        return None
    name, dest = args[1], args[2]
    dest_dir = os.path.dirname(dest) or "."
    pf = os.path.join(_spool(os.environ, dest_dir), "prefetch")
    path = os.path.join(pf, name)
    try:
        # Same configuration, same boot (prefetch.source_record: files are not fsynced).
        with open(os.path.join(pf, ".source")) as fh, open(_BOOT_ID) as boot:
            if fh.read() != f"{boot.read().strip()}\n{source}":
                return None
        # Serve only while a prefetcher runs: otherwise the full path serves the file and
        # starts one, which needs the whole configuration.
        lock = os.open(os.path.join(pf, ".lock"), os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # held: a prefetcher is running
        else:
            return None
        finally:
            os.close(lock)
        seg_size = _segment_size_if_valid(path, name)
        if seg_size is None:
            return None  # the full path deals with (and reports) a doubtful file
        os.replace(path, dest)
        fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        want = os.path.join(pf, f".want.{os.getpid()}.tmp")
        with open(want, "w") as fh:
            fh.write(f"{name} {seg_size}")
        os.replace(want, os.path.join(pf, ".want"))
    except OSError:
        return None
    return 0


def try_fast(args: list[str]) -> int | None:
    """Run whichever fast path applies; None when the full CLI must run."""
    if args[:1] == ["wal-push"]:
        return try_fast_push(args)
    if args[:1] == ["wal-fetch"]:
        with contextlib.suppress(OSError):
            return try_fast_fetch(args)
    return None
