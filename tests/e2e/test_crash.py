"""Crash safety: kill -9 every walship process kind at seeded random moments.

Kinds: wal-push (driven directly on copies of a stopped cluster's pg_wal, and a few times as a
real cluster's archive_command), the background pusher, the prefetcher, backup-push and
backup-fetch. The kill moment of each trial is drawn uniformly from the whole run of that kind
(measured once per test on an undisturbed run; SPAN below) by tests.helpers.crash.trial_rng:
set WALSHIP_CRASH_SEED to replay a failure's draws (every message prints the seed, the delay,
the process's stderr and the store's listing). Run with -s for one summary line per kind.

After every kill: nothing partial is listed or fetched as complete, a re-run succeeds, and no
lock or marker the dead process left delays the next run (every stale rule here is "the pid is
gone": flocks die with their holder, the store lock names a dead pid on this host).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import aws_env
from tests.helpers import crash
from tests.helpers.pg import PgCluster, PgFactory, WalshipInstall, chown_pg
from walship import layout, pipeline
from walship.config import Config
from walship.crypto import Keyring
from walship.errors import ObjectNotFound
from walship.storage import open_storage
from walship.storage.base import Storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEGMENTS = 4
WAL_PUSH_TRIALS = 14
WAL_PUSH_S3_TRIALS = 4
PUSHER_TRIALS = 7
PREFETCH_TRIALS = 8
CLUSTER_WAL_PUSH_TRIALS = 3
BACKUP_PUSH_TRIALS = 6
BACKUP_FETCH_TRIALS = 8
# Kill moments are drawn from [0, SPAN x the undisturbed run's duration]: a little past its end,
# since the same run is slower on a loaded machine; a draw past the end checks a finished run.
SPAN = 1.2


# -- shared material ---------------------------------------------------------------------------


@dataclass
class WalSource:
    """A stopped cluster's pg_wal with SEGMENTS segments waiting (.ready), and a key."""

    factory: PgFactory
    wal_dir: Path
    names: list[str]
    digests: dict[str, str]
    key_file: Path

    @property
    def install(self) -> WalshipInstall:
        return self.factory.install

    def fresh_pg_wal(self) -> Path:
        """DATADIR/pg_wal holding the segments (hard links: they are only read) and fresh
        .ready files, owned by postgres."""
        datadir = self.factory.scratch_dir("crash-data")
        pg_wal = datadir / "pg_wal"
        (pg_wal / "archive_status").mkdir(parents=True)
        for name in self.names:
            os.link(self.wal_dir / name, pg_wal / name)
            (pg_wal / "archive_status" / f"{name}.ready").touch()
        chown_pg(datadir)
        return pg_wal

    def config(self, store_url: str, **settings: object) -> Path:
        """A walship config for store_url with this key."""
        path = self.factory.scratch_dir("crash-config") / "walship.toml"
        return self.factory.write_config(
            path, {"store": store_url, "key_file": str(self.key_file), **settings})

    def new_file_store(self) -> str:
        store = self.factory.scratch_dir("crash-store")
        return f"file://{store}"


@pytest.fixture(scope="module")
def wal_source(walship_install: WalshipInstall) -> Iterator[WalSource]:
    factory = PgFactory(walship_install)
    cluster = factory.cluster("crash-wal")
    cluster.initdb()
    # An archiver that always fails: PostgreSQL keeps every segment and its .ready file.
    cluster.set_conf(archive_mode="on", archive_command="'/bin/false'", wal_keep_size="'1GB'")
    cluster.start()
    cluster.psql("create table t (x int, pad text)")
    for _ in range(SEGMENTS):
        # Poorly compressible rows, so that the put of each segment takes a while to kill.
        cluster.psql("insert into t select g, md5(random()::text) || md5(random()::text) "
                     "|| md5(random()::text) from generate_series(1, 40000) g")
        cluster.psql("select pg_switch_wal()")
    cluster.stop()
    wal_dir = cluster.datadir / "pg_wal"
    names = sorted(p.name[:-6] for p in (wal_dir / "archive_status").glob("*.ready"))
    assert len(names) >= SEGMENTS, names
    names = names[:SEGMENTS]
    keydir = factory.scratch_dir("crash-keys")
    proc = walship_install.run("keygen", "--symmetric", str(keydir / "secret.key"))
    assert proc.returncode == 0, proc.stderr
    digests = {n: crash.sha256_file(wal_dir / n) for n in names}
    yield WalSource(factory, wal_dir, names, digests, keydir / "secret.key")
    factory.close()


