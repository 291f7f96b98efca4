"""The liveness file: touched by a running worker's loop, stale once the loop stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import WorkerFactory, outcome, wait_for

pytestmark = pytest.mark.timeout(90)


def probe(path: Path, max_age: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery_forkguard.liveness", str(path), str(max_age)],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_liveness_file_is_touched_by_the_loop_and_goes_stale_when_it_stops(
    start_worker: WorkerFactory, tmp_path: Path,
) -> None:
    alive = tmp_path / "forkguard.alive"
    worker = start_worker(env={"FORKGUARD_LIVENESS_FILE": str(alive),
                               "FORKGUARD_LIVENESS_INTERVAL": "0.2"})
    wait_for(alive.exists, timeout=10, message="the liveness file")
    first = alive.stat().st_mtime
    wait_for(lambda: alive.stat().st_mtime > first, timeout=10,
             message="the loop to touch the file again")
    assert probe(alive, 5).returncode == 0

    # A frozen loop stops touching it: the probe fails, saying how old it is.
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        def stale() -> subprocess.CompletedProcess | None:
            done = probe(alive, 1)
            return done if done.returncode == 1 else None
        done = wait_for(stale, timeout=20, message="the probe to see a stale file")
        assert "the worker's loop is stuck" in done.stderr
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    wait_for(lambda: probe(alive, 1).returncode == 0, timeout=10,
             message="the loop to touch the file once resumed")
    assert outcome(worker.send("add", 1, 2)) == ("SUCCESS", 3)


def test_probe_without_the_file_fails_and_says_why(tmp_path: Path) -> None:
    done = probe(tmp_path / "missing", 60)
    assert done.returncode == 1
    assert "missing: the worker has not started its loop" in done.stderr
