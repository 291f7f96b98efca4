"""The Celery app that the signal and fleet-control tests' workers run.

Workers start with ``celery -A tests.integration.signals_proj worker -P
forkguard``.  Like ``proj.py``, everything that differs between tests comes
from environment variables:

``FORKGUARD_SIG_BROKER``
    broker URL (default: Redis DB 8).
``FORKGUARD_SIG_BACKEND``
    result backend and evidence URL (default: Redis DB 9).
``FORKGUARD_SIG_QUEUE``
    ``task_default_queue``: each test's workers consume their own queue.
``FORKGUARD_SIG_PREFETCH``
    ``worker_prefetch_multiplier`` (default 1).

Tasks leave evidence in Redis under ``fgsig:<task id>`` (a hash: ``pid``,
``hostname`` of the worker, ``runs``, ...).  Most tasks *hold* until the test opens a gate
(the Redis key ``fgsig:gate:<name>``), so a test decides when a task ends
instead of guessing how long it takes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task

from celery_forkguard.exceptions import TermException
from tests.integration.evidence import EVIDENCE_TTL
from tests.integration.evidence import Evidence as BaseEvidence

TASK_PREFIX = "tests.integration.signals_proj"
DEFAULT_BROKER = "redis://127.0.0.1:6379/8"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/9"
#: How long a held task waits for its gate before it gives up (it then says so).
HOLD_LIMIT = 90.0
GATE_POLL = 0.02
#: Signals the forkguard master handles: no child may run the master's handler.
MASTER_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGCONT", "SIGTTIN", "SIGTTOU", "SIGTERM", "SIGHUP",
                  "SIGQUIT")


def task_name(name: str) -> str:
    """The registered name of the task called *name* in this module."""
    return f"{TASK_PREFIX}.{name}"


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The Celery settings for the environment *env* (worker and client alike)."""
    return {
        "broker_url": env.get("FORKGUARD_SIG_BROKER", DEFAULT_BROKER),
        "result_backend": env.get("FORKGUARD_SIG_BACKEND", DEFAULT_BACKEND),
        "task_default_queue": env.get("FORKGUARD_SIG_QUEUE", "forkguard-sig"),
        "task_track_started": True,
        "result_expires": EVIDENCE_TTL,
        "broker_connection_retry_on_startup": True,
        # Fail fast in tests instead of retrying a dead broker for minutes.
        "broker_connection_max_retries": 3,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_prefetch_multiplier": int(env.get("FORKGUARD_SIG_PREFETCH", "1")),
    }


app = Celery("forkguard_sig", set_as_current=False)
app.conf.update(celery_config(os.environ))


# -- evidence and gates ---------------------------------------------------------------


class Evidence(BaseEvidence):
    """Where tasks (in their children) and tests meet, in Redis: evidence and gates."""

    def open_gate(self, gate: str) -> None:
        self.client.set(f"fgsig:gate:{gate}", "open", ex=EVIDENCE_TTL)

    def gate_open(self, gate: str) -> bool:
        return bool(self.client.exists(f"fgsig:gate:{gate}"))

    def wait_gate(self, gate: str, timeout: float = HOLD_LIMIT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.gate_open(gate):
            if time.monotonic() >= deadline:
                return False
            time.sleep(GATE_POLL)
        return True


evidence = Evidence(os.environ.get("FORKGUARD_SIG_BACKEND", DEFAULT_BACKEND), "fgsig")


def _started(task: Task) -> int:
    """Record who runs the task; return how many times it has started."""
    evidence.record(task.request.id, pid=os.getpid(), hostname=task.request.hostname,
                    started=time.time())
    return evidence.incr(task.request.id, "runs")


def _hold(task: Task, gate: str) -> str:
    _started(task)
    opened = evidence.wait_gate(gate)
    evidence.record(task.request.id, finished=time.time())
    return "released" if opened else "gate never opened"


# -- tasks ------------------------------------------------------------------------------


@app.task(bind=True, name=task_name("tick"))
def tick(self: Task) -> dict[str, Any]:
    """A short task that says which child ran it and what handlers it had."""
    _started(self)
    handlers = {name: _describe(signal.getsignal(getattr(signal, name))) for name in MASTER_SIGNALS}
    return {"pid": os.getpid(), "hostname": self.request.hostname, "handlers": handlers}


def _describe(handler: Any) -> str:
    if callable(handler):
        return f"{handler.__module__}.{handler.__qualname__}"
    return {signal.SIG_DFL: "SIG_DFL", signal.SIG_IGN: "SIG_IGN"}.get(handler, repr(handler))


@app.task(bind=True, name=task_name("hold"))
def hold(self: Task, gate: str) -> str:
    """Run until the test opens *gate*."""
    return _hold(self, gate)


@app.task(bind=True, acks_late=True, name=task_name("hold_late"))
def hold_late(self: Task, gate: str) -> str:
    """``hold``, acknowledged only once it has ended."""
    return _hold(self, gate)


@app.task(bind=True, name=task_name("catch_term"))
def catch_term(self: Task, gate: str) -> str:
    """Clean up on TermException (leave evidence), then let it propagate."""
    try:
        return _hold(self, gate)
    except TermException as exc:
        evidence.record(self.request.id, cleaned_up=str(exc), cleaned_up_pid=os.getpid(),
                        cleaned_up_at=time.time())
        raise


@app.task(bind=True, name=task_name("slow_cleanup"))
def slow_cleanup(self: Task, gate: str, seconds: float) -> str:
    """On TermException, take *seconds* to clean up (leave evidence), then re-raise."""
    try:
        return _hold(self, gate)
    except TermException:
        evidence.record(self.request.id, cleanup_began=time.time())
        time.sleep(seconds)
        evidence.record(self.request.id, cleanup_done=time.time())
        raise


@app.task(bind=True, acks_late=True, name=task_name("ignore_term"))
def ignore_term(self: Task, gate: str) -> str:
    """A task that ignores SIGTERM: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return _hold(self, gate)


@app.task(bind=True, acks_late=True, name=task_name("hold_first_delivery"))
def hold_first_delivery(self: Task, gate: str) -> int:
    """Hold on the first delivery (to be interrupted); return at once on the next."""
    runs = _started(self)
    if runs == 1:
        try:
            evidence.wait_gate(gate)
        except TermException as exc:
            evidence.record(self.request.id, interrupted=f"{type(exc).__name__}: {exc}")
            raise
    return runs


@app.task(bind=True, name=task_name("hog"))
def hog(self: Task, megabytes: int, gate: str) -> str:
    """Touch *megabytes* of memory, then hold: the memory guard should kill it."""
    _started(self)
    # Repeating a non-zero byte writes every page (zeroed memory may stay unmapped).
    ballast = bytearray(b"\x01") * (megabytes * 1024 * 1024)
    evidence.record(self.request.id, allocated=len(ballast))
    evidence.wait_gate(gate)
    return f"kept {len(ballast)} bytes"