def _open(store_url: str, key_file: Path) -> tuple[Storage, Keyring]:
    config = Config(store=store_url, key_file=key_file)
    return open_storage(store_url, config), Keyring.from_config(config)


def _check_wal(storage: Storage, keyring: Keyring, name: str, digest: str) -> str:
    """'absent', or 'whole' after proving the object is complete; AssertionError otherwise."""
    key = layout.wal_key(name)
    try:
        info = storage.stat(key)
    except ObjectNotFound:
        return "absent"
    assert info.metadata.get("sha256") == digest, f"{key}: stored digest {info.metadata}"
    plain = pipeline.decode_bytes(crash.read_object(storage, key), keyring)
    assert hashlib.sha256(plain).hexdigest() == digest, f"{key} decodes to other bytes"
    return "whole"


def _check_listed_wal(storage: Storage, keyring: Keyring, source: WalSource) -> dict[str, str]:
    """Every WAL object the store lists is one of ours and whole; name -> state for all."""
    listed = {o.key.removeprefix(layout.WAL_PREFIX) for o in storage.list(layout.WAL_PREFIX)}
    assert listed <= set(source.names), f"unexpected objects listed: {listed}"
    states = {n: _check_wal(storage, keyring, n, source.digests[n]) for n in source.names}
    for name in listed:
        assert states[name] == "whole", name
    return states


def _walship(source: WalSource, config: Path, *args: str, cwd: Path | None = None,
             env: Mapping[str, str] | None = None, kind: str, trial: int,
             delay: float | None = None) -> crash.Run:
    """`walship ARGS` with `config`, as postgres; killed `delay` seconds in if given."""
    logdir = source.factory.install.root / "crash-logs"
    return crash.run([str(source.install.bin), *args],
                     env={"WALSHIP_CONFIG": str(config), **(env or {})}, cwd=cwd,
                     logdir=logdir, kind=kind, trial=trial, delay=delay)


def _report(kind: str, window: float, delays: list[float],
            outcomes: Mapping[str, int]) -> None:
    """One line per kind for the reliability table (shown with pytest -s)."""
    print(f"\nCRASH {kind}: {len(delays)} trials, undisturbed run {window:.2f}s, kill at "
          f"{min(delays):.2f}-{max(delays):.2f}s after start (seed {crash.base_seed()}): "
          + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))


def _fetch_cli(source: WalSource, config: Path, name: str, run: crash.Run, trial: int,
               env: Mapping[str, str] | None = None) -> None:
    """`walship wal-fetch` of name delivers exactly the original bytes."""
    work = source.factory.scratch_dir("crash-fetch")
    (work / "pg_wal").mkdir()
    chown_pg(work)
    got = _walship(source, config, "wal-fetch", name, "pg_wal/RESTORED", cwd=work,
                   env={"WALSHIP_PREFETCH": "0", **(env or {})}, kind="wal-fetch", trial=trial)
    assert got.returncode == 0, f"{run.describe()}\nfetch: {got.describe()}"
    assert crash.sha256_file(work / "pg_wal" / "RESTORED") == source.digests[name], \
        run.describe()
    shutil.rmtree(work)


# -- wal-push ----------------------------------------------------------------------------------


