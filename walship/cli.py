"""The command line: parse, build the Config, call one service function, map errors to exits.

This is the only module that exits or prints errors. The exit-code policy (docs/exit-codes.md):
each error class carries its code; wal-fetch and backup-fetch exit 1 only when the store
confirmed the object does not exist; wal-fetch turns every other failure into a code above
125 so that PostgreSQL aborts recovery instead of promoting on partial history, except that a
standby (standby.signal in the working directory) exits 1 on a store outage and keeps polling.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

import walship
from walship import config as config_mod
from walship import log
from walship.errors import (
    EXIT_NOT_FOUND,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    WAL_FETCH_ABORT_BASE,
    ObjectNotFound,
    StorageUnavailable,
    UsageError,
    WalshipError,
)

_INTERNAL_ERROR = 3


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup handlers run."""


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


def _error(message: str, hint: str | None = None) -> None:
    click.echo(f"walship: error: {message}", err=True)
    if hint:
        click.echo(f"walship: hint: {hint}", err=True)


class _Context:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self._config: config_mod.Config | None = None

    def source(self) -> str | None:
        """The configuration's source for the spool's markers, when it is the environment
        alone (walship.fastpath compares it without loading the configuration)."""
        if self.options.get("config_path") or self.options.get("store"):
            return None
        from walship.fastpath import config_source

        return config_source(os.environ)

    def config(self, **overrides: Any) -> config_mod.Config:
        if self._config is None:
            options = dict(self.options)
            config_path = options.pop("config_path", None)
            options.update(overrides)
            self._config = config_mod.load(options, config_path=config_path)
            log.setup(self._config.log_level)
        return self._config


pass_ctx = click.make_pass_decorator(_Context)


def _limit_arenas() -> None:
    """For the commands that move buffers between thread pools (walship/memory.py)."""
    from walship.memory import limit_arenas

    limit_arenas()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(walship.__version__, prog_name="walship")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration file (or WALSHIP_CONFIG).")
@click.option("--store", help="file:///path, s3://bucket/prefix or gs://bucket/prefix.")
@click.option("--compression", type=click.Choice(config_mod.COMPRESSIONS),
              help="Codec for new objects (default lz4).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, store: str | None,
        compression: str | None, log_level: str | None) -> None:
    """walship: PostgreSQL WAL archiving and point-in-time recovery to object storage."""
    ctx.obj = _Context({"config_path": config_path, "store": store,
                        "compression": compression, "log_level": log_level})


