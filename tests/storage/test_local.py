"""What only the file backend does: temp files, crash safety, xattrs, filesystem errors."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walship.config import Config
from walship.errors import (
    AccessDenied,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    UsageError,
)
from walship.storage import open_storage
from walship.storage.local import (
    STALE_TEMP_SECONDS,
    TEMP_PREFIX,
    LocalStorage,
    open_local,
    translate_os_error,
)


def read(store: LocalStorage, key: str) -> bytes:
    with store.get(key) as stream:
        return stream.read()


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def test_root_is_created_private_on_first_put(local: LocalStorage) -> None:
    assert not local.root.exists()
    # A missing store directory is an unmounted or mistyped store, not an empty one: saying
    # "absent" would make wal-fetch end recovery early. Reading never creates it.
    with pytest.raises(StorageUnavailable):
        list(local.list(""))
    with pytest.raises(StorageUnavailable):
        local.stat("wal/1")
    with pytest.raises(StorageUnavailable):
        local.get("wal/1")
    assert not local.root.exists()
    local.put("wal/1", io.BytesIO(b"x"))
    assert stat.S_IMODE(local.root.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((local.root / "wal" / "1").stat().st_mode) == 0o600


def test_metadata_is_stored_as_user_xattrs(local: LocalStorage) -> None:
    local.put("k", io.BytesIO(b"x"), metadata={"sha256": "ff"})
    assert os.getxattr(local.root / "k", "user.walship.sha256") == b"ff"


def test_temp_files_are_never_listed_and_stale_ones_are_removed(local: LocalStorage) -> None:
    local.put("wal/1", io.BytesIO(b"x"))
    fresh = local.root / "wal" / f"{TEMP_PREFIX}2.abc"
    stale = local.root / "wal" / f"{TEMP_PREFIX}3.def"
    fresh.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    assert [i.key for i in local.list("")] == ["wal/1"]
    assert fresh.exists()
    assert not stale.exists()
    assert [i.key for i in local.list("wal/")] == ["wal/1"]


def test_a_failed_put_leaves_nothing(local: LocalStorage) -> None:
    class Dies(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
            raise OSError(errno.EIO, "source broke")

    local.put("wal/1", io.BytesIO(b"old"))
    with pytest.raises(StorageError):
        local.put("wal/1", Dies())  # type: ignore[arg-type]
    assert read(local, "wal/1") == b"old"
    assert sorted(p.name for p in (local.root / "wal").iterdir()) == ["1"]


CRASH_CHILD = textwrap.dedent(
    """
    import io, os, sys
    from pathlib import Path
    from walship.storage.local import LocalStorage

    class Crashes(io.RawIOBase):
        def __init__(self):
            self.sent = 0
        def readable(self):
            return True
        def readinto(self, buffer):
            if self.sent >= 3 * 1024 * 1024:
                os._exit(0)  # the machine dies mid-put: no cleanup runs
            n = min(len(buffer), 1024 * 1024)
            buffer[:n] = b"n" * n
            self.sent += n
            return n

    store = LocalStorage(Path(sys.argv[1]))
    store.put(sys.argv[2], Crashes(), if_absent=sys.argv[3] == "1")
    sys.exit(3)  # never reached
    """
)


@pytest.mark.parametrize("if_absent", [False, True])
def test_crash_mid_put_leaves_nothing_visible(local: LocalStorage, if_absent: bool) -> None:
    local.put("wal/old", io.BytesIO(b"previous"))
    for key in ("wal/new", "wal/old"):
        result = subprocess.run(
            [sys.executable, "-c", CRASH_CHILD, str(local.root), key, "1" if if_absent else "0"],
            check=False,
        )
        assert result.returncode == 0
    assert [i.key for i in local.list("")] == ["wal/old"]
    assert read(local, "wal/old") == b"previous"
    with pytest.raises(ObjectNotFound):
        local.stat("wal/new")
    leftovers = [p.name for p in (local.root / "wal").iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(leftovers) == 2  # hidden, and removed by a list() an hour from now


def test_key_that_collides_with_a_directory(local: LocalStorage) -> None:
    local.put("a/b", io.BytesIO(b"x"))
    with pytest.raises(StorageError, match="directory of that name"):
        local.put("a", io.BytesIO(b"y"))
    local.put("f", io.BytesIO(b"x"))
    with pytest.raises(StorageError, match="a file of that name exists"):
        local.put("f/g", io.BytesIO(b"y"))


def test_xattrs_refused_gives_a_clear_error(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    with pytest.raises(StorageError, match="refuses user extended attributes") as caught:
        local.put("k", io.BytesIO(b"x"), metadata={"a": "b"})
    assert caught.value.hint and "user_xattr" in caught.value.hint
    assert list(local.list("")) == []
    # Without metadata no xattr is needed.
    local.put("k", io.BytesIO(b"x"))


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (errno.EACCES, AccessDenied, "permission denied"),
        (errno.EPERM, AccessDenied, "permission denied"),
        (errno.ENOSPC, StorageError, "no space left on device"),
        (errno.EDQUOT, StorageError, "disk quota exceeded"),
        (errno.EROFS, StorageError, "read-only file system"),
        (errno.EIO, StorageError, "Input/output error"),
    ],
)
def test_os_error_translation(code: int, kind: type[Exception], words: str) -> None:
    error = translate_os_error(OSError(code, os.strerror(code)), "writing /s/wal/1")
    assert type(error) is kind
    assert words in error.message
    assert "writing /s/wal/1" in error.message


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=256k") as mount:
        store = LocalStorage(mount / "store")
        with pytest.raises(StorageError, match="no space left on device") as caught:
            store.put("big", io.BytesIO(b"x" * 1024 * 1024))
        assert type(caught.value) is StorageError
        assert list(store.list("")) == []
        assert not [p for p in (mount / "store").iterdir()]  # temp file removed


def test_read_only_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=64k,ro") as mount:
        store = LocalStorage(mount / "store")
        with pytest.raises(StorageError, match="read-only file system"):
            store.put("k", io.BytesIO(b"x"))


def test_read_only_directory_is_access_denied(local: LocalStorage) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; covered by the EROFS and EACCES tests")
    local.put("wal/1", io.BytesIO(b"x"))
    (local.root / "wal").chmod(0o500)
    try:
        with pytest.raises(AccessDenied, match="permission denied"):
            local.put("wal/2", io.BytesIO(b"x"))
    finally:
        (local.root / "wal").chmod(0o700)


def test_permission_denied_as_an_unprivileged_user(tmp_path: Path) -> None:
    """As root, prove AccessDenied for real by running the put as the postgres user."""
    if os.geteuid() != 0:
        pytest.skip("only root can switch users; test_read_only_directory covers this")
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    code = (
        "import io, pathlib, sys\n"
        "from walship.errors import AccessDenied\n"
        "from walship.storage.local import LocalStorage\n"
        "try:\n"
        f"    LocalStorage(pathlib.Path({str(root)!r})).put('k', io.BytesIO(b'x'))\n"
        "except AccessDenied as exc:\n"
        "    print(exc.message); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    result = subprocess.run(
        [
            setpriv,
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip("walship is not importable as postgres")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("permission denied ")


@pytest.mark.parametrize(
    "url",
    ["file://relative/path", "file:relative", "file:///", "file://host/abs", "file:///x?y=1"],
)
def test_bad_file_urls(url: str) -> None:
    with pytest.raises(UsageError):
        open_storage(url, Config())


def test_file_urls(tmp_path: Path) -> None:
    assert open_local(f"file://{tmp_path}/a/../b/", Config()).root == tmp_path / "b"
    assert open_local(f"file://localhost{tmp_path}", Config()).root == tmp_path
    assert open_local("file:///with%20space", Config()).root == Path("/with space")