def _wal_push_trials(source: WalSource, kind: str, trials: int,
                     new_store: Callable[[int], str],
                     env: Mapping[str, str] | None = None) -> None:
    """Kill `wal-push SEGMENT` (doing the put itself: push_ahead = 0) at random moments;
    `new_store(trial)` gives each trial an empty store."""

    def setup(trial: int) -> tuple[str, Path, Path]:
        url = new_store(trial)
        return url, source.config(url, push_ahead=0), source.fresh_pg_wal()

    name0 = source.names[0]
    url, config, pg_wal = setup(-1)
    measured = _walship(source, config, "wal-push", f"pg_wal/{name0}", cwd=pg_wal.parent,
                        env=env, kind=kind, trial=-1)
    assert measured.returncode == 0, measured.describe()
    window = measured.seconds
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    for trial in range(trials):
        rng = crash.trial_rng(kind, trial)
        delay = rng.uniform(0, SPAN * window)
        name = rng.choice(source.names)
        delays.append(delay)
        url, config, pg_wal = setup(trial)
        run = _walship(source, config, "wal-push", f"pg_wal/{name}", cwd=pg_wal.parent,
                       env=env, kind=kind, trial=trial, delay=delay)
        storage, keyring = _open(url, source.key_file)
        try:
            def context(run: crash.Run = run, storage: Storage = storage, url: str = url) -> str:
                listing = (crash.tree_listing(Path(url.removeprefix("file://")))
                           if url.startswith("file://") else crash.storage_listing(storage))
                return f"{run.describe()}\nstore {url}:\n{listing}"

            if not run.killed:
                assert run.returncode == 0, context()
            try:
                states = _check_listed_wal(storage, keyring, source)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{context()}") from None
            state = states[name]
            assert run.killed or state == "whole", context()
            outcomes[f"{'killed' if run.killed else 'finished'}-{state}"] += 1
            if url.startswith("file://"):
                # A temp file left in the store shows the kill landed inside the put.
                outcomes["store-temp-files-left"] += sum(
                    1 for p in Path(url.removeprefix("file://")).rglob(".walship-tmp-*"))
            if state == "whole":
                # What a killed push left complete, wal-fetch delivers as it was.
                _fetch_cli(source, config, name, run, trial, env)
            again = _walship(source, config, "wal-push", f"pg_wal/{name}", cwd=pg_wal.parent,
                             env=env, kind=f"{kind} re-run", trial=trial)
            assert again.returncode == 0, f"re-run failed: {again.describe()}\n{context()}"
            assert _check_wal(storage, keyring, name, source.digests[name]) == "whole", context()
        finally:
            storage.close()
        shutil.rmtree(pg_wal.parent)
    _report(kind, window, delays, outcomes)


def test_kill_wal_push_file_store(wal_source: WalSource) -> None:
    _wal_push_trials(wal_source, "wal-push (file)", WAL_PUSH_TRIALS,
                     lambda trial: wal_source.new_file_store())


def test_kill_wal_push_s3(wal_source: WalSource, s3_store_url: str) -> None:
    _wal_push_trials(wal_source, "wal-push (s3)", WAL_PUSH_S3_TRIALS,
                     lambda trial: f"{s3_store_url}/t{trial + 1}", env=aws_env())


# -- the background pusher ---------------------------------------------------------------------


def _pusher_pids(pg_wal: Path) -> list[int]:
    return crash.pids_of("walship.ops.push_ahead", str(pg_wal))


def _markers_are_true(storage: Storage, pg_wal: Path, source: WalSource) -> int:
    """Every push marker vouches for an object stored with the file's digest."""
    markers = [m for m in (pg_wal / "walship" / "pushed").glob("*") if not m.name.startswith(".")]
    for marker in markers:
        info = storage.stat(layout.wal_key(marker.name))  # ObjectNotFound: a false marker
        assert info.metadata.get("sha256") == source.digests[marker.name], marker.name
    return len(markers)


def _archiver(source: WalSource, config: Path, pg_wal: Path, names: list[str],
              kind: str, trial: int) -> list[crash.Run]:
    """What PostgreSQL's archiver does: push in order, rename .ready to .done on success."""
    runs = []
    for name in names:
        run = _walship(source, config, "wal-push", f"pg_wal/{name}", cwd=pg_wal.parent,
                       kind=kind, trial=trial)
        assert run.returncode == 0, run.describe()
        status = pg_wal / "archive_status"
        os.replace(status / f"{name}.ready", status / f"{name}.done")
        runs.append(run)
    return runs


