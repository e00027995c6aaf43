"""Corruption of every kind of stored object, in every encryption mode, is detected on read and
nothing is delivered.

One real PostgreSQL 15 cluster archives into three file stores at once (archive_command pushes
to each): unencrypted (lz4), symmetric, and public-key. Each store gets a real base backup
and a .history file, so it holds every kind of object walship writes: WAL segment, .history,
.backup, tar partition, partition file list, manifest, sentinel. Each object is then damaged
in place (its extended attributes, the stored digest, stay as they were) in four ways:

  flip       one bit flipped in the middle of the object
  truncate   the second half cut off
  swap       two equal, different byte ranges exchanged (payload chunks of an encrypted object)
  first      one bit of the first byte flipped (magic numbers: the object no longer says what
             it is)

and fetched as the operator would: wal-fetch must exit above 125 with nothing at %p (no temp
file either), backup-fetch must exit 9 (IntegrityError) leaving no half-restored directory.
The commands run in-process through walship.cli.run (the same exit codes and stderr as the
process; tests/e2e/test_wal_fetch_exits.py runs the real process on flipped and truncated
segments), which keeps 84 cases within a few seconds.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.e2e.conftest import switch_and_wait_archived
from tests.helpers.cli_isolation import isolated_cli
from tests.helpers.pg import PgCluster, PgFactory, WalshipInstall, chown_pg
from walship import cli, format, layout

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODES = ("plain", "symmetric", "public")
DAMAGES = ("flip", "truncate", "swap", "first")
WAL_KINDS = ("segment", "history", "backup-history")
BACKUP_KINDS = ("partition", "files", "manifest", "sentinel")
HISTORY = "00000002.history"
HISTORY_TEXT = "1\t0/3000000\tno recovery target specified\n"


@dataclass
class Store:
    """One archive: its directory, the configuration a restore host uses, what it holds."""

    mode: str
    path: Path
    fetch_config: Path
    backup: str
    segment: str
    backup_history: str

    def key(self, kind: str) -> str:
        """The store key of the object of `kind`."""
        return {
            "segment": layout.wal_key(self.segment),
            "history": layout.wal_key(HISTORY),
            "backup-history": layout.wal_key(self.backup_history),
            "partition": layout.backup_partition_key(self.backup, 0),
            "files": layout.backup_partition_files_key(self.backup, 0),
            "manifest": layout.backup_manifest_key(self.backup),
            "sentinel": layout.sentinel_key(self.backup),
        }[kind]

    def wal_name(self, kind: str) -> str:
        return {"segment": self.segment, "history": HISTORY,
                "backup-history": self.backup_history}[kind]


@dataclass
class Archives:
    factory: PgFactory
    stores: dict[str, Store]


def _keys(install: WalshipInstall, keydir: Path) -> None:
    for args in (["keygen", "--symmetric", str(keydir / "secret.key")],
                 ["keygen", str(keydir / "pair.key")]):
        proc = install.run(*args)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def archives(walship_install: WalshipInstall) -> Iterator[Archives]:
    factory = PgFactory(walship_install)
    base = factory.scratch_dir("corruption")
    keydir = base / "keys"
    keydir.mkdir(mode=0o700)
    chown_pg(keydir)
    _keys(walship_install, keydir)
    # push_ahead and prefetch off: three configurations share one pg_wal, and this test is
    # about what is stored, not about the background workers.
    common = {"push_ahead": 0, "prefetch": 0, "compression": "lz4"}
    push_keys = {"plain": {}, "symmetric": {"key_file": str(keydir / "secret.key")},
                 "public": {"public_key_file": str(keydir / "pair.key.pub")}}
    fetch_keys = {"plain": {}, "symmetric": push_keys["symmetric"],
                  "public": {"private_key_files": [str(keydir / "pair.key")]}}
    push_configs = {}
    fetch_configs = {}
    for mode in MODES:
        store = base / f"store-{mode}"
        store.mkdir(mode=0o700)
        chown_pg(store)
        url = f"file://{store}"
        push_configs[mode] = factory.write_config(base / f"push-{mode}.toml",
                                                  {"store": url, **common, **push_keys[mode]})
        fetch_configs[mode] = factory.write_config(base / f"fetch-{mode}.toml",
                                                   {"store": url, **common, **fetch_keys[mode]})
    archive_command = " && ".join(walship_install.command(push_configs[m], "wal-push %p")
                                  for m in MODES)
    cluster: PgCluster = factory.cluster()
    cluster.initdb()
    cluster.set_conf(archive_mode="on", archive_command=f"'{archive_command}'")
    cluster.start()
    try:
        cluster.psql("create table t as select g, md5(g::text) from generate_series(1, 50000) g")
        segment = switch_and_wait_archived(cluster)
        history = base / HISTORY
        history.write_text(HISTORY_TEXT)
        chown_pg(history)
        stores = {}
        for mode in MODES:
            env = {"WALSHIP_CONFIG": str(push_configs[mode])}
            pushed = walship_install.run("wal-push", str(history), env=env)
            assert pushed.returncode == 0, pushed.stderr
            proc = walship_install.run("backup-push", str(cluster.datadir),
                                       env={**env, **cluster.libpq_env})
            assert proc.returncode == 0, proc.stderr
            backup = proc.stdout.strip()
            store_dir = Path(str(push_configs[mode]).replace("push-", "store-")
                             ).with_suffix("")
            backup_history = next(p.name for p in (store_dir / "wal").iterdir()
                                  if p.name.startswith(backup[5:29]) and
                                  p.name.endswith(".backup"))
            stores[mode] = Store(mode, store_dir, fetch_configs[mode], backup, segment,
                                 backup_history)
    finally:
        cluster.stop()
    yield Archives(factory, stores)
    factory.close()


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with isolated_cli(monkeypatch):
        yield


def _run(args: list[str], config: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.chdir(cwd)
    code = cli.run(args)
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("walship: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _damaged(data: bytes, damage: str, encrypted: bool) -> bytes:
    """`data` damaged as `damage` says; never equal to `data`."""
    n = len(data)
    head = format.HEADER_SIZES[data[9]] if encrypted else 0
    out = bytearray(data)
    if damage == "flip":
        out[head + (n - head) // 2] ^= 0x01
    elif damage == "first":
        out[0] ^= 0x01
    elif damage == "stop_lsn":
        at = data.index(b'"stop_lsn": "') + len(b'"stop_lsn": "0/')
        out[at] ^= 0x01
    elif damage == "truncate":
        del out[n // 2:]
    else:
        stored_chunk = format.CHUNK_SIZE + format.TAG_SIZE
        if encrypted and n - head > 2 * stored_chunk:
            # Reorder two whole sealed chunks: each authenticates alone, not in that place.
            a, b, size = head, head + stored_chunk, stored_chunk
        else:
            size = max(1, (n - head) // 4)
            a, b = head + size // 2, head + 2 * size
        out[a:a + size], out[b:b + size] = data[b:b + size], data[a:a + size]
    assert bytes(out) != data, "the damage must change the object"
    return bytes(out)


@pytest.fixture
def damage_object(archives: Archives) -> Iterator[object]:
    """damage_object(store, kind, damage): damage one object in place; restored afterwards
    (written back through the same inode, so its extended attributes never change)."""
    restore: list[tuple[Path, bytes]] = []

    def damage(store: Store, kind: str, how: str) -> None:
        path = store.path / store.key(kind)
        original = path.read_bytes()
        restore.append((path, original))
        encrypted = store.mode != "plain" and kind != "sentinel"
        with open(path, "r+b") as fh:
            fh.write(_damaged(original, how, encrypted))
            fh.truncate()

    yield damage
    for path, original in restore:
        with open(path, "r+b") as fh:
            fh.write(original)
            fh.truncate()


def _expected_code(mode: str, kind: str, damage: str) -> int:
    """IntegrityError (9), except where the damage hides that an object is encrypted: with
    keys configured, a first byte that no longer reads as walship's magic makes the object
    look unencrypted, which is refused as untrusted plaintext (KeyMismatch, 10)."""
    if damage == "first" and mode != "plain" and kind != "sentinel":
        return 10
    return 9


def test_the_intact_archives_restore(archives: Archives, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the same commands on the undamaged objects succeed."""
    for mode, store in archives.stores.items():
        work = tmp_path / mode
        (work / "pg_wal").mkdir(parents=True)
        for kind in WAL_KINDS:
            code, err = _run(["wal-fetch", store.wal_name(kind), "pg_wal/RECOVERYXLOG"],
                             store.fetch_config, work, monkeypatch, capsys)
            assert code == 0, (mode, kind, err)
            if kind == "history":
                assert (work / "pg_wal" / "RECOVERYXLOG").read_text() == HISTORY_TEXT
            os.unlink(work / "pg_wal" / "RECOVERYXLOG")
        dest = work / "restore"
        old_umask = os.umask(0)  # the modes must come from walship, not from the umask
        try:
            code, err = _run(["backup-fetch", str(dest), store.backup], store.fetch_config,
                             work, monkeypatch, capsys)
        finally:
            os.umask(old_umask)
        assert code == 0, (mode, err)
        assert (dest / "backup_label").is_file() and (dest / "base").is_dir()
        # Private to the invoking user: the directory 0700, every file 0600, every directory
        # 0700, all owned by whoever ran backup-fetch; the only links are walship's own.
        assert stat.S_IMODE(dest.stat().st_mode) == 0o700
        for path in dest.rglob("*"):
            st = path.lstat()
            assert st.st_uid == os.geteuid(), path
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), path
            assert stat.S_IMODE(st.st_mode) == (0o700 if stat.S_ISDIR(st.st_mode) else 0o600), \
                path


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", WAL_KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_damaged_wal_is_never_delivered(archives: Archives, damage_object: object,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], mode: str,
                                        kind: str, damage: str) -> None:
    store = archives.stores[mode]
    damage_object(store, kind, damage)  # type: ignore[operator]
    (tmp_path / "pg_wal").mkdir()
    code, err = _run(["wal-fetch", store.wal_name(kind), "pg_wal/RECOVERYXLOG"],
                     store.fetch_config, tmp_path, monkeypatch, capsys)
    assert code == 150 + _expected_code(mode, kind, damage), err
    assert code > 125  # the server aborts recovery rather than promoting
    _one_error_line(err)
    assert list((tmp_path / "pg_wal").iterdir()) == [], "nothing at %p, no temp file"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", BACKUP_KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_damaged_backup_is_never_restored(archives: Archives, damage_object: object,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], mode: str,
                                          kind: str, damage: str) -> None:
    store = archives.stores[mode]
    if kind == "sentinel" and damage == "flip":
        # The sentinel is plain JSON and only chooses the backup: flip a bit in a field that
        # says which backup it is (test_sentinel_flips sweeps every byte).
        damage_object(store, kind, "stop_lsn")  # type: ignore[operator]
    else:
        damage_object(store, kind, damage)  # type: ignore[operator]
    dest = tmp_path / "restore"
    code, err = _run(["backup-fetch", str(dest), store.backup], store.fetch_config, tmp_path,
                     monkeypatch, capsys)
    assert code == _expected_code(mode, kind, damage), err
    _one_error_line(err)
    assert not dest.exists(), "a failed restore leaves no half-restored directory"


