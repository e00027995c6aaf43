"""Base backup and restore of a pgbench database: walship against pg_basebackup and barman-cloud.

    /opt/walship-venv/bin/python benchmarks/backup.py [--scale 50] [--repeat 3]
        [--partition-size 64MiB] [--concurrency 4] [--no-encryption] [--markdown]
        [--set 'KEY=TOML' ...]
        [--s3 [--barman-venv /opt/barman-venv] [--barman-jobs 2]]

Without --s3 the store is a local directory. With --s3 the benchmark starts a moto S3 server
(`python -m moto.server` on 127.0.0.1), walship stores to s3://BUCKET/walship there (WAL
archiving included), and barman-cloud-backup (`--lz4 -J 2 --immediate-checkpoint`) and
barman-cloud-restore run against s3://BUCKET/barman on the same server, so every ratio
compares with barman-cloud in the same run. barman-cloud comes from PyPI's `barman[cloud]`
plus `lz4`, installed in a separate virtualenv so it cannot disturb walship's dependencies:

    /usr/bin/python3 -m venv /opt/barman-venv
    /opt/barman-venv/bin/pip install 'barman[cloud]' lz4

pgbench scale 50 is about 750 MiB of data files.

What it does, in one run so that every ratio compares figures from the same machine state:

1. Starts a throwaway PostgreSQL 15 cluster (as the postgres user) archiving through
   `walship wal-push %p` into a local store, and fills it with `pgbench -i -s SCALE`
   (scale 20 is about 300 MiB of data files).
2. Repeats, in a rotating order:
   - walship backup-push PGDATA (lz4, a secret key unless --no-encryption, partitions of
     --partition-size so that a small database still shows the parallelism), which includes
     waiting until the backup's WAL is in the store;
   - walship backup-fetch DEST NAME (download, decrypt, verify every file, write);
   - pg_basebackup -Ft -X none -c fast --compress=client-lz4 into a directory, as the
     baseline for the push;
   - lz4 -dc base.tar.lz4 | tar -x, as the baseline for the fetch (no verification).
   - with --s3: barman-cloud-backup and barman-cloud-restore.
   Each command runs as the postgres user under /usr/bin/time, after a sync(2) that leaves
   nothing of the previous command unwritten: wall time and peak RSS of the
   largest process (for the pipeline, the larger of lz4 and tar). The process tree is also
   sampled every 50 ms for the sum of its RSS ("tree RSS"), which is what counts for a tool
   that forks workers (barman-cloud's -J uploaders are processes, walship's are threads).
3. Prints medians, MB/s of data-directory bytes (walship's data_bytes), stored sizes, and
   walship/baseline ratios (with --s3, against barman-cloud too). Progress goes to stderr,
   the table to stdout. Everything is cleaned up, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
VENV_BIN = Path(sys.executable).parent
WALSHIP = VENV_BIN / "walship"
MiB = 1024 * 1024

_started = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[backup-bench {time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr,
          flush=True)


def chown_pg(path: Path) -> None:
    """Give a tree to the postgres user (when we are root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def as_pg(args: list[str], env: Mapping[str, str] | None = None, *, check: bool = True,
          timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    """Run a command as the postgres user."""
    full_env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", "env",
                *(f"{k}={v}" for k, v in full_env.items()), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    else:
        proc = subprocess.run(args, env={**os.environ, **full_env}, capture_output=True,
                              text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Measured:
    """Wall seconds, peak RSS of the largest process and of the whole tree, and CPU seconds
    (the tool's, and the S3 server's over the same interval) of one run."""

    seconds: float
    rss_bytes: int
    stdout: str
    tree_rss_bytes: int = 0
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0


_WRAPPERS = frozenset({"runuser", "env", "time", "sh"})
_NOT_MEASURED: set[int] = set()  # our own servers (moto), children of this process too
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of one live process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Fields after the parenthesised command name: utime and stime are 14 and 15.
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _servers_cpu() -> float:
    return sum(_cpu_of(pid) for pid in _NOT_MEASURED)


def _children(pid: int) -> list[int]:
    """Child pids, from /proc/PID/task/*/children (a few small reads: the sampler must not
    itself take a noticeable share of the 2 CPUs it measures)."""
    result: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                result.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return result


def _status(pid: int) -> tuple[str, int]:
    """(command name, VmRSS bytes) of a process; ("", 0) if it is gone."""
    name, rss = "", 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return name, rss


def _tree_rss(root_pid: int) -> int:
    """Sum of VmRSS over the descendants of root_pid, leaving out the wrappers (runuser,
    env, time, sh)."""
    total = 0
    todo = _children(root_pid)
    while todo:
        pid = todo.pop()
        if pid in _NOT_MEASURED:
            continue
        todo.extend(_children(pid))
        name, rss = _status(pid)
        if name not in _WRAPPERS:
            total += rss
    return total


def timed(args: list[str], scratch: Path, env: Mapping[str, str] | None = None) -> Measured:
    """Run as postgres under /usr/bin/time; wall clock measured here, RSS of the largest
    process and CPU (with every child it waited for) by time(1), the RSS of the process
    tree by sampling /proc every 50 ms, the S3 server's CPU from /proc before and after.

    The CPU figures say how close a run is to the machine's floor: on 2 shared cores the
    S3 stand-in's own CPU competes with the tool it serves (it would not with real S3)."""
    out = scratch / "time.out"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        me = os.getpid()
        while not stop.wait(0.05):
            peak = max(peak, _tree_rss(me))

    sampler = threading.Thread(target=sample, daemon=True)
    # Every run starts with nothing dirty in the page cache: otherwise a tool that flushes
    # (walship's restore ends with syncfs, which flushes the whole filesystem) would also
    # wait for the hundreds of MiB the previous tool left unwritten.
    os.sync()
    server_before = _servers_cpu()
    started = time.monotonic()
    sampler.start()
    try:
        proc = as_pg(["/usr/bin/time", "-f", "%M %U %S", "-o", str(out), *args], env)
    finally:
        stop.set()
        sampler.join()
    seconds = time.monotonic() - started
    server_cpu = _servers_cpu() - server_before
    rss_kib, user, system = out.read_text().strip().splitlines()[-1].split()
    rss = int(rss_kib) * 1024
    return Measured(seconds, rss, proc.stdout, max(peak, rss), float(user) + float(system),
                    server_cpu)


@dataclass
class Cluster:
    """A throwaway cluster on a private socket."""

    datadir: Path
    sockdir: Path
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {"PGHOST": str(self.sockdir), "PGPORT": str(self.port), "PGUSER": PG_USER,
                "PGDATABASE": "postgres"}

    def psql(self, sql: str) -> str:
        return as_pg([str(PG_BIN / "psql"), "-X", "-At", "-c", sql], self.env).stdout.strip()

    def stop(self) -> None:
        as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"],
              check=False)


@dataclass
class Results:
    """Every measurement, by operation."""

    runs: dict[str, list[Measured]] = field(default_factory=dict)

    def add(self, op: str, measured: Measured) -> None:
        self.runs.setdefault(op, []).append(measured)

    def median_cpu(self, op: str) -> tuple[float, float]:
        """Median CPU seconds of the tool and of the S3 server during its runs."""
        runs = self.runs[op]
        return (statistics.median(r.cpu_seconds for r in runs),
                statistics.median(r.server_cpu_seconds for r in runs))

    def median(self, op: str) -> tuple[float, int, int]:
        """Median seconds, median peak RSS, and the largest tree RSS of any run."""
        runs = self.runs[op]
        return (statistics.median(r.seconds for r in runs),
                int(statistics.median(r.rss_bytes for r in runs)),
                max(r.tree_rss_bytes for r in runs))


AWS_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server(root: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port with one bucket; yields the AWS_* environment."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_")}
    with open(root / "moto.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
    _NOT_MEASURED.add(server.pid)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):  # noqa: S310
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: "
                                       f"{(root / 'moto.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": AWS_REGION,
               "AWS_DEFAULT_REGION": AWS_REGION, "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        import boto3  # walship's own dependency; only the S3 mode needs it here
        boto3.client("s3", endpoint_url=endpoint, region_name=AWS_REGION,
                     aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]
                     ).create_bucket(Bucket="bench")
        progress(f"moto server on {endpoint}, pid {server.pid}")
        yield aws
    finally:
        server.kill()
        server.wait(timeout=10)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="walship-backup-bench-", dir="/tmp"))
    root.chmod(0o755)
    chown_pg(root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_cluster(root: Path, config: Path, scale: int,
                 aws: Mapping[str, str] | None = None) -> Cluster:
    cluster = Cluster(root / "pgdata", root / "sock", 25000 + os.getpid() % 5000)
    cluster.sockdir.mkdir()
    chown_pg(cluster.sockdir)
    as_pg([str(PG_BIN / "initdb"), "-D", str(cluster.datadir), "-U", PG_USER, "-A", "trust",
           "--no-sync"])
    prefix = "".join(f"{k}={v} " for k, v in (aws or {}).items())
    archive_command = f"{prefix}WALSHIP_CONFIG={config} {WALSHIP} wal-push %p"
    with open(cluster.datadir / "postgresql.conf", "a") as fh:
        fh.write(f"listen_addresses = ''\nunix_socket_directories = '{cluster.sockdir}'\n"
                 f"port = {cluster.port}\nwal_level = replica\narchive_mode = on\n"
                 f"archive_command = '{archive_command}'\nmax_wal_size = '1GB'\n"
                 "shared_buffers = '128MB'\nfsync = off\n")
    log = root / "pg.log"
    as_pg([str(PG_BIN / "pg_ctl"), "-D", str(cluster.datadir), "-l", str(log), "-w", "start"])
    progress(f"pgbench -i -s {scale}")
    as_pg([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale)], cluster.env)
    cluster.psql("checkpoint")
    return cluster


