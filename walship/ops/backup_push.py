"""backup-push PGDATA: an online, non-exclusive base backup streamed into the store.

Order of work (docs/backups.md has the object layout and the reasons):

1. connect; refuse a standby, a server that does not archive through a working
   archive_command, a PGDATA that is not that server's, a store that archives another cluster;
2. take the store's "backup" lock (one backup-push or delete at a time);
3. pg_backup_start in a session held open for the copy;
4. walk PGDATA and each tablespace into tar partitions; each partition streams through
   pipeline.encode into storage.put, `concurrency` partitions at a time; after each, its
   file list (the manifest's section for that partition) is stored;
5. pg_backup_stop: its backup_label and tablespace_map go into the manifest, stored next;
6. wait until the store holds every WAL segment from the start to the stop segment and the
   .backup history file (bounded; a backup without its WAL cannot be restored);
7. the sentinel, last: from then on the backup is listed and usable.

Any failure before 7 deletes what this run wrote (best effort; an orphan is never listed).

Peak memory: concurrency x (one 1 MiB file read + the encode stream's buffers of about
2-3 MiB + one partition's entries and file list, about 300 bytes per file) + the store's
upload budget (S3: s3_part_size x concurrency, shared by all uploads). It does not grow with
the database's size (docs/backups.md, "Memory": 116 MiB at pgbench scale 50, 124 at 200).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

import walship
from walship import layout, log, pipeline, postgres, spool, tarstream, wal
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import AlreadyExists, ObjectNotFound, PostgresError, WalshipError
from walship.ops.backup_list import BackupInfo, format_size, sentinel_bytes
from walship.ops.identity import ArchiveIdentity, ensure_same_cluster, read_identity
from walship.ops.locks import BACKUP_LOCK, StoreLock, store_lock
from walship.ops.wal_push import WalPusher
from walship.storage import open_storage
from walship.storage.base import Storage

_log = log.get("backup_push")

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class PartitionResult:
    """What one partition put into the store."""

    index: int
    tablespace: int | None
    tar_bytes: int
    stored_bytes: int
    files_sha256: str
    files_stored_bytes: int
    files: int
    dirs: int
    data_bytes: int
    first: str
    last: str

    def to_json(self) -> dict[str, Any]:
        """The manifest's description of the partition."""
        return {"index": self.index, "tablespace": self.tablespace, "tar_bytes": self.tar_bytes,
                "tar_sha256": None, "stored_bytes": self.stored_bytes,
                "files_sha256": self.files_sha256, "files_stored_bytes": self.files_stored_bytes,
                "files": self.files, "dirs": self.dirs, "data_bytes": self.data_bytes,
                "first": self.first, "last": self.last}


@dataclass(frozen=True)
class Tablespace:
    """A tablespace as found in pg_tblspc."""

    oid: int
    location: Path


def find_tablespaces(pgdata: Path) -> list[Tablespace]:
    """The pg_tblspc/<oid> symbolic links and where they point."""
    result = []
    directory = pgdata / "pg_tblspc"
    try:
        paths = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in paths:
        name = path.name
        if not name.isdigit() or not path.is_symlink():
            continue  # in-place tablespaces (plain directories) are copied with PGDATA
        target = path.readlink()
        if not target.is_absolute():
            target = Path(os.path.normpath(directory / target))
        result.append(Tablespace(int(name), target))
    return result


