"""Prefetch: while PostgreSQL replays one segment, download the next ones in the background.

restore_command is called once per segment, serially; a round trip to object storage per call
caps recovery speed. After each fetch of segment N, wal-fetch records N as wanted and makes
sure one detached prefetcher per data directory (an flock) is downloading N+1 .. N+k into
<spool>/prefetch. A later wal-fetch of a prefetched segment checks its header and renames it
into place. A prefetched file is written by temp file + fsync + rename after the full
authenticated decode and digest check, so a partial file is never served (written without
fsync, and trusted only within the boot that wrote them: see source_record); files of other
timelines or behind the wanted position are removed; the whole directory goes when recovery
ends (no recovery.signal or standby.signal), by the prefetcher or by the next wal-push.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from walship import log
from walship.config import Config
from walship.errors import IntegrityError, ObjectNotFound, WalshipError
from walship.ops import background
from walship.spool import fsync_dir, write_atomic
from walship.wal import WalKind, WalName, check_segment_size, next_segment, parse_wal_name

_log = log.get("prefetch")

# How long a prefetcher with nothing new to do waits for restore_command to ask again
# before exiting; a standby that streams may not ask for minutes.
IDLE_EXIT_SECONDS = 10.0
POLL_SECONDS = 0.2


def prefetch_dir(spool_dir: Path) -> Path:
    """Where prefetched segments of this spool live."""
    return spool_dir / "prefetch"


def recovery_in_progress(datadir: Path) -> bool:
    """Whether PostgreSQL in `datadir` is (about to be) in archive recovery or standby mode."""
    return (datadir / "recovery.signal").exists() or (datadir / "standby.signal").exists()


def cleanup_after_recovery(datadir: Path, spool_dir: Path) -> None:
    """Remove the prefetch spool once recovery has ended. Cheap when there is nothing."""
    pf = prefetch_dir(spool_dir)
    if pf.exists() and not recovery_in_progress(datadir):
        shutil.rmtree(pf, ignore_errors=True)


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def source_record(source: str) -> str:
    """What .source holds: the configuration's source and the boot that wrote the files.
    Prefetched files are written without fsync (a prefetcher fsyncing 16 MiB per segment
    cannot keep ahead of replay), so they are trusted only within the same boot: after an OS
    crash a file could have its name but not its bytes."""
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = "unknown"
    return f"{boot}\n{source}"


def _source_matches(pf: Path, source: str) -> bool:
    try:
        return (pf / ".source").read_text() == source_record(source)
    except OSError:
        return False


def take(spool_dir: Path, source: str, wal: WalName, dest: Path) -> int | None:
    """Move a prefetched `wal` to `dest`; None if there is none to serve (then download)."""
    from walship.ops.wal_fetch import check_segment_content

    path = prefetch_dir(spool_dir) / wal.name
    if not path.exists() or not _source_matches(path.parent, source):
        return None
    try:
        size = check_segment_content(path, wal)
        os.replace(path, dest)
    except (OSError, IntegrityError) as exc:
        # Never serve a doubtful file; the store is the source of truth.
        _log.warning(f"not serving prefetched {wal}: {exc}")
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    fsync_dir(dest.parent)
    return size


def request(config: Config, datadir: Path, spool_dir: Path, wal: WalName,
            segment_size: int, source: str) -> None:
    """Record `wal` as the newest wanted segment and make sure a prefetcher is running.
    `source` (spool.source_key) ties the prefetched files to this configuration."""
    pf = prefetch_dir(spool_dir)
    try:
        pf.mkdir(parents=True, exist_ok=True)
        if not _source_matches(pf, source):
            for entry in os.listdir(pf):
                if not entry.startswith("."):
                    os.unlink(pf / entry)
            write_atomic(pf / ".source", source_record(source))
        write_atomic(pf / ".want", f"{wal.name} {segment_size}")
        if background.is_locked(pf / ".lock"):
            return  # a prefetcher is running and will read the new .want
        _spawn(config, datadir, spool_dir)
    except OSError as exc:
        # Prefetching is an optimisation: never fail a fetch because of it.
        _log.warning(f"prefetch not started: {exc}")


def _spawn(config: Config, datadir: Path, spool_dir: Path) -> None:
    background.spawn("walship.ops.prefetch", [str(datadir), str(spool_dir)], config,
                     prefetch_dir(spool_dir) / ".log")


def _window(want: WalName, segment_size: int, depth: int) -> list[WalName]:
    names = []
    current = want
    for _ in range(depth):
        current = next_segment(current, segment_size)
        names.append(current)
    return names


def main(argv: list[str]) -> int:
    """The detached prefetcher process: `python -c ... DATADIR SPOOL`."""
    from walship.ops.wal_fetch import download_wal

    datadir, spool_dir = Path(argv[0]), Path(argv[1])
    pf = prefetch_dir(spool_dir)
    try:
        with background.worker_session(pf / ".lock") as session:
            if session is None:
                return 0
            # Half-written downloads of a prefetcher that died (kill -9, the OOM killer): only
            # the holder of the flock writes them, so every one there now is dead, and each is
            # up to a segment's size that would otherwise stay until recovery ends.
            with contextlib.suppress(OSError):
                for entry in os.listdir(pf):
                    if entry.startswith(".walship-") and entry.endswith(".tmp"):
                        os.unlink(pf / entry)

            def fetch(w: WalName) -> bool:
                try:
                    download_wal(session.storage, session.keyring, w, pf / w.name,
                                 durable=False)
                    return True
                except ObjectNotFound:
                    return False
                except WalshipError as exc:
                    _log.warning(f"prefetch of {w} failed: {exc.message}")
                    return False

            last_want = ""
            last_change = time.monotonic()
            with ThreadPoolExecutor(max_workers=session.config.concurrency) as pool:
                while True:
                    if not recovery_in_progress(datadir):
                        shutil.rmtree(pf, ignore_errors=True)
                        return 0
                    try:
                        want_text = (pf / ".want").read_text().strip()
                        name, size_text = want_text.split()
                        want = parse_wal_name(name)
                        segment_size = check_segment_size(int(size_text))
                    except (OSError, ValueError):
                        return 0
                    if want_text != last_want:
                        last_want, last_change = want_text, time.monotonic()
                    window = (_window(want, segment_size, session.config.prefetch)
                              if want.kind is WalKind.SEGMENT else [])
                    keep = {w.name for w in window}
                    for entry in os.listdir(pf):
                        if not entry.startswith(".") and entry not in keep:
                            with contextlib.suppress(OSError):
                                os.unlink(pf / entry)
                    missing = [w for w in window if not (pf / w.name).exists()]
                    if not (missing and any(list(pool.map(fetch, missing)))):
                        if time.monotonic() - last_change > IDLE_EXIT_SECONDS:
                            return 0
                        time.sleep(POLL_SECONDS)
    except WalshipError as exc:
        _log.warning(f"prefetcher stopped: {exc.message}")
        return 0
