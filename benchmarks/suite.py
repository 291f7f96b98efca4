"""The benchmark suite: forkguard against every alternative, in one run.

Run from the repository root (``nox -s bench`` installs what it needs)::

    python -m benchmarks.suite                      # every workload, defaults
    python -m benchmarks.suite --workloads trivial,10ms --rounds 5
    python -m benchmarks.suite --scale 0.2 --rounds 1   # a quick look

It needs Redis on 127.0.0.1:6379 and uses **databases 6 (broker, counters,
RQ) and 7 (Celery results), which it flushes at start and at the end**.
What it runs and how it measures is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import redis

from benchmarks import procs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
APP = "benchmarks.bench_app"
RQ_SETTINGS = "benchmarks.rq_settings"

#: A run whose counter stands still this long has lost its tasks (or its worker hangs).
STALL_DEADLINE = 60.0
#: How long a run may take to stop forking children once its last task counted.
SETTLE_DEADLINE = 5.0
#: Environment variables of bench_app a run sets itself, never inherited.
RUN_ONLY_ENV = ("FORKGUARD_BENCH_PRELOAD_MB", "FORKGUARD_BENCH_FLOOR", "FORKGUARD_BENCH_PHASES")


# -- contenders -------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "celery", "rq" or "floor"
    layout: str  # see procs.snapshot
    slots: int
    pool: str = ""
    extra: tuple[str, ...] = ()
    #: Slow contenders run this share of a workload's tasks (at least its minimum).
    scale: float = 1.0
    describe: str = ""
    #: Seconds between SIGTERM and SIGKILL when the run is over.
    stop_grace: float = procs.STOP_DEADLINE
    #: At most this many tasks in the workloads that do not scale (latency).
    cap: Optional[int] = None
    #: Settings of the worker's, as environment variables.
    env: tuple[tuple[str, str], ...] = ()


CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender("forkguard", "celery", "forkserver", 2, "forkguard",
              describe="celery worker -P forkguard -c 2"),
    Contender("forkguard-standby", "celery", "forkserver", 2, "forkguard",
              env=(("FORKGUARD_STANDBY_CHILDREN", "2"),),
              describe="celery worker -P forkguard -c 2 with forkguard_standby_children = 2"),
    # Where Python has immortal objects (3.12, 3.13) forkguard marks the worker's heap
    # immortal before the first fork; this row shows what that is worth.
    Contender("forkguard-mortal", "celery", "forkserver", 2, "forkguard",
              env=(("FORKGUARD_IMMORTALIZE", "0"),),
              describe="celery worker -P forkguard -c 2 with forkguard_immortalize = False"),
    # What huge pages before the first fork are worth (Linux 6.1+); asked for by name.
    Contender("forkguard-4k", "celery", "forkserver", 2, "forkguard",
              env=(("FORKGUARD_HUGE_PAGES", "0"),),
              describe="celery worker -P forkguard -c 2 with forkguard_huge_pages = False"),
    Contender("fork-floor", "floor", "fork", 2, "forkguard", scale=0.5,
              describe="os.fork() + os._exit(0) + wait() in a loaded forkguard worker, "
                       "1 and 2 at a time"),
    Contender("prefork", "celery", "pool", 2, "prefork",
              describe="celery worker -P prefork -c 2"),
    Contender("prefork-mtpc1", "celery", "pool", 2, "prefork", ("--max-tasks-per-child=1",),
              scale=0.04, cap=30,
              describe="celery worker -P prefork -c 2 --max-tasks-per-child=1"),
    Contender("solo", "celery", "inline", 1, "solo", describe="celery worker -P solo"),
    Contender("threads", "celery", "inline", 2, "threads",
              describe="celery worker -P threads -c 2"),
    # An idle worker of rq worker-pool does not act on SIGTERM/SIGINT until its BLPOP
    # times out (minutes), so RQ workers get a short grace once their run is over.
    Contender("rq-worker", "rq", "fork", 1, scale=0.3, stop_grace=2.0,
              describe="rq worker (one work horse forked per job)"),
    Contender("rq-pool", "rq", "pool+fork", 2, scale=0.4, stop_grace=2.0,
              describe="rq worker-pool -n 2 (two rq workers, a horse per job)"),
)}
#: The row the floor's 1-slot figures get in the tables.
FLOOR_1 = "fork-floor-1"


# -- workloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "throughput", "memory", "leak", "latency", "usr1"
    tasks: int
    contenders: tuple[str, ...]
    min_tasks: int = 20
    sleep_ms: float = 0.0
    describe: str = ""
    #: Whether slow contenders run fewer tasks (Contender.scale) or the same (up to their cap).
    scaled: bool = True


THROUGHPUT_CONTENDERS = ("forkguard", "forkguard-standby", "prefork", "prefork-mtpc1",
                         "threads", "rq-worker", "rq-pool")
OTHER_CONTENDERS = ("forkguard", "forkguard-standby", "prefork", "prefork-mtpc1", "solo",
                    "threads", "rq-worker", "rq-pool")
#: forkguard-mortal differs from forkguard only where the heap can be made immortal.
IMMORTAL_PYTHON = sys.version_info[:2] in ((3, 12), (3, 13))
#: Run only when named (--contenders).
ON_REQUEST = ("forkguard-4k",) + (() if IMMORTAL_PYTHON else ("forkguard-mortal",))
WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("trivial", "throughput", 800, tuple(c for c in CONTENDERS if c not in ON_REQUEST),
             describe="count and return: the pools' own cost per task"),
    Workload("10ms", "throughput", 200, THROUGHPUT_CONTENDERS, sleep_ms=10,
             describe="sleep 10 ms, then count"),
    Workload("100ms", "throughput", 40, THROUGHPUT_CONTENDERS, min_tasks=12, sleep_ms=100,
             describe="sleep 100 ms, then count"),
    Workload("memory", "memory", 300,
             OTHER_CONTENDERS + (("forkguard-mortal",) if IMMORTAL_PYTHON else ()), min_tasks=10,
             describe="app preloading ~150 MiB of objects; each task reads 1% of them"),
    Workload("leak", "leak", 300, OTHER_CONTENDERS, min_tasks=10, scaled=False,
             describe="each task leaks 2 MiB into a module-level list"),
    Workload("latency", "latency", 200, OTHER_CONTENDERS, scaled=False,
             describe="publish-to-start, one task every 20 ms"),
    Workload("usr1", "usr1", 30, ("forkguard",), min_tasks=3, scaled=False,
             describe="SIGUSR1 to the worker kills its running task: until the child is gone"),
)}
DEFAULT_WORKLOADS = tuple(WORKLOADS)
SLEEP_WORKLOAD = re.compile(r"^(\d+(?:\.\d+)?)ms$")


def workload_named(name: str) -> Workload:
    """A workload of WORKLOADS, or any ``<N>ms`` sleep workload."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    match = SLEEP_WORKLOAD.match(name)
    if not match:
        raise KeyError(name)
    ms = float(match.group(1))
    # About as long per run as 10ms's 200 tasks, within bounds.
    tasks = int(min(800, max(12, 2000 / max(ms, 1))))
    return Workload(name, "throughput", tasks, THROUGHPUT_CONTENDERS, min_tasks=12,
                    sleep_ms=ms, describe=f"sleep {ms:g} ms, then count")


