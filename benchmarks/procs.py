"""Starting, stopping and measuring the workers the suite runs.

Every worker is started in its own session and stopped with SIGTERM to its
process group, SIGKILL after a deadline, then SIGKILL to any descendant
that lives in a group of its own (forkguard's children do); all of them on
an error, on Ctrl-C or on SIGTERM (``stop_all``).

Measures come from ``/proc`` (Linux): each process's own CPU time and minor
page faults, and those of the children it has reaped (``cutime``,
``cstime``, ``cminflt``), which is how the CPU and the faults of
short-lived task processes are counted without racing them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

STOP_DEADLINE = 20.0
POLL_INTERVAL = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FORK_SERVER_TITLE = "celery forkguard: fork server"

#: Every worker started and not stopped yet, with its grace (see ``stop``).
_live: dict[int, tuple[subprocess.Popen[bytes], float]] = {}


# -- processes ----------------------------------------------------------------------------


def start(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path,
          grace: float = STOP_DEADLINE) -> subprocess.Popen[bytes]:
    """Start *cmd* in its own session, its output into *log*; *grace* is for ``stop_all``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    _live[proc.pid] = (proc, grace)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = STOP_DEADLINE) -> None:
    """SIGTERM the worker's group, SIGKILL it after *grace* seconds, and any stragglers.

    forkguard children put themselves in groups of their own, so the
    descendants are listed first and killed one by one if still alive.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_DEADLINE)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    # Anything still in the worker's group (a grandchild that outlived its parent).
    _signal_group(proc.pid, signal.SIGKILL)
    _live.pop(proc.pid, None)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_all() -> None:
    for proc, grace in list(_live.values()):
        try:
            stop(proc, grace)
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop worker {proc.pid}: {exc}", flush=True)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = POLL_INTERVAL) -> None:
    """Poll *predicate* until it holds; TimeoutError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- /proc --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """What ``/proc/PID/stat`` says about one process (times in seconds)."""

    pid: int
    ppid: int
    state: str
    minflt: int
    cminflt: int
    cpu: float  # utime + stime
    children_cpu: float  # cutime + cstime: reaped children, their reaped children...


def read_stat(pid: int) -> Optional[Stat]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The fields after the command name, which may hold spaces and parentheses.
    fields = raw.rsplit(b")", 1)[1].split()
    ticks = [int(x) / CLOCK_TICKS for x in fields[11:15]]
    return Stat(pid=pid, ppid=int(fields[1]), state=fields[0].decode(),
                minflt=int(fields[7]), cminflt=int(fields[8]),
                cpu=ticks[0] + ticks[1], children_cpu=ticks[2] + ticks[3])


