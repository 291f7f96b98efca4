"""``celery -A proj forkguard pause | resume | status | kill | reload | starter``.

Importing this module (Celery's CLI loads it through the ``celery.commands``
entry point) also registers the ``forkguard_*`` remote commands in Celery's
control panel, so ``celery inspect forkguard_status`` and ``celery control
forkguard_pause`` are known to Celery's own client too.  Exit codes follow
Celery's: 69 (EX_UNAVAILABLE) when no worker replies, 1 when every worker
that replied refused or a kill matched no running task, 2 for a usage error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

# Importing the package registers the pool name with Celery's CLI, and the
# control module our remote commands with Celery's client.
import celery_forkguard  # noqa: F401
from celery_forkguard import control  # noqa: F401


def _teach_celery_client_our_commands() -> None:
    """Add our commands to ``celery inspect|control`` where Celery froze their choices.

    Celery before 5.4 builds each command's ``click.Choice`` when its CLI is
    imported, which is before it loads ``celery.commands`` entry points such as
    this module; later releases read the control panel when they parse.
    """
    from celery.bin import control as celery_control
    from celery.worker.control import Panel

    for command in (celery_control.inspect, celery_control.control):
        for param in command.params:
            if param.name != "action" or not isinstance(param.type, click.Choice):
                continue
            known = tuple(param.type.choices)
            param.type.choices = known + tuple(
                name for name, info in Panel.meta.items()
                if info.type == command.name and info.visible and name not in known
            )


_teach_celery_client_our_commands()

_common = [
    click.option("-d", "--destination", cls=CeleryOption, help_group="Remote Control Options",
                 help="Comma separated list of worker names (default: every worker)."),
    click.option("-t", "--timeout", cls=CeleryOption, type=float, default=1.0,
                 help_group="Remote Control Options", show_default=True,
                 help="Seconds to wait for replies."),
    click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True,
                 help_group="Remote Control Options", help="Print the replies as JSON."),
]


def _with_common(fun: Any) -> Any:
    for option in reversed(_common):
        fun = option(fun)
    return fun


@click.group(name="forkguard")
def forkguard() -> None:
    """Steer forkguard workers (the -P forkguard pool) across a fleet."""


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
        raise CeleryCommandException(
            message="No forkguard worker replied within time constraint "
                    "(is one running? try a longer -t/--timeout)",
            exit_code=EX_UNAVAILABLE,
        )
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


def _command(ctx: click.Context, command: str, destination: str | None, timeout: float,
             as_json: bool, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Broadcast *command*, print the replies, fail when every worker refused."""
    replies = _broadcast(ctx, command, destination, timeout, arguments)
    _print(ctx, replies, as_json)
    _fail_if_none_could(replies)
    return replies


def _fail_if_none_could(replies: dict[str, Any]) -> None:
    """Exit 1 when every worker that replied answered with an error."""
    if all(isinstance(r, dict) and "error" in r for r in replies.values()):
        raise CeleryCommandException(
            message="every worker that replied refused (see above)", exit_code=1,
        )