# -- results ------------------------------------------------------------------------------


@dataclass
class Run:
    workload: str
    contender: str
    round: int
    tasks: int
    wall_s: float = 0.0
    startup_s: Optional[float] = None
    seconds: Optional[float] = None
    rate: Optional[float] = None
    executed: Optional[int] = None
    costs: dict[str, Optional[float]] = field(default_factory=dict)
    peak_rss_mib: Optional[float] = None
    peak_pss_mib: Optional[float] = None
    end_rss_mib: Optional[float] = None
    end_pss_mib: Optional[float] = None
    #: The worker's own RSS at the end: every page it maps counts once in the tree's
    #: PSS, so no pool whose worker holds the app can show a smaller peak PSS.
    worker_rss_mib: Optional[float] = None
    latencies_ms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    client: redis.Redis
    env: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    load_at_start: tuple[float, ...] = field(default_factory=os.getloadavg)

    def tasks_for(self, workload: Workload, contender: Contender) -> int:
        base = self.args.tasks.get(workload.name, workload.tasks) * self.args.scale
        if workload.scaled:
            return max(workload.min_tasks, round(base * contender.scale))
        return max(workload.min_tasks, min(round(base), contender.cap or round(base)))


# -- starting workers ------------------------------------------------------------------


def worker_command(contender: Contender, queue: str, args: argparse.Namespace) -> list[str]:
    if contender.kind in ("celery", "floor"):
        return [
            sys.executable, "-m", "celery", "-A", APP, "worker",
            "-P", contender.pool, "-c", str(contender.slots), "-l", "warning",
            "-Q", queue, "-n", f"{queue}@%h",
            # Nothing else to talk to: skip the start-up chatter between workers.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *contender.extra,
        ]
    url = f"{args.redis.rstrip('/')}/{args.broker_db}"
    if contender.layout == "fork":
        return [sys.executable, "-m", "rq.cli", "worker", "-c", RQ_SETTINGS, "-u", url,
                "-n", queue, "--logging_level", "WARNING", queue]
    return [sys.executable, "-m", "rq.cli", "worker-pool", "-n", str(contender.slots),
            "-c", RQ_SETTINGS, "-u", url, "-l", "WARNING", queue]


