"""Retention: `walship delete`. Plan first, purely; then check; then apply under the lock.

The plan is computed by `plan_deletion` from an `Inventory` (names, sizes, sentinel data and
timeline histories: no I/O) and a `Policy`. `gather_inventory` builds the inventory from a
store and `apply_plan` carries a plan out. The rules (docs/retention.md):

- Backups: the policy chooses which complete backups to keep; the newest complete backup is
  always kept. A backup without a sentinel (its push died) that is older than the newest
  complete backup is garbage; a newer one may be a push in progress and is left alone.
- WAL: a segment (or .partial, or .backup history file) on timeline T at segment number S is
  kept when some kept backup B can reach it: T is B's timeline or a timeline descending from
  it that branched at or after B's start, and S is at or after B's start segment. Everything
  else under wal/ goes, except `.history` files, which are never deleted.
- Unknown timeline graph (a history file cannot be read, e.g. only the public key is
  configured): every timeline newer than a kept backup's own is assumed to descend from it.
  That keeps more, never less.
- Safety: before anything is deleted, every kept backup must have an unbroken chain of
  archived segments from its start segment to its stop segment and on to the newest segment
  archived on its timeline. Otherwise UnsafeOperation names the first missing segment.
- Order: sentinels of deleted backups first (so a half-deleted backup is never listed as
  complete), then their other objects and garbage backups, then WAL. Re-running after an
  interruption finishes the job.
- Cross-check: where a decryption key is available, each backup's .backup history file must
  agree with its sentinel on start and stop LSN, or nothing is deleted (IntegrityError).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from walship import layout, log, pipeline, wal
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import (
    IntegrityError,
    KeyMismatch,
    ObjectNotFound,
    UnsafeOperation,
    UsageError,
)
from walship.ops.backup_list import BackupInfo, list_backups
from walship.ops.locks import BACKUP_LOCK, StoreLock, store_lock
from walship.storage import open_storage
from walship.storage.base import Storage

_log = log.get("retention")

# Keys per delete_many call: S3's DeleteObjects limit.
BATCH = 1000


# --- Inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    """One object in the store: its key and stored size."""

    key: str
    size: int


@dataclass(frozen=True)
class Inventory:
    """What the planner sees: every object name and size, and what can be read without keys.

    histories maps a timeline to its parsed history, or to None when the file exists but
    could not be read (encrypted and no decryption key, or damaged). A timeline > 1 absent
    from the map has no history file in the store: its ancestry is unknown too.
    """

    wal_files: tuple[StoredObject, ...]
    backup_objects: Mapping[str, tuple[StoredObject, ...]]
    backups: tuple[BackupInfo, ...]
    histories: Mapping[int, tuple[wal.TimelineSwitch, ...] | None] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether the store holds no WAL and no backups at all."""
        return not self.wal_files and not self.backup_objects


@dataclass(frozen=True)
class Policy:
    """Which backups to keep: `retain` N newest, or everything needed after `before`.

    kind is "retain" (count), "before-name" (name: keep that backup and newer ones),
    "before-time" (time: keep the newest backup that finished at or before it and all newer,
    so that any moment from `time` on stays restorable; all if none finished by then).
    retain-window D is before-time with time = now - D.
    """

    kind: str
    count: int = 0
    name: str = ""
    time: datetime | None = None
    label: str = ""

    def describe(self) -> str:
        """A short human description for reasons and output."""
        if self.label:
            return self.label
        if self.kind == "retain":
            return f"retain {self.count}"
        if self.kind == "before-name":
            return f"before {self.name}"
        assert self.time is not None
        return f"before {self.time.isoformat(timespec='seconds')}"

    def keep(self, backups: Sequence[BackupInfo]) -> list[BackupInfo]:
        """The backups (oldest first) this policy keeps; the newest is always among them."""
        if not backups:
            return []
        if self.kind == "retain":
            if self.count < 1:
                raise UsageError("retain needs a count of at least 1",
                                 hint="the newest backup is never deleted")
            return list(backups[-self.count:])
        if self.kind == "before-name":
            names = [b.name for b in backups]
            if self.name not in names:
                raise ObjectNotFound(f"there is no complete backup named {self.name}",
                                     hint="walship backup-list shows the complete backups")
            return list(backups[names.index(self.name):])
        if self.kind == "before-time":
            assert self.time is not None
            finished = [i for i, b in enumerate(backups) if b.stop_time <= self.time]
            start = finished[-1] if finished else 0
            return list(backups[start:])
        raise ValueError(f"unknown policy {self.kind!r}")