def test_kill_background_pusher(wal_source: WalSource) -> None:
    """wal-push of the first ready file starts the pusher, which pushes them all; kill the
    pusher at a random moment. The waiting wal-push still exits 0 (it pushes the file itself
    once the pusher's flock is free), no marker lies, and the archiver's next calls start a
    new pusher at once."""
    source = wal_source
    kind = "background pusher"
    names = source.names

    def setup() -> tuple[str, Path, Path]:
        url = source.new_file_store()
        return url, source.config(url, concurrency=2), source.fresh_pg_wal()

    # Undisturbed: from the start of the first wal-push until every file has its marker.
    url, config, pg_wal = setup()
    pushed = pg_wal / "walship" / "pushed"
    started = time.monotonic()
    first = _walship(source, config, "wal-push", f"pg_wal/{names[0]}", cwd=pg_wal.parent,
                     kind=kind, trial=-1)
    assert first.returncode == 0, first.describe()
    crash.wait_until(lambda: all((pushed / n).exists() for n in names), 60, "all markers",
                     lambda: crash.tree_listing(pg_wal / "walship"))
    window = time.monotonic() - started
    crash.kill_pids(_pusher_pids(pg_wal))  # idle by now: no need to wait for its exit
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    for trial in range(PUSHER_TRIALS):
        delay = crash.trial_rng(kind, trial).uniform(0, SPAN * window)
        delays.append(delay)
        url, config, pg_wal = setup()
        killed: list[int] = []

        def kill_pusher(pg_wal: Path = pg_wal, killed: list[int] = killed) -> None:
            # The wal-push spawns the pusher within moments; if it has not yet, kill it as
            # soon as it appears.
            crash.wait_until(lambda: _pusher_pids(pg_wal), 30, "the pusher to start")
            killed.extend(crash.kill_pids(_pusher_pids(pg_wal)))

        # The wal-push is not killed: only its pusher is, `delay` after the wal-push started.
        waiter_start = time.monotonic()
        proc, _out_path, err_path = crash.start(
            [str(source.install.bin), "wal-push", f"pg_wal/{names[0]}"],
            env={"WALSHIP_CONFIG": str(config)}, cwd=pg_wal.parent,
            logdir=source.install.root / "crash-logs")
        time.sleep(max(0.0, delay - (time.monotonic() - waiter_start)))
        kill_pusher()
        crash.wait_gone(killed)
        code = proc.wait(timeout=180)
        storage, keyring = _open(url, source.key_file)
        try:
            pusher_log = (pg_wal / "walship" / "push" / ".log").read_text(errors="replace")

            def context(storage: Storage = storage, url: str = url, pg_wal: Path = pg_wal,
                        pusher_log: str = pusher_log, code: int = code, delay: float = delay,
                        trial: int = trial, killed: list[int] = killed,
                        err_path: Path = err_path) -> str:
                return (f"[{kind} trial {trial}, WALSHIP_CRASH_SEED={crash.base_seed()}, "
                        f"pusher {killed} killed {delay:.3f}s after wal-push started]\n"
                        f"wal-push exit {code}, stderr: {err_path.read_text()!r}\n"
                        f"pusher log: {pusher_log!r}\n"
                        f"{crash.tree_listing(Path(url.removeprefix('file://')))}\n"
                        f"{crash.tree_listing(pg_wal / 'walship')}")

            assert code == 0, context()
            try:
                n_markers = _markers_are_true(storage, pg_wal, source)
                states = _check_listed_wal(storage, keyring, source)
            except (AssertionError, ObjectNotFound) as exc:
                raise AssertionError(f"{exc}\n{context()}") from None
            assert states[names[0]] == "whole", context()
            stored = sum(1 for s in states.values() if s == "whole")
            # A temp file left in the store shows the kill landed inside a put.
            outcomes["store-temp-files-left"] += sum(
                1 for p in Path(url.removeprefix("file://")).rglob(".walship-tmp-*"))
            outcomes[f"stored-before-rerun={stored}/{len(names)}"] += 1
            outcomes["markers-left"] += n_markers
            # The re-run: the archiver carries on. Its calls find the killed pusher's flock
            # free and start a new pusher (or find a true marker and exit at once).
            os.replace(pg_wal / "archive_status" / f"{names[0]}.ready",
                       pg_wal / "archive_status" / f"{names[0]}.done")
            try:
                runs = _archiver(source, config, pg_wal, names[1:], f"{kind} re-run", trial)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{context()}") from None
            for name in names:
                assert _check_wal(storage, keyring, name, source.digests[name]) == "whole", \
                    context()
            _markers_are_true(storage, pg_wal, source)
            # A call that pushed its file itself (rather than find the new pusher's marker)
            # logs it: none should have had to.
            self_pushed = sum(1 for r in runs if "walship: pushed " in r.stderr
                              or "already archived" in r.stderr)
            outcomes["re-run-self-pushed"] += self_pushed
        finally:
            storage.close()
            crash.kill_pids(_pusher_pids(pg_wal))
        shutil.rmtree(pg_wal.parent, ignore_errors=True)
    _report(kind, window, delays, outcomes)


