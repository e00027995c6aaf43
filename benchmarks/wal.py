"""Archive and restore 64 real WAL segments the way PostgreSQL does, against pgBackRest.

    /opt/walship-venv/bin/python benchmarks/wal.py [--segments 64] [--repeat 3]
        [--skip-pgbackrest] [--skip-s3] [--markdown]

What it does, all in one run so that every ratio compares figures from the same machine state:

1. Starts a throwaway PostgreSQL 15 cluster (as the postgres user) and runs pgbench until it
   has archived N fresh 16 MiB segments (OLTP records plus full-page images after
   checkpoints; no pg_switch_wal padding). The cluster keeps running: pgBackRest's
   stanza-create needs it, and archive-push checks each segment's system identifier against
   the stanza, so the segments must come from this cluster.
2. For each archive/restore command pair (cp as the floor, walship to a local store with and
   without a secret key, walship to S3 on a moto server, pgBackRest with archive-async to a
   posix repo and to S3 through stunnel, because its S3 driver speaks only TLS):
   - archive, like PostgreSQL's archiver: a fake data directory whose pg_wal/ holds the
     segments and archive_status/<name>.ready for each; one `/bin/sh -c archive_command`
     per segment (%p = pg_wal/<name>, cwd = the data directory), serially, in order, .ready
     renamed to .done after each success; wall time for all N;
   - restore, like recovery: a fresh data directory with recovery.signal; one
     `/bin/sh -c restore_command` per segment (%f = the name, %p = pg_wal/RECOVERYXLOG),
     serially, in order; wall time for all N; then the fetched bytes are compared with the
     originals, recovery.signal is removed and any prefetcher must exit (it is killed, and
     the run flagged, if it does not).
   Every command runs as the postgres user, as under a real server.
3. walship's fast path: wal-push of a segment that an earlier call already pushed ahead (its
   marker is in pg_wal/walship/pushed/), against `python -c pass` and `/bin/true`.

Each measurement is repeated --repeat times, in a rotating order (the machine is noisy);
the table shows medians and the ratio against pgBackRest-async from the same run. Progress
goes to stderr, the tables to stdout. Everything (temporary directories, the cluster, moto,
stunnel, stray background processes) is cleaned up, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
SEGMENT_SIZE = 16 * 1024 * 1024
VENV_BIN = Path(sys.executable).parent
PYTHON = VENV_BIN / "python"
PACKAGE = Path(__file__).resolve().parent.parent / "walship"
STANZA = "bench"
REGION = "us-east-1"
ACCESS_KEY = "walship-bench-key"
SECRET_KEY = "walship-bench-secret"  # noqa: S105 - moto's dummy credentials
# How long a background helper (walship's prefetcher, pgBackRest's async archiver) may take
# to go away once its work is over, before the benchmark kills it and says so.
STRAGGLER_TIMEOUT = 30.0
FAST_PATH_RUNS = 24

_started = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[wal-bench {time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr,
          flush=True)


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so that the cleanup runs."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------- processes


def _pg_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(PG_USER)
    return pw.pw_uid, pw.pw_gid


def _as_pg_kwargs() -> dict[str, object]:
    """subprocess keyword arguments that run the child as postgres (when we are root)."""
    if os.geteuid() != 0:
        return {}
    uid, gid = _pg_ids()
    return {"user": uid, "group": gid, "extra_groups": []}


def base_env() -> dict[str, str]:
    """A clean environment for commands: nothing of the caller's AWS or walship settings."""
    home = pwd.getpwnam(PG_USER).pw_dir if os.geteuid() == 0 else os.environ.get("HOME", "/")
    return {
        "PATH": f"{PG_BIN}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def run_pg(argv: list[str], *, env: Mapping[str, str] | None = None,
           cwd: Path | None = None, check: bool = True,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command as postgres and capture its output."""
    proc = cast(subprocess.CompletedProcess[str], subprocess.run(
        argv, env={**base_env(), **(env or {})}, cwd=cwd, text=True, capture_output=True,
        timeout=timeout, check=False, **_as_pg_kwargs()))  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def chown_pg(path: Path) -> None:
    """Give a file or a tree to postgres (no-op unless root)."""
    if os.geteuid() != 0:
        return
    uid, gid = _pg_ids()
    os.lchown(path, uid, gid)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path,
              timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def processes_under(path: Path) -> list[int]:
    """Live processes whose command line names `path` or whose cwd is inside it."""
    marker = str(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if not cmdline or state == "Z":
            continue  # zombies and kernel threads
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        text = cmdline.replace(b"\0", b" ").decode(errors="replace")
        if marker in text or cwd == marker or cwd.startswith(marker + "/"):
            found.append(int(entry))
    return found


def wait_stragglers(path: Path, timeout: float = STRAGGLER_TIMEOUT) -> list[int]:
    """Wait for background processes tied to `path` to exit; kill (by pid) what remains."""
    deadline = time.monotonic() + timeout
    while (pids := processes_under(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def install_walship(root: Path) -> Path:
    """A byte-compiled snapshot of the package and a `walship` script postgres can run.

    Other people edit the working tree while this runs: a snapshot keeps every run of one
    benchmark on the same code. Compiled here, because postgres cannot write __pycache__
    next to root's files and would otherwise compile every module on every call.
    """
    lib = root / "lib"
    shutil.copytree(PACKAGE, lib / "walship", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(lib)], check=True)
    script = root / "bin" / "walship"
    script.parent.mkdir()
    # The same shape as the console script pip writes, with the snapshot first on sys.path.
    script.write_text(
        f"#!{PYTHON}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "from walship.__main__ import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == script else 0o644)
    probe = run_pg([str(script), "--version"], check=False)
    if probe.returncode != 0 or "walship" not in probe.stdout:
        raise RuntimeError(f"the postgres user cannot run {script}: {probe.stderr}")
    return script


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A PostgreSQL 15 cluster that makes the benchmark's WAL and anchors pgBackRest's stanza."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.datadir = root / "pgdata"
        self.sockdir = root
        self.archive = root / "archive"
        self.port = free_port()
        self.running = False

    @property
    def libpq_env(self) -> dict[str, str]:
        return {"PGHOST": str(self.sockdir), "PGPORT": str(self.port), "PGUSER": PG_USER,
                "PGDATABASE": "postgres"}

    def start(self) -> None:
        self.archive.mkdir()
        chown_pg(self.root)
        run_pg([str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", PG_USER, "-A", "trust",
                "--no-sync"])
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "archive_mode = on\n"
                f"archive_command = 'cp %p {self.archive}/%f'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = on\n"
                "max_wal_size = 4GB\ncheckpoint_timeout = 1h\nautovacuum = off\n"
            )
        run_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l",
                str(self.root / "postgres.log"), "-w", "start"])
        self.running = True

    def stop(self) -> None:
        if self.running:
            run_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"],
                   check=False)
            self.running = False

    def psql(self, sql: str) -> str:
        return run_pg([str(PG_BIN / "psql"), "-X", "-qAt", "-c", sql],
                      env=self.libpq_env).stdout.strip()

    def make_segments(self, count: int, out: Path, scale: int = 10) -> list[str]:
        """Archive `count` full segments written by pgbench; copy them to `out`."""
        progress(f"pgbench -i -s {scale}")
        run_pg([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale)], env=self.libpq_env)
        first = self.psql("checkpoint; select pg_walfile_name(pg_current_wal_lsn())").split()[-1]
        deadline = time.monotonic() + 1200
        while len(names := self._archived_after(first)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not archive enough WAL in 20 minutes")
            progress(f"pgbench: {len(names)}/{count} segments archived")
            # A checkpoint every few seconds: full-page images, as a busy server writes them.
            self.psql("checkpoint")
            run_pg([str(PG_BIN / "pgbench"), "-T", "5", "-c", "4", "-j", "2", "-n",
                    "-M", "prepared"], env=self.libpq_env)
        out.mkdir()
        for name in names[:count]:
            shutil.copyfile(self.archive / name, out / name)
        return names[:count]

    def _archived_after(self, first: str) -> list[str]:
        return sorted(p.name for p in self.archive.iterdir()
                      if len(p.name) == 24 and p.name > first
                      and p.stat().st_size == SEGMENT_SIZE)


# --------------------------------------------------------------------------- servers


class Moto:
    """`python -m moto.server` on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop_popen(self.proc)
                raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):  # noqa: S310
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def reset(self) -> None:
        """Drop every bucket: moto keeps objects in memory, and the runs add up."""
        url = f"{self.endpoint}/moto-api/reset"
        req = urllib.request.Request(url, method="POST")  # noqa: S310 - our own server
        with urllib.request.urlopen(req, timeout=60):  # noqa: S310
            pass

    def new_bucket(self) -> str:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=bucket)
        client.close()
        return bucket

    def stored_bytes(self, bucket: str) -> int:
        client = self.client()
        total = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(obj["Size"] for obj in page.get("Contents", []))
        client.close()
        return total

    def stop(self) -> None:
        stop_popen(self.proc)


