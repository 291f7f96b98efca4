"""What the pool measures of its children: fork latency, CPU, peak memory, kills.

Kept by the supervisor in the worker's loop (no locks: one thread writes),
read by ``inspect stats`` (the ``forkguard`` section), ``forkguard_status``
and, with the ``[metrics]`` extra, the Prometheus endpoint (``prometheus``).
Percentiles are over the last ``RECENT`` values; counts and sums since start.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Optional

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError

from celery_forkguard.exceptions import MemoryLimitExceeded, TaskKilled, TermException

#: How many recent values the percentiles are taken over.
RECENT = 1000

#: Why children were stopped, as ``kills`` reports them.
KILL_REASONS = ("usr1", "remote", "revoke", "memory", "time_limit", "shutdown", "oom", "lost")


class Summary:
    """Count, sum and maximum since start; p50 and p99 of the recent values."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        self.recent.append(value)

    def percentile(self, fraction: float) -> Optional[float]:
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        def rounded(value: Optional[float]) -> Optional[float]:
            return None if value is None else round(value, digits)
        return {
            "count": self.count, "sum": rounded(self.total), "max": rounded(self.max),
            "p50": rounded(self.percentile(0.5)), "p99": rounded(self.percentile(0.99)),
        }


class PoolMetrics:
    """The measures of one pool (see the module docstring)."""

    def __init__(self) -> None:
        self.fork_latency = Summary()  # seconds: asked for a child -> its pid known
        self.child_cpu = Summary()  # seconds of user + system CPU per child
        self.child_peak_rss = Summary()  # KiB, the child's peak resident set size
        self.kills: Counter[str] = Counter()

    def forked(self, latency: float) -> None:
        self.fork_latency.observe(max(0.0, latency))

    def child_exited(self, cpu: float, maxrss_kib: int) -> None:
        if cpu or maxrss_kib:  # 0 and 0: its fork server was lost, nothing is known
            self.child_cpu.observe(cpu)
            self.child_peak_rss.observe(float(maxrss_kib))

    def killed(self, reason: str) -> None:
        self.kills[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "fork_latency_seconds": self.fork_latency.as_dict(),
            "child_cpu_seconds": self.child_cpu.as_dict(),
            "child_peak_rss_kib": self.child_peak_rss.as_dict(digits=0),
            "kills": {reason: self.kills[reason] for reason in KILL_REASONS},
        }


def kill_reason(error: BaseException) -> str:
    """Which of KILL_REASONS a child stopped with *error* counts as."""
    if isinstance(error, TaskKilled):
        return "usr1" if "by USR1" in str(error) else "remote"
    if isinstance(error, MemoryLimitExceeded):
        return "memory"
    if isinstance(error, TimeLimitExceeded):
        return "time_limit"
    if isinstance(error, Terminated):
        return "revoke"
    if isinstance(error, (TermException, WorkerLostError)):
        return "shutdown"
    return "lost"
