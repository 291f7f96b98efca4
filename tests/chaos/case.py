"""One chaos case: its queue, its workers, what it sent, and its figure line.

A :class:`Case` gives each run a queue and an evidence prefix of its own, so
cases (and concurrent runs) never see each other's messages or counters.
:meth:`Case.close` (the fixture's teardown) stops every worker by process
group, fails if any process of theirs is left, deletes the queue, and deletes
the results and evidence of every id the case sent.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

from celery import Celery

from tests.chaos import chaos_app
from tests.chaos.brokers import BACKEND_URL, BROKER_URL, AmqpQueue, RedisQueue
from tests.chaos.chaos_app import RunEvidence
from tests.chaos.ledger import EARLY, LATE, Figures, Ledger
from tests.chaos.workers import ChaosWorker, RunAs, spawn_worker, wait_ready

#: Every figure line printed so far: the terminal summary repeats them.
FIGURES: list[str] = []


class Case:
    """A named fault case: client app, queue, evidence prefix, workers, ledger."""

    def __init__(self, name: str, log_dir: Path, broker_url: str = BROKER_URL) -> None:
        self.name = name
        self.began = time.monotonic()
        self.log_dir = log_dir
        token = uuid.uuid4().hex[:10]
        self.queue = f"fgchaos-{token}"
        self.env = {
            "FORKGUARD_CHAOS_BROKER": broker_url,
            "FORKGUARD_CHAOS_BACKEND": BACKEND_URL,
            "FORKGUARD_CHAOS_QUEUE": self.queue,
            "FORKGUARD_CHAOS_PREFIX": f"fgchaos:{token}",
        }
        self.app = Celery(f"fgchaos-client-{token}", set_as_current=False)
        self.app.conf.update(chaos_app.celery_config(self.env))
        self.evidence = RunEvidence(BACKEND_URL, self.env["FORKGUARD_CHAOS_PREFIX"])
        self.ledger = Ledger(BACKEND_URL, self.evidence)
        self.broker: Union[RedisQueue, AmqpQueue] = (
            RedisQueue(broker_url, self.queue) if broker_url.startswith("redis")
            else AmqpQueue(self.app, self.queue)
        )
        self.workers: list[ChaosWorker] = []
        self.gates: list[str] = []

    # -- workers -----------------------------------------------------------------------------

    def start_worker(self, *extra_args: str, concurrency: int = 2,
                     env: Optional[dict[str, str]] = None,
                     run_as: Optional[RunAs] = None) -> ChaosWorker:
        """Start a worker on this case's queue; return once it answers ``ping``."""
        worker = spawn_worker(self.app, {**self.env, **(env or {})}, self.log_dir, *extra_args,
                              concurrency=concurrency, run_as=run_as)
        self.workers.append(worker)
        return wait_ready(worker)

    # -- tasks -------------------------------------------------------------------------------

    def send(self, name: str, *args: Any, **options: Any) -> str:
        """Send the chaos_app task *name*; return its id (written down in the ledger)."""
        task_id = str(uuid.uuid4())
        self.ledger.add(task_id, ack_kind(name))
        self.app.send_task(chaos_app.task_name(name), args=args, task_id=task_id,
                           queue=self.queue, **options)
        return task_id

    def send_many(self, name: str, count: int, *args: Any) -> list[str]:
        """Send *count* tasks *name* over one producer (fast enough for thousands)."""
        kind = ack_kind(name)
        sent = []
        with self.app.producer_or_acquire() as producer:
            for _ in range(count):
                task_id = str(uuid.uuid4())
                self.ledger.add(task_id, kind)
                self.app.send_task(chaos_app.task_name(name), args=args, task_id=task_id,
                                   queue=self.queue, producer=producer)
                sent.append(task_id)
        return sent

    def gate(self) -> str:
        """A new gate for ``held`` tasks; teardown opens it if the test did not."""
        name = uuid.uuid4().hex
        self.gates.append(name)
        return name

    def open_gate(self, gate: str) -> None:
        self.evidence.client.set(self.evidence.gate_key(gate), "open", ex=3600)

    def runs(self, task_id: str) -> int:
        return self.ledger.runs([task_id])[task_id]

    def pid_of(self, task_id: str) -> int:
        return int(self.evidence.fields(task_id).get("pid") or 0)

    # -- the end -----------------------------------------------------------------------------

    def settle(self, timeout: float = 300.0) -> bool:
        """Wait until every id is over and nothing of this case is left in the broker."""
        return self.ledger.settle(lambda left: not left and self.broker.depth() == 0, timeout)

    def report(self, name: Optional[str] = None, notes: str = "") -> Figures:
        """Count what became of every id, print the figure line, and return the figures."""
        seconds = time.monotonic() - self.began
        figures = self.ledger.figures(name or self.name, seconds, self.broker.task_ids(), notes)
        line = figures.line()
        FIGURES.append(line)
        print(f"\n{line}", flush=True)
        return figures

    def check(self, figures: Figures, transport_lost: frozenset[str] = frozenset(),
              transport_twice: frozenset[str] = frozenset()) -> None:
        """What holds in every case: nothing lost, no early-ack task ran twice.

        *transport_lost* are ids the broker dropped before any worker received
        them (see :meth:`never_received`): not the pool's to lose.
        *transport_twice* are ids the broker delivered again after Celery
        failed to ack them (see :meth:`redelivered_after_failed_ack`).
        """
        lost = [i for i in figures.lost_ids if i not in transport_lost]
        assert not lost, f"lost {len(lost)}: {lost[:10]}"
        twice = [i for i in figures.twice_ids if i not in transport_twice]
        assert not twice, f"ran twice {len(twice)}: {twice[:10]}"

    def redelivered_after_failed_ack(self, ids: list[str]) -> frozenset[str]:
        """The ids whose early ack failed before kombu gave messages back.

        Celery logs such a failure ("Couldn't ack 'TAG'") and kombu keeps the
        message as unacknowledged; when it then closes the channel ("Restoring
        N unacknowledged message(s)") with the broker back already, the broker
        delivers it again: early ack is at most once only if the ack arrives.
        A task the pool started after the connection was lost (a job it should
        have dropped) fails its ack after that, so it does not count.
        The worker notes delivery tags when started with FORKGUARD_CHAOS_NOTE_TAGS
        (``chaos_app``).
        """
        logs = [worker.log() for worker in self.workers]
        tags = {i: self.evidence.fields(i).get("delivery_tag") for i in ids}
        return frozenset(i for i, tag in tags.items()
                         if tag and any(_failed_before_restore(log, tag) for log in logs))

    def never_received(self, ids: list[str]) -> frozenset[str]:
        """The ids no worker of this case logged as received (its log is at INFO)."""
        logs = "".join(worker.log() for worker in self.workers)
        return frozenset(i for i in ids if f"[{i}] received" not in logs)

    def close(self) -> None:
        for gate in self.gates:
            self.open_gate(gate)
        problems = []
        for worker in self.workers:
            leftovers = worker.stop()
            if leftovers:
                problems.append(f"{worker.hostname} left processes {leftovers}")
        self.broker.delete()
        if self.gates:
            self.evidence.client.delete(*(self.evidence.gate_key(g) for g in self.gates))
        self.ledger.forget()
        self.app.close()
        assert not problems, "; ".join(problems)


