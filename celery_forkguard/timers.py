"""A small timer heap on an injectable monotonic clock."""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable


class Timer:
    """One scheduled call; ``cancel()`` makes it a no-op."""

    __slots__ = ("args", "callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[..., Any], args: tuple) -> None:
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerHeap:
    """Deadlines on ``clock()``; the owner calls :meth:`fire_due` from its loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_at(self, deadline: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(deadline, callback, args)
        heapq.heappush(self._heap, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(self.clock() + delay, callback, *args)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, dropping cancelled timers on the way."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def fire_due(self) -> None:
        """Run every live timer whose deadline has passed."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback(*timer.args)
