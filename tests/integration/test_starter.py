"""``celery forkguard starter`` and ``forkguard reload`` through the real ``celery`` command.

Each test runs ``tests/deploy_app.py`` from a release directory of its own
(:class:`tests.starter_run.StarterRun`): its tasks return ``release.VERSION``
from the ``release.py`` beside it, which a test rewrites before a reload, and
record each run in a Redis ledger.  Redis DB 10 is the broker, DB 11 holds
results and the ledger; every run has its own queue, node name and ledger
prefix.  The reload test (1) also runs on RabbitMQ.

Covered: a reload while an acks_late and an early-ack task run (both end
once on the old release, new tasks get the new one, the old generation
retires with exit 0); a bad deploy (the old generation serves on) then a
fixed one; ``forkguard reload`` on a starter's worker and on a plain
worker; TERM with ``forkguard_term_child`` (the task is requeued); a
generation killed with SIGKILL (restarted); a retire bounded by
``forkguard_retire_timeout`` (acks_late requeued and run again by the new
generation, early-ack recorded failed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.harness import session_pids
from tests.starter_run import StarterRun, wait_gone

from .conftest import (
    RABBITMQ_URL,
    REDIS_BROKER_URL,
    REDIS_RESULTS_URL,
    Broker,
    broker_params,
    outcome,
    pid_alive,
    require_service,
    wait_for,
)

#: Room for a loaded two-core machine on top of what a test waits for.
MARGIN = 15.0
#: How long the tasks of the reload test run: long enough to outlast a new generation's boot.
OVERLAP_TASK = 5.0

Start = Callable[..., StarterRun]


def _broker(name: str) -> Broker:
    chosen = Broker(name, {"redis": REDIS_BROKER_URL, "rabbitmq": RABBITMQ_URL}[name],
                    backend=REDIS_RESULTS_URL)
    problem = chosen.problem()
    if problem:
        require_service(problem)
    return chosen


@pytest.fixture(params=broker_params("redis"))
def deploy_broker(request: pytest.FixtureRequest) -> Broker:
    return _broker(request.param)


@pytest.fixture
def start(deploy_broker: Broker, tmp_path: Path) -> Iterator[Start]:
    """``start(env=..., command=..., wait=...)`` -> a started :class:`StarterRun`.

    At teardown every run is stopped; the test fails if anything of a run
    (the starter, a generation, a task child) was left.  The logs are printed
    (pytest shows them when the test failed).
    """
    made: list[StarterRun] = []

    def make(env: dict[str, str] | None = None, command: str = "starter",
             wait: bool = True, **kwargs: object) -> StarterRun:
        run = StarterRun(tmp_path, deploy_broker.url, deploy_broker.backend, REDIS_RESULTS_URL,
                         env=env, command=command, **kwargs)  # type: ignore[arg-type]
        made.append(run)
        return run.start(wait=wait)

    yield make
    problems = []
    for run in made:
        leftovers = run.stop()
        print(f"--- log of {run.command} {run.hostname} ---\n{run.tail()}")
        if leftovers:
            problems.append(f"{run.command} {run.hostname} left processes {leftovers}")
    assert not problems, "; ".join(problems)


def _value(result, timeout: float = 30.0) -> object:  # type: ignore[no-untyped-def]
    state, value = outcome(result, timeout=timeout)
    assert state == "SUCCESS", f"task {result.id}: {state} {value!r}"
    return value


def _stop_cleanly(run: StarterRun) -> None:
    """TERM the starter: it exits 0 once its generations did, leaving nothing."""
    run.signal(signal.SIGTERM)
    assert run.wait_exit(MARGIN) == 0, run.tail()
    run.wait_log(r"every generation has exited; exit 0", timeout=5, exited_ok=True)
    for pid in run.generations().values():
        wait_gone(pid, timeout=5)


# -- (1) a reload while tasks run ----------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("deploy_broker", broker_params("redis", "rabbitmq"), indirect=True)
def test_reload_lets_running_tasks_finish_on_the_old_release(start: Start) -> None:
    run = start()
    gen1 = run.generations()[1]
    late = run.send("late", OVERLAP_TASK)
    early = run.send("early", OVERLAP_TASK)
    run.wait_started(late, early)

    run.deploy("v2")
    run.hup()
    gen2 = run.generation_pid(2)
    run.wait_log(rf"generation 2 \(pid {gen2}\) is consuming .*; retiring generation 1 "
                 rf"\(pid {gen1}\)", timeout=MARGIN)
    run.wait_log(rf"generation 1 \(pid {gen1}\) stopped consuming; 2 task\(s\) still running",
                 timeout=MARGIN)

    # The starter's title names both generations while the old one retires.
    title = wait_for(lambda: run.title() if "retiring" in run.title() else "", timeout=5,
                     message="the starter's title to show the retiring generation")
    assert f"generation 2 current (pid {gen2})" in title, title
    assert f"generation 1 retiring (pid {gen1}, 2 task(s) running)" in title, title
    assert title.startswith("celery forkguard starter: "), title
    assert pid_alive(gen1)

    # Both answer remote control: the new one as the node name, the retiring one
    # as its generation's name (the node name's mailbox cannot be shared).
    name, host = run.hostname.split("@")
    gen1_name = f"{name}.g1@{host}"
    done = run.forkguard("status", "-d", f"{run.hostname},{gen1_name}", "-j")
    assert done.returncode == 0, (done.stdout, done.stderr)
    replies = json.loads(done.stdout)
    assert replies[run.hostname]["generation"] == 2, replies
    assert not replies[run.hostname]["retiring"], replies
    assert replies[gen1_name]["generation"] == 1, replies
    assert replies[gen1_name]["retiring"], replies
    assert replies[gen1_name]["mailbox"] == gen1_name, replies
    assert len(replies[gen1_name]["running"]) == 2, replies

    # Sent after the old generation stopped consuming: the new release runs them.
    after = [run.send("late"), run.send("early"), run.send("late"), run.send("early")]
    assert [_value(r) for r in after] == ["v2"] * 4

    # The running tasks ended once, on the old release.
    assert _value(late, OVERLAP_TASK + MARGIN) == "v1"
    assert _value(early, OVERLAP_TASK + MARGIN) == "v1"
    for result in (late, early):
        assert run.runs(result.id) == 1
        assert [r["version"] for r in run.done(result.id)] == ["v1"]
    for result in after:
        assert run.runs(result.id) == 1

    run.wait_log(rf"generation 1 \(pid {gen1}\) retired \(exit 0\) after", timeout=MARGIN)
    wait_gone(gen1, timeout=5)
    assert run.title() == f"celery forkguard starter: generation 2 current (pid {gen2})"
    _stop_cleanly(run)


# -- (2) a bad deploy ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bad_deploy_keeps_the_old_generation_serving(start: Start) -> None:
    run = start()
    gen1 = run.generations()[1]
    run.deploy_text('VERSION = "v2"\ndef broken(:\n')
    run.hup()
    gen2 = run.generation_pid(2)
    run.wait_log(rf"deploy failed: generation 2 \(pid {gen2}\) exited \(exit \d+\) before "
                 rf"consuming; generation 1 \(pid {gen1}\) keeps serving", timeout=MARGIN)
    wait_gone(gen2, timeout=5)
    assert _value(run.send("late")) == "v1"
    assert _value(run.send("early")) == "v1"
    assert run.proc is not None and run.proc.poll() is None
    assert run.title() == f"celery forkguard starter: generation 1 current (pid {gen1})"

    # The fix, deployed: the next HUP works.
    run.deploy("v3")
    # (With the fix on disk, `celery -A deploy_app` loads again.)  Generation 1 took its
    # node name's mailbox back once generation 2 was gone.
    run.wait_log(rf"remote control answers as {re.escape(run.hostname)} again", timeout=5)
    done = run.forkguard("status", "-d", run.hostname, "-j")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout)[run.hostname]["generation"] == 1
    run.hup()
    gen3 = run.generation_pid(3)
    run.wait_log(rf"generation 3 \(pid {gen3}\) is consuming", timeout=MARGIN)
    run.wait_log(rf"generation 1 \(pid {gen1}\) stopped consuming", timeout=MARGIN)
    assert _value(run.send("early")) == "v3"
    run.wait_log(rf"generation 1 \(pid {gen1}\) retired \(exit 0\)", timeout=MARGIN)
    _stop_cleanly(run)


# -- (3) forkguard reload ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reload_command(start: Start) -> None:
    run = start(wait=False)
    plain = start(command="worker", wait=False)
    run.wait_ready()
    plain.wait_ready()
    gen1 = run.generations()[1]
    run.deploy("v2")

    done = run.reload_command(run.hostname, plain.hostname)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines.get(run.hostname) == (
        f"reload requested from starter pid {run.pid} (this is generation 1)"), done.stdout
    assert lines.get(plain.hostname, "").startswith(
        "ERROR not run by `celery forkguard starter`"), done.stdout

    gen2 = run.generation_pid(2)
    run.wait_log(rf"reload \(forkguard_reload via generation 1 \(pid {gen1}\)\): "
                 rf"started generation 2 \(pid {gen2}\)", timeout=5)
    run.wait_log(rf"generation 1 \(pid {gen1}\) stopped consuming", timeout=MARGIN)
    assert _value(run.send("early")) == "v2"
    run.wait_log(rf"generation 1 \(pid {gen1}\) retired \(exit 0\)", timeout=MARGIN)
    # The plain worker was not touched: still the same process, still serving.
    assert plain.proc is not None and plain.proc.poll() is None
    assert _value(plain.send("early")) == "v1"
    _stop_cleanly(run)


# -- (4) TERM with term_child --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_term_with_term_child_requeues_the_running_task(start: Start) -> None:
    run = start(env={"FORKGUARD_TERM_CHILD": "1", "FORKGUARD_TERM_TIMEOUT": "1"})
    gen1 = run.generations()[1]
    late = run.send("late", 30)
    run.wait_started(late)
    termed = time.monotonic()
    run.signal(signal.SIGTERM)
    code = run.wait_exit(MARGIN)
    took = time.monotonic() - termed
    assert took < 10, f"the starter took {took:.1f}s to exit\n{run.tail()}"
    assert code == 0, run.tail()
    run.wait_log(rf"generation 1 \(pid {gen1}\) stopped \(exit 0\)", timeout=5, exited_ok=True)
    wait_gone(gen1, timeout=5)
    # Not lost: back on the queue for the next worker, and it never finished.
    assert wait_for(lambda: late.id in run.queued_ids(), timeout=5,
                    message="the task to be back on the queue")
    assert run.runs(late.id) == 1
    assert run.done(late.id) == []


# -- (5) a generation killed ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_killed_generation_is_restarted(start: Start) -> None:
    run = start()
    gen1 = run.generations()[1]
    os.kill(gen1, signal.SIGKILL)
    run.wait_log(rf"generation 1 \(pid {gen1}\) died unexpectedly \(killed by SIGKILL\) after",
                 timeout=MARGIN)
    run.wait_log(r"restarting in 1s", timeout=5)
    # Its fork server follows it (PR_SET_DEATHSIG), and the starter reaps it.
    wait_for(lambda: not session_pids(gen1), timeout=10, message="generation 1's session to end")
    gen2 = run.generation_pid(2, timeout=MARGIN)
    run.wait_log(rf"restart: started generation 2 \(pid {gen2}\)", timeout=5)
    run.wait_log(rf"generation 2 \(pid {gen2}\) is consuming", timeout=MARGIN)
    assert _value(run.send("late")) == "v1"
    assert _value(run.send("early")) == "v1"
    assert run.title() == f"celery forkguard starter: generation 2 current (pid {gen2})"
    _stop_cleanly(run)


# -- (6) a retire bounded by forkguard_retire_timeout --------------------------------------

#: The acks_late task runs again, whole, in the new generation: kept short for the suite's time.
LONG_LATE = 6.0
LONG_EARLY = 30.0


@pytest.mark.timeout(90)
def test_retire_timeout_stops_long_tasks(start: Start) -> None:
    run = start(env={"FORKGUARD_RETIRE_TIMEOUT": "1", "FORKGUARD_TERM_TIMEOUT": "1"})
    gen1 = run.generations()[1]
    late = run.send("late", LONG_LATE)
    early = run.send("early", LONG_EARLY)
    run.wait_started(late, early)

    run.deploy("v2")
    run.hup()
    gen2 = run.generation_pid(2)
    run.wait_log(rf"generation 1 \(pid {gen1}\) stopped consuming; 2 task\(s\) still running",
                 timeout=MARGIN)
    retiring = time.monotonic()
    run.wait_log(rf"generation 1 \(pid {gen1}\) retired \(exit 0\)", timeout=MARGIN)
    took = time.monotonic() - retiring
    # retire_timeout 1s, then TERM (term_timeout 1s, then KILL): far less than the tasks.
    assert took < LONG_LATE - 1, f"the retire took {took:.1f}s\n{run.tail()}"
    assert re.search(r"forkguard: sent TERM to 2 task\(s\)", run.log()), run.tail()

    # The early-ack task is recorded failed, naming the shutdown.
    state, value = outcome(early, timeout=MARGIN)
    assert state == "FAILURE", (state, value)
    assert "worker shutting down" in str(value), value
    assert run.runs(early.id) == 1
    assert run.done(early.id) == []

    # The acks_late task went back to the queue and ran, whole, in the new generation.
    assert _value(late, LONG_LATE + MARGIN) == "v2"
    assert run.runs(late.id) == 2
    assert [r["version"] for r in run.done(late.id)] == ["v2"]
    assert gen2 != gen1
    _stop_cleanly(run)
