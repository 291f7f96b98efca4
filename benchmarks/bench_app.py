"""The Celery app the benchmark suite starts its workers with.

Its tasks wrap the functions of ``jobs.py`` (which RQ runs as they are):
``bench.tick`` counts a completion (optionally after sleeping),
``bench.touch`` reads a slice of the preloaded objects first, ``bench.leak``
leaks 2 MiB first, ``bench.stamp`` records its publish-to-start latency and
``bench.hold`` records its pid and sleeps until it is killed.

Settings come from the environment so the suite can point the workers at
its own Redis databases: ``FORKGUARD_BENCH_BROKER`` (default DB 6),
``FORKGUARD_BENCH_BACKEND`` (default DB 7) and ``FORKGUARD_BENCH_COUNTER``
(where the tasks count; default DB 6).  ``FORKGUARD_BENCH_PRELOAD_MB=N``
makes the app hold about N MiB of Python objects from import on (see
``jobs.py``).

``FORKGUARD_BENCH_FLOOR=KEY:FORKS:SLOTS[,SLOTS...]`` measures the fork floor
once the worker is ready, in the worker's own process and in a quiet copy
of it (see ``fork_floor``), and stores the figures at KEY and KEY:copy.

``FORKGUARD_BENCH_PHASES=PATH`` makes every forked child append one JSON
line to PATH at its ``worker_process_shutdown``: wall and CPU time and minor
page faults at each step of its life, counted from the fork (meant for
forkguard, whose children run one task each).

``FORKGUARD_BENCH_PROFILE=PATH`` runs cProfile in the worker's main thread
from ``worker_ready`` on and writes ``PATH.<pid>`` at exit; forked children
stop it at once so only the master is measured.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from typing import Any

from celery import Celery, signals

from benchmarks import jobs

DEFAULT_BROKER = "redis://127.0.0.1:6379/6"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/7"

BROKER_URL = os.environ.get("FORKGUARD_BENCH_BROKER", DEFAULT_BROKER)
BACKEND_URL = os.environ.get("FORKGUARD_BENCH_BACKEND", DEFAULT_BACKEND)

app = Celery("forkguard_bench", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.tick", ignore_result=True)
def tick(key: str, total: int, sleep_ms: float = 0.0) -> None:
    """Count one completion (``jobs.tick``); *sleep_ms* stands for the task's work."""
    jobs.tick(key, total, sleep_ms)


@app.task(name="bench.touch", ignore_result=True)
def touch(key: str, total: int, share: float = 0.01) -> None:
    """Read a slice of the preloaded objects, then count (``jobs.touch``)."""
    jobs.touch(key, total, share)


@app.task(name="bench.leak", ignore_result=True)
def leak(key: str, total: int, mb: float = 2.0) -> None:
    """Leak *mb* MiB into a module-level list, then count (``jobs.leak``)."""
    jobs.leak(key, total, mb)


@app.task(name="bench.stamp", ignore_result=True)
def stamp(key: str, published: float) -> None:
    """Record the publish-to-start latency (``jobs.stamp``)."""
    jobs.stamp(key, published)


@app.task(name="bench.hold", ignore_result=True)
def hold(key: str, seconds: float) -> None:
    """Record this process's pid, then sleep until killed (``jobs.hold``)."""
    jobs.hold(key, seconds)


# -- the fork floor -----------------------------------------------------------------------


def fork_floor(forks: int, slots: int) -> dict[str, float]:
    """Fork *forks* children that ``os._exit(0)`` at once, *slots* at a time.

    What a fork-per-task pool cannot go below: ``os.fork()`` of this process
    (CPython's at-fork hooks included), the child's exit, and ``wait()``.
    CPU and page faults of the children come from ``RUSAGE_CHILDREN``.
    """
    ours: set[int] = set()
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    forked = 0
    while forked < forks or ours:
        while len(ours) < slots and forked < forks:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            ours.add(pid)
            forked += 1
        pid, _ = os.wait()
        ours.discard(pid)
    elapsed = time.perf_counter() - started
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def cpu(usage: resource.struct_rusage) -> float:
        return usage.ru_utime + usage.ru_stime

    return {
        "slots": slots,
        "forks": forks,
        "seconds": elapsed,
        "forks_per_s": forks / elapsed,
        "parent_cpu_ms_per_fork": (cpu(after_self) - cpu(before_self)) * 1e3 / forks,
        "child_cpu_ms_per_fork": (cpu(after_children) - cpu(before_children)) * 1e3 / forks,
        "parent_minflt_per_fork": (after_self.ru_minflt - before_self.ru_minflt) / forks,
        "child_minflt_per_fork": (after_children.ru_minflt - before_children.ru_minflt) / forks,
    }


