"""The rolling-deploy test: five reloads under a stream of tasks (``nox -s chaos``).

Through the real ``celery forkguard starter`` on Redis and on RabbitMQ: a
stream of early-ack and acks_late tasks, some of them running 10 s, goes on
through five deploys, each HUP loading a ``release.py`` whose version differs,
and one deploy with a syntax error in between.  Checked: no task lost, none
killed, none run twice; every task published after a reload's ready point
(the old generation has stopped consuming) runs the new code; the broken
deploy leaves the old code serving.  Measured and printed in the figure line:
the longest gap between two completions around each reload, and the peak
memory (RSS and PSS of every process of the deploy) while generations overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import redis
from celery import Celery

from tests.chaos.brokers import BACKEND_URL, BROKER_URL, RABBITMQ_URL, rabbitmq_problem
from tests.chaos.case import FIGURES
from tests.harness import REPO_ROOT, require_service, wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(420)]

RELOADS = 5
LONG_SECONDS = 10.0
#: Short tasks per second in the background stream.
STREAM_RATE = 25.0


@dataclass
class Reload:
    """What one HUP did, by the starter's log and by the test's clock."""

    version: str
    hup_at: float
    ready_at: float = 0.0  # the old generation stopped consuming
    retired_at: float = 0.0
    base_pss: int = 0  # one generation, just before the HUP
    peak_rss: int = 0
    peak_pss: int = 0
    gap: float = 0.0


@dataclass
class Sent:
    task_id: str
    kind: str
    seconds: float
    at: float


class Deployment:
    """A release directory, its starter, the tasks sent to it and its ledger."""

    def __init__(self, root: Path, broker_url: str) -> None:
        token = uuid.uuid4().hex[:10]
        self.dir = root / "release"
        self.dir.mkdir()
        shutil.copy(REPO_ROOT / "tests" / "deploy_app.py", self.dir / "deploy_app.py")
        self.prefix = f"fgdeploy:{token}"
        self.queue = f"fgdeploy-{token}"
        self.log_path = root / "starter.log"
        self.env = {
            **os.environ,
            "DEPLOY_BROKER": broker_url, "DEPLOY_BACKEND": BACKEND_URL,
            "DEPLOY_LEDGER": BACKEND_URL, "DEPLOY_PREFIX": self.prefix,
            "DEPLOY_QUEUE": self.queue, "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.env.pop("PYTHONPATH", None)
        self.token = token
        self.client = Celery(f"fgdeploy-client-{token}", broker=broker_url, backend=BACKEND_URL,
                             set_as_current=False)
        self.client.conf.task_default_queue = self.queue
        self.ledger = redis.Redis.from_url(BACKEND_URL, decode_responses=True)
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None

    # -- releases and the starter ---------------------------------------------------------

    def release(self, text: str) -> None:
        (self.dir / "release.py").write_text(text)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "deploy_app", "forkguard", "starter",
                 "-c", "3", "-l", "info", "--without-mingle", "--without-gossip"],
                cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.wait_log(r"generation 1 \(pid \d+\) is consuming", 1, 60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int, timeout: float) -> None:
        def seen() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (
                f"the starter exited:\n{self.log()[-4000:]}")
            return len(re.findall(pattern, self.log())) >= count

        try:
            wait_for(seen, timeout=timeout, interval=0.02, message=pattern)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- starter log ---\n{self.log()[-6000:]}") from None

    def processes(self) -> list[psutil.Process]:
        """The starter and its descendants (orphans come back to it: it is a subreaper)."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            starter = psutil.Process(self.proc.pid)
            return [starter, *starter.children(recursive=True)]
        return []

    def memory(self) -> tuple[int, int]:
        rss = pss = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        return rss, pss

    def stop(self) -> list[int]:
        """TERM the starter; then KILL whatever of the deploy is left, and return it."""
        if self.proc is None:
            return []
        tree = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not alive_pids(tree), timeout=5)
        left = alive_pids(tree)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left

    # -- tasks --------------------------------------------------------------------------------

    def send(self, kind: str, seconds: float = 0.0) -> None:
        at = time.time()
        result = self.client.send_task(f"deploy.{kind}", args=(seconds,), queue=self.queue)
        with self._lock:
            self.sent.append(Sent(result.id, kind, seconds, at))

    def runs(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.ledger.hgetall(f"{self.prefix}:runs").items()}

    def done(self) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.ledger.lrange(f"{self.prefix}:done", 0, -1)]

    def forget(self) -> None:
        self.ledger.delete(f"{self.prefix}:runs", f"{self.prefix}:done")
        ids = [s.task_id for s in self.sent]
        for start in range(0, len(ids), 500):
            self.ledger.delete(*[f"celery-task-meta-{i}" for i in ids[start:start + 500]])


