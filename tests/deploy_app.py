"""The app that the deploy tests reload: its release comes from ``release.py`` beside it.

The test copies this file into a temporary "release directory" with a
``release.py`` that says ``VERSION = "vN"``, starts ``celery forkguard
starter`` there, and rewrites ``release.py`` before each HUP, as a deploy
would.  Each run of a task leaves one record in Redis (``DEPLOY_LEDGER``):

``<prefix>:runs`` (hash)
    task id -> how many times a child started it;
``<prefix>:done`` (list)
    one JSON record per finished run: id, version, pid, start and end times.

Configured by ``DEPLOY_BROKER``, ``DEPLOY_BACKEND``, ``DEPLOY_LEDGER`` and
``DEPLOY_PREFIX``.
"""

from __future__ import annotations

import json
import os
import time

import redis
import release  # type: ignore[import-not-found]  # the deploy's own module
from celery import Celery

app = Celery("deploy_app", broker=os.environ["DEPLOY_BROKER"],
             backend=os.environ["DEPLOY_BACKEND"])
app.conf.update(
    task_default_queue=os.environ.get("DEPLOY_QUEUE", "deploy"),
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)

_ledger = redis.Redis.from_url(os.environ["DEPLOY_LEDGER"])
PREFIX = os.environ.get("DEPLOY_PREFIX", "deploy")


def _run(task_id: str, seconds: float) -> str:
    started = time.time()
    _ledger.hincrby(f"{PREFIX}:runs", task_id, 1)
    if seconds:
        time.sleep(seconds)
    _ledger.rpush(f"{PREFIX}:done", json.dumps({
        "id": task_id, "version": release.VERSION, "pid": os.getpid(),
        "start": started, "end": time.time(),
    }))
    return str(release.VERSION)


@app.task(name="deploy.early", bind=True)
def early(self, seconds: float = 0.0) -> str:  # type: ignore[no-untyped-def]
    return _run(self.request.id, seconds)


@app.task(name="deploy.late", bind=True, acks_late=True)
def late(self, seconds: float = 0.0) -> str:  # type: ignore[no-untyped-def]
    return _run(self.request.id, seconds)
