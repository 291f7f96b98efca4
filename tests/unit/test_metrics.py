"""The pool's measures (metrics.py) and telling an OOM kill from other SIGKILLs (oom.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError

from celery_forkguard.exceptions import MemoryLimitExceeded, TaskKilled, TermRequeue
from celery_forkguard.metrics import KILL_REASONS, PoolMetrics, Summary, kill_reason
from celery_forkguard.oom import OomWatch, memory_events_path, read_oom_kills

pytestmark = pytest.mark.timeout(10)


def test_summary_keeps_count_sum_max_and_recent_percentiles() -> None:
    summary = Summary()
    assert summary.as_dict() == {"count": 0, "sum": 0.0, "max": 0.0, "p50": None, "p99": None}
    for value in range(1, 101):
        summary.observe(value / 1000)
    got = summary.as_dict()
    assert got["count"] == 100 and got["sum"] == pytest.approx(5.05)
    assert got["max"] == 0.1 and got["p50"] == 0.051 and got["p99"] == 0.1


def test_children_with_nothing_known_are_not_measured() -> None:
    metrics = PoolMetrics()
    metrics.child_exited(0.0, 0)  # its fork server was lost: no rusage
    metrics.child_exited(0.012, 41_000)
    got = metrics.as_dict()
    assert got["child_cpu_seconds"]["count"] == 1
    assert got["child_peak_rss_kib"]["max"] == 41_000
    assert set(got["kills"]) == set(KILL_REASONS)


@pytest.mark.parametrize(("error", "reason"), [
    (TaskKilled("task killed by USR1 on the worker (SIGKILL)"), "usr1"),
    (TaskKilled("task killed by forkguard_kill on the worker (SIGKILL)"), "remote"),
    (MemoryLimitExceeded("over"), "memory"),
    (TimeLimitExceeded(1.0), "time_limit"),
    (Terminated(-9), "revoke"),
    (TermRequeue("worker shutting down"), "shutdown"),
    (WorkerLostError("cold shutdown"), "shutdown"),
    (RuntimeError("?"), "lost"),
])
def test_kill_reasons(error: BaseException, reason: str) -> None:
    assert kill_reason(error) == reason


def _cgroup(tmp_path: Path, lines: str) -> Path:
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    return proc


def test_memory_events_found_on_cgroup_v2(tmp_path: Path) -> None:
    events = tmp_path / "root" / "system.slice" / "w.service" / "memory.events"
    events.parent.mkdir(parents=True)
    events.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    proc = _cgroup(tmp_path, "0::/system.slice/w.service\n")
    assert memory_events_path(str(proc), str(tmp_path / "root")) == str(events)
    assert read_oom_kills(str(events)) == 2


def test_memory_oom_control_found_on_cgroup_v1(tmp_path: Path) -> None:
    control = tmp_path / "root" / "memory" / "docker" / "abc" / "memory.oom_control"
    control.parent.mkdir(parents=True)
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    proc = _cgroup(tmp_path, "9:name=systemd:/\n4:memory:/docker/abc\n0::/\n")
    assert memory_events_path(str(proc), str(tmp_path / "root")) == str(control)


def test_no_cgroup_file_means_no_oom_is_ever_recognised(tmp_path: Path) -> None:
    proc = _cgroup(tmp_path, "0::/nowhere\n")
    assert memory_events_path(str(proc), str(tmp_path / "root")) is None


def test_oom_watch_counts_new_kills_once(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 1\n")
    watch = OomWatch(str(events))
    assert watch.new_kills() == 0
    events.write_text("oom 1\noom_kill 3\n")
    assert watch.new_kills() == 2
    assert watch.new_kills() == 0
    events.unlink()
    assert watch.new_kills() == 0


# -- the Prometheus endpoint's settings -------------------------------------------------------


def test_metrics_port_setting_is_validated() -> None:
    from celery.exceptions import ImproperlyConfigured

    from celery_forkguard.settings import load_settings

    assert load_settings({}, {}).metrics_port == 0
    assert load_settings({}, {"FORKGUARD_METRICS_PORT": "9808"}).metrics_port == 9808
    assert load_settings({"forkguard_metrics_port": 9100}, {}).metrics_port == 9100
    for bad in ("http", "70000", "-1", "98.5"):
        with pytest.raises(ImproperlyConfigured, match="FORKGUARD_METRICS_PORT must be"):
            load_settings({}, {"FORKGUARD_METRICS_PORT": bad})


def test_metrics_without_prometheus_client_stop_the_worker_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from celery.exceptions import ImproperlyConfigured

    from celery_forkguard import prometheus

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(ImproperlyConfigured, match=r"pip install 'celery-forkguard\[metrics\]'"):
        prometheus.check_available()