def title(pid: int) -> str:
    """The process title (setproctitle rewrites the command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def gone(pid: int) -> bool:
    """Whether *pid* has exited (a zombie counts as exited)."""
    stat = read_stat(pid)
    return stat is None or stat.state in ("Z", "X")


def reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


# -- CPU and faults by role ---------------------------------------------------------------


@dataclass
class Snapshot:
    """The worker's process tree at one moment, with each process's role.

    Roles: ``master`` (the process the suite started), ``helper`` (a
    long-lived process that forks the task processes: forkguard's fork
    server, the workers of ``rq worker-pool``), ``task`` (a long-lived
    process that runs tasks: prefork's pool processes), ``transient`` (a
    process that runs one task and exits: counted once it is reaped,
    through its parent's ``children_cpu``).
    """

    at: float
    stats: dict[int, Stat]
    roles: dict[int, str]
    #: The processes whose reaped children are task processes.
    reapers: tuple[int, ...]


def snapshot(root: int, layout: str) -> Snapshot:
    """Read the tree under *root*; *layout* says how the contender is built:

    ``inline`` (tasks run in the master: solo, threads), ``pool`` (long-lived
    task processes under the master, reaped by it when they exit: prefork),
    ``forkserver`` (forkguard: a fork server under the master forks and
    reaps the task processes), ``fork`` (the master forks and reaps one
    process per task: ``rq worker``, the fork floor), ``pool+fork`` (helpers
    under the master each fork and reap one process per task: ``rq
    worker-pool``).
    """
    stats: dict[int, Stat] = {}
    roles: dict[int, str] = {}
    top = read_stat(root)
    if top is not None:
        stats[root], roles[root] = top, "master"
    for pid in descendants(root):
        stat = read_stat(pid)
        if stat is None:
            continue
        stats[pid] = stat
        if stat.ppid == root:
            if layout == "pool":
                roles[pid] = "task"
            elif layout == "forkserver":
                roles[pid] = "helper" if title(pid).startswith(FORK_SERVER_TITLE) else "other"
            elif layout == "pool+fork":
                roles[pid] = "helper"
            else:
                roles[pid] = "transient"
        else:
            roles[pid] = "transient"
    if layout in ("pool", "fork"):
        reapers: tuple[int, ...] = (root,)
    elif layout in ("forkserver", "pool+fork"):
        reapers = tuple(pid for pid, role in roles.items() if role == "helper")
    else:
        reapers = ()
    return Snapshot(time.monotonic(), stats, roles, reapers)


def in_flight(snap: Snapshot, before: Optional[Snapshot] = None) -> int:
    """Task processes alive (not yet reaped) in *snap*; with *before*, only those
    born since (a long-lived side process, such as RQ's scheduler, is none)."""
    return sum(1 for pid, role in snap.roles.items()
               if role == "transient" and (before is None or pid not in before.stats))


def costs(before: Snapshot, after: Snapshot, tasks: int) -> dict[str, Optional[float]]:
    """CPU ms and minor faults per task, by role, between two snapshots."""
    if tasks <= 0:
        return {}

    def delta(pid: int, field: str) -> float:
        end = getattr(after.stats[pid], field)
        start = getattr(before.stats[pid], field) if pid in before.stats else 0
        return float(end - start)

    def own(role: str, field: str) -> float:
        total = sum(delta(pid, field) for pid, r in after.roles.items() if r == role)
        if role == "helper":
            # Long-lived side processes (RQ's scheduler...) count as helpers.
            total += sum(delta(pid, field) for pid, r in after.roles.items()
                         if r in ("transient", "other") and pid in before.stats)
        return total

    reapers = [pid for pid in after.reapers if pid in after.stats]
    task_cpu = own("task", "cpu") + sum(delta(pid, "children_cpu") for pid in reapers)
    task_faults = own("task", "minflt") + sum(delta(pid, "cminflt") for pid in reapers)
    helpers = any(r == "helper" or (r in ("transient", "other") and pid in before.stats)
                  for pid, r in after.roles.items())
    task_procs = any(r == "task" for r in after.roles.values()) or bool(reapers)
    master_cpu = own("master", "cpu") * 1e3 / tasks
    helper_cpu = own("helper", "cpu") * 1e3 / tasks if helpers else None
    task_cpu_ms = task_cpu * 1e3 / tasks if task_procs else None
    return {
        "master_cpu_ms": master_cpu,
        "helper_cpu_ms": helper_cpu,
        "task_cpu_ms": task_cpu_ms,
        "total_cpu_ms": master_cpu + (helper_cpu or 0.0) + (task_cpu_ms or 0.0),
        "master_minflt": own("master", "minflt") / tasks,
        "helper_minflt": own("helper", "minflt") / tasks if helpers else None,
        "task_minflt": task_faults / tasks if task_procs else None,
    }


# -- memory ----------------------------------------------------------------------------


def tree_memory(root: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over *root* and its descendants."""
    rss = pss = 0
    for pid in (root, *descendants(root)):
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            rss += info.rss
            pss += info.pss
    return rss / 2**20, pss / 2**20


def own_rss(pid: int) -> Optional[float]:
    """RSS in MiB of *pid* alone, or None once it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


class MemorySampler:
    """Samples the tree's summed RSS and PSS every *interval* seconds, in a thread."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = 0.0
        self.peak_pss = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory(self.root)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self._stop.wait(self.interval)


def percentile(values: Iterable[float], q: float) -> float:
    """The *q*-th percentile (0-100), linear between closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)
