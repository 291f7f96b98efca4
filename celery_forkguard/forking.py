"""Fork a child for one job, and reap it, without ever blocking the master."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, Protocol

from celery_forkguard import fasthooks

if TYPE_CHECKING:
    from celery_forkguard.jobs import Job

ChildMain = Callable[["Job", int, Any], NoReturn]

#: What ``reap`` returns when the exit status was taken by someone else.
UNKNOWN_EXIT = 255

_pidfd_open: Optional[Callable[[int], int]] = getattr(os, "pidfd_open", None)


@dataclass
class ChildProcess:
    """The master's view of one forked child."""

    pid: int
    report_fd: int
    exit_fd: int | None  # a pidfd: readable once the child has exited


class Spawner(Protocol):
    """What the supervisor needs of whatever forks its children."""

    def spawn(self, job: Job) -> ChildProcess: ...

    def reap(self, pid: int) -> int | None: ...

    def kill(self, pid: int, signum: int, group: bool = False) -> bool: ...


class Forker:
    """Forks children with every signal blocked across the fork.

    A signal that arrives while ``fork()`` runs stays pending instead of
    running the master's handler in the child; the master unblocks right
    after, and so does the child once its own handlers are in place.
    """

    def __init__(self, child_main: ChildMain) -> None:
        self.child_main = child_main

    def spawn(self, job: Job) -> ChildProcess:
        read_fd, write_fd = os.pipe()  # both ends close-on-exec (PEP 446)
        flush_stdio()
        saved_mask = fasthooks.block_all_signals()
        try:
            pid = os.fork()
        except BaseException:
            fasthooks.restore_signal_mask(saved_mask)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(read_fd)
                self.child_main(job, write_fd, saved_mask)
            finally:
                os._exit(71)
        fasthooks.restore_signal_mask(saved_mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        return ChildProcess(pid, read_fd, _open_exit_fd(pid))

    @staticmethod
    def reap(pid: int) -> int | None:
        """The child's exit code (negative for a signal), or None if it still runs."""
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped elsewhere (a handler of the user's?): the status is gone.
            return UNKNOWN_EXIT
        if wpid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    @staticmethod
    def kill(pid: int, signum: int, group: bool = False) -> bool:
        """Send *signum* to the child (or its whole process group)."""
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


def _open_exit_fd(pid: int) -> int | None:
    if _pidfd_open is None:
        return None
    try:
        return _pidfd_open(pid)
    except OSError:
        return None


def flush_stdio() -> None:
    # Buffered output would otherwise be written twice: by master and child.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
