"""What makes the supervisor go: Celery's event loop, or a thread of ours.

On transports with an event loop (Redis, RabbitMQ) the worker's kombu hub
watches the supervisor's selector as one fd and its nearest deadline as one
timer, and every callback runs in the thread that runs the hub (the worker's
main thread under ``celery worker``).  On transports without one (the
filesystem transport, SQS, ...) Celery's consumer blocks in that thread, so a
thread of ours runs the supervisor, as billiard's result-handler thread does
for prefork.  Either way a call from any other thread goes through the
driver's inbox (inbox.py) and runs in the supervisor's thread.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

from celery.utils.log import get_logger

from celery_forkguard.inbox import Inbox
from celery_forkguard.jobs import Job
from celery_forkguard.supervisor import Supervisor

logger = get_logger(__name__)

#: The longest a drain loop sleeps between two looks at the hub's timers.
DRAIN_TICK = 0.5
#: How long a call from another thread waits for the supervisor's thread.
CALL_SYNC_TIMEOUT = 30.0


class HubDriver:
    """Runs the supervisor from kombu's hub, in the thread that runs the hub."""

    def __init__(self, supervisor: Supervisor, hub: Any) -> None:
        self.supervisor = supervisor
        self.hub = hub
        #: Celery registers the pool from the thread that runs the hub.
        self._thread = threading.get_ident()
        self.inbox = Inbox(supervisor.selector)
        self._timer: Any = None
        self._armed_for: float | None = None
        #: How many calls into the supervisor are on the stack: more than none
        #: when a signal handler interrupts one (Celery 5.5's cold shutdown).
        self._depth = 0
        hub.add_reader(supervisor.fileno(), self._on_ready)

    def submit(self, job: Job, block: bool = False) -> None:
        self.call_sync(self.supervisor.submit, job)

    def call_sync(self, fun: Callable[..., Any], *args: Any) -> Any:
        """Run *fun* in the hub's thread and return what it returns.

        From another thread the call waits until the hub's thread has run
        it: a caller that reloads the worker expects the next task to fork
        from the reloaded copy.
        """
        if threading.get_ident() != self._thread:
            return self.inbox.call_and_wait(self._run, fun, *args, timeout=CALL_SYNC_TIMEOUT)
        return self._run(fun, *args)

    call = call_sync

    def _run(self, fun: Callable[..., Any], *args: Any) -> Any:
        self._depth += 1
        try:
            return fun(*args)
        finally:
            self._depth -= 1
            self._arm()

    def _on_ready(self) -> None:
        self._run(self.supervisor.poll, 0)
        self.inbox.run_posted()

    def _arm(self) -> None:
        """Keep one hub timer set for the supervisor's nearest deadline."""
        deadline = self.supervisor.timers.next_deadline()
        if deadline == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.supervisor.clock())
            self._timer = self.hub.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._armed_for = None
        self._on_ready()

    def drain(self) -> bool:
        """Wait for every child at shutdown, when the hub no longer runs.

        The hub's timers (heartbeats) keep firing, and the ack/reject calls
        Celery queued on it for finished tasks are run so nothing is lost.
        Returns False, having done nothing, when called from a signal handler
        that interrupted the supervisor: its state is half-way through a
        change, and the interrupted call must finish first.
        """
        if self._depth:
            return False
        with contextlib.suppress(Exception):
            self.hub.remove_reader(self.supervisor.fileno())
        while self.supervisor.busy() or self.inbox.has_posted():
            timeout = self.supervisor.next_timeout()
            self.supervisor.poll(DRAIN_TICK if timeout is None else min(timeout, DRAIN_TICK))
            self.inbox.run_posted()
            self._service_hub()
        self._service_hub()
        return True

    def close(self) -> None:
        self.inbox.close()

    def _service_hub(self) -> None:
        try:
            self.hub.fire_timers()
        except Exception:
            logger.warning("forkguard: hub timer failed during shutdown", exc_info=True)
        run_queued_acks(self.hub)


def run_queued_acks(hub: Any) -> None:
    """Run the message ack/reject promises waiting on the hub; keep the rest."""
    pop_ready = getattr(hub, "_pop_ready", None)
    if pop_ready is not None:
        ready = list(pop_ready())
    else:
        ready = list(getattr(hub, "_ready", ()))
        hub._ready.clear()
    for callback in ready:
        if _is_message_settlement(callback):
            try:
                callback()
            except Exception as exc:
                hub.on_callback_error(callback, exc)
        else:
            hub.call_soon(callback)


def _is_message_settlement(callback: Any) -> bool:
    # Celery queues promise(message.ack_log_error) / promise(reject_log_error).
    fun = getattr(callback, "fun", None)
    name = getattr(fun, "__name__", "")
    owner = getattr(fun, "__self__", None)
    return name in ("ack_log_error", "reject_log_error") and hasattr(owner, "delivery_tag")


class ThreadDriver:
    """Runs the supervisor in a thread, for transports without an event loop.

    Calls from other threads are posted to its inbox, so the supervisor
    itself is only ever touched by this thread.  ``submit(block=True)``
    waits for a free slot, as prefork's putlocks do.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._slots = threading.Condition()
        self._inflight = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="forkguard-supervisor", daemon=True)
        self.inbox = Inbox(supervisor.selector)
        self._thread.start()

    def submit(self, job: Job, block: bool = True) -> None:
        with self._slots:
            while block and not self._stopping and self._inflight >= self.supervisor.limit:
                self._slots.wait()
            self._inflight += 1
        self.call(self.supervisor.submit, job)

    def job_done(self, job: Job) -> None:
        with self._slots:
            self._inflight -= 1
            self._slots.notify_all()

    def slots_changed(self) -> None:
        with self._slots:
            self._slots.notify_all()

    def call(self, fun: Callable[..., Any], *args: Any) -> None:
        self.inbox.post(fun, *args)

    def call_sync(self, fun: Callable[..., Any], *args: Any) -> Any:
        """Run *fun* in the supervisor's thread and return what it returns."""
        if threading.current_thread() is self._thread:
            return fun(*args)
        return self.inbox.call_and_wait(fun, *args, timeout=CALL_SYNC_TIMEOUT)

    def _run(self) -> None:
        supervisor = self.supervisor
        while True:
            self.inbox.run_posted()
            if self._stopping and not supervisor.busy() and not self.inbox.has_posted():
                break
            timeout = supervisor.next_timeout()
            supervisor.poll(DRAIN_TICK if timeout is None else min(timeout, DRAIN_TICK))

    def drain(self) -> bool:
        """Let every accepted job finish, then stop the thread."""
        with self._slots:
            self._stopping = True
            self._slots.notify_all()
        self.inbox.wake()
        self._thread.join()
        return True

    def close(self) -> None:
        self.inbox.close()
