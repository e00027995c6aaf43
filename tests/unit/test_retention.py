"""Retention planning: hypothesis properties over generated archives, plus apply/CLI checks
against the in-memory store.

The generator builds archives the way PostgreSQL produces them: timeline 1 from some segment
on, PITR branches (timeline N forks from an older timeline at an LSN), backups on any
timeline, incomplete backups, and optionally gaps. The properties are checked against an
oracle written independently of walship.ops.retention.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from walship import layout, pipeline, wal
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import (
    IntegrityError,
    LockHeld,
    ObjectNotFound,
    UnsafeOperation,
    UsageError,
)
from walship.ops import retention
from walship.ops.backup_list import BackupInfo, sentinel_bytes
from walship.ops.delete_cli import delete_group
from walship.ops.locks import store_lock
from walship.ops.retention import Inventory, Policy, StoredObject
from walship.storage.memory import MemoryStorage, reset_memory_stores

SEG = wal.DEFAULT_SEGMENT_SIZE
T0 = datetime(2020, 11, 1, tzinfo=timezone.utc)


def make_backup(tli: int, start_segno: int, stop_segno: int, when: datetime) -> BackupInfo:
    """A sentinel's worth of BackupInfo: starts 0x28 bytes into its start segment."""
    start = start_segno * SEG + 0x28
    stop = stop_segno * SEG + 0x100
    return BackupInfo(
        name=wal.backup_name(tli, start, SEG), start_lsn=start, stop_lsn=stop, timeline=tli,
        start_time=when, stop_time=when + timedelta(minutes=1), pg_version="15.0",
        pg_version_num=150000, system_identifier=1, wal_segment_size=SEG, label="t",
        data_bytes=100, stored_bytes=50, partitions=1, files=1, compression="lz4",
        encrypted=False,
    )


def backup_objects(name: str, complete: bool) -> tuple[StoredObject, ...]:
    objs = [StoredObject(layout.backup_partition_key(name, 0), 1000),
            StoredObject(layout.backup_partition_files_key(name, 0), 10),
            StoredObject(layout.backup_manifest_key(name), 20)]
    if complete:
        objs.append(StoredObject(layout.sentinel_key(name), 5))
    return tuple(objs)


@dataclass
class Model:
    """A generated archive and the truth about it."""

    inventory: Inventory
    parents: dict[int, tuple[int, int]]  # timeline -> (parent, switch segno)
    segments: dict[int, set[int]]  # full segments present per timeline
    incomplete: list[str]

    def ancestry(self, tli: int) -> dict[int, int]:
        """Ancestor timeline -> the segno at which it was left on the way to `tli`."""
        result: dict[int, int] = {}
        while tli in self.parents:
            parent, segno = self.parents[tli]
            result[parent] = segno
            tli = parent
        return result

    def truly_reaches(self, b: BackupInfo, tli: int) -> bool:
        if tli == b.timeline:
            return True
        anc = self.ancestry(tli)
        return b.timeline in anc and anc[b.timeline] * SEG + 0x80 >= b.start_lsn


