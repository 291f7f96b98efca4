"""Celery's task semantics under ``-P forkguard``, on real workers and brokers.

Every test runs on each broker (Redis, RabbitMQ, and the filesystem
transport, which the pool drives from a thread instead of the event loop).
Most tests share one worker per broker (``worker``): each test sends its own
tasks and waits for all of them, so they cannot disturb each other.  Tests
that need a differently configured worker start their own.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import pytest
from celery import Celery
from celery.result import AsyncResult

from . import proj
from .conftest import (
    Worker,
    WorkerFactory,
    outcome,
    pid_alive,
    started_pid,
    wait_for,
)

# Worker boot (module fixtures) counts against the first test of each broker.
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def worker(start_module_worker: WorkerFactory) -> Worker:
    # -E: the events test listens to this worker too.
    return start_module_worker("-E", concurrency=3)


def signal_events(evidence: proj.Evidence, task_id: str, count: int) -> list[str]:
    """The *count* signal-handler records of a task, waited for."""
    return wait_for(lambda: len(evidence.events(task_id)) >= count and evidence.events(task_id),
                    message=f"{count} signal records of {task_id}")


def stored_state(worker: Worker, task_id: str) -> str:
    """The state in the result backend now, bypassing the client's cache."""
    return str(worker.app.backend.get_task_meta(task_id, cache=False)["status"])


def assert_worker_lost(worker: Worker, result: AsyncResult, status: str) -> None:
    """FAILURE with billiard's WorkerLostError naming *status*, as prefork records it."""
    state, error = outcome(result)
    assert state == "FAILURE", (state, error)
    assert type(error).__name__ == "WorkerLostError", repr(error)
    assert f"Worker exited prematurely: {status} Job: {result.id}." in str(error)
    # The child stored STARTED before it died: that must not be the last word.
    assert stored_state(worker, result.id) == "FAILURE"


def pid_of(record: str) -> int:
    return int(record.rsplit(":", 1)[1])


# -- 1. a fresh process per task ------------------------------------------------------------


def test_every_task_runs_in_its_own_fresh_child(worker: Worker, evidence: proj.Evidence) -> None:
    results = [worker.send("mutate_state") for _ in range(4)]
    reports = [outcome(r) for r in results]
    assert all(state == "SUCCESS" for state, _ in reports), reports
    pids = [value["pid"] for _, value in reports]
    assert len(set(pids)) == len(pids), f"a child ran two tasks: {pids}"
    assert worker.pid not in pids
    # Forked by the worker's fork server (or by the worker, without one).
    parents = {value["ppid"] for _, value in reports}
    assert len(parents) == 1 and worker.is_fork_parent(parents.pop()), reports
    # Each child bumped the module counter; none saw another's bump.
    assert [value["seen"] for _, value in reports] == [0, 0, 0, 0]
    assert [int(evidence.fields(r.id)["pid"]) for r in results] == pids
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), message="the children to exit")


# -- 2. results, states, retries and signals ------------------------------------------------


def test_success_stores_the_value_and_fires_task_success_in_the_child(
    worker: Worker, evidence: proj.Evidence,
) -> None:
    result = worker.send("add", 2, 3)
    assert outcome(result) == ("SUCCESS", 5)
    [record] = signal_events(evidence, result.id, 1)
    assert record.startswith("success:")
    assert pid_of(record) != worker.pid


def test_raising_task_is_failure_with_its_exception(
    worker: Worker, evidence: proj.Evidence,
) -> None:
    result = worker.send("boom", "kaput")
    state, error = outcome(result)
    assert state == "FAILURE"
    assert isinstance(error, ValueError) and str(error) == "kaput"
    assert "ValueError: kaput" in (result.traceback or "")
    [record] = signal_events(evidence, result.id, 1)
    assert record.startswith("failure:ValueError:")
    assert pid_of(record) != worker.pid


def test_retries_that_end_in_success(worker: Worker, evidence: proj.Evidence) -> None:
    result = worker.send("retry_until", 2, 3)
    assert outcome(result) == ("SUCCESS", 3)
    records = signal_events(evidence, result.id, 3)
    assert [r.split(":")[0] for r in records] == ["retry", "retry", "success"]
    pids = {pid_of(r) for r in records}
    assert len(pids) == 3 and worker.pid not in pids, records
    assert evidence.fields(result.id)["attempts"] == "3"


