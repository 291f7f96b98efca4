"""Case 4: the fork server stops answering (SIGSTOP) while tasks stream.

The worker runs with ``FORKGUARD_FORK_SERVER_TIMEOUT=3``.  Two long tasks
hold slots in children of the fork server; short tasks stream through the
third slot.  Then the fork server gets SIGSTOP: it neither forks nor reaps.

Expected: the worker's loop never waits on the server, so it keeps
answering ``ping`` (each within 1 s) during the stall; within the timeout
(3 s from a request it left unanswered, or from a child exit it did not
report) the worker SIGKILLs the server and its children, records their tasks
FAILURE with a ``WorkerLostError`` that names the fork server, logs what
happened, starts a new server and carries on.  No task runs twice.
"""

from __future__ import annotations

import random
import signal
import time

import psutil
import pytest

from tests.chaos.case import Case, Stream, jitter
from tests.chaos.workers import ChaosWorker
from tests.harness import pid_alive, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

TIMEOUT = 3
TASKS = 150
CONCURRENCY = 3
#: Room for a loaded two-core machine between the timeout and the worker acting on it.
MARGIN = 5.0


def test_stopped_fork_server_is_replaced(open_case) -> None:
    case: Case = open_case("fork-server-stall")
    worker = case.start_worker(concurrency=CONCURRENCY,
                               env={"FORKGUARD_FORK_SERVER_TIMEOUT": str(TIMEOUT)})
    gate = case.gate()
    holders = [case.send("held", gate) for _ in range(CONCURRENCY - 1)]
    holder_pids = [wait_for(lambda t=t: case.pid_of(t), timeout=30, message="a held task")
                   for t in holders]
    stream = Stream(lambda i: case.send("work", random.uniform(0.01, 0.05)), TASKS,
                    jitter(0.01, 0.05))
    stream.start()
    wait_for(lambda: case.ledger.finished_count() >= 20, timeout=60, message="the stream to flow")

    server = worker.fork_server()
    assert server is not None
    server.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    pings = ping_until_replaced(worker, server.pid)
    replaced_after = time.monotonic() - stopped
    stream.finish()

    settled = case.settle(timeout=120)
    figures = case.report(notes=f"pings={len(pings)} slowest_ping={max(pings):.2f}s "
                                f"replaced_after={replaced_after:.1f}s")

    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures)
    assert max(pings) < 1.0, pings
    assert replaced_after < TIMEOUT + MARGIN, replaced_after
    # The stopped server and every child of it are gone; the held tasks were lost with them.
    for pid in (server.pid, *holder_pids):
        wait_for(lambda p=pid: not pid_alive(p), timeout=10, message=f"pid {pid} to be gone")
    outcomes = case.ledger.outcomes()
    for task_id in holders:
        assert outcomes[task_id].error_type == "WorkerLostError", outcomes[task_id]
    for outcome in outcomes.values():
        if outcome.state != "SUCCESS":
            assert outcome.state == "FAILURE" and "fork server" in outcome.error, outcome
    assert f"the fork server (pid {server.pid})" in worker.log()
    assert worker.alive() and worker.ping()



def ping_until_replaced(worker: ChaosWorker, old_server: int) -> list[float]:
    """Ping the worker until a new fork server serves it; return each ping's time.

    A ping that got no answer within its 1 s counts as 1 s (and fails the test).
    """
    times: list[float] = []
    deadline = time.monotonic() + TIMEOUT + 3 * MARGIN
    while time.monotonic() < deadline:
        began = time.monotonic()
        answered = worker.ping(timeout=1.0)
        times.append(time.monotonic() - began if answered else 1.0)
        if new_server_serves(worker, old_server):
            return times
        time.sleep(0.05)  # a probe's pace, not synchronisation
    raise AssertionError(f"no new fork server after {time.monotonic() - deadline:.0f}s:\n"
                         f"{worker.log()[-3000:]}")


def new_server_serves(worker: ChaosWorker, old_server: int) -> bool:
    server = worker.fork_server()
    if server is None or server.pid == old_server:
        return False
    try:
        return server.status() != psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False