def format_status(worker: str, status: dict[str, Any]) -> str:
    """A terminal-friendly block for one worker's ``forkguard_status``."""
    state = "paused" if status.get("paused") else "running"
    if status.get("retiring"):
        state = "retiring"
    elif status.get("shutting_down"):
        state = "shutting down"
    if status.get("generation"):
        state += f" (generation {status['generation']} of starter pid {status.get('starter_pid')})"
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
    _command(ctx, "forkguard_status", destination, timeout, as_json)


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def pause(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Stop taking tasks and hand prefetched ones back (like USR2)."""
    _command(ctx, "forkguard_pause", destination, timeout, as_json)


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def resume(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Take tasks again (like CONT)."""
    _command(ctx, "forkguard_resume", destination, timeout, as_json)


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
    replies = _command(ctx, "forkguard_kill", destination, timeout, as_json, args)
    if task_id and not any(isinstance(r, dict) and r.get("killed") for r in replies.values()):
        raise CeleryCommandException(
            message=f"no worker that replied runs task {task_id}", exit_code=1,
        )


@forkguard.command(cls=CeleryCommand)
@_with_common
@click.pass_context
def reload(ctx: click.Context, destination: str | None, timeout: float, as_json: bool) -> None:
    """Ask each worker's forkguard starter for a new generation (like HUP)."""
    _command(ctx, "forkguard_reload", destination, timeout, as_json)


#: Worker options the starter sets itself, or that two generations cannot share.
_REFUSED = {
    "-P": "the starter always runs -P forkguard",
    "--pool": "the starter always runs -P forkguard",
    "-D": "the starter is the long-lived process: run it in the foreground",
    "--detach": "the starter is the long-lived process: run it in the foreground",
    "--pidfile": "two generations overlap during a reload and cannot share a pidfile",
}


@forkguard.command(
    cls=CeleryCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--ready-timeout", type=float, default=None,
              help="Seconds a new generation has to start consuming before the "
                   "deploy counts as failed (default: forkguard_ready_timeout, 120).")
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def starter(ctx: click.Context, ready_timeout: float | None,
            worker_args: tuple[str, ...]) -> None:
    """Run a worker and reload it on HUP with no lost or killed task.

    WORKER_ARGS are celery worker options (-c 4 -Q default -l info).
    HUP starts a new generation from a fresh exec and retires the old one once
    the new one consumes; USR1, USR2, CONT, TTIN and TTOU go to the current
    generation; TERM, INT and QUIT stop every generation.
    """
    from celery_forkguard.settings import load_settings
    from celery_forkguard.starter import Starter

    for arg in worker_args:
        reason = _REFUSED.get(arg.split("=", 1)[0])
        if reason is not None:
            raise click.UsageError(f"{arg}: {reason}")
    app = ctx.obj.app
    if ready_timeout is None:
        ready_timeout = load_settings(app.conf).ready_timeout
    given = _global_values_as_given(sys.argv[1:])
    argv = [sys.executable, "-m", "celery", *_global_options(ctx, given),
            "worker", "-P", "forkguard", *worker_args]
    _log_to_stderr()
    ctx.exit(Starter(argv, ready_timeout, cwd=_workdir_as_given(given)).run())


#: Celery's global options that take a value, by flag, with their parameter name.
_VALUED_GLOBALS = {
    "-A": "app", "--app": "app", "-b": "broker", "--broker": "broker",
    "--result-backend": "result_backend", "--loader": "loader",
    "--config": "config", "--workdir": "workdir",
}
_GLOBAL_FLAGS = {"--no-color": "no_color", "--quiet": "quiet", "--skip-checks": "skip_checks"}


def _global_values_as_given(argv: list[str]) -> dict[str, str]:
    """The values of ``celery``'s global options as typed (they precede the subcommand).

    Click keeps only converted values, and some are no longer strings:
    Celery before 5.5 turns ``--app`` into the app object, and ``--workdir``
    into the result of ``os.chdir`` (a moved ``current`` symlink must be
    followed afresh by each generation).
    """
    values: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--" or not arg.startswith("-"):
            break
        flag, eq, value = arg.partition("=")
        if flag in _VALUED_GLOBALS and flag.startswith("--"):
            values[_VALUED_GLOBALS[flag]] = value if eq else next(args, "")
        elif arg[:2] in _VALUED_GLOBALS:  # -A proj or -Aproj
            values[_VALUED_GLOBALS[arg[:2]]] = arg[2:] or next(args, "")
    return values


def _workdir_as_given(given: dict[str, str]) -> str | None:
    """``--workdir`` when absolute (a relative one was already followed)."""
    value = given.get("workdir")
    return value if value and os.path.isabs(value) else None


def _global_options(ctx: click.Context, given: dict[str, str]) -> list[str]:
    """The ``celery`` options this command was given, for each generation's command."""
    params = ctx.find_root().params
    options = []
    for flag in ("--app", "--broker", "--result-backend", "--loader", "--config"):
        name = _VALUED_GLOBALS[flag]
        value = params.get(name)
        value = value if isinstance(value, str) and value else given.get(name)
        if value:
            options += [flag, value]
    for flag, name in _GLOBAL_FLAGS.items():
        if params.get(name):
            options.append(flag)
    return options


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/starter] %(message)s"))
    logger = logging.getLogger("celery_forkguard.starter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
