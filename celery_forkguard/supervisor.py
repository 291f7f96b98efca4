"""The pool's bookkeeping: slots, the queue, and every child's way to its outcome.

Single-threaded and loop-agnostic: a driver (``drivers.py``) calls
:meth:`Supervisor.poll` when the supervisor's selector is readable or a timer
is due.  Nothing here blocks on a child.  Reading (a report pipe, the fork
server's socket) only *records* what happened on the child's state machine
(``lifecycle.py``); :meth:`Supervisor.advance` then accepts, settles and
refills in one place, whatever call read the events and in whatever order
they came.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import time
from collections import Counter, deque
from typing import Callable

from billiard.exceptions import Terminated
from celery.utils.log import get_logger
from kombu.exceptions import EncodeError

from celery_forkguard import intents, outcomes, protocol
from celery_forkguard.jobs import Job
from celery_forkguard.kills import Kills
from celery_forkguard.lifecycle import Child
from celery_forkguard.metrics import PoolMetrics, kill_reason
from celery_forkguard.oom import OomWatch
from celery_forkguard.servers import ServerCare, is_zombie
from celery_forkguard.spawning import EXITED, STARTED, Event, Spawner
from celery_forkguard.timers import Timer, TimerHeap

logger = get_logger(__name__)

READ_CHUNK = 65536
#: How long the loop waits, right after asking, for the fork server to say a
#: child started: a fork takes a few ms, and answering in the same wake-up
#: saves the loop one.  Past it the answer is read whenever it comes.
START_WAIT = 0.05
#: Default for how long a fork server may leave a request unanswered.
SPAWN_TIMEOUT = 10.0
#: Back-off between attempts to fork when the system refuses (EAGAIN, ENOMEM).
FORK_RETRY_FIRST, FORK_RETRY_MAX = 0.1, 5.0
#: How often a fork shortage is logged again while it lasts.
FORK_SHORTAGE_LOG_EVERY = 30.0
#: How long a child settled on its report may take to exit (its
#: worker_process_shutdown handlers) before it is killed, and how long its
#: exit may then go unheard before it is forgotten.
EXIT_GRACE = 10.0


class Supervisor(Kills, ServerCare):
    """Starts at most ``limit`` children and turns each one's end into an outcome."""

    def __init__(
        self,
        make_spawner: Callable[[], Spawner],
        limit: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_job_done: Callable[[Job], None] | None = None,
        selector: selectors.BaseSelector | None = None,
        spawn_timeout: float = SPAWN_TIMEOUT,
    ) -> None:
        self.make_spawner = make_spawner
        self.limit = max(1, limit)
        self.clock = clock
        self.timers = TimerHeap(clock)
        self.selector = selector or selectors.DefaultSelector()
        self.spawn_timeout = spawn_timeout
        #: Slot occupants by request token, from request to settlement.
        self.children: dict[int, Child] = {}
        #: Children settled on their report whose exit is not known yet.
        self.lingering: dict[tuple[int, int], Child] = {}
        self._by_pid: dict[tuple[int, int], Child] = {}
        self.pending: deque[Job] = deque()
        self.on_job_done = on_job_done or (lambda job: None)
        self.counts: Counter[str] = Counter()
        self._token = 0
        self._spawner_masks: dict[Spawner, int] = {}
        self._early_exits: dict[tuple[int, int], Event] = {}
        self.metrics = PoolMetrics()
        self.oom = OomWatch()
        self._advancing = False
        self._again = False
        self._fork_blocked_until = 0.0
        self._fork_delay = 0.0
        self._shortage_since: float | None = None
        self._shortage_logged = 0.0
        self._watchdog: Timer | None = None
        self._init_kills()
        self.spawner: Spawner | None = None
        # At start a fork server that cannot be made stops the worker, saying why.
        self._watch_new_spawner(make_spawner())

    # -- state -------------------------------------------------------------------------

    def fileno(self) -> int:
        # epoll/kqueue selectors are themselves pollable: the hub watches this one fd.
        return int(self.selector.fileno())  # type: ignore[attr-defined]

    def busy(self) -> bool:
        return bool(self.children or self.pending or self.lingering)

    def running(self) -> list[Child]:
        """Children that have a process (forked, not yet settled); safe from any thread."""
        # list() copies in one step under the GIL; iterating the dict would not.
        return [child for child in list(self.children.values()) if child.pid is not None]

    def claimed(self) -> list[Child]:
        """Every slot occupant, forked or still being forked."""
        return list(self.children.values())

    def task_ids(self) -> set[str]:
        """Task ids the pool holds: queued for a slot or in one."""
        held = {str(job.task_id) for job in self.pending}
        held.update(str(child.job.task_id) for child in self.children.values())
        return held

    # -- submitting -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        job.on_terminate = self.cancel_job
        self.pending.append(job)
        self.advance()

    def withdraw_queued(self) -> list[Job]:
        """Take every job still waiting for a slot out of the pool."""
        jobs = list(self.pending)
        self.pending.clear()
        return jobs

    def cancel_job(self, job: Job, signum: int) -> None:
        if job in self.pending:
            self.pending.remove(job)
            self._finish_unstarted(job, Terminated(-signum))
        elif job.pid is not None:
            self.terminate_job(job.pid, signum)
        # Requested but not forked yet: job.cancel_signal is applied on acceptance.

    # -- the loop's side -----------------------------------------------------------------

    def next_timeout(self) -> float | None:
        deadline = self.timers.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.clock())

    def poll(self, timeout: float | None = 0) -> None:
        """Read whatever is ready, fire due timers, then act on what was learnt."""
        registered = self.selector.get_map()
        for key, mask in self.selector.select(timeout):
            # A handler earlier in this batch may have closed this fd and a new
            # one reused its number: skip events for keys now gone.
            if registered.get(key.fd) is not key:
                continue
            handler, obj = key.data
            handler(obj, mask)
        self.timers.fire_due()
        self.advance()

    def advance(self) -> None:
        """Accept started children, settle exited ones, fill free slots; repeat until still.

        Not re-entrant: a call made from a callback it runs (Celery's, say)
        only asks for one more round.
        """
        if self._advancing:
            self._again = True
            return
        self._advancing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for child in list(self.children.values()):
                    if child.ready_to_accept():
                        self._accept(child)
                    if child.ready_to_settle():
                        self._settle(child)
                self._fill_slots()
            # Only after a pool_restart (or a lost start) is there a server to retire.
            if any(spawner is not self.spawner for spawner in self._spawner_masks):
                self._retire_idle_spawners()
        finally:
            self._advancing = False

    # -- recording (no callbacks run here) -------------------------------------------------

    def _on_report_io(self, child: Child, mask: int = 0) -> None:
        fd = child.report_fd
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unregister(fd)
                child.report_closed(self.clock())
                return
            child.report_data(data)

    def _on_spawner_io(self, spawner: Spawner, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            spawner.flush()
            self._watch_spawner(spawner)
        if mask & selectors.EVENT_READ:
            self._take_events(spawner)

    def _take_events(self, spawner: Spawner) -> None:
        for event in spawner.events():
            self._record(spawner, event)
        self._again = True
        if spawner.gone and spawner in self._spawner_masks:
            self._spawner_lost(spawner, spawner.gone)

    def _record(self, spawner: Spawner, event: Event) -> None:
        if event.kind == STARTED:
            child = self.children.get(event.a)
            if child is None or child.pid is not None:
                return
            if event.b < 0:
                self._fork_failed(child, -event.b)
                return
            child.started(event.b)
            key = (id(spawner), event.b)
            self._by_pid[key] = child
            if key in self._early_exits:
                early = self._early_exits.pop(key)
                child.exited(early.b, early.cpu, early.maxrss_kib)
        elif event.kind == EXITED:
            key = (id(spawner), event.a)
            child = self._by_pid.get(key)
            if child is None:
                self._early_exits[key] = event
            else:
                child.exited(event.b, event.cpu, event.maxrss_kib)
                if child.settled:
                    self._exited_after_settling(child)

    # -- acting (Celery's callbacks run here) -----------------------------------------------

    def _accept(self, child: Child) -> None:
        assert child.pid is not None
        child.accepted = True
        self.counts["forked"] += 1
        self.metrics.forked(self.clock() - child.asked_at)
        self._fork_recovered()
        job = child.job
        job.accepted(child.pid, self.clock())
        self._arm_time_limits(child)
        self._arm_memory_guard()
        if job.cancel_signal is not None:  # revoked while it was being forked
            self.terminate_job(child.pid, job.cancel_signal)
        elif child.pending_stop is not None:
            self.stop_child(child, **child.pending_stop)

    def _settle(self, child: Child) -> None:
        """The child is gone: decode its report and give the job its outcome."""
        if not child.report_eof and not child.report_whole:
            self._on_report_io(child)  # the rest of what it wrote, if any
        self._release(child)
        if child.exit_code is not None:
            self.metrics.child_exited(child.cpu, child.maxrss_kib)
        job = child.job
        if not child.accepted:
            # Its server was lost before saying it forked: a task that may have
            # started is treated as one that did (never run twice).
            child.accepted = True
            job.accepted(child.pid or 0, self.clock())
        if not job.finished:
            self._record_outcome(child)
        self.on_job_done(job)

    def _record_outcome(self, child: Child) -> None:
        report = protocol.decode_report(bytes(child.report))
        job = child.job
        if report is not None and report[0] == protocol.OUTCOME:
            self.counts["reported"] += 1
            job.succeed(report[1])
        elif report is not None:
            self.counts["reported"] += 1
            job.fail_with(report[1])
        elif child.kill_error is not None:
            self.counts["killed"] += 1
            self.metrics.killed(kill_reason(child.kill_error))
            job.fail(child.kill_error)
        elif child.exit_code == -signal.SIGKILL and self.oom.new_kills():
            self.counts["lost"] += 1
            self.metrics.killed("oom")
            logger.error("forkguard: the kernel's out-of-memory killer killed %s[%s] (pid %s)",
                         job.task_name, job.task_id, child.pid)
            job.fail(outcomes.oom_killed(job, str(self.oom.path)))
        else:
            self.counts["lost"] += 1
            self.metrics.killed("lost")
            job.fail(outcomes.worker_lost(child.exit_code or 0, job))

    def _release(self, child: Child) -> None:
        """Free the child's slot; one still exiting lingers until its exit is heard."""
        child.settled = True
        del self.children[child.token]
        for timer in child.timers:
            timer.cancel()
        child.timers = []
        self._unregister(child.report_fd)
        os.close(child.report_fd)
        if child.lingering():
            self._linger(child)
        elif child.pid is not None:
            self._by_pid.pop((id(child.spawner), child.pid), None)
            intents.shared().clear(child.pid)

    # -- children settled on their report, still exiting --------------------------------

    def _linger(self, child: Child) -> None:
        # Its pipe is closed now: its report's end stands for the pipe's EOF
        # (the watchdog looks for a zombie the server does not reap from then).
        if child.eof_at is None:
            child.eof_at = self.clock()
        self.lingering[(id(child.spawner), child.pid or 0)] = child
        child.timers.append(self.timers.call_later(EXIT_GRACE, self._kill_lingering, child))

    def _exited_after_settling(self, child: Child) -> None:
        self._forget_lingering(child)
        self.metrics.child_exited(child.cpu, child.maxrss_kib)
        if child.exit_code:
            logger.warning(
                "forkguard: the process of %s[%s] (pid %s) exited with %s after it reported "
                "its task's outcome (a worker_process_shutdown handler?); the outcome stands",
                child.job.task_name, child.job.task_id, child.pid, _exit_text(child.exit_code),
            )
        self._again = True  # a retired fork server may be idle now

    def _kill_lingering(self, child: Child) -> None:
        if not child.lingering():
            return
        logger.warning(
            "forkguard: the process of %s[%s] (pid %s) reported its task's outcome %gs ago "
            "but has not exited (a worker_process_shutdown handler?); killing it",
            child.job.task_name, child.job.task_id, child.pid, EXIT_GRACE,
        )
        child.spawner.kill(child.pid, signal.SIGKILL, group=True)
        child.timers.append(self.timers.call_later(EXIT_GRACE, self._give_up_lingering, child))

    def _give_up_lingering(self, child: Child) -> None:
        if not child.lingering():
            return
        if child.spawner.pid and is_zombie(child.pid or 0) and child.spawner in self._spawner_masks:
            self._spawner_lost(child.spawner, f"did not report the exit of pid {child.pid}")
            return
        logger.warning("forkguard: no exit heard from pid %s after SIGKILL; forgetting it",
                       child.pid)
        self._forget_lingering(child)

    def _forget_lingering(self, child: Child) -> None:
        self.lingering.pop((id(child.spawner), child.pid or 0), None)
        self._by_pid.pop((id(child.spawner), child.pid or 0), None)
        for timer in child.timers:
            timer.cancel()
        child.timers = []
        if child.pid is not None:
            intents.shared().clear(child.pid)

    def kill_lingering(self) -> None:
        """Cold shutdown: children still exiting after their report are killed too."""
        for child in list(self.lingering.values()):
            child.spawner.kill(child.pid or 0, signal.SIGKILL, group=True)

    def _finish_unstarted(self, job: Job, error: BaseException) -> None:
        job.fail(error)
        self.on_job_done(job)

    def _fail_before_start(self, job: Job, error: BaseException) -> None:
        """A job that can never run: accepted first, so Celery acks it, then failed."""
        job.accepted(0, self.clock())
        self._finish_unstarted(job, error)

    # -- forking ------------------------------------------------------------------------------

    def _fill_slots(self) -> None:
        asked: list[Child] = []
        while self.pending and len(self.children) < self.limit:
            if self.clock() < self._fork_blocked_until:
                break
            job = self.pending.popleft()
            if job.cancel_signal is not None:  # revoked before it got a slot
                self._finish_unstarted(job, Terminated(-job.cancel_signal))
                continue
            child = self._request(job)
            if child is None:
                break
            asked.append(child)
        if asked:
            self._await_started(asked)

    def _request(self, job: Job) -> Child | None:
        spawner = self.spawner or self._new_spawner()
        if spawner is None:
            self.pending.appendleft(job)
            return None
        try:
            # One syscall for a close-on-exec, non-blocking pair; the child makes
            # its end blocking again (child.prepare_child), off the worker's loop.
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # out of fds: wait as for a fork shortage
            self.pending.appendleft(job)
            self._note_fork_shortage(exc.errno or errno.EMFILE, str(exc))
            return None
        self._token = token = (self._token + 1) & 0x7FFFFFFF
        child = Child(token, job, read_fd, spawner, self._free_slot(), self.clock())
        self.children[token] = child
        self.selector.register(read_fd, selectors.EVENT_READ, (self._on_report_io, child))
        self._arm_watchdog()
        try:
            spawner.request(token, job, write_fd, child.slot)
        except Exception as exc:  # the job cannot be handed over (pickling)
            self._release(child)
            self._fail_before_start(job, EncodeError(
                f"forkguard could not hand the task to its fork server: {exc!r}"
            ))
            return None
        self._watch_spawner(spawner)
        return child

    def _await_started(self, asked: list[Child]) -> None:
        """Wait a moment for the answers just asked for, reading (not acting on) them."""
        spawner = asked[-1].spawner
        deadline = time.monotonic() + START_WAIT
        while any(child.pid is None and not child.settled for child in asked):
            left = deadline - time.monotonic()
            if left <= 0 or spawner not in self._spawner_masks or not spawner.wait(left):
                return
            self._take_events(spawner)

    def _free_slot(self) -> int:
        taken = {child.slot for child in self.children.values()}
        slot = 1
        while slot in taken:
            slot += 1
        return slot

    def _fork_failed(self, child: Child, code: int) -> None:
        """The system refused to fork: back to the head of the queue, retry later."""
        self._release(child)
        self.pending.appendleft(child.job)
        self.counts["fork_failed"] += 1
        self._note_fork_shortage(code, os.strerror(code))

    def _note_fork_shortage(self, code: int, why: str) -> None:
        now = self.clock()
        self._fork_delay = min(FORK_RETRY_MAX, max(FORK_RETRY_FIRST, self._fork_delay * 2))
        self._fork_blocked_until = now + self._fork_delay
        self.timers.call_later(self._fork_delay, self.advance)
        if self._shortage_since is None:
            self._shortage_since = self._shortage_logged = now
            logger.error(
                "forkguard: cannot fork a child (%s: %s); %d task(s) wait and nothing is "
                "lost; retrying with back-off up to %gs. Is the process limit "
                "(RLIMIT_NPROC, ulimit -u) or memory too low?",
                errno.errorcode.get(code, code), why, len(self.pending), FORK_RETRY_MAX,
            )
        elif now - self._shortage_logged >= FORK_SHORTAGE_LOG_EVERY:
            self._shortage_logged = now
            logger.error(
                "forkguard: still cannot fork after %.0fs (%s); %d task(s) wait",
                now - self._shortage_since, why, len(self.pending),
            )

    def _fork_recovered(self) -> None:
        self._fork_delay = 0.0
        if self._shortage_since is not None:
            logger.warning(
                "forkguard: forking works again after %.1fs", self.clock() - self._shortage_since,
            )
            self._shortage_since = None

    # -- sizing and closing ---------------------------------------------------------------------

    def resize(self, limit: int) -> None:
        """Change the number of slots; running children are never killed."""
        self.limit = max(1, limit)
        self.advance()

    def close(self) -> None:
        for spawner in list(self._spawner_masks):
            self._forget_spawner(spawner)
            spawner.reap_server(block=True)
        self.selector.close()



def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