def ack_kind(name: str) -> str:
    """How the chaos_app task *name* acknowledges (only ``work_late`` acks late)."""
    return LATE if name == "work_late" else EARLY


class Stream(threading.Thread):
    """Sends *count* tasks, one every ``gap()`` seconds, while the test injects faults.

    *make* sends one task.  Sending holds *lock*, so a fault that must not
    overlap a publish (a broker restart) takes the lock too.
    """

    def __init__(self, make: Callable[[int], Any], count: int, gap: Callable[[], float],
                 lock: Optional[threading.Lock] = None) -> None:
        super().__init__(name="chaos-stream", daemon=True)
        self.make = make
        self.count = count
        self.gap = gap
        self.lock = lock or threading.Lock()
        self.sent = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            for i in range(self.count):
                with self.lock:
                    self.make(i)
                self.sent += 1
                time.sleep(self.gap())
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 120.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"the stream sent only {self.sent} of {self.count}"
        if self.error is not None:
            raise self.error


def jitter(low: float, high: float) -> Callable[[], float]:
    """A random gap: fault injection, never synchronisation."""
    return lambda: random.uniform(low, high)


def _failed_before_restore(log: str, tag: str) -> bool:
    """The ack of *tag* failed while the consumer still held its connection,
    and kombu gave the unacknowledged messages back afterwards."""
    failed = log.find(f"Couldn't ack {tag!r}")
    if failed < 0:
        return False
    connected = log.rfind("Connected to", 0, failed)
    lost = log.rfind("Connection to broker lost", 0, failed)
    return connected > lost and log.find("Restoring", failed) >= 0
