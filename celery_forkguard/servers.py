"""The supervisor's fork servers: starting, watching, replacing, retiring them.

A mixin of :class:`~celery_forkguard.supervisor.Supervisor`.  A fork server's
health is read from what the supervisor already waits for: a request left
unanswered, a dead child left unreaped, end-of-file on its socket.  A lost
server is stopped for certain (SIGSTOP, its children SIGKILLed by group, then
itself) before any of its tasks is recorded, so no task runs as two copies;
requests it never forked go to a new server.  ``pool_restart`` starts a new
server at once and retires the old one with its last child.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import signal
from collections import Counter, deque
from typing import Callable

from celery.utils.log import get_logger

from celery_forkguard import outcomes
from celery_forkguard.exceptions import ForkError
from celery_forkguard.forkserver_client import process_state
from celery_forkguard.jobs import Job
from celery_forkguard.lifecycle import Child
from celery_forkguard.spawning import Event, Spawner
from celery_forkguard.timers import Timer, TimerHeap

logger = get_logger(__name__)

#: Exit code recorded for children whose fork server was lost.
SERVER_LOST = 255
#: How long a lost server's children may take to close their report pipes.
LOST_GRACE = 5.0
REAP_INTERVAL = 0.01
#: How often children are looked for when the platform has no pidfds.
EXIT_POLL_INTERVAL = 0.01
#: The watchdog looks this many times per forkguard_fork_server_timeout.
WATCH_TICKS = 4


class ServerCare:
    """Fork servers for the supervisor: one current, and those still retiring."""

    children: dict[int, Child]
    lingering: dict[tuple[int, int], Child]
    pending: deque[Job]
    timers: TimerHeap
    counts: Counter[str]
    selector: selectors.BaseSelector
    spawn_timeout: float
    make_spawner: Callable[[], Spawner]
    spawner: Spawner | None
    _again: bool
    _early_exits: dict[tuple[int, int], Event]
    _spawner_masks: dict[Spawner, int]
    _watchdog: Timer | None
    clock: Callable[[], float]

    # Provided by the Supervisor.
    def _on_spawner_io(self, spawner: Spawner, mask: int) -> None:
        raise NotImplementedError

    def _take_events(self, spawner: Spawner) -> None:
        raise NotImplementedError

    def _release(self, child: Child) -> None:
        raise NotImplementedError

    def _note_fork_shortage(self, code: int, why: str) -> None:
        raise NotImplementedError

    def _forget_lingering(self, child: Child) -> None:
        raise NotImplementedError

    # -- starting and watching --------------------------------------------------------------

    def _new_spawner(self) -> Spawner | None:
        try:
            spawner = self.make_spawner()
        except (OSError, ForkError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            self._note_fork_shortage(getattr(cause, "errno", None) or errno.EAGAIN, str(exc))
            return None
        return self._watch_new_spawner(spawner)

    def _watch_new_spawner(self, spawner: Spawner) -> Spawner:
        fd = spawner.fileno()
        if fd is not None:
            self._spawner_masks[spawner] = selectors.EVENT_READ
            self.selector.register(fd, selectors.EVENT_READ, (self._on_spawner_io, spawner))
        else:
            self._spawner_masks[spawner] = 0
        self.spawner = spawner
        return spawner

    def _watch_spawner(self, spawner: Spawner) -> None:
        """Watch its fd for writing too while requests wait to be written."""
        fd = spawner.fileno()
        if fd is None:
            self._poll_when_first_child(spawner)
            return
        if spawner not in self._spawner_masks:
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if spawner.wants_write() else 0)
        if self._spawner_masks[spawner] != mask:
            self._spawner_masks[spawner] = mask
            self.selector.modify(fd, mask, (self._on_spawner_io, spawner))

    def _poll_when_first_child(self, spawner: Spawner) -> None:
        if sum(child.spawner is spawner for child in self.children.values()) == 1:
            self.timers.call_later(EXIT_POLL_INTERVAL, self._poll_spawner, spawner)

    def _poll_spawner(self, spawner: Spawner) -> None:
        """For a spawner with no fd to watch (no pidfds): look for exits on a timer."""
        self._take_events(spawner)
        if any(child.spawner is spawner for child in self.children.values()):
            self.timers.call_later(EXIT_POLL_INTERVAL, self._poll_spawner, spawner)

    # -- servers that stop answering, die, or retire -----------------------------------------

    def _arm_watchdog(self, after: float | None = None) -> None:
        """One timer while there are children, not one per child: cheap on the hot path."""
        if self._watchdog is None and (self.children or self.lingering):
            start = self.clock() if after is None else after
            self._watchdog = self.timers.call_at(
                start + self.spawn_timeout / WATCH_TICKS, self._watch_servers
            )

    def _watch_servers(self) -> None:
        """Find fork servers that leave a request unanswered or a dead child unreaped."""
        assert self._watchdog is not None
        ticked, self._watchdog = self._watchdog.deadline, None
        now = self.clock()
        for child in [*self.children.values(), *self.lingering.values()]:
            why = self._overdue(child, now)
            if why and child.spawner in self._spawner_masks:
                self._spawner_lost(child.spawner, why)
        self._arm_watchdog(after=ticked)  # on a fixed grid: no drift

    def _overdue(self, child: Child, now: float) -> str | None:
        if child.exit_code is not None or (child.settled and not child.lingering()):
            return None
        timeout = self.spawn_timeout
        if child.pid is None and now - child.asked_at >= timeout:
            return f"did not answer a request within {timeout:g}s"
        # The report pipe closed, no exit heard: if the child is a zombie the
        # server is not reaping (if it lives, the task closed the pipe itself).
        if (child.pid is not None and child.eof_at is not None and child.spawner.pid
                and now - child.eof_at >= timeout and is_zombie(child.pid)):
            return f"did not report the exit of pid {child.pid} within {timeout:g}s"
        return None

    def _spawner_lost(self, spawner: Spawner, why: str) -> None:
        """Stop a lost fork server for certain before its tasks are recorded.

        The server is stopped first, so the children it forked cannot change;
        requests it never forked go back to the queue for the next server.
        The children are SIGKILLed with their process groups (their pids are
        still pinned: the server has not reaped them), then the server.
        Each child is settled once the server is reaped and the child's
        report pipe is closed, so no task of it can still be running when
        Celery is told it was lost, and requeueing it never makes two copies.
        """
        mine = [c for c in self.children.values() if c.spawner is spawner]
        exiting = [c for c in self.lingering.values() if c.spawner is spawner]
        retry = self._never_forked(spawner, mine + exiting)
        victims = [c for c in mine if c not in retry]
        logger.error(
            "forkguard: the fork server (pid %s) %s; killing it and %d task process(es) "
            "with it, then recording their tasks as lost; %d request(s) it never forked "
            "go to a new server", spawner.pid, why, len(victims), len(retry),
        )
        self.counts["fork_server_lost"] += 1
        for child in reversed(retry):
            self._release(child)
            self.pending.appendleft(child.job)
        for child in victims + exiting:
            if child.pid is not None and child.exit_code is None:
                spawner.kill(child.pid, signal.SIGKILL, group=True)
            child.kill_error = child.kill_error or outcomes.server_lost(why, child.job)
        spawner.kill_server()
        self._forget_spawner(spawner)
        self._reap_lost(spawner, victims)

    @staticmethod
    def _never_forked(spawner: Spawner, mine: list[Child]) -> list[Child]:
        """Requests of *spawner* that certainly have no process (empty if unsure)."""
        children = spawner.freeze()
        announced = {child.pid for child in mine if child.pid is not None}
        if children is None or not children <= announced:
            return []  # a child we were not told of may run any of them
        return [child for child in mine if child.pid is None]

    def _reap_lost(self, spawner: Spawner, victims: list[Child]) -> None:
        if not spawner.reap_server():
            self.timers.call_later(REAP_INTERVAL, self._reap_lost, spawner, victims)
            return
        for child in victims:
            if not child.settled:
                child.spawner_lost(SERVER_LOST)
                child.timers.append(self.timers.call_later(LOST_GRACE, self._force_lost, child))
        self._again = True

    def _force_lost(self, child: Child) -> None:
        if not child.settled and child.exit_code is None:
            logger.warning(
                "forkguard: a process outside the task's group still holds the report pipe "
                "of %r; recording the task as lost", child.job,
            )
            child.exited(SERVER_LOST)

    def _forget_spawner(self, spawner: Spawner) -> None:
        # Its children still exiting after their report die with it, unheard.
        for child in [c for c in self.lingering.values() if c.spawner is spawner]:
            self._forget_lingering(child)
        fd = spawner.fileno()
        if fd is not None:
            self._unregister(fd)
        self._spawner_masks.pop(spawner, None)
        self._early_exits = {
            key: event for key, event in self._early_exits.items() if key[0] != id(spawner)
        }
        spawner.close()
        if spawner is self.spawner:
            self.spawner = None

    def restart_spawner(self) -> None:
        """``pool_restart``: new children fork from a fresh server at once.

        The old server serves its running children until the last one ends.
        """
        if self.spawner is not None and not self.spawner.renewable:
            return  # forking from the worker itself: it sees the reload already
        self.spawner = None
        self._new_spawner()
        self._retire_idle_spawners()

    def _retire_idle_spawners(self) -> None:
        in_use = {child.spawner for child in self.children.values()}
        in_use.update(child.spawner for child in self.lingering.values())
        for spawner in list(self._spawner_masks):
            if spawner is not self.spawner and spawner not in in_use:
                self._forget_spawner(spawner)
                self._reap_retired(spawner)

    def _reap_retired(self, spawner: Spawner) -> None:
        if not spawner.reap_server():
            self.timers.call_later(REAP_INTERVAL, self._reap_retired, spawner)

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)


def is_zombie(pid: int) -> bool:
    """Whether *pid* has exited but not been reaped (Linux /proc; False if unknown)."""
    return process_state(pid) == b"Z"