class Stunnel:
    """TLS in front of moto: pgBackRest's S3 driver only speaks https."""

    def __init__(self, root: Path, target_port: int) -> None:
        self.port = free_port()
        self.dir = root / "stunnel"
        self.dir.mkdir()
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        conf = self.dir / "stunnel.conf"
        conf.write_text(
            "foreground = yes\n"
            f"output = {self.dir / 'stunnel.log'}\n"
            "debug = 4\n"
            "[s3]\n"
            f"accept = 127.0.0.1:{self.port}\n"
            f"connect = 127.0.0.1:{target_port}\n"
            f"cert = {cert}\n"
            f"key = {key}\n"
        )
        self.log = self.dir / "stunnel.out"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["stunnel4", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir)
        wait_port(self.port, self.proc, "stunnel4", self.log)

    def stop(self) -> None:
        stop_popen(self.proc)


# --------------------------------------------------------------------------- command pairs


@dataclass
class Prepared:
    """One run's archive_command, restore_command and environment."""

    archive_command: str
    restore_command: str
    env: dict[str, str] = field(default_factory=dict)
    stored_bytes: Callable[[], int] = lambda: 0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Bench:
    """Shared state of one benchmark run."""

    def __init__(self, root: Path, cluster: Cluster, segdir: Path, all_names: list[str],
                 segments: int, moto: Moto | None, stunnel: Stunnel | None,
                 walship: Path) -> None:
        self.root = root
        self.walship = walship
        self.cluster = cluster
        self.segdir = segdir
        self.all_names = all_names
        self.names = all_names[:segments]
        self.moto = moto
        self.stunnel = stunnel
        self.digests = {n: hashlib.sha256((segdir / n).read_bytes()).hexdigest()
                        for n in self.names}
        self.key_file = root / "walship.key"
        run_pg([str(self.walship), "keygen", "--symmetric", str(self.key_file)])
        self._count = 0

    def new_dir(self, name: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:03d}-{name}"
        path.mkdir()
        chown_pg(path)
        return path

    # Each variant: (run directory) -> Prepared. Run directories are fresh per run.

    def cp(self, run: Path) -> Prepared:
        store = run / "store"
        store.mkdir()
        chown_pg(store)
        return Prepared(f"cp %p {store}/%f", f"cp {store}/%f %p",
                        stored_bytes=lambda: _dir_bytes(store))

    def walship_local(self, run: Path, *, key: bool) -> Prepared:
        store = run / "store"
        store.mkdir()
        chown_pg(store)
        env = {"WALSHIP_STORE": f"file://{store}", "WALSHIP_COMPRESSION": "lz4"}
        if key:
            env["WALSHIP_KEY_FILE"] = str(self.key_file)
        return Prepared(f"{self.walship} wal-push %p", f"{self.walship} wal-fetch %f %p", env,
                        stored_bytes=lambda: _dir_bytes(store))

    def walship_s3(self, run: Path, *, tls: bool) -> Prepared:
        assert self.moto is not None
        self.moto.reset()
        bucket = self.moto.new_bucket()
        env = {"WALSHIP_STORE": f"s3://{bucket}/wal", "WALSHIP_COMPRESSION": "lz4",
               "AWS_ENDPOINT_URL": self.moto.endpoint, "AWS_REGION": REGION,
               "AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        if tls:
            assert self.stunnel is not None
            env["AWS_ENDPOINT_URL"] = f"https://127.0.0.1:{self.stunnel.port}"
            env["WALSHIP_TLS_VERIFY"] = "false"
        moto = self.moto
        return Prepared(f"{self.walship} wal-push %p", f"{self.walship} wal-fetch %f %p", env,
                        stored_bytes=lambda: moto.stored_bytes(bucket))

    def pgbackrest(self, run: Path, *, s3: bool) -> Prepared:
        common = [
            "log-level-console=warn", "log-level-stderr=warn", "log-level-file=off",
            f"lock-path={run / 'lock'}", f"log-path={run / 'log'}", "compress-type=lz4",
        ]
        if s3:
            assert self.moto is not None and self.stunnel is not None
            self.moto.reset()
            bucket = self.moto.new_bucket()
            repo = [
                "repo1-type=s3", "repo1-path=/pgbackrest", f"repo1-s3-bucket={bucket}",
                "repo1-s3-endpoint=127.0.0.1", f"repo1-s3-port={self.stunnel.port}",
                f"repo1-s3-region={REGION}", f"repo1-s3-key={ACCESS_KEY}",
                f"repo1-s3-key-secret={SECRET_KEY}", "repo1-s3-uri-style=path",
                "repo1-s3-verify-tls=n",
            ]
            moto = self.moto
            stored: Callable[[], int] = lambda: moto.stored_bytes(bucket)  # noqa: E731
        else:
            repo_path = run / "repo"
            repo = [f"repo1-path={repo_path}"]
            stored = lambda: _dir_bytes(repo_path / "archive")  # noqa: E731

        def conf(name: str, pg_path: Path, extra: list[str]) -> Path:
            path = run / name
            path.write_text("[global]\n" + "\n".join(common + repo + extra) + "\n\n"
                            f"[{STANZA}]\npg1-path={pg_path}\n"
                            f"pg1-socket-path={self.cluster.sockdir}\n"
                            f"pg1-port={self.cluster.port}\n")
            return path

        stanza_conf = conf("stanza.conf", self.cluster.datadir, [])
        push_conf = conf("push.conf", run / "archive-pgdata",
                         ["archive-async=y", "process-max=2", f"spool-path={run / 'spool'}"])
        get_conf = conf("get.conf", run / "restore-pgdata", ["archive-async=n"])
        chown_pg(run)
        run_pg(["pgbackrest", f"--config={stanza_conf}", f"--stanza={STANZA}", "stanza-create"])
        return Prepared(
            f"pgbackrest --config={push_conf} --stanza={STANZA} archive-push %p",
            f"pgbackrest --config={get_conf} --stanza={STANZA} archive-get %f %p",
            stored_bytes=stored,
        )

    # ----------------------------------------------------------------------- emulation

    def _sh(self, command: str, cwd: Path, env: Mapping[str, str]) -> None:
        """Run a command as PostgreSQL does: output to the server log (here a file).

        Not a pipe: a background process the command leaves behind (walship's prefetcher,
        pgBackRest's async archiver) may keep a pipe open, and waiting for its end would
        time the helper instead of the command.
        """
        log = cwd.parent / "commands.log"
        with open(log, "ab") as out:
            start = out.tell()
            proc = subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False,
                                  **_as_pg_kwargs())  # type: ignore[call-overload]
        if proc.returncode != 0:
            with open(log, "rb") as fh:
                fh.seek(start)
                text = fh.read().decode(errors="replace")
            raise RuntimeError(f"`{command}` in {cwd} exited {proc.returncode}: {text[-2000:]}")

    def _fake_datadir(self, path: Path) -> None:
        """What a data directory holds that the archive tools read: pg_control and PG_VERSION."""
        (path / "global").mkdir(parents=True)
        shutil.copyfile(self.cluster.datadir / "global" / "pg_control",
                        path / "global" / "pg_control")
        shutil.copyfile(self.cluster.datadir / "PG_VERSION", path / "PG_VERSION")
        (path / "pg_wal" / "archive_status").mkdir(parents=True)

    def archive(self, run: Path, prepared: Prepared) -> float:
        """Emulate the archiver over all segments; returns the wall time."""
        datadir = run / "archive-pgdata"
        self._fake_datadir(datadir)
        wal = datadir / "pg_wal"
        for name in self.names:
            shutil.copyfile(self.segdir / name, wal / name)
            (wal / "archive_status" / f"{name}.ready").touch()
        chown_pg(run)
        os.sync()  # no writeback of the copies during the timed loop
        env = {**base_env(), **prepared.env}
        status = wal / "archive_status"
        started = time.perf_counter()
        for name in self.names:
            self._sh(prepared.archive_command.replace("%p", f"pg_wal/{name}")
                     .replace("%f", name), datadir, env)
            os.rename(status / f"{name}.ready", status / f"{name}.done")
        elapsed = time.perf_counter() - started
        left = wait_stragglers(run)
        if left:
            raise RuntimeError(f"background processes {left} were still running after "
                               f"archiving; killed")
        return elapsed

    def restore(self, run: Path, prepared: Prepared) -> float:
        """Emulate archive recovery over all segments; returns the wall time."""
        datadir = run / "restore-pgdata"
        self._fake_datadir(datadir)
        (datadir / "recovery.signal").touch()
        got = run / "restored"
        got.mkdir()
        chown_pg(run)
        os.sync()
        env = {**base_env(), **prepared.env}
        target = datadir / "pg_wal" / "RECOVERYXLOG"
        started = time.perf_counter()
        for name in self.names:
            self._sh(prepared.restore_command.replace("%f", name)
                     .replace("%p", "pg_wal/RECOVERYXLOG"), datadir, env)
            # PostgreSQL replays RECOVERYXLOG and unlinks it before the next restore; keep it
            # aside to check after the timed loop.
            os.rename(target, got / name)
        elapsed = time.perf_counter() - started
        (datadir / "recovery.signal").unlink()
        left = wait_stragglers(run)
        if left:
            raise RuntimeError(f"processes {left} did not exit after recovery.signal was "
                               "removed; killed")
        for name in self.names:
            digest = hashlib.sha256((got / name).read_bytes()).hexdigest()
            if digest != self.digests[name]:
                raise RuntimeError(f"restored {name} differs from the original")
        leftovers = [p for p in (datadir / "pg_wal").iterdir()
                     if p.name not in ("archive_status", "walship")]
        if leftovers:
            raise RuntimeError(f"restore left files in pg_wal: {leftovers}")
        prefetch = datadir / "pg_wal" / "walship" / "prefetch"
        if prefetch.exists():
            raise RuntimeError(f"{prefetch} survived the end of recovery")
        return elapsed

    def fast_path(self, runs: int) -> dict[str, list[float]]:
        """Seconds per call: a pushed-ahead wal-push, `python -c pass`, `/bin/true`."""
        run = self.new_dir("fastpath")
        prepared = self.walship_local(run, key=False)
        datadir = run / "pgdata"
        self._fake_datadir(datadir)
        wal = datadir / "pg_wal"
        names = self.all_names[: runs + 1]
        for name in names:
            shutil.copyfile(self.segdir / name, wal / name)
            (wal / "archive_status" / f"{name}.ready").touch()
        chown_pg(run)
        os.sync()
        env = {**base_env(), **prepared.env, "WALSHIP_PUSH_AHEAD": str(runs)}
        # The first call starts the background pusher, which leaves a marker for each ready
        # file (not timed).
        self._sh(f"{self.walship} wal-push pg_wal/{names[0]}", datadir, env)
        deadline = time.monotonic() + 120
        while not all((wal / "walship" / "pushed" / n).exists() for n in names):
            if time.monotonic() > deadline:
                raise RuntimeError("the background pusher did not push every ready file")
            time.sleep(0.05)
        status = wal / "archive_status"
        os.rename(status / f"{names[0]}.ready", status / f"{names[0]}.done")
        env = {**base_env(), **prepared.env}
        samples: dict[str, list[float]] = {"push": [], "python": [], "true": []}
        commands = {"true": "/bin/true", "python": f"{PYTHON} -c pass"}
        for name in names[1:]:
            marker = wal / "walship" / "pushed" / name
            if not marker.exists():
                raise RuntimeError(f"no push-ahead marker for {name}")
            for what, command in commands.items():
                started = time.perf_counter()
                self._sh(command, datadir, env)
                samples[what].append(time.perf_counter() - started)
            started = time.perf_counter()
            self._sh(f"{self.walship} wal-push pg_wal/{name}", datadir, env)
            samples["push"].append(time.perf_counter() - started)
            os.rename(status / f"{name}.ready", status / f"{name}.done")
        shutil.rmtree(run, ignore_errors=True)
        return samples


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    group: str  # "local" or "S3"
    prepare: Callable[[Path], Prepared]
    baseline: bool = False  # pgBackRest-async: the ratio's denominator in its group


