"""Every exit-code branch of wal-fetch and wal-push, against an archive a real cluster wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Archive, archiving_cluster, make_archive, switch_and_wait_archived
from tests.helpers.pg import PgCluster, PgFactory, WalshipInstall, chown_pg
from walship.errors import WAL_FETCH_ABORT_BASE

pytestmark = pytest.mark.e2e

CORRUPT = WAL_FETCH_ABORT_BASE + 9
KEY = WAL_FETCH_ABORT_BASE + 10
UNAVAILABLE = WAL_FETCH_ABORT_BASE + 6


@dataclass
class Archived:
    factory: PgFactory
    archive: Archive
    cluster: PgCluster
    store: Path
    segments: list[str]

    def workdir(self, name: str, *, standby: bool = False) -> Path:
        """A fake data directory to run restore_command in (it runs in PGDATA)."""
        path = self.factory.scratch_dir(name)
        (path / "pg_wal").mkdir()
        if standby:
            (path / "standby.signal").touch()
        chown_pg(path)
        return path

    def fetch(self, name: str, workdir: Path, *, config: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {"WALSHIP_CONFIG": str(config or self.archive.config),
                    "WALSHIP_PREFETCH": "0", **(env or {})}
        return self.archive.install.run("wal-fetch", name, "pg_wal/RECOVERYXLOG", cwd=workdir,
                                        env=full_env)


@pytest.fixture(scope="module")
def archived(walship_install: WalshipInstall) -> Iterator[Archived]:
    factory = PgFactory(walship_install)
    archive = make_archive(factory, key="symmetric")
    cluster = archiving_cluster(factory, archive)
    cluster.psql("create table t as select g from generate_series(1, 100000) g")
    names = [switch_and_wait_archived(cluster) for _ in range(3)]
    store = Path(archive.store_url.removeprefix("file://"))
    yield Archived(factory, archive, cluster, store, names)
    factory.close()


def _single_line_error(stderr: str) -> None:
    """One error line, no traceback (retry warnings may come before it)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("walship: error: ")]
    assert len(errors) == 1, stderr


def test_fetch_delivers_identical_segment(archived: Archived) -> None:
    work = archived.workdir("ok")
    name = archived.segments[0]
    proc = archived.fetch(name, work)
    assert proc.returncode == 0, proc.stderr
    fetched = (work / "pg_wal" / "RECOVERYXLOG").read_bytes()
    original = archived.cluster.datadir / "pg_wal" / name
    if original.exists():  # the server may have recycled it already
        assert fetched == original.read_bytes()
    assert len(fetched) == 16 * 1024 * 1024


def test_missing_segment_exits_1(archived: Archived) -> None:
    work = archived.workdir("missing")
    proc = archived.fetch("0000000100000000000000FE", work)
    assert proc.returncode == 1, proc.stderr
    assert "error" not in proc.stderr
    assert not (work / "pg_wal" / "RECOVERYXLOG").exists()
    # The server asks for history files that do not exist; timeline 1 never has one.
    assert archived.fetch("00000001.history", work).returncode == 1
    assert archived.fetch("00000005.history", work).returncode == 1


def _damaged_copy(archived: Archived, name: str, damage: str) -> Path:
    """A copy of the store with one WAL object damaged; returns the copy's config."""
    base = archived.factory.scratch_dir(f"damaged-{damage}")
    shutil.copytree(archived.store, base / "store", symlinks=True)
    obj = base / "store" / "wal" / name
    data = bytearray(obj.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) - 1000:]
    obj.write_bytes(bytes(data))  # keeps the xattrs: the digest still names the original
    chown_pg(base)
    key = archived.archive.keydir / "secret.key"
    return archived.factory.write_config(base / "walship.toml",
                                         {"store": f"file://{base}/store", "key_file": str(key)})


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("standby", [False, True])
def test_corrupt_object_aborts_even_on_standby(archived: Archived, damage: str,
                                               standby: bool) -> None:
    name = archived.segments[1]
    config = _damaged_copy(archived, name, damage)
    work = archived.workdir(f"corrupt-{damage}-{standby}", standby=standby)
    proc = archived.fetch(name, work, config=config)
    assert proc.returncode == CORRUPT, proc.stderr
    _single_line_error(proc.stderr)
    assert list((work / "pg_wal").iterdir()) == [], "nothing may appear at %p"


