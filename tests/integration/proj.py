"""The Celery app and tasks that the integration tests' workers run.

Workers start with ``celery -A tests.integration.proj worker -P forkguard``;
everything that differs between tests comes from environment variables, so
one module serves every broker and every test:

``FORKGUARD_IT_BROKER``
    broker URL (default: Redis DB 10).
``FORKGUARD_IT_BACKEND``
    result backend URL (default: Redis DB 11).
``FORKGUARD_IT_EVIDENCE``
    Redis URL where tasks and signal handlers leave evidence (default: the
    result backend's Redis, DB 11).  Keys are ``fgit:<task id>`` (a hash)
    and ``fgit:<task id>:events`` (a list), so they never clash.
``FORKGUARD_IT_QUEUE``
    ``task_default_queue``: each worker consumes its own uuid-named queue.
``FORKGUARD_IT_FS_DIR``
    data folder of the filesystem transport, when that is the broker; its URL
    is then ``forkguard-it-filesystem://`` (see :class:`AtomicFilesystemTransport`).

Task names are spelled out (``tests.integration.proj.<name>``) so that the
test process, which may import this module under another package name,
sends exactly the names the worker registers.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import stat
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

from tests.integration.evidence import EVIDENCE_TTL, Evidence

TASK_PREFIX = "tests.integration.proj"
DEFAULT_BROKER = "redis://127.0.0.1:6379/10"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/11"


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, with message files that appear whole.

    kombu creates a message file under its final name and writes it
    afterwards; a reader polling the folder (it moves files away without
    taking the writer's lock) can take the file while it is still empty, and
    a worker that does so dies of "Unrecoverable error: JSONDecodeError".
    Writing under a name no queue matches, then renaming, closes that window.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # Same name scheme as kombu: readers sort on it and match the queue suffix.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, f"staging-{uuid.uuid4().hex}")
        try:
            with open(staging, "wb") as f:
                f.write(dumps(payload).encode())
            os.rename(staging, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel


FILESYSTEM_SCHEME = "forkguard-it-filesystem"
# kombu calls a callable alias to get the transport class.
TRANSPORT_ALIASES[FILESYSTEM_SCHEME] = lambda: AtomicFilesystemTransport


def task_name(name: str) -> str:
    """The registered name of the task called *name* in this module."""
    return f"{TASK_PREFIX}.{name}"


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The Celery settings for the environment *env* (worker and client alike)."""
    backend = env.get("FORKGUARD_IT_BACKEND", DEFAULT_BACKEND)
    config: dict[str, Any] = {
        "broker_url": env.get("FORKGUARD_IT_BROKER", DEFAULT_BROKER),
        "result_backend": backend,
        "task_default_queue": env.get("FORKGUARD_IT_QUEUE", "forkguard-it"),
        "task_track_started": True,
        "result_expires": EVIDENCE_TTL,
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        # Fail fast in tests instead of retrying a dead broker for minutes.
        "broker_connection_max_retries": 3,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_prefetch_multiplier": 1,
    }
    fs_dir = env.get("FORKGUARD_IT_FS_DIR")
    if fs_dir:
        config["broker_transport_options"] = {
            "data_folder_in": fs_dir,
            "data_folder_out": fs_dir,
            "control_folder": os.path.join(fs_dir, "control"),
            "store_processed": False,
            # The transport polls its folder; the default second is slow for tests.
            "polling_interval": 0.1,
        }
    return config


app = Celery("forkguard_it", set_as_current=False)
app.conf.update(celery_config(os.environ))


# -- evidence -------------------------------------------------------------------


evidence = Evidence(
    os.environ.get("FORKGUARD_IT_EVIDENCE")
    or os.environ.get("FORKGUARD_IT_BACKEND", DEFAULT_BACKEND),
    "fgit",
)

#: Data an app loads at import and only reads (FORKGUARD_IT_PRELOAD_MB of it): what
#: the worker collapses into huge pages before the first fork (hugepages.py).
PRELOAD = b"\x01" * (int(os.environ.get("FORKGUARD_IT_PRELOAD_MB", "0")) << 20)

#: Module state a task mutates: a fresh fork must always see it pristine.
STATE: dict[str, int] = {"calls": 0}
#: Set by worker_process_init to the pid of the process it ran in.
INIT_PID = 0
#: Set by the linger task: (task id, seconds) for the child's shutdown handler.
LINGER: tuple[str, float] | None = None


# -- signal handlers (they run where Celery runs them: mostly in the child) ----------


@signals.worker_process_init.connect
def _remember_init(**_: Any) -> None:
    global INIT_PID
    INIT_PID = os.getpid()


@signals.worker_process_shutdown.connect
def _linger_at_exit(**_: Any) -> None:
    """After a linger task: stay in the child's shutdown handler a while, saying so."""
    if LINGER is not None:
        task_id, seconds = LINGER
        evidence.record(task_id, shutdown_started=time.time())
        time.sleep(seconds)
        evidence.record(task_id, shutdown_finished=time.time())


