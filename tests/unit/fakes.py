"""Test doubles for the supervisor: a hand-driven clock and a forker that never forks.

Each fake child is backed by two real pipes, so the supervisor's real selector
sees real readiness: the report pipe carries the bytes a child would write, and
a second pipe stands in for the pidfd (one byte written to it makes the
"child exited" event readable, as the kernel does for a pidfd).
"""

from __future__ import annotations

import errno
import itertools
import os
import selectors
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback

from celery_forkguard import intents, protocol
from celery_forkguard.forking import ChildProcess
from celery_forkguard.jobs import Job
from celery_forkguard.supervisor import Supervisor


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Kill(NamedTuple):
    pid: int
    signum: int
    group: bool


@dataclass
class FakeChild:
    """The test's side of one spawned child: the write ends of its two pipes."""

    pid: int
    job: Job
    report_w: int | None
    exit_w: int | None
    exit_code: int | None = None  # None: still running, reap() says so

    def write(self, data: bytes) -> None:
        assert self.report_w is not None, "the child has exited"
        view = memoryview(data)
        while view:
            view = view[os.write(self.report_w, view):]

    def report(self, kind: str, payload: Any) -> None:
        self.write(protocol.encode_report(kind, payload))

    def exit(self, code: int) -> None:
        """Die with *code*: the report pipe hits EOF and the exit fd turns readable."""
        self.exit_code = code
        self.close_report()
        assert self.exit_w is not None
        os.write(self.exit_w, b"x")
        os.close(self.exit_w)
        self.exit_w = None

    def close_report(self) -> None:
        if self.report_w is not None:
            os.close(self.report_w)
            self.report_w = None


@dataclass
class FakeForker:
    """Hands out fake children; records kills; fails forks when told to."""

    # Below any pid_max (often 32768): intents.py ignores pids beyond it.
    # Nothing is ever sent to these pids, so a clash with a real process is harmless.
    first_pid: int = 1000
    spawned: list[FakeChild] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    #: Raised by the next spawn() calls, one per call, before any child is made.
    fork_errors: list[OSError] = field(default_factory=list)
    spawn_attempts: int = 0

    def __post_init__(self) -> None:
        self._pids = itertools.count(self.first_pid)
        self.by_pid: dict[int, FakeChild] = {}

    def spawn(self, job: Job) -> ChildProcess:
        self.spawn_attempts += 1
        if self.fork_errors:
            raise self.fork_errors.pop(0)
        report_r, report_w = os.pipe()
        exit_r, exit_w = os.pipe()
        # The real Forker makes the report end non-blocking; the supervisor relies on it.
        os.set_blocking(report_r, False)
        os.set_blocking(exit_r, False)
        child = FakeChild(next(self._pids), job, report_w, exit_w)
        self.spawned.append(child)
        self.by_pid[child.pid] = child
        return ChildProcess(child.pid, report_r, exit_r)

    def reap(self, pid: int) -> int | None:
        return self.by_pid[pid].exit_code

    def kill(self, pid: int, signum: int, group: bool = False) -> bool:
        self.kills.append(Kill(pid, signum, group))
        return True

    def child(self, job: Job) -> FakeChild:
        (found,) = [c for c in self.spawned if c.job is job]
        return found

    def close(self) -> None:
        for child in self.spawned:
            child.close_report()
            if child.exit_w is not None:
                os.close(child.exit_w)
                child.exit_w = None


def fork_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


EAGAIN = errno.EAGAIN


class Probe:
    """A Job whose Celery callbacks record what the supervisor told them."""

    def __init__(
        self,
        task_id: str,
        *,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        **callbacks: Any,
    ) -> None:
        self.accepted: list[tuple[int, float]] = []
        self.successes: list[Any] = []
        self.errors: list[ExceptionInfo] = []
        self.timeouts: list[tuple[bool, float | None]] = []
        options: dict[str, Any] = {
            "callback": self.successes.append,
            "error_callback": self.errors.append,
            "accept_callback": lambda pid, now: self.accepted.append((pid, now)),
            "timeout_callback": lambda soft, timeout: self.timeouts.append((soft, timeout)),
        }
        options.update(callbacks)
        self.job = Job(
            _not_run_by_fakes, ("tests.fake", task_id), {},
            soft_timeout=soft_timeout, timeout=timeout, correlation_id=task_id,
            **options,
        )

    @property
    def outcomes(self) -> int:
        return len(self.successes) + len(self.errors)

    def error(self) -> BaseException:
        """The one exception recorded for this job."""
        assert not self.successes, self.successes
        (einfo,) = self.errors
        return unwrap(einfo)


def unwrap(einfo: ExceptionInfo) -> BaseException:
    """The exception Celery sees: ``Request.on_failure`` unwraps billiard's wrapper."""
    exc = einfo.exception
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _not_run_by_fakes(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("fake children never run the target")


class Harness:
    """A Supervisor wired to the fakes, plus the list of jobs it said were done."""

    def __init__(self, forker: FakeForker, clock: FakeClock, limit: int) -> None:
        self.forker = forker
        self.clock = clock
        self.done: list[Job] = []
        self.supervisor = Supervisor(
            forker,  # type: ignore[arg-type]  # duck-typed: spawn, reap, kill
            limit, clock=clock, on_job_done=self.done.append,
            selector=selectors.DefaultSelector(),
        )

    def submit(self, *probes: Probe) -> None:
        for probe in probes:
            self.supervisor.submit(probe.job)

    def poll(self) -> None:
        self.supervisor.poll(0)

    def advance(self, seconds: float) -> None:
        """Move the fake clock, then let the supervisor fire what became due."""
        self.clock.advance(seconds)
        self.poll()

    def child(self, probe: Probe) -> FakeChild:
        return self.forker.child(probe.job)

    def finish(self, probe: Probe, code: int = 0, report: tuple[str, Any] | None = None) -> None:
        """The probe's child optionally reports, then exits; the supervisor notices."""
        child = self.child(probe)
        if report is not None:
            child.report(*report)
        child.exit(code)
        self.poll()

    def running_jobs(self) -> list[Job]:
        return [child.job for child in self.supervisor.running()]

    def pending_jobs(self) -> list[Job]:
        return list(self.supervisor.pending)

    def close(self) -> None:
        # Read ends of children the supervisor never concluded are ours to close.
        for child in self.supervisor.running():
            for fd in (child.process.report_fd, child.process.exit_fd):
                if fd is not None:
                    os.close(fd)
        self.supervisor.close()
        self.forker.close()
        # The intents table is process-wide: leave no fake pid marked for real children.
        for fake in self.forker.spawned:
            intents.shared().clear(fake.pid)
