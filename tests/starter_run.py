"""A ``celery forkguard starter`` run in a release directory of its own, for the deploy tests.

:class:`StarterRun` prepares a temporary "release directory" (a copy of
``tests/deploy_app.py`` and a ``release.py`` that says ``VERSION = "v1"``),
starts ``python -m celery -A deploy_app forkguard starter -c 2 -l info``
there in a new session (``start_new_session``), logging to a file, and
offers what a deploy test needs:

- ``deploy(version)`` rewrites ``release.py`` (``deploy_text(source)`` writes
  any text, a broken release for instance); ``hup()`` sends SIGHUP;
- ``log()``, ``wait_log(pattern, count)`` (regular expressions over the
  starter's log, which the generations share), ``generations()`` (generation
  number -> pid, from the starter's "started generation N (pid P)" lines),
  ``title()`` (the starter's process title);
- ``send(name, seconds)`` (``"late"``: acks_late, ``"early"``: early ack),
  ``runs(task_id)`` and ``done(task_id)`` from the ledger the tasks keep in
  Redis, ``queued_ids()`` (task ids waiting in the Redis broker's queue);
- ``reload_command(*destinations)`` runs ``celery -A deploy_app forkguard
  reload`` from the release directory with the same environment;
- ``stop()`` TERMs the starter, KILLs it after a deadline, then KILLs
  whatever is left of its session and of every generation's session (a
  generation runs in a session of its own) and returns those pids; it also
  deletes the queue, the ledger and the results.

``StarterRun(..., command="worker")`` starts a plain ``celery -A deploy_app
worker -P forkguard`` the same way instead (no starter).

Each run has its own queue, node name and ledger prefix (*name* and a
uuid: ``fgstarter-<hex>`` by default), so runs never share messages,
replies or records.
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
import uuid
from pathlib import Path
from typing import Any, Optional

import psutil
import redis
from celery import Celery
from celery.result import AsyncResult

from tests.harness import SESSION_GRACE, pid_alive, session_pids, stop_session, wait_for

DEPLOY_APP = Path(__file__).resolve().parent / "deploy_app.py"

BOOT_TIMEOUT = 60.0
#: TERM -> exit of the starter and its generations (a warm stop waits for running tasks).
STOP_TIMEOUT = 20.0
#: How much of the log an assertion message shows.
LOG_TAIL = 12000

_STARTED = re.compile(r"started generation (\d+) \(pid (\d+)\)")


class StarterRun:
    """One starter (or plain worker) of ``deploy_app``; see the module docstring."""

    def __init__(self, scratch: Path, broker_url: str, backend_url: str, ledger_url: str,
                 env: Optional[dict[str, str]] = None, version: str = "v1",
                 command: str = "starter", concurrency: int = 2,
                 extra_args: tuple[str, ...] = (), name: str = "fgstarter") -> None:
        self.token = uuid.uuid4().hex[:12]
        self.queue = f"{name}-{self.token}"
        self.prefix = f"{name}-{self.token}"
        self.hostname = f"{name}-{self.token}@forkguard-it"
        self.dir = scratch / f"release-{self.token}"
        self.dir.mkdir(parents=True)
        shutil.copy(DEPLOY_APP, self.dir / "deploy_app.py")
        self.deploy(version)
        self.log_path = scratch / f"{command}-{self.token}.log"
        self.broker_url = broker_url
        self.env = {
            "DEPLOY_BROKER": broker_url,
            "DEPLOY_BACKEND": backend_url,
            "DEPLOY_LEDGER": ledger_url,
            "DEPLOY_PREFIX": self.prefix,
            "DEPLOY_QUEUE": self.queue,
            "PYTHONDONTWRITEBYTECODE": "1",
            # The starter runs each generation from $PWD when it names the cwd.
            "PWD": str(self.dir),
            **(env or {}),
        }
        self.command = command
        self.argv = [sys.executable, "-m", "celery", "-A", "deploy_app"]
        self.argv += ["forkguard", "starter"] if command == "starter" else [
            "worker", "-P", "forkguard"]
        self.argv += ["-c", str(concurrency), "-l", "info", "-n", self.hostname,
                      "--without-mingle", "--without-gossip", *extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self.app = Celery(f"{name}-client-{self.token}", broker=broker_url,
                          backend=backend_url, set_as_current=False)
        self.app.conf.update(task_default_queue=self.queue,
                             broker_connection_retry_on_startup=True)
        self.ledger = redis.Redis.from_url(ledger_url, decode_responses=True)
        self.results: list[AsyncResult] = []
        self._seen_generations: dict[int, int] = {}

    # -- the release ---------------------------------------------------------------------

    def deploy(self, version: str) -> None:
        """A new release on disk: ``release.VERSION`` is *version* for the next generation."""
        self.deploy_text(f"VERSION = {version!r}\n")

    def deploy_text(self, source: str) -> None:
        # Written aside and renamed, as a deploy tool would: never half a file.
        staged = self.dir / "release.py.new"
        staged.write_text(source)
        os.replace(staged, self.dir / "release.py")

    # -- the process -------------------------------------------------------------------

    def start(self, wait: bool = True) -> StarterRun:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.dir, env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        if self.command == "starter":
            self.wait_log(r"generation 1 \(pid \d+\) is consuming", timeout=BOOT_TIMEOUT)
        else:
            self.wait_log(re.escape(f"{self.hostname} ready."), timeout=BOOT_TIMEOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def title(self) -> str:
        """The starter's process title (what ``ps`` shows)."""
        try:
            return " ".join(psutil.Process(self.pid).cmdline()).strip()
        except psutil.NoSuchProcess:
            return ""

    # -- the log -------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self) -> str:
        return self.log()[-LOG_TAIL:]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30.0,
                 exited_ok: bool = False) -> list[re.Match[str]]:
        """The matches of *pattern* once there are *count*; fails with the log at the deadline.

        Fails at once if the process exited without writing them (unless *exited_ok*).
        """
        regex = re.compile(pattern)

        def found() -> Optional[list[re.Match[str]]]:
            exited = self.proc is not None and self.proc.poll() is not None
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches
            if exited and not exited_ok:
                raise AssertionError(
                    f"{self.command} exited ({self.proc.returncode}) before logging "  # type: ignore[union-attr]
                    f"{count} x {pattern!r}\n--- log ---\n{self.tail()}")
            return None

        try:
            return wait_for(found, timeout=timeout, interval=0.05,
                            message=f"{count} x {pattern!r} in the log")
        except AssertionError as exc:
            if "--- log ---" in str(exc):
                raise
            raise AssertionError(f"{exc}\n--- log ---\n{self.tail()}") from None

    def generations(self) -> dict[int, int]:
        """Generation number -> pid, for every generation the starter started so far."""
        for match in _STARTED.finditer(self.log()):
            self._seen_generations[int(match.group(1))] = int(match.group(2))
        return dict(self._seen_generations)

    def generation_pid(self, number: int, timeout: float = 30.0) -> int:
        self.wait_log(rf"started generation {number} \(pid \d+\)", timeout=timeout)
        return self.generations()[number]

    # -- tasks ---------------------------------------------------------------------------

    def send(self, name: str, seconds: float = 0.0) -> AsyncResult:
        """Send ``deploy.late`` (acks_late) or ``deploy.early`` to this run's queue."""
        result = self.app.send_task(f"deploy.{name}", args=[seconds], queue=self.queue)
        self.results.append(result)
        return result

    def runs(self, task_id: str) -> int:
        """How many times a child started the task."""
        return int(self.ledger.hget(f"{self.prefix}:runs", task_id) or 0)

    def done(self, task_id: Optional[str] = None) -> list[dict[str, Any]]:
        """The finished runs (all, or of one task): id, version, pid, start, end."""
        records = [json.loads(raw) for raw in self.ledger.lrange(f"{self.prefix}:done", 0, -1)]
        return [r for r in records if task_id is None or r["id"] == task_id]

    def wait_started(self, *results: AsyncResult, timeout: float = 30.0) -> None:
        for result in results:
            wait_for(lambda r=result: self.runs(r.id) >= 1, timeout=timeout,
                     message=f"task {result.id} to start\n--- log ---\n{self.tail()}")

    def queued_ids(self) -> list[str]:
        """Ids of the tasks waiting in this run's queue (a Redis broker only)."""
        client = redis.Redis.from_url(self.broker_url)
        try:
            return [json.loads(raw)["headers"]["id"] for raw in client.lrange(self.queue, 0, -1)]
        finally:
            client.close()

    # -- remote control ------------------------------------------------------------------

    def forkguard(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        """``celery -A deploy_app forkguard ARGS -t TIMEOUT``, run like the starter was."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "deploy_app", "forkguard", *args,
             "-t", str(timeout)],
            cwd=self.dir, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout + 60, check=False,
        )

    def reload_command(self, *destinations: str,
                       timeout: float = 10.0) -> subprocess.CompletedProcess:
        """``celery -A deploy_app forkguard reload -d ...``."""
        return self.forkguard("reload", "-d", ",".join(destinations or (self.hostname,)),
                              timeout=timeout)

    # -- stopping ------------------------------------------------------------------------

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> list[int]:
        """TERM the starter, KILL it after a deadline; KILL and return what is left.

        Every generation runs in a session of its own: those sessions are
        searched too (the generation pids come from the starter's log).
        """
        leftovers: list[int] = []
        if self.proc is not None:
            leftovers += stop_session(self.proc, STOP_TIMEOUT)
            sessions = set(self.generations().values())
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not any(session_pids(s) for s in sessions),
                         timeout=SESSION_GRACE)
            for sid in sessions:
                for pid in session_pids(sid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                    leftovers.append(pid)
        self._clean_up()
        return leftovers

    def _clean_up(self) -> None:
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            queue = self.app.amqp.queues[self.queue].bind(conn.default_channel)
            # Declaring first tells kombu's Redis channel which bindings to drop.
            queue.declare()
            queue.delete()
        for result in self.results:
            with contextlib.suppress(Exception):
                result.forget()
        with contextlib.suppress(redis.RedisError):
            self.ledger.delete(f"{self.prefix}:runs", f"{self.prefix}:done")
        self.ledger.close()
        self.app.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_gone(pid: int, timeout: float) -> None:
    """Wait until *pid* and every process of its session have exited."""
    wait_for(lambda: not pid_alive(pid) and not session_pids(pid), timeout=timeout,
             message=f"process {pid} and its session to exit")
