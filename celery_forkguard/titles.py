"""Process titles that say what a process runs, as Resque's do."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional

_setproctitle: Optional[Callable[[str], None]]
try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - setproctitle is a dependency
    _setproctitle = None

if TYPE_CHECKING:
    from celery_forkguard.jobs import Job


def child_title(hostname: str, job: Job, now: float | None = None) -> str:
    """``celery forkguard: processing NAME[ID] since TIME (HOST)``."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now or time.time()))
    return f"celery forkguard: processing {job.task_name}[{job.task_id}] since {since} ({hostname})"


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle(title)


def set_child_title(hostname: str, job: Job) -> None:
    set_title(child_title(hostname, job))


def get_title() -> str:
    try:
        from setproctitle import getproctitle
    except ImportError:  # pragma: no cover
        return ""
    return str(getproctitle())
