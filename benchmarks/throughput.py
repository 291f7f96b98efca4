"""Trivial-task throughput of forkguard against prefork, measured in one run.

Method (see benchmarks/README.md for the why):

1. Flush the benchmark's Redis databases (broker DB 12, results DB 13).
2. For each run, enqueue all N ``bench.tick`` tasks on a fresh queue that has
   no consumer yet.
3. Start ``python -m celery -A benchmarks.bench_app worker -P <pool> -c 2``
   on that queue, in its own session.
4. The first task to complete and the task that brings the counter to N
   store their ``time.monotonic()`` in Redis; throughput is
   ``(N - 1) / (last - first)``, so interpreter start-up and broker
   connection are left out, and the benchmark itself only polls every 50 ms.
5. Stop the worker (SIGTERM to its process group, SIGKILL after a deadline).

Contenders run interleaved (A, B, C, A, B, C, ...) ``--rounds`` times and
the medians are compared.  Run from the repository root::

    python -m benchmarks.throughput --tasks 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import redis

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
APP = "benchmarks.bench_app"

#: The acceptance target: forkguard -c N reaches this share of prefork -c N.
TARGET_RATIO = 0.8
POLL_INTERVAL = 0.05
STOP_DEADLINE = 20.0
#: A run whose counter stands still this long has lost its tasks (or its worker hangs).
STALL_DEADLINE = 60.0


@dataclass(frozen=True)
class Contender:
    name: str
    pool: str
    extra: tuple[str, ...] = ()
    slow: bool = False  # runs --slow-tasks tasks instead of --tasks


CONTENDERS = {
    "forkguard": Contender("forkguard", "forkguard"),
    "prefork": Contender("prefork", "prefork"),
    "prefork-mtpc1": Contender(
        "prefork-mtpc1", "prefork", ("--max-tasks-per-child=1",), slow=True),
    "solo": Contender("solo", "solo"),
}
DEFAULT_CONTENDERS = ("forkguard", "prefork", "prefork-mtpc1")


@dataclass
class RunResult:
    contender: str
    round: int
    tasks: int
    seconds: float
    tasks_per_s: float
    startup_s: float
    executed: int
    master_rss_mib: float
    tree_rss_mib: float
    master_cpu_ms_per_task: Optional[float]
    reaped_children_cpu_ms_per_task: Optional[float]
    master_minflt_per_task: Optional[float]
    child_phases: Optional[dict[str, float]] = None


@dataclass
class Summary:
    contender: str
    runs: int
    median_tasks_per_s: float
    min_tasks_per_s: float
    max_tasks_per_s: float
    ratio_to_prefork: Optional[float]
    ms_per_task_per_slot: float
    master_rss_mib: float
    master_cpu_ms_per_task: Optional[float]
    reaped_children_cpu_ms_per_task: Optional[float]
    master_minflt_per_task: Optional[float]
    child_phases: Optional[dict[str, float]] = None
    rates: list[float] = field(default_factory=list)


# -- worker processes ---------------------------------------------------------------

_live_workers: dict[int, subprocess.Popen[bytes]] = {}


def start_worker(
    contender: Contender, queue: str, concurrency: int, env: dict[str, str], log: Path,
) -> subprocess.Popen[bytes]:
    """Start one worker in its own session, consuming only *queue*."""
    cmd = [
        sys.executable, "-m", "celery", "-A", APP, "worker",
        "-P", contender.pool, "-c", str(concurrency), "-l", "warning",
        "-Q", queue, "-n", f"{queue}@%h",
        # Nothing else to talk to: skip the start-up chatter between workers.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        *contender.extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    _live_workers[proc.pid] = proc
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker's group, SIGKILL it after a deadline, and any stragglers.

    forkguard children put themselves in groups of their own, so the
    descendants are listed first and killed one by one if still alive.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_DEADLINE)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    _live_workers.pop(proc.pid, None)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def stop_all_workers() -> None:
    for proc in list(_live_workers.values()):
        try:
            stop_worker(proc)
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop worker {proc.pid}: {exc}", file=sys.stderr)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- one run -------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def enqueue(queue: str, key: str, total: int, sleep_ms: float) -> None:
    from benchmarks.bench_app import app, tick

    with app.producer_or_acquire() as producer:
        for _ in range(total):
            tick.apply_async((key, total, sleep_ms), queue=queue, producer=producer)


def _minor_faults(pid: int) -> Optional[int]:
    """Minor page faults of *pid* so far (Linux), e.g. copy-on-write copies."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may hold spaces: minflt is the 8th.
    return int(stat.rsplit(")", 1)[1].split()[7])


