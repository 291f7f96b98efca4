"""Case 6: bad inputs, one after another, to one worker that must keep serving.

- messages published raw to the queue: a body that is not JSON, a content
  type the worker does not accept (pickle), a JSON body without task
  headers, task headers with a body of the wrong shape;
- a task name the worker does not know;
- a task whose result neither JSON nor pickle can carry;
- a task that ``os.execv``s ``/bin/true``;
- a task that closes every fd but stdio and returns.

Each gets a clear recorded error, and a quick task sent after each one
succeeds.  Raw messages are refused by Celery before any pool sees them:
the worker logs why, and nothing is recorded.  The closed-fds task is
recorded where the pool can: its child stored its own SUCCESS in the result
backend before it found its report pipe gone, Celery never overwrites a
stored SUCCESS, so the pool's ``WorkerLostError`` ("could not send the
outcome") is in the worker's log (and in Celery's ``task_failure`` signal).
"""

from __future__ import annotations

import pwd
import shutil
from typing import Any

import pytest

from tests.chaos import chaos_app
from tests.chaos.case import Case
from tests.chaos.ledger import Outcome
from tests.chaos.workers import ChaosWorker, RunAs, nproc_limits
from tests.harness import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

#: Raw messages: (what, body, content type, headers, what the worker logs).
RAW = (
    ("not JSON", b"\x00\xff{not json", "application/json", {}, "Can't decode message body"),
    ("pickle, not accepted", b"\x80\x04garbage", "application/x-python-serialize", {},
     "Can't decode message body"),
    ("no task headers", b'{"hello": "world"}', "application/json", {},
     "Received and deleted unknown message"),
    # Celery rejects it before any pool sees it, and records nothing for its id.
    ("task headers, body of the wrong shape", b'"not [args, kwargs, embed]"',
     "application/json", {"id": "wrong-shape", "task": chaos_app.task_name("work")},
     "Received invalid task message"),
)


def publish_raw(case: Case, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    with case.app.connection_for_write() as conn:
        conn.Producer().publish(
            body, exchange=case.queue, routing_key=case.queue, content_type=content_type,
            content_encoding="binary", headers=headers, declare=[case.app.amqp.queues[case.queue]],
        )


def serves(case: Case) -> None:
    """A quick task still runs to the end."""
    task_id = case.send("work")
    wait_for(lambda: case.ledger.outcome(task_id).state == "SUCCESS", timeout=30,
             message="a quick task after a bad input")


def failure_of(case: Case, task_id: str) -> Outcome:
    """Its FAILURE, once recorded.

    Wait for FAILURE itself, not the first state: a task whose child stored
    its result and then could not report (closed fds) shows SUCCESS until
    the worker records what it saw.
    """
    wait_for(lambda: case.ledger.outcome(task_id).state == "FAILURE", timeout=30,
             message=f"{task_id} to be recorded FAILURE (now {case.ledger.outcome(task_id)})")
    return case.ledger.outcome(task_id)


def logged_lost(log: str, task_id: str) -> str:
    """The worker's log line recording *task_id* as lost because its outcome never came."""
    for line in log.splitlines():
        if f"Job: {task_id}" in line and "could not send the outcome" in line:
            return line.split("raised error: ", 1)[-1]
    return ""


def test_bad_inputs(open_case) -> None:
    case: Case = open_case("bad-inputs")
    worker = case.start_worker(concurrency=2)
    for what, body, content_type, headers, logged in RAW:
        before = worker.log().count(logged)
        publish_raw(case, body, content_type, headers)
        wait_for(lambda text=logged, n=before: worker.log().count(text) > n, timeout=20,
                 message=f"the worker to log {logged!r} for a message that is {what}")
        serves(case)

    unknown = case.send("no_such_task")
    assert failure_of(case, unknown).error_type == "NotRegistered"
    serves(case)

    unserialisable = failure_of(case, case.send("unserialisable"))
    assert "EncodeError" in unserialisable.error_type, unserialisable
    serves(case)

    execd = failure_of(case, case.send("exec_program"))
    assert execd.error_type == "WorkerLostError", execd
    assert "exec" in execd.error and "_exit" in execd.error, execd
    serves(case)

    # The child stored its own result before it found its report pipe closed;
    # Celery never overwrites a stored SUCCESS, so the pool's error is in the log.
    closed_fds = case.send("close_fds")
    wait_for(lambda: logged_lost(worker.log(), closed_fds), timeout=30,
             message="the worker to log the closed-fds task as lost")
    closed = case.ledger.outcome(closed_fds)
    assert (closed.state, closed.error) == ("SUCCESS", ""), closed
    serves(case)

    settled = case.settle(timeout=60)
    figures = case.report()
    for label, outcome in (("unserialisable", unserialisable), ("exec", execd)):
        print(f"  {label}: {outcome.error_type}: {outcome.error}")
    print(f"  closed fds: backend {closed.state}; log: {logged_lost(worker.log(), closed_fds)}")
    assert settled
    case.check(figures)
    assert worker.alive() and worker.ping()


# -- a shortage of processes (RLIMIT_NPROC) ----------------------------------------------------


def nobody() -> RunAs:
    """The unprivileged user the worker runs as: root is exempt from RLIMIT_NPROC."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run a worker as another user")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run a worker under RLIMIT_NPROC")
    return RunAs(entry.pw_uid, entry.pw_gid)


def fork_failures(worker: ChaosWorker) -> int:
    return int(worker.pool_stats().get("counts", {}).get("fork_failed", 0))


def test_fork_shortage_waits_and_recovers(open_case) -> None:
    """While the fork server cannot fork (EAGAIN), tasks wait; once it can, each runs once.

    The worker runs as ``nobody``; the test lowers its fork server's
    RLIMIT_NPROC (``prlimit``, run as the same user) below what that user
    already runs, so every fork fails, then restores it.  The shortage is
    logged once, not at every retry.
    """
    case: Case = open_case("nproc-shortage")
    user = nobody()
    worker = case.start_worker(concurrency=2, run_as=user)
    server = worker.fork_server()
    assert server is not None
    soft, hard = nproc_limits(server.pid)
    user.set_nproc(server.pid, 1, hard)
    tasks = [case.send("work") for _ in range(6)]
    # Several retries (0.1 s, 0.2 s, 0.4 s... apart) go by, each refused.
    wait_for(lambda: fork_failures(worker) >= 5, timeout=30, message="5 refused forks")
    assert not any(o.state for o in case.ledger.outcomes(tasks).values())

    user.set_nproc(server.pid, soft, hard)
    settled = case.settle(timeout=60)
    figures = case.report(notes=f"refused_forks={fork_failures(worker)}")

    assert settled, "the tasks did not run once forking worked again"
    case.check(figures)
    assert figures.done == len(tasks)
    log = worker.log()
    assert log.count("cannot fork") == 1, log
    assert "forking works again" in log, log
