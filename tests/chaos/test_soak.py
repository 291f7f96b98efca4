"""Case 7: 10,000 trivial tasks through one worker; what it holds stays flat.

Fork-per-task means nothing a task does accumulates in the worker or in the
fork server.  The worker's and the fork server's open fds, threads and
resident memory are sampled after a warm-up (idle), in the middle of the run
(busy), and at the end (idle again), with the number of live task children:
the idle samples must match (RSS within +10 MB), and no child outlives its
task.
"""

from __future__ import annotations

import pytest

from tests.chaos.case import Case
from tests.chaos.workers import Sample, sample
from tests.harness import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

TOTAL = 10_000
WARM_UP = 500
CONCURRENCY = 2
RSS_TOLERANCE_MB = 10.0


def test_ten_thousand_tasks_stay_flat(open_case) -> None:
    case: Case = open_case("10k-trivial")
    # Warnings only: 20,000 INFO lines would cost the worker more than the tasks do.
    worker = case.start_worker("-l", "warning", concurrency=CONCURRENCY)
    case.send_many("work", WARM_UP)
    assert case.settle(timeout=120), "the warm-up did not drain"
    warm = sample(worker, "warm")

    case.send_many("work", TOTAL - WARM_UP)
    wait_for(lambda: case.ledger.finished_count() >= TOTAL // 2, timeout=400, interval=0.5,
             message="half of the tasks")
    mid = sample(worker, "mid")
    settled = case.settle(timeout=400)
    end = sample(worker, "end")
    figures = case.report(notes=usage_notes(warm, mid, end))
    for line in (warm, mid, end):
        print(f"  {line}")

    assert settled, f"the queue did not drain; lost: {figures.lost_ids}"
    case.check(figures)
    assert figures.done == TOTAL
    for before, after in ((warm.worker, end.worker), (warm.server, end.server)):
        assert after.fds == before.fds and after.threads == before.threads, (before, after)
        assert after.rss_mb <= before.rss_mb + RSS_TOLERANCE_MB, (before, after)
    # A child settled on its report may still be exiting while its slot's next
    # child runs (settle on report): at most one such per slot in a sample.
    assert mid.children <= 2 * CONCURRENCY and end.children == 0, (mid, end)
    # Mid-run the worker also holds one report pipe per running child.
    assert mid.worker.fds <= warm.worker.fds + CONCURRENCY, (warm, mid)


def usage_notes(warm: Sample, mid: Sample, end: Sample) -> str:
    def trend(get: str) -> str:
        return "/".join(str(round(getattr(getattr(s, who), get), 1))
                        for who in ("worker", "server") for s in (warm, mid, end))
    return (f"[warm/mid/end worker|server: fds {trend('fds')} threads {trend('threads')} "
            f"rss_mb {trend('rss_mb')}; children {mid.children}/{end.children}]")
