"""The one suite every backend passes: the contract in walship/storage/base.py, method by method.

Each test runs against memory://, file://, s3:// (a real moto server) and gs://
(gcp-storage-emulator), opened through
open_storage exactly as services open them, so the retry wrapper is in the path too.
"""

from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO, cast

import pytest

from tests.helpers.faulty import FaultyStorage
from walship.config import Config, MiB
from walship.errors import AlreadyExists, ObjectNotFound
from walship.storage import Storage
from walship.storage.retrying import RetryingStorage, RetryPolicy


class PipeSource(io.RawIOBase):
    """A non-seekable source that returns short reads, like a pipe from a compressor."""

    def __init__(self, data: bytes, chunk: int = 65536) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self._chunk, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def put_bytes(store: Storage, key: str, data: bytes, **kwargs: object) -> int:
    return store.put(key, io.BytesIO(data), **kwargs)  # type: ignore[arg-type]


def read_all(store: Storage, key: str, offset: int = 0) -> bytes:
    with store.get(key, offset) as stream:
        return stream.read()


def test_round_trip_with_metadata(store: Storage) -> None:
    data = os.urandom(100_000)
    meta = {"sha256": "ab" * 32, "codec": "lz4", "x-1": "v"}
    assert store.put("wal/000000010000000000000001", io.BytesIO(data), metadata=meta) == len(data)
    assert read_all(store, "wal/000000010000000000000001") == data
    info = store.stat("wal/000000010000000000000001")
    assert info.key == "wal/000000010000000000000001"
    assert info.size == len(data)
    assert dict(info.metadata) == meta
    assert info.modified is not None


def test_empty_object(store: Storage) -> None:
    assert put_bytes(store, "empty", b"") == 0
    assert read_all(store, "empty") == b""
    assert store.stat("empty").size == 0
    assert [i.key for i in store.list("")] == ["empty"]


def test_put_overwrites_without_if_absent(store: Storage) -> None:
    put_bytes(store, "k", b"first", metadata={"v": "1"})
    put_bytes(store, "k", b"second", metadata={"v": "2"})
    assert read_all(store, "k") == b"second"
    assert dict(store.stat("k").metadata) == {"v": "2"}


@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "pipe"])
def test_large_object_crosses_multipart_threshold(
    store: Storage, config: Config, seekable: bool
) -> None:
    data = os.urandom(11 * MiB)
    assert len(data) > 2 * config.s3_part_size
    source = cast(BinaryIO, io.BytesIO(data) if seekable else PipeSource(data))
    assert store.put("basebackups/big", source, metadata={"part": "x"}) == len(data)
    assert store.stat("basebackups/big").size == len(data)
    assert dict(store.stat("basebackups/big").metadata) == {"part": "x"}
    with store.get("basebackups/big") as stream:
        got = bytearray()
        while chunk := stream.read(1 * MiB):
            got += chunk
    assert bytes(got) == data
    assert read_all(store, "basebackups/big", offset=6 * MiB + 3) == data[6 * MiB + 3 :]


def test_object_exactly_at_threshold(store: Storage, config: Config) -> None:
    data = os.urandom(config.s3_multipart_threshold)
    assert put_bytes(store, "edge", data) == len(data)
    assert read_all(store, "edge") == data


def test_get_with_offset(store: Storage) -> None:
    data = bytes(range(256)) * 40
    put_bytes(store, "o", data)
    assert read_all(store, "o", 0) == data
    assert read_all(store, "o", 1) == data[1:]
    assert read_all(store, "o", 5000) == data[5000:]
    assert read_all(store, "o", len(data) - 1) == data[-1:]
    assert read_all(store, "o", len(data)) == b""
    assert read_all(store, "o", len(data) + 10) == b""


def test_get_reads_in_small_steps(store: Storage) -> None:
    data = os.urandom(10_000)
    put_bytes(store, "steps", data)
    with store.get("steps") as stream:
        got = b"".join(iter(lambda: stream.read(333), b""))
    assert got == data


# '-' and '.' sort before '/', so a naive directory walk would put "a/..." too early.
TRICKY_KEYS = ["a", "a-b", "a.b", "a/b", "a/c/d", "a/c.x", "a0", "b/x", "wal/0001", "wal/0002"]


def test_listing_is_ascending_and_filtered(store: Storage, backend_kind: str) -> None:
    keys = [k for k in TRICKY_KEYS if not (backend_kind == "file" and k == "a")]
    # A file and a directory cannot share a name on a filesystem; elsewhere they can.
    for key in reversed(keys):
        put_bytes(store, key, key.encode())
    listed = list(store.list(""))
    assert [i.key for i in listed] == sorted(keys)
    assert all(i.size == len(i.key) for i in listed)
    assert [i.key for i in store.list("a/")] == ["a/b", "a/c.x", "a/c/d"]
    assert [i.key for i in store.list("a/c")] == ["a/c.x", "a/c/d"]
    assert [i.key for i in store.list("wal/")] == ["wal/0001", "wal/0002"]
    assert [i.key for i in store.list("wal/0002")] == ["wal/0002"]
    assert [i.key for i in store.list("zzz")] == []
    assert [i.key for i in store.list("a.")] == ["a.b"]


def test_list_of_empty_store(store: Storage) -> None:
    assert list(store.list("")) == []
    assert list(store.list("wal/")) == []


