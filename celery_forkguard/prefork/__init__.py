"""Home of the forkguard pool class.

The class lives in ``celery_forkguard.prefork.forkguard`` for two readers
of its module name: Celery's Django fixup treats a pool as forking when
"prefork" is in it (and then closes pooled database connections in each
child, as for prefork), and the worker's banner prints the last component,
"forkguard".
"""

from celery_forkguard.prefork.forkguard import TaskPool

__all__ = ["TaskPool"]
