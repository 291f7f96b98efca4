"""The hub driver under a signal handler that re-enters the pool (Celery 5.5's cold shutdown)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

from celery_forkguard import protocol
from celery_forkguard.drivers import HubDriver
from tests.unit.fakes import FakeClock, FakeForker, Harness, Probe

pytestmark = pytest.mark.timeout(10)

OK = (protocol.OUTCOME, (False, "'ok'", 0.01))


class FakeHub:
    """The few parts of kombu's hub the driver uses."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self._ready: list[Any] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        return _NoTimer()

    def fire_timers(self) -> None:
        pass


class _NoTimer:
    def cancel(self) -> None:
        pass


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness(FakeForker(), FakeClock(), 2)
    yield made
    made.close()


def test_drain_from_inside_the_supervisor_does_nothing_and_says_so(harness: Harness) -> None:
    driver = HubDriver(harness.supervisor, FakeHub())
    probe = Probe("one")
    driver.submit(probe.job)
    answers: list[bool] = []

    def interrupted_by_a_signal_handler() -> None:
        answers.append(driver.drain())  # what Celery 5.5's QUIT handler ends up calling

    driver.call_sync(interrupted_by_a_signal_handler)
    assert answers == [False]
    assert probe.outcomes == 0 and harness.supervisor.busy()
    # Back in the loop, the pool is drained as usual.
    harness.child(probe).report(*OK)
    harness.child(probe).exit(0)
    assert driver.drain() is True
    assert probe.successes == [OK[1]]
    assert not harness.supervisor.busy()
