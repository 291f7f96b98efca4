"""Signal handlers that only record, and hand the work to the worker's loop.

With kombu's hub the handler writes a byte to a pipe the hub watches, so the
loop wakes at once; without a hub (blocking transports) it queues a call
that Celery's blocking loop runs between two polls of the broker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from typing import Any, Callable

from celery.utils.log import get_logger

logger = get_logger(__name__)


class SignalRelay:
    """Records signals in a handler; dispatches them later, in the loop."""

    def __init__(self, dispatch: Callable[[str], None]) -> None:
        self.dispatch = dispatch
        self.received: deque[str] = deque()
        self._hub: Any = None
        self._call_soon: Callable[[Callable[[], None]], Any] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def attach(self, hub: Any, call_soon: Callable[[Callable[[], None]], Any]) -> None:
        """Use *hub* if the worker has one, else the consumer's ``call_soon``."""
        if hub is not None:
            # Every (re)start: a reconnect resets the hub, dropping our reader.
            hub.add_reader(self._wake_r, self._on_wake)
        self._hub = hub
        self._call_soon = call_soon

    def install(self, signames: list[str]) -> bool:
        """Install the handlers; False (and a warning) off the main thread.

        Celery's test worker (``celery.contrib.testing``, behind the
        ``celery_worker`` fixtures) runs in a thread, where Python cannot set
        signal handlers: the worker then runs without them, remote control
        still works.
        """
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "forkguard: the worker runs in a thread (%s), where signal handlers "
                "cannot be set: %s are not handled; remote control works",
                threading.current_thread().name, ", ".join(signames))
            return False
        for name in signames:
            signal.signal(getattr(signal, name), self._record)
        return True

    def _record(self, signum: int, frame: Any) -> None:
        # Only record and wake: no logging, no I/O beyond one byte (gunicorn #2667).
        self.post(signal.Signals(signum).name)

    def post(self, name: str) -> None:
        """Have the loop dispatch *name*; safe from a signal handler or another thread."""
        self.received.append(name)
        if self._hub is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"s")
        elif self._call_soon is not None:
            self._call_soon(self.run_pending)

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass
        self.run_pending()

    def run_pending(self) -> None:
        while self.received:
            name = self.received.popleft()
            try:
                self.dispatch(name)
            except Exception:
                logger.exception("forkguard: handling %s failed", name)

    def wake(self) -> None:
        """Wake the loop from another thread (the hub then re-checks its state)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")
