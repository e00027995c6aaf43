"""walship.spool push markers and the wal-push fast path (walship.fastpath)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from walship import fastpath, spool
from walship.config import Config
from walship.spool import PushMarker

STORE = "file:///srv/walship-archive"
SHA = "ab" * 32
WAL = "000000010000000000000003"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("WALSHIP_"):
            monkeypatch.delenv(var)


def make_wal(directory: Path, name: str = WAL, data: bytes = b"\x10\xd1" * 1024) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


# --- PushMarker -------------------------------------------------------------------------------


def test_marker_for_file_and_matches(tmp_path: Path) -> None:
    path = make_wal(tmp_path)
    st = path.stat()
    marker = PushMarker.for_file(STORE, st, SHA)
    assert marker == PushMarker(STORE, st.st_size, st.st_mtime_ns, st.st_ino, SHA)
    assert marker.matches(STORE, st)
    assert marker.matches(STORE, path.stat())


def test_marker_does_not_match_another_store(tmp_path: Path) -> None:
    st = make_wal(tmp_path).stat()
    marker = PushMarker.for_file(STORE, st, SHA)
    assert not marker.matches("file:///srv/other", st)
    assert not marker.matches(STORE + "/", st)


@pytest.mark.parametrize("field", ["size", "mtime_ns", "inode"])
def test_marker_does_not_match_another_file(tmp_path: Path, field: str) -> None:
    st = make_wal(tmp_path).stat()
    marker = PushMarker.for_file(STORE, st, SHA)
    changed = dataclasses.replace(marker, **{field: getattr(marker, field) + 1})
    assert not changed.matches(STORE, st)


def test_marker_does_not_match_rewritten_file(tmp_path: Path) -> None:
    path = make_wal(tmp_path)
    marker = PushMarker.for_file(STORE, path.stat(), SHA)
    # PostgreSQL recycles segments by renaming old files: a new file under the same name.
    replacement = make_wal(tmp_path, "other", b"\x10\xd1" * 1024)
    replacement.replace(path)
    assert not marker.matches(STORE, path.stat())
    path.write_bytes(b"x")
    assert not marker.matches(STORE, path.stat())


def test_marker_path() -> None:
    assert spool.marker_path(Path("/s"), WAL) == Path("/s/pushed") / WAL


def test_spool_dir_default_and_configured() -> None:
    wal_dir = Path("/data/pg_wal")
    assert spool.spool_dir(Config(), wal_dir) == wal_dir / "walship"
    assert spool.spool_dir(Config(spool_dir=Path("/var/spool/w")), wal_dir) == Path("/var/spool/w")


# --- read_marker / write_marker -------------------------------------------------------------


def test_write_then_read(tmp_path: Path) -> None:
    marker = PushMarker(STORE, 16 * 1024 * 1024, 1_700_000_000_123_456_789, 42, SHA)
    path = tmp_path / "spool" / "pushed" / WAL
    spool.write_marker(path, marker)  # creates the directories
    assert spool.read_marker(path) == marker
    assert [p.name for p in path.parent.iterdir()] == [WAL]  # no temporary file left behind


def test_write_marker_replaces(tmp_path: Path) -> None:
    path = tmp_path / WAL
    old = PushMarker(STORE, 1, 2, 3, SHA)
    new = PushMarker(STORE, 4, 5, 6, "cd" * 32)
    spool.write_marker(path, old)
    spool.write_marker(path, new)
    assert spool.read_marker(path) == new
    assert [p.name for p in tmp_path.iterdir()] == [WAL]


def test_write_marker_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / WAL
    old = PushMarker(STORE, 1, 2, 3, SHA)
    spool.write_marker(path, old)

    class CrashError(Exception):
        pass

    real_write_text = Path.write_text

    def half_write(self: Path, text: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, text[: len(text) // 2])
        raise CrashError

    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(CrashError):
        spool.write_marker(path, PushMarker(STORE, 9, 9, 9, SHA))
    # The marker in place is the old one, whole; the half-written file is only a temporary.
    assert spool.read_marker(path) == old
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != WAL]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"marker"',
        b"42",
        b"{}",
        b'{"store": "file:///x"}',
        json.dumps({"store": STORE, "size": 1, "mtime_ns": 2, "inode": 3}).encode(),
        json.dumps(
            {"store": STORE, "size": 1, "mtime_ns": 2, "inode": 3, "sha256": SHA, "x": 1}
        ).encode(),
        b"\xff\xfe\x00garbage",
        b"{" + b" " * 5000 + b"}",  # longer than the 4096 bytes read_marker reads
    ],
)
def test_read_marker_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / WAL
    path.write_bytes(content)
    assert spool.read_marker(path) is None


@given(st.binary(max_size=300))
def test_read_marker_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("m") / WAL
    path.write_bytes(data)
    assert spool.read_marker(path) is None


def test_read_marker_deeply_nested(tmp_path: Path) -> None:
    path = tmp_path / WAL
    path.write_bytes(b"[" * 4096)  # json.loads raises RecursionError on this
    assert spool.read_marker(path) is None


def test_fast_push_survives_deeply_nested_marker(pushed_ahead: tuple[Path, Path]) -> None:
    wal, marker = pushed_ahead
    marker.write_bytes(b"[" * 4096)
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None


def test_read_marker_absent_or_directory(tmp_path: Path) -> None:
    assert spool.read_marker(tmp_path / "absent") is None
    assert spool.read_marker(tmp_path) is None


# --- the fast path --------------------------------------------------------------------------


@pytest.fixture
def pushed_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A WAL file in pg_wal with a valid push marker in a spool under tmp_path."""
    wal = make_wal(tmp_path / "pg_wal")
    spool_root = tmp_path / "spool"
    monkeypatch.setenv("WALSHIP_STORE", STORE)
    monkeypatch.setenv("WALSHIP_SPOOL_DIR", str(spool_root))
    marker = spool.marker_path(spool_root, WAL)
    source = fastpath.config_source(os.environ)
    assert source is not None
    spool.write_marker(marker, PushMarker.for_file(source, wal.stat(), SHA))
    return wal, marker


