"""The probe's tasks, found by ``app.autodiscover_tasks()`` in the example's ``proj/celery.py``."""

import os
from typing import Any

from celery import shared_task
from celery.fixups.django import DjangoFixup


@shared_task(name="fgdjango.whoami")
def whoami() -> dict[str, Any]:
    import celery_forkguard

    return {"pid": os.getpid(), "ppid": os.getppid(), "package": celery_forkguard.__file__}


@shared_task(bind=True, name="fgdjango.fixup_state")
def fixup_state(self: Any) -> dict[str, Any]:
    """What Celery's Django fixup decided about this worker's pool, seen from the task.

    Why ``app._fixups``: it is where ``Celery.__init__`` keeps the fixup
    instances alive, and so the very ``DjangoFixup`` whose ``on_worker_init``
    received this worker; its ``worker_fixup`` is the object that closes
    database connections (``_close_database`` asks ``_is_prefork()``) in
    ``worker_process_init`` and around every task -- in this child, which
    inherited it from the master at fork time.  A ``DjangoWorkerFixup`` built
    here would have no worker and always answer False, and a ``worker_ready``
    handler would only see the master.  ``_fixups`` and ``_is_prefork`` are
    private: if a Celery release renames them, this task says so plainly.
    """
    fixups = [fixup for fixup in getattr(self.app, "_fixups", ()) if isinstance(fixup, DjangoFixup)]
    state: dict[str, Any] = {"pid": os.getpid(), "django_fixups": len(fixups)}
    if len(fixups) != 1:
        return state
    worker_fixup = fixups[0]._worker_fixup  # not the property: it would build a new one
    worker = getattr(worker_fixup, "worker", None)
    pool_cls = getattr(worker, "pool_cls", None)
    state.update({
        "worker_fixup": worker_fixup is not None,
        "worker": worker is not None,
        "pool_cls": pool_cls if isinstance(pool_cls, (str, type(None))) else
        f"{pool_cls.__module__}:{pool_cls.__name__}",
        "has_is_prefork": hasattr(worker_fixup, "_is_prefork"),
    })
    if state["has_is_prefork"]:
        state["is_prefork"] = worker_fixup._is_prefork()
    return state
