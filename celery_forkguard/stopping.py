"""How forkguard stops a running task, and what it records for it.

One rule for every way a task is stopped on purpose: an ``acks_late`` task
interrupted by a shutdown is requeued (nothing is lost); an operator's kill
(USR1, ``forkguard_kill``) is final and recorded as a failure that says who
killed it and with which signal; anything else a shutdown interrupts is
recorded as a failure naming the shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from billiard.exceptions import WorkerLostError

from celery_forkguard import intents
from celery_forkguard.exceptions import TaskKilled, TermException, TermRequeue
from celery_forkguard.jobs import Job


@dataclass(frozen=True)
class StopPlan:
    """KILL now (``term_timeout`` None) or TERM, wait, then KILL."""

    kill_error: BaseException
    term_timeout: Optional[float] = None
    term_error: Optional[BaseException] = None
    intent: int = intents.NONE


Planner = Callable[[Job], Optional[StopPlan]]


def operator_kill(who: str, term_timeout: float | None, task_id: str | None = None) -> Planner:
    """USR1 / ``forkguard_kill``: stop the chosen tasks; never requeue them."""
    intent = intents.KILL_USR1 if who == "USR1" else intents.KILL_REMOTE

    def plan(job: Job) -> StopPlan | None:
        if task_id is not None and job.task_id != task_id:
            return None
        if term_timeout is None:
            return StopPlan(TaskKilled(f"task killed by {who} on the worker (SIGKILL)"))
        return StopPlan(
            TaskKilled(f"task killed by {who} on the worker (SIGKILL after {term_timeout:g}s)"),
            term_timeout,
            TaskKilled(f"task killed by {who} on the worker (SIGTERM)"),
            intent,
        )

    return plan


def term_shutdown(term_timeout: float) -> Planner:
    """A term_child shutdown: TERM every task, KILL it after the timeout."""

    def plan(job: Job) -> StopPlan:
        if job.acks_late:
            why = f"worker shutting down: task killed (SIGKILL after {term_timeout:g}s), requeued"
            return StopPlan(TermRequeue(why), term_timeout, None, intents.SHUTDOWN_REQUEUE)
        why = f"worker shutting down: task killed (SIGKILL after {term_timeout:g}s)"
        return StopPlan(TermException(why), term_timeout, None, intents.SHUTDOWN)

    return plan


def cold_shutdown(job: Job) -> StopPlan:
    """Celery's cold shutdown: KILL at once, by the same requeue rule."""
    if job.acks_late:
        return StopPlan(TermRequeue("worker cold shutdown: task killed (SIGKILL), requeued"))
    return StopPlan(WorkerLostError(
        f"Worker exited prematurely: cold shutdown killed the task (SIGKILL) Job: {job.task_id}."
    ))