def start_worker(ctx: Context, contender: Contender, queue: str,
                 env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = RESULTS / "logs" / f"{queue}.log"
    env = {**(env or ctx.env), **dict(contender.env)}
    proc = procs.start(worker_command(contender, queue, ctx.args), REPO, env, log,
                       contender.stop_grace)
    return proc, log


def log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def check_alive(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{name} worker exited ({proc.returncode}):\n{log_tail(log)}")


def new_queue(workload: str, contender: str) -> str:
    return f"fgb-{contender}-{workload}-{uuid.uuid4().hex[:8]}"


# -- publishing -------------------------------------------------------------------------


CELERY_TASKS = {"tick": "bench.tick", "touch": "bench.touch", "leak": "bench.leak",
                "stamp": "bench.stamp", "hold": "bench.hold"}


def enqueue(ctx: Context, contender: Contender, queue: str, task: str,
            calls: Sequence[tuple[Any, ...]]) -> None:
    """Put every call on *queue* (no worker consumes it yet)."""
    if contender.kind == "rq":
        from rq import Queue

        rq_queue = Queue(queue, connection=ctx.client)
        datas = [Queue.prepare_data(f"benchmarks.jobs.{task}", args=call, result_ttl=0,
                                    timeout=3600) for call in calls]
        for start in range(0, len(datas), 500):
            with ctx.client.pipeline() as pipe:
                rq_queue.enqueue_many(datas[start:start + 500], pipeline=pipe)
                pipe.execute()
        return
    from benchmarks.bench_app import app

    with app.producer_or_acquire() as producer:
        for call in calls:
            app.send_task(CELERY_TASKS[task], args=call, queue=queue, producer=producer)


class Publisher:
    """Publishes one call at a time, as an application would (latency, usr1)."""

    def __init__(self, ctx: Context, contender: Contender, queue: str) -> None:
        self.ctx, self.contender, self.queue = ctx, contender, queue
        self._stack = contextlib.ExitStack()
        if contender.kind == "rq":
            from rq import Queue

            self._rq = Queue(queue, connection=ctx.client)
        else:
            from benchmarks.bench_app import app

            self._app = app
            self._producer = self._stack.enter_context(app.producer_or_acquire())

    def publish(self, task: str, *args: Any) -> None:
        if self.contender.kind == "rq":
            self._rq.enqueue(f"benchmarks.jobs.{task}", *args, result_ttl=0, job_timeout=3600)
        else:
            self._app.send_task(CELERY_TASKS[task], args=args, queue=self.queue,
                                producer=self._producer)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


# -- throughput, memory and leak runs -------------------------------------------------


def run_batch(ctx: Context, workload: Workload, contender: Contender, round_no: int) -> Run:
    """Pre-enqueue N tasks, start the worker, time first to last completion."""
    tasks = ctx.tasks_for(workload, contender)
    queue = new_queue(workload.name, contender.name)
    key = f"fgbench:{queue}"
    env = dict(ctx.env)
    if workload.kind == "memory":
        task, calls = "touch", [(key, tasks, ctx.args.touch_share)] * tasks
        env["FORKGUARD_BENCH_PRELOAD_MB"] = str(ctx.args.preload_mb)
    elif workload.kind == "leak":
        task, calls = "leak", [(key, tasks, ctx.args.leak_mb)] * tasks
    else:
        task, calls = "tick", [(key, tasks, workload.sleep_ms)] * tasks
    phases = RESULTS / "logs" / f"{queue}.phases.jsonl"
    if ctx.args.phases and contender.pool == "forkguard" and workload.kind == "throughput":
        env["FORKGUARD_BENCH_PHASES"] = str(phases)
    enqueue(ctx, contender, queue, task, calls)
    run = Run(workload.name, contender.name, round_no, tasks)
    began = time.monotonic()
    proc, log = start_worker(ctx, contender, queue, env)
    run.log = str(log.relative_to(REPO))
    sampling = workload.kind in ("memory", "leak")
    state: dict[str, Any] = {"count": 0, "moved": time.monotonic(), "before": None}
    try:
        with procs.MemorySampler(proc.pid) if sampling else contextlib.nullcontext() as mem:

            def finished() -> bool:
                check_alive(proc, contender.name, log)
                count, last = ctx.client.mget(f"{key}:count", f"{key}:last")
                now = time.monotonic()
                if int(count or 0) != state["count"]:
                    state["moved"] = now
                elif now - state["moved"] > STALL_DEADLINE:
                    raise RuntimeError(
                        f"{contender.name}: no task completed for {STALL_DEADLINE:.0f}s at "
                        f"{state['count']}/{tasks} (worker log: {log})")
                state["count"] = int(count or 0)
                if state["count"] and state["before"] is None:
                    state["before"] = procs.snapshot(proc.pid, contender.layout)
                    state["before_count"] = state["count"]
                return last is not None

            procs.wait_for(finished, ctx.args.timeout, f"{tasks} {contender.name} tasks")
            after = settle(proc.pid, contender.layout, state["before"])
        run.end_rss_mib, run.end_pss_mib = procs.tree_memory(proc.pid)
        if mem is not None:
            run.worker_rss_mib = procs.own_rss(proc.pid)
            run.peak_rss_mib = max(mem.peak_rss, run.end_rss_mib)
            run.peak_pss_mib = max(mem.peak_pss, run.end_pss_mib)
    finally:
        procs.stop(proc, contender.stop_grace)
        run.wall_s = time.monotonic() - began
    first, first_start, last, executed = (
        float(value or "nan") for value in ctx.client.mget(
            f"{key}:first", f"{key}:first_start", f"{key}:last", f"{key}:count"))
    run.seconds = last - first
    run.rate = (tasks - 1) / run.seconds if run.seconds > 0 else None
    run.startup_s = first_start - began
    run.executed = 0 if math.isnan(executed) else int(executed)
    if state["before"] is not None:
        run.costs = procs.costs(state["before"], after, tasks - state["before_count"])
    if phases.exists():
        run.extra["child_phases"] = child_phases(phases)
    return run


def settle(root: int, layout: str, before: Optional[procs.Snapshot]) -> procs.Snapshot:
    """The tree once the task processes forked during the run are reaped (or after
    SETTLE_DEADLINE), so that their CPU and faults are counted."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while True:
        snap = procs.snapshot(root, layout)
        if procs.in_flight(snap, before) == 0 or time.monotonic() > deadline:
            return snap
        time.sleep(0.01)


def child_phases(path: Path) -> Optional[dict[str, float]]:
    """Medians over the children's phase lines (see bench_app's FORKGUARD_BENCH_PHASES)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if {"init", "prerun", "postrun"} <= line["wall_ms"].keys()]
    if not lines:
        return None

    def median(key: str, a: str, b: Optional[str] = None) -> float:
        values = [x[key][a] - (x[key][b] if b else 0) for x in lines]
        return round(statistics.median(values), 3)

    return {
        "children": len(lines),
        "setup_wall_ms": median("wall_ms", "init"),
        "to_task_wall_ms": median("wall_ms", "prerun", "init"),
        "task_wall_ms": median("wall_ms", "postrun", "prerun"),
        "report_and_hooks_wall_ms": median("wall_ms", "exit", "postrun"),
        "fork_to_exit_wall_ms": median("wall_ms", "exit"),
        "setup_cpu_ms": median("cpu_ms", "init"),
        "fork_to_exit_cpu_ms": median("cpu_ms", "exit"),
        "setup_minflt": median("minflt", "init"),
        "fork_to_exit_minflt": median("minflt", "exit"),
    }