@dataclass
class Sample:
    done: int
    own_cpu: float
    children_cpu: float
    minflt: Optional[int]


class MasterSampler:
    """The master's CPU, its reaped children's CPU and its page faults over a run."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start: Optional[Sample] = None

    def sample(self, done: int) -> Sample:
        times = self.process.cpu_times()
        return Sample(done, times.user + times.system,
                      times.children_user + times.children_system,
                      _minor_faults(self.process.pid))

    def mark(self, done: int) -> None:
        if self.start is None:
            self.start = self.sample(done)

    def per_task(self, done: int) -> dict[str, Optional[float]]:
        """Per-task costs between the first sample with work done and *done*."""
        empty: dict[str, Optional[float]] = {
            "master_cpu_ms": None, "children_cpu_ms": None, "master_minflt": None,
        }
        if self.start is None or done <= self.start.done:
            return empty
        end, start = self.sample(done), self.start
        tasks = done - start.done
        faults = None
        if end.minflt is not None and start.minflt is not None:
            faults = (end.minflt - start.minflt) / tasks
        return {
            "master_cpu_ms": (end.own_cpu - start.own_cpu) * 1e3 / tasks,
            "children_cpu_ms": (end.children_cpu - start.children_cpu) * 1e3 / tasks,
            "master_minflt": faults,
        }


def child_phases(path: Path) -> Optional[dict[str, float]]:
    """Medians over the children's phase lines (see bench_app's FORKGUARD_BENCH_PHASES)."""
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if {"init", "prerun", "postrun"} <= line["wall_ms"].keys()]
    if not lines:
        return None

    def median(fun: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(fun(line) for line in lines), 3)

    return {
        "children": len(lines),
        "setup_wall_ms": median(lambda x: x["wall_ms"]["init"]),
        "to_task_wall_ms": median(lambda x: x["wall_ms"]["prerun"] - x["wall_ms"]["init"]),
        "task_wall_ms": median(lambda x: x["wall_ms"]["postrun"] - x["wall_ms"]["prerun"]),
        "report_and_hooks_wall_ms": median(
            lambda x: x["wall_ms"]["exit"] - x["wall_ms"]["postrun"]),
        "fork_to_exit_wall_ms": median(lambda x: x["wall_ms"]["exit"]),
        "setup_cpu_ms": median(lambda x: x["cpu_ms"]["init"]),
        "fork_to_exit_cpu_ms": median(lambda x: x["cpu_ms"]["exit"]),
        "setup_minflt": median(lambda x: x["minflt"]["init"]),
        "fork_to_exit_minflt": median(lambda x: x["minflt"]["exit"]),
    }


def run_one(
    contender: Contender, round_no: int, args: argparse.Namespace,
    client: redis.Redis, env: dict[str, str],
) -> RunResult:
    run_id = f"bench-{contender.name}-{uuid.uuid4().hex[:10]}"
    key = f"fgbench:{run_id}"
    tasks = args.slow_tasks if contender.slow else args.tasks
    enqueue(run_id, key, tasks, args.task_ms)
    log = RESULTS / "logs" / f"{run_id}.log"
    phases = RESULTS / "logs" / f"{run_id}.phases.jsonl"
    if args.phases and contender.pool == "forkguard":
        env = {**env, "FORKGUARD_BENCH_PHASES": str(phases)}
    spawned = time.monotonic()
    proc = start_worker(contender, run_id, args.concurrency, env, log)
    try:
        sampler = MasterSampler(proc.pid)
        state: dict[str, Any] = {"count": 0, "moved": time.monotonic()}

        def finished() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{contender.name} worker exited ({proc.returncode}):\n{tail}")
            count, first, last = client.mget(f"{key}:count", f"{key}:first", f"{key}:last")
            now = time.monotonic()
            if int(count or 0) != state["count"]:
                state["moved"] = now
            elif now - state["moved"] > STALL_DEADLINE:
                raise RuntimeError(
                    f"{contender.name}: no task completed for {STALL_DEADLINE:.0f}s at "
                    f"{state['count']}/{tasks} (another benchmark run flushed DB "
                    f"{args.broker_db}? worker log: {log})")
            state.update(count=int(count or 0), first=first, last=last)
            if state["count"]:
                sampler.mark(state["count"])
            return last is not None

        wait_for(finished, args.timeout, f"{tasks} {contender.name} tasks")
        costs = sampler.per_task(state["count"])
        master_rss, tree_rss = _rss_mib(proc.pid)
    finally:
        stop_worker(proc)
    first, last = float(state["first"]), float(state["last"])
    seconds = last - first
    executed = int(client.get(f"{key}:count") or 0)
    return RunResult(
        contender=contender.name, round=round_no, tasks=tasks, seconds=seconds,
        tasks_per_s=(tasks - 1) / seconds if seconds > 0 else float("inf"),
        startup_s=first - spawned, executed=executed,
        master_rss_mib=master_rss, tree_rss_mib=tree_rss,
        master_cpu_ms_per_task=costs["master_cpu_ms"],
        reaped_children_cpu_ms_per_task=costs["children_cpu_ms"],
        master_minflt_per_task=costs["master_minflt"],
        child_phases=child_phases(phases),
    )


def _rss_mib(pid: int) -> tuple[float, float]:
    master = psutil.Process(pid)
    own = master.memory_info().rss
    tree = own
    for child in master.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            tree += child.memory_info().rss
    return own / 2**20, tree / 2**20


# -- report --------------------------------------------------------------------------


def summarise(results: list[RunResult], concurrency: int) -> list[Summary]:
    by_name: dict[str, list[RunResult]] = {}
    for result in results:
        by_name.setdefault(result.contender, []).append(result)
    medians = {name: statistics.median(r.tasks_per_s for r in runs)
               for name, runs in by_name.items()}
    base = medians.get("prefork")
    summaries = []
    for name, runs in by_name.items():
        rates = [r.tasks_per_s for r in runs]
        summaries.append(Summary(
            contender=name, runs=len(runs), median_tasks_per_s=medians[name],
            min_tasks_per_s=min(rates), max_tasks_per_s=max(rates),
            ratio_to_prefork=medians[name] / base if base else None,
            ms_per_task_per_slot=1e3 * concurrency / medians[name],
            master_rss_mib=statistics.median(r.master_rss_mib for r in runs),
            master_cpu_ms_per_task=_median_of(r.master_cpu_ms_per_task for r in runs),
            reaped_children_cpu_ms_per_task=_median_of(
                r.reaped_children_cpu_ms_per_task for r in runs),
            master_minflt_per_task=_median_of(r.master_minflt_per_task for r in runs),
            child_phases=_median_phases([r.child_phases for r in runs if r.child_phases]),
            rates=rates,
        ))
    return summaries


def _median_of(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_phases(runs: list[dict[str, float]]) -> Optional[dict[str, float]]:
    if not runs:
        return None
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(summaries: list[Summary], args: argparse.Namespace) -> None:
    kind = f"{args.task_ms:g} ms" if args.task_ms else "trivial"
    print(f"\n{args.tasks} {kind} tasks per run ({args.slow_tasks} for prefork-mtpc1), "
          f"-c {args.concurrency}, {args.rounds} interleaved rounds, Redis broker; medians:\n")
    columns = [("contender", 15), ("tasks/s", 9), ("min", 8), ("max", 8), ("x prefork", 10),
               ("ms/task/slot", 13), ("master RSS MiB", 15), ("master CPU ms/task", 19),
               ("master faults/task", 19), ("reaped CPU ms/task", 19)]
    header = "".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}"
                     for i, (name, width) in enumerate(columns))
    print(header)
    print("-" * len(header))
    for s in summaries:
        cells = [_fmt(s.median_tasks_per_s, 1), _fmt(s.min_tasks_per_s, 1),
                 _fmt(s.max_tasks_per_s, 1), _fmt(s.ratio_to_prefork),
                 _fmt(s.ms_per_task_per_slot), _fmt(s.master_rss_mib, 1),
                 _fmt(s.master_cpu_ms_per_task), _fmt(s.master_minflt_per_task, 0),
                 _fmt(s.reaped_children_cpu_ms_per_task)]
        print(f"{s.contender:<15}" + "".join(
            f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns[1:])))
    for s in summaries:
        if s.child_phases:
            print(f"\n{s.contender} child, median over its children (ms from fork):")
            for key, value in s.child_phases.items():
                print(f"  {key:<28}{value:>10.3f}")


def verdict(summaries: list[Summary]) -> Optional[bool]:
    ratio = next((s.ratio_to_prefork for s in summaries if s.contender == "forkguard"), None)
    if ratio is None:
        return None
    ok = ratio >= TARGET_RATIO
    print(f"\nforkguard / prefork = {ratio:.2f} (target >= {TARGET_RATIO}): "
          f"{'MET' if ok else 'NOT MET'}")
    return ok


def write_json(results: list[RunResult], summaries: list[Summary],
               args: argparse.Namespace) -> Path:
    import celery
    import kombu

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / time.strftime("throughput-%Y%m%d-%H%M%S.json")
    payload = {
        "method": "all tasks pre-enqueued; rate = (N-1)/(last - first completion)",
        "tasks": args.tasks, "slow_tasks": args.slow_tasks, "task_ms": args.task_ms,
        "rounds": args.rounds, "concurrency": args.concurrency,
        "target_ratio": TARGET_RATIO,
        "environment": {
            "python": platform.python_version(), "celery": celery.__version__,
            "kombu": kombu.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "summary": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per run (default 2000)")
    parser.add_argument("--slow-tasks", type=int, default=200,
                        help="tasks per run for prefork-mtpc1, a few per second (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--concurrency", "-c", type=int, default=2)
    parser.add_argument("--task-ms", type=float, default=0.0,
                        help="each task sleeps this long first (default 0: trivial tasks)")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                        help=f"comma-separated, from {', '.join(CONTENDERS)}")
    parser.add_argument("--solo", action="store_true", help="add the solo pool")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="Redis server (without database)")
    parser.add_argument("--broker-db", type=int, default=12)
    parser.add_argument("--backend-db", type=int, default=13)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline per run, s")
    parser.add_argument("--phases", action="store_true",
                        help="time each forkguard child's set-up, task and exit")
    parser.add_argument("--fail-below-target", action="store_true",
                        help=f"exit 1 if forkguard/prefork < {TARGET_RATIO}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if args.solo and "solo" not in names:
        names.append("solo")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or min(args.tasks, args.slow_tasks) < 2 or args.rounds < 1:
        parser.error(f"bad arguments: unknown contenders {unknown}" if unknown
                     else "need --tasks/--slow-tasks >= 2 and --rounds >= 1")
    args.names = names
    return args


def configure(args: argparse.Namespace) -> tuple[redis.Redis, dict[str, str]]:
    """Point this process and the workers at the benchmark's databases; flush them."""
    base = args.redis.rstrip("/")
    env = dict(os.environ)
    env.update(
        FORKGUARD_BENCH_BROKER=f"{base}/{args.broker_db}",
        FORKGUARD_BENCH_BACKEND=f"{base}/{args.backend_db}",
        FORKGUARD_BENCH_COUNTER=f"{base}/{args.broker_db}",
        PYTHONUNBUFFERED="1",
    )
    # bench_app reads these at import, and this process enqueues through it.
    os.environ.update({k: env[k] for k in env if k.startswith("FORKGUARD_BENCH_")})
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    client = redis.Redis.from_url(f"{base}/{args.broker_db}")
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis is not answering at {base}: {exc}") from exc
    client.flushdb()
    redis.Redis.from_url(f"{base}/{args.backend_db}").flushdb()
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    return client, env


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    client, env = configure(args)
    # Also when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    results: list[RunResult] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for name in args.names:
                result = run_one(CONTENDERS[name], round_no, args, client, env)
                results.append(result)
                print(f"round {round_no} {name:<15} {result.tasks_per_s:9.1f} tasks/s "
                      f"({result.seconds:.2f}s, start-up {result.startup_s:.2f}s, "
                      f"executed {result.executed})", flush=True)
                if result.executed != result.tasks:
                    print(f"warning: {result.executed} executions for {result.tasks} tasks "
                          "(redelivered or lost tasks)", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: stopping workers", file=sys.stderr)
        return 130
    finally:
        stop_all_workers()
    summaries = summarise(results, args.concurrency)
    print_table(summaries, args)
    ok = verdict(summaries)
    print(f"\nresults: {write_json(results, summaries, args).relative_to(REPO)}")
    return 1 if args.fail_below_target and ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
