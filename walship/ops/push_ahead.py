"""The background pusher: what keeps archiving ahead of a busy server.

PostgreSQL calls archive_command once per file, serially, and waits for each. A wal-push that
finds other `.ready` files makes sure one detached pusher runs for its pg_wal (an flock in
<spool>/push/.lock). The pusher pushes every `.ready` file, oldest first (timeline histories
before all), `concurrency` at a time, and writes a marker for each once it is durably stored and
verified. The server's own call for a file then finds the marker (walship.fastpath, or the wait
below) and exits 0 at once. The pusher exits when nothing has been ready for a few seconds.

Failure handling keeps PostgreSQL's view authoritative: the pusher never touches archive_status;
a file it cannot push gets <spool>/push/failed/<name> and is left to the server's own call,
which pushes it itself and reports the real error; a pusher that dies (kill -9) releases its
lock, and every waiting call then pushes its file itself. A marker is only ever written after
the object was verified, so nothing is reported archived that is not in the store. A new pusher
forgets the failure notes of earlier ones (written while the store was failing), and a pusher
stops when PostgreSQL's calls come with another configuration (<push>/.source: the operator
fixed archive_command), so that the next call starts one that can vouch for its files.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from walship import log, spool
from walship.config import Config
from walship.errors import WalshipError
from walship.ops import background

if TYPE_CHECKING:
    from walship.ops.wal_push import PushResult

_log = log.get("push_ahead")

# How long the pusher stays with nothing to do; a server archiving steadily calls more often.
IDLE_EXIT_SECONDS = 3.0
POLL_SECONDS = 0.01
# How long a wal-push waits for the pusher beyond the storage retry budget before it pushes the
# file itself (a pusher that is alive but stuck).
WAIT_MARGIN_SECONDS = 30.0


def push_dir(spool_dir: Path) -> Path:
    """The pusher's own directory in the spool."""
    return spool_dir / "push"


def ready_files(archive_status: Path) -> list[str]:
    """WAL names with a .ready file, in PostgreSQL's archiving order (histories first)."""
    try:
        entries = os.listdir(archive_status)
    except OSError:
        return []
    names = [e[: -len(".ready")] for e in entries if e.endswith(".ready")]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


def has_valid_marker(spool_dir: Path, path: Path, source: str) -> bool:
    """Whether the spool vouches that `path`, as it is on disk now, is stored."""
    marker = spool.read_marker(spool.marker_path(spool_dir, path.name))
    if marker is None:
        return False
    try:
        return marker.matches(source, os.stat(path))
    except OSError:
        return False


def cleanup(spool_dir: Path, archive_status: Path) -> None:
    """Drop markers and failure notes PostgreSQL has moved past (its .ready file is gone)."""
    for directory in (spool_dir / "pushed", push_dir(spool_dir) / "failed"):
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            stale_tmp = entry.startswith(".") and entry.endswith(".tmp")
            if stale_tmp or (not entry.startswith(".")
                             and not (archive_status / f"{entry}.ready").exists()):
                with contextlib.suppress(OSError):
                    os.unlink(directory / entry)


def wait_for_pusher(config: Config, wal_path: Path, spool_dir: Path, source: str) -> bool:
    """Start the pusher if needed and wait until it has stored `wal_path`.

    True when a marker vouches for the file; False when this call should push the file itself
    (the pusher failed on it, died, or took too long)."""
    pd = push_dir(spool_dir)
    pd.mkdir(parents=True, exist_ok=True)
    _want_source(pd, source)
    lock = pd / ".lock"
    if not background.is_locked(lock):
        background.spawn("walship.ops.push_ahead",
                         [str(wal_path.parent.resolve()), str(spool_dir.resolve()), source],
                         config, pd / ".log")
    failed = pd / "failed" / wal_path.name
    deadline = time.monotonic() + config.retry_budget + WAIT_MARGIN_SECONDS
    started = time.monotonic()
    while time.monotonic() < deadline:
        if has_valid_marker(spool_dir, wal_path, source):
            return True
        if failed.exists():
            with contextlib.suppress(OSError):
                failed.unlink()
            return False
        # Give a just-spawned pusher a moment to take its lock before reading a free lock as
        # "the pusher is gone".
        if time.monotonic() - started > 2.0 and not background.is_locked(lock):
            return has_valid_marker(spool_dir, wal_path, source)
        time.sleep(POLL_SECONDS)
    return False