# -- the fork floor -----------------------------------------------------------------------


def run_floor(ctx: Context, workload: Workload, contender: Contender,
              round_no: int) -> list[Run]:
    """fork()+exit in a loaded worker, 1 then 2 at a time (bench_app.fork_floor)."""
    forks = ctx.tasks_for(workload, contender)
    queue = new_queue(workload.name, contender.name)
    key = f"fgbench:{queue}:floor"
    env = {**ctx.env, "FORKGUARD_BENCH_FLOOR": f"{key}:{forks}:1,2"}
    began = time.monotonic()
    proc, log = start_worker(ctx, contender, queue, env)
    try:
        def measured() -> bool:
            check_alive(proc, contender.name, log)
            return bool(ctx.client.exists(key))

        procs.wait_for(measured, ctx.args.timeout, "the fork floor")
        fork_server = [pid for pid in procs.descendants(proc.pid)
                       if procs.title(pid).startswith(procs.FORK_SERVER_TITLE)]
        server_rss = procs.tree_memory(fork_server[0])[0] if fork_server else None
    finally:
        procs.stop(proc, contender.stop_grace)
    wall = time.monotonic() - began
    worker = json.loads(ctx.client.get(key) or "null")
    copy = json.loads(ctx.client.get(f"{key}:copy") or "null")
    runs = []
    for measure in worker["runs"]:
        slots = measure["slots"]
        variants = {"worker": (measure, worker["rss_kib"])}
        if copy is not None:
            twin = next(m for m in copy["runs"] if m["slots"] == slots)
            variants["copy"] = (twin, copy["rss_kib"])
        # The floor is the faster of the two.
        source = max(variants, key=lambda v: variants[v][0]["forks_per_s"])
        best, rss_kib = variants[source]
        name = contender.name if slots == 2 else FLOOR_1
        run = Run(workload.name, name, round_no, forks, wall_s=wall,
                  seconds=best["seconds"], rate=best["forks_per_s"], executed=forks,
                  log=str(log.relative_to(REPO)))
        run.costs = {
            "master_cpu_ms": best["parent_cpu_ms_per_fork"],
            "helper_cpu_ms": None,
            "task_cpu_ms": best["child_cpu_ms_per_fork"],
            "total_cpu_ms": best["parent_cpu_ms_per_fork"] + best["child_cpu_ms_per_fork"],
            "master_minflt": best["parent_minflt_per_fork"],
            "helper_minflt": None,
            "task_minflt": best["child_minflt_per_fork"],
        }
        run.extra = {
            "slots": slots, "source": source, "forking_rss_mib": rss_kib / 1024,
            "fork_server_rss_mib": server_rss,
            "forks_per_s": {v: m["forks_per_s"] for v, (m, _) in variants.items()},
            "rss_mib": {v: r / 1024 for v, (_, r) in variants.items()},
        }
        runs.append(run)
    return runs


