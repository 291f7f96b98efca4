"""ORM tasks.  Each one runs in a fresh fork of the worker (``CELERY_WORKER_POOL``).

Nothing here is specific to forkguard: a child starts without a database
connection (Celery's Django fixup closed what it inherited, on
``worker_process_init``), Django opens one on the first query, and it is
closed after the task (``task_postrun``) or, at the latest, when the child
exits.
"""

from __future__ import annotations

import os
from typing import Any

from celery import shared_task
from django.db import connection
from django.db.models import F
from django.utils import timezone

from counters.db import connection_identity
from counters.models import Counter


@shared_task
def create_counter(name: str) -> dict[str, Any]:
    """Create the counter *name* (at 0) unless it exists; return it."""
    counter, _ = Counter.objects.get_or_create(
        name=name, defaults={"last_pid": os.getpid(), "updated_at": timezone.now()},
    )
    return counter.as_dict()


@shared_task
def increment(name: str, by: int = 1) -> int:
    """Add *by* to the counter in one ``UPDATE ... SET value = value + by``; return the value.

    The addition happens in the database, so increments from concurrent
    forks (each on its own connection) are never lost.
    """
    changed = Counter.objects.filter(name=name).update(
        value=F("value") + by, last_pid=os.getpid(), updated_at=timezone.now(),
    )
    if not changed:
        raise Counter.DoesNotExist(f"no counter named {name!r}")
    return Counter.objects.values_list("value", flat=True).get(name=name)


@shared_task
def read_counters(prefix: str = "") -> list[dict[str, Any]]:
    """Every counter whose name starts with *prefix*, by name."""
    return [counter.as_dict() for counter in Counter.objects.filter(name__startswith=prefix)]


@shared_task
def connection_info() -> dict[str, Any]:
    """Which process ran this task and which database connection it used.

    ``connected_at_start`` says whether the task found a connection already
    open in its process (one inherited from the worker would show here).
    """
    connected_at_start = connection.connection is not None
    info = connection_identity()
    info["connected_at_start"] = connected_at_start
    return info
