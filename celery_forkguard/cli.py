"""``celery -A proj forkguard pause | resume | status | kill``: the fleet's controls."""

from __future__ import annotations

import json
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption

# Importing the package registers the pool name with Celery's CLI.
import celery_forkguard  # noqa: F401

_common = [
    click.option("-d", "--destination", cls=CeleryOption, help_group="Remote Control Options",
                 help="Comma separated list of worker names (default: every worker)."),
    click.option("-t", "--timeout", cls=CeleryOption, type=float, default=1.0,
                 help_group="Remote Control Options", show_default=True,
                 help="Seconds to wait for replies."),
    click.option("--json", "as_json", cls=CeleryOption, is_flag=True,
                 help_group="Remote Control Options", help="Print the replies as JSON."),
]


def _with_common(fun: Any) -> Any:
    for option in reversed(_common):
        fun = option(fun)
    return fun


@click.group(name="forkguard")
def forkguard() -> None:
    """Steer forkguard workers (the ``-P forkguard`` pool) across a fleet."""


def _broadcast(ctx: click.Context, command: str, destination: str | None, timeout: float,
               arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    app = ctx.obj.app
    replies = app.control.broadcast(
        command, arguments=arguments or {}, reply=True, timeout=timeout,
        destination=destination.split(",") if destination else None,
    ) or []
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    if not merged:
        raise click.ClickException("no forkguard worker replied (is one running? try --timeout)")
    return merged


def _print(ctx: click.Context, replies: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(replies, indent=2, sort_keys=True, default=str))
        return
    for worker, reply in sorted(replies.items()):
        if isinstance(reply, dict) and "error" in reply:
            click.echo(f"{worker}: ERROR {reply['error']}")
        elif isinstance(reply, dict) and "paused" in reply:
            click.echo(format_status(worker, reply))
        else:
            ok = reply.get("ok", reply) if isinstance(reply, dict) else reply
            killed = reply.get("killed") if isinstance(reply, dict) else None
            click.echo(f"{worker}: {ok}" + (f" {' '.join(killed)}" if killed else ""))


def format_status(worker: str, status: dict[str, Any]) -> str:
    """A terminal-friendly block for one worker's ``forkguard_status``."""
    state = "paused" if status.get("paused") else "running"
    if status.get("shutting_down"):
        state = "shutting down"
    killed = status.get("killed") or {}
    lines = [
        f"{worker}: {state}, concurrency {status.get('concurrency')}, "
        f"{len(status.get('running') or [])} running, "
        f"killed {sum(killed.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(killed.items()))})" if killed else ""),
    ]
    for child in status.get("running") or []:
        lines.append(
            f"  pid {child['pid']:>7}  {child['runtime']:>9.1f}s  "
            f"{child['name']}[{child['task_id']}]"
        )
    return "\n".join(lines)


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def status(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Show each worker: paused or not, running children, killed counts."""
    _print(ctx, _broadcast(ctx, "forkguard_status", destination, timeout), as_json)


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def pause(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Stop taking tasks and hand prefetched ones back (like USR2)."""
    _print(ctx, _broadcast(ctx, "forkguard_pause", destination, timeout), as_json)


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def resume(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Take tasks again (like CONT)."""
    _print(ctx, _broadcast(ctx, "forkguard_resume", destination, timeout), as_json)


@forkguard.command(cls=CeleryCommand)
@click.argument("task_id", required=False)
@click.option("--all", "kill_all", is_flag=True, help="Kill every running task.")
@_with_common
@click.pass_context
def kill(ctx: click.Context, task_id: str | None, kill_all: bool, destination: str | None,
         timeout: float, as_json: bool) -> None:
    """Kill one running task by id, or every running task with --all (like USR1)."""
    if bool(task_id) == kill_all:
        raise click.UsageError("give a TASK_ID or --all (not both)")
    args = {"task_id": task_id} if task_id else {}
    _print(ctx, _broadcast(ctx, "forkguard_kill", destination, timeout, args), as_json)
