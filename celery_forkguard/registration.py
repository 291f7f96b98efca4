"""Make ``forkguard`` a pool name Celery knows, wherever Celery looks it up.

Celery resolves a pool name through ``celery.concurrency.ALIASES`` (for
``worker_pool`` in the configuration and for ``-P``), but the ``-P`` option's
choices are frozen when ``celery.bin.worker`` is imported.  The ``celery``
command imports that module first and then loads the ``celery.commands``
entry points, one of which is ours: so registering at import time of this
package covers the command line, ``app.conf.worker_pool`` and Django's
``CELERY_WORKER_POOL``.
"""

from __future__ import annotations

import sys

POOL_ALIAS = "forkguard"
POOL_PATH = "celery_forkguard.prefork:TaskPool"


def register_pool() -> None:
    """Add the ``forkguard`` alias to Celery's pool registry and CLI choices."""
    from celery import concurrency

    concurrency.ALIASES.setdefault(POOL_ALIAS, POOL_PATH)
    worker_cli = sys.modules.get("celery.bin.worker")
    if worker_cli is not None:
        _add_cli_choice(worker_cli.WORKERS_POOL)


def _add_cli_choice(choice_type: object) -> None:
    choices = tuple(getattr(choice_type, "choices", ()))
    if POOL_ALIAS not in choices:
        # click.Choice keeps its choices as a plain attribute.
        choice_type.choices = (*choices, POOL_ALIAS)  # type: ignore[attr-defined]
