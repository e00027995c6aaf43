"""Crash trials: run a real walship process as the PostgreSQL user, SIGKILL it at a seeded
random moment, and say everything needed to diagnose what went wrong.

Every trial draws its kill delay from `trial_rng(kind, trial)`, seeded by WALSHIP_CRASH_SEED
(default SEED), so a failure is re-run exactly with the seed it prints. Processes are started
directly as the postgres user (Popen user=/group=, no runuser in between), each in a session
of its own, so the pid the test holds is walship's own and a SIGKILL lands on it and on
nothing else; detached helpers (the background pusher, the prefetcher) are found by their
command line in /proc.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pwd
import random
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.pg import PG_BIN, PG_USER
from walship.storage.base import Storage

SEED = 20261207


def base_seed() -> int:
    """The seed of this run: WALSHIP_CRASH_SEED, or SEED."""
    return int(os.environ.get("WALSHIP_CRASH_SEED", str(SEED)))


def trial_rng(kind: str, trial: int) -> random.Random:
    """The random source of one trial, independent of every other trial's draws."""
    return random.Random(f"{base_seed()}/{kind}/{trial}")


@dataclass
class Run:
    """One walship process: how it was started, when it was killed, what it said."""

    kind: str
    trial: int
    argv: list[str]
    delay: float | None  # seconds after the start when SIGKILL was sent; None: never
    killed: bool  # the SIGKILL reached a running process
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        """Everything about the run, for an assertion message."""
        delay = "none" if self.delay is None else f"{self.delay:.3f}s"
        fate = "killed" if self.killed else f"finished first, exit {self.returncode}"
        return (f"[{self.kind} trial {self.trial}, WALSHIP_CRASH_SEED={base_seed()}, "
                f"kill delay {delay}: {fate} after {self.seconds:.3f}s]\n"
                f"argv: {' '.join(self.argv)}\n"
                f"stdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-4000:]!r}")


def _as_pg() -> dict[str, Any]:
    """Popen arguments that run the child as the postgres user (when we are root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(PG_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def start(argv: list[str], *, env: Mapping[str, str], cwd: Path | None,
          logdir: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start argv as the postgres user in a session of its own; output goes to files."""
    full_env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    logdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    out_path, err_path = logdir / f"{stamp}.out", logdir / f"{stamp}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True, **_as_pg())
    return proc, out_path, err_path


def run(argv: list[str], *, env: Mapping[str, str], cwd: Path | None, logdir: Path,
        kind: str, trial: int, delay: float | None = None, timeout: float = 300) -> Run:
    """Run argv; with a delay, SIGKILL it (its whole session) that many seconds after the
    start unless it finished before."""
    started = time.monotonic()
    proc, out_path, err_path = start(argv, env=env, cwd=cwd, logdir=logdir)
    killed = False
    try:
        if delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                # The session holds walship and nothing else: detached helpers have their own.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        returncode = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # A process that exited in the instant before the signal was not killed.
    killed = killed and returncode == -signal.SIGKILL
    return Run(kind, trial, list(argv), delay, killed, returncode,
               out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
               time.monotonic() - started)


def pids_of(*needles: str) -> list[int]:
    """Processes whose command line contains every needle (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline and all(n in cmdline for n in needles):
            found.append(int(entry))
    return found


def kill_pids(pids: list[int]) -> list[int]:
    """SIGKILL each pid still there; returns those that were signalled."""
    hit = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
    return hit


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Wait until none of the pids exists (a killed process is reaped by init)."""
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in pids),
               timeout, f"processes {pids} to disappear")


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               explain: Callable[[], str] | None = None) -> None:
    """Poll predicate until true; AssertionError naming `what` (and explain()) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f"\n{explain()}" if explain else ""))


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_listing(root: Path, limit: int = 200) -> str:
    """Every entry under root, hidden ones included, with sizes and walship xattrs."""
    lines = []
    if not root.exists():
        return f"{root}: does not exist"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                st = path.lstat()
                attrs = {a.removeprefix("user.walship."): os.getxattr(path, a).decode()[:16]
                         for a in os.listxattr(path) if a.startswith("user.walship.")}
            except OSError as exc:
                lines.append(f"  {path.relative_to(root)}: {exc}")
                continue
            lines.append(f"  {path.relative_to(root)} {st.st_size} {attrs or ''}")
    more = f"\n  ... {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{root}:\n" + "\n".join(lines[:limit]) + more


def storage_listing(storage: Storage, prefix: str = "") -> str:
    """What the store lists under prefix (the walship view: temp files never show)."""
    try:
        return "\n".join(f"  {o.key} {o.size} {dict(o.metadata)}"
                         for o in storage.list(prefix)) or "  (nothing)"
    except Exception as exc:  # a diagnostic must not hide the real failure
        return f"  (listing failed: {exc!r})"


def read_object(storage: Storage, key: str) -> bytes:
    """A whole object's stored bytes."""
    with storage.get(key) as fh:
        buf = io.BytesIO()
        while chunk := fh.read(1 << 20):
            buf.write(chunk)
        return buf.getvalue()
