"""Case 5: operator signals (USR2, CONT, TTIN, TTOU) and broker reconnects while tasks stream.

``test_signal_storm``: a thread sends the worker random USR2 (pause: hand
prefetched tasks back), CONT (resume), TTIN/TTOU (one slot more or less), and
now and then cuts the worker's connections to its broker (a private Redis:
``CLIENT KILL`` of the worker's own connections, so the test's publisher is
untouched).  Early-ack tasks stream meanwhile.  At the end the worker is
resumed; every task must finish, none twice.

``test_ttou_then_pause_runs_a_queued_task_once``: the reproducer.  At ``-c 2``
with both slots busy, TTOU leaves one slot; when one long task ends, the
quick task Celery then hands the pool waits *inside the pool* for the slot
the other long task still holds.  USR2 must hand it back to the broker and
drop it from the pool; after CONT it runs exactly once.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from tests.chaos.brokers import PrivateRedis
from tests.chaos.case import Case, Stream, jitter
from tests.chaos.workers import ChaosWorker
from tests.harness import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

TASKS = 300
FAULTS = 80
MAX_SLOTS = 5


class Operator(threading.Thread):
    """Random USR2/CONT/TTIN/TTOU and connection cuts, *FAULTS* of them, at random gaps."""

    CHOICES = ("USR2", "CONT", "CONT", "TTIN", "TTOU", "reconnect")

    def __init__(self, worker: ChaosWorker, broker: PrivateRedis, slots: int,
                 publishing: threading.Lock) -> None:
        super().__init__(name="chaos-operator", daemon=True)
        self.worker = worker
        self.broker = broker
        self.slots = slots
        self.publishing = publishing
        self.sent: dict[str, int] = dict.fromkeys(self.CHOICES, 0)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(FAULTS):
                self.act(random.choice(self.CHOICES))
                time.sleep(random.uniform(0.05, 0.4))  # fault injection, not synchronisation
        except BaseException as exc:
            self.error = exc

    def act(self, what: str) -> None:
        if what == "reconnect":
            # Not while a publish is on its way: Redis could then hand the message to the
            # worker's BRPOP and drop the connection before the reply left, which is the
            # transport losing it.
            with self.publishing:
                self.broker.drop_clients_of(self.worker.pid)
        elif what == "TTIN" and self.slots >= MAX_SLOTS:
            return
        else:
            self.slots += {"TTIN": 1, "TTOU": -1}.get(what, 0)
            self.slots = max(1, self.slots)
            self.worker.signal(getattr(signal, f"SIG{what}"))
        self.sent[what] += 1


def resumed(worker: ChaosWorker) -> bool:
    return worker.broadcast("forkguard_status").get("paused") is False


def test_signal_storm(open_case, private_redis: PrivateRedis) -> None:
    case: Case = open_case("operator-storm", broker_url=private_redis.url(0))
    worker = case.start_worker(concurrency=2)
    publishing = threading.Lock()
    stream = Stream(lambda i: case.send("work", random.uniform(0.01, 0.05)), TASKS,
                    jitter(0.0, 0.05), publishing)
    operator = Operator(worker, private_redis, slots=2, publishing=publishing)
    stream.start()
    operator.start()
    operator.join(120)
    stream.finish()
    assert operator.error is None, operator.error
    # However the storm ended, resume: a paused worker would keep its queue forever.
    worker.signal(signal.SIGCONT)
    wait_for(lambda: resumed(worker), timeout=60, message="the worker to resume")

    settled = case.settle(timeout=60)
    counts = " ".join(f"{k}={v}" for k, v in operator.sent.items())
    figures = case.report(notes=f"[{counts}]")
    # A connection cut while Redis replies to the worker's BRPOP drops that
    # message in the transport (the reply dies with the socket): such an id was
    # never received by the worker, so the pool never had it. Counted apart.
    dropped = case.never_received(figures.lost_ids)
    print(f"chaos operator-storm: transport_lost={len(dropped)} {sorted(dropped)}")

    assert settled or set(figures.lost_ids) == dropped, f"lost: {figures.lost_ids}"
    case.check(figures, transport_lost=dropped)
    assert figures.done + len(dropped) == TASKS
    assert worker.alive() and worker.ping()


def test_ttou_then_pause_runs_a_queued_task_once(open_case) -> None:
    case: Case = open_case("ttou-pause-resume")
    worker = case.start_worker(concurrency=2)
    first, second = case.gate(), case.gate()
    long_one, long_two = case.send("held", first), case.send("held", second)
    for task_id in (long_one, long_two):
        wait_for(lambda t=task_id: case.pid_of(t), timeout=30, message="a long task to start")

    worker.signal(signal.SIGTTOU)
    wait_for(lambda: worker.pool_stats().get("max-concurrency") == 1, timeout=20,
             message="TTOU to leave one slot")
    quick = case.send("work")
    # Celery holds it (no free slot) until a long task ends; then the pool queues it.
    case.open_gate(first)
    wait_for(lambda: worker.pool_stats().get("queued") == 1, timeout=30,
             message="the quick task to wait inside the pool")

    worker.signal(signal.SIGUSR2)
    wait_for(lambda: worker.broadcast("forkguard_status").get("paused"), timeout=20,
             message="USR2 to pause")
    worker.signal(signal.SIGCONT)
    wait_for(lambda: resumed(worker), timeout=20, message="CONT to resume")
    handed_back = worker.broadcast("forkguard_status").get("handed_back")
    case.open_gate(second)

    settled = case.settle(timeout=60)
    figures = case.report()
    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures)
    assert case.ledger.outcome(quick).state == "SUCCESS"
    assert case.runs(quick) == 1
    assert handed_back == 1, "the pause handed the queued task back to the broker"
