"""An archiver backlog of 500 segments drains with bounded memory and bounded open files.

The store is unreachable for a while (archive_command points at a bucket that does not exist)
and PostgreSQL piles up 500 ready 1 MiB segments; then the operator fixes archive_command and
reloads. While the backlog drains, every walship process (PostgreSQL's wal-push calls and the
detached background pusher) is sampled from /proc: resident memory and open descriptors.
The bounds are fixed numbers that do not depend on the backlog, and the second half of the
drain may not need more than the first half: nothing grows with the number of segments.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import aws_env, make_archive
from tests.helpers.moto_server import new_bucket, set_aws_environment
from tests.helpers.pg import PgCluster, PgFactory
from walship import layout
from walship.config import Config
from walship.storage import open_storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.s3]

BACKLOG = 500
MAX_RSS_MIB = 150
MAX_FDS = 64
# How much more the second half of the drain may use than the first (allocator noise).
GROWTH_MARGIN_MIB = 32
GROWTH_MARGIN_FDS = 8


@dataclass
class Peak:
    """The largest figures seen for one kind of walship process."""

    processes: set[int] = field(default_factory=set)
    rss_kib: int = 0
    fds: int = 0

    def add(self, pid: int, rss_kib: int, fds: int) -> None:
        self.processes.add(pid)
        self.rss_kib = max(self.rss_kib, rss_kib)
        self.fds = max(self.fds, fds)


class ProcessSampler:
    """Samples RSS and open fds of every process running walship from `root`."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root = str(root)
        self.interval = interval
        self.samples = 0
        self.phase = "first half"
        self.peaks: dict[tuple[str, str], Peak] = defaultdict(Peak)
        self.others: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _kind(self, argv: list[str]) -> str | None:
        # Our python running walship: the wal-push script (bin/walship) or a detached worker
        # (python -c "...sys.path.insert(0, '<root>/lib')... walship.ops.push_ahead").
        # Not the shell PostgreSQL runs archive_command in.
        if not argv or argv[0] != sys.executable or not any(self.root in a for a in argv):
            return None
        if len(argv) > 2 and argv[1] == "-c" and "walship.ops.push_ahead" in argv[2]:
            return "background pusher"
        if len(argv) > 2 and argv[1] == "-c" and "walship.ops.prefetch" in argv[2]:
            return "prefetcher"  # left idle by an earlier test of the session
        if len(argv) > 2 and argv[1].endswith("/bin/walship"):
            return argv[2]  # the verb: wal-push
        self.others.add(" ".join(argv)[:300])
        return "other"

    def sample_once(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
                kind = self._kind(argv)
                if kind is None:
                    continue
                with open(f"/proc/{entry.name}/status") as fh:
                    rss = next((int(line.split()[1]) for line in fh
                                if line.startswith("VmRSS:")), 0)
                fds = len(os.listdir(f"/proc/{entry.name}/fd"))
            except (OSError, ValueError):
                continue  # the process ended meanwhile
            self.peaks[(kind, self.phase)].add(int(entry.name), rss, fds)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_once()

    def peak(self, kind: str, phase: str | None = None) -> Peak:
        """The peak over one phase, or over both."""
        found = Peak()
        for (k, p), peak in self.peaks.items():
            if k == kind and phase in (None, p):
                found.processes |= peak.processes
                found.rss_kib = max(found.rss_kib, peak.rss_kib)
                found.fds = max(found.fds, peak.fds)
        return found


def _ready(cluster: PgCluster) -> list[str]:
    status = cluster.datadir / "pg_wal" / "archive_status"
    return sorted(p.name[: -len(".ready")] for p in status.glob("*.ready"))


def test_backlog_of_500_segments_drains_with_bounded_memory_and_fds(
    pg_factory: PgFactory, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_aws_environment(monkeypatch, moto_server)
    env = aws_env()
    bucket = new_bucket(moto_server)
    archive = make_archive(pg_factory, store_url=f"s3://{bucket}/backlog")
    # The outage: the same settings, but a bucket that does not exist (fails at once, where
    # an unreachable endpoint would spend the retry budget on every call).
    broken = pg_factory.write_config(archive.config.parent / "broken.toml", {
        "store": f"s3://{bucket}-gone/backlog", "key_file": str(archive.keydir / "secret.key")})
    cluster = pg_factory.cluster("backlog")
    cluster.env.update(env)
    cluster.initdb(options=("--wal-segsize=1",))
    cluster.set_conf(archive_mode="on",
                     archive_command=f"'{archive.install.command(broken, 'wal-push %p')}'")
    cluster.start()
    cluster.psql("create table t (id int, payload text)")
    while len(_ready(cluster)) < BACKLOG:
        # About 30 MiB of WAL per statement; lz4 compresses it about 3:1.
        cluster.psql("insert into t select g, md5(g::text) || md5((g + 1)::text) "
                     "|| md5((g + 2)::text) from generate_series(1, 150000) g")
    cluster.psql("select pg_switch_wal()")
    backlog = _ready(cluster)
    assert len(backlog) >= BACKLOG
    assert cluster.psql("select failed_count > 0 from pg_stat_archiver") == "t"

    # The fix: archive_command points at the real store again; reload.
    with ProcessSampler(archive.install.root) as sampler:
        started = time.monotonic()
        cluster.psql(f"alter system set archive_command = '{archive.archive_command}'")
        cluster.psql("select pg_reload_conf()")
        halfway = backlog[len(backlog) // 2]
        cluster.wait_for(f"select last_archived_wal >= '{halfway}' from pg_stat_archiver", "t",
                         timeout=900)
        half_seconds = time.monotonic() - started
        sampler.phase = "second half"
        cluster.wait_for(f"select last_archived_wal >= '{backlog[-1]}' from pg_stat_archiver",
                         "t", timeout=900)
        drain_seconds = time.monotonic() - started
    cluster.stop()

    # Every segment of the backlog is in the store.
    with open_storage(archive.store_url, Config(store=archive.store_url)) as storage:
        stored = {layout.wal_name_from_key(i.key) for i in storage.list("wal/")}
    missing = [n for n in backlog if n not in stored]
    assert not missing, f"{len(missing)} segments of the backlog are not in the store"

    # Who pushed: PostgreSQL's own calls log "pushed <name> (...)", the background pusher
    # "pushed ahead <name>". After the fix the pusher must take the backlog over: a pusher
    # left over from the outage, or its failure notes, used to leave every segment to the
    # serial calls.
    server_log = cluster.logfile.read_text(errors="replace")
    own = set(re.findall(r"walship: pushed ([0-9A-F]{24}) \(", server_log)) & set(backlog)
    figures: dict[str, object] = {
        "backlog segments": len(backlog),
        "pushed by archive_command itself": len(own),
        "other walship processes": sorted(sampler.others),
        "drain seconds": round(drain_seconds, 1),
        "first half seconds": round(half_seconds, 1),
        "samples": sampler.samples,
    }
    kinds = sorted({k for k, _ in sampler.peaks})
    for kind in kinds:
        for phase in ("first half", "second half", None):
            peak = sampler.peak(kind, phase)
            figures[f"{kind} ({phase or 'all'})"] = {
                "processes": len(peak.processes), "peak rss MiB": round(peak.rss_kib / 1024, 1),
                "peak fds": peak.fds}
    print(f"\nbacklog figures: {json.dumps(figures)}")

    assert "wal-push" in kinds and "background pusher" in kinds, kinds
    assert len(own) <= len(backlog) // 10, figures
    for kind in kinds:
        whole = sampler.peak(kind)
        assert whole.rss_kib < MAX_RSS_MIB * 1024, (kind, figures)
        assert whole.fds < MAX_FDS, (kind, figures)
    for kind in ("wal-push", "background pusher"):
        first, second = sampler.peak(kind, "first half"), sampler.peak(kind, "second half")
        if first.processes and second.processes:
            assert second.rss_kib <= first.rss_kib + GROWTH_MARGIN_MIB * 1024, (kind, figures)
            assert second.fds <= first.fds + GROWTH_MARGIN_FDS, (kind, figures)
