"""Stopping children on purpose: time limits, the memory guard, revoke, operator kills.

A mixin of :class:`~celery_forkguard.supervisor.Supervisor`: it only sends
signals and notes what the task is to be recorded with if its child then
dies without a report; the supervisor settles the child when it exits.
Escalation is always: signal, deadline, SIGKILL.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import TYPE_CHECKING

from billiard.exceptions import Terminated

from celery_forkguard import intents
from celery_forkguard.exceptions import MemoryLimitExceeded
from celery_forkguard.lifecycle import Child
from celery_forkguard.timers import Timer, TimerHeap

if TYPE_CHECKING:
    from celery_forkguard.metrics import PoolMetrics
    from celery_forkguard.spawning import Spawner

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class Kills:
    """Time limits, memory limit and signals for the supervisor's children."""

    children: dict[int, Child]
    timers: TimerHeap
    counts: Counter[str]
    metrics: PoolMetrics
    spawner: Spawner | None

    def _init_kills(self) -> None:
        #: worker_max_memory_per_child, in kB (None: no guard).
        self.memory_limit_kb: int | None = None
        self.memory_check_interval = 0.5
        self._memory_timer: Timer | None = None

    def running(self) -> list[Child]:
        raise NotImplementedError

    # -- limits -----------------------------------------------------------------------

    def _arm_time_limits(self, child: Child) -> None:
        job = child.job
        if job.soft_timeout:
            child.timers.append(self.timers.call_later(job.soft_timeout, self._soft_limit, child))
        if job.timeout:
            child.timers.append(self.timers.call_later(job.timeout, self._hard_limit, child))

    def _soft_limit(self, child: Child) -> None:
        if _alive(child) and not child.job.finished:
            child.job.time_out(soft=True)
            child.spawner.kill(_pid(child), signal.SIGUSR1)

    def _hard_limit(self, child: Child) -> None:
        if _alive(child) and not child.job.finished:
            self.counts["timed_out"] += 1
            self.metrics.killed("time_limit")
            child.job.time_out(soft=False)
            child.spawner.kill(_pid(child), signal.SIGKILL, group=True)

    def _arm_memory_guard(self) -> None:
        if self.memory_limit_kb and self._memory_timer is None:
            self._memory_timer = self.timers.call_later(
                self.memory_check_interval, self._check_memory
            )

    def _check_memory(self) -> None:
        """Kill each child whose resident memory passed the limit."""
        self._memory_timer = None
        limit = self.memory_limit_kb
        if not limit:
            return
        running = self.running()
        for child in running:
            rss = resident_kb(_pid(child))
            if rss is not None and rss > limit and child.kill_error is None:
                self.counts["memory_killed"] += 1
                self.signal_child(child, signal.SIGKILL, MemoryLimitExceeded(
                    f"task killed: its process used {rss} kB of resident memory, "
                    f"over worker_max_memory_per_child={limit} kB"
                ))
        if running:
            self._arm_memory_guard()

    # -- signals -------------------------------------------------------------------------

    def signal_child(
        self, child: Child, signum: int, error: BaseException | None, intent: int = intents.NONE,
    ) -> bool:
        """Send *signum* to a running child.

        *error* is what the task is recorded with if the child dies without
        a report; *intent* tells the child's SIGTERM handler why (intents.py).
        SIGKILL goes to the child's whole process group, so the task's own
        subprocesses go with it.
        """
        if not _alive(child):
            return False
        child.kill_error = error
        intents.shared().set(_pid(child), intent)
        return child.spawner.kill(_pid(child), signum, group=signum == signal.SIGKILL)

    def stop_child(
        self,
        child: Child,
        *,
        term_timeout: float | None,
        kill_error: BaseException,
        term_error: BaseException | None = None,
        intent: int = intents.NONE,
        again: bool = False,
    ) -> None:
        """KILL now, or TERM and KILL after *term_timeout* seconds (Resque's way).

        A child already being stopped is left alone unless *again*; one not
        forked yet is stopped as soon as it is.
        """
        if child.kill_error is not None and not again:
            return
        if child.pid is None:
            child.pending_stop = {
                "term_timeout": term_timeout, "kill_error": kill_error,
                "term_error": term_error, "intent": intent, "again": again,
            }
            return
        if term_timeout is None:
            self.signal_child(child, signal.SIGKILL, kill_error)
            return
        self.signal_child(child, signal.SIGTERM, term_error or kill_error, intent)
        child.timers.append(
            self.timers.call_later(term_timeout, self._escalate, child, kill_error)
        )

    def _escalate(self, child: Child, kill_error: BaseException) -> None:
        self.signal_child(child, signal.SIGKILL, kill_error)

    def terminate_job(self, pid: int, signum: int | None = None) -> None:
        """``revoke(terminate=True)``: signal that task's child, and only it."""
        signum = signum or signal.SIGTERM
        child = next((c for c in self.children.values() if c.pid == pid), None)
        # Celery's Request.terminate asks twice (pool and job): signal once.
        if child is not None and not isinstance(child.kill_error, Terminated):
            self.signal_child(child, signum, Terminated(-signum), intents.REVOKE)


def _alive(child: Child) -> bool:
    """Forked, and not known to have exited: a signal can only reach this process."""
    return child.pid is not None and child.exit_code is None and not child.settled


def _pid(child: Child) -> int:
    assert child.pid is not None
    return child.pid


def resident_kb(pid: int) -> int | None:
    """A process's resident set size in kB, read from /proc (None if unknown)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * PAGE_KB
