"""Remote control for a fleet: ``forkguard_pause``, ``_resume``, ``_kill``, ``_status``.

Registered in Celery's control panel when a forkguard worker starts, so
``app.control.broadcast("forkguard_pause", destination=[...])`` and the
``celery forkguard`` command reach every forkguard worker at once.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command


def _controller(state: Any) -> Any:
    controller = getattr(state.consumer, "forkguard", None)
    if controller is None:
        raise RuntimeError("this worker does not run the forkguard pool")
    return controller


@control_command()
def forkguard_pause(state: Any) -> dict[str, Any]:
    """Stop taking tasks; hand prefetched ones back (like USR2)."""
    changed = _controller(state).pause("forkguard_pause")
    return {"ok": "paused" if changed else "already paused"}


@control_command()
def forkguard_resume(state: Any) -> dict[str, Any]:
    """Take tasks again (like CONT)."""
    changed = _controller(state).resume("forkguard_resume")
    return {"ok": "resumed" if changed else "not paused"}


@control_command(args=[("task_id", str)], signature="[TASK_ID]")
def forkguard_kill(state: Any, task_id: str | None = None) -> dict[str, Any]:
    """Kill one running task by id, or every running task (like USR1)."""
    killed = _controller(state).kill_tasks("forkguard_kill", task_id or None)
    return {"ok": f"killed {len(killed)} task(s)", "killed": killed}


@control_command()
def forkguard_reload(state: Any) -> dict[str, Any]:
    """Ask this worker's ``celery forkguard starter`` for a new generation (like HUP)."""
    return _controller(state).request_reload()


@inspect_command()
def forkguard_status(state: Any) -> dict[str, Any]:
    """Paused or not, each running child, and counts of killed tasks."""
    return _controller(state).status()
