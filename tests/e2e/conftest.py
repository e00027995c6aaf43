"""Helpers shared by the end-to-end tests: an archiving cluster in a few lines."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.pg import PgCluster, PgFactory, WalshipInstall, chown_pg

pytestmark = pytest.mark.e2e


@dataclass
class Archive:
    """A store, its walship config file, and the commands an operator would write."""

    install: WalshipInstall
    config: Path
    store_url: str
    keydir: Path

    @property
    def archive_command(self) -> str:
        return self.install.command(self.config, "wal-push %p")

    @property
    def restore_command(self) -> str:
        return self.install.command(self.config, "wal-fetch %f %p")

    def run(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            config: Path | None = None) -> object:
        full_env = {"WALSHIP_CONFIG": str(config or self.config), **(env or {})}
        return self.install.run(*args, cwd=cwd, env=full_env)


def make_archive(factory: PgFactory, *, store_url: str | None = None,
                 key: str = "symmetric", extra: Mapping[str, object] | None = None) -> Archive:
    """A walship config with a fresh key: key is 'symmetric', 'public' (push side) or 'none'."""
    base = factory.scratch_dir("archive")
    keydir = base / "keys"
    keydir.mkdir(mode=0o700)
    chown_pg(keydir)
    settings: dict[str, object] = {"store": store_url or f"file://{base}/store"}
    if key == "symmetric":
        proc = factory.install.run("keygen", "--symmetric", str(keydir / "secret.key"))
        assert proc.returncode == 0, proc.stderr
        settings["key_file"] = str(keydir / "secret.key")
    elif key == "public":
        proc = factory.install.run("keygen", str(keydir / "walship.key"))
        assert proc.returncode == 0, proc.stderr
        settings["public_key_file"] = str(keydir / "walship.key.pub")
    settings.update(extra or {})
    config = factory.write_config(base / "walship.toml", settings)
    return Archive(factory.install, config, str(settings["store"]), keydir)


def archiving_cluster(factory: PgFactory, archive: Archive, *,
                      env: Mapping[str, str] | None = None, checksums: bool = False,
                      **settings: str) -> PgCluster:
    """A started cluster whose archive_command is walship wal-push into `archive`."""
    cluster = factory.cluster()
    cluster.env.update(env or {})
    cluster.initdb(checksums=checksums)
    cluster.set_conf(archive_mode="on", archive_command=f"'{archive.archive_command}'",
                     **settings)
    cluster.start()
    return cluster


def switch_and_wait_archived(cluster: PgCluster, timeout: float = 180) -> str:
    """Force a segment switch and wait until the archiver has archived that segment."""
    name = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")
    cluster.psql("select pg_switch_wal()")
    cluster.wait_for(f"select last_archived_wal >= '{name}' from pg_stat_archiver", "t", timeout)
    return name


def table_checksum(cluster: PgCluster, table: str = "pgbench_accounts",
                   key: str = "aid") -> str:
    """A digest of a table's full contents, in key order."""
    return cluster.psql(f"select md5(coalesce(string_agg(t::text, ',' order by {key}), '')) "
                        f"from {table} t")


def aws_env() -> dict[str, str]:
    """The AWS_* variables a test set (s3_store_url), for the server and walship children."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
