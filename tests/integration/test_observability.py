"""What a worker shows of itself: the liveness file, the Prometheus endpoint."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
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


# -- Prometheus ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample the endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([-+0-9.eEinfa]+)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def test_prometheus_endpoint_serves_the_pool_measures(start_worker: WorkerFactory) -> None:
    port = _free_port()
    env = {"FORKGUARD_METRICS_PORT": str(port), "FORKGUARD_METRICS_ADDRESS": "127.0.0.1"}
    worker = start_worker(env=env)
    assert f"forkguard: metrics on http://127.0.0.1:{port}/metrics" in worker.log()
    for n in range(4):
        assert outcome(worker.send("add", n, n)) == ("SUCCESS", 2 * n)
    assert outcome(worker.send("segfault"))[0] == "FAILURE"

    samples = wait_for(
        lambda: (s := scrape(port)).get("forkguard_child_cpu_seconds_count", 0) >= 5 and s,
        timeout=15, message="five children measured on /metrics")
    assert samples["forkguard_fork_latency_seconds_count"] >= 5
    assert samples["forkguard_fork_latency_seconds_sum"] > 0
    assert samples['forkguard_child_peak_rss_bytes_recent{quantile="0.5"}'] > 5e6
    assert samples['forkguard_child_kills_total{reason="lost"}'] == 1
    assert samples['forkguard_child_kills_total{reason="oom"}'] == 0
    assert samples['forkguard_children_total{outcome="reported"}'] >= 4
    assert samples["forkguard_pool_size"] == 2
    assert samples["forkguard_children_running"] == 0
    assert samples["process_resident_memory_bytes"] > 0

    # A second worker on the same port logs why it has no endpoint, and works.
    second = start_worker(env=env)
    wait_for(lambda: "forkguard: no metrics endpoint: cannot listen on 127.0.0.1:"
             f"{port}" in second.log(), timeout=10, message="the second worker's error")
    assert outcome(second.send("add", 2, 2)) == ("SUCCESS", 4)