def alive_pids(processes: list[psutil.Process]) -> list[int]:
    found = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


class Stream(threading.Thread):
    """Short early-ack and acks_late tasks at a steady rate until stopped."""

    def __init__(self, deploy: Deployment) -> None:
        super().__init__(daemon=True)
        self.deploy = deploy
        self.halt = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        count = 0
        try:
            while not self.halt.wait(1 / STREAM_RATE):
                self.deploy.send("late" if count % 2 else "early")
                count += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


class OverlapSampler(threading.Thread):
    """Peak RSS and PSS of the deploy's processes while a reload runs."""

    def __init__(self, deploy: Deployment, reload: Reload) -> None:
        super().__init__(daemon=True)
        self.deploy, self.reload = deploy, reload
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            rss, pss = self.deploy.memory()
            self.reload.peak_rss = max(self.reload.peak_rss, rss)
            self.reload.peak_pss = max(self.reload.peak_pss, pss)
            self.halt.wait(0.2)


def reload_to(deploy: Deployment, version: str, generation: int, nth: int) -> Reload:
    """Start two 10 s tasks, deploy *version*, HUP, and follow the reload to its end.

    *generation* is the number the new generation gets, *nth* how many
    reloads (this one included) have succeeded.
    """
    deploy.send("early", LONG_SECONDS)
    deploy.send("late", LONG_SECONDS)
    wait_for(lambda: _long_running(deploy) >= 2, timeout=30,
             message="both long tasks running")
    deploy.release(f'VERSION = "{version}"\n')
    reload = Reload(version, time.time())
    reload.base_pss = deploy.memory()[1]
    sampler = OverlapSampler(deploy, reload)
    sampler.start()
    assert deploy.proc is not None
    deploy.proc.send_signal(signal.SIGHUP)
    try:
        deploy.wait_log(rf"generation {generation} \(pid \d+\) is consuming", 1, 60)
        deploy.wait_log(r"stopped consuming", nth, 30)
        reload.ready_at = time.time()
        deploy.wait_log(r"retired \(exit 0\)", nth, LONG_SECONDS + 60)
        reload.retired_at = time.time()
    finally:
        sampler.halt.set()
        sampler.join()
    return reload


def _long_running(deploy: Deployment) -> int:
    runs = deploy.runs()
    finished = {d["id"] for d in deploy.done()}
    return sum(1 for s in list(deploy.sent)
               if s.seconds and s.task_id in runs and s.task_id not in finished)


def broken_deploy(deploy: Deployment, serving: str, generation: int) -> None:
    """A release with a syntax error: the deploy fails, the old code keeps serving."""
    deploy.release('VERSION = "broken\n')
    failures = deploy.log().count("deploy failed")
    assert deploy.proc is not None
    deploy.proc.send_signal(signal.SIGHUP)
    deploy.wait_log(r"deploy failed", failures + 1, 60)
    assert f"generation {generation} (pid" in deploy.log()
    before = time.time()
    wait_for(lambda: [d for d in deploy.done() if d["start"] > before], timeout=30,
             message="tasks finishing after the failed deploy")
    late = [d["version"] for d in deploy.done() if d["start"] > before]
    assert set(late) == {serving}, f"after a broken deploy tasks ran {set(late)}"


def longest_gap(done: list[dict[str, Any]], reload: Reload) -> float:
    """The longest time without a completion from the last one before the HUP to the
    first one after the old generation retired."""
    ends = sorted(d["end"] for d in done)
    before = [e for e in ends if e < reload.hup_at][-1:]
    after = [e for e in ends if e > reload.retired_at][:1]
    around = before + [e for e in ends if reload.hup_at <= e <= reload.retired_at] + after
    return max((b - a for a, b in zip(around, around[1:])), default=0.0)