@signals.task_success.connect
def _on_success(sender: Task | None = None, **_: Any) -> None:
    if sender is not None and sender.request.id:
        evidence.push(sender.request.id, f"success:{os.getpid()}")


@signals.task_failure.connect
def _on_failure(task_id: str | None = None, exception: BaseException | None = None,
                **_: Any) -> None:
    if task_id:
        evidence.push(task_id, f"failure:{type(exception).__name__}:{os.getpid()}")


@signals.task_retry.connect
def _on_retry(request: Any = None, **_: Any) -> None:
    if request is not None and request.id:
        evidence.push(request.id, f"retry:{os.getpid()}")


# -- tasks -----------------------------------------------------------------------------


@app.task(name=task_name("add"))
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, name=task_name("mutate_state"))
def mutate_state(self: Task) -> dict[str, int]:
    """Bump module state and say what it was before, and who ran it."""
    seen = STATE["calls"]
    STATE["calls"] += 1
    evidence.record(self.request.id, pid=os.getpid(), ppid=os.getppid(), seen=seen)
    return {"pid": os.getpid(), "ppid": os.getppid(), "seen": seen}


@app.task(name=task_name("boom"))
def boom(message: str) -> None:
    raise ValueError(message)


@app.task(bind=True, name=task_name("retry_until"))
def retry_until(self: Task, failures: int, max_retries: int) -> int:
    """Fail the first *failures* attempts through ``self.retry``."""
    attempt = evidence.incr(self.request.id, "attempts")
    if attempt <= failures:
        raise self.retry(exc=RuntimeError(f"attempt {attempt} failed"),
                         countdown=0, max_retries=max_retries)
    return attempt


def _die_once(task: Task) -> int:
    """SIGKILL this child on the first delivery; succeed on the next."""
    delivery = evidence.incr(task.request.id, "deliveries")
    evidence.record(task.request.id, pid=os.getpid())
    if delivery == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return delivery


@app.task(bind=True, name=task_name("die_once_early_ack"))
def die_once_early_ack(self: Task) -> int:
    return _die_once(self)


@app.task(bind=True, acks_late=True, name=task_name("die_once_acks_late"))
def die_once_acks_late(self: Task) -> int:
    return _die_once(self)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True,
          name=task_name("die_once_requeued"))
def die_once_requeued(self: Task) -> int:
    return _die_once(self)


@app.task(bind=True, name=task_name("exit_with"))
def exit_with(self: Task, code: int) -> None:
    evidence.record(self.request.id, pid=os.getpid())
    os._exit(code)


@app.task(bind=True, name=task_name("segfault"))
def segfault(self: Task) -> None:
    evidence.record(self.request.id, pid=os.getpid())
    ctypes.string_at(0)


@app.task(bind=True, name=task_name("sleeper"))
def sleeper(self: Task, seconds: float) -> str:
    """Say where it runs, then sleep: the test acts on it meanwhile."""
    evidence.record(self.request.id, pid=os.getpid(), started=time.time())
    time.sleep(seconds)
    evidence.record(self.request.id, finished=time.time())
    return f"slept {seconds}"


@app.task(bind=True, name=task_name("linger"))
def linger(self: Task, seconds: float) -> int:
    """Return at once; the child then spends *seconds* in worker_process_shutdown."""
    global LINGER
    LINGER = (self.request.id, seconds)
    evidence.record(self.request.id, pid=os.getpid())
    return os.getpid()


def _sleep_through_soft_limits(task: Task, seconds: float) -> str:
    """Sleep *seconds*, ignoring soft limits: only a hard limit stops it."""
    evidence.record(task.request.id, pid=os.getpid())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(max(0.0, deadline - time.monotonic()))
        except SoftTimeLimitExceeded:
            evidence.push(task.request.id, "soft-ignored")
    return "not stopped"


def _catch_soft_limit(task: Task, seconds: float) -> str:
    evidence.record(task.request.id, pid=os.getpid())
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "caught soft limit"
    return "no soft limit"


@app.task(bind=True, time_limit=1, name=task_name("hard_limited"))
def hard_limited(self: Task, seconds: float) -> str:
    return _sleep_through_soft_limits(self, seconds)


@app.task(bind=True, soft_time_limit=1, time_limit=20, name=task_name("soft_limited"))
def soft_limited(self: Task, seconds: float) -> str:
    return _catch_soft_limit(self, seconds)


@app.task(bind=True, name=task_name("ignore_soft"))
def ignore_soft(self: Task, seconds: float) -> str:
    """For the worker-wide limits: only ``--time-limit`` can stop it."""
    return _sleep_through_soft_limits(self, seconds)