# --- The plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Deletion:
    """One object to delete and why."""

    key: str
    reason: str
    size: int


@dataclass(frozen=True)
class Plan:
    """What a delete would do, in the order it does it."""

    policy: str
    deletions: tuple[Deletion, ...]
    kept: tuple[BackupInfo, ...]
    deleted_backups: tuple[str, ...]
    garbage_backups: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """Stored bytes the plan frees."""
        return sum(d.size for d in self.deletions)

    @property
    def keys(self) -> list[str]:
        """The keys to delete, in order."""
        return [d.key for d in self.deletions]

    def to_json(self) -> dict[str, Any]:
        """`--json` output."""
        return {
            "policy": self.policy,
            "kept_backups": [b.name for b in self.kept],
            "deleted_backups": list(self.deleted_backups),
            "garbage_backups": list(self.garbage_backups),
            "objects": len(self.deletions),
            "bytes": self.bytes,
            "notes": list(self.notes),
            "deletions": [{"key": d.key, "reason": d.reason, "bytes": d.size}
                          for d in self.deletions],
        }

    def format_text(self) -> str:
        """The human plan: one line per object, then a summary."""
        lines = [f"{d.key}  ({d.size} B)  {d.reason}" for d in self.deletions]
        lines += [f"note: {n}" for n in self.notes]
        kept = ", ".join(b.name for b in self.kept) or "none"
        lines.append(f"keeping {len(self.kept)} backup(s): {kept}")
        lines.append(f"{len(self.deletions)} object(s), {self.bytes} bytes to delete "
                     f"({len(self.deleted_backups)} backup(s), {len(self.garbage_backups)} "
                     f"incomplete backup(s))")
        return "\n".join(lines)


_BACKUP_KEY_RE = re.compile(r"^" + re.escape(layout.BACKUP_PREFIX) + r"([^/]+)/")


