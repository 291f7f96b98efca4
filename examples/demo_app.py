"""The forkguard demo: a Celery app on the embedded filesystem broker, and its driver.

``bash examples/demo.sh`` runs everything; by hand, from this folder::

    export FORKGUARD_DEMO_DIR=$(mktemp -d)
    python -m celery -A demo_app worker -P forkguard -c 2 -l info &
    python demo_app.py $!          # the worker's pid

The broker is Celery's ``filesystem://`` transport and the result backend is
``file://``, both in ``$FORKGUARD_DEMO_DIR``: no server is needed.  Each task
also leaves a note (its pid and its parent's pid) in that folder, so the
driver can show where tasks ran even when they died without a result.

Where a task runs: the worker starts a *fork server* (a copy of itself, made
once the app is loaded) and each task's child is forked from it, so a task's
parent is the fork server and its grandparent the worker.  With
``FORKGUARD_FORK_SERVER=0`` the worker forks the children itself.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from celery import Celery, Task
from celery.result import AsyncResult

DEMO_DIR = Path(os.environ.get("FORKGUARD_DEMO_DIR")
                or Path(tempfile.gettempdir()) / "forkguard-demo")
BROKER_DIR = DEMO_DIR / "broker"
RESULTS_DIR = DEMO_DIR / "results"
NOTES_DIR = DEMO_DIR / "notes"
for folder in (BROKER_DIR / "control", RESULTS_DIR, NOTES_DIR):
    folder.mkdir(parents=True, exist_ok=True)

#: The hard time limit of ``demo.overrun``, in seconds.
TIME_LIMIT = 1
#: How long the driver waits for any one result (the first one includes worker start-up).
RESULT_TIMEOUT = 30.0

app = Celery("demo_app", broker="filesystem://", backend=f"file://{RESULTS_DIR}")
app.conf.update(
    broker_transport_options={
        "data_folder_in": str(BROKER_DIR),
        "data_folder_out": str(BROKER_DIR),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # The transport polls its folder; its default of one second is slow for a demo.
        "polling_interval": 0.1,
    },
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

#: Module state that ``demo.mutate_state`` changes.  Under prefork a pool
#: process keeps it from one task to the next; under forkguard every task
#: starts from the worker's copy, where it is always 0.
STATE = {"counter": 0}


def note_pid(task: Task) -> None:
    """Leave this process's pid, its parent's and its grandparent's for the driver."""
    note = NOTES_DIR / str(task.request.id)
    tmp = note.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {os.getppid()} {parent_of(os.getppid())}")
    tmp.replace(note)


def parent_of(pid: int) -> int:
    """The parent pid of *pid*, from /proc (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


@app.task(bind=True, name="demo.add")
def add(self: Task, x: int, y: int) -> int:
    note_pid(self)
    return x + y


@app.task(bind=True, name="demo.mutate_state")
def mutate_state(self: Task) -> str:
    note_pid(self)
    seen = STATE["counter"]
    STATE["counter"] += 1
    return f"saw counter={seen}, left it at {STATE['counter']}"


@app.task(bind=True, name="demo.crash")
def crash(self: Task) -> None:
    """Die the hard way, as an OOM kill or a segfault would: no result, no cleanup."""
    note_pid(self)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, name="demo.overrun", time_limit=TIME_LIMIT)
def overrun(self: Task, seconds: float) -> str:
    note_pid(self)
    time.sleep(seconds)
    return "finished (the time limit did not fire)"


# -- the driver ---------------------------------------------------------------------


class Row:
    """One task the driver sent, and how it ended."""

    def __init__(self, label: str, result: AsyncResult) -> None:
        self.label = label
        self.result = result
        self.state = "?"
        self.value: Any = None
        self.pid: Optional[int] = None
        self.ppid: Optional[int] = None
        self.gppid: Optional[int] = None

    def wait(self) -> Row:
        self.value = self.result.get(timeout=RESULT_TIMEOUT, interval=0.05, propagate=False)
        self.state = self.result.state
        note = NOTES_DIR / str(self.result.id)
        if note.exists():
            self.pid, self.ppid, self.gppid = (int(n) for n in note.read_text().split())
        return self

    @property
    def outcome(self) -> str:
        if isinstance(self.value, BaseException):
            return f"{type(self.value).__name__}: {self.value}"
        return str(self.value)


def run_tasks() -> list[Row]:
    rows = [Row("add(2, 3)", add.delay(2, 3)).wait()]
    # One after the other, so a pool process that kept state would show it.
    for n in range(1, 4):
        rows.append(Row(f"mutate_state() #{n}", mutate_state.delay()).wait())
    together = [
        Row("crash()  [SIGKILLs itself]", crash.delay()),
        Row(f"overrun(30)  [time_limit={TIME_LIMIT}s]", overrun.delay(30)),
    ]
    rows.extend(row.wait() for row in together)
    return rows


def print_table(rows: list[Row], worker_pid: int) -> None:
    width = max(len(row.label) for row in rows)
    server = fork_server_pid(rows, worker_pid)
    print(f"worker (master) pid {worker_pid}"
          + (f", its fork server pid {server}" if server else "") + "\n")
    print(f"{'task':<{width}}  {'pid':>7}  {'parent':>7}  {'state':<8} outcome")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 7}  {'-' * 8} {'-' * 40}")
    for row in rows:
        print(f"{row.label:<{width}}  {row.pid or '?':>7}  {row.ppid or '?':>7}  "
              f"{row.state:<8} {row.outcome}")
    print()


def fork_server_pid(rows: list[Row], worker_pid: int) -> Optional[int]:
    """The fork server's pid, if every child came from one forked by the worker."""
    parents = {row.ppid for row in rows}
    if len(parents) == 1 and {row.gppid for row in rows} == {worker_pid}:
        return parents.pop()
    return None


def checks(rows: list[Row], worker_pid: int) -> list[tuple[bool, str]]:
    pids = [row.pid for row in rows]
    mutations = [row for row in rows if row.label.startswith("mutate_state")]
    crashed, overran = rows[-2], rows[-1]
    server = fork_server_pid(rows, worker_pid)
    if server is not None:
        forked = (True, f"each was forked by the worker's fork server (pid {server}), "
                        "a copy of the worker made once at start")
    else:
        forked = (all(row.ppid == worker_pid for row in rows),
                  "each of those processes was forked by the worker")
    return [
        (None not in pids and len(set(pids)) == len(rows)
         and not {worker_pid, server} & set(pids),
         f"{len(rows)} tasks ran in {len(set(pids))} different processes, none of them the worker"),
        forked,
        (all(row.state == "SUCCESS" and str(row.value).startswith("saw counter=0")
             for row in mutations),
         "module state did not leak: every mutate_state() saw counter=0"),
        (crashed.state == "FAILURE" and type(crashed.value).__name__ == "WorkerLostError"
         and "signal 9 (SIGKILL)" in str(crashed.value),
         "the SIGKILLed task is FAILURE with WorkerLostError naming the signal"),
        (overran.state == "FAILURE" and type(overran.value).__name__ == "TimeLimitExceeded",
         f"the task over its {TIME_LIMIT}s time limit is FAILURE with TimeLimitExceeded"),
        (_alive(worker_pid), "the worker is still running after all that"),
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print(f"usage: {argv[0]} WORKER_PID  (or run: bash examples/demo.sh)", file=sys.stderr)
        return 2
    worker_pid = int(argv[1])
    try:
        rows = run_tasks()
    except KeyboardInterrupt:
        return 130
    print_table(rows, worker_pid)
    results = checks(rows, worker_pid)
    for ok, text in results:
        print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    print()
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