@cli.command("wal-push")
@click.argument("wal_path", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def wal_push_cmd(ctx: _Context, wal_path: Path) -> None:
    """Archive one WAL file: archive_command = 'walship wal-push %p'."""
    from walship.ops.wal_push import wal_push

    wal_push(ctx.config(), wal_path, source=ctx.source())


@cli.command("wal-fetch")
@click.argument("wal_name")
@click.argument("dest_path", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def wal_fetch_cmd(ctx: _Context, wal_name: str, dest_path: Path) -> None:
    """Restore one WAL file: restore_command = 'walship wal-fetch %f %p'."""
    from walship.ops.wal_fetch import wal_fetch

    wal_fetch(ctx.config(), wal_name, dest_path, datadir=Path.cwd(), source=ctx.source())


@cli.command("keygen")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--symmetric", is_flag=True,
              help="One secret key for both push and fetch, instead of a key pair.")
def keygen_cmd(path: Path, symmetric: bool) -> None:
    """Write a key pair (PATH private, PATH.pub public) or a secret key, mode 0600."""
    from walship import crypto

    if symmetric:
        key_id = crypto.keygen_symmetric(path)
        click.echo(f"wrote secret key {path} (key id {key_id})")
    else:
        key_id = crypto.keygen_pair(path)
        click.echo(f"wrote private key {path} and public key {path}.pub (key id {key_id})")


def _walship_command(config: config_mod.Config) -> str:
    """How restore_command should run this walship with this configuration."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.isfile(argv0) and os.access(argv0, os.X_OK):
        program = shlex.quote(os.path.abspath(argv0))
    else:
        program = f"{shlex.quote(sys.executable)} -m walship"
    settings = {k: v for k, v in config.to_environ().items() if k != "WALSHIP_DSN"}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(settings.items()))
    return f"{prefix} {program}" if prefix else program


@cli.command("backup-push")
@click.argument("pgdata", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dsn", help="libpq connection string (default: PGHOST, PGPORT, PGUSER, ...).")
@pass_ctx
def backup_push_cmd(ctx: _Context, pgdata: Path, dsn: str | None) -> None:
    """Take an online base backup of the server whose data directory is PGDATA."""
    from walship.ops.backup_push import backup_push

    _limit_arenas()
    info = backup_push(ctx.config(dsn=dsn), pgdata, progress=sys.stderr.isatty())
    click.echo(info.name)


def _parse_tablespaces(values: tuple[str, ...]) -> dict[int, Path]:
    result: dict[int, Path] = {}
    for value in values:
        oid, sep, path = value.partition("=")
        if not sep or not oid.isdigit() or not path:
            raise UsageError(f"bad --tablespace {value!r}", hint="use --tablespace OID=PATH")
        result[int(oid)] = Path(path)
    return result


@cli.command("backup-fetch")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--target-time", help="Recover to this time (e.g. '2026-11-21 06:00:00+00').")
@click.option("--target-lsn", help="Recover to this LSN (e.g. 0/3000060).")
@click.option("--target-xid", help="Recover to this transaction id.")
@click.option("--target-name", help="Recover to this restore point (pg_create_restore_point).")
@click.option("--target-immediate", is_flag=True, help="Stop as soon as the backup is consistent.")
@click.option("--tablespace", "tablespaces", multiple=True, metavar="OID=PATH",
              help="Restore tablespace OID to PATH instead of its original location.")
@pass_ctx
def backup_fetch_cmd(ctx: _Context, dest: Path, name: str, target_time: str | None,
                     target_lsn: str | None, target_xid: str | None, target_name: str | None,
                     target_immediate: bool, tablespaces: tuple[str, ...]) -> None:
    """Restore backup NAME (or LATEST) into DEST, which must be empty or absent."""
    from walship.ops.backup_fetch import backup_fetch
    from walship.ops.recovery import RecoveryTarget

    _limit_arenas()
    given = [(kind, value) for kind, value in (
        ("time", target_time), ("lsn", target_lsn), ("xid", target_xid), ("name", target_name),
        ("immediate", "immediate" if target_immediate else None)) if value is not None]
    if len(given) > 1:
        raise UsageError("give at most one recovery target")
    target = RecoveryTarget.parse(*given[0]) if given else None
    config = ctx.config()
    info = backup_fetch(config, dest, name, target=target,
                        tablespaces=_parse_tablespaces(tablespaces),
                        walship_command=_walship_command(config))
    click.echo(f"restored {info.name} into {dest}")


@cli.command("backup-list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, oldest first.")
@pass_ctx
def backup_list_cmd(ctx: _Context, as_json: bool) -> None:
    """List complete backups, oldest first."""
    from walship.ops.backup_list import backup_list, format_table

    backups = backup_list(ctx.config())
    if as_json:
        click.echo(json.dumps([b.to_json() for b in backups], indent=2))
    else:
        click.echo(format_table(backups))


@cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def check_cmd(ctx: _Context, as_json: bool) -> None:
    """Probe the store once: permissions and capabilities."""
    from walship.ops.check import check

    report = check(ctx.config())
    click.echo(report.to_json() if as_json else report.render())
    report.raise_for_missing()


def _parse_pg_options(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    result = []
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"bad --pg-option {value!r}",
                             hint="use --pg-option NAME=VALUE, e.g. shared_buffers=128MB")
        result.append((name.strip(), setting))
    return tuple(result)


@cli.command("drill")
@click.option("--target-time", help="Replay to this time instead of the end of the archive.")
@click.option("--latest", is_flag=True, help="Replay the whole archive (the default).")
@click.option("--backup", "backup_name", default="LATEST", show_default=True,
              help="The backup to restore (default: the newest that can reach the target).")
@click.option("--keep", is_flag=True, help="Leave the promoted server's directory in place.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--pg-bin", type=click.Path(file_okay=False, path_type=Path),
              help="PostgreSQL bin directory (default: found from PATH, pg_config, "
              "/usr/lib/postgresql/N/bin).")
@click.option("--check-sql", help="SQL that must run without error (and return true if it "
              "returns one boolean).")
@click.option("--check-db", default="postgres", show_default=True,
              help="Database --check-sql runs in.")
@click.option("--scratch", type=click.Path(file_okay=False, path_type=Path),
              help="Directory to restore under (default: the system's temporary directory).")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="Seconds to wait for replay and promotion.")
@click.option("--sample", type=click.IntRange(min=0), default=10, show_default=True,
              help="User tables per database that pg_amcheck checks, besides the catalogs.")
@click.option("--db-user", help="Superuser of the restored cluster (default: the OS user "
              "that runs the server).")
@click.option("--pg-option", "pg_options", multiple=True, metavar="NAME=VALUE",
              help="A server setting for the drill (e.g. shared_buffers=128MB).")
@pass_ctx
def drill_cmd(ctx: _Context, target_time: str | None, latest: bool, backup_name: str,
              keep: bool, as_json: bool, pg_bin: Path | None, check_sql: str | None,
              check_db: str, scratch: Path | None, timeout: float, sample: int,
              db_user: str | None, pg_options: tuple[str, ...]) -> None:
    """Restore a backup into a scratch directory, replay, promote, check, report."""
    from walship.ops.drill import DrillOptions, drill
    from walship.ops.recovery import RecoveryTarget

    _limit_arenas()
    if latest and target_time is not None:
        raise UsageError("give --target-time or --latest, not both")
    options = DrillOptions(
        target=RecoveryTarget.parse("time", target_time) if target_time is not None else None,
        backup=backup_name, keep=keep, pg_bin=pg_bin.absolute() if pg_bin else None,
        check_sql=check_sql, check_db=check_db,
        scratch=scratch.absolute() if scratch else None, timeout=timeout, sample=sample,
        db_user=db_user, pg_options=_parse_pg_options(pg_options))
    report = drill(ctx.config(), options, walship_command=_walship_command,
                   environ=dict(os.environ))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())
    report.raise_for_failure()


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--prometheus", is_flag=True,
              help="Print node_exporter textfile-collector metrics.")
@click.option("--dsn", help="libpq connection string for the archive lag (default: PGHOST, "
              "PGPORT, PGUSER, ...).")
@pass_ctx
def status_cmd(ctx: _Context, as_json: bool, prometheus: bool, dsn: str | None) -> None:
    """The archive's state: newest WAL, archive lag, backups, stored bytes, the last drill."""
    from walship.ops.status import format_prometheus, status

    if as_json and prometheus:
        raise UsageError("give --json or --prometheus, not both")
    report = status(ctx.config(dsn=dsn))
    if prometheus:
        click.echo(format_prometheus(report), nl=False)
    elif as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.render())


