"""walship check: probe the configured store once for the permissions and capabilities needed.

One probe object under `check/` (layout.probe_key) is written with metadata, read back
(whole and from an offset), stat-ed (metadata round trip), listed, written again with
create-if-absent (AlreadyExists from a store that enforces it means the first defence
against overwrites works), and deleted. Each step becomes one line, `ok` or `missing`, with
a hint. Required lines (write, read, metadata, list, delete) decide `report.ok`; the rest
describe capabilities walship adapts to.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, cast

from walship import layout, log
from walship.config import Config
from walship.errors import AccessDenied, AlreadyExists, ObjectNotFound, StorageError, WalshipError
from walship.storage import Storage, open_storage, redact_url

_log = log.get("check")

OK = "ok"
MISSING = "missing"


@dataclass(frozen=True)
class CheckLine:
    """One probed permission or capability."""

    name: str
    status: str  # "ok" or "missing"
    required: bool
    detail: str
    hint: str | None = None

    @property
    def ok(self) -> bool:
        """True when the permission or capability is present."""
        return self.status == OK


@dataclass
class CheckReport:
    """Everything one probe found, in the order it was probed."""

    store: str
    lines: list[CheckLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every required permission and capability is present."""
        return all(line.ok for line in self.lines if line.required)

    @property
    def missing_required(self) -> list[CheckLine]:
        """The required lines that are missing."""
        return [line for line in self.lines if line.required and not line.ok]

    def line(self, name: str) -> CheckLine:
        """The line called `name`; KeyError if there is none."""
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(name)

    def render(self) -> str:
        """Human-readable: one line per check, then the verdict."""
        out = [f"store {self.store}"]
        for line in self.lines:
            label = line.name + ("" if line.required else " (optional)")
            out.append(f"{line.status:<8} {label:<28} {line.detail}")
            if line.hint and not line.ok:
                out.append(f"{'':<8} hint: {line.hint}")
        verdict = "all required permissions and capabilities are present"
        if not self.ok:
            names = ", ".join(line.name for line in self.missing_required)
            verdict = f"missing required: {names}"
        out.append(verdict)
        return "\n".join(out)

    def to_json(self) -> str:
        """A JSON object: store, ok, and one entry per check."""
        payload: dict[str, Any] = {
            "store": self.store,
            "ok": self.ok,
            "checks": [asdict(line) for line in self.lines],
        }
        return json.dumps(payload, indent=2)

    def raise_for_missing(self) -> None:
        """StorageError naming the missing required lines, if any (the CLI's exit status)."""
        if not self.ok:
            missing = self.missing_required
            raise StorageError(
                f"the store {self.store} lacks what walship needs: "
                + ", ".join(line.name for line in missing),
                hint=missing[0].hint,
            )


def _probe_name() -> str:
    return f"probe-{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


_WRITE_HINT = (
    "walship needs to create objects under the store's prefix (S3 s3:PutObject, GCS "
    "storage.objects.create, a writable directory for file://)"
)
_READ_HINT = "restores need to read objects (S3 s3:GetObject, GCS storage.objects.get)"
_META_HINT = (
    "wal-push stores the SHA-256 of each WAL file as object metadata and compares it to refuse "
    "overwrites; the store must keep user metadata (file:// needs user extended attributes)"
)
_LIST_HINT = (
    "backup-list, retention and verify list the store (S3 s3:ListBucket, GCS "
    "storage.objects.list)"
)
_DELETE_HINT = (
    "retention (walship delete) and lock release delete objects (S3 s3:DeleteObject, GCS "
    "storage.objects.delete)"
)
_CREATE_HINT = (
    "without create-if-absent in the store, the stored SHA-256 is the only defence against "
    "overwriting an archived WAL file, and two writers may race; use a store that enforces "
    "it (S3 If-None-Match, GCS if_generation_match) for production, or, for an S3 store that "
    "ignores If-None-Match, set s3_conditional_writes = false so that walship looks first"
)


