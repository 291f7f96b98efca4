"""Exceptions a task can see, and the errors forkguard records for it."""

from __future__ import annotations

from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject

__all__ = [
    "ForkError", "MemoryLimitExceeded", "TaskKilled", "TermException", "TermRequeue",
    "WorkerLostError",
]


class TermException(Exception):
    """Raised inside a running task when its child receives SIGTERM.

    It derives from :class:`Exception` (as Resque's ``TermException`` and
    Celery's ``SoftTimeLimitExceeded`` do) so that the task's own ``except``
    and ``finally`` blocks run and the outcome is recorded as a FAILURE.
    """


class TermRequeue(TermException, Reject):
    """The TermException an ``acks_late`` task sees at a term_child shutdown.

    Being a :class:`~celery.exceptions.Reject` too, an uncaught one makes
    Celery requeue the message instead of recording a failure: the task
    runs again on another worker and nothing is lost.
    """

    def __init__(self, reason: object = None, requeue: bool = True) -> None:
        Reject.__init__(self, reason, requeue)

    def __str__(self) -> str:
        return str(self.reason)


class TaskKilled(Exception):
    """An operator killed the task (USR1 or ``forkguard_kill``); it is not retried."""


class MemoryLimitExceeded(Exception):
    """The task's child passed ``worker_max_memory_per_child`` and was killed."""


class ForkError(WorkerLostError):
    """The worker could not fork a child to run the task."""