def run_deploy(tmp_path: Path, broker_url: str, name: str) -> None:
    deploy = Deployment(tmp_path, broker_url)
    deploy.release('VERSION = "v1"\n')
    began = time.monotonic()
    stream = Stream(deploy)
    reloads: list[Reload] = []
    try:
        deploy.start()
        stream.start()
        generation = 1
        for nth in range(1, RELOADS + 1):
            generation += 1
            reloads.append(reload_to(deploy, f"v{nth + 1}", generation, nth))
            if nth == 2:
                broken_deploy(deploy, f"v{nth + 1}", generation)
                generation += 1  # the failed generation took a number
        stream.halt.set()
        stream.join()
        assert stream.error is None, f"publishing failed: {stream.error!r}"
        expected = {s.task_id for s in deploy.sent}
        wait_for(lambda: expected <= {d["id"] for d in deploy.done()}, timeout=120,
                 message="every task sent has finished")
        check(deploy, reloads, name, time.monotonic() - began)
    finally:
        stream.halt.set()
        left = deploy.stop()
        with contextlib.suppress(redis.RedisError):
            deploy.forget()
    assert deploy.proc is not None and deploy.proc.returncode == 0, (
        f"the starter exited {deploy.proc.returncode}:\n{deploy.log()[-4000:]}")
    assert not left, f"processes left after the starter exited: {left}"


def check(deploy: Deployment, reloads: list[Reload], name: str, seconds: float) -> None:
    runs, done = deploy.runs(), deploy.done()
    sent_ids = [s.task_id for s in deploy.sent]
    lost = [i for i in sent_ids if i not in runs]
    twice = [i for i, n in runs.items() if n > 1]
    states = {i: deploy.client.AsyncResult(i).state for i in sent_ids}
    failed = [i for i, state in states.items() if state != "SUCCESS"]
    versions = {d["id"]: d["version"] for d in done}
    stale = []
    for reload in reloads:
        stale += [s.task_id for s in deploy.sent
                  if s.at > reload.ready_at
                  and _number(versions.get(s.task_id)) < _number(reload.version)]
    for reload in reloads:
        reload.gap = longest_gap(done, reload)
    line = (
        f"chaos deploy {name}: sent={len(sent_ids)} done={len(versions)} lost={len(lost)} "
        f"ran_twice={len(twice)} failed={len(failed)} stale_version={len(stale)} "
        f"reloads={len(reloads)} longest_gap="
        + ",".join(f"{r.gap:.2f}" for r in reloads) + "s base_pss_mib="
        + ",".join(f"{r.base_pss / 2**20:.0f}" for r in reloads) + " peak_pss_mib="
        + ",".join(f"{r.peak_pss / 2**20:.0f}" for r in reloads) + " peak_rss_mib="
        + ",".join(f"{r.peak_rss / 2**20:.0f}" for r in reloads)
        + " retire_s=" + ",".join(f"{r.retired_at - r.hup_at:.1f}" for r in reloads)
        + f" in {seconds:.1f}s"
    )
    FIGURES.append(line)
    print(line)
    assert not lost, f"lost: {lost[:5]}"
    assert not twice, f"ran twice: {twice[:5]}"
    assert not failed, f"not successful: {[(i, states[i]) for i in failed[:5]]}"
    assert not stale, f"published after a ready point but ran old code: {stale[:5]}"
    for word in ("SIGKILL", "WorkerLostError", "TaskKilled", "TermException"):
        assert word not in deploy.log(), f"a task was killed during a deploy ({word})"


def _number(version: Optional[str]) -> int:
    return int(version[1:]) if version else 0


def test_rolling_deploy_redis(tmp_path: Path) -> None:
    run_deploy(tmp_path, BROKER_URL, "redis")


def test_rolling_deploy_rabbitmq(tmp_path: Path) -> None:
    problem = rabbitmq_problem()
    if problem:
        require_service(problem)
    run_deploy(tmp_path, RABBITMQ_URL, "rabbitmq")



def test_workers_stop_when_their_starter_is_killed(tmp_path: Path) -> None:
    """A starter SIGKILLed (a supervisor that gave up) takes its generation along."""
    deploy = Deployment(tmp_path, BROKER_URL)
    deploy.release('VERSION = "v1"\n')
    try:
        deploy.start()
        deploy.send("late", 2.0)
        wait_for(lambda: deploy.runs(), timeout=30, message="the task started")
        tree = deploy.processes()
        assert deploy.proc is not None
        deploy.proc.kill()
        deploy.proc.wait(timeout=10)

        # Warm shutdown: the running task finishes first (2 s), then the worker exits.
        wait_for(lambda: not alive_pids(tree), timeout=30, message="the orphaned worker stopped")
        assert [d["version"] for d in deploy.done()] == ["v1"]
        assert list(deploy.runs().values()) == [1]
    finally:
        left = deploy.stop()
        with contextlib.suppress(redis.RedisError):
            deploy.forget()
    assert not left, f"processes left: {left}"
