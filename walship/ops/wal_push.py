"""wal-push: archive_command. Exit 0 only when the file is durably in the store and verified.

An archived name is never overwritten: the put is create-if-absent, and when the name is
taken the stored SHA-256 of the plaintext (object metadata: one request, never a download)
decides between an identical re-push (fine: PostgreSQL retries after crashes) and different
bytes (refused loudly). Other files waiting in archive_status/ are pushed ahead in parallel
and recorded in the spool, so PostgreSQL's later calls for them return at once.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from walship import layout, log, spool
from walship.config import Config
from walship.errors import (
    AlreadyExists,
    IntegrityError,
    LocalIOError,
    ObjectNotFound,
    OverwriteRefused,
    UsageError,
)
from walship.ops import push_ahead
from walship.ops.identity import check_identity
from walship.ops.prefetch import cleanup_after_recovery
from walship.wal import (
    LONG_HEADER_SIZE,
    WalKind,
    WalName,
    format_lsn,
    parse_segment_header,
    parse_timeline_history,
    parse_wal_name,
)

if TYPE_CHECKING:
    # Imported where a push happens: a call whose file the background pusher stored returns
    # before any of them, without paying for the pipeline, the crypto and the store.
    from walship.crypto import Keyring
    from walship.storage.base import Storage

_log = log.get("wal_push")

# Encoded objects are buffered so that a transient failure can retry the whole put. A 16 MiB
# segment compresses to a few MiB and stays in memory; anything larger spills to disk.
_SPOOL_IN_MEMORY = 64 * 1024 * 1024

# Metadata names on every archived WAL object (see docs/layout.md).
META_SHA256 = "sha256"
META_SIZE = "size"
# Segments and .partial files: the xact_time of the first and last commit record that begin
# in the file (absent without one), and that walship looked (so that verify can tell "no
# commit" from "pushed by a walship that did not record commit times").
META_FIRST_COMMIT = "first-commit"
META_LAST_COMMIT = "last-commit"
META_COMMIT_SCAN = "commit-scan"
COMMIT_SCAN_VERSION = "1"
# Timeline history files: the parent timeline and the switch point (the file's last line),
# so that verify can follow timelines with only the public key.
META_PARENT_TIMELINE = "parent-timeline"
META_SWITCH_LSN = "switch-lsn"
# History files are a few lines; read at most this much of one for its metadata.
_HISTORY_READ = 1 << 20


@dataclass(frozen=True)
class PushResult:
    """What happened to one file."""

    name: str
    identical: bool  # the store already had these exact bytes
    sha256: str
    plaintext_bytes: int
    stored_bytes: int
    seconds: float


def _open_wal(path: Path) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LocalIOError(f"WAL file {path} does not exist",
                           hint="archive_command must be 'walship wal-push %p'") from None
    except OSError as exc:
        raise LocalIOError(f"cannot open WAL file {path}: {exc.strerror}") from None
    return fd, os.fstat(fd)


class WalPusher:
    """Pushes WAL files to one store; shared by the requested push and the push-ahead."""

    def __init__(self, config: Config, storage: Storage, keyring: Keyring, spool_dir: Path):
        self.config = config
        self.storage = storage
        self.keyring = keyring
        self.spool_dir = spool_dir

    def push(self, path: Path) -> tuple[PushResult, os.stat_result]:
        """Push one file; returns the result and the stat of the bytes that were pushed."""
        from walship.pipeline import copy_stream, encode

        started = time.monotonic()
        name = parse_wal_name(path.name)
        fd, st = _open_wal(path)
        with os.fdopen(fd, "rb") as fh:
            extra: dict[str, str] = {}
            if name.kind in (WalKind.SEGMENT, WalKind.PARTIAL):
                self._check_segment(fh.read(LONG_HEADER_SIZE), name, st.st_size)
                extra = _commit_metadata(fh, st.st_size)
                fh.seek(0)
            elif name.kind is WalKind.TIMELINE_HISTORY:
                extra = _history_metadata(fh)
                fh.seek(0)
            with tempfile.SpooledTemporaryFile(_SPOOL_IN_MEMORY) as buf:
                try:
                    with encode(fh, self.config.compression, self.keyring) as enc:
                        copy_stream(enc, buf)  # type: ignore[arg-type]
                except OSError as exc:
                    raise LocalIOError(f"cannot read WAL file {path}: {exc.strerror}") from None
                sha256, plain = enc.plaintext_sha256, enc.plaintext_size
                stored = buf.tell()
                buf.seek(0)
                identical = self._store(name, buf, sha256, plain, extra)
        if not identical:
            self._verify(name, sha256, stored)
        return (
            PushResult(name.name, identical, sha256, plain, stored, time.monotonic() - started),
            st,
        )

    def _check_segment(self, head: bytes, name: WalName, size: int) -> None:
        try:
            header = parse_segment_header(head)
        except ValueError as exc:
            raise IntegrityError(f"{name} is not a WAL segment: {exc}") from None
        if name.kind is WalKind.SEGMENT and size != header.segment_size:
            raise IntegrityError(
                f"{name} is {size} bytes but its header says segments are "
                f"{header.segment_size} bytes"
            )
        expected = name.segno(header.segment_size) * header.segment_size
        if header.pageaddr != expected:
            raise IntegrityError(
                f"{name} holds WAL from another position (page address {header.pageaddr:X}, "
                f"expected {expected:X})",
                hint="the file's content does not match its name",
            )
        check_identity(self.storage, header, self.spool_dir, name.name)

    def _store(self, name: WalName, buf: object, sha256: str, plain: int,
               extra: dict[str, str]) -> bool:
        """Create the object; True if an identical one was there already."""
        key = layout.wal_key(name.name)
        metadata = {META_SHA256: sha256, META_SIZE: str(plain), **extra}
        # Where the store cannot refuse an overwrite itself, look first. A race between two
        # writers remains possible there; the digest check after the put reports it.
        if not self.storage.capabilities.create_if_absent and self._existing_is_identical(
            name, key, sha256, missing_ok=True
        ):
            return True
        try:
            self.storage.put(key, buf, metadata=metadata, if_absent=True)  # type: ignore[arg-type]
        except AlreadyExists:
            return self._existing_is_identical(name, key, sha256, missing_ok=False)
        return False

    def _existing_is_identical(self, name: WalName, key: str, sha256: str,
                               *, missing_ok: bool) -> bool:
        try:
            info = self.storage.stat(key)
        except ObjectNotFound:
            if missing_ok:
                return False
            raise
        stored = info.metadata.get(META_SHA256)
        if stored == sha256:
            return True
        raise OverwriteRefused(
            f"{name} is already archived with different contents"
            + ("" if stored else " (the stored object has no walship digest)"),
            hint="two clusters may be archiving to one store, or this cluster was restored "
            "without a new timeline; the archived file was left as it was",
        )

    def _verify(self, name: WalName, sha256: str, stored: int) -> None:
        info = self.storage.stat(layout.wal_key(name.name))
        if info.size != stored or info.metadata.get(META_SHA256) != sha256:
            raise IntegrityError(
                f"{name} reads back as {info.size} bytes with digest "
                f"{info.metadata.get(META_SHA256)!r} after writing {stored} bytes "
                f"with digest {sha256}"
            )


def _commit_metadata(fh: BinaryIO, size: int) -> dict[str, str]:
    """first-commit/last-commit of a segment or .partial file (docs/layout.md).

    Read through an mmap: the file is in the page cache (PostgreSQL just wrote it) and
    walrecords reads only the pages it needs: a median 0.02 ms per busy pgbench segment, one
    forward walk (5-15 ms) for a segment without a commit (benchmarks/walrecords.py).
    """
    # Here, not at the top: a wal-push that the background pusher already served never
    # scans a segment and should not pay for these imports.
    import mmap

    from walship import walrecords

    metadata = {META_COMMIT_SCAN: COMMIT_SCAN_VERSION}
    if size <= 0:
        return metadata
    try:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            times = walrecords.commit_times(buf)
    except (OSError, ValueError) as exc:
        # A report, not a guarantee: the push goes on without it (verify says "unknown").
        _log.debug("cannot read commit times: %s", exc)
        return {}
    if times is not None:
        metadata[META_FIRST_COMMIT] = walrecords.format_time(times.first_time)
        metadata[META_LAST_COMMIT] = walrecords.format_time(times.last_time)
    return metadata


def _history_metadata(fh: BinaryIO) -> dict[str, str]:
    """parent-timeline/switch-lsn of a timeline history file, from its last entry."""
    try:
        switches = parse_timeline_history(fh.read(_HISTORY_READ).decode("utf-8", "replace"))
    except (OSError, ValueError) as exc:
        _log.debug("cannot parse the timeline history: %s", exc)
        return {}
    if not switches:
        return {}
    last = switches[-1]
    return {META_PARENT_TIMELINE: str(last.parent), META_SWITCH_LSN: format_lsn(last.switch_lsn)}


def wal_push(config: Config, wal_path: Path, *,
             source: str | None = None) -> PushResult | None:
    """Archive one WAL file (archive_command). Other ready files are pushed by the background
    pusher; `source` is walship.fastpath.config_source() when configured from the environment.
    Returns what this call pushed, or None when the background pusher had stored the file."""
    try:
        parse_wal_name(wal_path.name)
    except ValueError:
        raise UsageError(f"{wal_path.name!r} is not a WAL file name",
                         hint="archive_command must be 'walship wal-push %p'") from None
    key = spool.source_key(config, source)
    wal_dir = wal_path.parent
    spool_dir = spool.spool_dir(config, wal_dir)
    archive_status = wal_dir / "archive_status"
    if (
        config.push_ahead > 0
        and archive_status.is_dir()
        and wal_path.exists()
        and (push_ahead.has_valid_marker(spool_dir, wal_path, key)
             or push_ahead.wait_for_pusher(config, wal_path, spool_dir, key))
    ):
        return None
    from walship.crypto import Keyring
    from walship.storage import open_storage

    keyring = Keyring.from_config(config)
    storage = open_storage(config.require_store(), config)
    try:
        result, _ = WalPusher(config, storage, keyring, spool_dir).push(wal_path)
    finally:
        storage.close()
    _log.info(describe(result))
    push_ahead.cleanup(spool_dir, archive_status)
    cleanup_after_recovery(wal_dir.parent, spool_dir)
    return result


def describe(result: PushResult, *, ahead: bool = False) -> str:
    """One log line for a push."""
    what = "pushed ahead" if ahead else "pushed"
    if result.identical:
        return f"{result.name} was already archived with identical contents"
    return (
        f"{what} {result.name} ({result.plaintext_bytes} -> {result.stored_bytes} bytes, "
        f"{result.seconds * 1000:.0f} ms)"
    )
