"""tarstream: what a base backup omits, partition planning, files changing under the copy,
manifest records, and extraction that refuses whatever could escape its root."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tarfile
from pathlib import Path

import pytest

from walship import tarstream
from walship.errors import IntegrityError
from walship.tarstream import (
    Entry,
    FileRecord,
    TarPartitionReader,
    extract_partition,
    plan_partitions,
    walk_pgdata,
    walk_tablespace,
)

MiB = 1024 * 1024


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fake_pgdata(root: Path) -> Path:
    pgdata = root / "pgdata"
    keep = [
        "PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "global/pg_control",
        "global/1262", "base/1/1259", "base/1/1259_fsm", "base/16384/16385.1",
        "pg_xact/0000", "pg_multixact/offsets/0000", "pg_logical/replorigin_checkpoint",
        "log/postgresql.log", "base/1/t3", "t5_123",  # only temp relations in db dirs go
    ]
    dropped = [
        "postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old",
        "tablespace_map", "tablespace_map.old", "backup_manifest", "current_logfiles",
        "postgresql.auto.conf.tmp", "global/pg_internal.init", "base/1/pg_internal.init.123",
        "base/1/t3_1234", "base/1/t3_1234_fsm", "base/1/t3_1234.1", "base/16384/t12_99_vm",
        "base/pgsql_tmp/pgsql_tmp123.0", "base/1/pgsql_tmp_x",
        "pg_wal/000000010000000000000001", "pg_wal/archive_status/000000010000000000000001.ready",
        "pg_wal/walship/pushed/000000010000000000000001", "pg_replslot/slot/state",
        "pg_stat_tmp/global.stat", "pg_subtrans/0000", "pg_notify/0000", "pg_serial/0000",
        "pg_snapshots/00000003-1", "pg_dynshmem/mmap.1", "myspool/x",
    ]
    for name in keep + dropped:
        _write(pgdata / name, name.encode())
    (pgdata / "pg_tblspc").mkdir()
    (root / "ts").mkdir()
    (pgdata / "pg_tblspc" / "16400").symlink_to(root / "ts")
    (pgdata / "stray_link").symlink_to("/etc/passwd")
    os.mkfifo(pgdata / "fifo")
    (pgdata / "empty_dir").mkdir()
    return pgdata


def test_walk_omits_what_a_base_backup_omits(tmp_path: Path) -> None:
    pgdata = _fake_pgdata(tmp_path)
    warnings: list[str] = []
    entries = list(walk_pgdata(pgdata, exclude=["myspool"], warn=warnings.append))
    files = {e.path for e in entries if not e.is_dir}
    dirs = {e.path for e in entries if e.is_dir}
    assert files == {
        "PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "global/pg_control",
        "global/1262", "base/1/1259", "base/1/1259_fsm", "base/16384/16385.1",
        "pg_xact/0000", "pg_multixact/offsets/0000", "pg_logical/replorigin_checkpoint",
        "log/postgresql.log", "base/1/t3", "t5_123",
    }
    # Directories whose contents are omitted stay, empty; pg_wal keeps archive_status.
    for kept in ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_stat_tmp", "pg_subtrans",
                 "pg_notify", "pg_serial", "pg_snapshots", "pg_dynshmem", "pg_tblspc",
                 "empty_dir", "base", "base/1", "global"):
        assert kept in dirs
    assert not any(d.startswith(("pg_wal/walship", "base/pgsql_tmp", "myspool", "pg_tblspc/"))
                   for d in dirs)
    assert any("stray_link" in w for w in warnings)
    assert any("fifo" in w for w in warnings)
    # Pre-order with sorted names: every directory comes before what it holds.
    paths = [e.path for e in entries]
    for i, path in enumerate(paths):
        parent = path.rpartition("/")[0]
        if parent:
            assert parent in paths[:i]


def test_pg_wal_symlink_becomes_an_empty_directory(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (tmp_path / "walhere").mkdir()
    _write(tmp_path / "walhere" / "000000010000000000000001")
    (pgdata / "pg_wal").symlink_to(tmp_path / "walhere")
    entries = list(walk_pgdata(pgdata))
    assert [(e.path, e.is_dir) for e in entries] == [("pg_wal", True),
                                                     ("pg_wal/archive_status", True)]


def test_tablespace_walk_takes_only_this_servers_version_dir(tmp_path: Path) -> None:
    ts = tmp_path / "ts"
    _write(ts / "PG_15_202209061" / "16384" / "16390")
    _write(ts / "PG_15_202209061" / "16384" / "t4_16391")
    _write(ts / "PG_16_202307071" / "16384" / "16390")
    paths = [e.path for e in walk_tablespace(ts, "PG_15_202209061")]
    assert paths == ["PG_15_202209061", "PG_15_202209061/16384", "PG_15_202209061/16384/16390"]
    assert list(walk_tablespace(ts, "PG_14_202107181")) == []


def _entries(sizes: list[int]) -> list[Entry]:
    return [Entry(f"f{i}", False, size, 0o600, 0) for i, size in enumerate(sizes)]


def test_partitions_respect_the_size_and_never_split_a_file(tmp_path: Path) -> None:
    sizes = [100, 5000, 3 * MiB, 10, 700_000, 700_000, 0, 1_500_000, 20]
    limit = 1 * MiB
    plans = list(plan_partitions(_entries(sizes), root=tmp_path, tablespace=None,
                                 partition_size=limit, indices=itertools.count()))
    assert [p.index for p in plans] == list(range(len(plans)))
    assert [e for p in plans for e in p.entries] == _entries(sizes)
    for plan in plans:
        assert plan.estimated_bytes <= limit or len(plan.entries) == 1
    assert any(len(p.entries) > 1 for p in plans)


def test_partition_indices_continue_across_roots(tmp_path: Path) -> None:
    indices = itertools.count()
    first = list(plan_partitions(_entries([600_000] * 3), root=tmp_path, tablespace=None,
                                 partition_size=MiB, indices=indices))
    second = list(plan_partitions(_entries([10]), root=tmp_path, tablespace=16400,
                                  partition_size=MiB, indices=indices))
    assert [p.index for p in first + second] == [0, 1, 2, 3]
    assert second[0].tablespace == 16400


def _read_tar(data: bytes) -> dict[str, bytes | None]:
    members: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            fh = tar.extractfile(member)
            members[member.name] = fh.read() if fh is not None else None
    return members


def _stream(reader: TarPartitionReader, chunk: int = 65536) -> bytes:
    out = bytearray()
    while True:
        data = reader.read(chunk)
        if not data:
            return bytes(out)
        out += data


def _readinto_all(reader: TarPartitionReader, chunk: int) -> bytes:
    out = bytearray()
    buffer = bytearray(chunk)
    while n := reader.readinto(buffer):
        out += buffer[:n]
    return bytes(out)


def test_read_and_readinto_give_the_same_stream_at_any_size(tmp_path: Path) -> None:
    # read() hands whole pieces over without copying and returns short reads to stay aligned
    # with them; whatever the read size, the bytes must be those readinto() produces, and no
    # read may be longer than asked or empty before the end.
    root = tmp_path / "root"
    _write(root / "PG_VERSION", b"15\n")
    _write(root / "base" / "1" / "big", os.urandom(tarstream.READ_SIZE * 2 + 700))
    _write(root / "base" / "1" / "exact", os.urandom(tarstream.READ_SIZE))
    for i in range(20):
        _write(root / "base" / "1" / f"small{i}", os.urandom(i * 97))
    entries = list(walk_pgdata(root))
    expected = _readinto_all(TarPartitionReader(root, entries), 4096)
    for size in (1, 511, 512, 513, 65536, tarstream.READ_SIZE - 1, tarstream.READ_SIZE,
                 tarstream.READ_SIZE + 1, 3 * tarstream.READ_SIZE):
        reader = TarPartitionReader(root, entries)
        out = bytearray()
        while data := reader.read(size):
            assert 0 < len(data) <= size
            out += data
        assert bytes(out) == expected, size
    assert TarPartitionReader(root, entries).read() == expected
    assert _read_tar(expected)["base/1/exact"] == (root / "base" / "1" / "exact").read_bytes()


def test_reader_produces_a_standard_tar_and_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "root"
    payloads = {"a": b"", "dir/b": os.urandom(1000), "dir/sub/c": os.urandom(2 * MiB + 17),
                "x" * 150 + "/long": b"long names use pax headers"}
    for name, data in payloads.items():
        _write(root / name, data)
    (root / "dir").chmod(0o750)
    entries = list(walk_pgdata(root))
    reader = TarPartitionReader(root, entries)
    # Reads of every size, down to one byte, give the same stream.
    data = _stream(reader, 7)
    members = _read_tar(data)
    for name, payload in payloads.items():
        assert members[name] == payload
    assert members["dir"] is None
    assert len(data) % 512 == 0
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(
        _stream(TarPartitionReader(root, entries), 1 << 20)).hexdigest()
    records = {r.path: r for r in reader.records}
    assert set(records) == {e.path for e in entries}
    for name, payload in payloads.items():
        st = (root / name).stat()
        record = records[name]
        assert record.size == len(payload)
        assert record.sha256 == hashlib.sha256(payload).hexdigest()
        assert record.mode == 0o644 & ~0o022 or record.mode == st.st_mode & 0o7777
        assert record.mtime == int(st.st_mtime)
        assert FileRecord.from_json(record.to_json()) == record
    assert records["dir"].is_dir and records["dir"].mode == 0o750
    assert reader.stats.files == 4
    assert reader.stats.data_bytes == sum(len(p) for p in payloads.values())


def test_a_file_that_shrinks_while_read_is_padded_with_zeros(tmp_path: Path) -> None:
    root = tmp_path / "root"
    original = os.urandom(3 * MiB)
    _write(root / "rel", original)
    entries = list(walk_pgdata(root))
    truncated = False

    def truncate_after_first_read(n: int) -> None:
        nonlocal truncated
        if not truncated:
            truncated = True
            os.truncate(root / "rel", MiB + MiB // 2)

    reader = TarPartitionReader(root, entries, on_bytes=truncate_after_first_read)
    members = _read_tar(_stream(reader))
    expected = original[: MiB + MiB // 2] + bytes(MiB + MiB // 2)
    assert members["rel"] == expected
    assert reader.stats.shrunk == ["rel"]
    assert reader.records[0].size == 3 * MiB
    assert reader.records[0].sha256 == hashlib.sha256(expected).hexdigest()


def test_growth_after_open_is_not_copied_and_growth_before_is(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root / "a", b"A" * 1000)
    _write(root / "b", b"B" * (2 * MiB))
    entries = list(walk_pgdata(root))
    # "a" grows after the walk but before it is opened: the header takes the size at open.
    with open(root / "a", "ab") as fh:
        fh.write(b"a" * 500)
    grown = False

    def grow_b(n: int) -> None:
        nonlocal grown
        if not grown and n == MiB:
            grown = True
            with open(root / "b", "ab") as fh:
                fh.write(b"b" * 4096)

    reader = TarPartitionReader(root, entries, on_bytes=grow_b)
    members = _read_tar(_stream(reader))
    assert members["a"] == b"A" * 1000 + b"a" * 500
    assert members["b"] == b"B" * (2 * MiB)


def test_vanished_files_and_directories_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root / "keep", b"k")
    _write(root / "gone", b"g")
    _write(root / "db" / "1", b"1")
    entries = list(walk_pgdata(root))
    (root / "gone").unlink()
    reader = TarPartitionReader(root, entries)
    members = _read_tar(_stream(reader))
    assert "gone" not in members and members["keep"] == b"k"
    assert reader.stats.vanished == ["gone"]
    assert "gone" not in {r.path for r in reader.records}
    # A directory dropped before the walk reaches it is simply not there.
    (root / "db" / "1").unlink()
    (root / "db").rmdir()
    assert "db" not in {e.path for e in walk_pgdata(root)}


def test_reader_stops_when_aborted(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "root"
    _write(root / "big", bytes(3 * MiB))
    abort = threading.Event()
    reader = TarPartitionReader(root, list(walk_pgdata(root)), abort=abort,
                                on_bytes=lambda n: abort.set())
    with pytest.raises(tarstream.AbortedError):
        _stream(reader)


# --- extraction ------------------------------------------------------------------------------


def _roundtrip_source(tmp_path: Path) -> tuple[bytes, dict[str, FileRecord]]:
    root = tmp_path / "src"
    _write(root / "base" / "1" / "1259", os.urandom(20000))
    _write(root / "PG_VERSION", b"15\n")
    (root / "pg_wal" / "archive_status").mkdir(parents=True)
    reader = TarPartitionReader(root, list(walk_pgdata(root)))
    data = _stream(reader)
    return data, {r.path: r for r in reader.records}


def test_extract_roundtrip(tmp_path: Path) -> None:
    data, expected = _roundtrip_source(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    seen = extract_partition(io.BytesIO(data), dest, expected, where="test")
    assert seen == set(expected)
    assert (dest / "PG_VERSION").read_bytes() == b"15\n"
    assert (dest / "pg_wal" / "archive_status").is_dir()
    assert (dest / "base" / "1" / "1259").stat().st_mode & 0o777 == 0o600
    assert (dest / "base").stat().st_mode & 0o777 == 0o700


def test_extract_starts_writeback_of_every_byte_in_order(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Restored files go to disk while the rest downloads (walship/diskio.py): each file's
    # writeback is started over contiguous ranges that end at its size, so the final syncfs
    # has only the last ranges left to wait for.
    calls: dict[int, list[tuple[int, int]]] = {}
    real = tarstream.diskio.start_writeback

    def record(fd: int, offset: int, nbytes: int) -> None:
        calls.setdefault(os.fstat(fd).st_ino, []).append((offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(tarstream.diskio, "start_writeback", record)
    root = tmp_path / "src"
    big = os.urandom(1024) * (2 * tarstream.diskio.WRITEBACK_AFTER // 1024 + 77)
    _write(root / "base" / "1" / "16384", big)
    _write(root / "PG_VERSION", b"15\n")
    reader = TarPartitionReader(root, list(walk_pgdata(root)))
    data = _stream(reader)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_partition(io.BytesIO(data), dest, {r.path: r for r in reader.records}, where="t")
    assert (dest / "base" / "1" / "16384").read_bytes() == big
    restored = {p.stat().st_ino: p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    assert calls.keys() == restored.keys()
    for inode, ranges in calls.items():
        assert ranges[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
        assert ranges[-1][0] + ranges[-1][1] == restored[inode]
    assert max(len(ranges) for ranges in calls.values()) >= 3


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, data: bytes = b"evil", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def _record(name: str, data: bytes = b"evil") -> FileRecord:
    return FileRecord(name, False, len(data), 0o600, 0, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("member,why", [
    (_member("../escaped"), "unsafe member name"),
    (_member("a/../../escaped"), "unsafe member name"),
    (_member("/tmp/escaped"), "unsafe member name"),
    (_member("./x"), "unsafe member name"),
    (_member("link", kind=tarfile.SYMTYPE, link="/etc"), "symbolic link"),
    (_member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd"), "hard link"),
    (_member("dev", kind=tarfile.CHRTYPE), "device"),
    (_member("fifo", kind=tarfile.FIFOTYPE), "device"),
    (_member("unlisted"), "not in the manifest"),
])
def test_extract_refuses_hostile_members(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes],
                                         why: str) -> None:
    dest = tmp_path / "sub" / "dest"
    dest.mkdir(parents=True)
    expected = {n: _record(n) for n in ("../escaped", "a/../../escaped", "/tmp/escaped", "./x",
                                        "link", "hard", "dev", "fifo")}
    with pytest.raises(IntegrityError, match=why):
        extract_partition(io.BytesIO(_tar(member)), dest, expected, where="test")
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "sub" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


def test_extract_refuses_writing_through_a_planted_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "pg_tblspc").mkdir()
    (dest / "pg_tblspc" / "1").symlink_to(outside)  # as if an earlier step had made it
    data = _tar(_member("pg_tblspc/1/file"))
    with pytest.raises(IntegrityError, match="not a directory"):
        extract_partition(io.BytesIO(data), dest, {"pg_tblspc/1/file": _record("pg_tblspc/1/file")},
                          where="test")
    assert list(outside.iterdir()) == []


def test_extract_refuses_duplicates_wrong_sizes_and_wrong_digests(tmp_path: Path) -> None:
    twice = _tar(_member("f"), _member("f"))
    dest = tmp_path / "d1"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="twice"):
        extract_partition(io.BytesIO(twice), dest, {"f": _record("f")}, where="test")
    dest = tmp_path / "d2"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="the manifest says"):
        extract_partition(io.BytesIO(_tar(_member("f", b"longer"))), dest, {"f": _record("f")},
                          where="test")
    dest = tmp_path / "d3"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="does not match"):
        extract_partition(io.BytesIO(_tar(_member("f", b"EVIL"))), dest, {"f": _record("f")},
                          where="test")
    dest = tmp_path / "d4"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="wrong type"):
        extract_partition(io.BytesIO(_tar(_member("f", kind=tarfile.DIRTYPE))), dest,
                          {"f": _record("f")}, where="test")


def test_extract_refuses_garbage(tmp_path: Path) -> None:
    data, expected = _roundtrip_source(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError):
        extract_partition(io.BytesIO(data[:1000] + b"\x01" * 600), dest, expected, where="test")


@pytest.mark.parametrize("bad", [
    {"path": "../x", "type": "file", "size": 1, "sha256": "0" * 64},
    {"path": "a//b", "type": "dir"},
    {"path": "a", "type": "link"},
    {"path": "a", "type": "file", "size": -1, "sha256": "0" * 64},
    {"path": "a", "type": "file", "size": 1, "sha256": "nothex"},
    ["not", "a", "dict"],
])
def test_manifest_records_are_validated(bad: object) -> None:
    with pytest.raises(IntegrityError):
        FileRecord.from_json(bad)
