"""Archiving, a base backup and a restore through an S3 endpoint that fails 10% of requests.

Every request walship makes (wal-push from archive_command and its background pusher,
backup-push, backup-fetch, wal-fetch from restore_command and its prefetcher) goes through
tests/helpers/fault_proxy.py in front of the moto server, which answers one request in ten
with 500, 503, SlowDown, a closed or reset connection, a stalled response (longer than
walship's s3_read_timeout) or a truncated body. The claims, checked against the store
directly (not through the proxy):

- every segment PostgreSQL archived (archive_command exited 0: .done) is in the store and
  decodes to exactly the bytes of the segment file, whose copy stays in pg_wal
  (wal_keep_size);
- the backup that backup-push reported, restored by backup-fetch and replayed through
  restore_command, holds exactly the data the primary had;
- the retries show in the logs with attempt, elapsed time and budget, and no retry happened
  after its budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import boto3
import pytest

from tests.e2e.conftest import Archive, aws_env, make_archive, table_checksum
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.moto_server import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    new_bucket,
    set_aws_environment,
)
from tests.helpers.pg import PG_BIN, PG_USER, PgCluster, PgFactory
from walship import layout
from walship.config import Config
from walship.crypto import Keyring
from walship.pipeline import decode
from walship.storage.s3 import S3Storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.s3]

FAULT_RATE = 0.10
SEED = 20260707
# walship gives up on a silent response after READ_TIMEOUT seconds; the proxy's stalls last
# longer, so every stall is a timeout the client must recover from.
READ_TIMEOUT = 2.0
STALL_SECONDS = 3.0
MIN_SEGMENTS = 50
# Requests a run makes only a few of: their first one is faulted whatever the rate.
RARE_OPERATIONS = ("LIST", "DELETE", "CREATE_MULTIPART", "UPLOAD_PART", "COMPLETE_MULTIPART",
                   "HEAD_BUCKET")
# "retrying put wal/... after ... (attempt 2, 0.3s of budget 60s)": walship.storage.retrying.
RETRY_LINE = re.compile(r"retrying (.+?) after .* \(attempt (\d+), ([\d.]+)s of budget ([\d.]+)s\)")


class LogFollower:
    """Collects what is appended to files that come and go while a test runs.

    The background pusher's and the prefetcher's logs are truncated each time one starts,
    and the prefetch spool is removed when recovery ends, so they are read as they grow."""

    def __init__(self, paths: list[Path], interval: float = 0.1) -> None:
        self.paths = paths
        self.interval = interval
        self.text: dict[Path, list[str]] = {p: [] for p in paths}
        self._offsets: dict[Path, int] = dict.fromkeys(paths, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LogFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()

    def _poll(self) -> None:
        for path in self.paths:
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size < self._offsets[path]:
                        self._offsets[path] = 0  # truncated by a new start
                    fh.seek(self._offsets[path])
                    data = fh.read()
            except OSError:
                continue
            # Only whole lines: the rest is read again next time.
            end = data.rfind(b"\n") + 1
            if end:
                self.text[path].append(data[:end].decode(errors="replace"))
                self._offsets[path] += end

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def lines(self) -> list[str]:
        """Everything collected, all files."""
        return [line for chunks in self.text.values() for chunk in chunks
                for line in chunk.splitlines()]


def _retries(lines: list[str]) -> list[tuple[str, int, float, float]]:
    """(operation, attempt, elapsed, budget) of every retry line."""
    found = []
    for line in lines:
        match = RETRY_LINE.search(line)
        if match:
            found.append((match.group(1), int(match.group(2)), float(match.group(3)),
                          float(match.group(4))))
    return found


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server, rate=0.0, seed=SEED, stall_seconds=STALL_SECONDS,
                    fault_first=RARE_OPERATIONS) as p:
        yield p


def _direct_storage(moto_server: str, bucket: str, prefix: str) -> S3Storage:
    """The store as it really is: straight to moto, no faults, no retries needed."""
    client = boto3.client("s3", endpoint_url=moto_server, region_name=REGION,
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    return S3Storage(bucket, prefix, Config(), client=client)


def _background(cluster: PgCluster, *args: str) -> subprocess.Popen[str]:
    """pgbench as the postgres user, not waited for."""
    env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", **cluster.libpq_env}
    argv = ["runuser", "-u", PG_USER, "--", "env", *(f"{k}={v}" for k, v in env.items()),
            str(PG_BIN / "pgbench"), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _walship(archive: Archive, *args: str, env: Mapping[str, str]
             ) -> subprocess.CompletedProcess[str]:
    return archive.install.run(*args, env={"WALSHIP_CONFIG": str(archive.config), **env})


def _archived(cluster: PgCluster) -> list[str]:
    """Names PostgreSQL considers archived: archive_command exited 0 for each."""
    status = cluster.datadir / "pg_wal" / "archive_status"
    return sorted(p.name[: -len(".done")] for p in status.glob("*.done"))


def test_archive_backup_restore_with_10_percent_faults(
    pg_factory: PgFactory, moto_server: str, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = new_bucket(moto_server)
    set_aws_environment(monkeypatch, proxy.endpoint)
    env = aws_env()
    prefix = "faults/"
    # 5 MiB parts so that the backup's partition goes up as a multipart upload (parts and
    # completes get faults too); everything else is walship's default.
    archive = make_archive(pg_factory, store_url=f"s3://{bucket}/{prefix}", extra={
        "s3_read_timeout": READ_TIMEOUT, "s3_multipart_threshold": "5MiB",
        "s3_part_size": "5MiB"})
    primary = pg_factory.cluster("faults")
    primary.env.update(env)
    primary.initdb(options=("--wal-segsize=1",))
    # wal_keep_size keeps every segment in pg_wal: the originals to compare the store with.
    primary.set_conf(archive_mode="on", archive_command=f"'{archive.archive_command}'",
                     wal_keep_size="'1GB'")
    primary.start()
    push_log = primary.datadir / "pg_wal" / "walship" / "push" / ".log"
    started = time.monotonic()
    proxy.rate = FAULT_RATE
    with LogFollower([push_log]) as pusher_log:
        primary.pgbench("-i", "-q", "-s", "3")
        # Incompressible enough that the backup's partition needs several 5 MiB parts.
        primary.psql("create table noise as select g, md5(g::text) || md5((g * 7)::text) as t "
                     "from generate_series(1, 200000) g")
        load = _background(primary, "-c", "2", "-T", "8", "-n")
        backup = _walship(archive, "backup-push", str(primary.datadir),
                          env={**env, **primary.libpq_env})
        _, err = load.communicate(timeout=300)
        assert load.returncode == 0, err
        assert backup.returncode == 0, backup.stderr
        name = backup.stdout.strip()
        expected = table_checksum(primary)
        expected_history = table_checksum(primary, "pgbench_history", "tid, bid, aid, mtime")
        expected_noise = table_checksum(primary, "noise", "g")
        last = primary.psql("select pg_walfile_name(pg_current_wal_lsn())")
        primary.psql("select pg_switch_wal()")
        primary.wait_for(f"select last_archived_wal >= '{last}' from pg_stat_archiver", "t",
                         timeout=300)
        archive_seconds = time.monotonic() - started
        primary.stop()

    # 1. Nothing PostgreSQL archived is missing or different in the store.
    archived = _archived(primary)
    segments = [n for n in archived if len(n) == 24]
    assert len(segments) >= MIN_SEGMENTS, len(segments)
    direct = _direct_storage(moto_server, bucket, prefix)
    keyring = Keyring.from_config(Config(key_file=archive.keydir / "secret.key"))
    for wal_name in archived:
        original = primary.datadir / "pg_wal" / wal_name
        if not original.exists():
            # .backup history files go from pg_wal at the next checkpoint once archived.
            assert wal_name.endswith(".backup"), wal_name
            continue
        data = original.read_bytes()
        info = direct.stat(layout.wal_key(wal_name))
        assert info.metadata["sha256"] == hashlib.sha256(data).hexdigest(), wal_name
        with direct.get(layout.wal_key(wal_name)) as src, decode(src, keyring) as dec:
            assert dec.read() == data, wal_name

    # 2. The backup restores, through the faults, to exactly the primary's data.
    dest = pg_factory.new_path("restored")
    fetch = _walship(archive, "backup-fetch", str(dest), name, env=env)
    assert fetch.returncode == 0, fetch.stderr
    copy = pg_factory.cluster("restored", datadir=dest)
    copy.env.update(env)
    copy.set_conf(port=str(copy.port), unix_socket_directories=f"'{copy.sockdir}'",
                  archive_mode="off")
    prefetch_log = dest / "pg_wal" / "walship" / "prefetch" / ".log"
    with LogFollower([prefetch_log]) as prefetcher_log:
        copy.start()
        copy.wait_recovery_done(timeout=600)
    assert table_checksum(copy) == expected
    assert table_checksum(copy, "pgbench_history", "tid, bid, aid, mtime") == expected_history
    assert table_checksum(copy, "noise", "g") == expected_noise
    copy.stop()

    # backup-push released its store lock (its first DeleteObjects was faulted, and retried).
    assert [i.key for i in direct.list("")
            if i.key == layout.lock_key("backup")] == [], "the backup lock was left behind"
    uploads = direct.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    # 3. Faults of every kind hit every kind of request, and were retried within budget.
    sources = {
        "pusher": pusher_log.lines(),
        "primary server log": primary.logfile.read_text(errors="replace").splitlines(),
        "backup-push": backup.stderr.splitlines(),
        "backup-fetch": fetch.stderr.splitlines(),
        "restored server log": copy.logfile.read_text(errors="replace").splitlines(),
        "prefetcher": prefetcher_log.lines(),
    }
    retries = {where: _retries(lines) for where, lines in sources.items()}
    all_retries = [r for found in retries.values() for r in found]
    kinds = proxy.by_kind()
    operations = proxy.by_operation()
    budget = Config().retry_budget
    figures = {
        "segments archived": len(segments),
        "files archived": len(archived),
        "archive seconds": round(archive_seconds, 1),
        "failed archive_command calls": _failed_archive_commands(primary),
        "retries per log": {w: len(r) for w, r in retries.items()},
        "max attempt": max((a for _, a, _, _ in all_retries), default=0),
        "max retry elapsed s": max((e for _, _, e, _ in all_retries), default=0.0),
        "budget s": budget,
        "faults": dict(kinds),
        "faulted operations": dict(operations),
        "requests": dict(proxy.requests),
        "after store applied": dict(proxy.after_store),
        "multipart uploads left open": len(uploads),
    }
    print(f"\nfault figures: {json.dumps(figures)}")
    for kind in ("500", "503", "slowdown", "close", "rst", "stall", "truncate"):
        assert kinds[kind] > 0, (kind, proxy.summary())
    for operation in ("PUT", "UPLOAD_PART", "COMPLETE_MULTIPART", "GET", "HEAD", "LIST",
                      "DELETE"):
        assert operations[operation] > 0, (operation, proxy.summary())
    assert all_retries, "no retry was logged"
    assert retries["pusher"], "the background pusher logged no retry"
    assert retries["restored server log"] or retries["prefetcher"], "wal-fetch logged no retry"
    assert all(b == budget for _, _, _, b in all_retries)
    assert all(elapsed <= b for _, _, elapsed, b in all_retries)


def _failed_archive_commands(cluster: PgCluster) -> int:
    """archive_command failures the server logged (the cluster is stopped: read its log)."""
    return cluster.logfile.read_text(errors="replace").count("archive command failed")