def variants(bench: Bench, skip_pgbackrest: bool, skip_s3: bool) -> list[Variant]:
    result = [
        Variant("cp", "cp (floor)", "local", bench.cp),
        Variant("walship-local", "walship lz4", "local",
                lambda run: bench.walship_local(run, key=False)),
        Variant("walship-local-key", "walship lz4 + secret key", "local",
                lambda run: bench.walship_local(run, key=True)),
    ]
    if not skip_pgbackrest:
        result.append(Variant("pgbackrest-local", "pgBackRest async lz4", "local",
                              lambda run: bench.pgbackrest(run, s3=False), baseline=True))
    if not skip_s3:
        result.append(Variant("walship-s3", "walship lz4 (http)", "S3",
                              lambda run: bench.walship_s3(run, tls=False)))
        if not skip_pgbackrest:
            result.append(Variant("walship-s3-tls", "walship lz4 (https via stunnel)", "S3",
                                  lambda run: bench.walship_s3(run, tls=True)))
            result.append(Variant("pgbackrest-s3", "pgBackRest async lz4 (https via stunnel)",
                                  "S3", lambda run: bench.pgbackrest(run, s3=True),
                                  baseline=True))
    return result


@dataclass
class Results:
    archive: dict[str, list[float]] = field(default_factory=dict)
    restore: dict[str, list[float]] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    fast: dict[str, list[float]] = field(default_factory=dict)
    # CPU seconds of lz4 (default level) and SHA-256 over the archived segments, one thread:
    # the work any tool that compresses and digests them must do (pgBackRest: lz4 + SHA-1).
    work: float = 0.0


