"""Real ``celery worker -P forkguard`` processes for the chaos cases, and their process trees.

A worker runs ``python -m celery -A tests.chaos.chaos_app worker -P forkguard``
from the repository root in a session of its own (``start_new_session``),
logging to a file; it counts as started once it answers ``ping``.  Stopping
it signals its whole process group, and anything of its session still alive
afterwards is SIGKILLed and reported as left over.

The tree of a worker::

    worker (the main process, the session leader)
     └─ fork server          title "celery forkguard: fork server (...)"
         └─ task child       one per running task (its own process group)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from tests.harness import pid_alive, start_in_session, stop_session, wait_answering

APP_MODULE = "tests.chaos.chaos_app"
BOOT_TIMEOUT = 60.0
#: A warm stop waits for running tasks: chaos tasks are short.
STOP_TIMEOUT = 30.0


@dataclass
class RunAs:
    """An unprivileged user to run a worker as (root is exempt from RLIMIT_NPROC).

    Started through ``setpriv`` with one capability kept, CAP_DAC_READ_SEARCH,
    so the user can reach an interpreter under a private home (pyenv under
    ``/root``); it has nothing to do with process limits, which only root,
    CAP_SYS_RESOURCE and CAP_SYS_ADMIN escape.
    """

    uid: int
    gid: int

    def prefix(self) -> list[str]:
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
        ]

    def set_nproc(self, pid: int, soft: object, hard: object) -> None:
        """Set RLIMIT_NPROC of *pid*, a process of this user, from a process of the same user.

        Root may lack CAP_SYS_RESOURCE (in a container, say), and then cannot
        change another user's limits; a process of that user may.
        """
        subprocess.run([*self.prefix(), "prlimit", f"--pid={pid}", f"--nproc={soft}:{hard}"],
                       check=True, capture_output=True, timeout=30)


def nproc_limits(pid: int) -> tuple[str, str]:
    """RLIMIT_NPROC of *pid* (soft, hard), as ``/proc`` shows them ("unlimited" or a number)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max processes"):
                soft, hard = line.split()[2:4]
                return soft, hard
    raise AssertionError(f"no process limit in /proc/{pid}/limits")


@dataclass
class ChaosWorker:
    proc: subprocess.Popen
    hostname: str
    log_path: Path
    app: Celery

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- remote control ----------------------------------------------------------------

    def ping(self, timeout: float = 1.0) -> bool:
        replies = _unless_cut(self.app.control.ping, destination=[self.hostname],
                              timeout=timeout)
        return any(self.hostname in reply for reply in replies or ())

    def broadcast(self, command: str, timeout: float = 3.0) -> dict[str, Any]:
        """The worker's reply to a remote-control *command*; empty if none came."""
        replies = self.app.control.broadcast(
            command, destination=[self.hostname], reply=True, timeout=timeout,
        ) or []
        for reply in replies:
            if self.hostname in reply:
                return dict(reply[self.hostname])
        return {}

    def pool_stats(self) -> dict[str, Any]:
        """The ``pool`` part of ``inspect stats``: limit, children, queued, counts."""
        inspect = self.app.control.inspect(destination=[self.hostname], timeout=3.0)
        return dict((inspect.stats() or {}).get(self.hostname, {}).get("pool", {}))

    def idle(self) -> bool:
        """Whether the worker holds no task: none running, none reserved (prefetched)."""
        inspect = self.app.control.inspect(destination=[self.hostname], timeout=3.0)
        active = (_unless_cut(inspect.active) or {}).get(self.hostname)
        reserved = (_unless_cut(inspect.reserved) or {}).get(self.hostname)
        return active == [] and reserved == []

    # -- processes -----------------------------------------------------------------------

    def fork_server(self) -> Optional[psutil.Process]:
        """The worker's child titled "fork server", or None (not started, or replaced)."""
        for child in _children(self.pid):
            if "fork server" in _title(child):
                return child
        return None

    def task_children(self) -> list[psutil.Process]:
        """The processes running tasks: the fork server's children."""
        server = self.fork_server()
        return _children(server.pid) if server is not None else []

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> list[int]:
        """TERM the worker's group (KILL after a deadline); return leftover pids."""
        return stop_session(self.proc, STOP_TIMEOUT)


def _unless_cut(call: Callable[..., Any], **kwargs: Any) -> Any:
    """*call*'s answer, or None if the test's own broker connection was cut.

    After a broker restart the client's pooled connection is dead; the next
    call gets a fresh one.
    """
    try:
        return call(**kwargs)
    except (OSError, redis.RedisError, OperationalError):
        return None


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def spawn_worker(app: Celery, env: dict[str, str], log_dir: Path, *extra_args: str,
                 concurrency: int = 2, run_as: Optional[RunAs] = None) -> ChaosWorker:
    """Start a worker on the queue of *env* (without waiting for it)."""
    token = uuid.uuid4().hex[:10]
    hostname = f"fgchaos-{token}@forkguard-chaos"
    log_path = log_dir / f"worker-{token}.log"
    command = [
        *(run_as.prefix() if run_as else []),
        sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
        "-P", "forkguard", "-c", str(concurrency), "-l", "info",
        "-n", hostname, "-Q", env["FORKGUARD_CHAOS_QUEUE"],
        "--without-mingle", "--without-gossip", *extra_args,
    ]
    return ChaosWorker(start_in_session(command, env, log_path), hostname, log_path, app)


def wait_ready(worker: ChaosWorker) -> ChaosWorker:
    wait_answering(worker.proc, worker.ping, worker.log, BOOT_TIMEOUT,
                   f"{worker.hostname} to answer ping")
    return worker


# -- resources (the 10,000-task case) --------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What one process holds: open fds, threads, resident memory."""

    fds: int
    threads: int
    rss_mb: float

    @classmethod
    def of(cls, proc: psutil.Process) -> Usage:
        with proc.oneshot():
            return cls(proc.num_fds(), proc.num_threads(), proc.memory_info().rss / 2**20)

    def __str__(self) -> str:
        return f"fds={self.fds} threads={self.threads} rss={self.rss_mb:.1f}MB"


@dataclass(frozen=True)
class Sample:
    """The worker's and its fork server's usage, and how many task children live."""

    at: str
    worker: Usage
    server: Usage
    children: int

    def __str__(self) -> str:
        return (f"{self.at}: worker {self.worker}; fork server {self.server}; "
                f"live children={self.children}")


def sample(worker: ChaosWorker, at: str) -> Sample:
    server = worker.fork_server()
    assert server is not None, "the worker has no fork server"
    live = [c for c in worker.task_children() if pid_alive(c.pid)]
    return Sample(at, Usage.of(psutil.Process(worker.pid)), Usage.of(server), len(live))


def kill_quietly(proc: psutil.Process, signum: int = signal.SIGKILL) -> bool:
    """Signal *proc*; False if it was gone already.

    psutil checks the pid still names the same process (a pid is reused once
    its process is reaped), so a listed child that ended is never mistaken.
    """
    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        return False
    return True
