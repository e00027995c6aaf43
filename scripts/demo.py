"""The drill behind scripts/demo, step by step in plain words.

A throwaway cluster archives its WAL with walship into an encrypted file store; we take a base
backup, note a time, do damage (DROP TABLE), lose the whole cluster, restore the backup with
--target-time, start PostgreSQL on it, and check the data is exactly as it was at that time.
Every PostgreSQL and walship process runs as the postgres user, as in production.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.pg import PgFactory, chown_pg, install_walship  # noqa: E402


def say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the workspace for a look")
    parser.add_argument("--scale", type=int, default=5, help="pgbench scale (5 = ~75 MB)")
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="walship-demo-", dir="/tmp"))
    workspace.chmod(0o755)
    factory: PgFactory | None = None
    try:
        say(f"Installing walship where the postgres user can run it ({workspace})")
        install = install_walship(workspace)
        chown_pg(workspace)
        factory = PgFactory(install)

        say("Creating an encryption key and a local file store")
        base = factory.scratch_dir("archive")
        key = base / "secret.key"
        run = install.run("keygen", "--symmetric", str(key), check=True)
        detail(run.stdout.strip())
        config = factory.write_config(base / "walship.toml",
                                      {"store": f"file://{base}/store", "key_file": str(key)})
        detail(f"config {config}: store file://{base}/store, symmetric encryption, lz4")
        env = {"WALSHIP_CONFIG": str(config)}

        say("Starting a throwaway PostgreSQL cluster with archive_command = walship wal-push")
        primary = factory.cluster("primary")
        primary.initdb()
        command = install.command(config, "wal-push %p")
        primary.set_conf(archive_mode="on", archive_command=f"'{command}'")
        primary.start()
        detail(f"archive_command = '{command}'")

        say(f"Loading data with pgbench (scale {args.scale}) and running some traffic")
        primary.pgbench("-i", "-q", "-n", "-s", str(args.scale))
        primary.pgbench("-n", "-c", "2", "-j", "2", "-T", "5")

        say("Taking an online base backup: walship backup-push PGDATA")
        run = install.run("backup-push", str(primary.datadir), env={**env, **primary.libpq_env},
                          check=True)
        detail(f"backup {run.stdout.strip()}")

        say("More traffic, then noting the time we will want to return to")
        primary.pgbench("-n", "-c", "2", "-j", "2", "-T", "3")
        time.sleep(1.1)
        good_checksum = primary.psql("select md5(string_agg(a::text, ',' order by aid)) "
                                     "from pgbench_accounts a")
        good_rows = primary.psql("select count(*) from pgbench_accounts")
        target = datetime.now(timezone.utc).isoformat(sep=" ", timespec="microseconds")
        time.sleep(1.1)
        detail(f"target time {target}: pgbench_accounts has {good_rows} rows, md5 "
               f"{good_checksum}")

        say("Disaster, part 1: somebody runs DROP TABLE pgbench_accounts")
        primary.psql("drop table pgbench_accounts cascade")
        primary.psql("select pg_switch_wal()")
        name = primary.psql("select pg_walfile_name(pg_current_wal_lsn())")
        primary.wait_for(f"select last_archived_wal >= '{name}' from pg_stat_archiver",  # noqa: S608
                         "t")
        detail("the DROP is archived too: replaying everything would replay the damage")

        say("Disaster, part 2: the server and its data directory are gone")
        primary.stop("immediate")
        shutil.rmtree(primary.datadir)
        detail(f"rm -rf {primary.datadir}")

        say("What the store holds: walship backup-list")
        run = install.run("backup-list", env=env, check=True)
        for line in run.stdout.strip().splitlines():
            detail(line)

        say(f"Restoring the newest backup that finished before {target}, to that time")
        restored = factory.cluster("restored")
        run = install.run("backup-fetch", str(restored.datadir), "LATEST", "--target-time",
                          target, env=env, check=True)
        detail(run.stdout.strip())
        restored.set_conf(port=str(restored.port),
                          unix_socket_directories=f"'{restored.sockdir}'", archive_mode="off")
        chown_pg(restored.datadir)

        say("Starting PostgreSQL on the restored directory: it replays WAL from the store")
        restored.start()
        restored.wait_recovery_done()
        rows = restored.psql("select count(*) from pgbench_accounts")
        checksum = restored.psql("select md5(string_agg(a::text, ',' order by aid)) "
                                 "from pgbench_accounts a")
        detail(f"pgbench_accounts has {rows} rows, md5 {checksum}")
        if checksum != good_checksum:
            print("\nFAILED: the restored data differs from the data at the target time")
            return 1
        say("Success: the dropped table is back, exactly as it was at the target time")
        restored.stop()
        return 0
    finally:
        if factory is not None:
            factory.close()
        if args.keep:
            print(f"\nworkspace kept: {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
