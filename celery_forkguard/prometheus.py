"""A Prometheus endpoint in the worker (opt-in: ``forkguard_metrics_port``).

Needs ``prometheus_client`` (``pip install celery-forkguard[metrics]``).  It
serves, from a thread of the worker, a registry of its own: the pool's
measures (``metrics.PoolMetrics``) read at each scrape, and the worker
process's own CPU and memory.  It starts once the pool and its fork server
run, so no child is forked holding the listening socket; children close the
worker's fds anyway.  A port that cannot be bound is logged and the worker
runs on without the endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from celery.exceptions import ImproperlyConfigured
from celery.utils.log import get_logger

from celery_forkguard.metrics import KILL_REASONS, Summary

if TYPE_CHECKING:
    from celery_forkguard.prefork import TaskPool

logger = get_logger(__name__)

MISSING = ("forkguard_metrics_port is set, but prometheus_client is not installed: "
           "pip install 'celery-forkguard[metrics]'")


def check_available() -> None:
    """Stop the worker at start, saying what to install, if the endpoint cannot run."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImproperlyConfigured(MISSING) from None


def start_exporter(pool: TaskPool, port: int, address: str) -> Optional[Any]:
    """Serve ``/metrics`` on *address*:*port*; the server, or None if it could not bind."""
    check_available()
    import prometheus_client

    registry = prometheus_client.CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(pool))
    prometheus_client.ProcessCollector(registry=registry)
    try:
        server, _ = prometheus_client.start_http_server(port, address, registry=registry)
    except OSError as exc:
        logger.error("forkguard: no metrics endpoint: cannot listen on %s:%d (%s)",
                     address, port, exc)
        return None
    except TypeError:  # prometheus_client < 0.19 returns nothing
        logger.info("forkguard: metrics on http://%s:%d/metrics", address, port)
        return None
    logger.info("forkguard: metrics on http://%s:%d/metrics", address, port)
    return server


class PoolCollector:
    """Reads the pool's measures at each scrape (from the endpoint's thread)."""

    def __init__(self, pool: TaskPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = self.pool.measures()
        if info is None:
            return
        metrics, counts, running, queued = info
        yield from _summary("forkguard_fork_latency_seconds",
                            "From asking for a task's child to knowing its pid.",
                            metrics.fork_latency)
        yield from _summary("forkguard_child_cpu_seconds",
                            "User + system CPU seconds of each task's child.", metrics.child_cpu)
        yield from _summary("forkguard_child_peak_rss_bytes",
                            "Peak resident set size of each task's child.",
                            metrics.child_peak_rss, scale=1024.0)
        kills = CounterMetricFamily("forkguard_child_kills", "Children stopped, by reason.",
                                    labels=["reason"])
        for reason in KILL_REASONS:
            kills.add_metric([reason], metrics.kills[reason])
        yield kills
        ends = CounterMetricFamily("forkguard_children", "Children by how they ended.",
                                   labels=["outcome"])
        for outcome in ("forked", "reported", "killed", "lost", "fork_failed"):
            ends.add_metric([outcome], counts.get(outcome, 0))
        yield ends
        yield GaugeMetricFamily("forkguard_children_running", "Children running now.",
                                value=running)
        yield GaugeMetricFamily("forkguard_tasks_queued", "Tasks waiting for a free slot.",
                                value=queued)
        yield GaugeMetricFamily("forkguard_pool_size", "Slots: children that may run at once.",
                                value=self.pool.num_processes)


def _summary(name: str, doc: str, summary: Summary, scale: float = 1.0) -> Iterator[Any]:
    """A Prometheus summary (count, sum) and the recent p50, p99 and max as gauges."""
    from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

    yield SummaryMetricFamily(name, doc, count_value=summary.count,
                              sum_value=summary.total * scale)
    recent = GaugeMetricFamily(f"{name}_recent", f"{doc} Over the last children.",
                               labels=["quantile"])
    for label, fraction in (("0.5", 0.5), ("0.99", 0.99), ("1", 1.0)):
        value = summary.percentile(fraction)
        if value is not None:
            recent.add_metric([label], value * scale)
    yield recent
