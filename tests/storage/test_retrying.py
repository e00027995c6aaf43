"""The retry wrapper: what it retries, how long, what it says, and how get() resumes."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from typing import BinaryIO, cast

import pytest

from tests.helpers.faulty import FaultyStorage, InjectedFaultError
from walship.errors import ObjectNotFound, StorageUnavailable, TransientStorageError
from walship.storage.memory import MemoryStorage, reset_memory_stores
from walship.storage.retrying import RetryingStorage, RetryPolicy


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    name = f"retry-{uuid.uuid4().hex[:12]}"
    yield MemoryStorage(name)
    reset_memory_stores(name)


def fast(budget: float = 5.0) -> RetryPolicy:
    return RetryPolicy(budget, initial=0.001, maximum=0.01)


class Flaky:
    """A callable that fails transiently n times, then returns 'ok'."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error or TransientStorageError("503 slow down")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_policy_retries_transient_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    flaky = Flaky(3)
    with caplog.at_level(logging.WARNING, logger="walship.storage"):
        assert fast().call(flaky, "stat wal/1") == "ok"
    assert flaky.calls == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("retrying stat wal/1 after 503 slow down (attempt 1, ")
    assert lines[2].endswith("of budget 5s)")


def test_policy_does_not_retry_other_errors() -> None:
    flaky = Flaky(3, ObjectNotFound("gone"))
    with pytest.raises(ObjectNotFound):
        fast().call(flaky, "get k")
    assert flaky.calls == 1


def test_policy_gives_up_when_budget_is_used() -> None:
    flaky = Flaky(10**9)
    with pytest.raises(StorageUnavailable) as caught:
        RetryPolicy(0.3, initial=0.01, maximum=0.05).call(flaky, "put wal/1")
    error = caught.value
    # Exhaustion is not itself transient: an outer retry must not start over.
    assert type(error) is StorageUnavailable
    assert error.message.startswith(f"put wal/1 failed after {flaky.calls} attempts over 0.")
    assert error.message.endswith(": 503 slow down")
    assert error.hint and "retry_budget" in error.hint
    assert flaky.calls >= 3


def test_policy_with_zero_budget_tries_once() -> None:
    flaky = Flaky(1)
    with pytest.raises(StorageUnavailable, match="after 1 attempt over"):
        RetryPolicy(0).call(flaky, "stat k")
    assert flaky.calls == 1


