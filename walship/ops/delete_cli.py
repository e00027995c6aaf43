"""The `walship delete` click group: parse, call walship.ops.retention, print.

An exception to "ops/ never imports click", accepted for wiring: all logic lives in
retention.py. cli.py registers the group with `cli.add_command(delete_group)`; errors are
raised as walship.errors classes and cli.py maps them to exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import click

if TYPE_CHECKING:
    from walship.ops import retention

from walship import config as config_mod


class _HasConfig(Protocol):
    def config(self, **overrides: Any) -> config_mod.Config: ...


def _config(ctx: click.Context) -> config_mod.Config:
    """The Config of the parent `walship` command, or one from the environment alone."""
    obj = ctx.find_root().obj
    if obj is not None and callable(getattr(obj, "config", None)):
        holder: _HasConfig = obj
        return holder.config()
    return config_mod.load()


def _run(ctx: click.Context, policy: retention.Policy, confirm: bool, as_json: bool) -> None:
    from walship.ops import retention

    plan, result = retention.delete(_config(ctx), policy, confirm=confirm)
    click.echo(retention.render(plan, result, as_json=as_json, confirm=confirm))


_confirm = click.option("--confirm", is_flag=True,
                        help="Delete for real; without it, only print the plan.")
_json = click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")


@click.group("delete")
def delete_group() -> None:
    """Delete old backups and the WAL only they need (a dry run unless --confirm)."""


@delete_group.command("retain")
@click.argument("count", type=int)
@_confirm
@_json
@click.pass_context
def retain_cmd(ctx: click.Context, count: int, confirm: bool, as_json: bool) -> None:
    """Keep the COUNT newest complete backups."""
    from walship.ops import retention

    _run(ctx, retention.policy_retain(count), confirm, as_json)


@delete_group.command("before")
@click.argument("target", metavar="NAME|TIMESTAMP")
@_confirm
@_json
@click.pass_context
def before_cmd(ctx: click.Context, target: str, confirm: bool, as_json: bool) -> None:
    """Delete backups older than NAME, or not needed to restore to TIMESTAMP or later."""
    from walship.ops import retention

    _run(ctx, retention.policy_before(target), confirm, as_json)


@delete_group.command("retain-window")
@click.argument("duration")
@_confirm
@_json
@click.pass_context
def retain_window_cmd(ctx: click.Context, duration: str, confirm: bool, as_json: bool) -> None:
    """Keep every backup needed to restore to any moment in the last DURATION (7d, 12h)."""
    from walship.ops import retention

    _run(ctx, retention.policy_window(duration), confirm, as_json)
