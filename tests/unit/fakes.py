"""Test doubles for the supervisor: a hand-driven clock and a spawner that never forks.

The fake spawner speaks the real protocol (``spawning.py``): a request is
answered by a STARTED event and a child's death by an EXITED event, both
delivered through a real pipe the supervisor's real selector watches.  The
test decides when each happens (``auto_start=False`` holds STARTED back), so
every order of a child's start, report and exit can be played.  Each fake
child's report pipe is the real one the supervisor made: the test writes the
bytes a child would write.
"""

from __future__ import annotations

import errno
import itertools
import os
import selectors
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback

from celery_forkguard import intents, protocol
from celery_forkguard.jobs import Job
from celery_forkguard.spawning import EXITED, STARTED, Event
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
    """The test's side of one requested child: its token, pid and report pipe."""

    forker: FakeForker
    token: int
    pid: int
    job: Job
    slot: int
    report_w: Optional[int]
    started: bool = False
    exit_code: Optional[int] = None

    def write(self, data: bytes) -> None:
        assert self.report_w is not None, "the child has exited"
        view = memoryview(data)
        while view:
            view = view[os.write(self.report_w, view):]

    def report(self, kind: str, payload: Any) -> None:
        self.write(protocol.encode_report(kind, payload))

    def start(self) -> None:
        """The fork server says the child is forked (if auto_start did not already)."""
        if not self.started:
            self.started = True
            self.forker.send(Event(STARTED, self.token, self.pid))

    def exit(self, code: int) -> None:
        """Die with *code*: the report pipe closes and the server reports the exit."""
        self.close_report()
        self.reaped(code)

    def reaped(self, code: int) -> None:
        """Only the server's EXITED event (a grandchild may keep the pipe open)."""
        self.exit_code = code
        self.forker.send(Event(EXITED, self.pid, code))

    def close_report(self) -> None:
        if self.report_w is not None:
            os.close(self.report_w)
            self.report_w = None


@dataclass(eq=False)
class FakeForker:
    """Hands out fake children; records kills; fails forks when told to."""

    # Below any pid_max (often 32768): intents.py ignores pids beyond it.
    # Nothing is ever sent to these pids, so a clash with a real process is harmless.
    first_pid: int = 1000
    #: Answer every request with STARTED at once, as a quick fork server does.
    auto_start: bool = True
    spawned: list[FakeChild] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    #: errno values the next requests fail with (STARTED with minus the errno).
    fork_errors: list[int] = field(default_factory=list)
    spawn_attempts: int = 0
    pid: int = 1  # a "fork server" pid: the supervisor then watches zombies too
    renewable: bool = True
    gone: Optional[str] = None
    server_killed: bool = False
    closed: bool = False
    #: What freeze() finds: the pids the server really has (None: cannot tell).
    real_children: Optional[set[int]] = None

    def __post_init__(self) -> None:
        self._pids = itertools.count(self.first_pid)
        self._events: list[Event] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.by_pid: dict[int, FakeChild] = {}

    # -- the Spawner protocol -----------------------------------------------------

    def fileno(self) -> int:
        return self._wake_r

    def request(self, token: int, job: Job, report_fd: int, slot: int) -> None:
        self.spawn_attempts += 1
        if self.fork_errors:
            os.close(report_fd)
            self.send(Event(STARTED, token, -self.fork_errors.pop(0)))
            return
        child = FakeChild(self, token, next(self._pids), job, slot, report_fd)
        self.spawned.append(child)
        self.by_pid[child.pid] = child
        if self.auto_start:
            child.start()

    def events(self) -> list[Event]:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        events, self._events = self._events, []
        return events

    def wait(self, timeout: float) -> bool:
        return bool(self._events)

    def wants_write(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def kill(self, pid: int, signum: int, group: bool = False) -> bool:
        self.kills.append(Kill(pid, signum, group))
        return True

    def freeze(self) -> Optional[set[int]]:
        return self.real_children

    def kill_server(self) -> None:
        self.server_killed = True

    def reap_server(self, block: bool = False) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    # -- the test's side ---------------------------------------------------------------

    def send(self, event: Event) -> None:
        self._events.append(event)
        os.write(self._wake_w, b"x")

    def die(self) -> None:
        """The server exits: the supervisor reads EOF next time it looks."""
        self.gone = "exited"
        os.write(self._wake_w, b"x")

    def child(self, job: Job) -> FakeChild:
        (found,) = [c for c in self.spawned if c.job is job]
        return found

    def dispose(self) -> None:
        for child in self.spawned:
            child.close_report()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


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
        #: Every fake server made, the first one included (pool_restart makes more).
        self.forkers = [forker]
        self.clock = clock
        self.done: list[Job] = []
        self.supervisor = Supervisor(
            self._make_spawner,  # type: ignore[arg-type]  # duck-typed Spawner
            limit, clock=clock, on_job_done=self.done.append,
            selector=selectors.DefaultSelector(), spawn_timeout=10.0,
        )

    def _make_spawner(self) -> FakeForker:
        """The given fake first; a fresh one for each replacement after it."""
        if self.forker.spawn_attempts or self.forker.closed or len(self.forkers) > 1:
            fresh = FakeForker(first_pid=self.forkers[-1].first_pid + 1000,
                               auto_start=self.forker.auto_start)
            self.forkers.append(fresh)
            return fresh
        return self.forker

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
        for forker in reversed(self.forkers):
            found = [c for c in forker.spawned if c.job is probe.job]
            if found:
                return found[-1]
        raise AssertionError(f"no child was requested for {probe.job!r}")

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
        # Report pipes of children the supervisor never settled are its to close.
        for child in self.supervisor.claimed():
            os.close(child.report_fd)
        self.supervisor.close()
        for forker in self.forkers:
            forker.dispose()
            # The intents table is process-wide: leave no fake pid marked for real children.
            for fake in forker.spawned:
                intents.shared().clear(fake.pid)