def measure(bench: Bench, chosen: list[Variant], repeat: int, fast_runs: int) -> Results:
    results = Results()
    for round_no in range(repeat):
        # Rotate the order so that no variant always runs first (or right after another).
        order = chosen[round_no % len(chosen):] + chosen[: round_no % len(chosen)]
        for variant in order:
            run = bench.new_dir(variant.key)
            prepared = variant.prepare(run)
            progress(f"round {round_no + 1}/{repeat}: {variant.label}: archive "
                     f"{len(bench.names)}")
            took = bench.archive(run, prepared)
            results.archive.setdefault(variant.key, []).append(took)
            results.stored[variant.key] = prepared.stored_bytes()
            progress(f"round {round_no + 1}/{repeat}: {variant.label}: archived in {took:.2f}s;"
                     f" fetch {len(bench.names)}")
            took = bench.restore(run, prepared)
            results.restore.setdefault(variant.key, []).append(took)
            progress(f"round {round_no + 1}/{repeat}: {variant.label}: fetched in {took:.2f}s")
            shutil.rmtree(run, ignore_errors=True)
        progress(f"round {round_no + 1}/{repeat}: fast path, {fast_runs} calls")
        for what, samples in bench.fast_path(fast_runs).items():
            results.fast.setdefault(what, []).extend(samples)
    return results


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def tables(results: Results, chosen: list[Variant], segments: int, repeat: int,
           markdown: bool) -> str:
    median = statistics.median
    headers = ["group", "command pair", f"archive {segments}", "vs pgBR",
               f"fetch {segments}", "vs pgBR", "stored MiB"]
    rows: list[list[str]] = []
    baselines = {v.group: v.key for v in chosen if v.baseline}
    ratios: dict[tuple[str, str], float] = {}
    for v in chosen:
        base = baselines.get(v.group)
        cells = [v.group, v.label]
        for phase, data in (("archive", results.archive), ("fetch", results.restore)):
            mine = median(data[v.key])
            ratio = mine / median(data[base]) if base else None
            if ratio is not None:
                ratios[(v.key, phase)] = ratio
            spread = f"{min(data[v.key]):.2f}-{max(data[v.key]):.2f}"
            cells += [f"{mine:.2f}s ({spread})", _fmt_ratio(ratio)]
        cells.append(f"{results.stored.get(v.key, 0) / 2**20:.0f}")
        rows.append(cells)

    fast_rows = []
    fast = {k: median(v) for k, v in results.fast.items()}
    for key, label in (("true", "/bin/true"), ("python", "python -c pass"),
                       ("push", "walship wal-push, pushed ahead")):
        if key in fast:
            fast_rows.append([label, f"{fast[key] * 1000:.1f} ms",
                              f"{fast[key] / fast['python']:.2f}x",
                              str(len(results.fast[key]))])

    checks = []

    def check(label: str, value: float | None, limit: float, unit: str = "x") -> None:
        if value is None:
            return
        verdict = "met" if value <= limit else "MISSED"
        shown = f"{value:.2f}x" if unit == "x" else f"{value:.1f} ms"
        limit_text = f"{limit:.2f}x" if unit == "x" else f"{limit:.0f} ms"
        checks.append(f"{label}: {shown} (target <= {limit_text}): {verdict}")

    check("walship archive, local store, vs pgBackRest-async",
          ratios.get(("walship-local", "archive")), 0.6)
    check("walship archive, S3, vs pgBackRest-async",
          ratios.get(("walship-s3", "archive")), 0.5)
    check("walship fetch, local store, vs pgBackRest",
          ratios.get(("walship-local", "fetch")), 0.5)
    check("walship fetch, S3, vs pgBackRest", ratios.get(("walship-s3", "fetch")), 0.5)
    if "push" in fast:
        check("pushed-ahead wal-push", fast["push"] * 1000, 30, unit="ms")

    title = (f"{segments} real 16 MiB WAL segments, one /bin/sh -c per segment, serially; "
             f"median of {repeat} runs (min-max); ratios against pgBackRest-async in the "
             "same group and run")
    out = [title, "", _render(headers, rows, markdown), "",
           "A wal-push whose segment an earlier call pushed ahead (median over all calls):", "",
           _render(["command", "median", "vs python -c pass", "calls"], fast_rows, markdown),
           "", "Targets:"]
    out += [f"- {c}" for c in checks]
    out += _floor(results, chosen, segments)
    return "\n".join(out)