def main(argv: list[str]) -> int:
    """The detached pusher process: `python -c ... WAL_DIR SPOOL SOURCE`."""
    from walship.ops.wal_push import WalPusher, describe

    wal_dir, spool_dir, source = Path(argv[0]), Path(argv[1]), argv[2]
    archive_status = wal_dir / "archive_status"
    pd = push_dir(spool_dir)
    try:
        with background.worker_session(pd / ".lock") as session:
            if session is None:
                return 0
            config = session.config
            pusher = WalPusher(config, session.storage, session.keyring, spool_dir)
            _forget_failures(pd / "failed")
            in_flight: dict[Future[tuple[PushResult, os.stat_result]], str] = {}
            idle_since = time.monotonic()
            with ThreadPoolExecutor(max_workers=config.concurrency,
                                    thread_name_prefix="walship-push") as pool:
                while True:
                    if _source_changed(pd, source):
                        _log.warning("the configuration of wal-push changed; this background "
                                     "pusher stops, the next wal-push starts one with the new "
                                     "configuration")
                        return 0
                    busy = set(in_flight.values())
                    todo = (n for n in ready_files(archive_status)
                            if n not in busy and not (pd / "failed" / n).exists()
                            and not has_valid_marker(spool_dir, wal_dir / n, source))
                    # Keep the pool fed, a few in hand, oldest first (the server waits for
                    # those). Lazily: each candidate costs a marker read, and a backlog of N
                    # ready files would otherwise be re-read in full after every push.
                    wanted = max(0, 2 * config.concurrency - len(in_flight))
                    for name in itertools.islice(todo, wanted):
                        in_flight[pool.submit(pusher.push, wal_dir / name)] = name
                    if not in_flight:
                        cleanup(spool_dir, archive_status)
                        if time.monotonic() - idle_since > IDLE_EXIT_SECONDS:
                            return 0
                        time.sleep(0.05)
                        continue
                    idle_since = time.monotonic()
                    done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        name = in_flight.pop(future)
                        _settle(future, name, source, spool_dir, pd, describe)
    except WalshipError as exc:
        _log.warning(f"background pusher stopped: {exc.message}")
        return 0


def _want_source(pd: Path, source: str) -> None:
    """Record the configuration PostgreSQL's calls use now (<push>/.source)."""
    wanted = pd / ".source"
    with contextlib.suppress(OSError):
        try:
            current = wanted.read_text()
        except FileNotFoundError:
            current = None
        if current != source:
            spool.write_atomic(wanted, source)


def _source_changed(pd: Path, source: str) -> bool:
    """Whether the calls now use another configuration than this pusher's. Its markers would
    never vouch for their files, and while it runs (it holds the lock) no pusher for the new
    configuration can start: found by tests/e2e/test_backlog.py, where a pusher started while
    archive_command pointed at a missing bucket outlived the operator's fix and the whole
    backlog of 506 segments went up one archive_command call at a time."""
    try:
        return (pd / ".source").read_text() != source
    except OSError:
        return False


def _forget_failures(failed: Path) -> None:
    """Start without the failure notes of earlier pushers. They were written while the store
    or the configuration was failing; honouring them after it recovered left a whole backlog
    to PostgreSQL's serial calls (tests/e2e/test_backlog.py: every one of 506 segments noted
    during an outage, then pushed one call at a time). A file that still fails gets a new note
    and its own call pushes it, as before."""
    failed.mkdir(exist_ok=True)
    for entry in os.listdir(failed):
        with contextlib.suppress(OSError):
            os.unlink(failed / entry)


def _settle(future: Future[tuple[PushResult, os.stat_result]], name: str, source: str,
            spool_dir: Path, pd: Path, describe: Callable[..., str]) -> None:
    try:
        result, st = future.result()
    except (WalshipError, OSError) as exc:
        message = exc.message if isinstance(exc, WalshipError) else str(exc)
        _log.warning(f"could not push {name} ahead: {message}")
        with contextlib.suppress(OSError):
            (pd / "failed" / name).write_text(message + "\n")
        return
    spool.write_marker(spool.marker_path(spool_dir, name),
                       spool.PushMarker.for_file(source, st, result.sha256))
    _log.info(describe(result, ahead=True))