def test_retries_exhausted_end_in_failure(worker: Worker, evidence: proj.Evidence) -> None:
    result = worker.send("retry_until", 5, 2)
    state, error = outcome(result)
    assert state == "FAILURE"
    assert isinstance(error, RuntimeError) and str(error) == "attempt 3 failed"
    records = signal_events(evidence, result.id, 3)
    assert [r.split(":")[0] for r in records] == ["retry", "retry", "failure"]
    assert records[-1].startswith("failure:RuntimeError:")
    assert evidence.fields(result.id)["attempts"] == "3"


# -- 3. early ack, acks_late and reject_on_worker_lost --------------------------------------


def test_acks_late_reject_on_worker_lost_requeues_the_task(
    worker: Worker, evidence: proj.Evidence,
) -> None:
    result = worker.send("die_once_requeued")
    # The first delivery's child was SIGKILLed; the second one returns 2.
    assert outcome(result, timeout=30) == ("SUCCESS", 2)
    assert evidence.fields(result.id)["deliveries"] == "2"


@pytest.mark.parametrize("task", ["die_once_acks_late", "die_once_early_ack"])
def test_killed_child_without_reject_on_worker_lost_is_failure(
    worker: Worker, evidence: proj.Evidence, task: str,
) -> None:
    result = worker.send(task)
    assert_worker_lost(worker, result, "signal 9 (SIGKILL)")
    # The message is settled, not redelivered: a task sent after it runs,
    # and the lost one has still been delivered once.
    assert outcome(worker.send("add", 1, 1)) == ("SUCCESS", 2)
    assert evidence.fields(result.id)["deliveries"] == "1"


# -- 4. child deaths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "args", "status"),
    [
        ("die_once_early_ack", (), "signal 9 (SIGKILL)"),
        ("exit_with", (3,), "exitcode 3"),
        ("segfault", (), "signal 11 (SIGSEGV)"),
    ],
    ids=["sigkill", "exit3", "segfault"],
)
def test_child_death_is_worker_lost_failure(
    worker: Worker, evidence: proj.Evidence, task: str, args: tuple, status: str,
) -> None:
    result = worker.send(task, *args)
    assert_worker_lost(worker, result, status)
    assert not pid_alive(started_pid(evidence, result.id))
    wait_for(worker.ping, message="the worker to answer after its child's death")


# -- 5. time limits -------------------------------------------------------------------------


def assert_hard_time_limit(result: AsyncResult, evidence: proj.Evidence) -> None:
    state, error = outcome(result, timeout=30)
    assert state == "FAILURE", (state, error)
    assert type(error).__name__ == "TimeLimitExceeded", repr(error)
    pid = started_pid(evidence, result.id)
    wait_for(lambda: not pid_alive(pid), message=f"timed-out child {pid} to be gone")


def test_task_hard_time_limit_kills_the_child(worker: Worker, evidence: proj.Evidence) -> None:
    started = time.monotonic()
    assert_hard_time_limit(worker.send("hard_limited", 60), evidence)
    assert time.monotonic() - started < 20


def test_task_soft_time_limit_is_caught_by_the_task(worker: Worker) -> None:
    assert outcome(worker.send("soft_limited", 60), timeout=30) == (
        "SUCCESS", "caught soft limit",
    )


def test_worker_wide_time_limits(start_worker: WorkerFactory, evidence: proj.Evidence) -> None:
    limited = start_worker("--soft-time-limit=1", "--time-limit=3", concurrency=2)
    soft = limited.send("catch_soft", 60)
    hard = limited.send("ignore_soft", 60)
    assert outcome(soft, timeout=30) == ("SUCCESS", "caught soft limit")
    assert_hard_time_limit(hard, evidence)
    # The soft limit reached the task first, and the task ignored it.
    records = signal_events(evidence, hard.id, 1)
    assert records[0] == "soft-ignored"
    # Celery >= 5.5 also fires task_failure for a hard limit: in the worker, as under prefork.
    assert all(r == f"failure:TimeLimitExceeded:{limited.pid}" for r in records[1:]), records


# -- 6. revoke(terminate=True) --------------------------------------------------------------