# -- the prefetcher ----------------------------------------------------------------------------


def test_kill_prefetcher(wal_source: WalSource) -> None:
    """wal-fetch of the first segment starts the prefetcher; kill it at a random moment while
    it downloads the next ones. A prefetched file is whole or absent, the following fetches
    deliver the right bytes, and a new prefetcher starts at once."""
    source = wal_source
    kind = "prefetcher"
    names = source.names
    url = source.new_file_store()
    config = source.config(url, push_ahead=0, prefetch=SEGMENTS - 1, concurrency=2)
    pg_wal = source.fresh_pg_wal()
    _archiver(source, config, pg_wal, names, f"{kind} setup", -1)

    def recovery_dir() -> Path:
        datadir = source.factory.scratch_dir("crash-recovering")
        (datadir / "pg_wal").mkdir()
        (datadir / "recovery.signal").touch()
        chown_pg(datadir)
        return datadir

    def fetch(datadir: Path, name: str, trial: int) -> crash.Run:
        run = _walship(source, config, "wal-fetch", name, "pg_wal/RECOVERYXLOG", cwd=datadir,
                       kind=f"{kind} wal-fetch", trial=trial)
        assert run.returncode == 0, run.describe()
        got = datadir / "pg_wal" / "RECOVERYXLOG"
        assert crash.sha256_file(got) == source.digests[name], run.describe()
        got.unlink()
        return run

    def prefetcher_pids(datadir: Path) -> list[int]:
        return crash.pids_of("walship.ops.prefetch", str(datadir))

    # Undisturbed: from the start of the first wal-fetch until the window is downloaded.
    datadir = recovery_dir()
    pf = datadir / "pg_wal" / "walship" / "prefetch"
    started = time.monotonic()
    fetch(datadir, names[0], -1)
    crash.wait_until(lambda: all((pf / n).exists() for n in names[1:]), 60, "prefetched files",
                     lambda: crash.tree_listing(pf))
    window = time.monotonic() - started
    crash.kill_pids(prefetcher_pids(datadir))
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    for trial in range(PREFETCH_TRIALS):
        delay = crash.trial_rng(kind, trial).uniform(0, SPAN * window)
        delays.append(delay)
        datadir = recovery_dir()
        pf = datadir / "pg_wal" / "walship" / "prefetch"
        started = time.monotonic()
        first = fetch(datadir, names[0], trial)
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        crash.wait_until(lambda d=datadir: prefetcher_pids(d), 30, "the prefetcher")
        killed = crash.kill_pids(prefetcher_pids(datadir))
        crash.wait_gone(killed)

        def context(trial: int = trial, delay: float = delay, killed: list[int] = killed,
                    pf: Path = pf, first: crash.Run = first) -> str:
            log = (pf / ".log").read_text(errors="replace") if (pf / ".log").exists() else ""
            return (f"[{kind} trial {trial}, WALSHIP_CRASH_SEED={crash.base_seed()}, "
                    f"prefetcher {killed} killed {delay:.3f}s after wal-fetch started]\n"
                    f"first fetch: {first.describe()}\nprefetcher log: {log!r}\n"
                    f"{crash.tree_listing(pf)}")

        whole = 0
        for entry in pf.iterdir():
            if entry.name.startswith("."):
                continue
            # Whatever has a segment's name in the spool is complete and the right bytes.
            assert entry.name in source.digests, context()
            assert crash.sha256_file(entry) == source.digests[entry.name], context()
            whole += 1
        leftovers = [e.name for e in pf.iterdir() if e.name.startswith(".walship-")]
        outcomes[f"prefetched-whole={whole}"] += 1
        outcomes["temp-files-left-by-kill"] += len(leftovers)
        # The re-run: recovery goes on; every fetch delivers the right bytes and the first one
        # starts a new prefetcher (the dead one's flock is free).
        try:
            for name in names[1:]:
                fetch(datadir, name, trial)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{context()}") from None
        # The new prefetcher removes what the dead one was writing (up to a segment each).
        crash.wait_until(lambda pf=pf, killed=killed: not _dead_temps(pf, killed), 30,
                         "the dead prefetcher's temp files to be removed", context)
        # Recovery ends: the prefetcher exits and removes the spool.
        (datadir / "recovery.signal").unlink()
        crash.wait_until(lambda d=datadir: not prefetcher_pids(d), 30, "the prefetcher to exit",
                         context)
        crash.kill_pids(prefetcher_pids(datadir))
        shutil.rmtree(datadir, ignore_errors=True)
    _report(kind, window, delays, outcomes)


