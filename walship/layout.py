"""The only place that builds object keys. See docs/layout.md for the tree and its rules.

    identity.json                       the archive's identity: system identifier, segment size
    wal/<WAL file name>                 segments, .history, .backup and .partial files
    basebackups/<backup>/...            partitions, manifest, backup_label, tablespace_map
    basebackups/<backup>/sentinel.json  the completion marker, written last
    locks/<name>                        cross-host locks (one backup-push or delete at a time)
    drills/last.json                    the last `walship drill` result (plain JSON)
    drills/last-success.json            the last successful drill's result

Keys carry no codec or encryption suffix: the object's first bytes say how to read it, so
each WAL name has exactly one key, create-if-absent covers it whatever the codec, and
wal-fetch costs one GET.
"""

from __future__ import annotations

from walship.wal import parse_wal_name

IDENTITY_KEY = "identity.json"
WAL_PREFIX = "wal/"
BACKUP_PREFIX = "basebackups/"
LOCK_PREFIX = "locks/"
SENTINEL_NAME = "sentinel.json"


def wal_key(name: str) -> str:
    """Key of an archived WAL file; ValueError if `name` is not a WAL file name."""
    return WAL_PREFIX + parse_wal_name(name).name


def wal_name_from_key(key: str) -> str | None:
    """The WAL file name stored under `key`, or None for a key that is not an archived WAL file."""
    if not key.startswith(WAL_PREFIX):
        return None
    name = key[len(WAL_PREFIX):]
    try:
        return parse_wal_name(name).name
    except ValueError:
        return None


def backup_prefix(backup: str) -> str:
    """Prefix under which every object of one backup lives."""
    return f"{BACKUP_PREFIX}{backup}/"


def backup_object_key(backup: str, name: str) -> str:
    """Key of one object (partition, manifest, label) of a backup."""
    return backup_prefix(backup) + name


def sentinel_key(backup: str) -> str:
    """Key of a backup's completion marker; its presence is what makes a backup usable."""
    return backup_prefix(backup) + SENTINEL_NAME


def lock_key(name: str) -> str:
    """Key of a store-wide lock."""
    return LOCK_PREFIX + name


# --- Objects of one base backup (see docs/backups.md) ---------------------------------------

MANIFEST_NAME = "manifest"


def backup_partition_key(backup: str, index: int) -> str:
    """Key of tar partition `index` of a backup (its plaintext is a tar stream)."""
    return backup_object_key(backup, f"part_{index:05d}.tar")


def backup_partition_files_key(backup: str, index: int) -> str:
    """Key of the file list (manifest section) of tar partition `index`."""
    return backup_object_key(backup, f"part_{index:05d}.files")


def backup_manifest_key(backup: str) -> str:
    """Key of a backup's manifest: partitions, digests, backup_label, tablespace_map."""
    return backup_object_key(backup, MANIFEST_NAME)


def backup_name_from_sentinel_key(key: str) -> str | None:
    """The backup a sentinel key belongs to, or None for any other key."""
    if not key.startswith(BACKUP_PREFIX) or not key.endswith("/" + SENTINEL_NAME):
        return None
    name = key[len(BACKUP_PREFIX) : -len(SENTINEL_NAME) - 1]
    return name if name and "/" not in name else None


# --- Probe objects of `walship check` ---------------------------------------------------------

CHECK_PREFIX = "check/"


def probe_key(name: str) -> str:
    """Key of a probe object that `walship check` writes and deletes again."""
    return CHECK_PREFIX + name


# --- Results of `walship drill` ---------------------------------------------------------------

# Plain JSON (not encrypted), so that `walship status` on any host, even one holding only the
# public key, can report the last drill. Retention never deletes under this prefix: it only
# plans deletions under wal/ and basebackups/.
DRILL_PREFIX = "drills/"
DRILL_LAST_KEY = DRILL_PREFIX + "last.json"
DRILL_LAST_SUCCESS_KEY = DRILL_PREFIX + "last-success.json"


def drill_result_key(*, success_only: bool = False) -> str:
    """Key of the last drill's result, or of the last successful drill's."""
    return DRILL_LAST_SUCCESS_KEY if success_only else DRILL_LAST_KEY