def test_revoke_terminate_ends_only_that_task(worker: Worker, evidence: proj.Evidence) -> None:
    victim = worker.send("sleeper", 60)
    bystander = worker.send("sleeper", 3)
    victim_pid = started_pid(evidence, victim.id)
    bystander_pid = started_pid(evidence, bystander.id)
    revoked_at = time.time()
    worker.revoke(victim.id, terminate=True)
    assert outcome(victim, timeout=15)[0] == "REVOKED"
    wait_for(lambda: not pid_alive(victim_pid), message="the revoked task's child to be gone")
    assert outcome(bystander, timeout=15) == ("SUCCESS", "slept 3")
    # The bystander was still running when its neighbour was killed.
    assert float(evidence.fields(bystander.id)["finished"]) > revoked_at
    assert bystander_pid != victim_pid


# -- 7. task events -------------------------------------------------------------------------


class EventLog:
    """Celery events, received in a thread while the ``with`` block runs."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventLog:
        self._thread.start()
        assert self._ready.wait(15), "the event receiver did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)
        assert not self._thread.is_alive(), "the event receiver did not stop"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
                self._receiver = receiver
                started = receiver.on_consume_ready

                def on_ready(*args: Any, **kwargs: Any) -> None:
                    started(*args, **kwargs)  # with wakeup: ask workers for a heartbeat
                    self._ready.set()

                receiver.on_consume_ready = on_ready
                receiver.capture(limit=None, timeout=None, wakeup=True)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def types(self, **match: Any) -> list[str]:
        return [e["type"] for e in list(self.events)
                if all(e.get(k) == v for k, v in match.items())]


def test_task_events_are_sent(worker: Worker) -> None:
    with EventLog(worker.app) as log:
        # Events are live only once our worker's heartbeats come through.
        wait_for(lambda: log.types(hostname=worker.hostname), timeout=15,
                 message="an event from the worker")
        ok = worker.send("add", 20, 22)
        failed = worker.send("boom", "for the events")
        assert outcome(ok) == ("SUCCESS", 42)
        assert outcome(failed)[0] == "FAILURE"
        wait_for(lambda: "task-succeeded" in log.types(uuid=ok.id)
                 and "task-failed" in log.types(uuid=failed.id),
                 message="the final task events")
    assert log.types(uuid=ok.id) == ["task-received", "task-started", "task-succeeded"]
    assert log.types(uuid=failed.id) == ["task-received", "task-started", "task-failed"]


def test_failures_the_pool_records_name_the_error_in_events(worker: Worker) -> None:
    with EventLog(worker.app) as log:
        wait_for(lambda: log.types(hostname=worker.hostname), timeout=15,
                 message="an event from the worker")
        lost = worker.send("segfault")
        assert outcome(lost)[0] == "FAILURE"
        wait_for(lambda: "task-failed" in log.types(uuid=lost.id),
                 message="the task-failed event")
    [failed] = [e for e in log.events if e["type"] == "task-failed" and e["uuid"] == lost.id]
    # The error itself (not billiard's wrapper, "ExceptionWithTraceback()"), and its text.
    assert failed["exception"].startswith("WorkerLostError('Worker exited prematurely: "
                                          "signal 11 (SIGSEGV)"), failed
    assert "WorkerLostError: Worker exited prematurely: signal 11" in failed["traceback"]


# -- settle on report ---------------------------------------------------------------------


def test_the_outcome_and_the_slot_do_not_wait_for_the_child_to_exit(
    start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    worker = start_worker(concurrency=1)
    lingering = worker.send("linger", 4)
    assert outcome(lingering) == ("SUCCESS", started_pid(evidence, lingering.id))
    pid = int(evidence.fields(lingering.id)["pid"])
    wait_for(lambda: evidence.fields(lingering.id).get("shutdown_started"),
             message="the child to enter its shutdown handler")
    # One slot, still held by nothing: the next task runs while the first
    # child is in its worker_process_shutdown handler.
    assert outcome(worker.send("add", 2, 3)) == ("SUCCESS", 5)
    assert pid_alive(pid)
    assert "shutdown_finished" not in evidence.fields(lingering.id)
    # The handler is let finish: the child exits on its own, nothing is killed.
    wait_for(lambda: not pid_alive(pid), timeout=15, message=f"child {pid} to exit")
    assert "shutdown_finished" in evidence.fields(lingering.id)
    assert "has not exited" not in worker.log()