def _backup_position(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, start LSN) of a backup from its name alone (no sentinel needed)."""
    seg, offset = wal.parse_backup_name(name)
    return seg.timeline, seg.segno(segment_size) * segment_size + offset


class _Graph:
    """The timeline graph as far as the history files tell it."""

    def __init__(self, histories: Mapping[int, tuple[wal.TimelineSwitch, ...] | None]) -> None:
        self.histories = histories

    def reaches(self, backup: BackupInfo, timeline: int) -> bool:
        """Whether recovery from `backup` can replay WAL of `timeline`.

        True for the backup's own timeline, and for a descendant whose history shows the
        backup's timeline ending at or after the backup's start. With no readable history for
        `timeline`, assume yes for any newer timeline (conservative: keeps more).
        """
        if timeline == backup.timeline:
            return True
        if timeline < backup.timeline:
            return False  # a timeline's ancestors always have smaller ids
        history = self.histories.get(timeline)
        if history is None:
            return True
        for switch in history:
            if switch.parent == backup.timeline:
                return switch.switch_lsn >= backup.start_lsn
        return False


def _segments_by_timeline(names: Iterable[wal.WalName], segment_size: int
                          ) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {}
    for name in names:
        if name.kind is wal.WalKind.SEGMENT:
            result.setdefault(name.timeline, set()).add(name.segno(segment_size))
    return result


def check_chains(kept: Sequence[BackupInfo], wal_names: Iterable[str], segment_size: int
                 ) -> list[str]:
    """Problems with the kept backups' WAL chains once only `wal_names` remain (empty: fine).

    Each kept backup needs every segment from its start segment to its stop segment, and on
    to the newest segment archived on its timeline, without a gap.
    """
    parsed = []
    for n in wal_names:
        try:
            parsed.append(wal.parse_wal_name(n))
        except ValueError:
            continue
    present = _segments_by_timeline(parsed, segment_size)
    problems = []
    for backup in kept:
        have = present.get(backup.timeline, set())
        first = backup.start_lsn // segment_size
        stop = max(backup.stop_lsn - 1, backup.start_lsn) // segment_size
        last = max([stop, *have])
        for segno in range(first, last + 1):
            if segno not in have:
                missing = wal.segment_from_segno(backup.timeline, segno, segment_size).name
                what = "before its stop segment" if segno <= stop else \
                    "between its stop segment and the newest archived WAL"
                problems.append(f"backup {backup.name} needs WAL segment {missing} ({what}),"
                                " which is not in the archive")
                break
    return problems


def plan_deletion(inventory: Inventory, policy: Policy) -> Plan:
    """The deletion plan for `policy`. Pure: no I/O. UnsafeOperation if, after it, a kept
    backup would lack a segment of its WAL chain (including when the gap is already there)."""
    backups = sorted(inventory.backups, key=lambda b: b.sort_key)
    if not backups:
        why = ("the store is empty" if inventory.empty else
               "there is no complete backup: nothing can be deleted safely")
        return Plan(policy.describe(), (), (), (), (), (why,))
    segment_size = backups[-1].wal_segment_size
    kept = policy.keep(backups)
    kept_names = {b.name for b in kept}
    deleted = [b for b in backups if b.name not in kept_names]
    complete = {b.name for b in backups}
    newest = backups[-1].sort_key[:2]
    garbage = sorted(
        name for name in inventory.backup_objects
        if name not in complete and wal.is_backup_name(name)
        and _backup_position(name, segment_size) < newest
        # A sentinel that backup-list skipped as malformed: not ours to call garbage.
        and not any(o.key == layout.sentinel_key(name) for o in inventory.backup_objects[name])
    )

    sentinels: list[Deletion] = []
    objects: list[Deletion] = []
    for backup in deleted:
        reason = f"backup {backup.name} is not kept by {policy.describe()}"
        for obj in sorted(inventory.backup_objects.get(backup.name, ()), key=lambda o: o.key):
            target = sentinels if obj.key == layout.sentinel_key(backup.name) else objects
            target.append(Deletion(obj.key, reason, obj.size))
    for name in garbage:
        reason = (f"incomplete backup {name} (its push never finished) is older than the "
                  "newest complete backup")
        for obj in sorted(inventory.backup_objects[name], key=lambda o: o.key):
            objects.append(Deletion(obj.key, reason, obj.size))

    graph = _Graph(inventory.histories)
    wal_deletions: list[Deletion] = []
    remaining: list[str] = []
    for obj in sorted(inventory.wal_files, key=lambda o: o.key):
        name_text = layout.wal_name_from_key(obj.key)
        if name_text is None:
            continue  # not walship's: leave it alone
        parsed = wal.parse_wal_name(name_text)
        if parsed.kind is wal.WalKind.TIMELINE_HISTORY:
            remaining.append(name_text)
            continue
        segno = parsed.segno(segment_size)
        needed = any(graph.reaches(b, parsed.timeline)
                     and segno >= b.start_lsn // segment_size for b in kept)
        if needed:
            remaining.append(name_text)
        else:
            wal_deletions.append(Deletion(
                obj.key, f"no kept backup needs it (oldest kept: {kept[0].name})", obj.size))

    problems = check_chains(kept, remaining, segment_size)
    if problems:
        raise UnsafeOperation(
            "refusing to delete: " + "; ".join(problems),
            hint="walship verify shows the archive's gaps; take a new backup-push, then "
            "delete again",
        )
    notes: list[str] = []
    unknown = sorted(t for t, h in inventory.histories.items() if h is None)
    if unknown:
        notes.append("timeline histories unreadable (no decryption key?) for "
                     + ", ".join(str(t) for t in unknown)
                     + ": assumed to descend from every older kept backup")
    return Plan(policy.describe(), tuple(sentinels + objects + wal_deletions), tuple(kept),
                tuple(b.name for b in deleted), tuple(garbage), tuple(notes))


# --- Policies from the command line --------------------------------------------------------

_DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'7d', '12h', '30m', '90s', '2w' -> timedelta; UsageError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"{text!r} is not a duration",
                         hint="use a positive number and a unit: 90s, 30m, 12h, 7d, 2w")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_time(text: str) -> datetime:
    """An ISO-8601 time ('2026-11-21 06:00:00+00', ...); naive means UTC; UsageError otherwise."""
    value = text.strip()
    if re.search(r"[+-]\d\d$", value):
        value += ":00"  # PostgreSQL's '+00' form
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is not a time or a backup name",
                         hint="give a backup name (walship backup-list) or a time such as "
                         "'2026-11-21 06:00:00+00'") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def policy_retain(count: int) -> Policy:
    """Keep the `count` newest complete backups."""
    if count < 1:
        raise UsageError("retain needs a count of at least 1",
                         hint="the newest backup is never deleted")
    return Policy("retain", count=count)


def policy_before(target: str) -> Policy:
    """Delete what is older than backup NAME, or than what restoring to TIMESTAMP needs."""
    if wal.is_backup_name(target):
        return Policy("before-name", name=target)
    return Policy("before-time", time=parse_time(target))


def policy_window(duration: str, now: datetime | None = None) -> Policy:
    """Keep every backup needed to restore to any moment in the last `duration`."""
    span = parse_duration(duration)
    moment = (now or datetime.now(timezone.utc)) - span
    return Policy("before-time", time=moment, label=f"retain-window {duration}")


# --- I/O: gather and apply -----------------------------------------------------------------


def _read_history(storage: Storage, key: str, keyring: Keyring
                  ) -> tuple[wal.TimelineSwitch, ...] | None:
    try:
        with storage.get(key) as fh:
            blob = fh.read(1 << 20)
        text = pipeline.decode_bytes(blob, keyring).decode("utf-8", "replace")
        return tuple(wal.parse_timeline_history(text))
    except (KeyMismatch, IntegrityError, ObjectNotFound, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        _log.info("cannot read %s (%s): its timeline's ancestry is treated as unknown",
                  key, message)
        return None


def gather_inventory(storage: Storage, keyring: Keyring) -> Inventory:
    """List the store and read what planning needs: sentinels (plain JSON) and histories."""
    wal_objects: list[StoredObject] = []
    histories: dict[int, tuple[wal.TimelineSwitch, ...] | None] = {}
    for info in storage.list(layout.WAL_PREFIX):
        wal_objects.append(StoredObject(info.key, info.size))
        name = layout.wal_name_from_key(info.key)
        if name is not None and name.endswith(".history"):
            histories[wal.parse_wal_name(name).timeline] = _read_history(storage, info.key,
                                                                         keyring)
    backup_objects: dict[str, list[StoredObject]] = {}
    for info in storage.list(layout.BACKUP_PREFIX):
        match = _BACKUP_KEY_RE.match(info.key)
        if match:
            backup_objects.setdefault(match.group(1), []).append(StoredObject(info.key,
                                                                              info.size))
    # Timelines with WAL but no history file: ancestry unknown too.
    for obj in wal_objects:
        name = layout.wal_name_from_key(obj.key)
        if name is not None:
            tli = wal.parse_wal_name(name).timeline
            if tli > 1 and tli not in histories:
                histories[tli] = None
    return Inventory(tuple(wal_objects), {k: tuple(v) for k, v in backup_objects.items()},
                     tuple(list_backups(storage)), histories)


def cross_check(storage: Storage, keyring: Keyring, backups: Iterable[BackupInfo]) -> int:
    """Compare each backup's sentinel with its .backup history file, where it can be read.

    The plan trusts the sentinels (plain JSON) for stop LSNs; the .backup files are written
    by the server itself but are encrypted when a key is configured, so they are read only
    when a decryption key is available (or they are plain). IntegrityError on a mismatch;
    returns how many backups were checked.
    """
    checked = 0
    for backup in backups:
        try:
            with storage.get(layout.wal_key(backup.history_file)) as fh:
                blob = fh.read(1 << 20)
            history = wal.parse_backup_history(
                pipeline.decode_bytes(blob, keyring).decode("utf-8", "replace"))
        except (KeyMismatch, ObjectNotFound):
            continue  # public-key mode, or not archived: the sentinel is all there is
        except (IntegrityError, ValueError) as exc:
            message = getattr(exc, "message", str(exc))
            _log.warning("cannot read %s: %s", backup.history_file, message)
            continue
        checked += 1
        if (history.start_lsn, history.stop_lsn) != (backup.start_lsn, backup.stop_lsn):
            raise IntegrityError(
                f"backup {backup.name}: its sentinel says {wal.format_lsn(backup.start_lsn)}"
                f"..{wal.format_lsn(backup.stop_lsn)} but {backup.history_file} says "
                f"{wal.format_lsn(history.start_lsn)}..{wal.format_lsn(history.stop_lsn)}",
                hint="the store was tampered with or damaged; nothing was deleted",
            )
    return checked


@dataclass(frozen=True)
class Result:
    """What apply_plan did."""

    objects: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        """`--json` summary after --confirm."""
        return {"deleted_objects": self.objects, "freed_bytes": self.bytes}


def apply_plan(storage: Storage, plan: Plan, lock: StoreLock | None = None,
               batch: int = BATCH) -> Result:
    """Delete the plan's keys in its order, in batches; checks the lock before each batch."""
    done = 0
    freed = 0
    deletions = list(plan.deletions)
    for start in range(0, len(deletions), batch):
        chunk = deletions[start:start + batch]
        if lock is not None:
            lock.check()
        storage.delete_many([d.key for d in chunk])
        done += len(chunk)
        freed += sum(d.size for d in chunk)
        _log.info("deleted %d of %d objects", done, len(deletions))
    return Result(done, freed)