# -- latency ---------------------------------------------------------------------------


def run_latency(ctx: Context, workload: Workload, contender: Contender, round_no: int) -> Run:
    """Publish one task every --spacing-ms to an idle, ready worker; each records
    how long after its publication it started."""
    tasks = ctx.tasks_for(workload, contender)
    queue = new_queue(workload.name, contender.name)
    key = f"fgbench:{queue}"
    run = Run(workload.name, contender.name, round_no, tasks)
    began = time.monotonic()
    proc, log = start_worker(ctx, contender, queue)
    run.log = str(log.relative_to(REPO))
    try:
        with Publisher(ctx, contender, queue) as publisher:
            # Ready means a task went through: then the worker sits idle.
            publisher.publish("stamp", f"{key}:warm", time.time())
            wait_list(ctx, proc, contender, log, f"{key}:warm:lat", 1)
            run.startup_s = time.monotonic() - began
            spacing = ctx.args.spacing_ms / 1e3
            t0 = time.monotonic()
            for i in range(tasks):
                # Pacing the load, not waiting for anything: the tasks keep their own time.
                delay = t0 + i * spacing - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                publisher.publish("stamp", key, time.time())
            wait_list(ctx, proc, contender, log, f"{key}:lat", tasks)
        run.latencies_ms = [float(x) * 1e3 for x in ctx.client.lrange(f"{key}:lat", 0, -1)]
    finally:
        procs.stop(proc, contender.stop_grace)
        run.wall_s = time.monotonic() - began
    run.executed = len(run.latencies_ms)
    return run