# Sentinel fields that never decide what is restored: a flip there may pass, and changes only
# what backup-list shows. Everything else must be refused (malformed, or not the manifest's).
COSMETIC = {"label", "pg_version", "data_bytes", "stored_bytes", "files", "compression",
            "encrypted", "walship_version"}


@pytest.mark.parametrize("mode", ["plain", "public"])
def test_sentinel_flips(archives: Archives, mode: str) -> None:
    """Every single-bit flip of every byte of a real sentinel, through the functions
    backup-fetch uses (read_backup_info, then read_manifest): refused, or cosmetic only."""
    import dataclasses

    from walship.config import load
    from walship.crypto import Keyring
    from walship.errors import IntegrityError
    from walship.ops.backup_fetch import read_manifest
    from walship.ops.backup_list import read_backup_info
    from walship.storage.memory import MemoryStorage, reset_memory_stores

    store = archives.stores[mode]
    config = load({}, config_path=str(store.fetch_config), environ={})
    keyring = Keyring.from_config(config)
    sentinel = (store.path / store.key("sentinel")).read_bytes()
    manifest = (store.path / store.key("manifest")).read_bytes()
    memory = MemoryStorage(f"sentinel-flips-{mode}")
    memory.put(store.key("manifest"), _bytes_io(manifest))
    memory.put(store.key("sentinel"), _bytes_io(sentinel))
    original = read_backup_info(memory, store.backup)
    read_manifest(memory, keyring, original)  # the intact pair agrees
    refused = cosmetic = 0
    try:
        for at in range(len(sentinel)):
            damaged = bytearray(sentinel)
            damaged[at] ^= 0x01
            memory.put(store.key("sentinel"), _bytes_io(bytes(damaged)))
            try:
                info = read_backup_info(memory, store.backup)
                read_manifest(memory, keyring, info)
            except IntegrityError:
                refused += 1
                continue
            changed = {f.name for f in dataclasses.fields(info)
                       if getattr(info, f.name) != getattr(original, f.name)}
            assert changed <= COSMETIC, (at, chr(sentinel[at]), changed)
            cosmetic += 1
    finally:
        reset_memory_stores(f"sentinel-flips-{mode}")
    assert refused + cosmetic == len(sentinel)
    assert refused > len(sentinel) // 2, (refused, cosmetic)
    print(f"sentinel flips ({mode}): {len(sentinel)} bytes, {refused} refused, {cosmetic} cosmetic")


def _bytes_io(data: bytes) -> BinaryIO:
    return io.BytesIO(data)
