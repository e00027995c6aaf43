"""The wal-fetch fast path: serve a prefetched segment only when everything vouches for it."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from walship import fastpath
from walship.ops.prefetch import source_record

SEG = 1 << 20  # the smallest segment size keeps the test light
NAME = "000000010000000000000003"


def segment(name: str = NAME, *, pageaddr: int | None = None, size: int = SEG) -> bytes:
    segno = int(name[8:16], 16) * (0x1_0000_0000 // SEG) + int(name[16:], 16)
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1,
                         segno * SEG if pageaddr is None else pageaddr, 0, 7, SEG, 8192)
    return header + b"\0" * (size - len(header))


@pytest.fixture
def spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """DATADIR/pg_wal with a prefetched NAME, a matching .source, and a held prefetcher lock."""
    for key in [k for k in os.environ if k.startswith("WALSHIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WALSHIP_STORE", "file:///srv/archive")
    pg_wal = tmp_path / "pg_wal"
    pf = pg_wal / "walship" / "prefetch"
    pf.mkdir(parents=True)
    (pf / NAME).write_bytes(segment())
    source = fastpath.config_source(os.environ)
    assert source is not None
    (pf / ".source").write_text(source_record(source))
    lock = os.open(pf / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a running prefetcher
    monkeypatch.chdir(tmp_path)
    yield pg_wal, pf
    os.close(lock)


def fetch(name: str = NAME) -> int | None:
    return fastpath.try_fast_fetch(["wal-fetch", name, "pg_wal/RECOVERYXLOG"])


def test_serves_and_records_what_is_wanted(spooled: tuple[Path, Path]) -> None:
    pg_wal, pf = spooled
    assert fetch() == 0
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segment()
    assert not (pf / NAME).exists()
    assert (pf / ".want").read_text() == f"{NAME} {SEG}"


def test_not_without_a_running_prefetcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSHIP_STORE", "file:///srv/archive")
    pf = tmp_path / "pg_wal" / "walship" / "prefetch"
    pf.mkdir(parents=True)
    (pf / NAME).write_bytes(segment())
    source = fastpath.config_source(os.environ)
    assert source is not None
    (pf / ".source").write_text(source_record(source))
    (pf / ".lock").touch()
    monkeypatch.chdir(tmp_path)
    assert fetch() is None
    assert (pf / NAME).exists()


@pytest.mark.parametrize("damage", ["pageaddr", "short", "other-boot", "other-store", "name"])
def test_refuses_what_it_cannot_vouch_for(spooled: tuple[Path, Path], damage: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pg_wal, pf = spooled
    name = NAME
    if damage == "pageaddr":
        (pf / NAME).write_bytes(segment(pageaddr=0))
    elif damage == "short":
        (pf / NAME).write_bytes(segment()[: SEG // 2])
    elif damage == "other-boot":
        source = (pf / ".source").read_text().split("\n", 1)[1]
        (pf / ".source").write_text(f"00000000-dead-beef-0000-000000000000\n{source}")
    elif damage == "other-store":
        monkeypatch.setenv("WALSHIP_STORE", "file:///srv/elsewhere")
    elif damage == "name":
        name = "000000010000000000000004"
        (pf / name).write_bytes(segment())  # the bytes of 03 under the name 04
    assert fetch(name) is None
    assert not (pg_wal / "RECOVERYXLOG").exists()


@pytest.mark.parametrize("args", [
    ["wal-fetch", "00000002.history", "pg_wal/x"],
    ["wal-fetch", NAME],
    ["wal-fetch", "../" + NAME, "pg_wal/x"],
    ["wal-push", NAME, "x"],
])
def test_only_plain_segment_fetches(spooled: tuple[Path, Path], args: list[str]) -> None:
    assert fastpath.try_fast_fetch(args) is None