def _dead_temps(pf: Path, pids: list[int]) -> list[str]:
    """Temp files in the prefetch spool written by one of `pids` (download_wal's naming)."""
    return [e.name for e in pf.iterdir() if e.name.startswith(".walship-")
            and e.name.endswith(".tmp") and any(f".{pid}." in e.name for pid in pids)]


# -- backup-push, backup-fetch, and wal-push under a real archiver -------------------------------


@dataclass
class BackupSetup:
    """An archiving cluster (walship archive_command), its store, and one complete backup."""

    source: WalSource
    cluster: PgCluster
    config: Path
    store: Path
    push_seconds: float
    backup: str


@pytest.fixture(scope="module")
def backup_setup(wal_source: WalSource) -> Iterator[BackupSetup]:
    source = wal_source
    factory = PgFactory(source.install)
    store = factory.scratch_dir("crash-backup-store")
    config = source.config(f"file://{store}", partition_size="1MiB", concurrency=2)
    cluster = factory.cluster("crash-primary")
    cluster.initdb()
    cluster.set_conf(archive_mode="on", wal_keep_size="'1GB'",
                     archive_command=f"'{source.install.command(config, 'wal-push %p')}'")
    cluster.start()
    cluster.pgbench("-i", "-q", "-s", "1")
    run = _walship(source, config, "backup-push", str(cluster.datadir),
                   env=cluster.libpq_env, kind="backup-push", trial=-1)
    assert run.returncode == 0, run.describe()
    yield BackupSetup(source, cluster, config, store, run.seconds, run.stdout.strip())
    factory.close()


def _started_name(run: crash.Run) -> str | None:
    match = re.search(r"backup (base_\w+) started", run.stderr)
    return match.group(1) if match else None


def _one_line_error(run: crash.Run) -> bool:
    """A message and at most a hint, each one `walship: ` line, no traceback."""
    lines = run.stderr.strip().splitlines()
    return (0 < len(lines) <= 2 and all(line.startswith("walship: ") for line in lines)
            and "Traceback" not in run.stderr)


