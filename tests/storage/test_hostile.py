"""Hostile stores: whatever the store hands back, backup-fetch writes nothing outside DEST, and
a listing that names keys outside the prefix is refused, with one line and no traceback.

The attacker here is the strongest one walship's design admits: in public-key mode the
database host holds the public key, so whoever controls that host (or the bucket, with the
public key) can write objects that decrypt and authenticate correctly. `_forge` writes a
complete, self-consistent backup with that capability alone (sentinel, manifest, file lists
and tar partitions, every SHA-256 right), so the only defences left are the ones under test:
member names and types, the file-list schema, exclusive creation, and the completeness check.
A benign forgery restores (the control), so each refusal is the hostile part's doing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from tests.helpers.cli_isolation import isolated_cli
from walship import cli, crypto, layout, pipeline, wal
from walship.config import Config
from walship.ops.backup_list import BackupInfo, sentinel_bytes
from walship.storage import ObjectInfo, Storage, check_key, open_storage
from walship.storage.memory import MemoryStorage, reset_memory_stores

NAME = "base_000000010000000000000002_00000028"
LABEL = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
         "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n")


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with isolated_cli(monkeypatch):
        monkeypatch.chdir(tmp_path)
        yield


@dataclass(frozen=True)
class Keys:
    """The attacker holds `public`; the restore host holds `private`."""

    public: Path
    private: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    path = tmp_path / "keys" / "walship.key"
    path.parent.mkdir(mode=0o700)
    crypto.keygen_pair(path)
    return Keys(path.with_name("walship.key.pub"), path)


@dataclass
class Member:
    """One tar member and, unless listed=False, its file-list entry (written verbatim)."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""
    listed: bool = True

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.kind
        info.linkname = self.link
        info.mode = 0o700 if self.kind == tarfile.DIRTYPE else 0o600
        info.size = len(self.data) if self.kind == tarfile.REGTYPE else 0
        return info

    def record(self) -> dict[str, Any]:
        if self.kind == tarfile.DIRTYPE:
            return {"path": self.name, "type": "dir", "mode": 0o700, "mtime": 0}
        # A link or device is listed as the file it pretends to be.
        return {"path": self.name, "type": "file", "size": len(self.data), "mode": 0o600,
                "mtime": 0, "sha256": hashlib.sha256(self.data).hexdigest()}


