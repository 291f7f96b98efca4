"""One child's life as the worker sees it: a small state machine, no I/O.

A task's child goes ``requested -> running -> (reported) -> exited ->
settled``.  The three things the worker learns about it (the fork server
says it started, its report arrives on its pipe, the fork server says it
exited) come through different fds and can be read in any order and by any
call: reading only *records* them here; the supervisor then asks what each
child is ready for (accept, settle) in one place.  Nothing read is ever set
aside where the loop does not look.

A child whose whole report is in is settled at once, before its exit is
heard ("settle on report"): its task has ended, so its slot goes to the next
task while it runs its shutdown hooks and exits.  It lingers, settled, until
its exit is known.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

from celery_forkguard import protocol
from celery_forkguard.jobs import Job
from celery_forkguard.timers import Timer


class State(enum.Enum):
    REQUESTED = "requested"  # asked for; no pid yet
    RUNNING = "running"  # forked: pid known
    REPORTED = "reported"  # its whole report is in, or its report pipe reached EOF
    EXITED = "exited"  # its exit status is known
    SETTLED = "settled"  # the job has its outcome; the slot is free


class Child:
    """A slot's occupant: one job, and what is known of the process running it."""

    __slots__ = (
        "accepted", "asked_at", "cpu", "eof_at", "exit_code", "job", "kill_error",
        "lost_code", "maxrss_kib", "pending_stop", "pid",
        "report", "report_eof", "report_fd", "report_whole", "settled", "slot", "spawner",
        "timers", "token",
    )

    def __init__(
        self, token: int, job: Job, report_fd: int, spawner: Any, slot: int, asked_at: float,
    ) -> None:
        self.token = token
        self.job = job
        self.report_fd = report_fd
        #: The fork server (or forker) that was asked for this child.
        self.spawner = spawner
        #: 1..limit: the child's ``ForkPoolWorker-N`` number, as prefork's.
        self.slot = slot
        self.pid: Optional[int] = None
        #: When it was asked for, and when its report pipe closed (the clock's time).
        self.asked_at = asked_at
        self.eof_at: Optional[float] = None
        self.report = bytearray()
        #: Every byte of its report is in (the child may not have exited yet).
        self.report_whole = False
        self.report_eof = False
        self.exit_code: Optional[int] = None
        #: What its process used, once reaped (0 when the exit came otherwise).
        self.cpu = 0.0
        self.maxrss_kib = 0
        self.accepted = False
        self.settled = False
        self.timers: list[Timer] = []
        #: What the task is recorded with if the child dies without a report.
        self.kill_error: Optional[BaseException] = None
        #: A stop asked for before the pid was known: applied once it is.
        self.pending_stop: Optional[dict[str, Any]] = None
        #: Set when its fork server was lost: the exit code to record once
        #: the report pipe closes (nothing holding it, the child included, lives).
        self.lost_code: Optional[int] = None

    def __repr__(self) -> str:
        return f"<Child {self.job.task_name}[{self.job.task_id}] {self.state.value} pid={self.pid}>"

    @property
    def state(self) -> State:
        if self.settled:
            return State.SETTLED
        if self.exit_code is not None:
            return State.EXITED
        if self.pid is None:
            return State.REQUESTED
        return State.REPORTED if self.report_whole or self.report_eof else State.RUNNING

    def describe(self, now: float) -> dict[str, Any]:
        """What ``inspect stats`` and ``forkguard_status`` show of a running child."""
        job = self.job
        return {
            "pid": self.pid,
            "task_id": job.task_id,
            "name": job.task_name,
            "runtime": round(now - (job.started or now), 3),
            "started": job.started_wall,
            "state": self.state.value,
        }

    # -- what the worker learns (record only) ----------------------------------------

    def started(self, pid: int) -> None:
        if self.pid is None:
            self.pid = pid

    def report_data(self, data: bytes) -> None:
        self.report += data
        if not self.report_whole:
            self.report_whole = protocol.is_whole(self.report)

    def report_closed(self, now: float) -> None:
        if not self.report_eof:
            self.report_eof, self.eof_at = True, now
        if self.lost_code is not None:
            self.exited(self.lost_code)

    def spawner_lost(self, code: int) -> None:
        """Its fork server is dead: it has exited once its report pipe is closed."""
        self.lost_code = code
        if self.report_eof:
            self.exited(code)

    def exited(self, code: int, cpu: float = 0.0, maxrss_kib: int = 0) -> None:
        if self.exit_code is None:
            self.exit_code, self.cpu, self.maxrss_kib = code, cpu, maxrss_kib

    # -- what the supervisor asks -------------------------------------------------------

    def ready_to_accept(self) -> bool:
        """Forked and not yet announced to Celery."""
        return self.pid is not None and not self.accepted and not self.settled

    def ready_to_settle(self) -> bool:
        """Its task has ended: its whole report is in, or its process is gone.

        A report is only acted on once the child was accepted (its pid known),
        so Celery always hears that a task started before how it ended.
        """
        if self.settled:
            return False
        return self.exit_code is not None or (self.report_whole and self.accepted)

    def lingering(self) -> bool:
        """Settled on its report while its process is still exiting."""
        return self.settled and self.pid is not None and self.exit_code is None