def test_delete_many(store: Storage) -> None:
    for i in range(12):
        put_bytes(store, f"wal/{i:04d}", b"x")
    asked = store.delete_many([f"wal/{i:04d}" for i in range(0, 12, 2)] + ["wal/absent", "nope"])
    assert asked == 8
    assert [i.key for i in store.list("wal/")] == [f"wal/{i:04d}" for i in range(1, 12, 2)]
    with pytest.raises(ObjectNotFound):
        store.stat("wal/0000")
    assert store.delete_many([]) == 0
    assert store.delete_many(["wal/0000"]) == 1  # again: already absent is fine


def test_if_absent(store: Storage, backend_kind: str) -> None:
    assert put_bytes(store, "wal/1", b"original", if_absent=True) == 8
    with pytest.raises(AlreadyExists):
        put_bytes(store, "wal/1", b"different", if_absent=True)
    assert read_all(store, "wal/1") == b"original"
    # Documented: only the GCS emulator (which ignores if_generation_match=0) lacks an atomic
    # create-if-absent; there the backend looks first, and services check the digest.
    assert store.capabilities.create_if_absent == (backend_kind != "gs")


def test_if_absent_large_object(store: Storage) -> None:
    data = os.urandom(11 * MiB)
    put_bytes(store, "big", b"small")
    with pytest.raises(AlreadyExists):
        put_bytes(store, "big", data, if_absent=True)
    assert read_all(store, "big") == b"small"


def test_if_absent_race_has_one_winner(store: Storage) -> None:
    winners: list[int] = []
    losers: list[int] = []
    barrier = threading.Barrier(6)

    def contender(n: int) -> None:
        barrier.wait()
        try:
            put_bytes(store, "race", str(n).encode() * 1000, if_absent=True)
            winners.append(n)
        except AlreadyExists:
            losers.append(n)

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) + len(losers) == 6
    if store.capabilities.create_if_absent:
        assert len(winners) == 1
        assert read_all(store, "race") == str(winners[0]).encode() * 1000
    else:
        # Documented: without store-side enforcement the look-first is not atomic, so
        # several contenders may "win"; the object is still one whole contender's bytes.
        assert winners
        assert read_all(store, "race") in {str(n).encode() * 1000 for n in winners}


def test_not_found(store: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("wal/missing")
    with pytest.raises(ObjectNotFound):
        store.stat("wal/missing")
    put_bytes(store, "dir/file", b"x")
    # A "directory" on a filesystem is not an object.
    with pytest.raises(ObjectNotFound):
        store.stat("dir")
    with pytest.raises(ObjectNotFound):
        store.get("dir")


def test_get_with_info_is_stat_and_get(store: Storage) -> None:
    data = os.urandom(300_000)
    meta = {"sha256": "cd" * 32, "size": str(len(data))}
    put_bytes(store, "wal/000000010000000000000002", data, metadata=meta)
    info, stream = store.get_with_info("wal/000000010000000000000002")
    with stream:
        assert stream.read() == data
    stat = store.stat("wal/000000010000000000000002")
    assert (info.key, info.size, dict(info.metadata)) == (stat.key, stat.size, dict(stat.metadata))
    assert info.modified is not None
    with pytest.raises(ObjectNotFound):
        store.get_with_info("wal/missing")
    put_bytes(store, "dir/file", b"x")
    with pytest.raises(ObjectNotFound):
        store.get_with_info("dir")


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/../b", "..", ".", "a/./b", "trailing/", "sp ace", "é", "a\nb"]
)
def test_invalid_keys_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        put_bytes(store, key, b"x")
    with pytest.raises(ValueError, match="invalid storage key"):
        store.get(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        store.stat(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        store.delete_many([key])


@pytest.mark.parametrize(
    "metadata", [{"Upper": "x"}, {"a": "é"}, {"a": "line\nbreak"}, {"a": "x" * 2000}]
)
def test_invalid_metadata_is_refused(store: Storage, metadata: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        put_bytes(store, "k", b"x", metadata=metadata)
    assert list(store.list("")) == []


def test_two_opens_see_the_same_objects(store_url: str, config: Config) -> None:
    from walship.storage import open_storage

    with open_storage(store_url, config) as first, open_storage(store_url, config) as second:
        put_bytes(first, "shared", b"seen")
        assert read_all(second, "shared") == b"seen"


def test_transient_faults_are_retried_over_backend(store: Storage) -> None:
    """The retry wrapper over each real backend: put, stat, list, delete and a resumed get."""
    assert isinstance(store, RetryingStorage)
    faulty = FaultyStorage(
        store.inner,
        {"put": 2, "stat": 1, "get": 1, "delete_many": 1, "list": 1},
        read_failures=2,
        read_fail_every=4000,
    )
    wrapped = RetryingStorage(faulty, RetryPolicy(5.0, initial=0.001))
    data = os.urandom(10_000)
    assert put_bytes(wrapped, "r", data) == len(data)
    assert wrapped.stat("r").size == len(data)
    assert read_all(wrapped, "r") == data
    # The first get() failed before opening; then two reads failed and resumed where they were.
    assert faulty.get_offsets == [0, 4000, 8000]
    assert [i.key for i in wrapped.list("")] == ["r"]
    assert wrapped.delete_many(["r"]) == 1
    assert list(wrapped.list("")) == []
