"""backup-fetch DEST NAME|LATEST: restore a base backup and set up recovery.

Trust: the sentinel is plain JSON and only picks the backup; the manifest (encrypted and
authenticated like every other object) is the reference, and must agree with the sentinel.
Each partition's file list is checked against the SHA-256 the manifest holds for it, each
file against its size and SHA-256 (and, in backups that recorded one, each partition's whole
tar against its SHA-256: docs/backups.md, "Why no tar hash"). Whatever the
store hands over, nothing is written outside DEST and the tablespace directories, no link or
device is created from the archive, nothing is overwritten (tarstream.extract_partition).

Order: check DEST and the tablespace directories (empty or absent), download and verify every
partition (`concurrency` at a time; each file's writeback starts while it is written,
walship/diskio.py), write tablespace_map and the pg_tblspc links, flush the
filesystems (syncfs), then backup_label, then the recovery settings with their trigger
(recovery.signal; recovery.conf before PostgreSQL 12) last. Until the trigger exists the
directory cannot start: without backup_label PostgreSQL looks for pg_control's checkpoint in
the empty pg_wal, and with backup_label but no trigger it stops with "could not locate
required checkpoint record". So a restore killed at any moment never starts a server that
would replay from the wrong checkpoint, and a restore that finished is on disk before its
trigger is. On any failure, everything this run wrote is removed again (DEST was empty, so
that is only ever our own files).

Peak memory: concurrency x (the store's read buffer + one decode step of at most 4 MiB + a
64 KiB tar header buffer + 3 MiB of stored bytes read ahead (_ReadAhead) + at most 4 MiB
of file data queued for or held by the writer thread
(tarstream._Writer) + one partition's file list, about 300 bytes per file).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from walship import diskio, layout, log, pipeline, tarstream
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import IntegrityError, LocalIOError, ObjectNotFound, UsageError
from walship.ops.backup_list import BackupInfo, resolve_backup
from walship.ops.recovery import RecoveryTarget, quote, write_recovery_config
from walship.storage import open_storage
from walship.storage.base import Storage

_log = log.get("backup_fetch")

# Stored bytes downloaded ahead of the decoder, per partition (x tarstream.READ_SIZE).
_READ_AHEAD = 3

MANIFEST_FORMAT = 1
# Manifests and file lists are read whole; refuse absurd ones (a hostile store).
_MAX_METADATA_OBJECT = 1 << 30


@dataclass(frozen=True)
class TablespaceRestore:
    """Where one tablespace goes."""

    oid: int
    original: Path
    target: Path
    version_dir: str


@dataclass(frozen=True)
class Manifest:
    """The parts of the manifest that backup-fetch uses, validated."""

    info: BackupInfo
    backup_label: str
    tablespace_map: str
    tablespaces: tuple[tuple[int, Path, str], ...]  # oid, original location, version dir
    partitions: tuple[dict[str, Any], ...]


def _get(storage: Storage, key: str) -> BinaryIO:
    """An object the manifest (or the sentinel) says exists. Missing, it is a damaged backup,
    not an unknown one: the CLI exits 1 only for a backup that does not exist at all."""
    try:
        return storage.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"{key} is missing from the store: the backup is incomplete",
                             hint="objects were deleted from the store (by hand or a bucket "
                             "lifecycle rule); restore another backup") from None


def _read_object(storage: Storage, key: str) -> bytes:
    with _get(storage, key) as fh:
        data = fh.read(_MAX_METADATA_OBJECT + 1)
    if len(data) > _MAX_METADATA_OBJECT:
        raise IntegrityError(f"{key} is implausibly large")
    return bytes(data)


def _bad(name: str, what: str) -> IntegrityError:
    return IntegrityError(f"the manifest of backup {name} {what}",
                          hint="the backup is damaged or the store was tampered with; "
                          "restore another backup")


def read_manifest(storage: Storage, keyring: Keyring, info: BackupInfo) -> Manifest:
    """Fetch, decrypt and validate a backup's manifest against its sentinel."""
    name = info.name
    plain = pipeline.decode_bytes(_read_object(storage, layout.backup_manifest_key(name)),
                                  keyring)
    try:
        doc = json.loads(plain)
        assert isinstance(doc, dict)
    except (ValueError, AssertionError):
        raise _bad(name, "is not a JSON object") from None
    if doc.get("format") != MANIFEST_FORMAT:
        raise _bad(name, f"has format {doc.get('format')!r}; this walship reads "
                   f"{MANIFEST_FORMAT}")
    recorded = BackupInfo.from_json(doc.get("backup"), where=f"manifest of backup {name}")
    if not recorded.same_backup(info):
        raise _bad(name, "does not match its sentinel")
    try:
        label = doc["backup_label"]
        spcmap = doc.get("tablespace_map") or ""
        assert isinstance(label, str) and label and isinstance(spcmap, str)
        tablespaces = []
        for ts in doc.get("tablespaces", []):
            oid, location, version_dir = int(ts["oid"]), Path(ts["location"]), ts["version_dir"]
            assert location.is_absolute() and isinstance(version_dir, str)
            assert "/" not in version_dir
            tarstream.check_member_name(version_dir)
            tablespaces.append((oid, location, version_dir))
        partitions = tuple(doc["partitions"])
        oids = {t[0] for t in tablespaces}
        for index, part in enumerate(partitions):
            assert isinstance(part, dict) and part["index"] == index
            assert part["tablespace"] is None or part["tablespace"] in oids
            assert part.get("tar_sha256") is None or isinstance(part["tar_sha256"], str)
            assert isinstance(part["files_sha256"], str)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise _bad(name, "is malformed") from None
    if len(partitions) != info.partitions or tuple(sorted(oids)) != tuple(sorted(info.tablespaces)):
        raise _bad(name, "does not match its sentinel")
    return Manifest(info, label, spcmap, tuple(tablespaces), partitions)


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _check_empty_or_absent(path: Path, what: str) -> bool:
    """True if `path` exists (and is an empty directory); UsageError if it is anything else."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UsageError(f"cannot use {what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} exists and is not a directory")
    if not _is_empty_dir(path):
        raise UsageError(f"{what} {path} is not empty",
                         hint="backup-fetch restores only into an empty or absent directory; "
                         "move the old one aside first")
    return True


def _make_dir(path: Path, existed: bool) -> None:
    try:
        if existed:
            path.chmod(0o700)
        else:
            path.mkdir(mode=0o700, parents=True)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise LocalIOError(f"cannot create {path}: {exc.strerror}") from None


def _escape_map_path(path: str) -> str:
    # As PostgreSQL 13+ writes tablespace_map: backslash before \, newline and carriage return.
    return "".join("\\" + ch if ch in "\\\n\r" else ch for ch in path)


def rewrite_tablespace_map(text: str, targets: Mapping[int, Path]) -> str:
    """tablespace_map with the paths of remapped tablespaces replaced."""
    lines: list[str] = []
    current = ""
    escaped = False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == "\n":
            lines.append(current)
            current = ""
        else:
            current += ch
    if current:
        lines.append(current)
    out = []
    for line in lines:
        oid_text, sep, _path = line.partition(" ")
        if sep and oid_text.isdigit() and int(oid_text) in targets:
            out.append(f"{oid_text} {_escape_map_path(str(targets[int(oid_text)]))}")
        else:
            out.append(line)
    return "".join(f"{line}\n" for line in out)


class _ReadAhead(io.RawIOBase):
    """Reads `source` on a thread of its own, up to _READ_AHEAD chunks ahead of the reader.

    The download (waiting on the network, or the store's read and retries) then overlaps
    the decryption, decompression, hashing and writing of what came before, instead of
    alternating with them. A failure of the source is raised, as it was, by the read that
    reaches it. close() stops the thread; it does not close `source`.
    """

    def __init__(self, source: BinaryIO, chunk: int = tarstream.READ_SIZE,
                 depth: int = _READ_AHEAD) -> None:
        super().__init__()
        self._source = source
        self._chunk_size = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._chunk = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="walship-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk_size)
                if not self._put(data) or not data:
                    return
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all the rest if size < 0); b"" only at the end."""
        if size is None or size < 0:
            parts = []
            while data := self.read(tarstream.READ_SIZE):
                parts.append(data)
            return b"".join(parts)
        if size == 0:
            return b""
        if not self._chunk:
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            if len(item) <= size:
                return item
            self._chunk = memoryview(item)
        data = bytes(self._chunk[:size])
        self._chunk = self._chunk[size:]
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stop.set()
        super().close()


class _Restore:
    """One backup-fetch after the backup was chosen."""

    def __init__(self, config: Config, storage: Storage, keyring: Keyring,
                 manifest: Manifest, dest: Path, tablespaces: list[TablespaceRestore]) -> None:
        self.config = config
        self.storage = storage
        self.keyring = keyring
        self.manifest = manifest
        self.dest = dest
        self.tablespaces = {ts.oid: ts for ts in tablespaces}
        self.abort = threading.Event()

    def _restore_partition(self, part: dict[str, Any]) -> tuple[int, int]:
        name = self.manifest.info.name
        index = int(part["index"])
        where = f"backup {name} partition {index}"
        plain = pipeline.decode_bytes(
            _read_object(self.storage, layout.backup_partition_files_key(name, index)),
            self.keyring)
        if hashlib.sha256(plain).hexdigest() != part["files_sha256"]:
            raise IntegrityError(f"{where}: its file list does not match the manifest",
                                 hint="the backup is damaged or objects were swapped")
        try:
            doc = json.loads(plain)
            assert doc["backup"] == name and doc["partition"] == index
            assert doc["tablespace"] == part["tablespace"]
            records = [tarstream.FileRecord.from_json(r) for r in doc["files"]]
        except (ValueError, AssertionError, KeyError, TypeError):
            raise IntegrityError(f"{where}: its file list is malformed") from None
        expected = {r.path: r for r in records}
        oid = part["tablespace"]
        root = self.dest if oid is None else self.tablespaces[oid].target
        tar_sha = part.get("tar_sha256")  # older backups only: new ones store null
        with _get(self.storage, layout.backup_partition_key(name, index)) as raw, \
                _ReadAhead(raw) as ahead, \
                pipeline.decode(cast(BinaryIO, ahead), self.keyring,
                                digest=tar_sha is not None) as stream:
            seen = tarstream.extract_partition(cast(BinaryIO, stream), root, expected,
                                               where=where, abort=self.abort)
            while stream.read(tarstream.READ_SIZE):
                pass  # to the end, so that the last chunk is authenticated (and hashed)
            if tar_sha is not None and stream.plaintext_sha256 != tar_sha:
                raise IntegrityError(f"{where}: the tar stream does not match the manifest",
                                     hint="the backup is damaged or objects were swapped")
        assert seen == expected.keys()
        return sum(1 for r in records if not r.is_dir), sum(r.size for r in records)

    def download(self) -> tuple[int, int]:
        """Every partition, verified; returns (files, bytes)."""
        files = size = 0
        with ThreadPoolExecutor(max_workers=self.config.concurrency,
                                thread_name_prefix="restore") as pool:
            futures: list[Future[tuple[int, int]]] = [
                pool.submit(self._restore_partition, part) for part in self.manifest.partitions]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        raise error
                for future in futures:
                    n, b = future.result()
                    files += n
                    size += b
            except BaseException:
                self.abort.set()
                for future in futures:
                    future.cancel()
                raise
        return files, size

    def finish(self, restore_command: str, target: RecoveryTarget | None) -> Path:
        """pg_wal, tablespace links and map; a flush; backup_label; the recovery settings and
        their trigger last (see the module docstring for why this order)."""
        dest = self.dest
        for sub in ("pg_wal", "pg_wal/archive_status", "pg_tblspc"):
            path = dest / sub
            if not path.is_dir() or path.is_symlink():
                _make_dir(path, False)
        targets = {oid: ts.target for oid, ts in self.tablespaces.items()}
        for oid, target_dir in targets.items():
            link = dest / "pg_tblspc" / str(oid)
            try:
                link.symlink_to(target_dir)
            except FileExistsError:
                raise IntegrityError(
                    f"backup {self.manifest.info.name} holds pg_tblspc/{oid}, which must be the "
                    "link to a tablespace", hint="the backup is damaged or hostile") from None
        if self.manifest.tablespace_map:
            self._write(dest / "tablespace_map",
                        rewrite_tablespace_map(self.manifest.tablespace_map, targets))
        flushing = time.monotonic()
        for root in (dest, *targets.values()):
            diskio.sync_filesystem(root)
        _log.debug("flushed the restored files to disk in %.2fs", time.monotonic() - flushing)
        self._write(dest / "backup_label", self.manifest.backup_label)
        info = self.manifest.info
        settings = write_recovery_config(
            dest, restore_command, target, pg_version_num=info.pg_version_num,
            comment=f" {info.name}" + (f", target {target.describe()}" if target else ""))
        diskio.sync_filesystem(dest)
        return settings

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(text)
        except FileExistsError:
            raise IntegrityError(f"the backup holds {path.name}, which walship writes itself",
                                 hint="the backup is damaged or hostile") from None
        except OSError as exc:
            raise LocalIOError(f"cannot write {path}: {exc.strerror}") from None


def _plan_tablespaces(manifest: Manifest, remap: Mapping[int, Path], dest: Path
                      ) -> list[TablespaceRestore]:
    known = {oid for oid, _, _ in manifest.tablespaces}
    unknown = sorted(set(remap) - known)
    if unknown:
        listed = ", ".join(str(o) for o in sorted(known)) or "none"
        raise UsageError(f"backup {manifest.info.name} has no tablespace {unknown[0]}",
                         hint=f"its tablespaces are: {listed}")
    result = []
    seen: set[Path] = set()
    for oid, original, version_dir in manifest.tablespaces:
        target = Path(remap.get(oid, original)).absolute()
        if target in seen:
            raise UsageError(f"two tablespaces would be restored into {target}")
        seen.add(target)
        if target == dest or dest in target.parents or target in dest.parents:
            raise UsageError(f"tablespace {oid} would be restored into {target}, which overlaps "
                             f"the destination {dest}",
                             hint="give it another place with --tablespace OID=PATH")
        result.append(TablespaceRestore(oid, original, target, version_dir))
    return result


def _check_target(info: BackupInfo, target: RecoveryTarget | None) -> None:
    if target is None:
        return
    when = target.time
    if when is not None and info.stop_time >= when:
        raise UsageError(
            f"backup {info.name} finished at {info.stop_time.isoformat()}, not before the "
            f"target time {when.isoformat()}",
            hint="recovery can only stop after the backup's end; use an older backup or LATEST",
        )
    lsn = target.lsn
    if lsn is not None and info.stop_lsn > lsn:
        raise UsageError(
            f"backup {info.name} ends after the target LSN {target.value}",
            hint="recovery can only stop after the backup's end; use an older backup or LATEST",
        )


def _remove_contents(path: Path, remove_self: bool) -> None:
    """Undo a failed restore: only ever called on directories that were empty or absent."""
    try:
        if remove_self:
            shutil.rmtree(path)
            return
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                Path(entry.path).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("could not remove the incomplete restore in %s: %s", path, exc.strerror)


def backup_fetch(config: Config, dest: Path, name: str, *, target: RecoveryTarget | None = None,
                 tablespaces: Mapping[int, Path] | None = None, walship_command: str
                 ) -> BackupInfo:
    """Restore backup `name` (or LATEST) into `dest`, which must be empty or absent.

    `walship_command` is how PostgreSQL should run walship (with its configuration):
    restore_command becomes '<walship_command> wal-fetch %f %p'. With a time or LSN target,
    LATEST means the newest backup that ended before it. ObjectNotFound when no such backup
    exists; UsageError for a non-empty destination.
    """
    restore_command = f"{walship_command} wal-fetch %f %p"
    quote(restore_command)  # one line, or UsageError now rather than after the download
    dest = Path(dest).absolute()
    dest_existed = _check_empty_or_absent(dest, "destination")
    keyring = Keyring.from_config(config)
    storage = open_storage(config.require_store(), config)
    started = time.monotonic()
    try:
        info = resolve_backup(storage, name, target.time if target else None,
                              before_lsn=target.lsn if target else None)
        _check_target(info, target)
        manifest = read_manifest(storage, keyring, info)
        plans = _plan_tablespaces(manifest, tablespaces or {}, dest)
        existed = {ts.oid: _check_empty_or_absent(ts.target, f"tablespace {ts.oid} directory")
                   for ts in plans}
        _make_dir(dest, dest_existed)
        created: list[tuple[Path, bool]] = [(dest, dest_existed)]
        try:
            for ts in plans:
                _make_dir(ts.target, existed[ts.oid])
                created.append((ts.target, existed[ts.oid]))
            restore = _Restore(config, storage, keyring, manifest, dest, plans)
            downloading = time.monotonic()
            files, size = restore.download()
            _log.debug("downloaded and verified %d partitions in %.2fs",
                       len(manifest.partitions), time.monotonic() - downloading)
            settings = restore.finish(restore_command, target)
        except BaseException:
            for path, was_there in created:
                _remove_contents(path, remove_self=not was_there)
            raise
    finally:
        storage.close()
    if os.geteuid() == 0:
        _log.warning("restored as root: PostgreSQL will not start until the files belong to its "
                     "user (chown -R postgres: %s%s)", dest,
                     "".join(f" {ts.target}" for ts in plans))
    _log.info("restored backup %s into %s: %d files, %d bytes in %.1fs; recovery settings in %s",
              info.name, dest, files, size, time.monotonic() - started, settings.name)
    return info
