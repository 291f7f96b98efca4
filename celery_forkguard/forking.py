"""The worker forks each child itself (``forkguard_fork_server = False``).

``fork()`` then runs in the worker's loop; exits are watched through one
pidfd per child, gathered in an epoll set whose fd is the one the
supervisor watches (Linux 5.3+), or polled on a timer elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, NoReturn, Optional

from celery_forkguard import fasthooks
from celery_forkguard.spawning import EXITED, STARTED, Event

if TYPE_CHECKING:
    from celery_forkguard.jobs import Job

ChildMain = Callable[["Job", int, Any], NoReturn]

#: What ``reap`` returns when the exit status was taken by someone else.
UNKNOWN_EXIT = 255

_pidfd_open: Optional[Callable[[int], int]] = getattr(os, "pidfd_open", None)


class Forker:
    """Forks children with every signal blocked across the fork.

    A signal that arrives while ``fork()`` runs stays pending instead of
    running the master's handler in the child; the master unblocks right
    after, and so does the child once its own handlers are in place.
    """

    pid = 0
    renewable = False
    gone: Optional[str] = None

    def __init__(self, child_main: ChildMain) -> None:
        self.child_main = child_main
        self._events: list[Event] = []
        self._children: dict[int, Optional[int]] = {}  # pid -> pidfd
        self._epoll = select.epoll() if _pidfd_open is not None else None

    def fileno(self) -> Optional[int]:
        return self._epoll.fileno() if self._epoll is not None else None

    def request(self, token: int, job: Job, report_fd: int, slot: int) -> None:
        job.slot = slot
        try:
            pid = self._fork(job, report_fd)
        except OSError as exc:
            self._events.append(Event(STARTED, token, -(exc.errno or 1)))
            return
        finally:
            os.close(report_fd)
        self._children[pid] = pidfd = _open_pidfd(pid)
        if pidfd is not None and self._epoll is not None:
            self._epoll.register(pidfd, select.EPOLLIN)
        self._events.append(Event(STARTED, token, pid))

    def _fork(self, job: Job, report_fd: int) -> int:
        return fork_with_signals_blocked(lambda mask: self.child_main(job, report_fd, mask))

    def events(self) -> list[Event]:
        for pid in self._exited_pids():
            reaped = reap(pid)
            if reaped is not None:
                pidfd = self._children.pop(pid)
                if pidfd is not None:
                    self._unwatch(pidfd)
                self._events.append(exit_event(reaped))
        events, self._events = self._events, []
        return events

    def _exited_pids(self) -> list[int]:
        if self._epoll is None:
            return list(self._children)  # no pidfds: try each one
        ready = {fd for fd, _ in self._epoll.poll(0)}
        return [pid for pid, pidfd in self._children.items() if pidfd is None or pidfd in ready]

    def _unwatch(self, pidfd: int) -> None:
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(pidfd)
        os.close(pidfd)

    def wait(self, timeout: float) -> bool:
        return bool(self._events)  # a fork here answers at once

    def wants_write(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def kill(self, pid: int, signum: int, group: bool = False) -> bool:
        return signal_process(pid, signum, group)

    def freeze(self) -> Optional[set[int]]:
        return None

    def kill_server(self) -> None:
        pass

    def reap_server(self, block: bool = False) -> bool:
        return True

    def close(self) -> None:
        for pidfd in self._children.values():
            if pidfd is not None:
                self._unwatch(pidfd)
        self._children.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


class Reaped(NamedTuple):
    """A child that exited: its wait status and what it used (``wait4``'s rusage)."""

    pid: int
    status: int
    cpu: float = 0.0  # user + system seconds
    maxrss_kib: int = 0  # peak resident set size


def reap(pid: int) -> Reaped | None:
    """The child's exit (UNKNOWN_EXIT if someone else reaped it), or None if it runs."""
    try:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
    except ChildProcessError:
        # Reaped elsewhere (a handler of the user's?): the status is gone.
        return Reaped(pid, UNKNOWN_EXIT << 8)
    if wpid == 0:
        return None
    return _reaped(wpid, status, usage)


def reaped_children() -> Iterator[Reaped]:
    """Every child that has exited, without blocking."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield _reaped(pid, status, usage)


def exit_event(reaped: Reaped) -> Event:
    """The ``EXITED`` event for a reaped child."""
    return Event(EXITED, reaped.pid, os.waitstatus_to_exitcode(reaped.status),
                 reaped.cpu, reaped.maxrss_kib)


def _reaped(pid: int, status: int, usage: Any) -> Reaped:
    return Reaped(pid, status, usage.ru_utime + usage.ru_stime, int(usage.ru_maxrss))


def signal_process(pid: int, signum: int, group: bool = False) -> bool:
    """Send *signum* to a child (or its whole process group)."""
    if group:
        try:
            os.killpg(pid, signum)
            return True
        except OSError:
            pass  # not yet its own group leader: signal the child alone
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def _open_pidfd(pid: int) -> int | None:
    if _pidfd_open is None:
        return None
    try:
        return _pidfd_open(pid)
    except OSError:
        return None


def fork_with_signals_blocked(run_child: Callable[[Any], object], crash_code: int = 71) -> int:
    """``fork()``; the child runs ``run_child(saved_mask)`` and leaves through ``os._exit``.

    Every signal is blocked across the fork: one that arrives meanwhile stays
    pending in the parent instead of running the parent's handler in the
    child.  The parent restores its mask at once; the child gets the mask to
    restore once its own handlers are in place.  Stdio is flushed first, or
    buffered output would be written by both.
    """
    flush_stdio()
    saved_mask = fasthooks.block_all_signals()
    try:
        pid = os.fork()
    except BaseException:
        fasthooks.restore_signal_mask(saved_mask)
        raise
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            run_child(saved_mask)
        finally:
            os._exit(crash_code)
    fasthooks.restore_signal_mask(saved_mask)
    return pid


def flush_stdio() -> None:
    # Buffered output would otherwise be written twice: by master and child.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