def test_fast_push_confirms_and_keeps_marker(pushed_ahead: tuple[Path, Path]) -> None:
    wal, marker = pushed_ahead
    assert fastpath.try_fast_push(["wal-push", str(wal)]) == 0
    # The marker stays until PostgreSQL's .ready file is gone (the pusher's cleanup), so the
    # pusher never pushes the file a second time in between.
    assert marker.exists()
    assert wal.exists()  # PostgreSQL's file is never touched
    assert fastpath.try_fast_push(["wal-push", str(wal)]) == 0


def test_fast_push_marker_of_another_source(pushed_ahead: tuple[Path, Path]) -> None:
    wal, marker = pushed_ahead
    spool.write_marker(marker, PushMarker.for_file(f"store={STORE}", wal.stat(), SHA))
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None


def test_config_source_follows_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "walship.toml"
    config.write_text('store = "file:///a"\n')
    env = {"WALSHIP_CONFIG": str(config), "WALSHIP_LOG_LEVEL": "debug"}
    before = fastpath.config_source(env)
    assert before is not None
    assert fastpath.config_source({**env, "WALSHIP_LOG_LEVEL": "info"}) == before
    config.write_text('store = "file:///somewhere/else"\n')
    assert fastpath.config_source(env) != before
    assert fastpath.config_source({**env, "AWS_ENDPOINT_URL": "http://x"}) != \
        fastpath.config_source(env)
    assert fastpath.config_source({}) is None
    assert fastpath.config_source({"WALSHIP_CONFIG": str(tmp_path / "missing")}) is None


