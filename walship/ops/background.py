"""Detached helper processes (the background pusher, the prefetcher): one per directory, held
by an flock, started with posix_spawn in their own session so that PostgreSQL's signals to
archive_command/restore_command do not reach them and nobody has to reap them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from walship import log
from walship.config import Config
from walship.errors import WalshipError

if TYPE_CHECKING:
    from walship.crypto import Keyring
    from walship.storage.base import Storage


def try_lock(path: Path) -> int | None:
    """Take the flock at `path` (creating the file); the fd to keep, or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_locked(path: Path) -> bool:
    """Whether some process holds the flock at `path` right now."""
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


LOG_ROTATE_BYTES = 1 << 20


def _rotate(log_path: Path) -> None:
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))


def spawn(module: str, args: list[str], config: Config, log_path: Path) -> None:
    """Start `module.main(args)` detached, configured like `config`, stderr to `log_path`."""
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    boot = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        f"from {module} import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    env.update(config.to_environ())
    devnull = os.open(os.devnull, os.O_RDWR)
    # Not the inherited stderr: whoever captures the command's output would wait for the
    # helper to exit. Appended to, so that the retries of an outage are still there to read
    # after the workers that met them have exited (each exits within seconds when idle);
    # kept small by one rotation to <log>.1 once it passes LOG_ROTATE_BYTES.
    _rotate(log_path)
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", boot, *args],
            env,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                          (os.POSIX_SPAWN_DUP2, logfd, 2)],
            setsid=True,
        )
    finally:
        os.close(devnull)
        os.close(logfd)


@dataclass(frozen=True)
class WorkerSession:
    """What a detached worker works with: its configuration, keys and store."""

    config: Config
    keyring: Keyring
    storage: Storage


@contextlib.contextmanager
def worker_session(lock_path: Path) -> Iterator[WorkerSession | None]:
    """Configuration from the environment spawn() prepared, the worker's flock, keys and the
    store, all released at the end. None when another worker holds the lock or the
    configuration is unusable: a detached worker has nobody to report to, and the command
    that needs the work done does it itself."""
    from walship.config import load
    from walship.crypto import Keyring
    from walship.storage import open_storage

    try:
        config = load()
        log.setup(config.log_level, timestamps=True)
        fd = try_lock(lock_path)
    except (OSError, WalshipError):
        yield None
        return
    if fd is None:
        yield None
        return
    try:
        keyring = Keyring.from_config(config)
        storage = open_storage(config.require_store(), config)
        try:
            yield WorkerSession(config, keyring, storage)
        finally:
            storage.close()
    finally:
        os.close(fd)
