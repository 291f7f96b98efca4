"""A child's life in every order: start, report and exit, however they are read.

The fake spawner holds STARTED back (``auto_start=False``) so a test plays
the three events in any order, polling between them or not at all; and a
seeded fuzz plays thousands of children through random orders and faults.
"""

from __future__ import annotations

import itertools
import random
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Callable

import pytest
from billiard.exceptions import Terminated, WorkerLostError

from celery_forkguard import intents, protocol, servers
from celery_forkguard.lifecycle import State
from tests.unit.fakes import FakeChild, FakeClock, FakeForker, Harness, Kill, Probe

pytestmark = pytest.mark.timeout(60)

OK = (protocol.OUTCOME, (False, "'ok'", 0.01))


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(limit: int = 2, auto_start: bool = False) -> Harness:
        harness = Harness(FakeForker(auto_start=auto_start), FakeClock(), limit)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.close()
        twice = [job for job, n in Counter(harness.done).items() if n > 1]
        assert not twice, f"on_job_done called more than once for {twice}"


def play(child: FakeChild, step: str) -> None:
    """One thing the worker can learn: the start, the report's bytes, the exit, the EOF."""
    if step == "start":
        child.start()
    elif step == "report":
        child.report(*OK)
    elif step == "exit":
        child.reaped(0)
    elif step == "eof":
        child.close_report()


def possible(order: tuple[str, ...]) -> bool:
    # A child writes its report before it dies; the rest may be learnt in any order.
    return all(order.index("report") < order.index(later) for later in ("exit", "eof")
               if later in order)


STEPS = ("start", "report", "exit", "eof")
ORDERS = [o for o in itertools.permutations(STEPS) if possible(o)]
# A grandchild of the task may hold the report pipe open: no EOF at all.
ORDERS += [o for o in itertools.permutations(STEPS[:3]) if possible(o)]


@pytest.mark.parametrize("poll_between", [True, False], ids=["poll-each", "one-batch"])
@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_order_of_start_report_exit_settles_once_with_the_report(
    make: Callable[..., Harness], order: tuple[str, ...], poll_between: bool,
) -> None:
    harness = make(limit=1)
    probe, queued = Probe("one"), Probe("next")
    harness.submit(probe, queued)
    child = harness.child(probe)
    for step in order:
        play(child, step)
        if poll_between:
            harness.poll()
    harness.poll()
    assert len(probe.accepted) == 1 and probe.accepted[0][0] == child.pid
    assert probe.successes == [OK[1]] and probe.errors == []
    assert harness.done == [probe.job]
    # The slot went to the next job, which is now being forked.
    assert [c.job for c in harness.supervisor.claimed()] == [queued.job]


SILENT = list(itertools.permutations(("start", "exit", "eof")))