def work_cpu(directory: Path, names: list[str], repeat: int = 3) -> float:
    """Median CPU seconds (this thread) of lz4.frame.compress + SHA-256 over the segments."""
    import hashlib

    import lz4.frame

    samples = []
    for _ in range(repeat):
        cpu = 0.0
        for name in names:
            data = (directory / name).read_bytes()
            started = time.thread_time()
            lz4.frame.compress(data)
            hashlib.sha256(data).digest()
            cpu += time.thread_time() - started
        samples.append(cpu)
    return statistics.median(samples)


def _floor(results: Results, chosen: list[Variant], segments: int) -> list[str]:
    """Two lower bounds for any Python tool run once per segment, against each baseline.

    Start-up: PostgreSQL runs archive_command and restore_command once per segment, so
    `segments` interpreter start-ups are spent however little each call does. Archive: those
    start-ups plus the compression and digest work, spread perfectly over the machine's cores
    (an optimistic bound: it ignores writing, the store, and the archiver's serial calls)."""
    if "python" not in results.fast:
        return []
    startup = segments * statistics.median(results.fast["python"])
    cores = os.cpu_count() or 1
    archive_floor = (startup + results.work) / cores
    lines = ["", f"Floors: {segments} x `python -c pass` = {startup:.2f}s of start-ups; "
             f"archive also lz4 + SHA-256 of the bytes = {results.work:.2f}s of CPU, "
             f"(start-ups + work) / {cores} cores = {archive_floor:.2f}s:"]
    for v in chosen:
        if not v.baseline:
            continue
        for phase, data in (("archive", results.archive), ("fetch", results.restore)):
            if v.key in data:
                base = statistics.median(data[v.key])
                floor = max(startup, archive_floor) if phase == "archive" else startup
                lines.append(f"- {v.group} {phase}: {floor / base:.2f}x of {v.label}")
    return lines


