"""Streaming tar of a data directory: what a base backup omits, partitions, and safe extraction.

Push side. `walk_pgdata` and `walk_tablespace` yield the entries to back up, lazily and in a
stable order (pre-order, names sorted), leaving out what PostgreSQL's own base backup leaves
out (basebackup.c: excludeDirContents, excludeFiles, temporary files and relations).
`plan_partitions` cuts that stream into partitions of about `partition_size` tar bytes
without ever holding more than one partition's entries. `TarPartitionReader` is a readable
stream of one partition's tar bytes, produced on demand as the consumer (pipeline.encode,
then the store's upload) reads: no temporary copy anywhere, one read buffer per partition.

Files change while they are copied; that is normal for an online backup and WAL replay from
the backup's start LSN repairs it. The rule, the same as pg_basebackup's:

- the size in a file's tar header is its size when the reader opens it (fstat), taken after
  pg_backup_start; bytes appended later are not copied (replay re-creates them);
- a file that shrinks while it is read is padded with zeros to the size in its header (the
  truncation is WAL-logged and replay truncates again);
- a file or directory that vanished between the walk and the read is skipped (the drop is
  WAL-logged too).

The manifest records what went into the tar (padding included), so the restore verifies the
bytes it was given, not the live file.

Fetch side. `extract_partition` reads one tar stream and writes it under a root directory,
trusting nothing in it: members must be plain files or directories with relative, normalised
names listed in the partition's file list; symlinks, hard links, devices, absolute names and
`..` are refused, files are created with O_EXCL|O_NOFOLLOW (a duplicate or a planted link
fails), and every file is checked against its recorded size and SHA-256.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import re
import stat
import tarfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from walship import diskio
from walship.errors import IntegrityError, LocalIOError, WalshipError

BLOCK = 512
KiB = 1024
MiB = 1024 * KiB
# 1 MiB reads: per-call overhead is noise at this size, and it is what the pipeline reads.
READ_SIZE = 1 * MiB
# read(-1): everything (a partition is read this way only in tests).
READ_ALL = 1 << 62
_ZEROS = bytes(READ_SIZE)

# Directories whose contents a base backup omits; the directory itself is kept, empty
# (basebackup.c excludeDirContents; pg_wal is handled the same way, with archive_status).
EXCLUDED_DIR_CONTENTS = frozenset({
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
})

# Files a base backup omits wherever they are (basebackup.c excludeFiles, plus the .old
# leftovers of earlier exclusive backups and the log collector's pointer file).
EXCLUDED_FILES = frozenset({
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles",
    "current_logfiles.tmp",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
})

# Name prefixes omitted anywhere: the relcache init files (rebuilt at startup) and temporary
# files and directories (pgsql_tmp, PG_TEMP_FILE_PREFIX).
EXCLUDED_PREFIXES = ("pg_internal.init", "pgsql_tmp")

# Temporary relations: t<backend>_<relfilenode>[_fork][.segment], in database directories.
TEMP_RELATION_RE = re.compile(r"^t\d+_\d+(_(fsm|vm|init))?(\.\d+)?$")
# Database directories: base/<oid>, an in-place tablespace's, or a tablespace's version dir's.
_DB_DIR_RE = re.compile(r"^(base|pg_tblspc/\d+/PG_[^/]+|PG_[^/]+)/\d+$")

Warn = Callable[[str], None]


def _no_warn(message: str) -> None:
    pass


@dataclass(frozen=True)
class Entry:
    """One thing to put in the tar, as the walk saw it."""

    path: str  # relative to the partition's root, '/'-separated
    is_dir: bool
    size: int  # at walk time; the tar header uses the size when the file is opened
    mode: int
    mtime: int

    @property
    def tar_cost(self) -> int:
        """Tar bytes this entry takes (header plus padded data), at its walk-time size."""
        return BLOCK if self.is_dir else BLOCK + _round_up(self.size)


def _round_up(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def is_excluded_file(relpath: str) -> bool:
    """Whether a regular file at `relpath` (relative to PGDATA or a tablespace) is omitted."""
    parent, _, name = relpath.rpartition("/")
    if name in EXCLUDED_FILES or name.startswith(EXCLUDED_PREFIXES):
        return True
    return bool(TEMP_RELATION_RE.match(name) and _DB_DIR_RE.match(parent))


def walk_pgdata(pgdata: Path, *, exclude: Collection[str] = (), warn: Warn = _no_warn
                ) -> Iterator[Entry]:
    """Entries of a data directory to back up, in tar order. Tablespaces are not followed.

    `exclude` holds extra relative paths to omit entirely (walship's spool when it lives
    inside PGDATA). pg_tblspc/<oid> symlinks are skipped here: each tablespace is walked
    with walk_tablespace into partitions of its own.
    """
    return _walk(pgdata, "", frozenset(exclude), warn, top=True)


def walk_tablespace(location: Path, version_dir: str, *, warn: Warn = _no_warn
                    ) -> Iterator[Entry]:
    """Entries of one tablespace: only this server's version directory (PG_<major>_<catver>),
    since other clusters may keep theirs in the same location."""
    path = location / version_dir
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalIOError(f"cannot read tablespace directory {path}: {exc.strerror}") from None
    yield Entry(version_dir, True, 0, stat.S_IMODE(st.st_mode), int(st.st_mtime))
    yield from _walk(location, version_dir, frozenset(), warn, top=False)


def _scandir(directory: Path) -> list[os.DirEntry[str]] | None:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return None  # dropped while we walked: replay drops it too
    except OSError as exc:
        raise LocalIOError(
            f"cannot list {directory}: {exc.strerror}",
            hint="backup-push must run as the user that owns the data directory",
        ) from None


def _walk(root: Path, rel: str, exclude: frozenset[str], warn: Warn, *, top: bool
          ) -> Iterator[Entry]:
    entries = _scandir(root / rel if rel else root)
    if entries is None:
        return
    for dirent in entries:
        name = dirent.name
        relpath = f"{rel}/{name}" if rel else name
        if relpath in exclude or name.startswith("pgsql_tmp"):
            continue
        try:
            st = dirent.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LocalIOError(f"cannot stat {root / relpath}: {exc.strerror}") from None
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            if top and name == "pg_wal":
                # pg_wal moved elsewhere with initdb -X: back it up as an empty directory,
                # as pg_basebackup does.
                yield Entry("pg_wal", True, 0, 0o700, int(st.st_mtime))
                yield Entry("pg_wal/archive_status", True, 0, 0o700, int(st.st_mtime))
            elif rel == "pg_tblspc" and top:
                pass  # a tablespace: walked separately
            else:
                warn(f"skipping symbolic link {relpath}: only tablespaces may be links")
            continue
        if stat.S_ISDIR(mode):
            yield Entry(relpath, True, 0, stat.S_IMODE(mode), int(st.st_mtime))
            if top and not rel and name in EXCLUDED_DIR_CONTENTS:
                if name == "pg_wal":
                    yield Entry("pg_wal/archive_status", True, 0, stat.S_IMODE(mode),
                                int(st.st_mtime))
                continue
            yield from _walk(root, relpath, exclude, warn, top=top)
        elif stat.S_ISREG(mode):
            if not is_excluded_file(relpath):
                yield Entry(relpath, False, st.st_size, stat.S_IMODE(mode), int(st.st_mtime))
        else:
            warn(f"skipping {relpath}: not a regular file or directory")


@dataclass
class PartitionPlan:
    """The entries of one partition, decided before it is read."""

    index: int
    root: Path
    tablespace: int | None
    entries: list[Entry]

    @property
    def estimated_bytes(self) -> int:
        """Tar bytes at walk-time sizes (files may since have grown or shrunk)."""
        return sum(e.tar_cost for e in self.entries) + 2 * BLOCK


def plan_partitions(entries: Iterable[Entry], *, root: Path, tablespace: int | None,
                    partition_size: int, indices: Iterator[int]) -> Iterator[PartitionPlan]:
    """Cut entries into partitions of at most `partition_size` tar bytes (estimated).

    A file never spans partitions, so one larger than partition_size gets a partition of
    its own. Lazy: holds one partition's entries at a time.
    """
    current: list[Entry] = []
    cost = 2 * BLOCK
    for entry in entries:
        if current and cost + entry.tar_cost > partition_size:
            yield PartitionPlan(next(indices), root, tablespace, current)
            current, cost = [], 2 * BLOCK
        current.append(entry)
        cost += entry.tar_cost
    if current:
        yield PartitionPlan(next(indices), root, tablespace, current)


@dataclass(frozen=True)
class FileRecord:
    """One manifest line: what a tar member holds."""

    path: str
    is_dir: bool
    size: int
    mode: int
    mtime: int
    sha256: str | None  # None for directories

    def to_json(self) -> dict[str, Any]:
        """The stored form (compact keys: there is one of these per file)."""
        if self.is_dir:
            return {"path": self.path, "type": "dir", "mode": self.mode, "mtime": self.mtime}
        return {"path": self.path, "type": "file", "size": self.size, "mode": self.mode,
                "mtime": self.mtime, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: object) -> FileRecord:
        """Parse the stored form; IntegrityError if it is malformed."""
        try:
            assert isinstance(data, dict)
            path = data["path"]
            kind = data["type"]
            assert isinstance(path, str) and kind in ("file", "dir")
            check_member_name(path)
            mode = int(data.get("mode", 0o600))
            mtime = int(data.get("mtime", 0))
            if kind == "dir":
                return cls(path, True, 0, mode, mtime, None)
            size = int(data["size"])
            digest = data["sha256"]
            assert size >= 0 and isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)
            return cls(path, False, size, mode, mtime, digest)
        except (AssertionError, KeyError, TypeError, ValueError):
            raise IntegrityError(f"malformed manifest entry {str(data)[:200]!r}") from None


@dataclass
class TarStats:
    """What happened while one partition was read."""

    files: int = 0
    dirs: int = 0
    data_bytes: int = 0
    shrunk: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)


class AbortedError(WalshipError):
    """Another partition failed or the user interrupted: stop reading."""


def _tar_header(path: str, *, is_dir: bool, size: int, mode: int, mtime: int,
                uid: int, gid: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = mode & 0o7777
    info.mtime = mtime
    info.uid, info.gid = uid, gid
    # PAX: long names and sizes past 8 GiB stay standard; a short name costs one block.
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


class TarPartitionReader(io.RawIOBase):
    """A readable stream of one partition's tar bytes, made as it is read.

    After EOF, `records` lists every member (the partition's manifest section) and `stats`
    says what was padded or skipped. `abort` is checked between reads so that a failure in
    another partition stops this one promptly; `on_bytes` reports file bytes read (progress).
    """

    def __init__(self, root: Path, entries: Iterable[Entry], *,
                 abort: threading.Event | None = None,
                 on_bytes: Callable[[int], None] | None = None,
                 warn: Warn = _no_warn) -> None:
        super().__init__()
        self._root = root
        self._entries = entries
        self._abort = abort
        self._on_bytes = on_bytes
        self._warn = warn
        self._chunks = self._generate()
        self._chunk: memoryview = memoryview(b"")
        self._eof = False
        self.records: list[FileRecord] = []
        self.stats = TarStats()

    def readable(self) -> bool:
        return True

    def _next_piece(self) -> memoryview | None:
        """What is left of the current piece, or the next one; None at the end."""
        while not self._chunk:
            if self._eof:
                return None
            try:
                self._chunk = memoryview(next(self._chunks))
            except StopIteration:
                self._eof = True
                return None
        return self._chunk

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes; short reads are normal, b"" only at the end.

        A whole piece that fits is handed over as the very bytes object os.read returned:
        file data (1 MiB pieces) reaches the pipeline without a copy, where RawIOBase.read
        would copy each piece twice (into a bytearray through readinto, then into bytes):
        per 1 GiB partition, 2 GiB of memcpy and two short-lived 1 MiB buffers per read.
        Small pieces (headers, small files, padding) are gathered while they fit whole.
        """
        limit = READ_ALL if size is None or size < 0 else size
        parts: list[memoryview] = []
        got = 0
        while got < limit:
            piece = self._next_piece()
            if piece is None:
                break
            if len(piece) > limit - got:
                if parts:
                    break  # a short read now keeps the next read aligned with the piece
                self._chunk = piece[limit:]
                return bytes(piece[:limit])
            parts.append(piece)
            got += len(piece)
            self._chunk = memoryview(b"")
        if len(parts) == 1:
            whole = parts[0].obj
            if isinstance(whole, bytes) and parts[0].nbytes == len(whole):
                return whole
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        """Fill as much of `buffer` as the stream has (short only at the end)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        want = len(view)
        while filled < want:
            piece = self._next_piece()
            if piece is None:
                break
            n = min(len(piece), want - filled)
            view[filled:filled + n] = piece[:n]
            self._chunk = piece[n:]
            filled += n
        return filled

    def _check_abort(self) -> None:
        if self._abort is not None and self._abort.is_set():
            raise AbortedError("partition read aborted")

    def _generate(self) -> Iterator[bytes]:
        for entry in self._entries:
            self._check_abort()
            if entry.is_dir:
                yield _tar_header(entry.path, is_dir=True, size=0, mode=entry.mode,
                                  mtime=entry.mtime, uid=os.getuid(), gid=os.getgid())
                self.records.append(FileRecord(entry.path, True, 0, entry.mode, entry.mtime,
                                               None))
                self.stats.dirs += 1
            else:
                yield from self._file(entry)
        yield bytes(2 * BLOCK)

    def _file(self, entry: Entry) -> Iterator[bytes]:
        path = self._root / entry.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self.stats.vanished.append(entry.path)
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._warn(f"skipping {entry.path}: it became a symbolic link")
                return
            raise LocalIOError(
                f"cannot open {path}: {exc.strerror}",
                hint="backup-push must run as the user that owns the data directory",
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._warn(f"skipping {entry.path}: no longer a regular file")
                return
            size = st.st_size
            mode = stat.S_IMODE(st.st_mode)
            mtime = int(st.st_mtime)
            yield _tar_header(entry.path, is_dir=False, size=size, mode=mode, mtime=mtime,
                              uid=st.st_uid, gid=st.st_gid)
            digest = hashlib.sha256()
            remaining = size
            while remaining:
                self._check_abort()
                try:
                    data = os.read(fd, min(READ_SIZE, remaining))
                except OSError as exc:
                    raise LocalIOError(f"cannot read {path}: {exc.strerror}") from None
                if not data:
                    # Shrank under us: pad to the size promised in the header.
                    self.stats.shrunk.append(entry.path)
                    while remaining:
                        pad = _ZEROS[:min(READ_SIZE, remaining)]
                        digest.update(pad)
                        remaining -= len(pad)
                        yield pad
                    break
                digest.update(data)
                remaining -= len(data)
                if self._on_bytes is not None:
                    self._on_bytes(len(data))
                yield data
            tail = _round_up(size) - size
            if tail:
                yield bytes(tail)
            self.records.append(FileRecord(entry.path, False, size, mode, mtime,
                                           digest.hexdigest()))
            self.stats.files += 1
            self.stats.data_bytes += size
        finally:
            os.close(fd)


# --- Extraction ------------------------------------------------------------------------------


def check_member_name(name: str) -> str:
    """A tar member or manifest path that stays inside its root; ValueError otherwise."""
    if not name or name.startswith("/") or "\x00" in name:
        raise ValueError(f"unsafe path {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"unsafe path {name!r}")
    return name


class _Dirs:
    """Creates directories under a root, refusing anything but real directories on the way."""

    def __init__(self, root: Path, where: str) -> None:
        self.root = root
        self.where = where
        self.known: set[str] = set()

    def ensure(self, relpath: str) -> Path:
        current = self.root
        prefix = ""
        for part in relpath.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            current = current / part
            if prefix in self.known:
                continue
            try:
                current.mkdir(0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(current).st_mode):
                    raise IntegrityError(
                        f"{self.where}: {prefix} exists and is not a directory",
                        hint="the backup holds conflicting members; it is damaged or hostile",
                    ) from None
            except OSError as exc:
                raise LocalIOError(f"cannot create directory {current}: {exc.strerror}") from None
            self.known.add(prefix)
        return current


def _refuse(where: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{where}: {what}",
        hint="refusing to restore from a damaged or hostile store; nothing was written "
        "outside the destination",
    )


# tarfile's read-ahead for headers. Every read from its buffer copies what is left of it, so a
# large one costs a copy of up to this much per member: small keeps partitions of many small
# files cheap (file data is read past the buffer, see _member_data).
_TAR_BUFFER = 64 * KiB
# File data queued for the writer thread, per partition: enough to keep the disk busy while
# the next chunk is decoded, small enough not to matter for memory (3 x READ_SIZE).
_WRITE_QUEUE = 3


class _OpenFile:
    """One file being restored: its descriptor and the running hash of what was written."""

    __slots__ = ("closed", "digest", "fd", "name", "record", "target", "written", "written_back")

    def __init__(self, fd: int, target: Path, name: str, record: FileRecord) -> None:
        self.fd = fd
        self.target = target
        self.name = name
        self.record = record
        self.digest = hashlib.sha256()
        self.written = 0
        self.written_back = 0  # bytes whose writeback was started (diskio)
        self.closed = False

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.written += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise LocalIOError(f"cannot write {self.target}: {exc.strerror}") from None
        if self.written - self.written_back >= diskio.WRITEBACK_AFTER:
            self._start_writeback()

    def _start_writeback(self) -> None:
        diskio.start_writeback(self.fd, self.written_back, self.written - self.written_back)
        self.written_back = self.written

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def finish(self, where: str) -> None:
        """Close, then check size and SHA-256 against the manifest; set the mtime."""
        self._start_writeback()
        self.close()
        record = self.record
        digest = self.digest.hexdigest()
        if self.written != record.size or digest != record.sha256:
            verdict = "differs" if digest != record.sha256 else "ok"
            raise IntegrityError(
                f"{where}: {self.name} does not match the manifest (size {self.written}, "
                f"expected {record.size}; SHA-256 {verdict})",
                hint="the backup is damaged; restore an older backup",
            )
        os.utime(self.target, (record.mtime, record.mtime), follow_symlinks=False)


class _Writer:
    """Hashes and writes file data on a thread of its own, in order.

    The disk write (often blocked on writeback) and the file's SHA-256 then overlap the
    decryption, decompression and tar parsing of the next chunk instead of following them.
    A failure in the thread is raised by the next `put` or by `finish`; after one, the
    thread only closes descriptors.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[_OpenFile, bytes | str | None] | None] = queue.Queue(
            maxsize=_WRITE_QUEUE)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            target, arg = job
            try:
                if isinstance(arg, bytes):
                    if self.error is None:
                        target.write(arg)
                elif self.error is None:
                    target.finish(arg or "")
                else:
                    target.close()
            except BaseException as exc:  # handed to the reading thread
                target.close()
                self.error = exc

    def put(self, target: _OpenFile, arg: bytes | str) -> None:
        """Queue data for `target` (bytes), or its end and check (`where`, a str)."""
        if self.error is not None:
            raise self.error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="walship-restore-write",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((target, arg))

    def stop(self) -> None:
        """Wait for everything queued to be written (or dropped after a failure)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """stop(), then raise the thread's failure if there was one."""
        self.stop()
        if self.error is not None:
            raise self.error


