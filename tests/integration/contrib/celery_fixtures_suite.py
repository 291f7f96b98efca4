"""Run by ``test_contrib_testing.py`` as its own pytest session, with Celery's plugin.

Nothing here imports ``celery_forkguard``: ``celery_worker_pool`` names the
pool as a user would, and Celery must find it by that name alone.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

BROKER = os.environ["FORKGUARD_CONTRIB_BROKER"]
BACKEND = os.environ["FORKGUARD_CONTRIB_BACKEND"]
QUEUE = os.environ["FORKGUARD_CONTRIB_QUEUE"]


@pytest.fixture(scope="session")
def celery_config() -> dict[str, Any]:
    return {"broker_url": BROKER, "result_backend": BACKEND, "task_default_queue": QUEUE}


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "forkguard"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"queues": (QUEUE,), "concurrency": 2}


def test_a_task_runs_in_a_fresh_fork(celery_app: Any, celery_worker: Any) -> None:
    @celery_app.task(name="contrib.whoami")
    def whoami() -> int:
        return os.getpid()

    # As Celery's docs say for tasks defined after the worker started: the
    # pool then forks from a fresh copy that knows the task.
    celery_worker.reload()
    pids = {whoami.delay().get(timeout=30) for _ in range(3)}
    assert os.getpid() not in pids
    assert len(pids) == 3  # a new child each time


def test_a_failure_comes_back(celery_app: Any, celery_worker: Any) -> None:
    @celery_app.task(name="contrib.boom")
    def boom() -> None:
        raise ValueError("boom")

    celery_worker.reload()
    with pytest.raises(ValueError, match="boom"):
        boom.delay().get(timeout=30)
