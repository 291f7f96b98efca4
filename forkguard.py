"""``pool="forkguard"`` without importing anything first.

Celery resolves a pool name it has no alias for by importing a module of
that name (``kombu.utils.imports.symbol_by_name``).  The ``celery`` command
learns the alias from our entry point, but code that starts a worker itself
(``app.Worker(pool="forkguard")``, ``celery.contrib.testing.worker.start_worker``,
the ``celery_worker`` pytest fixtures) never loads it: this module is what
that import finds, and it stands for the pool class.
"""

import sys

from celery_forkguard import register_pool
from celery_forkguard.prefork import TaskPool

register_pool()
# importlib returns what sys.modules holds once the module ran: the class.
sys.modules[__name__] = TaskPool  # type: ignore[assignment]
