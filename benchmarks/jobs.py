"""What the benchmark's tasks do, shared by the Celery app and the RQ jobs.

This module imports neither Celery nor RQ, so both run exactly the same
code per task: ``bench_app.py`` wraps each function here in a Celery task,
and RQ enqueues them by name (``benchmarks.jobs.tick``...).  Every function
opens a fresh TCP connection to Redis, says what it has to say in RESP and
closes it.  The connection is opened per call in every pool on purpose: a
client kept at module level would be reused by prefork's long-lived
processes but rebuilt by every forked child, and the benchmark would then
compare connection reuse instead of pools.

The counter lives in ``FORKGUARD_BENCH_COUNTER`` (default: Redis DB 6, the
benchmark's broker database).  Times are ``time.monotonic()``, one clock for
every process on Linux, except the publish-to-start latency, which compares
``time.time()`` with the publisher's ``time.time()``.

``FORKGUARD_BENCH_PRELOAD_MB=N`` makes the import build about N MiB of
Python objects (``PRELOAD``, a list of small dicts), as an app that loads a
big table or model at start would; ``touch`` reads a slice of it.
"""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any
from urllib.parse import urlsplit

DEFAULT_COUNTER = "redis://127.0.0.1:6379/6"
COUNTER_URL = os.environ.get("FORKGUARD_BENCH_COUNTER", DEFAULT_COUNTER)


def counter_address(url: str = COUNTER_URL) -> tuple[str, int, int]:
    """(host, port, db) of the Redis the tasks count in."""
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


def command(sock: socket.socket, *words: str) -> bytes:
    """Send one command whose reply is one line (+OK, :42, -ERR...)."""
    sock.sendall(_resp(*words))
    return _read_line(sock)


def connect() -> socket.socket:
    """A fresh connection to the counter's database."""
    host, port, db = COUNTER
    sock = socket.create_connection((host, port), timeout=10)
    if db:
        command(sock, "SELECT", str(db))
    return sock


# -- the tasks ------------------------------------------------------------------------


def tick(key: str, total: int, sleep_ms: float = 0.0) -> None:
    """Count one completion; the first and the last also record the time.

    The first to complete stores when it completed (``first``) and when it
    started (``first_start``: the benchmark's start-up figure ends there).
    *sleep_ms* stands for the task's own work (waiting on I/O, say).
    """
    started = time.monotonic()
    if sleep_ms:
        time.sleep(sleep_ms / 1e3)
    with connect() as sock:
        count = int(command(sock, "INCR", f"{key}:count")[1:])
        if count == 1:
            command(sock, "MSET", f"{key}:first", repr(time.monotonic()),
                    f"{key}:first_start", repr(started))
        if count == total:
            command(sock, "SET", f"{key}:last", repr(time.monotonic()))


def stamp(key: str, published: float) -> None:
    """Publish-to-start latency: seconds from *published* (the publisher's
    ``time.time()``) to this call, pushed onto ``KEY:lat``."""
    started = time.time()
    with connect() as sock:
        command(sock, "RPUSH", f"{key}:lat", repr(started - published))


def hold(key: str, seconds: float) -> None:
    """Push this process's pid onto ``KEY:pids``, then sleep (to be killed)."""
    with connect() as sock:
        command(sock, "RPUSH", f"{key}:pids", str(os.getpid()))
    time.sleep(seconds)


#: What ``leak`` keeps: it lives as long as the process that ran the task.
LEAKED: list[bytes] = []


def leak(key: str, total: int, mb: float = 2.0) -> None:
    """Keep *mb* MiB in a module-level list (a leak), then count."""
    LEAKED.append(b"\xa5" * int(mb * 2**20))  # written, so resident
    tick(key, total)


#: Built at import when FORKGUARD_BENCH_PRELOAD_MB is set (see _preload).
PRELOAD: list[dict[str, Any]] = []


def touch(key: str, total: int, share: float = 0.01) -> None:
    """Read a random contiguous *share* of ``PRELOAD`` (as a task consults a
    table loaded at start: reading takes references, which write to the
    objects' pages), then count."""
    if PRELOAD:
        n = max(1, int(len(PRELOAD) * share))
        start = random.randrange(0, max(1, len(PRELOAD) - n))
        acc = 0
        for item in PRELOAD[start:start + n]:
            acc += item["id"]
    tick(key, total)


# -- the preloaded heap -----------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _preload(megabytes: float) -> None:
    """Grow ``PRELOAD`` until this process's RSS has grown by *megabytes* MiB."""
    target = megabytes * 2**20
    base = _rss_bytes()
    i = 0
    while _rss_bytes() - base < target:
        PRELOAD.extend(
            {"id": n, "name": f"item-{n:09d}", "tags": [n % 7, n % 11]}
            for n in range(i, i + 20_000)
        )
        i += 20_000


if os.environ.get("FORKGUARD_BENCH_PRELOAD_MB"):
    _preload(float(os.environ["FORKGUARD_BENCH_PRELOAD_MB"]))
