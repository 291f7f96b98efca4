"""Exceptions a task can see, and the errors forkguard records for it."""

from __future__ import annotations

from billiard.exceptions import WorkerLostError

__all__ = ["ForkError", "TermException", "WorkerLostError"]


class TermException(Exception):
    """Raised inside a running task when its child receives SIGTERM.

    It derives from :class:`Exception` (as Resque's ``TermException`` and
    Celery's ``SoftTimeLimitExceeded`` do) so that the task's own ``except``
    and ``finally`` blocks run and the outcome is recorded as a FAILURE.
    """


class ForkError(WorkerLostError):
    """The worker could not fork a child to run the task."""