def _render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="walship-walbench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for pid in processes_under(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fast-path-runs", type=int, default=FAST_PATH_RUNS,
                        help="pushed-ahead wal-push calls per round (default 24)")
    parser.add_argument("--skip-pgbackrest", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    if args.segments < 1 or args.repeat < 1 or args.fast_path_runs < 1:
        parser.error("--segments, --repeat and --fast-path-runs must be at least 1")
    if not (PG_BIN / "initdb").exists():
        parser.error(f"PostgreSQL 15 not found in {PG_BIN}")
    if not args.skip_pgbackrest and shutil.which("pgbackrest") is None:
        parser.error("pgbackrest is not installed (or use --skip-pgbackrest)")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    with scratch() as root, contextlib.ExitStack() as stack:
        cluster = Cluster(root / "cluster")
        cluster.root.mkdir()
        stack.callback(cluster.stop)
        progress(f"starting PostgreSQL 15 in {cluster.root}")
        cluster.start()
        # Enough segments for the archive runs and for the fast path's push-ahead.
        need = max(args.segments, args.fast_path_runs + 1)
        names = cluster.make_segments(need, root / "segments")
        moto = stunnel = None
        if not args.skip_s3:
            progress("starting the moto S3 server")
            moto = Moto(root)
            stack.callback(moto.stop)
            if not args.skip_pgbackrest:
                stunnel = Stunnel(root, moto.port)
                stack.callback(stunnel.stop)
        walship_bin = install_walship(root / "walship")
        (root / "runs").mkdir()
        chown_pg(root / "runs")
        progress(f"snapshot of {PACKAGE}: {walship_bin}")
        bench = Bench(root / "runs", cluster, root / "segments", names, args.segments, moto,
                      stunnel, walship_bin)
        chosen = variants(bench, args.skip_pgbackrest, args.skip_s3)
        results = measure(bench, chosen, args.repeat, args.fast_path_runs)
        results.work = work_cpu(root / "segments", names[: args.segments])
        print(tables(results, chosen, args.segments, args.repeat, args.markdown), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"wal-bench: interrupted ({exc or 'SIGINT'}); cleaned up", file=sys.stderr)
        sys.exit(130)
