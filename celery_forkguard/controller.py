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
from celery_forkguard.liveness import LivenessFile
from celery_forkguard.mailbox import generation_node_name, mailbox_name, move_mailbox
from celery_forkguard.relay import SignalRelay
from celery_forkguard.settings import ForkguardSettings
from celery_forkguard.starter_link import (
    MAILBOX_RECLAIM,
    MAILBOX_RELEASE,
    MAILBOX_RELEASED,
    starter_link,
    stop_as_on_term,
)

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
        self.retiring = False
        self._reported_running: int | None = None
        self.killed: Counter[str] = Counter()
        self.handed_back = 0
        self._saved_on_task_request: Any = None
        self._title_before_pause: str | None = None
        self._shutdown_deadline = 0.0
        self._children_termed = False
        self.relay = SignalRelay(self.dispatch)
        self.liveness = (LivenessFile(settings.liveness_file, settings.liveness_interval)
                         if settings.liveness_file else None)

    # -- signals -------------------------------------------------------------------

    def signals(self) -> list[str]:
        names = ["SIGUSR1", "SIGUSR2", "SIGCONT", "SIGTTIN", "SIGTTOU"]
        if self.settings.term_child:
            names.append("SIGTERM")
        if starter_link() is not None:
            # Only under a starter: in a terminal, WINCH means "resized"; and
            # Celery's HUP (re-exec this process) would cut it from its starter.
            names += ["SIGWINCH", "SIGHUP"]
        return names

    def dispatch(self, name: str) -> None:
        """Handle a signal (``SIGUSR1``) or a starter's request (``mailbox-release``)."""
        logger.info("forkguard: received %s", name)
        if name.startswith("SIG"):
            getattr(self, f"handle_{name[3:].lower()}")()
        else:
            getattr(self, f"on_{name.replace('-', '_')}")()

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

    def handle_hup(self) -> None:
        """Under a starter, HUP to the worker is a reload of the starter's."""
        logger.warning("forkguard: %s", self.request_reload())

    def handle_winch(self) -> None:
        self.retire("the starter (a newer generation is consuming)")

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

    # -- term_child shutdown and retire ---------------------------------------------

    def begin_term_child_shutdown(self) -> None:
        """TERM with term_child: stop taking work, TERM children, KILL late ones, exit."""
        self._begin_shutdown("TERM", self.settings.pre_shutdown_timeout)

    def retire(self, why: str) -> None:
        """Hand over to a newer generation: stop consuming, finish running tasks, exit.

        Running tasks get ``forkguard_retire_timeout``; then the term_child
        sequence stops what is left (TERM, term_timeout, KILL; acks_late
        tasks requeued).
        """
        if self.shutting_down:
            return
        self.retiring = True
        logger.warning("forkguard: retiring, asked by %s: tasks running now get up to %gs",
                       why, self.settings.retire_timeout)
        self._begin_shutdown("retire", self.settings.retire_timeout)

    def _begin_shutdown(self, why: str, grace: float) -> None:
        deadline = time.monotonic() + grace
        if self.shutting_down:
            # TERM during a retire: the shorter of the two deadlines wins.
            if not self._children_termed and deadline < self._shutdown_deadline:
                self._shutdown_deadline = deadline
                logger.warning("forkguard: %s: running tasks now get up to %gs", why, grace)
            return
        self.shutting_down = True
        self.pause(why)
        self._shutdown_deadline = deadline
        self._shutdown_tick()

    def _shutdown_tick(self) -> None:
        running = self.pool.running()
        self._report_retiring(len(running))
        if not running:
            self._exit_warm()
            return
        if not self._children_termed and time.monotonic() >= self._shutdown_deadline:
            self._children_termed = True
            stopped = self.pool.stop_running(stopping.term_shutdown(self.settings.term_timeout))
            logger.warning("forkguard: sent TERM to %d task(s)", len(stopped))
        self.consumer.timer.call_after(SHUTDOWN_TICK, self._shutdown_tick)

    def _report_retiring(self, running: int) -> None:
        """Tell the starter (and ``ps``) how many tasks the retiring worker still runs."""
        link = starter_link()
        if not self.retiring or running == self._reported_running:
            return
        self._reported_running = running
        if link is not None:
            link.send(f"retiring {running}")
        if self._title_before_pause is not None:
            titles.set_title(f"{self._title_before_pause} "
                             f"[forkguard: retiring, {running} task(s) running]")

    def _exit_warm(self) -> None:
        from celery.platforms import EX_OK

        logger.warning("forkguard: children gone; worker exits")
        worker_state.should_stop = EX_OK
        self.relay.wake()

    # -- liveness -----------------------------------------------------------------------

    def start_liveness(self, timer: Any) -> None:
        """Touch the liveness file from the loop (the hub's timer when there is one)."""
        if self.liveness is not None:
            self.liveness.start(timer)

    # -- starter ------------------------------------------------------------------------

    def watch_starter(self) -> None:
        """Take the starter's requests; stop as on TERM when it dies (an orphan
        would outlive a restart)."""
        link = starter_link()
        if link is not None:
            link.watch(self._on_starter_line, self._starter_lost)

    def _on_starter_line(self, line: str) -> None:
        if line in (MAILBOX_RELEASE, MAILBOX_RECLAIM):
            self.relay.post(line)  # handled in the loop, which owns the connection
        else:
            logger.warning("forkguard: ignored %r from the starter", line)

    def on_mailbox_release(self) -> None:
        """A new generation starts under our node name: move our mailbox aside."""
        link = starter_link()
        if link is None:
            return
        name = generation_node_name(self.consumer.hostname, link.generation)
        if move_mailbox(self.consumer, name):
            logger.warning("forkguard: remote control for this generation now "
                           "answers as %s", name)
        link.send(MAILBOX_RELEASED)

    def on_mailbox_reclaim(self) -> None:
        """The new generation failed: answer remote control as our node name again."""
        if move_mailbox(self.consumer, self.consumer.hostname):
            logger.warning("forkguard: remote control answers as %s again",
                           self.consumer.hostname)

    def _starter_lost(self) -> None:
        link = starter_link()
        logger.error("forkguard: starter pid %d is gone: stopping as on TERM",
                     link.starter_pid if link else 0)
        stop_as_on_term()

    def announce_ready(self) -> None:
        """Tell the starter (if any) that this worker consumes."""
        link = starter_link()
        if link is not None and not self.shutting_down:
            link.send("ready")

    def request_reload(self) -> dict[str, Any]:
        """``forkguard_reload``: ask this worker's starter for a new generation."""
        link = starter_link()
        if link is None:
            return {"error": "not run by `celery forkguard starter`: "
                             "restart this worker to load new code"}
        if self.shutting_down:
            return {"ok": "retiring or stopping: reload left to the current generation"}
        if not link.send("reload"):
            return {"error": f"its starter (pid {link.starter_pid}) is not reading"}
        logger.warning("forkguard: asked starter pid %d for a reload", link.starter_pid)
        return {"ok": f"reload requested from starter pid {link.starter_pid} "
                      f"(this is generation {link.generation})"}

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        link = starter_link()
        return {
            "paused": self.paused,
            "shutting_down": self.shutting_down,
            "retiring": self.retiring,
            "generation": link.generation if link is not None else None,
            "starter_pid": link.starter_pid if link is not None else None,
            "mailbox": mailbox_name(self.consumer),
            "concurrency": self.pool.num_processes,
            "running": [child.describe(now) for child in self.pool.running()],
            "killed": dict(self.killed),
            "handed_back": self.handed_back,
            "term_child": self.settings.term_child,
            "term_timeout": self.settings.term_timeout,
            "pre_shutdown_timeout": self.settings.pre_shutdown_timeout,
        }