def delete(config: Config, policy: Policy, *, confirm: bool) -> tuple[Plan, Result | None]:
    """Plan (always) and, with confirm, apply under the store's backup lock.

    The plan is recomputed under the lock, so a backup pushed between a dry run and the
    confirmed run is taken into account. Returns the plan and, when applied, the result.
    """
    keyring = Keyring.from_config(config)
    storage = open_storage(config.require_store(), config)
    try:
        if not confirm:
            inventory = gather_inventory(storage, keyring)
            cross_check(storage, keyring, inventory.backups)
            return plan_deletion(inventory, policy), None
        # Taking the lock writes to the store, and a file store's put creates missing
        # directories: look first, so that an unmounted store is an outage, as in a dry run.
        # A confirmed delete in a store with neither backups nor WAL is refused: a cluster
        # archives WAL before its first backup, so that is a wrong store URL or prefix, and
        # "nothing to delete" would hide it from the cron job that runs retention.
        if _is_empty(storage):
            raise ObjectNotFound(
                f"{storage.url} holds no backups and no WAL: nothing to delete",
                hint="check the store URL and prefix (a dry run, without --confirm, "
                "shows what the store holds)")
        # The same lock backup-push takes: a delete never runs while a backup is being pushed.
        with store_lock(storage, BACKUP_LOCK, "delete") as lock:
            inventory = gather_inventory(storage, keyring)
            cross_check(storage, keyring, inventory.backups)
            plan = plan_deletion(inventory, policy)
            return plan, apply_plan(storage, plan, lock)
    finally:
        storage.close()


def _is_empty(storage: Storage) -> bool:
    """No object under the backup or WAL prefixes (one short listing each)."""
    return all(next(iter(storage.list(prefix)), None) is None
               for prefix in (layout.BACKUP_PREFIX, layout.WAL_PREFIX))


def render(plan: Plan, result: Result | None, *, as_json: bool, confirm: bool) -> str:
    """The text delete prints: the plan, then what was done or how to do it."""
    if as_json:
        data = {**plan.to_json(), "dry_run": not confirm}
        if result is not None:
            data.update(result.to_json())
        return json.dumps(data, indent=2)
    text = plan.format_text()
    if result is not None:
        return text + f"\ndeleted {result.objects} object(s), freed {result.bytes} bytes"
    if plan.deletions:
        return text + "\ndry run: nothing deleted; add --confirm to delete"
    return text + "\nnothing to delete"
