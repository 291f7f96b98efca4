"""The drivers: a signal handler re-entering the pool, and calls from other threads.

A signal handler may interrupt the supervisor (Celery 5.5's cold shutdown).
A thread that does not own the supervisor (a test calling
``WorkController.reload()`` on a worker that runs in a thread) must have its
call run by the owner: the supervisor is not thread-safe.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from celery_forkguard import protocol
from celery_forkguard.drivers import HubDriver, ThreadDriver
from celery_forkguard.inbox import PoolClosed
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


def _serve_hub_until(hub: FakeHub, fd: int, done: Callable[[], bool], limit: float = 5.0) -> None:
    """Be the hub's thread: run the reader of *fd* whenever it is readable."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "the call from the other thread never arrived"
        if select.select([fd], [], [], 0.05)[0]:
            hub.readers[fd]()


def _in_thread(fun: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run *fun* in a new thread; the list gets its result or the exception it raised."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fun())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _wait_until_posted(driver: HubDriver) -> None:
    deadline = time.monotonic() + 5
    while not driver.inbox.has_posted():
        assert time.monotonic() < deadline, "the other thread posted nothing"
        time.sleep(0.001)


def test_a_call_from_another_thread_runs_in_the_hubs_thread(harness: Harness) -> None:
    hub = FakeHub()
    driver = HubDriver(harness.supervisor, hub)  # made here: this thread runs the hub
    seen: list[int] = []

    def note_thread() -> str:
        seen.append(threading.get_ident())
        return "restarted"

    thread, box = _in_thread(lambda: driver.call_sync(note_thread))
    # Nothing runs until the hub's thread gets to it.
    assert not seen
    _serve_hub_until(hub, harness.supervisor.fileno(), lambda: bool(box))
    thread.join(5)
    assert box == ["restarted"]
    assert seen == [threading.get_ident()]


def test_a_failure_in_a_posted_call_reaches_the_caller(harness: Harness) -> None:
    hub = FakeHub()
    driver = HubDriver(harness.supervisor, hub)

    def fail() -> None:
        raise ValueError("no such spawner")

    thread, box = _in_thread(lambda: driver.call_sync(fail))
    _serve_hub_until(hub, harness.supervisor.fileno(), lambda: bool(box))
    thread.join(5)
    assert isinstance(box[0], ValueError) and str(box[0]) == "no such spawner"


def test_a_submit_from_another_thread_is_supervised_by_the_hubs_thread(harness: Harness) -> None:
    hub = FakeHub()
    driver = HubDriver(harness.supervisor, hub)
    probe = Probe("one")
    thread, box = _in_thread(lambda: driver.submit(probe.job))
    _serve_hub_until(hub, harness.supervisor.fileno(), lambda: bool(box))
    thread.join(5)
    harness.child(probe).report(*OK)
    harness.child(probe).exit(0)
    assert driver.drain() is True
    assert probe.successes == [OK[1]]


def test_drain_runs_calls_posted_while_it_waits(harness: Harness) -> None:
    hub = FakeHub()
    driver = HubDriver(harness.supervisor, hub)
    probe = Probe("one")
    driver.submit(probe.job)
    thread, box = _in_thread(lambda: driver.call_sync(threading.get_ident))
    _wait_until_posted(driver)
    harness.child(probe).report(*OK)
    harness.child(probe).exit(0)
    assert driver.drain() is True  # the hub's thread, at shutdown: the hub no longer runs
    thread.join(5)
    assert box == [threading.get_ident()]
    assert probe.successes == [OK[1]]


def test_a_caller_waiting_when_the_pool_closes_hears_so(harness: Harness) -> None:
    driver = HubDriver(harness.supervisor, FakeHub())
    thread, box = _in_thread(lambda: driver.call_sync(harness.supervisor.task_ids))
    _wait_until_posted(driver)
    driver.close()
    thread.join(5)
    assert isinstance(box[0], PoolClosed)
    with pytest.raises(PoolClosed):
        driver.inbox.post(harness.supervisor.task_ids)


def test_the_thread_driver_runs_calls_in_its_own_thread(harness: Harness) -> None:
    driver = ThreadDriver(harness.supervisor)
    try:
        assert driver.call_sync(threading.get_ident) != threading.get_ident()
        with pytest.raises(KeyError):
            driver.call_sync({}.__getitem__, "missing")
    finally:
        driver.drain()
        driver.close()


def test_a_shutdown_raised_in_a_posted_call_goes_on_up_the_hubs_stack(harness: Harness) -> None:
    # Celery stops the worker by raising from a signal handler: if that lands
    # inside a posted call, the hub's thread must still see it, and the caller
    # hears of it too instead of waiting out its timeout.
    hub = FakeHub()
    driver = HubDriver(harness.supervisor, hub)

    def interrupted() -> None:
        raise KeyboardInterrupt

    thread, box = _in_thread(lambda: driver.call_sync(interrupted))
    with pytest.raises(KeyboardInterrupt):
        _serve_hub_until(hub, harness.supervisor.fileno(), lambda: bool(box))
    thread.join(5)
    assert isinstance(box[0], KeyboardInterrupt)