def wait_list(ctx: Context, proc: subprocess.Popen[bytes], contender: Contender, log: Path,
              key: str, length: int) -> None:
    state = {"n": 0, "moved": time.monotonic()}

    def long_enough() -> bool:
        check_alive(proc, contender.name, log)
        n = ctx.client.llen(key)
        if n != state["n"]:
            state.update(n=n, moved=time.monotonic())
        elif time.monotonic() - state["moved"] > STALL_DEADLINE:
            raise RuntimeError(f"{contender.name}: stuck at {n}/{length} (worker log: {log})")
        return n >= length

    procs.wait_for(long_enough, ctx.args.timeout, f"{length} entries at {key}", interval=0.01)


# -- USR1 kill latency --------------------------------------------------------------------


def run_usr1(ctx: Context, workload: Workload, contender: Contender, round_no: int) -> Run:
    """Start a long task, SIGUSR1 the worker, time until the child has exited
    and until it is reaped (gone from /proc); --kills times."""
    kills = ctx.tasks_for(workload, contender)
    queue = new_queue(workload.name, contender.name)
    key = f"fgbench:{queue}"
    run = Run(workload.name, contender.name, round_no, kills)
    began = time.monotonic()
    proc, log = start_worker(ctx, contender, queue)
    run.log = str(log.relative_to(REPO))
    exited: list[float] = []
    try:
        with Publisher(ctx, contender, queue) as publisher:
            for _ in range(kills):
                publisher.publish("hold", key, 600.0)
                popped = ctx.client.blpop([f"{key}:pids"], timeout=60)
                check_alive(proc, contender.name, log)
                if popped is None:
                    raise RuntimeError(f"usr1: no task started within 60 s (log: {log})")
                pid = int(popped[1])
                sent = time.perf_counter()
                os.kill(proc.pid, signal.SIGUSR1)
                deadline = sent + 10.0
                dead_at = None
                while not procs.reaped(pid):
                    now = time.perf_counter()
                    if dead_at is None and procs.gone(pid):
                        dead_at = now
                    if now > deadline:
                        raise RuntimeError(f"usr1: child {pid} still there after 10 s")
                    time.sleep(0.0005)
                reaped_at = time.perf_counter()
                exited.append(((dead_at or reaped_at) - sent) * 1e3)
                run.latencies_ms.append((reaped_at - sent) * 1e3)
    finally:
        procs.stop(proc, contender.stop_grace)
        run.wall_s = time.monotonic() - began
    run.executed = len(run.latencies_ms)
    run.extra["exited_ms"] = exited
    return run


# -- the suite ----------------------------------------------------------------------------


def run_one(ctx: Context, workload: Workload, name: str, round_no: int) -> list[Run]:
    contender = CONTENDERS[name]
    if contender.kind == "floor":
        return run_floor(ctx, workload, contender, round_no)
    if workload.kind == "latency":
        return [run_latency(ctx, workload, contender, round_no)]
    if workload.kind == "usr1":
        return [run_usr1(ctx, workload, contender, round_no)]
    return [run_batch(ctx, workload, contender, round_no)]


def plan(args: argparse.Namespace) -> Iterator[tuple[int, Workload, str]]:
    """(round, workload, contender) in order: per round, each workload's contenders
    one after the other, so a slow phase of the machine hits them all."""
    rounds = max(args.rounds, args.other_rounds)
    for round_no in range(1, rounds + 1):
        for workload in args.workload_list:
            limit = args.rounds if workload.kind == "throughput" else args.other_rounds
            if round_no > limit:
                continue
            for name in contenders_for(workload, args):
                yield round_no, workload, name