@pytest.mark.parametrize("order", SILENT, ids=["-".join(o) for o in SILENT])
def test_every_order_without_a_report_is_a_worker_lost_error(
    make: Callable[..., Harness], order: tuple[str, ...],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    child = harness.child(probe)
    for step in order:
        if step == "exit":
            child.reaped(-signal.SIGKILL)
        else:
            play(child, step)
        harness.poll()
    assert str(probe.error()) == "Worker exited prematurely: signal 9 (SIGKILL) Job: one."
    assert harness.done == [probe.job]


def test_an_exit_read_while_waiting_for_another_start_is_settled_at_once(
    make: Callable[..., Harness],
) -> None:
    # The stall of old: the worker read A's exit while waiting for B's start
    # and set it aside; nothing woke the loop to settle A.
    harness = make(limit=2, auto_start=True)
    first, second = Probe("first"), Probe("second")
    harness.submit(first)
    harness.child(first).report(*OK)
    harness.child(first).exit(0)  # on the socket, not yet read
    harness.submit(second)  # reads both the exit and the new start
    assert first.successes == [OK[1]]
    assert harness.done == [first.job]
    assert harness.running_jobs() == [second.job]


def test_a_requested_child_holds_its_slot_and_is_not_running_yet(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe, queued = Probe("one"), Probe("two")
    harness.submit(probe, queued)
    (child,) = harness.supervisor.claimed()
    assert child.state is State.REQUESTED
    assert harness.supervisor.running() == []
    assert harness.supervisor.task_ids() == {"one", "two"}
    assert probe.accepted == []
    harness.child(probe).start()
    harness.poll()
    assert child.state is State.RUNNING and len(probe.accepted) == 1


def test_revoke_before_the_start_is_known_signals_the_child_once_it_is(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    probe.job.terminate(signal.SIGTERM)
    assert harness.forker.kills == []
    harness.child(probe).start()
    harness.poll()
    pid = harness.child(probe).pid
    assert [(k.pid, k.signum) for k in harness.forker.kills] == [(pid, signal.SIGTERM)]
    assert intents.shared().get(pid) == intents.REVOKE
    harness.finish(probe, -signal.SIGTERM)
    assert isinstance(probe.error(), Terminated)


def test_a_stop_asked_before_the_start_is_applied_once_it_is(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    (child,) = harness.supervisor.claimed()
    reason = WorkerLostError("stopped by the operator")
    harness.supervisor.stop_child(child, term_timeout=None, kill_error=reason)
    assert harness.forker.kills == []
    harness.child(probe).start()
    harness.poll()
    assert [(k.signum, k.group) for k in harness.forker.kills] == [(signal.SIGKILL, True)]
    harness.finish(probe, -signal.SIGKILL)
    assert probe.error() is reason


def test_withdraw_queued_takes_only_what_waits_for_a_slot(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    running, queued = Probe("running"), Probe("queued")
    harness.submit(running, queued)
    assert harness.supervisor.withdraw_queued() == [queued.job]
    assert harness.supervisor.task_ids() == {"running"}
    harness.child(running).start()
    harness.finish(running, 0, report=OK)
    assert harness.supervisor.claimed() == []  # the withdrawn job is not run
    assert queued.accepted == [] and harness.done == [running.job]


# -- a fork server that stops answering or dies ----------------------------------------


def test_a_silent_fork_server_is_killed_and_its_tasks_settled_only_once_dead(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=2)
    running, requested, later = Probe("running"), Probe("requested"), Probe("later")
    harness.submit(running)
    harness.child(running).start()
    harness.poll()
    harness.submit(requested)
    old = harness.forker
    harness.advance(9.9)
    assert not old.server_killed
    harness.advance(0.1)  # the request is 10 s old: the server is stuck
    assert old.server_killed and old.closed
    run_pid = harness.child(running).pid
    assert (run_pid, signal.SIGKILL, True) in old.kills
    # Not settled yet: their report pipes are open, so something may still run.
    assert running.outcomes == 0 and requested.outcomes == 0
    harness.child(running).close_report()
    harness.child(requested).close_report()
    harness.poll()
    for probe in (running, requested):
        error = probe.error()
        assert isinstance(error, WorkerLostError)
        assert "fork server did not answer a request within 10s" in str(error)
    assert len(requested.accepted) == 1  # accepted, so an early-ack message is acked
    # New work goes to a new server.
    harness.submit(later)
    assert harness.forkers[-1] is not old
    assert harness.child(later).forker is harness.forkers[-1]


def test_requests_a_stuck_server_never_forked_go_to_the_next_server(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=2)
    running, requested = Probe("running"), Probe("requested")
    harness.submit(running)
    harness.child(running).start()
    harness.poll()
    harness.submit(requested)
    old = harness.forker
    old.real_children = {harness.child(running).pid}  # no child for the request
    harness.advance(10.0)
    assert old.server_killed
    fresh = harness.forkers[-1]
    assert fresh is not old
    assert harness.child(requested).forker is fresh  # asked again, of the new server
    assert requested.accepted == [] and requested.outcomes == 0
    harness.child(requested).start()
    harness.finish(requested, 0, report=OK)
    assert requested.successes == [OK[1]]
    harness.child(running).close_report()  # gone with its server
    harness.poll()
    assert "did not answer" in str(running.error())


def test_a_child_still_exiting_after_its_report_does_not_make_requests_lost(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    done, requested = Probe("done"), Probe("requested")
    harness.submit(done, requested)
    finished = harness.child(done)
    finished.start()
    finished.report(*OK)
    harness.poll()  # settled on its report: the slot goes to the next request
    old = harness.forker
    old.real_children = {finished.pid}  # the server's only child is the exiting one
    harness.advance(10.0)
    assert old.server_killed
    assert Kill(finished.pid, signal.SIGKILL, True) in old.kills  # it dies with its server
    assert harness.child(requested).forker is harness.forkers[-1]  # asked again
    harness.child(requested).start()
    harness.finish(requested, 0, report=OK)
    assert done.successes == [OK[1]] and requested.successes == [OK[1]]
    assert not harness.supervisor.busy()


def test_a_child_the_stuck_server_did_not_announce_makes_its_requests_lost(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    harness.forker.real_children = {4242}  # forked, never said so: it may run the task
    harness.advance(10.0)
    assert len(harness.forkers) == 1  # nothing asked again
    harness.child(probe).close_report()
    harness.poll()
    assert isinstance(probe.error(), WorkerLostError)


def test_a_task_that_reported_before_its_server_was_lost_keeps_its_outcome(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    child = harness.child(probe)
    child.start()
    child.report(*OK)
    harness.poll()
    harness.forker.die()
    child.close_report()
    harness.poll()
    assert probe.successes == [OK[1]]


def test_a_dead_fork_server_loses_its_running_tasks_once_their_pipes_close(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    harness.child(probe).start()
    harness.poll()
    harness.forker.die()
    harness.poll()
    assert probe.outcomes == 0
    harness.advance(servers.LOST_GRACE)  # a grandchild keeps the pipe open
    assert "fork server exited" in str(probe.error())


def test_a_server_that_stops_reaping_is_found_by_its_zombie(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = make(limit=1)
    probe = Probe("one")
    harness.submit(probe)
    child = harness.child(probe)
    child.start()
    child.report(*OK)
    child.close_report()  # exited: but the server never says so
    harness.poll()
    monkeypatch.setattr(servers, "is_zombie", lambda pid: False)
    harness.advance(10.0)
    assert not harness.forker.server_killed  # alive: it closed its pipe itself
    monkeypatch.setattr(servers, "is_zombie", lambda pid: pid == child.pid)
    harness.advance(10.0)
    assert harness.forker.server_killed
    harness.poll()
    assert probe.successes == [OK[1]]


def test_pool_restart_forks_new_tasks_from_a_new_server_at_once(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=2, auto_start=True)
    old_task, new_task = Probe("old"), Probe("new")
    harness.submit(old_task)
    old = harness.forker
    harness.supervisor.restart_spawner()
    harness.submit(new_task)
    assert harness.child(new_task).forker is not old
    assert not old.closed  # it still serves its running child
    harness.finish(old_task, 0, report=OK)
    assert old.closed
    harness.finish(new_task, 0, report=OK)
    assert new_task.successes == [OK[1]]


def test_a_retired_server_stays_until_its_last_child_has_exited(
    make: Callable[..., Harness],
) -> None:
    harness = make(limit=2, auto_start=True)
    old_task = Probe("old")
    harness.submit(old_task)
    old = harness.forker
    harness.supervisor.restart_spawner()
    child = harness.child(old_task)
    child.report(*OK)
    harness.poll()
    assert old_task.successes == [OK[1]]
    assert not old.closed  # its child is still exiting: it must not die with the server
    child.exit(0)
    harness.poll()
    assert old.closed


# -- sustained load ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_thousands_of_children_in_random_orders_never_stall_or_double_book(
    make: Callable[..., Harness], seed: int,
) -> None:
    rng = random.Random(seed)
    harness = make(limit=3)
    probes = [Probe(f"t{i}") for i in range(2000)]
    steps: dict[int, list[str]] = {}
    telling: list[FakeChild] = []  # children with something left to tell
    for probe in probes:
        harness.submit(probe)
    for _ in range(100_000):
        if not harness.supervisor.busy():
            break
        for fake in harness.forker.spawned[len(steps):]:
            steps[fake.token] = list(rng.choice(ORDERS))
            telling.append(fake)
        live = [c for c in telling if steps[c.token]]
        telling[:] = live
        if not live:  # all told: only the worker's next look is missing
            harness.poll()
            continue
        fake = rng.choice(live)
        play(fake, steps[fake.token].pop(0))
        if rng.random() < 0.5:
            harness.poll()
    harness.poll()
    assert not harness.supervisor.busy(), "stalled"
    assert all(p.successes == [OK[1]] and len(p.accepted) == 1 for p in probes)
    assert Counter(harness.done) == Counter(p.job for p in probes)
    assert max(c.slot for c in harness.forker.spawned) <= 3
