"""Why the master signals a child, told through a page of shared memory.

A SIGTERM from ``revoke(terminate=True)`` must end the task as Celery's
prefork does (the child dies, the task is REVOKED); a SIGTERM from USR1 or a
``term_child`` shutdown must raise :class:`TermException` in the task, with a
message that says why, so it can clean up.  A signal carries no payload a
Python handler can read, so the master writes its intent into an anonymous
shared mapping, indexed by pid, before it sends the signal; the child's
handler reads it.  The mapping is created before the first fork and only the
pages of pids in use are ever touched.
"""

from __future__ import annotations

import ctypes
import mmap

from celery_forkguard import fasthooks

NONE = 0
REVOKE = 1  # revoke(terminate=True): die of the signal
KILL_USR1 = 2  # USR1 with term_child
KILL_REMOTE = 3  # forkguard_kill with term_child
SHUTDOWN = 4  # term_child shutdown, task acked early: record TermException
SHUTDOWN_REQUEUE = 5  # term_child shutdown, acks_late task: requeue

REASONS = {
    NONE: "task interrupted by SIGTERM",
    KILL_USR1: "task killed by USR1 on the worker (SIGTERM)",
    KILL_REMOTE: "task killed by forkguard_kill (SIGTERM)",
    SHUTDOWN: "worker shutting down: task interrupted by SIGTERM",
    SHUTDOWN_REQUEUE: "worker shutting down: task interrupted by SIGTERM, requeued",
}


def _pid_limit() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read().strip()) + 1
    except (OSError, ValueError):
        return 1 << 17


class Intents:
    """One byte per pid, shared by the master and all its children."""

    def __init__(self, size: int | None = None) -> None:
        self._size = size or _pid_limit()
        self._map = mmap.mmap(-1, self._size)
        # Taken once, in the master; this export keeps the map open for good.
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._read_only = False

    def set(self, pid: int, intent: int) -> None:
        if self._read_only:
            raise PermissionError("only the worker writes forkguard's intents")
        if 0 < pid < self._size:
            self._map[pid] = intent

    def make_read_only(self) -> None:
        """In a child: the table can be read, and a stray write faults."""
        self._read_only = True
        fasthooks.protect_read_only(self._address, self._size)

    def get(self, pid: int) -> int:
        return self._map[pid] if 0 < pid < self._size else NONE

    def clear(self, pid: int) -> None:
        self.set(pid, NONE)


_intents: Intents | None = None


def shared() -> Intents:
    """The process-wide table; created in the master before the first fork."""
    global _intents
    if _intents is None:
        _intents = Intents()
    return _intents
