"""The project's Celery app, configured from Django's settings (``CELERY_*``).

This is Celery's Django set-up, unchanged: the pool comes from
``CELERY_WORKER_POOL`` in ``proj/settings.py``.

Database connections and fork
-----------------------------
Nothing in this project closes connections by hand after a fork, and
nothing needs to.  Under ``-P forkguard`` every task runs in a fresh child
forked from the worker's fork server, itself a copy of the worker made when
the pool starts.  Before the task runs, forkguard points every socket the
child inherited (a PostgreSQL connection's included) at ``/dev/null``, and
then sends ``worker_process_init`` in the child, on which Celery's Django
fixup closes the inherited Django connections (``on_worker_process_init``).
The task opens its own connection on its first query; Celery's fixup closes
it after the task, and the child's exit would anyway.  The worker's own
connection (the one :func:`log_database` opens below) is never touched by a
child: the tests in ``tests/examples`` check that no task's connection is the
worker's and that the worker's connection is still open after the tasks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

logger = logging.getLogger(__name__)


@celeryd_after_setup.connect
def log_database(sender: str, **kwargs: Any) -> None:
    """Say which database this worker uses, before it starts its pool.

    It connects from the worker process and leaves that connection open, as
    any code that queries while the worker starts does (a settings table, a
    feature-flag lookup); each task's child still gets a connection of its own.
    """
    from django.db import DatabaseError

    from counters.db import connection_identity

    try:
        info = connection_identity()
    except DatabaseError as exc:
        logger.error("proj: worker %s cannot reach its database: %s", sender, exc)
        return
    logger.warning(
        "proj: worker %s (pid %d) uses %s database %s; its own connection: %s",
        sender, info["pid"], info["vendor"], info["database"], info["connection"],
    )