@st.composite
def archives(draw: st.DrawFn, allow_gaps: bool = True) -> Model:
    lo = draw(st.integers(1, 5))
    hi = lo + draw(st.integers(2, 25))
    ranges = {1: (lo, hi)}
    parents: dict[int, tuple[int, int]] = {}
    for tli in range(2, 2 + draw(st.integers(0, 3))):
        parent = draw(st.integers(1, tli - 1))
        plo, phi = ranges[parent]
        switch = draw(st.integers(plo, phi))
        ranges[tli] = (switch, switch + draw(st.integers(0, 12)))
        parents[tli] = (parent, switch)
    segments = {t: set(range(a, b + 1)) for t, (a, b) in ranges.items()}
    if allow_gaps and draw(st.booleans()):
        t = draw(st.sampled_from(sorted(segments)))
        if segments[t]:
            segments[t].discard(draw(st.sampled_from(sorted(segments[t]))))

    # Backups: (timeline, start, stop) inside the timeline's range; times follow WAL order.
    specs: dict[tuple[int, int], int] = {}  # (timeline, start) names the backup
    for _ in range(draw(st.integers(0, 6))):
        t = draw(st.sampled_from(sorted(ranges)))
        a, b = ranges[t]
        start = draw(st.integers(a, b))
        specs[(t, start)] = min(b, start + draw(st.integers(0, 3)))
    ordered = sorted((t, start, stop) for (t, start), stop in specs.items())
    incomplete_flags = [draw(st.booleans()) and draw(st.booleans()) for _ in ordered]
    backups = []
    incomplete = []
    objects: dict[str, tuple[StoredObject, ...]] = {}
    wal_files = []
    for i, ((t, start, stop), broken) in enumerate(zip(ordered, incomplete_flags, strict=True)):
        info = make_backup(t, start, stop, T0 + timedelta(hours=i))
        objects[info.name] = backup_objects(info.name, not broken)
        if broken:
            incomplete.append(info.name)
        else:
            backups.append(info)
        wal_files.append(StoredObject(layout.wal_key(info.history_file), 300))
    for t, segs in segments.items():
        for s in segs:
            wal_files.append(StoredObject(
                layout.wal_key(wal.segment_from_segno(t, s, SEG).name), 4000))
    histories: dict[int, tuple[wal.TimelineSwitch, ...] | None] = {}
    for t in parents:
        wal_files.append(StoredObject(layout.wal_key(f"{t:08X}.history"), 40))
        if draw(st.booleans()):
            chain = []
            cur = t
            while cur in parents:
                parent, switch = parents[cur]
                chain.append(wal.TimelineSwitch(parent, switch * SEG + 0x80, "r"))
                cur = parent
            histories[t] = tuple(reversed(chain))
        else:
            histories[t] = None
    inv = Inventory(tuple(draw(st.permutations(wal_files))), objects, tuple(backups), histories)
    return Model(inv, parents, segments, incomplete)


@st.composite
def policies(draw: st.DrawFn, model: Model) -> Policy:
    kind = draw(st.sampled_from(["retain", "before-name", "before-time"]))
    backups = sorted(model.inventory.backups, key=lambda b: b.sort_key)
    if kind == "retain":
        return Policy("retain", count=draw(st.integers(1, 7)))
    if kind == "before-name" and backups:
        return Policy("before-name", name=draw(st.sampled_from(backups)).name)
    return Policy("before-time", time=T0 + timedelta(minutes=draw(st.integers(-60, 600))))