def contenders_for(workload: Workload, args: argparse.Namespace) -> list[str]:
    if args.contender_list is None:
        return list(workload.contenders)
    usable = set(workload.contenders)
    if workload.kind != "usr1":  # any pool runs any workload, the floor only trivial ones
        usable |= {n for n in CONTENDERS if n != "fork-floor"}
        if workload.kind == "throughput" and workload.sleep_ms == 0:
            usable.add("fork-floor")
    return [n for n in args.contender_list if n in usable]


def describe_run(run: Run) -> str:
    parts = [f"round {run.round} {run.workload:<8} {run.contender:<14}"]
    if run.workload in ("latency", "usr1") and run.latencies_ms:
        parts.append(f"p50 {procs.percentile(run.latencies_ms, 50):8.2f} ms  "
                     f"p99 {procs.percentile(run.latencies_ms, 99):8.2f} ms")
    elif run.rate is not None:
        unit = "forks/s" if run.contender.startswith("fork-floor") else "tasks/s"
        detail = f"{run.tasks} in {run.seconds:.2f}s"
        if run.startup_s is not None:
            detail += f", start-up {run.startup_s:.2f}s"
        parts.append(f"{run.rate:9.1f} {unit} ({detail})")
    if run.peak_pss_mib is not None:
        parts.append(f"peak PSS {run.peak_pss_mib:.0f} MiB")
    if run.end_pss_mib is not None and run.workload == "leak":
        parts.append(f"end PSS {run.end_pss_mib:.0f} MiB")
    parts.append(f"[{run.wall_s:.1f}s]")
    return " ".join(parts)


def parse_tasks(text: str) -> dict[str, int]:
    """``2000`` (the trivial workload) or ``trivial=2000,100ms=100``."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.rpartition("=")
        out[name or "trivial"] = int(value)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Workloads: " + "; ".join(f"{w.name}: {w.describe}" for w in WORKLOADS.values())
        + ". Contenders: " + "; ".join(f"{c.name}: {c.describe}" for c in CONTENDERS.values()),
    )
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help="comma-separated, from %(default)s, or any <N>ms sleep workload")
    parser.add_argument("--contenders", default="",
                        help="comma-separated (default: each workload's own list)")
    parser.add_argument("--tasks", type=parse_tasks, default={},
                        help="tasks per run: N for trivial, or NAME=N,... per workload "
                             "(defaults: " + ", ".join(
                                 f"{w.name} {w.tasks}" for w in WORKLOADS.values()) + ")")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every workload's task count (0.2: a quick look)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the throughput workloads (default 3)")
    parser.add_argument("--other-rounds", type=int, default=1,
                        help="rounds of memory, leak, latency and usr1 (default 1)")
    parser.add_argument("--preload-mb", type=float, default=150.0,
                        help="memory workload: MiB of objects the app builds at import")
    parser.add_argument("--touch-share", type=float, default=0.01,
                        help="memory workload: share of the objects each task reads")
    parser.add_argument("--leak-mb", type=float, default=2.0, help="leak workload: MiB per task")
    parser.add_argument("--spacing-ms", type=float, default=20.0,
                        help="latency workload: time between two publications")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="Redis server (without database)")
    parser.add_argument("--broker-db", type=int, default=6)
    parser.add_argument("--backend-db", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline per run, s")
    parser.add_argument("--phases", action="store_true",
                        help="time each forkguard child's set-up, task and exit "
                             "(adds work to each child: not for headline figures)")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the charts and a summary to docs/_static/bench/")
    parser.add_argument("--fail-below-target", action="store_true",
                        help="exit 1 if a target of the issue is not met")
    args = parser.parse_args(argv)
    try:
        args.workload_list = [workload_named(n.strip())
                              for n in args.workloads.split(",") if n.strip()]
    except KeyError as exc:
        parser.error(f"unknown workload {exc}; choose from {', '.join(WORKLOADS)} or <N>ms")
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    args.contender_list = names or None
    if args.rounds < 1 or args.other_rounds < 1 or args.scale <= 0:
        parser.error("need --rounds >= 1, --other-rounds >= 1 and --scale > 0")
    if args.broker_db == args.backend_db:
        parser.error("--broker-db and --backend-db must differ")
    if args.publish and args.no_charts:
        parser.error("--publish needs the charts")
    if args.publish and {w.name for w in args.workload_list} < set(DEFAULT_WORKLOADS):
        parser.error("--publish needs every workload, so that the published charts "
                     "all come from one run")
    return args


def configure(args: argparse.Namespace) -> tuple[redis.Redis, dict[str, str]]:
    """Point this process and the workers at the suite's databases; flush them."""
    base = args.redis.rstrip("/")
    for name in RUN_ONLY_ENV:
        os.environ.pop(name, None)
    env = dict(os.environ)
    env.update(
        FORKGUARD_BENCH_BROKER=f"{base}/{args.broker_db}",
        FORKGUARD_BENCH_BACKEND=f"{base}/{args.backend_db}",
        FORKGUARD_BENCH_COUNTER=f"{base}/{args.broker_db}",
        PYTHONUNBUFFERED="1",
    )
    # bench_app and jobs read these at import, and this process publishes through them.
    os.environ.update({k: env[k] for k in env if k.startswith("FORKGUARD_BENCH_")})
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    client = redis.Redis.from_url(f"{base}/{args.broker_db}")
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis is not answering at {base}: {exc}") from exc
    flush(args)
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    return client, env


