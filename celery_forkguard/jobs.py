"""The pool's handle on one task: what Celery asked for and how it ended."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

from billiard.einfo import ExceptionInfo
from celery.utils.log import get_logger

logger = get_logger(__name__)

Callback = Optional[Callable[..., Any]]


def exception_info(exc: BaseException) -> ExceptionInfo:
    """An ``ExceptionInfo`` for *exc*, with a traceback, as Celery expects."""
    try:
        raise exc
    except BaseException:
        return ExceptionInfo(sys.exc_info())


class Job:
    """One ``apply_async`` call: the target, Celery's callbacks and limits.

    Celery keeps a weak reference to it and calls :meth:`terminate` on
    revoke; everything else is driven by the supervisor.
    """

    propagate: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple | list = (),
        kwargs: dict | None = None,
        *,
        callback: Callback = None,
        error_callback: Callback = None,
        accept_callback: Callback = None,
        timeout_callback: Callback = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self.target = target
        self.args = tuple(args)
        self.kwargs = kwargs or {}
        self.callback = callback
        self.error_callback = error_callback
        self.accept_callback = accept_callback
        self.timeout_callback = timeout_callback
        self.soft_timeout = soft_timeout or None
        self.timeout = timeout or None
        self.task_id = correlation_id
        # Celery's tracers take the task name as their first argument.
        self.task_name = str(args[0]) if args else getattr(target, "__name__", "?")
        self.pid: int | None = None
        self.started: float | None = None
        self.started_wall: float | None = None
        self.finished = False
        self.cancel_signal: int | None = None
        #: Whether the task acks late: decides requeue vs failure on a kill.
        self.acks_late = False
        self.on_terminate: Callable[[Job, int], None] | None = None
        #: The slot (1..limit) its child ran in: the child's ForkPoolWorker-N.
        self.slot = 0

    def __repr__(self) -> str:
        return f"<Job {self.task_name}[{self.task_id}] pid={self.pid}>"

    # -- called by Celery ---------------------------------------------------

    def terminate(self, signum: int) -> None:
        """Celery's ``Request.terminate`` asks the job itself to stop."""
        self.cancel_signal = signum
        if self.on_terminate is not None:
            self.on_terminate(self, signum)

    def ready(self) -> bool:
        return self.finished

    # -- called by the supervisor ------------------------------------------

    def accepted(self, pid: int, monotonic_now: float) -> None:
        self.pid = pid
        self.started = monotonic_now
        self.started_wall = time.time()
        self._call(self.accept_callback, pid, monotonic_now)

    def succeed(self, outcome: Any) -> None:
        if not self.finished:
            self.finished = True
            self._call(self.callback, outcome)

    def fail(self, exc: BaseException) -> None:
        """Record a failure the pool decided (a kill, a lost child) for this job."""
        if not self.finished:
            self.finished = True
            einfo = exception_info(exc)
            # billiard wraps the exception to carry its traceback across a pickle;
            # nothing is pickled here, and Celery's task-failed event reprs the
            # wrapper ("ExceptionWithTraceback()") instead of the error.
            einfo.exception = exc
            self._call(self.error_callback, einfo)

    def fail_with(self, einfo: ExceptionInfo) -> None:
        if not self.finished:
            self.finished = True
            self._call(self.error_callback, einfo)

    def time_out(self, soft: bool) -> None:
        if not soft:
            self.finished = True
        limit = self.soft_timeout if soft else self.timeout
        self._call(self.timeout_callback, soft=soft, timeout=limit)

    def _call(self, fun: Callback, *args: Any, **kwargs: Any) -> None:
        # A broken callback must not take the pool down (billiard does the same).
        if fun is None:
            return
        try:
            fun(*args, **kwargs)
        except MemoryError:
            raise
        except self.propagate:
            raise
        except Exception as exc:
            logger.error("Pool callback raised exception: %r", exc, exc_info=True)