def oracle_gap(model: Model, kept: list[BackupInfo]) -> bool:
    """Whether some kept backup's chain (start .. newest on its timeline) has a hole."""
    for b in kept:
        have = model.segments.get(b.timeline, set())
        first = b.start_lsn // SEG
        last = max([(b.stop_lsn - 1) // SEG, *have])
        if any(s not in have for s in range(first, last + 1)):
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_plan_properties(data: st.DataObject) -> None:
    model = data.draw(archives())
    policy = data.draw(policies(model))
    backups = sorted(model.inventory.backups, key=lambda b: b.sort_key)
    kept = policy.keep(backups)
    try:
        plan = retention.plan_deletion(model.inventory, policy)
    except UnsafeOperation as exc:
        assert oracle_gap(model, kept), exc.message
        assert "needs WAL segment" in exc.message
        with pytest.raises(UnsafeOperation):  # the same answer twice
            retention.plan_deletion(model.inventory, policy)
        return
    assert not oracle_gap(model, kept)
    assert plan == retention.plan_deletion(model.inventory, policy)
    deleted = set(plan.keys)
    assert len(deleted) == len(plan.keys)  # no key twice

    # .history files are never deleted.
    assert not any(k.endswith(".history") for k in deleted)
    if not backups:
        assert not deleted
        return
    # The newest complete backup is always kept, and kept backups lose nothing.
    assert backups[-1] in plan.kept
    assert list(plan.kept) == kept
    for b in plan.kept:
        assert not deleted & {o.key for o in model.inventory.backup_objects[b.name]}
    # No kept backup loses a WAL file it can reach (by the true timeline graph).
    for obj in model.inventory.wal_files:
        name = wal.parse_wal_name(obj.key.removeprefix(layout.WAL_PREFIX))
        if name.kind is wal.WalKind.TIMELINE_HISTORY:
            continue
        needed = any(model.truly_reaches(b, name.timeline)
                     and name.segno(SEG) >= b.start_lsn // SEG for b in plan.kept)
        if needed:
            assert obj.key not in deleted, (obj.key, [b.name for b in plan.kept])
        elif all(h is not None for h in model.inventory.histories.values()):
            # With the whole graph known, the plan is exact: unneeded WAL goes.
            assert obj.key in deleted, obj.key
    # Incomplete backups: older than the newest complete one go entirely, newer ones stay.
    newest = backups[-1].sort_key[:2]
    for name in model.incomplete:
        keys = {o.key for o in model.inventory.backup_objects[name]}
        seg, off = wal.parse_backup_name(name)
        if (seg.timeline, seg.segno(SEG) * SEG + off) < newest:
            assert keys <= deleted
        else:
            assert not keys & deleted
    # Order: sentinels, then other backup objects, then WAL.
    kinds = ["sentinel" if k.endswith("/" + layout.SENTINEL_NAME) else
             "backup" if k.startswith(layout.BACKUP_PREFIX) else "wal" for k in plan.keys]
    rank = {"sentinel": 0, "backup": 1, "wal": 2}
    assert [rank[k] for k in kinds] == sorted(rank[k] for k in kinds)
    # A moment at or after a before-time policy's time stays restorable.
    if policy.kind == "before-time":
        assert policy.time is not None
        if any(b.stop_time <= policy.time for b in backups):
            assert any(b.stop_time <= policy.time for b in plan.kept)
        else:
            assert list(plan.kept) == backups
    assert plan.bytes == sum(d.size for d in plan.deletions)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_without_gaps_the_plan_never_refuses(data: st.DataObject) -> None:
    model = data.draw(archives(allow_gaps=False))
    policy = data.draw(policies(model))
    retention.plan_deletion(model.inventory, policy)


def test_refuses_and_names_the_missing_segment() -> None:
    b1 = make_backup(1, 2, 3, T0)
    b2 = make_backup(1, 6, 7, T0 + timedelta(hours=1))
    segs = [s for s in range(1, 10) if s != 8]
    inv = Inventory(
        tuple(StoredObject(layout.wal_key(wal.segment_from_segno(1, s, SEG).name), 1)
              for s in segs),
        {b.name: backup_objects(b.name, True) for b in (b1, b2)}, (b1, b2))
    with pytest.raises(UnsafeOperation) as caught:
        retention.plan_deletion(inv, Policy("retain", count=1))
    assert "000000010000000000000008" in caught.value.message
    assert caught.value.exit_code == 15


def test_parsers() -> None:
    assert retention.parse_duration("7d") == timedelta(days=7)
    assert retention.parse_duration("12h") == timedelta(hours=12)
    for bad in ("7", "d", "0d", "-1d", "7y", ""):
        with pytest.raises(UsageError):
            retention.parse_duration(bad)
    assert retention.parse_time("2026-11-21 06:00:00+00") == \
        datetime(2026, 11, 21, 6, tzinfo=timezone.utc)
    with pytest.raises(UsageError, match="not a time"):
        retention.policy_before("yesterday")
    assert retention.policy_before("base_000000010000000000000002_00000028").kind == \
        "before-name"
    with pytest.raises(UsageError):
        retention.policy_retain(0)
    with pytest.raises(ObjectNotFound):
        Policy("before-name", name="base_000000010000000000000002_00000028").keep(
            [make_backup(1, 3, 3, T0)])


# --- Against a store: gather, apply, interruption, lock, CLI -------------------------------


@pytest.fixture
def store() -> Iterator[MemoryStorage]:
    name = f"retention-{uuid.uuid4().hex}"
    yield MemoryStorage(name)
    reset_memory_stores(name)


def _put(storage: MemoryStorage, key: str, data: bytes) -> None:
    storage.put(key, io.BytesIO(data))


def fill(storage: MemoryStorage, *, key_history: bool = True) -> list[BackupInfo]:
    """Timeline 1 segments 1..12 with backups at 2, 5 and 9; timeline 2 forks at segment 7."""
    backups = [make_backup(1, s, s + 1, T0 + timedelta(hours=i))
               for i, s in enumerate((2, 5, 9))]
    for s in range(1, 13):
        _put(storage, layout.wal_key(wal.segment_from_segno(1, s, SEG).name), b"x" * 10)
    for s in range(7, 11):
        _put(storage, layout.wal_key(wal.segment_from_segno(2, s, SEG).name), b"y" * 10)
    history = pipeline.encode_bytes(b"1\t0/7000080\tbefore 2026-11-01\n", "none", None)
    _put(storage, layout.wal_key("00000002.history"), history if key_history else b"\x89junk")
    for b in backups:
        _put(storage, layout.wal_key(b.history_file), b"h")
        for obj in backup_objects(b.name, False):
            _put(storage, obj.key, b"p" * 7)
        _put(storage, layout.sentinel_key(b.name), sentinel_bytes(b))
    # An incomplete backup between the first two: garbage.
    dead = make_backup(1, 3, 4, T0)
    _put(storage, layout.backup_partition_key(dead.name, 0), b"dead")
    return backups


def _keys(storage: MemoryStorage) -> set[str]:
    return {o.key for o in storage.list("")}


def test_apply_retain_2_with_a_branch(store: MemoryStorage) -> None:
    b1, b2, _b3 = fill(store)
    inv = retention.gather_inventory(store, Keyring())
    plan = retention.plan_deletion(inv, retention.policy_retain(2))
    assert plan.deleted_backups == (b1.name,)
    assert len(plan.garbage_backups) == 1
    before = _keys(store)
    result = retention.apply_plan(store, plan, batch=2)
    after = _keys(store)
    assert before - after == set(plan.keys) and result.objects == len(plan.keys)
    assert result.bytes == plan.bytes > 0
    wal_left = sorted(k.removeprefix("wal/") for k in after if k.startswith("wal/"))
    # Timeline 1 from b2's start (segment 5); timeline 2 forked at 7 >= 5: all kept.
    assert "00000002.history" in wal_left
    assert "000000010000000000000004" not in wal_left
    assert "000000010000000000000005" in wal_left
    assert {f"0000000200000000000000{s:02X}" for s in range(7, 11)} <= set(wal_left)
    assert b1.history_file not in wal_left and b2.history_file in wal_left
    # Running again finds nothing more to do.
    again = retention.plan_deletion(retention.gather_inventory(store, Keyring()),
                                    retention.policy_retain(2))
    assert again.deletions == ()


def test_branch_before_the_oldest_kept_start_goes_when_the_history_is_known(
        store: MemoryStorage) -> None:
    fill(store)
    plan = retention.plan_deletion(retention.gather_inventory(store, Keyring()),
                                   retention.policy_retain(1))
    # Timeline 2 left timeline 1 at segment 7, before the only kept backup (segment 9).
    assert "wal/000000020000000000000008" in plan.keys


def test_unreadable_history_keeps_the_branch(store: MemoryStorage) -> None:
    fill(store, key_history=False)
    plan = retention.plan_deletion(retention.gather_inventory(store, Keyring()),
                                   retention.policy_retain(1))
    assert "wal/000000020000000000000009" not in plan.keys
    assert "wal/000000020000000000000008" in plan.keys  # older than every kept start
    assert any("unreadable" in n for n in plan.notes)


def test_interrupted_delete_finishes_on_rerun(store: MemoryStorage) -> None:
    b1, _b2, _b3 = fill(store)
    plan = retention.plan_deletion(retention.gather_inventory(store, Keyring()),
                                   retention.policy_retain(2))
    assert plan.keys[0] == layout.sentinel_key(b1.name)
    store.delete_many(plan.keys[:2])  # the sentinel and one partition, then a crash
    inv = retention.gather_inventory(store, Keyring())
    assert b1.name not in {b.name for b in inv.backups}  # never listed as complete again
    rerun = retention.plan_deletion(inv, retention.policy_retain(2))
    retention.apply_plan(store, rerun)
    assert not any(k.startswith(layout.backup_prefix(b1.name)) for k in _keys(store))
    assert set(plan.keys) - set(plan.keys[:2]) == set(rerun.keys)


def test_confirm_takes_the_backup_lock(store: MemoryStorage) -> None:
    fill(store)
    config = Config(store=store.url)
    with store_lock(store, "backup", "backup-push"), pytest.raises(LockHeld):
        retention.delete(config, retention.policy_retain(1), confirm=True)
    plan, result = retention.delete(config, retention.policy_retain(1), confirm=False)
    assert result is None and plan.deletions


def test_cli_group_dry_run_then_confirm(store: MemoryStorage,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    b1, b2, _b3 = fill(store)
    monkeypatch.setenv("WALSHIP_STORE", store.url)
    monkeypatch.delenv("WALSHIP_CONFIG", raising=False)
    runner = CliRunner()
    before = _keys(store)
    dry = runner.invoke(delete_group, ["retain", "2"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and layout.sentinel_key(b1.name) in dry.output
    assert _keys(store) == before
    as_json = runner.invoke(delete_group, ["before", b2.name, "--json"])
    data = json.loads(as_json.output)
    assert data["dry_run"] is True and data["deleted_backups"] == [b1.name]
    assert all({"key", "reason", "bytes"} <= set(d) for d in data["deletions"])
    done = runner.invoke(delete_group, ["retain-window", "1d", "--confirm", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    # T0 is years ago: the newest backup that finished a day ago or earlier is b3.
    assert result["deleted_backups"] == [b1.name, b2.name]
    assert result["deleted_objects"] == result["objects"] > 0
    bad = runner.invoke(delete_group, ["retain-window", "soon"])
    assert isinstance(bad.exception, UsageError)


def test_empty_store_dry_run_is_nothing_to_do(store: MemoryStorage) -> None:
    plan, result = retention.delete(Config(store=store.url), retention.policy_retain(1),
                                    confirm=False)
    assert plan.deletions == () and "the store is empty" in plan.notes and result is None
    assert "the store is empty" in retention.render(plan, result, as_json=False, confirm=False)


def test_confirmed_delete_in_an_empty_store_is_refused(store: MemoryStorage) -> None:
    with pytest.raises(ObjectNotFound, match="holds no backups and no WAL"):
        retention.delete(Config(store=store.url), retention.policy_retain(1), confirm=True)
    assert list(store.list("")) == []  # not even a lock was written
    # WAL without a backup yet (a new cluster before its first backup): nothing to do, exit 0.
    store.put("wal/000000010000000000000001", io.BytesIO(b"w"))
    plan, result = retention.delete(Config(store=store.url), retention.policy_retain(1),
                                    confirm=True)
    assert plan.deletions == () and result is not None and result.objects == 0


def test_cross_check_against_the_backup_history_files(store: MemoryStorage) -> None:
    backups = fill(store)
    assert retention.cross_check(store, Keyring(), backups) == 0  # b"h" is not a history
    b1 = backups[0]
    text = (f"START WAL LOCATION: {wal.format_lsn(b1.start_lsn)} (file x)\n"
            f"STOP WAL LOCATION: {wal.format_lsn(b1.stop_lsn)} (file y)\n")
    store.delete_many([layout.wal_key(b1.history_file)])
    _put(store, layout.wal_key(b1.history_file), pipeline.encode_bytes(text.encode(), "lz4",
                                                                        None))
    assert retention.cross_check(store, Keyring(), backups) == 1
    with pytest.raises(IntegrityError, match="sentinel says"):
        retention.cross_check(store, Keyring(), [b1.replace(stop_lsn=b1.stop_lsn + 8)])
