"""Calls handed to the supervisor's thread from any other thread.

The supervisor is not thread-safe: one thread owns it (the worker's loop, or
the pool's own thread on transports without one).  Any other thread (a test
calling ``WorkController.reload()`` on a worker that Celery's
``celery_worker`` fixture runs in a thread, say) posts its call here: a byte
on a pipe that the supervisor's selector watches wakes the owner, which runs
the call between two of its own steps.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
from collections import deque
from typing import Any, Callable

from celery.utils.log import get_logger

logger = get_logger(__name__)


class PoolClosed(RuntimeError):
    """A call was posted to a pool that has stopped."""


class _Call:
    """One posted call; a caller that waits for it holds ``done``."""

    __slots__ = ("args", "done", "fun", "result")

    def __init__(self, fun: Callable[..., Any], args: tuple, done: threading.Event | None) -> None:
        self.fun = fun
        self.args = args
        self.done = done
        self.result: tuple[bool, Any] | None = None

    def run(self) -> None:
        try:
            self.result = (True, self.fun(*self.args))
        except BaseException as exc:
            self.result = (False, exc)
            if not isinstance(exc, Exception):
                raise  # a shutdown raised in the owner's thread goes on up its stack
            if self.done is None:  # nobody waits to hear of it
                logger.exception("forkguard: supervisor call %r failed", self.fun)
        finally:
            if self.done is not None:
                self.done.set()

    def drop(self) -> None:
        stopped = PoolClosed(f"forkguard: the pool stopped before running {self.fun!r}")
        self.result = (False, stopped)
        if self.done is not None:
            self.done.set()


class Inbox:
    """Posted calls, run by the thread that owns the supervisor."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._calls: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._closed = False
        # Close-on-exec (os.pipe's default), and never blocking: a full pipe
        # means the owner is woken already.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        selector.register(self._wake_r, selectors.EVENT_READ, (self._on_wake, None))

    def post(self, fun: Callable[..., Any], *args: Any) -> None:
        """Have the owner run ``fun(*args)`` soon; a failure is logged there."""
        self._append(_Call(fun, args, None))

    def call_and_wait(self, fun: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """Have the owner run ``fun(*args)``; return what it returns, or raise what it raised."""
        call = _Call(fun, args, threading.Event())
        self._append(call)
        assert call.done is not None
        if not call.done.wait(timeout):
            raise TimeoutError(f"forkguard: the supervisor's thread did not run {fun!r} "
                               f"within {timeout:g}s")
        assert call.result is not None
        ok, value = call.result
        if not ok:
            raise value
        return value

    def run_posted(self) -> None:
        """Run every call posted so far (the owner calls this from its loop)."""
        while True:
            with self._lock:
                if not self._calls:
                    return
                call = self._calls.popleft()
            call.run()

    def has_posted(self) -> bool:
        return bool(self._calls)

    def wake(self) -> None:
        with self._lock:
            self._wake_unlocked()

    def _wake_unlocked(self) -> None:
        if not self._closed:
            with contextlib.suppress(BlockingIOError):  # a full pipe: the owner wakes anyway
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Refuse further calls; callers still waiting hear that the pool stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = list(self._calls)
            self._calls.clear()
            with contextlib.suppress(KeyError, ValueError, RuntimeError):
                self._selector.unregister(self._wake_r)
            # Under the lock: no poster writes to a number that is closed (or reused).
            os.close(self._wake_r)
            os.close(self._wake_w)
        for call in left:
            call.drop()

    def _append(self, call: _Call) -> None:
        with self._lock:
            if self._closed:
                raise PoolClosed(f"forkguard: the pool has stopped; {call.fun!r} not run")
            self._calls.append(call)
            self._wake_unlocked()

    def _on_wake(self, _: Any, mask: int = 0) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
