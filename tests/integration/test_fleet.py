"""Fleet control of ``-P forkguard`` workers, on Redis and RabbitMQ.

Two workers, each on its own queue; ``celery -A ... forkguard
pause|resume|status|kill`` (a real ``celery`` process) and the same remote
commands through ``app.control.broadcast`` must reach exactly the workers
named with ``-d``.  Every command names its destinations: the RabbitMQ
broker is shared with other test runs, and a broadcast without destination
would reach their workers too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from . import signals_proj
from .conftest import HUB_BROKERS, REPO_ROOT, Broker, Worker, broker_params, outcome, pid_alive
from .test_signals import (
    APP_MODULE,
    EVIDENCE,
    SignalWorkers,
    assert_failed_with,
    make_sig_broker,
    ran_on,
    send,
    started,
    status,
    ticks_succeed,
)

#: Seconds the CLI waits for replies: generous, a loaded worker answers late.
REPLY_TIMEOUT = "3"


@pytest.fixture(scope="module", params=broker_params(*HUB_BROKERS))
def sig_broker(request: pytest.FixtureRequest) -> Broker:
    return make_sig_broker(request.param)


@dataclass
class Fleet:
    """Two workers, a gate for their held tasks, and the ``celery forkguard`` CLI."""

    one: Worker
    two: Worker
    gate: str

    @property
    def both(self) -> str:
        return f"{self.one.hostname},{self.two.hostname}"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``celery -A signals_proj forkguard ARGS`` on the fleet's broker."""
        return self.celery("forkguard", *args)

    def celery(self, *args: str) -> subprocess.CompletedProcess:
        """``celery -A signals_proj ARGS`` on the fleet's broker."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", APP_MODULE, *args],
            cwd=REPO_ROOT, env={**os.environ, **self.one.env}, capture_output=True, text=True,
            timeout=60, start_new_session=True, check=False,
        )

    def ok(self, *args: str) -> str:
        """Run the CLI with a reply timeout; it must succeed; return its output."""
        done = self.cli(*args, "-t", REPLY_TIMEOUT)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.ok(*args, "--json")))

    def hold(self, worker: Worker) -> AsyncResult:
        result = send(worker, "hold", self.gate)
        started(result)
        return result


@pytest.fixture
def fleet(sig_broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    factory = SignalWorkers(sig_broker, tmp_path)
    try:
        yield Fleet(factory(concurrency=2), factory(concurrency=2), factory.gate())
    finally:
        factory.close()


def test_pause_and_resume_only_the_named_worker(fleet: Fleet) -> None:
    one, two = fleet.one, fleet.two

    assert fleet.ok("pause", "-d", one.hostname).strip() == f"{one.hostname}: paused"
    replies = fleet.json("status", "-d", fleet.both)
    assert replies[one.hostname]["paused"] is True
    assert replies[two.hostname]["paused"] is False
    assert "already paused" in fleet.ok("pause", "-d", one.hostname)
    waiting = send(one, "tick")
    assert ticks_succeed(two)

    assert fleet.ok("resume", "-d", one.hostname).strip() == f"{one.hostname}: resumed"
    assert outcome(waiting, timeout=30)[0] == "SUCCESS"
    assert ran_on(waiting, one)
    replies = fleet.json("status", "-d", fleet.both)
    assert not any(reply["paused"] for reply in replies.values())
    assert "not paused" in fleet.ok("resume", "-d", one.hostname)


def test_status_lists_the_running_children(fleet: Fleet) -> None:
    one, two = fleet.one, fleet.two
    held = [fleet.hold(one), fleet.hold(one), fleet.hold(two)]

    text = fleet.ok("status", "-d", fleet.both)
    assert f"{one.hostname}: running, concurrency 2, 2 running, killed 0" in text
    assert f"{two.hostname}: running, concurrency 2, 1 running, killed 0" in text
    for result in held:
        pid = EVIDENCE.fields(result.id)["pid"]
        line = next(line for line in text.splitlines() if result.id in line)
        assert f"pid {pid}" in " ".join(line.split())
        assert f"{signals_proj.task_name('hold')}[{result.id}]" in line

    replies = fleet.json("status", "-d", fleet.both)
    assert set(replies) == {one.hostname, two.hostname}
    running = {child["task_id"]: child for reply in replies.values() for child in reply["running"]}
    assert set(running) == {result.id for result in held}
    for result in held:
        assert str(running[result.id]["pid"]) == EVIDENCE.fields(result.id)["pid"]
        assert running[result.id]["name"] == signals_proj.task_name("hold")


def test_kill_one_task_by_id(fleet: Fleet) -> None:
    one, two = fleet.one, fleet.two
    victim, neighbour, elsewhere = fleet.hold(one), fleet.hold(one), fleet.hold(two)

    text = fleet.ok("kill", victim.id, "-d", fleet.both)

    assert f"{one.hostname}: killed 1 task(s) {victim.id}" in text
    assert f"{two.hostname}: killed 0 task(s)" in text
    assert_failed_with(victim, "TaskKilled", "forkguard_kill", "SIGKILL")
    for result in (neighbour, elsewhere):
        assert pid_alive(int(EVIDENCE.fields(result.id)["pid"]))
    assert [child["task_id"] for child in status(one)["running"]] == [neighbour.id]
    assert status(one)["killed"] == {"forkguard_kill": 1}
    EVIDENCE.open_gate(fleet.gate)
    for result in (neighbour, elsewhere):
        assert outcome(result) == ("SUCCESS", "released")


def test_kill_all(fleet: Fleet) -> None:
    one, two = fleet.one, fleet.two
    held = [fleet.hold(one), fleet.hold(one), fleet.hold(two)]

    replies = fleet.json("kill", "--all", "-d", fleet.both)

    assert sorted(replies[one.hostname]["killed"]) == sorted(r.id for r in held[:2])
    assert replies[two.hostname]["killed"] == [held[2].id]
    for result in held:
        assert_failed_with(result, "TaskKilled", "forkguard_kill", "SIGKILL")
    assert ticks_succeed(one) and ticks_succeed(two)


@pytest.mark.parametrize("args", [(), ("some-task-id", "--all")], ids=["neither", "both"])
def test_kill_wants_a_task_id_or_all(fleet: Fleet, args: tuple[str, ...]) -> None:
    done = fleet.cli("kill", *args, "-d", fleet.both)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "give a TASK_ID or --all" in done.stderr


def test_remote_commands_through_broadcast(fleet: Fleet) -> None:
    one, two = fleet.one, fleet.two
    control = one.app.control

    def broadcast(command: str, worker: Worker, **arguments: Any) -> Any:
        replies = control.broadcast(command, arguments=arguments, reply=True, timeout=3.0,
                                    destination=[worker.hostname])
        assert len(replies) == 1, replies
        return replies[0][worker.hostname]

    assert broadcast("forkguard_pause", two) == {"ok": "paused"}
    assert status(two)["paused"] and not status(one)["paused"]
    inspect = control.inspect(destination=[two.hostname], timeout=3.0)
    assert inspect._request("forkguard_status")[two.hostname]["paused"] is True
    assert broadcast("forkguard_resume", two) == {"ok": "resumed"}
    assert not status(two)["paused"]

    victim, bystander = fleet.hold(one), fleet.hold(one)
    reply = broadcast("forkguard_kill", one, task_id=victim.id)
    assert reply == {"ok": "killed 1 task(s)", "killed": [victim.id]}
    assert_failed_with(victim, "TaskKilled", "forkguard_kill")
    assert broadcast("forkguard_kill", one)["killed"] == [bystander.id]
    assert_failed_with(bystander, "TaskKilled", "forkguard_kill")


def test_celery_inspect_and_control_know_the_commands(fleet: Fleet) -> None:
    one = fleet.one
    done = fleet.celery("inspect", "forkguard_status", "-d", one.hostname, "-t", REPLY_TIMEOUT,
                        "-j")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout)[one.hostname]["concurrency"] == 2

    done = fleet.celery("control", "forkguard_pause", "-d", one.hostname, "-t", REPLY_TIMEOUT)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert status(one)["paused"] is True
    done = fleet.celery("control", "forkguard_resume", "-d", one.hostname, "-t", REPLY_TIMEOUT)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert status(one)["paused"] is False


def test_exit_codes_follow_celery(fleet: Fleet) -> None:
    one = fleet.one
    nobody = fleet.cli("status", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 69, (nobody.stdout, nobody.stderr)
    assert "No forkguard worker replied" in nobody.stderr

    missing = fleet.cli("kill", "no-such-task", "-d", one.hostname, "-t", REPLY_TIMEOUT)
    assert missing.returncode == 1, (missing.stdout, missing.stderr)
    assert "no worker that replied runs task no-such-task" in missing.stderr

    alone = fleet.cli("reload", "-d", one.hostname, "-t", REPLY_TIMEOUT, "-j")
    assert alone.returncode == 1, (alone.stdout, alone.stderr)
    assert "not run by `celery forkguard starter`" in json.loads(alone.stdout)[one.hostname][
        "error"]
