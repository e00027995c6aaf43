"""Store-wide locks: one backup-push (and later one delete) at a time per store, across hosts.

A lock is a small plain JSON object under layout.lock_key(name), created with create-if-absent
so that two takers cannot both win. It says who holds it (host, pid, command) and when the
holder last proved it was alive: a heartbeat thread rewrites it every HEARTBEAT seconds.
Plain JSON rather than encrypted, because a host with only the public key must read it.

A lock is stale, and may be broken, when
- its holder ran on this machine (same host name, boot id and pid namespace) and that pid
  is gone, or
- its heartbeat is older than `stale_after` (the holder's host died or lost the store).
Breaking is delete-then-create-if-absent. Two processes breaking the same stale lock at the
same instant could both end up believing they hold it (the store has no compare-and-delete);
the heartbeat notices the loss (the object no longer carries its token) and the holder's
`lost` flag makes backup-push fail rather than publish.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from walship import layout, log
from walship.errors import AlreadyExists, LockHeld, ObjectNotFound, WalshipError
from walship.storage.base import Storage

_log = log.get("lock")

# Seconds between heartbeats, and the default age after which a silent lock is stale. Fifteen
# heartbeats of margin absorbs clock skew between hosts and long store stalls.
HEARTBEAT = 60.0
STALE_AFTER = 900.0


def _machine_id() -> str:
    """Identifies this kernel and pid namespace, so that a pid check is meaningful."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
    except OSError:
        pass
    with contextlib.suppress(OSError):
        parts.append(str(Path("/proc/self/ns/pid").stat().st_ino))
    return ":".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock object."""

    name: str
    token: str
    command: str
    host: str
    machine: str
    pid: int
    acquired: datetime
    heartbeat: datetime

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"name": self.name, "token": self.token, "command": self.command,
                "host": self.host, "machine": self.machine, "pid": self.pid,
                "acquired": self.acquired.isoformat(), "heartbeat": self.heartbeat.isoformat()}

    @classmethod
    def from_json(cls, data: Any) -> LockInfo:
        """Parse; ValueError when malformed."""
        try:
            return cls(str(data["name"]), str(data["token"]), str(data["command"]),
                       str(data["host"]), str(data.get("machine", "")), int(data["pid"]),
                       datetime.fromisoformat(data["acquired"]),
                       datetime.fromisoformat(data["heartbeat"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed lock object: {exc}") from None

    def describe(self) -> str:
        """'backup-push (pid 123 on db1) since 2026-...'."""
        return (f"{self.command} (pid {self.pid} on {self.host}) since "
                f"{self.acquired.isoformat(timespec='seconds')}")

    def stale_reason(self, now: datetime, stale_after: float) -> str | None:
        """Why this lock may be broken, or None while its holder may be alive."""
        if self.machine and self.machine == _machine_id() and self.host == socket.gethostname() \
                and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        age = (now - self.heartbeat).total_seconds()
        if age > stale_after:
            return f"its last heartbeat was {age:.0f}s ago"
        return None


def read_lock(storage: Storage, name: str) -> LockInfo | None:
    """The lock object `name`, or None if it is free (a malformed one counts as held)."""
    try:
        with storage.get(layout.lock_key(name)) as fh:
            raw = fh.read(65536)
    except ObjectNotFound:
        return None
    try:
        return LockInfo.from_json(json.loads(raw))
    except ValueError:
        # Unparseable, so not written by a walship that is alive: stale at once.
        epoch = datetime.fromtimestamp(0, timezone.utc)
        return LockInfo(name, "", "unknown", "unknown", "", 0, epoch, epoch)


class StoreLock:
    """A held lock; use as a context manager (acquire on enter, release on exit)."""

    def __init__(self, storage: Storage, name: str, command: str, *,
                 stale_after: float = STALE_AFTER, heartbeat: float = HEARTBEAT) -> None:
        self.storage = storage
        self.name = name
        self.command = command
        self.stale_after = stale_after
        self.heartbeat_interval = heartbeat
        self.key = layout.lock_key(name)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._acquired = datetime.now(timezone.utc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> LockInfo:
        return LockInfo(self.name, self.token, self.command, socket.gethostname(), _machine_id(),
                        os.getpid(), self._acquired, datetime.now(timezone.utc))

    def _body(self) -> io.BytesIO:
        return io.BytesIO(json.dumps(self._info().to_json(), indent=2).encode() + b"\n")

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; LockHeld if someone alive holds it."""
        for _attempt in range(3):
            try:
                self.storage.put(self.key, self._body(), if_absent=True)
            except AlreadyExists:
                holder = read_lock(self.storage, self.name)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.token != self.token:
                    reason = holder.stale_reason(datetime.now(timezone.utc), self.stale_after)
                    if reason is None:
                        raise LockHeld(
                            f"the store is locked by {holder.describe()}",
                            hint="one backup-push or delete runs at a time per store; wait "
                            f"for it, or if it is dead, delete {self.key} in the store",
                        ) from None
                    _log.warning("breaking stale lock %s held by %s: %s", self.key,
                                 holder.describe(), reason)
                    self.storage.delete_many([self.key])
                    continue
                # Our own token: an earlier attempt of this put was stored and only its answer
                # was lost, so the retry found the name taken. The lock is ours.
            self._thread = threading.Thread(target=self._beat, name=f"lock-{self.name}",
                                            daemon=True)
            self._thread.start()
            return
        raise LockHeld(f"could not take the lock {self.key}: it keeps changing hands",
                       hint="another walship is starting at the same time; try again")

    def _still_mine(self) -> bool:
        holder = read_lock(self.storage, self.name)
        return holder is not None and holder.token == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                if not self._still_mine():
                    self.lost = True
                    _log.error("lost the lock %s: another process took it", self.key)
                    return
                self.storage.put(self.key, self._body())
            except WalshipError as exc:
                # A store hiccup: the next beat tries again, and the lock only goes stale
                # after many missed beats.
                _log.warning("could not refresh the lock %s: %s", self.key, exc.message)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self._still_mine():
                self.storage.delete_many([self.key])
        except WalshipError as exc:
            _log.warning("could not release the lock %s: %s (it goes stale by itself)",
                         self.key, exc.message)

    def check(self) -> None:
        """LockHeld if the lock was lost while held (call before publishing anything)."""
        if self.lost or not self._still_mine():
            self.lost = True
            raise LockHeld(f"lost the lock {self.key} while working",
                           hint="another process broke it as stale; run again")

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# The lock backup-push and delete take (one of them at a time per store); verify reads it to
# tell a backup being pushed from one whose push died.
BACKUP_LOCK = "backup"


def store_lock(storage: Storage, name: str, command: str, *,
               stale_after: float = STALE_AFTER, heartbeat: float = HEARTBEAT) -> StoreLock:
    """A lock on the whole store for `command`, e.g. store_lock(s, "backup", "backup-push")."""
    return StoreLock(storage, name, command, stale_after=stale_after, heartbeat=heartbeat)
