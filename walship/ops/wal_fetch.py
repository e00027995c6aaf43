"""wal-fetch: restore_command. The file at %p appears complete and authenticated, or not at all.

Exit-code policy lives in cli.py; this module raises: ObjectNotFound when the store confirms
absence (PostgreSQL asks for files past the end of the archive; that is normal), and the
integrity, key and storage errors otherwise, which make the server abort recovery instead of
promoting on partial history.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from walship import layout, log, spool
from walship.config import Config
from walship.errors import IntegrityError, LocalIOError, UsageError
from walship.ops import prefetch
from walship.wal import LONG_HEADER_SIZE, WalKind, WalName, parse_segment_header, parse_wal_name

if TYPE_CHECKING:
    from walship.crypto import Keyring
    from walship.storage.base import Storage
_log = log.get("wal_fetch")


@dataclass(frozen=True)
class FetchResult:
    """What wal-fetch delivered."""

    name: str
    prefetched: bool
    plaintext_bytes: int
    seconds: float


def check_segment_content(path: Path, name: WalName) -> int:
    """Check that the segment at `path` is the one `name` says; returns its segment size."""
    with open(path, "rb") as fh:
        head = fh.read(LONG_HEADER_SIZE)
        size = os.fstat(fh.fileno()).st_size
    try:
        header = parse_segment_header(head)
    except ValueError as exc:
        raise IntegrityError(f"{name} does not start with a WAL segment header: {exc}") from None
    expected = name.segno(header.segment_size) * header.segment_size
    if header.pageaddr != expected:
        # An authentic object stored under the wrong name: encryption proves who wrote the
        # bytes, not which key they were written under.
        raise IntegrityError(
            f"the object stored as {name} holds WAL from another position "
            f"(page address {header.pageaddr:X}, expected {expected:X})",
            hint="the store's objects were renamed or mixed up; do not promote on this archive",
        )
    if name.kind is WalKind.SEGMENT and size != header.segment_size:
        raise IntegrityError(f"{name} is {size} bytes, not {header.segment_size}")
    return header.segment_size


def download_wal(storage: Storage, keyring: Keyring, name: WalName, dest: Path, *,
                 durable: bool = True) -> int:
    """Fetch, authenticate and atomically place one WAL file at `dest`; returns its size.
    durable=False skips the fsyncs: for the prefetch spool, whose files are only trusted
    within the boot that wrote them (see prefetch.py)."""
    # Imported here: a fetch served from the prefetch spool needs neither.
    from walship.pipeline import copy_stream, decode

    key = layout.wal_key(name.name)
    # One request on S3 (GetObject answers with the metadata); ObjectNotFound here is the
    # normal end of the archive.
    info, src = storage.get_with_info(key)
    tmp = dest.parent / f".walship-{name.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        try:
            out = open(tmp, "xb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            src.close()
            raise LocalIOError(f"cannot create {tmp}: {exc.strerror}") from None
        with out, src, decode(src, keyring) as dec:
            try:
                copy_stream(dec, out)
                out.flush()
                if durable:
                    os.fsync(out.fileno())
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO):
                    raise LocalIOError(f"cannot write {dest}: {exc.strerror}") from None
                raise
        want_sha = info.metadata.get("sha256")
        if want_sha is not None and dec.plaintext_sha256 != want_sha:
            raise IntegrityError(f"{name} does not match its stored digest",
                                 hint="the object was replaced or damaged in the store")
        want_size = info.metadata.get("size")
        if want_size is not None and str(dec.plaintext_size) != want_size:
            raise IntegrityError(f"{name} is {dec.plaintext_size} bytes, expected {want_size}")
        if name.kind in (WalKind.SEGMENT, WalKind.PARTIAL):
            check_segment_content(tmp, name)
        os.replace(tmp, dest)
        if durable:
            spool.fsync_dir(dest.parent)
        return dec.plaintext_size
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def wal_fetch(config: Config, name: str, dest: Path, *, datadir: Path,
              source: str | None = None) -> FetchResult:
    """Deliver WAL file `name` to `dest` (restore_command), from the prefetch spool if there.
    `source` is walship.fastpath.config_source() when configured from the environment alone."""
    started = time.monotonic()
    try:
        wal = parse_wal_name(name)
    except ValueError:
        raise UsageError(f"{name!r} is not a WAL file name",
                         hint="restore_command must be 'walship wal-fetch %f %p'") from None
    store = config.require_store()
    key = spool.source_key(config, source)
    spool_dir = spool.spool_dir(config, dest.parent)
    if wal.kind is WalKind.SEGMENT and config.prefetch > 0:
        size = prefetch.take(spool_dir, key, wal, dest)
        if size is not None:
            prefetch.request(config, datadir, spool_dir, wal, size, key)
            _log.debug(f"delivered {name} from the prefetch spool")
            return FetchResult(name, True, size, time.monotonic() - started)
    from walship.crypto import Keyring
    from walship.storage import open_storage

    keyring = Keyring.from_config(config)

    storage = open_storage(store, config)
    try:
        size = download_wal(storage, keyring, wal, dest)
    finally:
        storage.close()
    if wal.kind is WalKind.SEGMENT and config.prefetch > 0:
        prefetch.request(config, datadir, spool_dir, wal, size, key)
    _log.info(f"fetched {name} ({size} bytes, {(time.monotonic() - started) * 1000:.0f} ms)")
    return FetchResult(name, False, size, time.monotonic() - started)
