"""celery-forkguard: run every Celery task in a fresh fork of the worker."""

from __future__ import annotations

from celery_forkguard.exceptions import ForkError, TermException
from celery_forkguard.registration import POOL_ALIAS, register_pool

__all__ = ["POOL_ALIAS", "ForkError", "TermException", "__version__"]
__version__ = "0.1.0"

register_pool()
