"""The master's bookkeeping under load and faults, on real workers and brokers.

Every task here counts its own runs in Redis (``proj.tally``), so "ran
twice" is a number the test reads, not a guess; waits are deadlines on
progress, so a stall fails fast and says where it stopped.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import psutil
import pytest
from celery.result import AsyncResult

from . import proj
from .conftest import (
    HUB_BROKERS,
    Worker,
    WorkerFactory,
    broker_params,
    outcome,
    pid_alive,
    started_pid,
    wait_for,
)

pytestmark = [
    pytest.mark.parametrize("broker", broker_params(*HUB_BROKERS), indirect=True),
    pytest.mark.timeout(300),
]

#: How long the pool may go without finishing a single task before it counts as stalled.
STALL = 30.0


def tallies(evidence: proj.Evidence, tag: str) -> dict[str, int]:
    """task id -> how many times it ran, for the tasks tagged *tag*."""
    raw = evidence.client.hgetall(f"{evidence.prefix}:tally:{tag}")
    return {task_id: int(runs) for task_id, runs in raw.items()}


def wait_for_tally(evidence: proj.Evidence, tag: str, count: int) -> dict[str, int]:
    """Wait until *count* tasks ran, failing if progress stops for STALL seconds."""
    done, last_change = 0, time.monotonic()
    while True:
        seen = tallies(evidence, tag)
        if len(seen) >= count:
            return seen
        if len(seen) > done:
            done, last_change = len(seen), time.monotonic()
        assert time.monotonic() - last_change < STALL, f"stalled at {done} of {count} tasks"
        time.sleep(0.1)


def fork_server_of(worker: Worker) -> psutil.Process:
    (server,) = [p for p in psutil.Process(worker.pid).children()
                 if "fork server" in " ".join(p.cmdline())]
    return server


# -- sustained load ------------------------------------------------------------------------


@pytest.mark.sustained
def test_thousands_of_tasks_over_several_rounds_never_stall_or_run_twice(
    start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    worker = start_worker(concurrency=2)
    for round_no in range(3):
        tag = f"load-{uuid.uuid4().hex}"
        with worker.app.producer_or_acquire() as producer:
            for _ in range(1000):
                worker.app.send_task(proj.task_name("tally"), args=(tag,), queue=worker.queue,
                                     producer=producer)
        runs = wait_for_tally(evidence, tag, 1000)
        assert sorted(set(runs.values())) == [1], f"round {round_no}: a task ran twice"
    stats = wait_for(lambda: (s := worker.stats()) and not s["pool"]["children"] and s,
                     timeout=STALL, message="the pool to be idle")
    assert stats["pool"]["queued"] == 0
    assert stats["pool"]["counts"]["forked"] >= 3000


def test_a_task_that_queues_a_long_one_as_its_last_act_is_not_held(
    start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    # The stall of old: the finished task's exit was read while the worker
    # waited for the long task's start, and set aside until its time limit.
    worker = start_worker(concurrency=2)
    tag = f"nap-{uuid.uuid4().hex}"
    for _ in range(10):
        parent = worker.send("spawn_nap", tag, 8)
        state, nap_id = outcome(parent, timeout=10)
        assert state == "SUCCESS", nap_id
        assert "failure" not in " ".join(evidence.events(parent.id))
        started_pid(evidence, nap_id)
        worker.revoke(nap_id, terminate=True, signal="SIGKILL")
        assert outcome(AsyncResult(nap_id, app=worker.app))[0] == "REVOKED"
    assert set(tallies(evidence, tag).values()) == {1}


# -- pause hands back only what the pool has not accepted -----------------------------------


def test_pause_with_a_task_queued_in_the_pool_runs_it_exactly_once(
    start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    worker = start_worker(concurrency=2)
    short, long = worker.send("sleeper", 2), worker.send("sleeper", 60)
    for result in (short, long):
        started_pid(evidence, result.id)
    os.kill(worker.pid, signal.SIGTTOU)  # one slot for two running tasks
    wait_for(lambda: worker.stats().get("pool", {}).get("max-concurrency") == 1,
             message="the pool to shrink")
    tag = f"pause-{uuid.uuid4().hex}"
    quick = worker.send("tally", tag)
    # When the short task ends, Celery hands the quick one to the pool, which
    # queues it: the long task still holds the only slot.
    wait_for(lambda: worker.stats().get("pool", {}).get("queued") == 1, timeout=15,
             message="the quick task to wait in the pool")
    os.kill(worker.pid, signal.SIGUSR2)
    wait_for(lambda: "paused by USR2" in worker.log(), message="the pause")
    os.kill(worker.pid, signal.SIGCONT)
    wait_for(lambda: "resumed by CONT" in worker.log(), message="the resume")
    worker.revoke(long.id, terminate=True, signal="SIGKILL")
    assert outcome(long)[0] == "REVOKED"
    assert outcome(quick)[0] == "SUCCESS"
    # A copy handed back to the broker would run before this later task.
    after = worker.send("tally", tag)
    assert outcome(after)[0] == "SUCCESS"
    assert tallies(evidence, tag) == {quick.id: 1, after.id: 1}


# -- a stuck fork server -------------------------------------------------------------------


def test_a_stopped_fork_server_is_replaced_without_freezing_the_worker(
    start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    worker = start_worker(env={"FORKGUARD_FORK_SERVER_TIMEOUT": "2"}, concurrency=2)
    running = worker.send("sleeper", 60)
    started_pid(evidence, running.id)
    old_server = fork_server_of(worker)
    old_server.suspend()  # SIGSTOP
    tag = f"stuck-{uuid.uuid4().hex}"
    waiting = worker.send("tally", tag)
    # The loop keeps serving remote control while the server does not answer.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert worker.ping(timeout=1.0), "the worker did not answer a ping within 1s"
        assert time.monotonic() - started < 1.5
    state, error = outcome(running, timeout=20)
    assert state == "FAILURE"
    assert "fork server did not answer a request within 2s" in str(error)
    # The request the stopped server never read runs once, on a new server.
    assert outcome(waiting, timeout=20)[0] == "SUCCESS"
    assert tallies(evidence, tag) == {waiting.id: 1}
    wait_for(lambda: not pid_alive(old_server.pid), message="the old server to be gone")
    assert fork_server_of(worker).pid != old_server.pid
    assert "killing it and 1 task process(es)" in worker.log()


# -- what a task does to its own process ----------------------------------------------------


def test_a_task_that_execs_is_recorded_with_a_hint(worker_c1: Worker) -> None:
    state, error = outcome(worker_c1.send("exec_true"))
    assert state == "FAILURE"
    assert "exitcode 0; the task's process exited without reporting" in str(error)
    assert "os.exec" in str(error)


def test_a_task_that_closes_all_fds_is_logged_with_a_hint(worker_c1: Worker) -> None:
    result = worker_c1.send("close_all_fds")
    # The child stored its own result before its pipe to the worker was found
    # closed; Celery's backend keeps a SUCCESS, and the worker says what happened.
    assert outcome(result) == ("SUCCESS", "closed")
    wait_for(lambda: "exitcode 73; the task ran, but its process could not send the outcome"
             in worker_c1.log(), message="the worker's explanation")


def test_a_program_the_task_execs_does_not_inherit_the_report_pipe(worker_c1: Worker) -> None:
    state, fds = outcome(worker_c1.send("exec_fds"))
    assert state == "SUCCESS"
    assert fds["own"], "the task should hold its report pipe"
    leaked = set(fds["own"].values()) & set(fds["exec"].values())
    assert not leaked, fds


def test_a_task_cannot_write_another_childs_intent(worker_c1: Worker) -> None:
    state, answer = outcome(worker_c1.send("write_intent"))
    assert (state, answer) == ("SUCCESS", "refused: only the worker writes forkguard's intents")


def test_a_result_larger_than_the_report_pipe_arrives_whole(worker_c1: Worker) -> None:
    state, value = outcome(worker_c1.send("big_result", 4 << 20))
    assert state == "SUCCESS" and len(value) == 4 << 20


def test_task_log_lines_name_the_pool_process_as_prefork_does(worker_c1: Worker) -> None:
    assert outcome(worker_c1.send("add", 1, 2)) == ("SUCCESS", 3)
    wait_for(lambda: "/ForkPoolWorker-1]" in worker_c1.log(),
             message="a log line from ForkPoolWorker-1")


@pytest.fixture
def worker_c1(start_worker: WorkerFactory) -> Worker:
    return start_worker(concurrency=1)