def flush(args: argparse.Namespace) -> None:
    """Empty the suite's own databases (and only those)."""
    base = args.redis.rstrip("/")
    for db in (args.broker_db, args.backend_db):
        redis.Redis.from_url(f"{base}/{db}").flushdb()


def check_tools(args: argparse.Namespace) -> None:
    if args.publish:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--publish needs matplotlib (nox -s bench installs it)") from None
    wanted = {n for _, _, n in plan(args)}
    if any(CONTENDERS[n].kind == "rq" for n in wanted):
        try:
            import rq  # noqa: F401
        except ImportError:
            message = ("the rq contenders need rq 3: pip install 'rq>=3,<4' (Python 3.10+; "
                       "nox -s bench installs it there)")
            if args.contender_list is not None:
                raise SystemExit(message) from None
            print(f"warning: {message}; leaving them out", flush=True)
            args.contender_list = [n for n in CONTENDERS if CONTENDERS[n].kind != "rq"]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks import report

    args = parse_args(argv)
    check_tools(args)
    client, env = configure(args)
    ctx = Context(args, client, env)
    # Also when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    started = time.time()
    steps = list(plan(args))
    print(f"{len(steps)} runs: " + ", ".join(w.name for w in args.workload_list)
          + f"; {args.rounds} round(s) of throughput, {args.other_rounds} of the others; "
          f"Redis DBs {args.broker_db} and {args.backend_db}", flush=True)
    try:
        for round_no, workload, name in steps:
            try:
                runs = run_one(ctx, workload, name, round_no)
            except (RuntimeError, TimeoutError, redis.RedisError, OSError) as exc:
                message = f"round {round_no} {workload.name} {name}: {exc}"
                ctx.errors.append(message)
                print(f"ERROR {message}", flush=True)
                continue
            for run in runs:
                ctx.runs.append(run)
                print(describe_run(run), flush=True)
                if run.executed is not None and run.executed != run.tasks:
                    print(f"warning: {run.executed} executions for {run.tasks} tasks "
                          "(redelivered or lost tasks)", flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping workers", flush=True)
        return 130
    finally:
        procs.stop_all()
        with contextlib.suppress(redis.RedisError):
            flush(args)
    duration = time.time() - started
    summary = report.summarise(ctx.runs, args)
    report.print_tables(summary, args)
    targets = report.targets(summary)
    charts: list[Path] = []
    if not args.no_charts:
        charts = report.charts(summary, args, RESULTS, time.strftime("%Y%m%d-%H%M%S",
                                                                time.localtime(started)))
    path = report.write_json(ctx, summary, targets, charts, started, duration)
    if args.publish:
        report.publish(charts, path, REPO / "docs" / "_static" / "bench")
    for message in ctx.errors:
        print(f"ERROR {message}")
    print(f"\nresults: {path.relative_to(REPO)}"
          + "".join(f"\nchart: {c.relative_to(REPO)}" for c in charts))
    print(f"duration: {duration / 60:.1f} min")
    report.print_targets(targets)
    if ctx.errors:
        return 1
    if args.fail_below_target and any(t["met"] is False for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
