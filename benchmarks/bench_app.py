"""The Celery app the throughput benchmark starts its workers with.

One trivial task, ``bench.tick``: it opens a fresh TCP connection to Redis,
``INCR``s a per-run counter and closes it.  The connection is opened per
call in every pool on purpose: a client kept at module level would be
reused by prefork's long-lived processes but rebuilt by every forkguard
child, and the benchmark would then compare connection reuse instead of
pools.  The first and the last task of a run also store their clock
(``time.monotonic``, which is system-wide on Linux), so the benchmark times
the run from inside the workers and polls Redis only slowly.

Settings come from the environment so the benchmark can point the workers
at its own Redis databases: ``FORKGUARD_BENCH_BROKER`` (default DB 12),
``FORKGUARD_BENCH_BACKEND`` (default DB 13) and ``FORKGUARD_BENCH_COUNTER``
(where the task counts; default: the broker's database).

``FORKGUARD_BENCH_PHASES=PATH`` makes every forked child append one JSON
line to PATH at its ``worker_process_shutdown``: wall and CPU time and minor
page faults at each step of its life, counted from the fork (meant for
forkguard, whose children run one task each).

``FORKGUARD_BENCH_PROFILE=PATH`` runs cProfile in the worker's main thread
from ``worker_ready`` on and writes ``PATH.<pid>`` at exit; forked children
stop it at once so only the master is measured.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals

DEFAULT_BROKER = "redis://127.0.0.1:6379/12"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/13"

BROKER_URL = os.environ.get("FORKGUARD_BENCH_BROKER", DEFAULT_BROKER)
BACKEND_URL = os.environ.get("FORKGUARD_BENCH_BACKEND", DEFAULT_BACKEND)
COUNTER_URL = os.environ.get("FORKGUARD_BENCH_COUNTER", BROKER_URL)

app = Celery("forkguard_bench", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
)


def counter_address(url: str = COUNTER_URL) -> tuple[str, int, int]:
    """(host, port, db) of the Redis the task counts in."""
    parts = urlsplit(url)
    db = int((parts.path or "/0").lstrip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db


#: Parsed once here, so every pool's task does the same work per call.
COUNTER = counter_address()


def _resp(*words: str) -> bytes:
    """One Redis command in RESP, the protocol's plain wire form."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        buf += chunk
    if buf.startswith(b"-"):
        raise RuntimeError(f"Redis error: {buf.decode(errors='replace').strip()}")
    return buf


def _command(sock: socket.socket, *words: str) -> bytes:
    sock.sendall(_resp(*words))
    return _read_line(sock)


@app.task(name="bench.tick", ignore_result=True)
def tick(key: str, total: int, sleep_ms: float = 0.0) -> None:
    """Count one completion; the first and the last also record the time.

    *sleep_ms* stands for the task's own work (waiting on I/O, say).
    """
    if sleep_ms:
        time.sleep(sleep_ms / 1e3)
    host, port, db = COUNTER
    with socket.create_connection((host, port), timeout=10) as sock:
        if db:
            _command(sock, "SELECT", str(db))
        count = int(_command(sock, "INCR", f"{key}:count")[1:])
        if count == 1:
            _command(sock, "SET", f"{key}:first", repr(time.monotonic()))
        if count == total:
            _command(sock, "SET", f"{key}:last", repr(time.monotonic()))


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
