"""The exception hierarchy. Each class carries its exit code; cli.py is the only place that exits.

Messages follow PostgreSQL's style: a lowercase one-line fact, then an optional hint saying
what it likely means and what to do. The exit-code table is published in docs/exit-codes.md;
keep the two in step (tests/unit/test_errors.py checks that every code here is documented).
"""

from __future__ import annotations

# wal-fetch maps every failure class code C to WAL_FETCH_ABORT_BASE + C, so that the
# server sees a code above 125 and aborts recovery instead of treating the failure as
# "end of archive" and promoting on partial history.
WAL_FETCH_ABORT_BASE = 150

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
# Signals: the shell's conventional 128 + signal number. Both are above 125, so PostgreSQL
# never takes an interrupted restore_command for a missing file.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class WalshipError(Exception):
    """Base of every error walship reports to the user."""

    exit_code = 3
    label = "failure"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(WalshipError):
    """Bad arguments, bad configuration, unusable key files."""

    exit_code = EXIT_USAGE
    label = "usage or configuration error"


class ObjectNotFound(WalshipError):
    """The store confirmed that the object does not exist."""

    exit_code = 4
    label = "object not found"


class StorageError(WalshipError):
    """A storage failure that is neither transient nor a permission problem."""

    exit_code = 5
    label = "storage error"


class StorageUnavailable(StorageError):
    """The store was unreachable, or kept failing transiently until the retry budget ran out."""

    exit_code = 6
    label = "storage unavailable"


class TransientStorageError(StorageUnavailable):
    """One transient failure (throttling, 5xx, reset, timeout): the retry wrapper retries these."""


class AccessDenied(StorageError):
    """The credentials are not allowed to do this."""

    exit_code = 7
    label = "access denied"


class AlreadyExists(StorageError):
    """A create-if-absent put found the key taken. Services decide whether that is fine."""

    exit_code = 8
    label = "object already exists"


class IntegrityError(WalshipError):
    """Stored bytes failed authentication, a checksum, or a digest: corrupt or truncated."""

    exit_code = 9
    label = "integrity failure"


class KeyMismatch(WalshipError):
    """The object needs a key we do not have (wrong key, missing key, encrypted vs not)."""

    exit_code = 10
    label = "key error"


class OverwriteRefused(WalshipError):
    """An archived name would be overwritten with different bytes."""

    exit_code = 11
    label = "overwrite refused"


class ForeignArchive(WalshipError):
    """The store's prefix belongs to another cluster (system identifier or segment size differ)."""

    exit_code = 12
    label = "archive belongs to another cluster"


class PostgresError(WalshipError):
    """PostgreSQL refused, is unreachable, or is not configured as walship needs."""

    exit_code = 13
    label = "postgresql error"


class LockHeld(WalshipError):
    """Another walship process holds the lock this command needs."""

    exit_code = 14
    label = "locked"


class UnsafeOperation(WalshipError):
    """A plan failed its safety check (retention would break a kept backup's WAL chain)."""

    exit_code = 15
    label = "refused as unsafe"


class VerificationFailed(WalshipError):
    """verify or drill found something missing or broken."""

    exit_code = 16
    label = "verification failed"


class LocalIOError(WalshipError):
    """Reading or writing a local file failed (full disk, read-only directory, ...)."""

    exit_code = 17
    label = "local i/o error"


ALL_ERRORS: tuple[type[WalshipError], ...] = (
    WalshipError,
    UsageError,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    KeyMismatch,
    OverwriteRefused,
    ForeignArchive,
    PostgresError,
    LockHeld,
    UnsafeOperation,
    VerificationFailed,
    LocalIOError,
)
