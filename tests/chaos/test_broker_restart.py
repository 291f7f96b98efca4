"""Case 3: the broker (a Redis of our own) restarts while early-ack tasks stream.

The private ``redis-server`` keeps an append-only file, so what is queued
survives the restart; results and evidence live on the shared Redis, which
stays up.  The worker loses its connection, reconnects (Celery retries), and
carries on.  The pool drops the jobs still waiting for a slot (Celery calls
``flush``): their messages were never acked and the broker delivers them
again, so running them too would run them twice.

Two things the Redis *transport* does at a restart are counted apart:

- ``stranded``: prefetched messages kombu tried to give back as the
  connection closed, while Redis was down ("Restoring N unacknowledged
  message(s)" then a connection error).  They stay in Redis's ``unacked``
  hash, never started, until a worker restores them after the visibility
  timeout (an hour by default).  The test restores them itself as
  ``restore_visible`` would, and they must then run once.
- ``ack_lost``: a task that started as Redis went down; Celery's early ack
  failed ("Couldn't ack"), so its message is still unacked although the task
  ran.  After the visibility timeout Redis would deliver it again: early ack
  is at most once only if the ack reaches the broker.  The test leaves them
  unacked and checks they ran once.
- ``ack_restored``: the same failed ack, but kombu closed the channel once
  Redis was back, so its "Restoring N unacknowledged message(s)" succeeded
  and Redis delivered the message again at once: the task ran twice, both
  runs from the broker's deliveries.  Under prefork the same happens (the
  ack and the restore are the worker's, not the pool's); the test allows a
  second run only for a task whose delivery tag the worker logged in
  "Couldn't ack".

The test's sender never publishes while the broker restarts (it holds the
same lock), so a publish that failed was never half-done and its retry
cannot queue a second copy.
"""

from __future__ import annotations

import random
import threading

import pytest

from tests.chaos.brokers import PrivateRedis, RedisQueue
from tests.chaos.case import Case, Stream, jitter
from tests.chaos.workers import ChaosWorker
from tests.harness import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

TASKS = 300
RESTARTS = 2
CONCURRENCY = 2
#: kombu's Redis channel, closing after the connection is gone, can fail to
#: give its messages back (it builds a client from a connection already
#: released: "'NoneType' object has no attribute 'hostname'"), and Celery's
#: worker stops with "Unrecoverable error", under prefork as under forkguard.
#: The case then starts another worker, as a supervisor would.
KOMBU_CLOSE_CRASH = ("Unrecoverable error: "
                     "AttributeError(\"'NoneType' object has no attribute 'hostname'\")")


def test_redis_restart_mid_stream(open_case, private_redis: PrivateRedis) -> None:
    case: Case = open_case("redis-restart", broker_url=private_redis.url(0))
    worker = start_worker(case)
    lock = threading.Lock()
    stream = Stream(lambda i: case.send("work", random.uniform(0.01, 0.08)), TASKS,
                    jitter(0.0, 0.04), lock)
    stream.start()
    for restart in range(1, RESTARTS + 1):
        # Restart mid-stream: once the worker has finished a share of the tasks.
        share = TASKS * restart // (RESTARTS + 1)
        wait_for(lambda n=share: case.ledger.finished_count() >= n, timeout=120,
                 message=f"progress before restart {restart}")
        with lock:
            private_redis.restart()
        wait_for(lambda r=restart: all_logs(case).count("Connection to broker lost") >= r,
                 timeout=30, message=f"the worker to see restart {restart}")
        worker = replaced_if_kombu_crashed(case, worker)
    stream.finish()

    assert isinstance(case.broker, RedisQueue)
    drained = wait_drained(case, worker)
    stranded, ack_lost = split_unacked(case, case.broker.unacked())
    case.broker.restore(case.app, stranded)
    settled = drained and case.ledger.settle(
        lambda left: not left and not case.broker.ready_ids(), timeout=120)
    figures = case.report(notes=f"stranded={len(stranded)} ack_lost={len(ack_lost)}")
    ack_restored = case.redelivered_after_failed_ack(figures.twice_ids)
    if ack_restored:
        print(f"ack_restored={len(ack_restored)}: ran again after a failed early ack")

    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures, transport_twice=ack_restored)
    assert all(case.runs(task_id) == 2 for task_id in ack_restored)
    assert figures.done == TASKS, "every early-ack task ran to the end"
    # What is left unacked ran once, and Celery logged that its ack failed.
    assert set(case.broker.unacked()) == set(ack_lost)
    for tag in ack_lost:
        assert f"Couldn't ack {tag!r}" in all_logs(case), tag
    assert worker.alive() and worker.ping()


def start_worker(case: Case) -> ChaosWorker:
    return case.start_worker(concurrency=CONCURRENCY, env={"FORKGUARD_CHAOS_NOTE_TAGS": "1"})


def all_logs(case: Case) -> str:
    return "".join(worker.log() for worker in case.workers)


def replaced_if_kombu_crashed(case: Case, worker: ChaosWorker) -> ChaosWorker:
    """*worker* once it reconnected, or a new one if kombu's close crash stopped it."""
    def settled() -> bool:
        log = worker.log()
        return ("Unrecoverable error" in log
                or log.rfind("Connected to") > log.rfind("Connection to broker lost"))

    wait_for(settled, timeout=60, message="the worker to reconnect")
    if "Unrecoverable error" not in worker.log():
        return worker
    assert KOMBU_CLOSE_CRASH in worker.log(), "the worker stopped of something else"
    worker.proc.wait(timeout=60)  # its warm stop lets running tasks finish
    print("kombu's close crash stopped the worker: a new one takes over")
    return start_worker(case)



def wait_drained(case: Case, worker: ChaosWorker) -> bool:
    """Wait until the worker is idle, nothing waits in the queue, and what is
    not over is in Redis's unacked hash (where only a restore gets it out)."""
    assert isinstance(case.broker, RedisQueue)
    broker = case.broker

    def quiet(left: list[str]) -> bool:
        return (not broker.ready_ids() and set(left) <= set(broker.unacked().values())
                and worker.idle())

    return case.ledger.settle(quiet, timeout=120)


def split_unacked(case: Case, unacked: dict[str, str]) -> tuple[list[str], list[str]]:
    """Delivery tags of unacked messages whose task never ran, and of those that ran."""
    runs = case.ledger.runs(unacked.values())
    never = [tag for tag, task_id in unacked.items() if runs[task_id] == 0]
    ran = [tag for tag, task_id in unacked.items() if runs[task_id] > 0]
    return never, ran