@app.task(bind=True, name=task_name("catch_soft"))
def catch_soft(self: Task, seconds: float) -> str:
    """For the worker-wide limits: ``--soft-time-limit`` interrupts it."""
    return _catch_soft_limit(self, seconds)


# -- child hygiene probes ----------------------------------------------------------------


def _describe_fds() -> list[dict[str, Any]]:
    """Every open fd of this process: number, kind and what it points at."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd of the listdir itself, closed by now
        kind = ("socket" if stat.S_ISSOCK(mode) else "pipe" if stat.S_ISFIFO(mode)
                else "file" if stat.S_ISREG(mode) else "chr" if stat.S_ISCHR(mode)
                else "dir" if stat.S_ISDIR(mode) else "other")
        fds.append({"fd": fd, "kind": kind, "target": target})
    return fds


@app.task(bind=True, track_started=False, name=task_name("probe_child"))
def probe_child(self: Task) -> dict[str, Any]:
    """Report the child's set-up, looked at before this task opens anything.

    ``track_started`` is off so the tracer does not connect to the result
    backend before the body runs: every socket seen here is one the child
    did not open itself.
    """
    report = {
        "fds": _describe_fds(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgrp": os.getpgrp(),
        "init_pid": INIT_PID,
        "random": random.random(),
        # An object the app made at import: immortal when the worker made its heap
        # immortal before the first fork (CPython 3.12/3.13), None's count then.
        "app_refcount": sys.getrefcount(app),
        "none_refcount": sys.getrefcount(None),
        "handlers": {
            name: _handler_name(signal.getsignal(getattr(signal, name)))
            for name in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM", "SIGQUIT")
        },
    }
    evidence.record(self.request.id, pid=os.getpid(), init_pid=INIT_PID)
    return report


def _handler_name(handler: Any) -> str:
    if handler is signal.SIG_DFL:
        return "SIG_DFL"
    if handler is signal.SIG_IGN:
        return "SIG_IGN"
    return "callable" if callable(handler) else repr(handler)


# -- reliability probes ------------------------------------------------------------------


def _tally(task: Task, tag: str) -> int:
    """Count this run of the task under *tag*: a value above 1 means it ran twice."""
    key = f"{evidence.prefix}:tally:{tag}"
    runs = int(evidence.client.hincrby(key, task.request.id, 1))
    evidence.client.expire(key, EVIDENCE_TTL)
    return runs


@app.task(bind=True, track_started=False, name=task_name("tally"))
def tally(self: Task, tag: str) -> int:
    return _tally(self, tag)


@app.task(bind=True, acks_late=True, time_limit=3, name=task_name("spawn_nap"))
def spawn_nap(self: Task, tag: str, seconds: float) -> str:
    """Send a long task as its last act, then return (the stall of old held this one)."""
    _tally(self, tag)
    nap = self.app.send_task(task_name("sleeper"), args=(seconds,))
    evidence.record(self.request.id, nap=nap.id)
    return nap.id


@app.task(bind=True, name=task_name("exec_true"))
def exec_true(self: Task) -> None:
    evidence.record(self.request.id, pid=os.getpid())
    os.execv("/bin/true", ["true"])


@app.task(bind=True, name=task_name("close_all_fds"))
def close_all_fds(self: Task) -> str:
    evidence.record(self.request.id, pid=os.getpid())
    os.closerange(3, 65536)
    return "closed"


@app.task(bind=True, name=task_name("exec_fds"))
def exec_fds(self: Task) -> dict[str, dict[str, str]]:
    """The task's own pipes, and the fds a program it execs inherits."""
    import subprocess

    own = {str(f["fd"]): f["target"] for f in _describe_fds() if f["kind"] == "pipe"}
    out = subprocess.run(["ls", "-l", "/proc/self/fd"], capture_output=True, text=True,
                         close_fds=False, check=True)
    inherited = {}
    for line in out.stdout.splitlines():
        if " -> " in line:
            name, target = line.split(" -> ", 1)
            inherited[name.split()[-1]] = target
    return {"own": own, "exec": inherited}


@app.task(bind=True, name=task_name("write_intent"))
def write_intent(self: Task) -> str:
    """Try to mark another child's pid in the shared intents table."""
    from celery_forkguard import intents

    try:
        intents.shared().set(os.getppid(), intents.REVOKE)
    except PermissionError as exc:
        return f"refused: {exc}"
    return "written"


@app.task(bind=True, name=task_name("allocate"))
def allocate(self: Task, mib: int) -> int:
    """Touch *mib* MiB (every page written), as a task that runs out of memory does."""
    evidence.record(self.request.id, pid=os.getpid())
    block = b"\x01" * (mib << 20)
    return len(block)


@app.task(name=task_name("big_result"))
def big_result(size: int) -> str:
    """A result far larger than a pipe holds: the child waits for the worker to read."""
    return "x" * size