def test_fast_push_default_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = make_wal(tmp_path / "pg_wal")
    monkeypatch.setenv("WALSHIP_STORE", STORE)
    marker = spool.marker_path(tmp_path / "pg_wal" / "walship", WAL)
    source = fastpath.config_source(os.environ)
    assert source is not None
    spool.write_marker(marker, PushMarker.for_file(source, wal.stat(), SHA))
    assert fastpath.try_fast_push(["wal-push", str(wal)]) == 0


@pytest.mark.parametrize(
    "shape",
    [
        [],
        ["wal-push"],
        ["wal-fetch", "{wal}"],
        ["wal-push", "{wal}", "extra"],
        ["--store", "file:///x", "wal-push", "{wal}"],
        ["wal-push", "--help"],
        ["wal-push", "-"],
        ["--version"],
        ["wal-fetch", WAL, "{wal}"],
    ],
)
def test_fast_push_only_plain_wal_push(pushed_ahead: tuple[Path, Path], shape: list[str]) -> None:
    wal, marker = pushed_ahead
    args = [a.replace("{wal}", str(wal)) for a in shape]
    assert fastpath.try_fast_push(args) is None
    assert marker.exists()


def test_fast_push_needs_a_store(
    pushed_ahead: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    wal, marker = pushed_ahead
    monkeypatch.delenv("WALSHIP_STORE")
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None
    assert marker.exists()


def test_fast_push_other_store(
    pushed_ahead: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    wal, marker = pushed_ahead
    monkeypatch.setenv("WALSHIP_STORE", "file:///srv/another-archive")
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None
    assert marker.exists()


def test_fast_push_bad_configuration_takes_slow_path(
    pushed_ahead: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wal, marker = pushed_ahead
    monkeypatch.setenv("WALSHIP_CONFIG", str(tmp_path / "missing.toml"))
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None
    monkeypatch.delenv("WALSHIP_CONFIG")
    monkeypatch.setenv("WALSHIP_COMPRESSION", "brotli")
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None
    assert marker.exists()


def test_fast_push_file_changed(pushed_ahead: tuple[Path, Path]) -> None:
    wal, marker = pushed_ahead
    wal.write_bytes(b"different and longer contents" * 100)
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None
    assert marker.exists()


def test_fast_push_file_missing(pushed_ahead: tuple[Path, Path]) -> None:
    wal, _ = pushed_ahead
    wal.unlink()
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None


def test_fast_push_garbage_marker(pushed_ahead: tuple[Path, Path]) -> None:
    wal, marker = pushed_ahead
    marker.write_text("not json")
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None


def test_fast_push_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = make_wal(tmp_path / "pg_wal")
    monkeypatch.setenv("WALSHIP_STORE", STORE)
    monkeypatch.setenv("WALSHIP_SPOOL_DIR", str(tmp_path / "spool"))
    assert fastpath.try_fast_push(["wal-push", str(wal)]) is None


# --- import weight --------------------------------------------------------------------------

HEAVY = ("click", "boto3", "botocore", "lz4", "cryptography", "zstandard", "tenacity")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_fast_path_imports_are_light() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import walship.fastpath, walship.__main__
        heavy = {HEAVY!r}
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_fast_path_push_runs_without_heavy_imports(tmp_path: Path) -> None:
    wal = make_wal(tmp_path / "pg_wal")
    spool_root = tmp_path / "spool"
    marker = spool.marker_path(spool_root, WAL)
    env = _clean_env() | {"WALSHIP_STORE": STORE, "WALSHIP_SPOOL_DIR": str(spool_root)}
    source = fastpath.config_source(env)
    assert source is not None
    spool.write_marker(marker, PushMarker.for_file(source, wal.stat(), SHA))
    code = textwrap.dedent(
        f"""
        import sys
        from walship.__main__ import main
        code = main(["wal-push", {str(wal)!r}])
        heavy = {HEAVY!r}
        print(code, sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    assert marker.exists()
