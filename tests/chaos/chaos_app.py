"""The Celery app that the chaos suite's workers run.

Workers start with ``celery -A tests.chaos.chaos_app worker -P forkguard``;
what differs between cases comes from the environment:

``FORKGUARD_CHAOS_BROKER``
    broker URL (default: Redis DB 12 on 127.0.0.1:6379).
``FORKGUARD_CHAOS_BACKEND``
    result backend URL, also where tasks leave evidence (default: Redis DB 13).
``FORKGUARD_CHAOS_QUEUE``
    ``task_default_queue``: every case consumes a queue of its own.
``FORKGUARD_CHAOS_PREFIX``
    prefix of the evidence keys, unique per case run (see below).
``FORKGUARD_CHAOS_NOTE_TAGS``
    when set, the worker notes each message's delivery tag as it receives it
    (one more Redis round trip in its loop, so only the cases that need it).

Evidence: as its body starts, every task increments the field ``runs`` of
the hash ``<prefix>:<task id>`` and writes its ``pid`` there, in one round
trip.  ``runs`` above 1 means the task ran twice.

``task_track_started`` is off: a task's states in the backend are only the
terminal ones (or RETRY for Celery's cold-shutdown cancellation), which is
what the suite counts.  Task names are spelled out so the test process sends
exactly what the worker registers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals

from tests.integration.evidence import EVIDENCE_TTL, Evidence

TASK_PREFIX = "tests.chaos.chaos_app"
DEFAULT_BROKER = "redis://127.0.0.1:6379/12"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/13"
#: The longest a held task waits for its gate before it gives up (and says so).
HOLD_LIMIT = 120.0


def task_name(name: str) -> str:
    return f"{TASK_PREFIX}.{name}"


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The Celery settings for the environment *env* (worker and client alike)."""
    return {
        "broker_url": env.get("FORKGUARD_CHAOS_BROKER", DEFAULT_BROKER),
        "result_backend": env.get("FORKGUARD_CHAOS_BACKEND", DEFAULT_BACKEND),
        "task_default_queue": env.get("FORKGUARD_CHAOS_QUEUE", "forkguard-chaos"),
        "task_track_started": False,
        "result_expires": EVIDENCE_TTL,
        "broker_connection_retry_on_startup": True,
        # A broker restart must not make the worker give up.
        "broker_connection_max_retries": 30,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_prefetch_multiplier": 1,
    }


app = Celery("forkguard_chaos", set_as_current=False)
app.conf.update(celery_config(os.environ))


class RunEvidence(Evidence):
    """The integration suite's evidence hashes, plus a one-round-trip start mark."""

    def started(self, task_id: str) -> None:
        key = self.key(task_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, "runs", 1)
        pipe.hset(key, "pid", os.getpid())
        pipe.expire(key, EVIDENCE_TTL)
        pipe.execute()

    def gate_key(self, gate: str) -> str:
        return f"{self.prefix}:gate:{gate}"


evidence = RunEvidence(
    os.environ.get("FORKGUARD_CHAOS_BACKEND", DEFAULT_BACKEND),
    os.environ.get("FORKGUARD_CHAOS_PREFIX", "fgchaos"),
)


def _begin(task: Task) -> None:
    evidence.started(str(task.request.id))


def _note_delivery_tag(request: Any, **_: Any) -> None:
    """In the worker: the delivery tag of each message, for the log's "Couldn't ack 'TAG'".

    The task itself never sees its tag (Celery leaves it out of the request).
    """
    tag = getattr(request.message, "delivery_tag", None)
    if tag is not None:
        evidence.record(str(request.id), delivery_tag=str(tag))


if os.environ.get("FORKGUARD_CHAOS_NOTE_TAGS"):
    signals.task_received.connect(_note_delivery_tag, weak=False)


# -- the stream: short tasks, early ack and late ack --------------------------------------


@app.task(bind=True, name=task_name("work"))
def work(self: Task, seconds: float = 0.0) -> int:
    """Early ack (at most once): acknowledged when its child starts."""
    _begin(self)
    if seconds:
        time.sleep(seconds)
    return os.getpid()


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True, name=task_name("work_late"))
def work_late(self: Task, seconds: float = 0.0) -> int:
    """Late ack (at least once): a child lost mid-task puts the message back."""
    _begin(self)
    if seconds:
        time.sleep(seconds)
    return os.getpid()


@app.task(bind=True, name=task_name("held"))
def held(self: Task, gate: str) -> str:
    """Run until the test opens *gate*: the test, not a sleep, decides when it ends."""
    _begin(self)
    deadline = time.monotonic() + HOLD_LIMIT
    while not evidence.client.exists(evidence.gate_key(gate)):
        if time.monotonic() > deadline:
            return "gate never opened"
        time.sleep(0.02)
    return "released"


# -- bad inputs ----------------------------------------------------------------------------


@app.task(bind=True, name=task_name("unserialisable"))
def unserialisable(self: Task) -> Any:
    """Return what neither JSON nor pickle can carry."""
    _begin(self)
    return threading.Lock()


@app.task(bind=True, name=task_name("exec_program"))
def exec_program(self: Task) -> None:
    """Replace the task's process with /bin/true: it exits 0 and reports nothing."""
    _begin(self)
    os.execv("/bin/true", ["true"])


@app.task(bind=True, name=task_name("close_fds"))
def close_fds(self: Task) -> str:
    """Close every fd but stdio, the report pipe included, and return normally."""
    _begin(self)
    os.closerange(3, 65536)
    return "closed"
