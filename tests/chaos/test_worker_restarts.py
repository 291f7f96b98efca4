"""Case 2: the worker is stopped (TERM, QUIT, KILL) and started again, cycle after cycle.

Tasks stream into one queue while, in each cycle, the worker is stopped
mid-stream and a new one started on the same queue:

- ``TERM``: Celery's warm shutdown. Running tasks finish; prefetched ones go
  back to the broker unacknowledged.
- ``QUIT``: Celery's cold shutdown.  Celery 5.5+ cancels running tasks: an
  early-ack one is recorded RETRY "cancelled by Celery" and never runs again
  (counted as ``cancelled``); an ``acks_late`` one is left unacknowledged and
  runs again on the next worker.
- ``KILL`` (SIGKILL to the worker): nothing of the worker may outlive it, and
  only ``acks_late`` tasks are in flight.  An early-ack task running in a
  SIGKILLed worker was acknowledged and is gone with it, which is Celery's
  at-most-once; so KILL cycles first let the queue drain, then send
  ``acks_late`` tasks only.

The broker is RabbitMQ: it requeues what a dead connection held at once.  On
Redis the messages a SIGKILLed worker held wait for the visibility timeout
(an hour by default), and one its pending BRPOP had taken can be lost, which
is the transport, not the pool.
"""

from __future__ import annotations

import random
import signal
import subprocess

import pytest

from tests.chaos.case import Case
from tests.chaos.ledger import EARLY
from tests.chaos.workers import ChaosWorker
from tests.harness import session_pids, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

CYCLES = ("TERM", "QUIT", "KILL", "TERM", "QUIT", "KILL")
BATCH = 40
CONCURRENCY = 2
#: A warm stop waits for running tasks (under 0.2 s each here).
EXIT_TIMEOUT = 30


def send_batch(case: Case, late_only: bool) -> list[str]:
    sent = []
    for _ in range(BATCH):
        late = late_only or random.random() < 0.5
        sent.append(case.send("work_late" if late else "work", random.uniform(0.02, 0.15)))
    return sent


def finished_count(case: Case, ids: list[str]) -> int:
    outcomes = case.ledger.outcomes(ids)
    return sum(case.ledger.finished(i, o) for i, o in outcomes.items())


def stop_worker(worker: ChaosWorker, how: str) -> list[str]:
    """Stop the worker mid-stream; return what went wrong (it must exit, cleanly unless
    KILLed, and leave no process behind)."""
    signum = getattr(signal, f"SIG{how}")
    worker.signal(signum)
    try:
        code = worker.wait_exit(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Where is it stuck?  Its faulthandler prints every thread's stack on SIGABRT.
        worker.signal(signal.SIGABRT)
        worker.wait_exit(timeout=EXIT_TIMEOUT)
        return [f"{how}: the worker did not exit within {EXIT_TIMEOUT}s; its stacks "
                f"(SIGABRT):\n{worker.log()[-6000:]}"]
    problems = []
    if code != (-signum if how == "KILL" else 0):
        problems.append(f"{how}: exit code {code}")
    for line in worker.log().splitlines():
        if "Unrecoverable error" in line:
            problems.append(f"{how}: {line}")
    # The fork server and the task children die with the worker (PR_SET_PDEATHSIG).
    wait_for(lambda: not session_pids(worker.pid), timeout=10,
             message=f"the processes of the worker stopped by {how} to be gone")
    return problems


def run_cycle(case: Case, how: str) -> list[str]:
    worker = case.start_worker(concurrency=CONCURRENCY, env={"PYTHONFAULTHANDLER": "1"})
    if how == "KILL":
        # Drain first: an early-ack task running at SIGKILL is gone by definition.
        wait_for(lambda: not case.ledger.unfinished(), timeout=90,
                 message="the queue to drain before a KILL cycle")
    batch = send_batch(case, late_only=how == "KILL")
    # Stop mid-stream: once a quarter of this batch is over.
    wait_for(lambda: finished_count(case, batch) >= BATCH // 4, timeout=60,
             message=f"a quarter of the batch before {how}")
    return stop_worker(worker, how)


def test_term_quit_kill_cycles(open_case, rabbitmq_url: str) -> None:
    case: Case = open_case("worker-restarts", broker_url=rabbitmq_url)
    problems = [problem for how in CYCLES for problem in run_cycle(case, how)]
    last = case.start_worker(concurrency=CONCURRENCY)

    settled = case.settle(timeout=120)
    figures = case.report(f"worker-restarts ({' '.join(CYCLES)})",
                          notes=f"stop_problems={len(problems)}")

    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures)
    outcomes = case.ledger.outcomes()
    # Early-ack tasks end SUCCESS, or cancelled (Celery) or killed (the pool) by a cold
    # shutdown, never to run again; acks_late ones all succeed.
    unexpected = {i: o for i, o in outcomes.items()
                  if o.state != "SUCCESS"
                  and not ((o.cancelled or o.cold_killed) and case.ledger.kinds[i] == EARLY)}
    assert not unexpected, list(unexpected.items())[:5]
    assert last.alive() and last.ping()
    assert not problems, "\n".join(problems)
