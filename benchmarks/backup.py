"""Base backup and restore of a pgbench database: walship against pg_basebackup -Ft with lz4.

    /opt/walship-venv/bin/python benchmarks/backup.py [--scale 20] [--repeat 3]
        [--partition-size 64MiB] [--concurrency 4] [--no-encryption] [--markdown]

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
   Each command runs as the postgres user under /usr/bin/time: wall time and peak RSS (for
   the pipeline, the larger of lz4 and tar).
3. Prints medians, MB/s of data-directory bytes (walship's data_bytes), stored sizes, and
   walship/baseline ratios. Progress goes to stderr, the table to stdout. Everything is
   cleaned up, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    """Wall seconds and peak RSS of one run."""

    seconds: float
    rss_bytes: int
    stdout: str


def timed(args: list[str], scratch: Path, env: Mapping[str, str] | None = None) -> Measured:
    """Run as postgres under /usr/bin/time; wall clock measured here, RSS by time(1)."""
    out = scratch / "time.out"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    started = time.monotonic()
    proc = as_pg(["/usr/bin/time", "-f", "%M", "-o", str(out), *args], env)
    seconds = time.monotonic() - started
    rss_kib = int(out.read_text().strip().splitlines()[-1])
    return Measured(seconds, rss_kib * 1024, proc.stdout)


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

    def median(self, op: str) -> tuple[float, int]:
        runs = self.runs[op]
        return (statistics.median(r.seconds for r in runs),
                int(statistics.median(r.rss_bytes for r in runs)))


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="walship-backup-bench-", dir="/tmp"))
    root.chmod(0o755)
    chown_pg(root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_cluster(root: Path, config: Path, scale: int) -> Cluster:
    cluster = Cluster(root / "pgdata", root / "sock", 25000 + os.getpid() % 5000)
    cluster.sockdir.mkdir()
    chown_pg(cluster.sockdir)
    as_pg([str(PG_BIN / "initdb"), "-D", str(cluster.datadir), "-U", PG_USER, "-A", "trust",
           "--no-sync"])
    archive_command = f"WALSHIP_CONFIG={config} {WALSHIP} wal-push %p"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partition-size", default="64MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-encryption", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    results = Results()
    stored: dict[str, int] = {}
    data_bytes = 0
    with workspace() as root:
        store = root / "store"
        store.mkdir()
        config = root / "walship.toml"
        settings = [f'store = "file://{store}"', f'partition_size = "{args.partition_size}"',
                    f"concurrency = {args.concurrency}"]
        if not args.no_encryption:
            as_pg([str(WALSHIP), "keygen", "--symmetric", str(root / "secret.key")])
            settings.append(f'key_file = "{root / "secret.key"}"')
        config.write_text("\n".join(settings) + "\n")
        chown_pg(root)
        cluster = make_cluster(root, config, args.scale)
        env = {"WALSHIP_CONFIG": str(config), **cluster.env}
        try:
            ops = ["walship-push", "walship-fetch", "basebackup", "untar"]
            for i in range(args.repeat):
                for op in ops[i % 2 * 2:] + ops[: i % 2 * 2]:  # rotate pairs
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
                        results.add(op, timed(["/bin/sh", "-c", f"mkdir -m 700 {dest} && "
                                               f"lz4 -dc {tarball} | tar -xf - -C {dest}"],
                                              root))
                        shutil.rmtree(dest)
            if "untar" not in results.runs:
                tarball = root / "basebackup" / "base.tar.lz4"
                dest = root / "untar-last"
                results.add("untar", timed(["/bin/sh", "-c", f"mkdir -m 700 {dest} && "
                                            f"lz4 -dc {tarball} | tar -xf - -C {dest}"], root))
        finally:
            cluster.stop()

    mb = data_bytes / 1e6
    rows = []
    for label, mine, base in (("backup (push)", "walship-push", "basebackup"),
                              ("restore (fetch)", "walship-fetch", "untar")):
        ws, wrss = results.median(mine)
        bs, brss = results.median(base)
        rows.append((label, f"{ws:.2f}", f"{mb / ws:.0f}", f"{wrss / MiB:.0f}",
                     f"{bs:.2f}", f"{mb / bs:.0f}", f"{brss / MiB:.0f}", f"{ws / bs:.2f}",
                     f"{wrss / max(brss, 1):.1f}"))
    header = ("operation", "walship s", "MB/s", "RSS MiB", "baseline s", "MB/s", "RSS MiB",
              "time ratio", "RSS ratio")
    encrypted = "no encryption" if args.no_encryption else "lz4 + secret key"
    print(f"\nbase backup of pgbench scale {args.scale}: {data_bytes / MiB:.0f} MiB of data files, "
          f"median of {args.repeat}; walship: {encrypted}, partitions of {args.partition_size}, "
          f"concurrency {args.concurrency}; baseline: pg_basebackup -Ft -X none "
          f"--compress=client-lz4, and lz4 -dc | tar -x; {os.cpu_count()} CPUs")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"stored: walship {stored.get('walship', 0) / MiB:.1f} MiB, pg_basebackup "
          f"{stored.get('basebackup', 0) / MiB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