def test_kill_backup_push(backup_setup: BackupSetup) -> None:
    """Kill backup-push at random moments: backup-list never shows an unfinished backup,
    backup-fetch of its name fails clearly, the lock it held does not stop the next run."""
    setup = backup_setup
    source, cluster, store = setup.source, setup.cluster, setup.store
    kind = "backup-push"
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    for trial in range(BACKUP_PUSH_TRIALS):
        delay = crash.trial_rng(kind, trial).uniform(0, SPAN * setup.push_seconds)
        delays.append(delay)
        cluster.psql("insert into pgbench_history (tid, bid, aid, delta, mtime) "
                     f"values (1, 1, 1, {trial}, now())")
        run = _walship(source, setup.config, "backup-push", str(cluster.datadir),
                       env=cluster.libpq_env, kind=kind, trial=trial, delay=delay)
        name = _started_name(run)

        def context(run: crash.Run = run) -> str:
            return f"{run.describe()}\n{crash.tree_listing(store)}"

        if not run.killed:
            assert run.returncode == 0, context()
        listing = _walship(source, setup.config, "backup-list", "--json", kind=kind, trial=trial)
        assert listing.returncode == 0, f"{listing.describe()}\n{context()}"
        listed = [b["name"] for b in json.loads(listing.stdout)]
        base = store / "basebackups"
        for entry in json.loads(listing.stdout):
            # Listed means complete: the sentinel, the manifest, every partition.
            keys = [layout.sentinel_key(entry["name"]), layout.backup_manifest_key(entry["name"])]
            for index in range(entry["partitions"]):
                keys += [layout.backup_partition_key(entry["name"], index),
                         layout.backup_partition_files_key(entry["name"], index)]
            missing = [k for k in keys if not (store / k).is_file()]
            assert not missing, f"listed {entry['name']} lacks {missing}\n{context()}"
        unfinished = sorted(p.name for p in base.iterdir()
                            if p.is_dir() and not (store / layout.sentinel_key(p.name)).exists())
        assert not set(unfinished) & set(listed), context()
        if name is not None:
            complete = (store / layout.sentinel_key(name)).exists()
            assert (name in listed) == complete, context()
            outcomes["killed-after-sentinel" if complete and run.killed
                     else "finished" if complete else "unfinished-left"] += 1
        else:
            outcomes["killed-before-backup-start"] += 1
        for orphan in unfinished:
            dest = source.factory.new_path("crash-orphan-fetch")
            fetch = _walship(source, setup.config, "backup-fetch", str(dest), orphan,
                             kind=f"{kind} fetch of unfinished", trial=trial)
            # Exit 1, "the store confirmed it does not exist", as for any unknown name.
            assert fetch.returncode == 1 and "never completed" in fetch.stderr \
                and _one_line_error(fetch), \
                f"{fetch.describe()}\n{context()}"
            assert not dest.exists() or not any(dest.iterdir()), context()
        lock = store / layout.lock_key("backup")
        lock_left = lock.exists()
        outcomes["lock-left"] += lock_left
        again = _walship(source, setup.config, "backup-push", str(cluster.datadir),
                         env=cluster.libpq_env, kind=f"{kind} re-run", trial=trial)
        assert again.returncode == 0, f"re-run: {again.describe()}\n{context()}"
        if lock_left:
            assert "breaking stale lock" in again.stderr, again.describe()
        assert again.stdout.strip() in [
            b["name"] for b in json.loads(_walship(source, setup.config, "backup-list",
                                                   "--json", kind=kind, trial=trial).stdout)]
    outcomes["unfinished-dirs-in-store"] = sum(
        1 for p in (store / "basebackups").iterdir()
        if not (store / layout.sentinel_key(p.name)).exists())
    _report(kind, setup.push_seconds, delays, outcomes)