BARMAN_BIN = Path("/opt/barman-venv/bin")


def barman_latest(common: list[str], url: str, env: Mapping[str, str]) -> str:
    """The id of the newest barman-cloud backup of server "pg"."""
    listing = json.loads(as_pg([str(BARMAN_BIN / "barman-cloud-backup-list"), *common,
                                "--format", "json", url, "pg"], env).stdout)
    return str(listing["backups_list"][-1]["backup_id"])


def s3_size(aws: Mapping[str, str], prefix: str, backup_id: str) -> int:
    """Bytes stored under bench/PREFIX/BACKUP_ID/."""
    import boto3
    client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=AWS_REGION,
                          aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(
            Bucket="bench", Prefix=f"{prefix}{backup_id}/"):
        total += sum(obj["Size"] for obj in page.get("Contents", []))
    return total


def sha256_cpu(datadir: Path) -> float:
    """CPU seconds (this thread) to SHA-256 every file of the data directory but pg_wal/,
    as backup-push must for its manifest: the part of its CPU no tuning can remove."""
    started = time.thread_time()
    buffer = bytearray(MiB)
    for top, dirs, files in os.walk(datadir):
        if Path(top) == datadir:
            dirs[:] = [d for d in dirs if d != "pg_wal"]
        for name in files:
            digest = hashlib.sha256()
            with contextlib.suppress(OSError), open(os.path.join(top, name), "rb") as fh:
                while n := fh.readinto(buffer):
                    digest.update(memoryview(buffer)[:n])
    return time.thread_time() - started