class _Prober:
    def __init__(self, store: Storage, report: CheckReport) -> None:
        self.store = store
        self.report = report
        self.key = layout.probe_key(_probe_name())
        self.payload = os.urandom(4096)
        self.digest = hashlib.sha256(self.payload).hexdigest()
        self.written = False

    def add(self, name: str, ok: bool, required: bool, detail: str, hint: str | None) -> None:
        self.report.lines.append(CheckLine(name, OK if ok else MISSING, required, detail, hint))

    def step(self, name: str, required: bool, hint: str, fn: Callable[[], str | None]) -> bool:
        """Run one probe: a string back is an ok detail, None or an error is missing."""
        if not self.written and name != "write":
            self.add(name, False, required, "not tested: the probe object could not be written",
                     hint)
            return False
        try:
            detail = fn()
        except WalshipError as exc:
            kind = "permission denied" if isinstance(exc, AccessDenied) else "failed"
            self.add(name, False, required, f"{kind}: {exc.message}", hint)
            return False
        if detail is None:
            return False
        self.add(name, True, required, detail, None)
        return True

    def write(self) -> str:
        self.store.put(self.key, cast(BinaryIO, io.BytesIO(self.payload)),
                       metadata={"sha256": self.digest, "walship-check": "1"})
        self.written = True
        return f"wrote {self.key} ({len(self.payload)} bytes)"

    def read(self) -> str | None:
        with self.store.get(self.key) as stream:
            whole = stream.read()
        with self.store.get(self.key, 1000) as stream:
            tail = stream.read()
        if whole != self.payload or tail != self.payload[1000:]:
            self.add("read", False, True, "the store returned different bytes than were written",
                     "something between walship and the store alters objects; do not use it")
            return None
        return "read back whole and from an offset, bytes identical"

    def metadata(self) -> str | None:
        info = self.store.stat(self.key)
        if info.size != len(self.payload) or info.metadata.get("sha256") != self.digest:
            self.add("metadata", False, True,
                     f"stat reported size {info.size} and metadata {dict(info.metadata)!r}",
                     _META_HINT)
            return None
        return "size and user metadata round trip"

    def listing(self) -> str | None:
        keys = [info.key for info in self.store.list(layout.CHECK_PREFIX)]
        if self.key not in keys:
            self.add("list", False, True, "the probe object is missing from the listing",
                     _LIST_HINT)
            return None
        return f"listed {len(keys)} object(s) under {layout.CHECK_PREFIX}"

    def create_if_absent(self) -> str | None:
        enforced_by_store = self.store.capabilities.create_if_absent
        try:
            self.store.put(self.key, cast(BinaryIO, io.BytesIO(b"overwrite attempt")),
                           if_absent=True)
        except AlreadyExists:
            if enforced_by_store:
                return "a second create of the same key was refused by the store"
            self.add("create-if-absent", False, False,
                     "the backend looks before writing because this store does not enforce "
                     "create-if-absent (not atomic); the stored SHA-256 guards overwrites",
                     _CREATE_HINT)
            return None
        self.add("create-if-absent", False, False,
                 "a second create of the same key overwrote the object", _CREATE_HINT)
        return None

    def delete(self) -> str | None:
        self.store.delete_many([self.key])
        try:
            self.store.stat(self.key)
        except ObjectNotFound:
            self.written = False
            return "deleted the probe object"
        self.add("delete", False, True, "the probe object is still there after delete",
                 _DELETE_HINT)
        return None

    def cleanup(self) -> None:
        if not self.written:
            return
        try:
            self.store.delete_many([self.key])
        except WalshipError as exc:
            _log.warning("could not remove the probe object %s: %s", self.key, exc.message)


def check(config: Config) -> CheckReport:
    """Probe the configured store once; never raises for a missing permission (see the report).

    UsageError still propagates for a store URL or configuration that cannot be opened.
    """
    url = config.require_store()
    report = CheckReport(redact_url(url))
    with open_storage(url, config) as store:
        prober = _Prober(store, report)
        try:
            prober.step("write", True, _WRITE_HINT, prober.write)
            prober.step("read", True, _READ_HINT, prober.read)
            prober.step("metadata", True, _META_HINT, prober.metadata)
            prober.step("list", True, _LIST_HINT, prober.listing)
            prober.step("create-if-absent", False, _CREATE_HINT, prober.create_if_absent)
            prober.step("delete", True, _DELETE_HINT, prober.delete)
        finally:
            prober.cleanup()
        caps = store.capabilities
        report.lines.append(CheckLine(
            "bulk-delete", OK if caps.bulk_delete else MISSING, False,
            "deletes are batched" if caps.bulk_delete else "one request per deleted key",
            None if caps.bulk_delete else "retention on large archives will be slower",
        ))
        report.lines.append(CheckLine(
            "consistent-list", OK if caps.consistent_list else MISSING, False,
            "listings are strongly consistent" if caps.consistent_list
            else "listings may lag behind writes",
            None if caps.consistent_list else "run retention well after the last backup",
        ))
    return report