def _fork_floor_at_ready() -> None:
    """With FORKGUARD_BENCH_FLOOR=KEY:FORKS:SLOTS[,SLOTS...], measure the floor
    once the worker is ready, in its own process and in a copy of it, and SET
    the figures (JSON) at KEY and KEY:copy in the counter's database."""
    spec = os.environ.get("FORKGUARD_BENCH_FLOOR")
    if not spec:
        return
    key, forks, slots = spec.rsplit(":", 2)

    def figures() -> str:
        with open("/proc/self/statm", "rb") as f:
            rss_kib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        runs = [fork_floor(int(forks), int(n)) for n in slots.split(",")]
        return json.dumps({"pid": os.getpid(), "rss_kib": rss_kib, "runs": runs})

    def measure(**_: Any) -> None:
        # In the worker itself, then in a quiet copy of it (as forkguard's fork
        # server is one): the floor is the faster of the two.
        worker = figures()
        pid = os.fork()
        if pid == 0:
            try:
                gc.disable()
                gc.freeze()
                copy = figures()
                with jobs.connect() as sock:
                    jobs.command(sock, "SET", f"{key}:copy", copy)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        with jobs.connect() as sock:
            jobs.command(sock, "SET", key, worker)

    signals.worker_ready.connect(measure, weak=False)


def _watch_phases() -> None:
    """Record the life of each forked child when FORKGUARD_BENCH_PHASES is set."""
    target = os.environ.get("FORKGUARD_BENCH_PHASES")
    if not target:
        return
    marks: dict[str, tuple[float, float, int]] = {}

    def mark(name: str) -> None:
        # CPU time and rusage restart at zero in a new process: both count from the fork.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks[name] = (time.perf_counter(), time.process_time(), usage.ru_minflt)

    def forked() -> None:
        marks.clear()
        mark("fork")

    def write(**_: Any) -> None:
        mark("exit")
        if "fork" not in marks:
            return
        start = marks["fork"][0]
        line = json.dumps({
            "pid": os.getpid(),
            "wall_ms": {k: (v[0] - start) * 1e3 for k, v in marks.items()},
            "cpu_ms": {k: v[1] * 1e3 for k, v in marks.items()},
            "minflt": {k: v[2] for k, v in marks.items()},
        })
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode() + b"\n")  # one write: lines never interleave
        finally:
            os.close(fd)

    os.register_at_fork(after_in_child=forked)
    signals.worker_process_init.connect(lambda **_: mark("init"), weak=False)
    signals.task_prerun.connect(lambda **_: mark("prerun"), weak=False)
    signals.task_postrun.connect(lambda **_: mark("postrun"), weak=False)
    signals.worker_process_shutdown.connect(write, weak=False)


def _start_profiler() -> None:
    """Profile the worker's main thread when FORKGUARD_BENCH_PROFILE is set."""
    target = os.environ.get("FORKGUARD_BENCH_PROFILE")
    if not target:
        return
    import atexit
    import cProfile

    profiler = cProfile.Profile()
    master = os.getpid()
    started: list[bool] = []

    def dump() -> None:
        if started and os.getpid() == master:
            profiler.disable()
            profiler.dump_stats(f"{target}.{master}")

    def start(**_: Any) -> None:
        started.append(True)
        profiler.enable()

    # Children inherit the running profiler: stop it there right after fork.
    os.register_at_fork(after_in_child=profiler.disable)
    signals.worker_ready.connect(start, weak=False)
    atexit.register(dump)


_watch_phases()
_start_profiler()
_fork_floor_at_ready()
