"""Make real 16 MiB WAL segments by running a throwaway PostgreSQL 15 cluster under load.

PostgreSQL refuses to run as root, so when we are root the server tools run as the
`postgres` user through runuser. The cluster lives in a temporary directory under /tmp and
is removed afterwards; only the copied segments stay in the output directory.

    python benchmarks/make_wal.py OUT_DIR [--count N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


def _as_postgres(argv: list[str]) -> list[str]:
    """Prefix a command so it runs as postgres when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _run(argv: list[str], **kwargs: object) -> None:
    subprocess.run(_as_postgres(argv), check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_wal(out_dir: Path, count: int = 8, scale: int = 10) -> list[Path]:
    """Write `count` finished WAL segments into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="walship-makewal-", dir="/tmp"))
    archive = work / "archive"
    pgdata = work / "pgdata"
    archive.mkdir()
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(archive, "postgres")
    port = _free_port()
    env = {**os.environ, "PGHOST": str(work), "PGPORT": str(port), "PGUSER": "postgres",
           "PGDATABASE": "postgres"}
    started = False
    try:
        _run([str(PG_BIN / "initdb"), "-D", str(pgdata), "-U", "postgres", "--no-sync",
              "-A", "trust"])
        with open(pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{work}'\n"
                "archive_mode = on\n"
                f"archive_command = 'cp %p {archive}/%f'\n"
                "fsync = off\nsynchronous_commit = off\nmax_wal_size = 1GB\n"
                "full_page_writes = on\n"
            )
        _run([str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-l", str(work / "log"), "-w",
              "start"])
        started = True
        _run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale)], env=env)
        # The bulk load above writes mostly heap pages; what an archive sees day to day is
        # OLTP: small records plus full-page images after each checkpoint. Keep only
        # segments written after the load, filled by pgbench (no pg_switch_wal: switching
        # pads segments with zeros, which flatters every codec).
        first = _current_segment(env)
        deadline = time.monotonic() + 900
        while len(_segments_after(archive, first)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not archive enough WAL in 15 minutes")
            _run([str(PG_BIN / "pgbench"), "-T", "10", "-c", "4", "-n"], env=env)
        names = _segments_after(archive, first)[:count]
        result = []
        for name in names:
            dest = out_dir / name
            shutil.copyfile(archive / name, dest)
            result.append(dest)
        return result
    finally:
        if started:
            subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m",
                                         "immediate", "stop"]),
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def _current_segment(env: dict[str, str]) -> str:
    out = subprocess.run(
        _as_postgres([str(PG_BIN / "psql"), "-qAt", "-c",
                      "checkpoint; select pg_walfile_name(pg_current_wal_lsn())"]),
        check=True, capture_output=True, text=True, env=env,
    )
    return out.stdout.split()[-1]


def _segments_after(archive: Path, first: str) -> list[str]:
    """Archived full segments whose name sorts after `first`, in WAL order."""
    return sorted(p.name for p in archive.iterdir()
                  if SEGMENT_RE.match(p.name) and p.name > first
                  and p.stat().st_size == SEGMENT_SIZE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    args = parser.parse_args(argv)
    paths = make_wal(args.out_dir, args.count, args.scale)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
