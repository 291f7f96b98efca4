"""TimerHeap: deadlines on an injected clock, fired in order, cancellable."""

from __future__ import annotations

import pytest

from celery_forkguard.timers import TimerHeap
from tests.unit.fakes import FakeClock

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0)


@pytest.fixture
def heap(clock: FakeClock) -> TimerHeap:
    return TimerHeap(clock)


def test_timers_fire_in_deadline_order_not_insertion_order(
    heap: TimerHeap, clock: FakeClock,
) -> None:
    fired: list[str] = []
    heap.call_later(3.0, fired.append, "c")
    heap.call_later(1.0, fired.append, "a")
    heap.call_at(102.0, fired.append, "b")
    clock.advance(10.0)
    heap.fire_due()
    assert fired == ["a", "b", "c"]


def test_equal_deadlines_fire_in_insertion_order(heap: TimerHeap, clock: FakeClock) -> None:
    fired: list[int] = []
    for n in range(5):
        heap.call_later(1.0, fired.append, n)
    clock.advance(1.0)
    heap.fire_due()
    assert fired == [0, 1, 2, 3, 4]


def test_only_due_timers_fire_and_a_deadline_equal_to_now_is_due(
    heap: TimerHeap, clock: FakeClock,
) -> None:
    fired: list[str] = []
    heap.call_later(1.0, fired.append, "now")
    heap.call_later(1.5, fired.append, "later")
    clock.advance(1.0)
    heap.fire_due()
    assert fired == ["now"]
    assert heap.next_deadline() == 101.5


def test_a_timer_fires_once(heap: TimerHeap, clock: FakeClock) -> None:
    fired: list[str] = []
    heap.call_later(1.0, fired.append, "x")
    clock.advance(1.0)
    heap.fire_due()
    heap.fire_due()
    assert fired == ["x"]
    assert heap.next_deadline() is None


def test_cancelled_timer_never_fires_and_leaves_next_deadline(
    heap: TimerHeap, clock: FakeClock,
) -> None:
    fired: list[str] = []
    first = heap.call_later(1.0, fired.append, "cancelled")
    heap.call_later(2.0, fired.append, "kept")
    assert heap.next_deadline() == 101.0
    first.cancel()
    assert heap.next_deadline() == 102.0
    clock.advance(5.0)
    heap.fire_due()
    assert fired == ["kept"]


def test_a_callback_can_cancel_a_later_timer_due_in_the_same_round(
    heap: TimerHeap, clock: FakeClock,
) -> None:
    fired: list[str] = []
    victim = heap.call_later(2.0, fired.append, "victim")

    def killer() -> None:
        fired.append("killer")
        victim.cancel()

    heap.call_later(1.0, killer)
    clock.advance(5.0)
    heap.fire_due()
    assert fired == ["killer"]


def test_cancel_after_firing_is_harmless(heap: TimerHeap, clock: FakeClock) -> None:
    fired: list[str] = []
    timer = heap.call_later(1.0, fired.append, "x")
    clock.advance(1.0)
    heap.fire_due()
    timer.cancel()
    assert fired == ["x"]


def test_call_later_is_relative_to_the_injected_clock(
    heap: TimerHeap, clock: FakeClock,
) -> None:
    clock.advance(50.0)
    timer = heap.call_later(2.5, lambda: None)
    assert timer.deadline == 152.5
    assert heap.next_deadline() == 152.5


def test_empty_heap_has_no_deadline(heap: TimerHeap) -> None:
    assert heap.next_deadline() is None
    heap.fire_due()  # nothing to do, nothing raised


def test_callbacks_get_their_arguments(heap: TimerHeap, clock: FakeClock) -> None:
    got: list[tuple[object, ...]] = []
    heap.call_later(0.0, lambda *args: got.append(args), 1, "two", None)
    heap.fire_due()
    assert got == [(1, "two", None)]
