"""Case 1: SIGKILL storm on task children, under a mixed early-ack / acks_late load.

A thread SIGKILLs random task children (the fork server's children, so
grandchildren of the worker) while a few hundred short tasks run.  What
Celery promises for a child lost mid-task:

- an early-ack task was acknowledged when its child started: it is recorded
  FAILURE with ``WorkerLostError`` (signal 9) and never runs again;
- an ``acks_late`` task with ``reject_on_worker_lost`` is put back in the
  queue and runs again until a run survives.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.chaos.case import Case
from tests.chaos.ledger import EARLY, LATE
from tests.chaos.workers import ChaosWorker, kill_quietly

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

TASKS = 400
LATE_SHARE = 0.4
KILLS = 60
CONCURRENCY = 4


class Killer(threading.Thread):
    """SIGKILLs a random task child every few tens of ms, *KILLS* times at most."""

    def __init__(self, worker: ChaosWorker) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.worker = worker
        self.killed: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.killed) < KILLS and not self.stop.is_set():
            victims = [c for c in self.worker.task_children() if c.pid not in self.killed]
            if victims:
                victim = random.choice(victims)
                if kill_quietly(victim):
                    self.killed.add(victim.pid)
            # A random gap: fault injection, not synchronisation.
            time.sleep(random.uniform(0.02, 0.12))


def test_sigkill_storm(open_case) -> None:
    case: Case = open_case("sigkill-storm")
    worker = case.start_worker(concurrency=CONCURRENCY)
    for _ in range(TASKS):
        name = "work_late" if random.random() < LATE_SHARE else "work"
        case.send(name, random.uniform(0.02, 0.2))
    killer = Killer(worker)
    killer.start()

    settled = case.settle(timeout=150)
    killer.stop.set()
    killer.join(10)
    figures = case.report()

    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures)
    outcomes = case.ledger.outcomes()
    for task_id in case.ledger.ids(EARLY):
        outcome = outcomes[task_id]
        if outcome.state != "SUCCESS":
            assert outcome.state == "FAILURE" and outcome.error_type == "WorkerLostError", outcome
            assert "signal 9 (SIGKILL)" in outcome.error, outcome
            # Killed by us, not by anything else (if it lived long enough to say who it was).
            assert case.pid_of(task_id) in killer.killed | {0}, (task_id, outcome)
    # Every acks_late task was put back and finally ran to the end.
    assert all(outcomes[i].state == "SUCCESS" for i in case.ledger.ids(LATE))
    assert len(killer.killed) >= KILLS // 2, f"only {len(killer.killed)} children killed"
    assert figures.failed > 0 and figures.redelivered > 0, "the storm never hit a task body"
    assert worker.alive() and worker.ping()
