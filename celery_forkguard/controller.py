"""Resque's operator controls on a forkguard worker.

One small ``handle_<signal>`` per signal, as in gunicorn's arbiter; the
remote-control commands call the same methods.  Signals and commands are
handled in the worker's main thread (the hub, or Celery's blocking loop,
which looks at them between two polls of the broker: up to ~2 s later); the
steps of a term_child shutdown run from the consumer's timer, which on
blocking transports is a thread (the pool's methods used there are
thread-safe).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger
from celery.worker import state as worker_state

from celery_forkguard import stopping, titles
from celery_forkguard.relay import SignalRelay
from celery_forkguard.settings import ForkguardSettings

if TYPE_CHECKING:
    from celery_forkguard.prefork import TaskPool

logger = get_logger(__name__)

#: How often a term_child shutdown looks at the children it waits for.
SHUTDOWN_TICK = 0.1


class Controller:
    """Pause, resume, kill, resize and term_child shutdown for one worker."""

    def __init__(self, consumer: Any, pool: TaskPool, settings: ForkguardSettings) -> None:
        self.consumer = consumer
        self.pool = pool
        self.settings = settings
        self.paused = False
        self.shutting_down = False
        self.killed: Counter[str] = Counter()
        self.handed_back = 0
        self._saved_on_task_request: Any = None
        self._title_before_pause: str | None = None
        self._shutdown_deadline = 0.0
        self._children_termed = False
        self.relay = SignalRelay(self.dispatch)

    # -- signals -------------------------------------------------------------------

    def signals(self) -> list[str]:
        names = ["SIGUSR1", "SIGUSR2", "SIGCONT", "SIGTTIN", "SIGTTOU"]
        if self.settings.term_child:
            names.append("SIGTERM")
        return names

    def dispatch(self, signame: str) -> None:
        logger.info("forkguard: received %s", signame)
        getattr(self, f"handle_{signame[3:].lower()}")()

    def handle_usr1(self) -> None:
        self.kill_tasks("USR1")

    def handle_usr2(self) -> None:
        self.pause("USR2")

    def handle_cont(self) -> None:
        self.resume("CONT")

    def handle_ttin(self) -> None:
        self.resize(+1)

    def handle_ttou(self) -> None:
        self.resize(-1)

    def handle_term(self) -> None:
        self.begin_term_child_shutdown()

    # -- kill ------------------------------------------------------------------------

    def kill_tasks(self, who: str, task_id: str | None = None) -> list[str]:
        """Kill running tasks (all, or one by id); the worker keeps consuming."""
        term_timeout = self.settings.term_timeout if self.settings.term_child else None
        killed = self.pool.stop_running(stopping.operator_kill(who, term_timeout, task_id))
        self.killed[who] += len(killed)
        logger.warning("forkguard: %s killed %d task(s): %s", who, len(killed), killed)
        return killed

    # -- pause / resume -----------------------------------------------------------

    def pause(self, why: str) -> bool:
        """Stop consuming, and hand prefetched-but-unstarted tasks back to the broker."""
        if self.paused:
            return False
        self.paused = True
        self.stop_consuming()
        self._divert_new_requests()
        count = self._hand_back_reserved()
        self._title_before_pause = titles.get_title()
        titles.set_title(f"{self._title_before_pause} [forkguard: paused]")
        logger.warning("forkguard: paused by %s; handed back %d prefetched task(s)", why, count)
        return True

    def resume(self, why: str) -> bool:
        if not self.paused or self.shutting_down:
            return False
        c = self.consumer
        if c.task_consumer is not None:
            c.task_consumer.consume()  # if this fails, the worker stays paused
        self.paused = False
        if self._saved_on_task_request is not None:
            c.on_task_request = self._saved_on_task_request
            self._saved_on_task_request = None
            c.update_strategies()
        if self._title_before_pause is not None:
            titles.set_title(self._title_before_pause)
        logger.warning("forkguard: resumed by %s", why)
        return True

    def stop_consuming(self) -> None:
        task_consumer = self.consumer.task_consumer
        if task_consumer is not None:
            task_consumer.cancel()

    def _divert_new_requests(self) -> None:
        # Messages already on their way (and ETA tasks coming due) reach
        # on_task_request: while paused, they go straight back.
        c = self.consumer
        self._saved_on_task_request = c.on_task_request
        c.on_task_request = self._hand_back
        c.update_strategies()

    def _hand_back_reserved(self) -> int:
        """Hand back every prefetched request the pool will not run.

        Jobs queued in the pool for a slot are taken out of it first; what
        the pool still holds (being forked or running) stays with it: a
        request is either run here or handed back, never both.
        """
        self.pool.withdraw_queued()
        held = self.pool.held_task_ids()
        active = set(worker_state.active_requests)
        waiting = [
            r for r in list(worker_state.reserved_requests)
            if r not in active and str(r.id) not in held
        ]
        for request in waiting:
            # Skip it when the semaphore later offers it to the pool.
            request._already_revoked = True
            self._hand_back(request)
        return len(waiting)

    def _hand_back(self, request: Any) -> None:
        request.reject(requeue=True)
        worker_state.task_ready(request)
        self.handed_back += 1

    # -- resize ------------------------------------------------------------------------

    def resize(self, delta: int) -> None:
        """TTIN/TTOU: one slot more or less; never below one, never a kill."""
        if getattr(self.consumer.controller, "autoscaler", None):
            logger.warning("forkguard: TTIN/TTOU ignored: --autoscale manages the pool size")
            return
        if delta < 0 and self.pool.num_processes <= 1:
            return
        (self.pool.grow if delta > 0 else self.pool.shrink)(abs(delta))
        self.consumer._update_prefetch_count(delta)
        logger.warning("forkguard: pool size now %d", self.pool.num_processes)

    # -- term_child shutdown ----------------------------------------------------------

    def begin_term_child_shutdown(self) -> None:
        """TERM with term_child: stop taking work, TERM children, KILL late ones, exit."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.pause("TERM")
        self._shutdown_deadline = time.monotonic() + self.settings.pre_shutdown_timeout
        self._shutdown_tick()

    def _shutdown_tick(self) -> None:
        if not self.pool.running():
            self._exit_warm()
            return
        if not self._children_termed and time.monotonic() >= self._shutdown_deadline:
            self._children_termed = True
            stopped = self.pool.stop_running(stopping.term_shutdown(self.settings.term_timeout))
            logger.warning("forkguard: sent TERM to %d task(s)", len(stopped))
        self.consumer.timer.call_after(SHUTDOWN_TICK, self._shutdown_tick)

    def _exit_warm(self) -> None:
        from celery.platforms import EX_OK

        logger.warning("forkguard: children gone; worker exits")
        worker_state.should_stop = EX_OK
        self.relay.wake()

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "paused": self.paused,
            "shutting_down": self.shutting_down,
            "concurrency": self.pool.num_processes,
            "running": [child.describe(now) for child in self.pool.running()],
            "killed": dict(self.killed),
            "handed_back": self.handed_back,
            "term_child": self.settings.term_child,
            "term_timeout": self.settings.term_timeout,
            "pre_shutdown_timeout": self.settings.pre_shutdown_timeout,
        }