def untar(tarball: Path, dest: Path, scratch: Path) -> Measured:
    return timed(["/bin/sh", "-c", f"mkdir -m 700 {dest} && lz4 -dc {tarball} | "
                  f"tar -xf - -C {dest}"], scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partition-size", default="64MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-encryption", action="store_true")
    parser.add_argument("--s3", action="store_true",
                        help="store on a moto S3 server and compare with barman-cloud")
    parser.add_argument("--barman-venv", type=Path, default=Path("/opt/barman-venv"))
    parser.add_argument("--barman-jobs", type=int, default=2)
    parser.add_argument("--no-basebackup", action="store_true",
                        help="leave out pg_basebackup and lz4 | tar (saves time with --s3)")
    parser.add_argument("--walship-pythonpath", type=Path,
                        help="run walship backup-push/-fetch from the package in this directory "
                        "(PYTHONPATH), e.g. a copy of an older version, for a before/after")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=TOML", help="one more walship setting, a line of TOML "
                        "(e.g. --set 's3_part_size=\"8MiB\"'); repeatable")
    parser.add_argument("--walship-env", action="append", default=[], metavar="NAME=VALUE",
                        help="one more environment variable for walship's commands "
                        "(e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    global BARMAN_BIN
    BARMAN_BIN = barman_bin = args.barman_venv / "bin"
    if args.s3 and not (barman_bin / "barman-cloud-backup").exists():
        parser.error(f"--s3 needs barman-cloud in {args.barman_venv}; see the docstring")

    results = Results()
    stored: dict[str, int] = {}
    data_bytes = 0
    with workspace() as root, contextlib.ExitStack() as stack:
        aws: dict[str, str] = stack.enter_context(moto_server(root)) if args.s3 else {}
        config = root / "walship.toml"
        if args.s3:
            store_url = "s3://bench/walship"
        else:
            store = root / "store"
            store.mkdir()
            store_url = f"file://{store}"
        settings = [f'store = "{store_url}"', f'partition_size = "{args.partition_size}"',
                    f"concurrency = {args.concurrency}"]
        if not args.no_encryption:
            as_pg([str(WALSHIP), "keygen", "--symmetric", str(root / "secret.key")])
            settings.append(f'key_file = "{root / "secret.key"}"')
        settings += args.settings
        config.write_text("\n".join(settings) + "\n")
        chown_pg(root)
        cluster = make_cluster(root, config, args.scale, aws)
        hash_cpu = sha256_cpu(cluster.datadir)
        env = {"WALSHIP_CONFIG": str(config), **cluster.env, **aws}
        env.update(item.split("=", 1) for item in args.walship_env)
        if args.walship_pythonpath:
            env["PYTHONPATH"] = str(args.walship_pythonpath.absolute())
        barman_url = "s3://bench/barman"
        barman_common = ["--cloud-provider", "aws-s3", "--endpoint-url",
                         aws.get("AWS_ENDPOINT_URL", "")]
        try:
            ops = ["walship-push", "walship-fetch"]
            if args.s3:
                ops += ["barman-push", "barman-fetch"]
            if not args.no_basebackup:
                ops += ["basebackup", "untar"]
            pairs = len(ops) // 2
            for i in range(args.repeat):
                start = i % pairs * 2
                for op in ops[start:] + ops[:start]:  # rotate pairs
                    if op == "walship-push":
                        progress(f"run {i + 1}: walship backup-push")
                        m = timed([str(WALSHIP), "backup-push", str(cluster.datadir)], root, env)
                        name = m.stdout.strip()
                        results.add(op, m)
                        listing = json.loads(as_pg([str(WALSHIP), "backup-list", "--json"],
                                                   env).stdout)
                        info = next(b for b in listing if b["name"] == name)
                        data_bytes = info["data_bytes"]
                        stored["walship"] = info["stored_bytes"]
                    elif op == "walship-fetch":
                        progress(f"run {i + 1}: walship backup-fetch")
                        dest = root / f"restore-{i}"
                        results.add(op, timed([str(WALSHIP), "backup-fetch", str(dest),
                                               "LATEST"], root, env))
                        shutil.rmtree(dest)
                    elif op == "barman-push":
                        progress(f"run {i + 1}: barman-cloud-backup --lz4 -J {args.barman_jobs}")
                        results.add(op, timed(
                            [str(barman_bin / "barman-cloud-backup"), *barman_common, "--lz4",
                             "-J", str(args.barman_jobs), "--immediate-checkpoint",
                             "-h", str(cluster.sockdir), "-p", str(cluster.port),
                             "-U", PG_USER, "-n", f"bench-{i}", barman_url, "pg"], root, env))
                        stored["barman"] = s3_size(aws, "barman/pg/base/",
                                                   barman_latest(barman_common, barman_url, env))
                    elif op == "barman-fetch":
                        if "barman-push" not in results.runs:
                            continue  # barman-cloud-backup has not run yet in this rotation
                        progress(f"run {i + 1}: barman-cloud-restore")
                        backup_id = barman_latest(barman_common, barman_url, env)
                        dest = root / f"barman-restore-{i}"
                        results.add(op, timed(
                            [str(barman_bin / "barman-cloud-restore"), *barman_common,
                             barman_url, "pg", backup_id, str(dest)], root, env))
                        shutil.rmtree(dest)
                    elif op == "basebackup":
                        progress(f"run {i + 1}: pg_basebackup -Ft --compress=client-lz4")
                        target = root / "basebackup"
                        shutil.rmtree(target, ignore_errors=True)
                        results.add(op, timed([str(PG_BIN / "pg_basebackup"), "-D", str(target),
                                               "-Ft", "-X", "none", "-c", "fast",
                                               "--compress=client-lz4"], root, cluster.env))
                        stored["basebackup"] = sum(p.stat().st_size for p in target.iterdir())
                    else:
                        tarball = root / "basebackup" / "base.tar.lz4"
                        if not tarball.exists():
                            continue  # pg_basebackup has not run yet in this rotation
                        progress(f"run {i + 1}: lz4 -dc | tar -x")
                        dest = root / f"untar-{i}"
                        results.add(op, untar(tarball, dest, root))
                        shutil.rmtree(dest)
            if not args.no_basebackup and "untar" not in results.runs:
                dest = root / "untar-last"
                results.add("untar", untar(root / "basebackup" / "base.tar.lz4", dest, root))
            if args.s3 and "barman-fetch" not in results.runs:
                results.add("barman-fetch", timed(
                    [str(barman_bin / "barman-cloud-restore"), *barman_common, barman_url, "pg",
                     barman_latest(barman_common, barman_url, env), str(root / "barman-last")],
                    root, env))
        finally:
            cluster.stop()

    mb = data_bytes / 1e6
    header = ("operation", "tool", "s", "MB/s", "peak RSS MiB", "tree RSS MiB",
              "walship time ratio", "walship tree RSS ratio")
    rows = []
    baselines: list[tuple[str, str, str]] = []
    if args.s3:
        baselines += [("barman-push", "barman-fetch", "barman-cloud")]
    if not args.no_basebackup:
        baselines += [("basebackup", "untar", "pg_basebackup / lz4|tar")]
    for label, mine, base_index in (("backup", "walship-push", 0), ("restore", "walship-fetch", 1)):
        ws, wrss, wtree = results.median(mine)
        rows.append((label, "walship", f"{ws:.2f}", f"{mb / ws:.0f}", f"{wrss / MiB:.0f}",
                     f"{wtree / MiB:.0f}", "", ""))
        for pair in baselines:
            op = pair[base_index]
            bs, brss, btree = results.median(op)
            tool = pair[2]
            if op == "basebackup":
                tool = "pg_basebackup -Ft client-lz4"
            elif op == "untar":
                tool = "lz4 -dc | tar -x"
            rows.append((label, tool, f"{bs:.2f}", f"{mb / bs:.0f}", f"{brss / MiB:.0f}",
                         f"{btree / MiB:.0f}", f"{ws / bs:.2f}", f"{wtree / max(btree, 1):.2f}"))
    encrypted = "no encryption" if args.no_encryption else "lz4 + secret key"
    where = "moto S3 server on 127.0.0.1" if args.s3 else "file store on the same disk"
    print(f"\nbase backup of pgbench scale {args.scale}: {data_bytes / MiB:.0f} MiB of data "
          f"files, median of {args.repeat} (tree RSS: the largest of any run); store: {where}; "
          f"walship: {encrypted}, partitions of {args.partition_size}, concurrency "
          f"{args.concurrency}" + (f"; barman-cloud: --lz4 -J {args.barman_jobs}"
                                   if args.s3 else "") + f"; {os.cpu_count()} CPUs")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print("stored: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in stored.items()))
    # Every run, in the order taken: on a shared machine the spread says how far to trust
    # a median.
    print("runs (s; peak RSS MiB): " + "; ".join(
        f"{op} " + " ".join(f"{m.seconds:.2f}/{m.rss_bytes / MiB:.0f}" for m in runs)
        for op, runs in results.runs.items()))
    cpus = os.cpu_count() or 1
    cpu = {op: results.median_cpu(op) for op in results.runs}
    print(f"CPU, medians (tool + S3 server = core-seconds; / {cpus} CPUs = the shortest wall "
          "time that much work allows): " + "; ".join(
              f"{op} {tool:.2f} + {server:.2f} = {tool + server:.2f} "
              f"({(tool + server) / cpus:.2f} s)" for op, (tool, server) in cpu.items()))
    print(f"SHA-256 of the data files alone (one thread; backup-push's manifest needs it): "
          f"{hash_cpu:.2f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