def test_backoff_is_jittered_exponential_and_capped() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(1000.0, initial=0.1, maximum=10.0, sleep=sleeps.append)
    policy.call(Flaky(12), "stat k")
    ceilings = [min(10.0, 0.1 * 2**n) for n in range(12)]
    assert len(sleeps) == 12
    assert all(0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert len(set(sleeps)) > 1  # jittered, not a fixed schedule


def test_seekable_put_is_rewound_to_its_start(memory: MemoryStorage) -> None:
    faulty = FaultyStorage(memory, {"put": 2})
    store = RetryingStorage(faulty, fast())
    source = io.BytesIO(b"HEADERpayload")
    source.seek(6)  # the caller already consumed a header: retries start from here
    assert store.put("k", source) == 7
    assert memory.get("k").read() == b"payload"
    assert faulty.calls["put"] == 3


class OneWay(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        return self._data.readinto(buffer)


def test_unseekable_put_passes_through_once(memory: MemoryStorage) -> None:
    faulty = FaultyStorage(memory, {"put": 1})
    store = RetryingStorage(faulty, fast())
    with pytest.raises(TransientStorageError):
        store.put("k", cast(BinaryIO, OneWay(b"data")))
    assert faulty.calls["put"] == 1
    assert store.put("k", cast(BinaryIO, OneWay(b"data"))) == 4


def test_get_resumes_mid_stream(memory: MemoryStorage) -> None:
    data = bytes(range(256)) * 100
    memory.put("k", io.BytesIO(data))
    faulty = FaultyStorage(memory, {"get": 1}, read_failures=5, read_fail_every=1000)
    store = RetryingStorage(faulty, fast())
    with store.get("k", offset=500) as stream:
        got = bytearray()
        while chunk := stream.read(700):
            got += chunk
    assert bytes(got) == data[500:]
    assert faulty.get_offsets == [500, 1500, 2500, 3500, 4500, 5500]


def test_get_with_info_is_retried_and_resumes(memory: MemoryStorage) -> None:
    data = bytes(range(256)) * 100
    memory.put("k", io.BytesIO(data), metadata={"size": str(len(data))})
    faulty = FaultyStorage(memory, {"stat": 1, "get": 1}, read_failures=2, read_fail_every=4000)
    store = RetryingStorage(faulty, fast())
    info, stream = store.get_with_info("k")
    with stream:
        assert stream.read() == data
    assert info.metadata == {"size": str(len(data))}
    # The stat fault and the get fault each cost one retry of the whole call; the two read
    # faults are resumed from the byte reached.
    assert faulty.calls["stat"] == 3
    assert faulty.get_offsets == [0, 4000, 8000]


def test_get_resume_gives_up_after_budget(memory: MemoryStorage) -> None:
    memory.put("k", io.BytesIO(b"x" * 10_000))
    # Every reopened stream fails at its first read: no progress, so the budget runs out.
    faulty = FaultyStorage(memory, read_failures=10**9, read_fail_every=0)
    store = RetryingStorage(faulty, RetryPolicy(0.2, initial=0.01, maximum=0.02))
    with (
        store.get("k", offset=100) as stream,
        pytest.raises(StorageUnavailable, match=r"read k at byte 100 failed after"),
    ):
        stream.read(100)
    assert len(faulty.get_offsets) > 2
    assert set(faulty.get_offsets) == {100}


def test_readinto_on_resumed_stream(memory: MemoryStorage) -> None:
    memory.put("k", io.BytesIO(b"abcdefghij"))
    store = RetryingStorage(FaultyStorage(memory, read_failures=1, read_fail_every=4), fast())
    with store.get("k") as stream:
        assert isinstance(stream, io.BufferedIOBase)
        buffer = bytearray(10)
        # The inner stream stops at byte 4 and then fails; the stream reopens at byte 4 and
        # the one readinto() still fills the whole buffer, as BufferedIOBase promises.
        assert stream.readinto(buffer) == 10
        assert stream.read() == b""
    assert bytes(buffer) == b"abcdefghij"
    assert memory_offsets(store) == [0, 4]


def memory_offsets(store: RetryingStorage) -> list[int]:
    """The offsets the FaultyStorage under `store` was asked to get from."""
    inner = store.inner
    assert isinstance(inner, FaultyStorage)
    return inner.get_offsets


def test_read_n_is_never_short_before_the_end(memory: MemoryStorage) -> None:
    """read(n) returns n bytes unless the object ends first, even when an inner read comes
    back short before a fault (an S3 body cut off mid-way): callers parse one read(n)."""
    memory.put("k", io.BytesIO(b"0123456789" * 10))
    store = RetryingStorage(FaultyStorage(memory, read_failures=3, read_fail_every=7), fast())
    with store.get("k") as stream:
        assert stream.read(65536) == b"0123456789" * 10
    with store.get("k") as stream:
        assert stream.read(30) == b"0123456789" * 3
        assert stream.read1(1000) != b""


def test_list_resumes_without_duplicates(memory: MemoryStorage) -> None:
    keys = [f"wal/{i:04d}" for i in range(10)]
    for key in keys:
        memory.put(key, io.BytesIO(b""))
    faulty = FaultyStorage(memory, {"list": 2}, list_fail_after=4)
    store = RetryingStorage(faulty, fast())
    assert [i.key for i in store.list("wal/")] == keys
    assert faulty.calls["list"] == 3


def test_stat_delete_and_list_are_retried(memory: MemoryStorage) -> None:
    memory.put("k", io.BytesIO(b"x"))
    faulty = FaultyStorage(memory, {"stat": 2, "delete_many": 2, "list": 2})
    store = RetryingStorage(faulty, fast())
    assert store.stat("k").size == 1
    assert [i.key for i in store.list("")] == ["k"]
    assert store.delete_many(iter(["k"])) == 1
    assert faulty.calls == {"stat": 3, "list": 3, "delete_many": 3}


def test_wrapper_reports_live_capabilities(memory: MemoryStorage) -> None:
    store = RetryingStorage(memory, fast())
    assert store.capabilities is memory.capabilities
    assert store.url == memory.url


def test_injected_fault_is_transient() -> None:
    assert issubclass(InjectedFaultError, TransientStorageError)