class _Progress:
    """The TTY progress line: bytes read, estimated total, rate, partitions stored."""

    def __init__(self, enabled: bool, total: int | None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.bytes = 0
        self.partitions = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def partition_done(self) -> None:
        with self.lock:
            self.partitions += 1

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = format_size(self.bytes)
        if self.total:
            pct = min(99, int(100 * self.bytes / self.total))
            done += f" of ~{format_size(self.total)} ({pct}%)"
        return (f"walship: backup-push: {done}, {format_size(self.bytes / elapsed)}/s, "
                f"{self.partitions} partition{'s' if self.partitions != 1 else ''} stored")

    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.stream.write("\r\x1b[K" + self._line())
            self.stream.flush()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.stream.write("\r\x1b[K" + self._line() + "\n")
        self.stream.flush()


def _check_identity(storage: Storage, info: postgres.ServerInfo) -> bool:
    """Refuse a store that archives another cluster; True if it archives this one."""
    identity = read_identity(storage)
    if identity is None:
        return False  # nothing archived yet: the first wal-push claims the store
    sysid = info.system_identifier
    mine = ArchiveIdentity(identity.system_identifier if sysid is None else sysid,
                           info.wal_segment_size)
    ensure_same_cluster(identity, mine, "this server", storage.url)
    return True


_LABEL_START_RE = re.compile(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", re.M)
_LABEL_TLI_RE = re.compile(r"^START TIMELINE: (\d+)", re.M)


def _check_label(label: str, start: postgres.BackupStart) -> None:
    """backup_label must describe the backup we started (a sanity check on the session)."""
    lsn = _LABEL_START_RE.search(label)
    tli = _LABEL_TLI_RE.search(label)
    if lsn is None or wal.parse_lsn(lsn.group(1)) != start.lsn or \
            (tli is not None and int(tli.group(1)) != start.timeline):
        raise PostgresError(
            "pg_backup_stop returned a backup_label for a different backup",
            hint="this should not happen; report it with the server log",
        )


class _BackupRun:
    """One backup-push after the checks: the copy, the manifest, the wait, the sentinel."""

    def __init__(self, config: Config, storage: Storage, keyring: Keyring,
                 session: postgres.Session, server: postgres.ServerInfo, pgdata: Path,
                 lock: StoreLock, progress: _Progress, ship_wal: bool) -> None:
        self.config = config
        self.storage = storage
        self.keyring = keyring
        self.session = session
        self.server = server
        self.pgdata = pgdata
        self.lock = lock
        self.progress = progress
        self.ship_wal = ship_wal
        self.abort = threading.Event()

    # -- the copy --------------------------------------------------------------------------

    def _excluded(self) -> list[str]:
        spool = self.config.spool_dir
        if spool is None:
            return []  # the default spool is pg_wal/walship: pg_wal's contents are omitted
        try:
            rel = Path(os.path.realpath(spool)).relative_to(os.path.realpath(self.pgdata))
        except ValueError:
            return []
        return [rel.as_posix()]

    def _plans(self, tablespaces: list[Tablespace]) -> Iterator[tarstream.PartitionPlan]:
        indices = itertools.count()
        size = self.config.partition_size
        yield from tarstream.plan_partitions(
            tarstream.walk_pgdata(self.pgdata, exclude=self._excluded(), warn=_log.warning),
            root=self.pgdata, tablespace=None, partition_size=size, indices=indices)
        for ts in tablespaces:
            yield from tarstream.plan_partitions(
                tarstream.walk_tablespace(ts.location, self.server.tablespace_version_dir,
                                          warn=_log.warning),
                root=ts.location, tablespace=ts.oid, partition_size=size, indices=indices)

    def _push_partition(self, name: str, plan: tarstream.PartitionPlan) -> PartitionResult:
        started = time.monotonic()
        reader = tarstream.TarPartitionReader(plan.root, plan.entries, abort=self.abort,
                                              on_bytes=self.progress.add, warn=_log.warning)
        compression = self.config.compression
        # No digest of the whole tar: every data byte is covered by its file's SHA-256 and
        # every member's name, type and size by the file list (docs/backups.md, "Why no tar
        # hash"); a second pass of SHA-256 was the slowest stage of a large partition.
        with pipeline.encode(cast(BinaryIO, reader), compression, self.keyring,
                             digest=False) as stream:
            self.storage.put(layout.backup_partition_key(name, plan.index),
                             cast(BinaryIO, stream))
            tar_bytes, stored = stream.plaintext_size, stream.stored_size
        files_doc = {
            "format": MANIFEST_FORMAT, "backup": name, "partition": plan.index,
            "tablespace": plan.tablespace, "tar_sha256": None,
            "files": [record.to_json() for record in reader.records],
        }
        files_plain = json.dumps(files_doc, separators=(",", ":")).encode()
        files_blob = pipeline.encode_bytes(files_plain, compression, self.keyring)
        self.storage.put(layout.backup_partition_files_key(name, plan.index),
                         io.BytesIO(files_blob))
        stats = reader.stats
        where = f"tablespace {plan.tablespace}" if plan.tablespace is not None else "pgdata"
        paths = [r.path for r in reader.records]
        first, last = (paths[0], paths[-1]) if paths else ("", "")
        self.progress.partition_done()
        level = 10 if self.progress.enabled else 20  # debug under a progress line, else info
        _log.log(level, "partition %d (%s, %s .. %s): %d file%s, %s read, %s stored in %.1fs",
                 plan.index, where, first, last, stats.files, "" if stats.files == 1 else "s",
                 format_size(tar_bytes), format_size(stored),
                 time.monotonic() - started)
        if stats.shrunk or stats.vanished:
            _log.debug("partition %d: %d files shrank (zero-padded), %d vanished (skipped): "
                       "WAL replay repairs both", plan.index, len(stats.shrunk),
                       len(stats.vanished))
        return PartitionResult(
            index=plan.index, tablespace=plan.tablespace, tar_bytes=tar_bytes,
            stored_bytes=stored,
            files_sha256=_sha256(files_plain), files_stored_bytes=len(files_blob),
            files=stats.files, dirs=stats.dirs, data_bytes=stats.data_bytes,
            first=first, last=last)

    def _copy(self, name: str, tablespaces: list[Tablespace]) -> list[PartitionResult]:
        """Every partition, `concurrency` at a time; the walk runs ahead by at most that many."""
        limit = self.config.concurrency
        results: list[PartitionResult] = []
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="partition") as pool:
            pending: set[Future[PartitionResult]] = set()
            try:
                for plan in self._plans(tablespaces):
                    while len(pending) >= limit:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        results.extend(f.result() for f in done)
                    pending.add(pool.submit(self._push_partition, name, plan))
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    results.extend(f.result() for f in done)
            except BaseException:
                # Stop the other partitions at their next read; the pool's exit waits for them.
                self.abort.set()
                for future in pending:
                    future.cancel()
                raise
        return sorted(results, key=lambda r: r.index)

    def _exists(self, key: str) -> bool:
        try:
            self.storage.stat(key)
        except ObjectNotFound:
            return False
        return True

    # -- the WAL wait ----------------------------------------------------------------------

    def _missing_wal(self, needed: list[str]) -> list[str]:
        """Which of `needed` are not in the store: one listing per 4 GiB of WAL (log id)."""
        present: set[str] = set()
        for prefix in sorted({layout.wal_key(n)[: len(layout.WAL_PREFIX) + 16] for n in needed}):
            for obj in self.storage.list(prefix):
                present.add(obj.key[len(layout.WAL_PREFIX):])
        return [n for n in needed if n not in present]

    def _ship_ready_wal(self, missing: list[str]) -> list[str]:
        """Push the missing WAL files that the archiver has not taken yet, as wal-push would;
        returns those still missing.

        Only files whose archive_status/<name>.ready exists: PostgreSQL creates it once the
        file is complete and flushed (the stop segment's at pg_backup_stop's segment switch).
        The archiver's own wal-push of the same file then finds identical contents and
        succeeds. Without this the backup waited for one or two archive_command runs (a new
        walship process each: 0.25-0.6 s to S3 on the benchmark machine). Best effort: on any
        failure the wait below still decides.
        """
        wal_dir = self.pgdata / "pg_wal"
        ready = [n for n in missing if (wal_dir / "archive_status" / f"{n}.ready").exists()]
        if not ready:
            return missing
        pusher = WalPusher(self.config, self.storage, self.keyring,
                           spool.spool_dir(self.config, wal_dir))

        def push(name: str) -> bool:
            try:
                result, _ = pusher.push(wal_dir / name)  # verified in the store on return
            except WalshipError as exc:
                _log.debug("could not push %s ahead of the archiver: %s", name, exc.message)
                return False
            _log.debug("pushed %s ahead of the archiver%s", name,
                       " (it was there already)" if result.identical else "")
            return True

        with ThreadPoolExecutor(max_workers=min(len(ready), self.config.concurrency),
                                thread_name_prefix="wal") as pool:
            stored = {name for name, ok in zip(ready, pool.map(push, ready), strict=True) if ok}
        return [n for n in missing if n not in stored]

    def _wait_for_wal(self, info: BackupInfo) -> None:
        size = info.wal_segment_size
        first = info.start_lsn // size
        last = max(info.stop_lsn - 1, info.start_lsn) // size
        needed = [wal.segment_from_segno(info.timeline, segno, size).name
                  for segno in range(first, last + 1)]
        needed.append(info.history_file)
        timeout = self.config.archive_timeout
        deadline = time.monotonic() + timeout
        needed = self._missing_wal(needed)
        if needed and self.ship_wal:
            needed = self._ship_ready_wal(needed)
        delay = 0.2
        if needed:
            _log.debug("waiting for %d WAL files to be archived", len(needed))
        while needed and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)
            needed = self._missing_wal(needed)
        if not needed:
            return
        hint = ("archive_command must push to the same store as backup-push "
                f"({self.storage.url}); check it and the server log")
        try:
            status = self.session.archiver_status()
            if status.failing:
                hint = (f"archiving is failing: {status.last_failed_wal} failed at "
                        f"{status.last_failed_time}; see the server log")
        except WalshipError:
            pass
        raise PostgresError(
            f"the WAL this backup needs was not archived within {timeout:.0f}s: "
            f"{', '.join(needed[:3])}{' ...' if len(needed) > 3 else ''} missing from the store",
            hint=hint,
        )

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> BackupInfo:
        server = self.server
        label = f"walship {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        start = self.session.backup_start(label, self.config.fast_checkpoint,
                                          server.version_num)
        name = wal.backup_name(start.timeline, start.lsn, server.wal_segment_size)
        _log.info("backup %s started at %s on timeline %d", name, wal.format_lsn(start.lsn),
                  start.timeline)
        try:
            return self._finish(name, label, start)
        except BaseException:
            self.abort.set()
            self._cleanup(name)
            raise

    def _finish(self, name: str, label: str, start: postgres.BackupStart) -> BackupInfo:
        server = self.server
        tablespaces = find_tablespaces(self.pgdata)
        self.progress.start()
        try:
            results = self._copy(name, tablespaces)
        finally:
            self.progress.stop()
        stop = self.session.backup_stop(server.version_num)
        _check_label(stop.backup_label, start)
        info = BackupInfo(
            name=name, start_lsn=start.lsn, stop_lsn=stop.lsn, timeline=start.timeline,
            start_time=start.time, stop_time=stop.time, pg_version=server.version,
            pg_version_num=server.version_num,
            system_identifier=server.system_identifier
            or postgres.read_control_system_identifier(self.pgdata),
            wal_segment_size=server.wal_segment_size, label=label,
            data_bytes=sum(r.data_bytes for r in results),
            stored_bytes=sum(r.stored_bytes + r.files_stored_bytes for r in results),
            partitions=len(results), files=sum(r.files for r in results),
            compression=self.config.compression, encrypted=self.keyring.encrypts,
            tablespaces=tuple(ts.oid for ts in tablespaces),
            walship_version=walship.__version__,
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "backup": info.to_json(),
            "backup_label": stop.backup_label,
            "tablespace_map": stop.tablespace_map,
            "tablespaces": [
                {"oid": ts.oid, "location": str(ts.location),
                 "version_dir": server.tablespace_version_dir}
                for ts in tablespaces
            ],
            "partitions": [r.to_json() for r in results],
        }
        blob = pipeline.encode_bytes(json.dumps(manifest, indent=1).encode(),
                                     self.config.compression, self.keyring)
        self.storage.put(layout.backup_manifest_key(name), io.BytesIO(blob))
        info = info.replace(stored_bytes=info.stored_bytes + len(blob))
        self._wait_for_wal(info)
        self.lock.check()
        self._publish(name, sentinel_bytes(info))
        _log.info("backup %s complete: %s in %d files, %s stored, %d partitions", name,
                  format_size(info.data_bytes), info.files, format_size(info.stored_bytes),
                  info.partitions)
        return info

    def _publish(self, name: str, sentinel: bytes) -> None:
        """Write the sentinel, create-if-absent. When the name is taken by these very bytes, an
        earlier attempt of this put was stored and only its answer was lost (a timeout or reset
        after the store applied it, then a retry): the backup is complete. Found by
        tests/e2e/test_faults.py, where backup-push exited 8 ("already exists") for a backup
        that was complete and listed."""
        key = layout.sentinel_key(name)
        try:
            self.storage.put(key, io.BytesIO(sentinel), if_absent=True)
        except AlreadyExists:
            with self.storage.get(key) as fh:
                stored = fh.read(len(sentinel) + 1)
            if stored != sentinel:
                raise
            _log.debug("the sentinel of %s was stored by an earlier attempt", name)

    def _cleanup(self, name: str) -> None:
        """Delete what this run stored (best effort: an unfinished backup is never listed)."""
        try:
            if self._exists(layout.sentinel_key(name)):
                return  # a complete backup of that name is not ours to delete
            keys = [obj.key for obj in self.storage.list(layout.backup_prefix(name))]
            if keys:
                self.storage.delete_many(keys)
        except WalshipError as exc:
            _log.warning("could not delete the unfinished backup %s: %s", name, exc.message)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup_push(config: Config, pgdata: Path, *, progress: bool = False) -> BackupInfo:
    """Take an online base backup of the server whose data directory is `pgdata`.

    Connects with `config.dsn` or the libpq environment. Returns the complete backup's
    description once it is in the store together with all the WAL it needs. Prints only the
    progress line (with progress=True); logs one line per partition otherwise.
    """
    pgdata = Path(pgdata).absolute()
    keyring = Keyring.from_config(config)
    storage = open_storage(config.require_store(), config)
    try:
        with postgres.Session.connect(config.dsn) as session:
            server = session.server_info()
            postgres.check_archiving(server, session.archiver_status())
            postgres.check_pgdata(pgdata, server)
            # Shipping WAL ahead of the archiver only into a store this cluster already
            # archives to: a first backup into a store the archiver does not feed must still
            # fail ("not archived within ...") rather than succeed once and leave no WAL after.
            ship_wal = _check_identity(storage, server)
            with store_lock(storage, BACKUP_LOCK, "backup-push") as lock:
                meter = _Progress(progress, session.database_bytes() if progress else None)
                run = _BackupRun(config, storage, keyring, session, server, pgdata, lock,
                                 meter, ship_wal)
                return run.run()
    finally:
        storage.close()