def _tree_digest(root: Path) -> dict[str, str]:
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            result[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            path = Path(dirpath) / f
            result[str(path.relative_to(root))] = crash.sha256_file(path)
    return result


def test_kill_backup_fetch(backup_setup: BackupSetup) -> None:
    """Kill backup-fetch at random moments: a DEST with recovery.signal (written last) is the
    complete restore; the re-run refuses a non-empty DEST clearly, and succeeds once it is
    moved aside."""
    setup = backup_setup
    source = setup.source
    kind = "backup-fetch"
    reference = source.factory.new_path("crash-restore-ref")
    measured = _walship(source, setup.config, "backup-fetch", str(reference), setup.backup,
                        kind=kind, trial=-1)
    assert measured.returncode == 0, measured.describe()
    expected = _tree_digest(reference)
    assert "recovery.signal" in expected
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    for trial in range(BACKUP_FETCH_TRIALS):
        delay = crash.trial_rng(kind, trial).uniform(0, SPAN * measured.seconds)
        delays.append(delay)
        dest = source.factory.new_path("crash-restore")
        run = _walship(source, setup.config, "backup-fetch", str(dest), setup.backup,
                       kind=kind, trial=trial, delay=delay)

        def context(run: crash.Run = run, dest: Path = dest) -> str:
            return f"{run.describe()}\n{crash.tree_listing(dest, limit=40)}"

        if not run.killed:
            assert run.returncode == 0, context()
        state = "absent"
        if dest.exists():
            got = _tree_digest(dest)
            if "recovery.signal" in got:
                # recovery.signal is written last: its presence means a complete restore
                # (without it the directory cannot start; see tests/e2e/test_backup.py).
                assert got == expected, context()
                state = "complete"
            else:
                state = "partial" if got else "empty"
        outcomes[f"{'killed' if run.killed else 'finished'}-{state}"] += 1
        again = _walship(source, setup.config, "backup-fetch", str(dest), setup.backup,
                         kind=f"{kind} re-run", trial=trial)
        if state in ("absent", "empty"):
            assert again.returncode == 0, f"re-run: {again.describe()}\n{context()}"
        else:
            assert again.returncode == 2 and "is not empty" in again.stderr \
                and _one_line_error(again), f"re-run: {again.describe()}\n{context()}"
            shutil.rmtree(dest)
            again = _walship(source, setup.config, "backup-fetch", str(dest), setup.backup,
                             kind=f"{kind} re-run after rm", trial=trial)
            assert again.returncode == 0, f"re-run: {again.describe()}\n{context()}"
        assert _tree_digest(dest) == expected, context()
        shutil.rmtree(dest)
    _report(kind, measured.seconds, delays, outcomes)


def test_kill_wal_push_in_archiving_cluster(backup_setup: BackupSetup) -> None:
    """PostgreSQL's own archiver runs walship; kill its wal-push and the pusher at a random
    moment after a segment switch. PostgreSQL retries, the segment is archived whole."""
    setup = backup_setup
    source, cluster, store = setup.source, setup.cluster, setup.store
    kind = "wal-push (archiving cluster)"
    pg_wal = cluster.datadir / "pg_wal"

    def archiver_pids() -> list[int]:
        return [p for p in crash.pids_of(str(source.install.bin), "wal-push")
                if os.path.realpath(f"/proc/{p}/cwd") == str(cluster.datadir)]

    def switch() -> str:
        cluster.psql("insert into pgbench_history (tid, bid, aid, delta, mtime) "
                     "select 1, 1, g, g, now() from generate_series(1, 20000) g")
        name = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")
        cluster.psql("select pg_switch_wal()")
        return name

    def archived(name: str) -> bool:
        return cluster.psql("select coalesce(last_archived_wal >= "
                            f"'{name}', false) from pg_stat_archiver") == "t"

    started = time.monotonic()
    name = switch()
    crash.wait_until(lambda: archived(name), 120, f"{name} archived", cluster.log_tail)
    window = time.monotonic() - started
    storage, keyring = _open(f"file://{store}", source.key_file)
    outcomes: collections.Counter[str] = collections.Counter()
    delays = []
    try:
        for trial in range(CLUSTER_WAL_PUSH_TRIALS):
            delay = crash.trial_rng(kind, trial).uniform(0, SPAN * window)
            delays.append(delay)
            started = time.monotonic()
            name = switch()
            time.sleep(max(0.0, delay - (time.monotonic() - started)))
            killed = crash.kill_pids(archiver_pids() + _pusher_pids(pg_wal))
            outcomes[f"killed-processes={len(killed)}"] += 1

            def context(trial: int = trial, delay: float = delay, killed: list[int] = killed,
                        name: str = name) -> str:
                return (f"[{kind} trial {trial}, WALSHIP_CRASH_SEED={crash.base_seed()}, "
                        f"{killed} killed {delay:.3f}s after the switch from {name}]\n"
                        f"{cluster.log_tail()}\n{crash.storage_listing(storage, 'wal/')}")

            crash.wait_until(lambda n=name: archived(n), 180, f"{name} archived", context)
            for obj in storage.list(layout.WAL_PREFIX):
                seg = obj.key.removeprefix(layout.WAL_PREFIX)
                on_disk = pg_wal / seg
                digest = (crash.sha256_file(on_disk) if on_disk.exists()
                          else obj.metadata.get("sha256", ""))
                plain = pipeline.decode_bytes(crash.read_object(storage, obj.key), keyring)
                assert hashlib.sha256(plain).hexdigest() == digest == obj.metadata.get(
                    "sha256"), f"{obj.key} is not whole\n{context()}"
    finally:
        storage.close()
    # Archiving is healthy again: the next backup-push (which checks it) must not refuse.
    crash.wait_until(lambda: cluster.psql(
        "select coalesce(last_failed_time < last_archived_time, true) from pg_stat_archiver")
        == "t", 60, "archiving to recover")
    _report(kind, window, delays, outcomes)