def test_wrong_key_and_missing_key(archived: Archived) -> None:
    other = archived.factory.scratch_dir("otherkey")
    assert archived.archive.install.run("keygen", "--symmetric", str(other / "k")).returncode == 0
    wrong = archived.factory.write_config(other / "wrong.toml",
                                          {"store": archived.archive.store_url,
                                           "key_file": str(other / "k")})
    none = archived.factory.write_config(other / "none.toml",
                                         {"store": archived.archive.store_url})
    for config in (wrong, none):
        work = archived.workdir("key")
        proc = archived.fetch(archived.segments[0], work, config=config)
        assert proc.returncode == KEY, proc.stderr
        _single_line_error(proc.stderr)
        assert list((work / "pg_wal").iterdir()) == []


def test_unreachable_store_aborts_but_standby_keeps_polling(archived: Archived) -> None:
    base = archived.factory.scratch_dir("closed")
    config = archived.factory.write_config(base / "w.toml", {
        "store": "s3://no-such-host-bucket/prefix", "key_file":
        str(archived.archive.keydir / "secret.key"), "retry_budget": 1})
    # A closed port on loopback: connection refused, transient, until the budget runs out.
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    work = archived.workdir("closed")
    proc = archived.fetch(archived.segments[0], work, config=config, env=env)
    assert proc.returncode == UNAVAILABLE, proc.stderr
    _single_line_error(proc.stderr)
    standby = archived.workdir("closed-standby", standby=True)
    proc = archived.fetch(archived.segments[0], standby, config=config, env=env)
    assert proc.returncode == 1, proc.stderr


def test_malformed_name_and_missing_config(archived: Archived) -> None:
    work = archived.workdir("bad")
    proc = archived.archive.install.run("wal-fetch", "../etc/passwd", "pg_wal/x", cwd=work,
                                        env={"WALSHIP_CONFIG": str(archived.archive.config)})
    assert proc.returncode > 125, proc.stderr
    _single_line_error(proc.stderr)
    proc = archived.archive.install.run("wal-fetch", archived.segments[0], "pg_wal/x", cwd=work)
    assert proc.returncode == WAL_FETCH_ABORT_BASE + 2, proc.stderr
    assert "no store configured" in proc.stderr
    proc = archived.archive.install.run("wal-fetch", archived.segments[0], cwd=work)
    assert proc.returncode == 2, proc.stderr


def test_push_refuses_different_bytes_accepts_identical(archived: Archived) -> None:
    name = archived.segments[0]
    source = archived.cluster.datadir / "pg_wal" / name
    work = archived.workdir("repush")
    # Recover the archived bytes (the server may have recycled its copy).
    assert archived.fetch(name, work).returncode == 0
    same = work / "pg_wal" / name
    os.replace(work / "pg_wal" / "RECOVERYXLOG", same)
    proc = archived.archive.run("wal-push", str(same))
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    assert "identical" in proc.stderr  # type: ignore[attr-defined]
    different = bytearray(same.read_bytes())
    different[100_000] ^= 1
    same.write_bytes(bytes(different))
    proc = archived.archive.run("wal-push", str(same))
    assert proc.returncode == 11, proc.stderr  # type: ignore[attr-defined]
    assert "different contents" in proc.stderr  # type: ignore[attr-defined]
    del source


def test_push_from_another_cluster_is_refused(archived: Archived) -> None:
    other = archived.factory.cluster("foreign")
    other.initdb()
    segment = sorted(p for p in (other.datadir / "pg_wal").iterdir() if len(p.name) == 24)[0]
    proc = archived.archive.run("wal-push", str(segment))
    assert proc.returncode == 12, proc.stderr  # type: ignore[attr-defined]
    assert "belongs to cluster" in proc.stderr  # type: ignore[attr-defined]