def extract_partition(source: BinaryIO, root: Path, expected: Mapping[str, FileRecord], *,
                      where: str, abort: threading.Event | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> set[str]:
    """Write the tar stream `source` under `root`, checking each member against `expected`.

    Returns the member paths written, which are all of `expected` (IntegrityError otherwise).
    Never creates links or special files, never writes outside `root`, never overwrites.
    Every file has been written, closed and checked against its size and SHA-256 when this
    returns.
    """
    dirs = _Dirs(root, where)
    seen: set[str] = set()
    writer = _Writer()
    current: list[_OpenFile] = []  # the file being queued, if any (closed on failure)
    try:
        try:
            with tarfile.open(fileobj=source, mode="r|", bufsize=_TAR_BUFFER,
                              encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    if abort is not None and abort.is_set():
                        raise AbortedError("extraction aborted")
                    _extract_member(tar, member, root, expected, dirs, where, seen, on_bytes,
                                    abort, writer, current)
        except tarfile.TarError as exc:
            raise _refuse(where, f"not a valid tar stream ({exc})") from None
        writer.finish()
    finally:
        writer.stop()
        for target in current:
            target.close()
    # tarfile takes a damaged header after the first for the end of the archive, so a
    # truncated or mangled stream shows up here, as members that never came.
    missing = expected.keys() - seen
    if missing:
        raise IntegrityError(f"{where}: {len(missing)} files are missing, e.g. "
                             f"{sorted(missing)[0]}",
                             hint="the backup is damaged; restore another backup")
    return seen


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """The data of the member tar.next() just returned, at most READ_SIZE at a time.

    Straight from the stream under the tar, after what tarfile's stream reader buffered
    ahead of it: extractfile() would add a BufferedReader, and tarfile's reader a join and
    two slices, per read. Falls back to extractfile() where tarfile is not as expected.
    """
    stream: Any = tar.fileobj
    remaining = member.size
    if (type(stream).__name__ != "_Stream" or getattr(stream, "comptype", None) != "tar"
            or not isinstance(getattr(stream, "buf", None), bytes)
            or not isinstance(getattr(stream, "pos", None), int)
            or stream.tell() != member.offset_data):
        data_stream = tar.extractfile(member)
        assert data_stream is not None
        while data := data_stream.read(READ_SIZE):
            yield data
        return
    # tarfile._Stream (mode "r|", no compression): `buf` holds bytes read ahead from
    # `fileobj`, `pos` counts the bytes handed out; keep both as its read() would.
    buffered: bytes = stream.buf
    if buffered and remaining:
        take = min(len(buffered), remaining)
        data = buffered if take == len(buffered) else buffered[:take]
        stream.buf = buffered[take:] if take < len(buffered) else b""
        stream.pos += take
        remaining -= take
        yield data
    source = stream.fileobj
    while remaining:
        data = source.read(min(READ_SIZE, remaining))
        if not data:
            raise tarfile.ReadError("unexpected end of data")
        stream.pos += len(data)
        remaining -= len(data)
        yield data


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                    expected: Mapping[str, FileRecord], dirs: _Dirs, where: str,
                    seen: set[str], on_bytes: Callable[[int], None] | None,
                    abort: threading.Event | None, writer: _Writer,
                    current: list[_OpenFile]) -> None:
    name = member.name
    try:
        check_member_name(name)
    except ValueError:
        raise _refuse(where, f"unsafe member name {name!r}") from None
    is_file = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()
    if not is_file and not member.isdir():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
                else "a device or special file")
        raise _refuse(where, f"member {name!r} is {kind}")
    record = expected.get(name)
    if record is None:
        raise _refuse(where, f"member {name!r} is not in the manifest")
    if name in seen:
        raise _refuse(where, f"member {name!r} appears twice")
    if record.is_dir != member.isdir():
        raise _refuse(where, f"member {name!r} has the wrong type")
    if member.isdir():
        dirs.ensure(name)
        seen.add(name)
        return
    if member.size != record.size:
        raise _refuse(where, f"member {name!r} is {member.size} bytes, the manifest says "
                      f"{record.size}")
    parent, _, base = name.rpartition("/")
    directory = dirs.ensure(parent) if parent else root
    target = directory / base
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise _refuse(where, f"member {name!r} would overwrite an existing file") from None
    except OSError as exc:
        raise LocalIOError(f"cannot create {target}: {exc.strerror}") from None
    out = _OpenFile(fd, target, name, record)
    current[:] = [out]
    for data in _member_data(tar, member):
        if abort is not None and abort.is_set():
            raise AbortedError("extraction aborted")
        writer.put(out, data)
        if on_bytes is not None:
            on_bytes(len(data))
    writer.put(out, where)  # closes, checks size and SHA-256 (raised by a later put or finish)
    current.clear()
    seen.add(name)
