"""Helpers shared by the suites that run real workers (``tests/integration``, ``tests/chaos``).

Plain functions, no fixtures: polling with a deadline, and starting, watching
and stopping a process that runs in a session of its own.

``wait_for(predicate, timeout, ...)``
    Polls *predicate* until it returns something true, or fails at the deadline.
``require_service(reason)``
    Skips a test whose service is missing; fails it instead when ``CI`` is ``true``.
``pid_alive(pid)``
    False once a process has exited (zombies count as exited).
``signal_group(pgid, signum)``
    Signals a process group that may be gone already.
``session_pids(sid)``
    The live processes of a session (a worker started with ``start_new_session``
    and everything it forked, whatever process group they moved to).
``stop_session(proc, timeout)``
    TERM the group of *proc*, KILL it after *timeout*, then KILL whatever of
    its session is left; returns the pids that were left.
``start_in_session(command, env, log_path)``
    Starts *command* from the repository root in a new session (its own
    process group), with *env* over the environment, output to *log_path*.
``wait_answering(proc, answers, log, timeout, what)``
    Waits until ``answers()`` is true, failing with the log if *proc* exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, TypeVar

import psutil
import pytest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]

#: How long the processes of a stopped session may take to follow their leader.
SESSION_GRACE = 5.0


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             message: str = "") -> T:
    """Poll *predicate* until it returns a true value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def require_service(reason: str) -> None:
    """Skip a test whose service is missing; on CI, fail it loudly instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def pid_alive(pid: int) -> bool:
    """Whether *pid* still runs; a zombie has exited and counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def session_pids(sid: int) -> list[int]:
    """Live processes of the session *sid*.

    A worker's children leave its process group (they call setpgrp) but not
    its session, so the session id finds every one of them.
    """
    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and pid_alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def stop_session(proc: subprocess.Popen, timeout: float) -> list[int]:
    """TERM the group of *proc*, KILL it after *timeout*; return the pids left over.

    Whatever of the session is still alive a moment after *proc* exited is
    SIGKILLed and returned, so a caller can fail on it.
    """
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # Children die with the worker (PR_SET_PDEATHSIG); give them a moment to.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not session_pids(proc.pid), timeout=SESSION_GRACE)
    leftovers = session_pids(proc.pid)
    for pid in leftovers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def start_in_session(command: list[str], env: Mapping[str, str],
                     log_path: Path) -> subprocess.Popen:
    """Start *command* from the repository root in a new session, logging to *log_path*.

    A new session is a new process group too: the whole of it can be
    signalled at once, and its members found by session id afterwards.
    """
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, **env},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_answering(proc: subprocess.Popen, answers: Callable[[], bool], log: Callable[[], str],
                   timeout: float, what: str) -> None:
    """Wait until ``answers()``; fail with the log if *proc* exits or time runs out."""
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} while starting:\n{log()}")
        return answers()

    try:
        wait_for(ready, timeout=timeout, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{log()}") from None
