"""Run the children's hot path a few times in the worker before the first fork.

CPython 3.11 and later rewrite a function's bytecode in place while it runs
(quickening and specialisation, PEP 659), and count its calls until it is
rewritten.  Celery's tracer, the decoding of a task message and the pickling
of a child's report never run in the worker itself: without this, every
child rewrites the same code objects anew, and every rewrite copies a page
it shares with the worker (a copy-on-write fault, 3-10 µs on a VM).  Run
here once, before the fork server is made, the rewritten code is shared by
the worker, the fork server and every child.

What runs is inert: an internal no-op task, registered only for the warm-up,
traced with no result backend (``DisabledBackend``), the task signals'
receivers left out of its tracer and the tracer's logging off; the report is
encoded and dropped.  A failure only skips the warm-up.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from celery import signals
from celery.app import trace
from celery.app.task import Task
from celery.backends.base import DisabledBackend
from celery.utils.log import get_logger
from kombu.serialization import dumps

from celery_forkguard import protocol
from celery_forkguard.forkserver_client import job_for_child
from celery_forkguard.jobs import Job

logger = get_logger(__name__)

TASK_NAME = "celery_forkguard.warm_up"
#: Enough calls for every function on the path to be quickened and specialised
#: (3.11 quickens a function after 8 calls; more rounds change nothing measurable).
ROUNDS = 16
_TASK_SIGNALS = (signals.task_prerun, signals.task_postrun, signals.task_success)


def warm_up_resolver() -> None:
    """Resolve a numeric address once, so children share the C library's resolver set-up.

    glibc reads its configuration (gai.conf, the interfaces' address
    families, NSS) at a process's first ``getaddrinfo``: about 500 page
    copies in each child whose task opens a connection, unless it was read
    before the fork.  A numeric address sends nothing on the network.
    """
    with contextlib.suppress(OSError):
        socket.getaddrinfo("127.0.0.1", 0, 0, socket.SOCK_STREAM)


def warm_up(app: Any, hostname: str, rounds: int = ROUNDS) -> bool:
    """Trace an internal no-op task *rounds* times as a child would; True if it ran."""
    try:
        task = _warm_up_task(app, hostname)
    except Exception:
        logger.debug("forkguard: warm-up skipped", exc_info=True)
        return False
    try:
        for _ in range(rounds):
            _run_once(app, task, hostname)
    except Exception:
        logger.debug("forkguard: warm-up stopped", exc_info=True)
        return False
    finally:
        app.tasks.pop(TASK_NAME, None)
    return True


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _warm_up_task(app: Any, hostname: str) -> Any:
    # Celery's own Task class, not the app's: a custom base's hooks
    # (before_start, after_return...) are the user's code and must not run here.
    task = app.task(name=TASK_NAME, base=Task, ignore_result=True, acks_late=False,
                    shared=False, lazy=False)(_noop)
    task.backend = DisabledBackend(app)
    with _quiet_tracer():
        task.__trace__ = trace.build_tracer(TASK_NAME, task, app.loader, hostname, app=app)
    return task


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """While a tracer is built: no task signal receivers, no success log line.

    ``build_tracer`` captures the receiver lists and whether INFO is enabled
    when it builds: the warm-up tracer keeps these empty ones.
    """
    saved = [signal.receivers for signal in _TASK_SIGNALS]
    disabled = trace.logger.disabled
    for signal in _TASK_SIGNALS:
        signal.receivers = []
    trace.logger.disabled = True
    try:
        yield
    finally:
        for signal, receivers in zip(_TASK_SIGNALS, saved):
            signal.receivers = receivers
        trace.logger.disabled = disabled


def _run_once(app: Any, task: Any, hostname: str) -> None:
    """What a child does with a job: unpickle it, trace it, encode the report."""
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = app.amqp.as_task_v2(task_id, TASK_NAME, args=(), kwargs={})
    content_type, encoding, data = dumps(body, serializer="json")
    request = dict(headers)
    request.update({
        "properties": properties, "reply_to": properties.get("reply_to"),
        "correlation_id": task_id, "hostname": hostname,
        "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 0,
                          "redelivered": False},
    })
    tracer = trace.fast_trace_task if app.use_fast_trace_task else trace.trace_task_ret
    job = Job(tracer, (TASK_NAME, task_id, request, data, content_type, encoding), {},
              correlation_id=task_id)
    job = pickle.loads(pickle.dumps(job_for_child(job, 1), protocol=pickle.HIGHEST_PROTOCOL))
    outcome = job.target(*job.args, **job.kwargs)
    protocol.decode_report(protocol.encode_report(protocol.OUTCOME, outcome))