BENIGN = [Member("PG_VERSION", b"15\n"), Member("base", kind=tarfile.DIRTYPE),
          Member("base/1", kind=tarfile.DIRTYPE), Member("base/1/1259", os.urandom(5000))]


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            tar.addfile(m.tarinfo(), io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _forge(store: Path, public_key: Path, members: list[Member], *,
           tablespaces: list[dict[str, Any]] | None = None,
           sentinel_partitions: int | None = None) -> None:
    """A complete backup NAME in the file store at `store`, made with the public key alone."""
    ring = crypto.Keyring(encrypt_to=crypto.load_public_key(public_key))

    def put(key: str, plain: bytes) -> int:
        blob = pipeline.encode_bytes(plain, "lz4", ring)
        path = store / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        return len(blob)

    tar = _tar(members)
    files = {"format": 1, "backup": NAME, "partition": 0, "tablespace": None,
             "tar_sha256": hashlib.sha256(tar).hexdigest(),
             "files": [m.record() for m in members if m.listed]}
    files_plain = json.dumps(files).encode()
    stored = put(layout.backup_partition_key(NAME, 0), tar)
    files_stored = put(layout.backup_partition_files_key(NAME, 0), files_plain)
    now = datetime.now(timezone.utc)
    oids = tuple(int(t["oid"]) for t in tablespaces or [])
    info = BackupInfo(
        name=NAME, start_lsn=wal.parse_lsn("0/2000028"), stop_lsn=wal.parse_lsn("0/2000138"),
        timeline=1, start_time=now - timedelta(seconds=5), stop_time=now, pg_version="15.0",
        pg_version_num=150000, system_identifier=7000000000000000001,
        wal_segment_size=16 << 20, label="forged", data_bytes=len(tar), stored_bytes=stored,
        partitions=1, files=len(members), compression="lz4", encrypted=True, tablespaces=oids)
    manifest = {"format": 1, "backup": info.to_json(), "backup_label": LABEL,
                "tablespace_map": "", "tablespaces": tablespaces or [],
                "partitions": [{"index": 0, "tablespace": None, "tar_bytes": len(tar),
                                "tar_sha256": files["tar_sha256"], "stored_bytes": stored,
                                "files_sha256": hashlib.sha256(files_plain).hexdigest(),
                                "files_stored_bytes": files_stored, "files": len(members),
                                "dirs": 0, "data_bytes": len(tar), "first": "", "last": ""}]}
    put(layout.backup_manifest_key(NAME), json.dumps(manifest).encode())
    if sentinel_partitions is not None:
        info = info.replace(partitions=sentinel_partitions)
    (store / layout.sentinel_key(NAME)).write_bytes(sentinel_bytes(info))


@dataclass
class Scene:
    """A store, a restore host's configuration, and the places nothing may appear in."""

    root: Path
    store: Path
    keys: Keys
    outside: Path
    victim: Path

    def fetch(self, capsys: pytest.CaptureFixture[str], dest: Path, *extra: str,
              name: str = NAME) -> tuple[int, str]:
        """backup-fetch as the operator runs it (in-process: same exit codes, same stderr)."""
        code = cli.run(["backup-fetch", str(dest), name, *extra])
        return code, capsys.readouterr().err

    def untouched(self) -> None:
        """Nothing was written outside DEST: the decoy directory is empty, the victim intact."""
        assert list(self.outside.iterdir()) == []
        assert self.victim.read_bytes() == b"precious\n"
        assert self.victim.stat().st_nlink == 1
        assert sorted(p.name for p in self.root.iterdir()) == [
            "keys", "outside", "store", "victim"]


@pytest.fixture
def scene(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Scene:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("WALSHIP_STORE", f"file://{store}")
    monkeypatch.setenv("WALSHIP_PRIVATE_KEY_FILE", str(keys.private))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    return Scene(tmp_path, store, keys, outside, victim)


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("walship: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_benign_forgery_restores(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the forger's objects are valid, so every refusal below is the hostile
    member's doing, not a malformed forgery."""
    _forge(scene.store, scene.keys.public, BENIGN)
    dest = scene.root / "dest"
    code, err = scene.fetch(capsys, dest)
    assert code == 0, err
    assert (dest / "base" / "1" / "1259").read_bytes() == BENIGN[3].data
    assert (dest / "backup_label").read_text() == LABEL
    dest_tree = {p.relative_to(dest).as_posix() for p in dest.rglob("*")}
    assert dest_tree >= {"PG_VERSION", "base/1/1259", "pg_wal/archive_status"}
    for path in dest.rglob("*"):
        assert not path.is_symlink()


HOSTILE: dict[str, tuple[list[Member], str]] = {
    # a name that climbs out of DEST
    "dotdot": ([*BENIGN, Member("../victim", b"pwned\n")], "malformed"),
    "dotdot-inner": ([*BENIGN, Member("base/../../victim", b"pwned\n")], "malformed"),
    "dotdot-unlisted": ([*BENIGN, Member("../victim", b"pwned\n", listed=False)],
                        "unsafe member name"),
    # an absolute name
    "absolute": ([*BENIGN, Member("ABS", b"pwned\n")], "malformed"),
    "absolute-unlisted": ([*BENIGN, Member("ABS", b"pwned\n", listed=False)],
                          "unsafe member name"),
    # a symlink pointing out, then a file written through it
    "symlink-then-write": ([*BENIGN, Member("base/escape", kind=tarfile.SYMTYPE, link="OUT"),
                            Member("base/escape/pwned", b"pwned\n")], "symbolic link"),
    "symlink-unlisted": ([*BENIGN, Member("base/escape", kind=tarfile.SYMTYPE, link="OUT",
                                          listed=False),
                          Member("base/escape/pwned", b"pwned\n")], "symbolic link"),
    # a hard link to a file outside, then writing "its" contents
    "hardlink-out": ([*BENIGN, Member("base/hard", kind=tarfile.LNKTYPE, link="VICTIM")],
                     "hard link"),
    "hardlink-dotdot": ([*BENIGN, Member("base/hard", kind=tarfile.LNKTYPE,
                                         link="../victim")], "hard link"),
    # a device and a fifo
    "device": ([*BENIGN, Member("base/dev", kind=tarfile.CHRTYPE)], "device"),
    "fifo": ([*BENIGN, Member("base/fifo", kind=tarfile.FIFOTYPE)], "device"),
    # files walship writes itself, smuggled in
    "own-backup-label": ([*BENIGN, Member("backup_label", b"START WAL LOCATION: evil\n")],
                         "backup_label"),
    "pg_tblspc-dir": ([*BENIGN, Member("pg_tblspc", kind=tarfile.DIRTYPE),
                       Member("pg_tblspc/16400", kind=tarfile.DIRTYPE)], "pg_tblspc/16400"),
}


def _resolve(members: list[Member], scene: Scene) -> list[Member]:
    """Fill in the absolute paths of this test's directories."""
    out = []
    for m in members:
        name = str(scene.victim) if m.name == "ABS" else m.name
        link = {"OUT": str(scene.outside), "VICTIM": str(scene.victim)}.get(m.link, m.link)
        out.append(Member(name, m.data, m.kind, link, m.listed))
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_backup_writes_nothing_outside_dest(
        scene: Scene, capsys: pytest.CaptureFixture[str], case: str) -> None:
    members, why = HOSTILE[case]
    tablespaces = None
    if case == "pg_tblspc-dir":
        # The tablespace link walship creates must not land in a directory from the archive.
        tablespaces = [{"oid": 16400, "location": str(scene.outside), "version_dir": "PG_15_1"}]
    _forge(scene.store, scene.keys.public, _resolve(members, scene), tablespaces=tablespaces)
    dest = scene.root / "dest"
    args = ("--tablespace", f"16400={scene.root / 'ts'}") if tablespaces else ()
    code, err = scene.fetch(capsys, dest, *args)
    assert code == 9, err  # IntegrityError
    line = _one_line(err)
    assert why in line, line
    assert not dest.exists(), "a refused restore leaves no half-restored directory"
    assert not (scene.root / "ts").exists()
    scene.untouched()


@pytest.mark.parametrize("version_dir", ["..", "../victim", "a/b", ""])
def test_forged_tablespace_version_dir_is_refused(
        scene: Scene, capsys: pytest.CaptureFixture[str], version_dir: str) -> None:
    _forge(scene.store, scene.keys.public, BENIGN, tablespaces=[
        {"oid": 16400, "location": str(scene.root / "ts"), "version_dir": version_dir}])
    dest = scene.root / "dest"
    code, err = scene.fetch(capsys, dest)
    assert code == 9, err
    assert "manifest of backup" in _one_line(err)
    assert not dest.exists() and not (scene.root / "ts").exists()
    scene.untouched()


def test_sentinel_pointing_at_missing_partitions(
        scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    """A sentinel that claims more partitions than the manifest holds is refused before any
    download; so is a complete-looking backup whose partition objects are gone (an integrity
    failure of a backup that exists, never the exit 1 of "no such backup")."""
    _forge(scene.store, scene.keys.public, BENIGN, sentinel_partitions=3)
    dest = scene.root / "dest"
    code, err = scene.fetch(capsys, dest)
    assert code == 9, err
    assert "does not match its sentinel" in _one_line(err)
    assert not dest.exists()

    for missing in (layout.backup_partition_key(NAME, 0),
                    layout.backup_partition_files_key(NAME, 0),
                    layout.backup_manifest_key(NAME)):
        _forge(scene.store, scene.keys.public, BENIGN)
        (scene.store / missing).unlink()
        code, err = scene.fetch(capsys, dest)
        assert code == 9, (missing, err)
        line = _one_line(err)
        assert "incomplete" in line and missing.rsplit("/", 1)[1] in line, line
        assert not dest.exists()
    scene.untouched()


# --- a listing that names keys outside the prefix -------------------------------------------


class LeakyListing(Storage):
    """A backend that breaks the listing contract: it returns the real objects of its memory
    store and, among them, keys that are not under its prefix (what a buggy S3-compatible
    server, a proxy, or a store shared with another tool can do). The S3 and GCS backends
    refuse such keys themselves (tests/storage/test_s3.py, test_gcs.py); this checks that
    every store, whatever its backend, goes through the one wrapper that refuses them."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.url = inner.url

    def put(self, key: str, source: BinaryIO, *, metadata: Mapping[str, str] | None = None,
            if_absent: bool = False) -> int:
        return self.inner.put(key, source, metadata=metadata, if_absent=if_absent)

    def get(self, key: str, offset: int = 0) -> BinaryIO:
        return self.inner.get(key, offset)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Whatever was asked for, the leaked keys come along (in key order with the rest).
        listed = [*self.inner.list(prefix), *(ObjectInfo(k, 1) for k in _LEAKED)]
        yield from sorted(listed, key=lambda o: o.key)

    def delete_many(self, keys: Iterable[str]) -> int:
        return self.inner.delete_many(keys)


# The keys LeakyListing adds to every listing (set per test).
_LEAKED: list[str] = []


def open_leaky(url: str, config: Any) -> Storage:
    """leaky://name/prefix: the memory store name/prefix behind a LeakyListing."""
    from walship.storage.memory import open_memory

    return LeakyListing(open_memory(url.replace("leaky://", "memory://", 1), config))


@pytest.fixture
def leaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Register the leaky:// scheme; yields the list of keys to leak."""
    from walship import storage as storage_mod

    monkeypatch.setitem(storage_mod.SCHEMES, "leaky",
                        storage_mod._Backend(__name__, "open_leaky"))
    _LEAKED.clear()
    yield _LEAKED
    _LEAKED.clear()
    reset_memory_stores("hostile")


def _seed() -> None:
    """Two WAL segments under the prefix p/, and a neighbour's segment under p-other/."""
    store = MemoryStorage("hostile", "p/")
    for i in (1, 2):
        store.put(f"wal/00000001000000000000000{i}", io.BytesIO(b"x"))
    MemoryStorage("hostile", "p-other/").put("wal/000000010000000000000001",
                                              io.BytesIO(b"theirs"))


@pytest.mark.parametrize("leak", [
    "../p-other/wal/000000010000000000000001",  # climbs into the sibling prefix
    "wal/../../p-other/wal/000000010000000000000001",
    "/etc/passwd",
    "wal/00000001000000000000000\n",
])
@pytest.mark.parametrize("command", [["backup-list"], ["delete", "retain", "1", "--confirm"],
                                     ["backup-fetch", "DEST", "LATEST"]])
def test_listing_outside_the_prefix_is_refused(
        leaky: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, leak: str, command: list[str]) -> None:
    _seed()
    leaky.append(leak)
    before = {o.key for o in MemoryStorage("hostile").list("")}
    monkeypatch.setenv("WALSHIP_STORE", "leaky://hostile/p")
    args = [str(tmp_path / "dest") if a == "DEST" else a for a in command]
    code = cli.run(args)
    err = capsys.readouterr().err
    assert code == 9, err  # IntegrityError, whatever the command
    line = _one_line(err)
    assert "listing" in line, line
    assert {o.key for o in MemoryStorage("hostile").list("")} == before, "nothing deleted"
    assert not (tmp_path / "dest").exists()


# --- a file store with links and special files planted in it --------------------------------

WAL = "000000010000000000000003"


@pytest.mark.parametrize("name", [WAL, "00000002.history"])
@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_planted_link_or_fifo_in_a_file_store_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        name: str, planted: str) -> None:
    """walship never writes a link or a FIFO into a file store. One planted there (by whoever
    else can write to it) must not be read through (bytes from outside the store, or
    /dev/zero without end) nor block the fetch (a FIFO), nor pass for "end of archive"."""
    store = tmp_path / "store"
    (store / "wal").mkdir(parents=True)
    secret = tmp_path / "outside.txt"
    secret.write_text("1\t0/3000000\tnot from the archive\n")
    obj = store / layout.wal_key(name)
    if planted == "symlink":
        obj.symlink_to(secret)
    else:
        os.mkfifo(obj)
    monkeypatch.setenv("WALSHIP_STORE", f"file://{store}")
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    (tmp_path / "pg_wal").mkdir()
    code = cli.run(["wal-fetch", name, "pg_wal/RECOVERYXLOG"])
    err = capsys.readouterr().err
    assert code == 159, err  # 150 + IntegrityError: the server aborts, it does not promote
    assert "symbolic link or special file" in _one_line(err)
    assert list((tmp_path / "pg_wal").iterdir()) == []
    with open_storage(f"file://{store}", Config()) as opened:
        assert [o.key for o in opened.list("")] == []  # not an object: never listed


@pytest.mark.parametrize("key", ["wal/x\n", "wal/x\r", "\nwal/x", "wal/x\n/y", "wal/ x",
                                 "wal/../x", "/wal/x", "wal//x", "wal/x/"])
def test_keys_that_a_store_would_mangle_are_refused(key: str) -> None:
    """check_key decides what a listing may name; `$` in a pattern also matches before a
    trailing newline, so this pins that a key ending in one is refused."""
    with pytest.raises(ValueError):
        check_key(key)