@cli.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--deep", is_flag=True,
              help="Download and authenticate every object and check every file's SHA-256 "
              "(needs the decryption key).")
@pass_ctx
def verify_cmd(ctx: _Context, as_json: bool, deep: bool) -> None:
    """WAL chain per timeline, backups whole, and the window each backup can restore to."""
    from walship.ops.verify import verify_archive

    _limit_arenas()
    report = verify_archive(ctx.config(), deep=deep)
    click.echo(report.to_json() if as_json else report.render())
    report.raise_for_problems()


def _register_delete() -> None:
    # The retention commands live beside their service (walship/ops/delete_cli.py).
    from walship.ops.delete_cli import delete_group

    cli.add_command(delete_group)


_register_delete()


def _exit_code(exc: WalshipError, command: str | None) -> int:
    if command == "wal-fetch":
        if isinstance(exc, ObjectNotFound):
            return EXIT_NOT_FOUND
        if isinstance(exc, StorageUnavailable) and Path("standby.signal").exists():
            # A standby never promotes because a fetch failed: it retries and streams.
            return EXIT_NOT_FOUND
        return WAL_FETCH_ABORT_BASE + exc.exit_code
    if command == "backup-fetch" and isinstance(exc, ObjectNotFound):
        return EXIT_NOT_FOUND
    return exc.exit_code


def _command_of(args: list[str]) -> str | None:
    for arg in args:
        if arg in cli.commands:
            return arg
    return None


def run(args: list[str]) -> int:
    """Run the CLI on `args`; returns the exit code. Never raises."""
    command = _command_of(args)
    if not args:
        click.echo(cli.get_help(click.Context(cli, info_name="walship")))
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=args, prog_name="walship", standalone_mode=False)
        return 0
    except WalshipError as exc:
        code = _exit_code(exc, command)
        if code == EXIT_NOT_FOUND and isinstance(exc, ObjectNotFound):
            # PostgreSQL asks for files past the end of the archive all the time: a fact,
            # not an error.
            click.echo(f"walship: {exc.message}", err=True)
        else:
            _error(exc.message, exc.hint)
        return code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        _error("interrupted")
        return EXIT_SIGINT
    except click.ClickException as exc:
        _error(exc.format_message())
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_SIGINT
    except Terminated:
        _error("terminated")
        return EXIT_SIGTERM
    except Exception as exc:
        _error(f"internal error: {type(exc).__name__}: {exc}",
               "this is a bug in walship; run with --log-level debug for the traceback")
        if log.logger.isEnabledFor(10):
            traceback.print_exc()
        code = _INTERNAL_ERROR
        return WAL_FETCH_ABORT_BASE + code if command == "wal-fetch" else code
