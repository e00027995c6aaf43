"""file:///abs/path: a store on a local or network-mounted POSIX filesystem.

Write order for put, so that a crash never leaves a partial object visible:
  1. write a hidden temp file (`.walship-tmp-*`) in the target directory, fsync it;
  2. store metadata as user extended attributes (`user.walship.<name>`) on the temp file;
  3. publish it: os.link (if_absent: atomic, EEXIST -> AlreadyExists) or os.replace;
  4. unlink the temp name (after a link), fsync the directory.
Temp files are never listed; list() removes ones older than an hour (a put that crashed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlsplit

from walship import log
from walship.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    UsageError,
    WalshipError,
)
from walship.storage import redact_url
from walship.storage.base import Capabilities, ObjectInfo, Storage, check_key, check_metadata

if TYPE_CHECKING:
    from walship.config import Config

TEMP_PREFIX = ".walship-tmp-"
XATTR_PREFIX = "user.walship."
# A put that has not touched its temp file for an hour is dead: WAL segments and partitions
# are written continuously, so even a slow network filesystem refreshes the mtime sooner.
STALE_TEMP_SECONDS = 3600.0
_COPY_CHUNK = 1024 * 1024

_log = log.get("storage")


def translate_os_error(exc: OSError, action: str) -> WalshipError:
    """One OSError from the filesystem as a walship error with a clear message and hint.

    `action` says what we were doing, e.g. "writing /var/lib/walship/wal/0001...".
    """
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in (errno.EACCES, errno.EPERM):
        return AccessDenied(
            f"permission denied {action}",
            hint="check the owner and mode of the store directory: walship runs as the "
            "user that runs PostgreSQL (usually postgres)",
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"no space left on device {action}"
            + (" (disk quota exceeded)" if code == errno.EDQUOT else ""),
            hint="the store's filesystem is full: free space there or move the store; "
            "PostgreSQL keeps the WAL until archiving succeeds",
        )
    if code == errno.EROFS:
        return StorageError(
            f"read-only file system {action}",
            hint="the store's filesystem is mounted read-only (or was remounted read-only "
            "after an error); check the mount and the kernel log",
        )
    if code in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return StorageError(
            f"the filesystem does not support an operation needed {action}: {reason}",
            hint="put the store on a filesystem with user extended attributes and hard links "
            "(ext4, xfs, btrfs, tmpfs)",
        )
    return StorageError(f"{reason} {action}")


class LocalStorage(Storage):
    """Objects are files under `root`; keys are paths relative to it."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"store root must be absolute: {root}")
        self.root = root
        self.url = f"file://{root}"
        self.capabilities = Capabilities(create_if_absent=True, bulk_delete=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    # -- put ---------------------------------------------------------------------------

    def put(
        self,
        key: str,
        source: BinaryIO,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
    ) -> int:
        """Write a temp file, fsync, set xattrs, link or rename into place, fsync the dir."""
        path = self._path(key)
        meta = check_metadata(metadata)
        self._make_dirs(path.parent)
        temp = path.parent / f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise translate_os_error(exc, f"creating a temp file in {path.parent}") from exc
        published = False
        try:
            size = self._write(fd, source, temp, path, meta)
            try:
                if if_absent:
                    # link() fails if the name exists: the check and the publish are one atomic
                    # step, and the object appears complete with its metadata.
                    os.link(temp, path)
                else:
                    temp.replace(path)
                published = True
            except FileExistsError:
                raise AlreadyExists(f"{self.url}/{key} already exists") from None
            except IsADirectoryError:
                raise StorageError(
                    f"cannot store {key}: a directory of that name exists in {self.root}"
                ) from None
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) and if_absent:
                    raise StorageError(
                        f"the filesystem under {self.root} does not support hard links, "
                        "which create-if-absent needs",
                        hint="put the store on a POSIX filesystem (ext4, xfs, btrfs, NFSv4)",
                    ) from exc
                raise translate_os_error(exc, f"publishing {path}") from exc
        finally:
            # After a link the temp name is a second link to the object; after a replace or a
            # failure it is gone or garbage. Either way it must not stay.
            if if_absent or not published:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        self._fsync_dir(path.parent)
        return size

    def _write(
        self, fd: int, source: BinaryIO, temp: Path, path: Path, meta: dict[str, str]
    ) -> int:
        size = 0
        try:
            with os.fdopen(fd, "wb", closefd=True) as out:
                while chunk := source.read(_COPY_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                for name, value in meta.items():
                    try:
                        os.setxattr(out.fileno(), XATTR_PREFIX + name, value.encode("ascii"))
                    except OSError as exc:
                        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                            raise StorageError(
                                f"the filesystem under {self.root} refuses user extended "
                                "attributes, which walship stores object metadata in",
                                hint="mount it with user_xattr or put the store on ext4, xfs, "
                                "btrfs or tmpfs",
                            ) from exc
                        raise translate_os_error(exc, f"setting metadata on {temp}") from exc
                os.fsync(out.fileno())
        except OSError as exc:
            raise translate_os_error(exc, f"writing {path}") from exc
        return size

    def _make_dirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing each parent whose entries changed so the new dirs survive a crash."""
        missing: list[Path] = []
        current = directory
        while True:
            try:
                if stat_mod.S_ISDIR(current.stat().st_mode):
                    break
                raise StorageError(f"cannot create directory {current}: a file of that name exists")
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                raise translate_os_error(exc, f"checking directory {current}") from exc
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        for new in reversed(missing):
            try:
                # 0700: the archive holds the database's contents; only its owner reads it.
                new.mkdir(0o700)
            except FileExistsError:
                if not new.is_dir():
                    raise StorageError(
                        f"cannot create directory {new}: a file of that name exists"
                    ) from None
                continue  # a concurrent put created it
            except NotADirectoryError:
                raise StorageError(
                    f"cannot create directory {new}: a parent is a file, not a directory"
                ) from None
            except OSError as exc:
                raise translate_os_error(exc, f"creating directory {new}") from exc
            self._fsync_dir(new.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise translate_os_error(exc, f"opening directory {directory}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some filesystems (and some network mounts) refuse fsync on directories; the
            # file itself is fsynced, so treat EINVAL as "nothing more to do".
            if exc.errno != errno.EINVAL:
                raise translate_os_error(exc, f"syncing directory {directory}") from exc
        finally:
            os.close(fd)

    # -- read --------------------------------------------------------------------------

    def _not_found(self, key: str) -> Exception:
        """ObjectNotFound only when the store itself is there: a missing root is an unmounted
        or misconfigured store, and reporting "absent" would end recovery early."""
        if not self.root.is_dir():
            return StorageUnavailable(
                f"store directory {self.root} does not exist",
                hint="is the archive file system mounted, and is the store URL right?",
            )
        return ObjectNotFound(f"{self.url}/{key} does not exist")

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        """The open file, positioned at `offset`."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        path = self._path(key)
        try:
            # O_NOFOLLOW and O_NONBLOCK: a link or FIFO planted in the store is refused at
            # once, instead of reading from outside the store or blocking forever.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._not_an_object(key) from None
            raise translate_os_error(exc, f"reading {path}") from exc
        mode = os.fstat(fd).st_mode
        if not stat_mod.S_ISREG(mode):
            os.close(fd)
            # A directory is a key prefix, not an object; anything else was planted.
            raise self._not_found(key) if stat_mod.S_ISDIR(mode) else self._not_an_object(key)
        fh = os.fdopen(fd, "rb")
        if offset:
            fh.seek(offset)
        return fh

    def _not_an_object(self, key: str) -> IntegrityError:
        return IntegrityError(
            f"{self.url}/{key} is a symbolic link or special file, which walship never writes",
            hint="something other than walship changed the store; do not trust it until you "
            "know what",
        )

    def stat(self, key: str) -> ObjectInfo:
        """Size, mtime and the user.walship.* extended attributes."""
        path = self._path(key)
        try:
            st = path.lstat()
            if stat_mod.S_ISDIR(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
            if not stat_mod.S_ISREG(st.st_mode):
                raise self._not_an_object(key)
            metadata = self._read_xattrs(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise translate_os_error(exc, f"reading {path}") from exc
        return ObjectInfo(key, st.st_size, metadata, st.st_mtime)

    @staticmethod
    def _read_xattrs(path: Path) -> dict[str, str]:
        try:
            names = os.listxattr(path)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return {}  # nothing can have been stored there
            raise
        return {
            name[len(XATTR_PREFIX) :]: os.getxattr(path, name).decode("ascii")
            for name in names
            if name.startswith(XATTR_PREFIX)
        }

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk the directories in key order, yielding files whose key starts with `prefix`."""
        directory, _, _ = prefix.rpartition("/")
        if directory:
            try:
                check_key(directory)
            except ValueError:
                return  # no valid key can live under an invalid directory
        if not self.root.is_dir():
            raise self._not_found(prefix or ".")
        start = self.root / directory if directory else self.root
        yield from self._walk(start, directory + "/" if directory else "", prefix)

    def _walk(self, directory: Path, dir_key: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise translate_os_error(exc, f"listing {directory}") from exc
        now = time.time()
        # Sort as full keys sort: a directory "a" holds keys "a/...", and '/' sorts after '-'
        # and '.', so "a.b" comes before everything in "a/". Sorting names with a trailing
        # '/' on directories gives exactly ascending byte order of keys.
        keyed: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                self._remove_if_stale(entry, now)
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            keyed.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
        keyed.sort(key=lambda item: item[0])
        for sort_name, entry, is_dir in keyed:
            key = dir_key + sort_name
            try:
                check_key(key.rstrip("/"))
            except ValueError:
                continue  # not something walship wrote (e.g. "lost+found" has a '+')
            if is_dir:
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif key.startswith(prefix):
                try:
                    # Not following links: a link planted in the store is not an object.
                    st = entry.stat(follow_symlinks=False)
                    if not stat_mod.S_ISREG(st.st_mode):
                        continue
                    metadata = self._read_xattrs(Path(entry.path))
                except FileNotFoundError:
                    continue  # deleted while we listed
                except OSError as exc:
                    raise translate_os_error(exc, f"reading {entry.path}") from exc
                yield ObjectInfo(key, st.st_size, metadata, st.st_mtime)

    @staticmethod
    def _remove_if_stale(entry: os.DirEntry[str], now: float) -> None:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                Path(entry.path).unlink()
                _log.info("removed stale temp file %s left by an interrupted put", entry.path)
        except OSError:
            pass  # another process removed or published it; not our business

    # -- delete ------------------------------------------------------------------------

    def delete_many(self, keys: Iterable[str]) -> int:
        """Unlink each file (absent is fine), then fsync each directory touched once."""
        count = 0
        touched: set[Path] = set()
        for key in keys:
            path = self._path(key)
            count += 1
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except IsADirectoryError:
                continue  # a directory is not an object: nothing of that key to delete
            except OSError as exc:
                raise translate_os_error(exc, f"deleting {path}") from exc
            touched.add(path.parent)
        for directory in sorted(touched):
            self._fsync_dir(directory)
        return count


def open_local(url: str, config: Config) -> LocalStorage:
    """file:///absolute/path (file://localhost/path is accepted too)."""
    parts = urlsplit(url)
    url = redact_url(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(
            f"malformed store URL {url!r}: it names a host, not a local path",
            hint="use three slashes for an absolute path: file:///var/lib/walship",
        )
    if parts.query or parts.fragment:
        raise UsageError(f"malformed store URL {url!r}: unexpected query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/") or path.rstrip("/") == "":
        raise UsageError(
            f"store URL {url!r} needs an absolute directory path",
            hint="use file:///var/lib/walship (three slashes, then the path)",
        )
    return LocalStorage(Path(os.path.normpath(path)))
