"""The pool's bookkeeping: slots, running children, limits, and outcomes.

Single-threaded and loop-agnostic: a driver (``drivers.py``) calls
:meth:`Supervisor.poll` when the supervisor's selector is readable or a timer
is due.  Every wait is a selector or a timer; nothing here blocks on a child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import time
from collections import Counter, deque
from typing import Any, Callable, Optional

from billiard.common import human_status
from billiard.exceptions import Terminated, WorkerLostError
from celery.utils.log import get_logger

from celery_forkguard import intents, protocol
from celery_forkguard.exceptions import ForkError, MemoryLimitExceeded
from celery_forkguard.forking import ChildProcess, Spawner
from celery_forkguard.jobs import Job
from celery_forkguard.timers import Timer, TimerHeap

logger = get_logger(__name__)

#: How often a child without a pidfd (non-Linux) is checked for exit.
EXIT_POLL_INTERVAL = 0.01
#: Back-off between attempts to fork when the system refuses (EAGAIN, ENOMEM).
FORK_RETRY_DELAYS = (0.1, 0.5, 2.0)
READ_CHUNK = 65536
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
#: Exit code recorded for children whose fork server died.
SERVER_LOST = 255


class Child:
    """A running child and what the master knows of it."""

    __slots__ = ("job", "kill_error", "process", "report", "timers")

    def __init__(self, process: ChildProcess, job: Job) -> None:
        self.process = process
        self.job = job
        self.report = bytearray()
        self.timers: list[Timer] = []
        self.kill_error: Optional[BaseException] = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self, now: float) -> dict[str, Any]:
        """What ``inspect stats`` and ``forkguard_status`` show of a running child."""
        job = self.job
        return {
            "pid": self.pid,
            "task_id": job.task_id,
            "name": job.task_name,
            "runtime": round(now - (job.started or now), 3),
            "started": job.started_wall,
        }


class Supervisor:
    """Starts at most ``limit`` children and turns each exit into an outcome."""

    def __init__(
        self,
        forker: Spawner,
        limit: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_job_done: Callable[[Job], None] | None = None,
        selector: selectors.BaseSelector | None = None,
    ) -> None:
        self.forker = forker
        self.limit = max(1, limit)
        self.clock = clock
        self.timers = TimerHeap(clock)
        self.selector = selector or selectors.DefaultSelector()
        self.children: dict[int, Child] = {}
        self.pending: deque[Job] = deque()
        self.on_job_done = on_job_done or (lambda job: None)
        self.counts: Counter[str] = Counter()
        self._fork_blocked_until = 0.0
        self._fork_failures = 0
        #: worker_max_memory_per_child, in kB (None: no guard).
        self.memory_limit_kb: int | None = None
        self.memory_check_interval = 0.5
        self._memory_timer: Timer | None = None
        # A fork server reports exits on one socket instead of a pidfd per child.
        self._exit_events = hasattr(forker, "read_exits")
        self._events_key: tuple[int, int] | None = None
        self._restart_forker = False

    # -- state -------------------------------------------------------------

    def fileno(self) -> int:
        # epoll/kqueue selectors are themselves pollable: the hub watches this one fd.
        return int(self.selector.fileno())  # type: ignore[attr-defined]

    def busy(self) -> bool:
        return bool(self.children or self.pending)

    def running(self) -> list[Child]:
        return list(self.children.values())

    # -- submitting --------------------------------------------------------

    def submit(self, job: Job) -> None:
        job.on_terminate = self.cancel_job
        self.pending.append(job)
        self.fill_slots()

    def fill_slots(self) -> None:
        """Fork a child for each pending job while a slot is free."""
        while self.pending and len(self.children) < self.limit:
            if self.clock() < self._fork_blocked_until:
                return
            self._start(self.pending.popleft())

    def _start(self, job: Job) -> None:
        if job.cancel_signal is not None:  # revoked before it got a slot
            self._finish(job, Terminated(-job.cancel_signal))
            return
        try:
            process = self.forker.spawn(job)
        except OSError as exc:
            self._watch_exit_events()
            self._fork_failed(job, exc)
            return
        self._watch_exit_events()
        self._fork_failures = 0
        child = Child(process, job)
        self.children[process.pid] = child
        self.selector.register(process.report_fd, selectors.EVENT_READ, (self._on_report, child))
        if process.exit_fd is not None:
            self.selector.register(process.exit_fd, selectors.EVENT_READ, (self._on_exit, child))
        elif not self._exit_events:
            child.timers.append(self.timers.call_later(EXIT_POLL_INTERVAL, self._on_exit, child))
        self.counts["forked"] += 1
        job.accepted(process.pid, self.clock())
        self._arm_time_limits(child)
        self._arm_memory_guard()

    def _fork_failed(self, job: Job, exc: OSError) -> None:
        if exc.errno in (errno.EAGAIN, errno.ENOMEM) and self._fork_failures < len(
            FORK_RETRY_DELAYS
        ):
            delay = FORK_RETRY_DELAYS[self._fork_failures]
            self._fork_failures += 1
            logger.error("forkguard: cannot fork (%s); retrying in %.1fs", exc, delay)
            self.pending.appendleft(job)
            self._fork_blocked_until = self.clock() + delay
            self.timers.call_later(delay, self.fill_slots)
            return
        self._fork_failures = 0
        logger.error("forkguard: cannot fork a child for %r: %s", job, exc)
        self.counts["fork_failed"] += 1
        self._finish(job, ForkError(f"could not fork a child to run the task: {exc}"))

    def _arm_time_limits(self, child: Child) -> None:
        job = child.job
        if job.soft_timeout:
            child.timers.append(self.timers.call_later(job.soft_timeout, self._soft_limit, child))
        if job.timeout:
            child.timers.append(self.timers.call_later(job.timeout, self._hard_limit, child))

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
        for child in self.running():
            rss = resident_kb(child.pid)
            if rss is not None and rss > limit and child.kill_error is None:
                self.counts["memory_killed"] += 1
                self.signal_child(child, signal.SIGKILL, MemoryLimitExceeded(
                    f"task killed: its process used {rss} kB of resident memory, "
                    f"over worker_max_memory_per_child={limit} kB"
                ))
        if self.children:
            self._arm_memory_guard()

    # -- limits and kills ----------------------------------------------------

    def _soft_limit(self, child: Child) -> None:
        if child.pid in self.children and not child.job.finished:
            child.job.time_out(soft=True)
            self.forker.kill(child.pid, signal.SIGUSR1)

    def _hard_limit(self, child: Child) -> None:
        if child.pid in self.children and not child.job.finished:
            self.counts["timed_out"] += 1
            child.job.time_out(soft=False)
            self.forker.kill(child.pid, signal.SIGKILL, group=True)

    def signal_child(
        self, child: Child, signum: int, error: BaseException | None, intent: int = intents.NONE,
    ) -> bool:
        """Send *signum* to a running child.

        *error* is what the task is recorded with if the child dies without
        a report; *intent* tells the child's SIGTERM handler why (intents.py).
        SIGKILL goes to the child's whole process group, so the task's own
        subprocesses go with it.
        """
        if child.pid not in self.children:
            return False
        child.kill_error = error
        intents.shared().set(child.pid, intent)
        return self.forker.kill(child.pid, signum, group=signum == signal.SIGKILL)

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

        A child already being stopped is left alone unless *again*.
        """
        if child.kill_error is not None and not again:
            return
        if term_timeout is None:
            self.signal_child(child, signal.SIGKILL, kill_error)
            return
        self.signal_child(child, signal.SIGTERM, term_error or kill_error, intent)
        child.timers.append(
            self.timers.call_later(term_timeout, self._escalate, child, kill_error)
        )

    def _escalate(self, child: Child, kill_error: BaseException) -> None:
        if child.pid in self.children:
            self.signal_child(child, signal.SIGKILL, kill_error)

    def terminate_job(self, pid: int, signum: int | None = None) -> None:
        """``revoke(terminate=True)``: signal that task's child, and only it."""
        signum = signum or signal.SIGTERM
        child = self.children.get(pid)
        # Celery's Request.terminate asks twice (pool and job): signal once.
        if child is not None and not isinstance(child.kill_error, Terminated):
            self.signal_child(child, signum, Terminated(-signum), intents.REVOKE)

    def cancel_job(self, job: Job, signum: int) -> None:
        if job in self.pending:
            self.pending.remove(job)
            self._finish(job, Terminated(-signum))
        elif job.pid is not None:
            self.terminate_job(job.pid, signum)

    # -- the loop's side -----------------------------------------------------

    def next_timeout(self) -> float | None:
        deadline = self.timers.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.clock())

    def poll(self, timeout: float | None = 0) -> None:
        """Handle whatever is ready: reports, exits, due timers."""
        registered = self.selector.get_map()
        for key, _ in self.selector.select(timeout):
            # An exit handled earlier in this batch may have closed this fd and
            # a new child reused its number: skip events for keys now gone.
            if registered.get(key.fd) is not key:
                continue
            handler, child = key.data
            handler(child)
        self.timers.fire_due()

    def _on_report(self, child: Child) -> None:
        fd = child.process.report_fd
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unregister(fd)
                return
            child.report += data

    def _on_exit(self, child: Child) -> None:
        code = self.forker.reap(child.pid)
        if code is None:
            if child.process.exit_fd is None:
                child.timers.append(
                    self.timers.call_later(EXIT_POLL_INTERVAL, self._on_exit, child)
                )
            return
        self._conclude(child, code)

    def _watch_exit_events(self) -> None:
        """Follow the fork server's socket; a lost server loses its children."""
        forker: Any = self.forker
        if not self._exit_events:
            return
        # Keyed by the server's pid too: a new server's socket may reuse the fd.
        current = (forker.events_fileno(), forker.pid) if forker.alive() else None
        if current == self._events_key:
            return
        if self._events_key is not None:
            self._unregister(self._events_key[0])
            self._events_key = None
            # The old server is gone, and its children with it (pdeathsig).
            for child in self.running():
                child.kill_error = child.kill_error or WorkerLostError(
                    "Worker exited prematurely: the fork server died and took the "
                    f"task's process with it. Job: {child.job.task_id}."
                )
                self._conclude(child, SERVER_LOST)
        if current is not None:
            self._unregister(current[0])  # a stale key for a reused fd number
            self.selector.register(current[0], selectors.EVENT_READ, (self._on_exit_events, None))
            self._events_key = current

    def _on_exit_events(self, _: Any) -> None:
        for pid, code in self.forker.read_exits():  # type: ignore[attr-defined]
            child = self.children.get(pid)
            if child is not None:
                self._conclude(child, code)
        self._watch_exit_events()

    def _conclude(self, child: Child, code: int) -> None:
        """The child is gone: collect its report and settle its job."""
        del self.children[child.pid]
        intents.shared().clear(child.pid)
        self._on_report(child)
        self._close(child)
        job = child.job
        if not job.finished:
            self._settle(job, protocol.decode_report(bytes(child.report)), child, code)
        self.on_job_done(job)
        self._maybe_restart_forker()
        self.fill_slots()

    def restart_forker(self) -> None:
        """``pool_restart``: a fresh fork server, once no child needs the old one."""
        self._restart_forker = hasattr(self.forker, "close")
        self._maybe_restart_forker()

    def _maybe_restart_forker(self) -> None:
        # Closing the old server ends its children (pdeathsig): wait for idle.
        if self._restart_forker and not self.children:
            self._restart_forker = False
            if self._events_key is not None:
                self._unregister(self._events_key[0])
                self._events_key = None
            self.forker.close()  # type: ignore[attr-defined]

    def _settle(self, job: Job, report: Any, child: Child, code: int) -> None:
        if report is not None and report[0] == protocol.OUTCOME:
            self.counts["reported"] += 1
            job.succeed(report[1])
        elif report is not None:
            self.counts["reported"] += 1
            job.fail_with(report[1])
        elif child.kill_error is not None:
            self.counts["killed"] += 1
            job.fail(child.kill_error)
        else:
            self.counts["lost"] += 1
            job.fail(worker_lost(code, job))

    def _finish(self, job: Job, error: BaseException) -> None:
        job.fail(error)
        self.on_job_done(job)

    def _close(self, child: Child) -> None:
        for timer in child.timers:
            timer.cancel()
        for fd in (child.process.report_fd, child.process.exit_fd):
            if fd is not None:
                self._unregister(fd)
                os.close(fd)

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)

    # -- sizing ----------------------------------------------------------------

    def resize(self, limit: int) -> None:
        """Change the number of slots; running children are never killed."""
        self.limit = max(1, limit)
        self.fill_slots()

    def close(self) -> None:
        close_forker = getattr(self.forker, "close", None)
        if close_forker is not None:
            close_forker()
        self.selector.close()


def resident_kb(pid: int) -> int | None:
    """A process's resident set size in kB, read from /proc (None if unknown)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * PAGE_KB


def worker_lost(code: int, job: Job) -> WorkerLostError:
    """The error Celery records for a child that died without reporting."""
    return WorkerLostError(
        f"Worker exited prematurely: {human_status(code)} Job: {job.task_id}."
    )
