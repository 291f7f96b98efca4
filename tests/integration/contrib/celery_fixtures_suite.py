"""Run by ``test_contrib_testing.py`` as its own pytest session, with Celery's plugin.

Nothing here imports ``celery_forkguard``: ``celery_worker_pool`` names the
pool as a user would, and Celery must find it by that name alone.
"""

from __future__ import annotations

import os
import time
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


def test_reloads_from_the_test_thread_while_tasks_run(celery_app: Any, celery_worker: Any) -> None:
    # reload() runs in this thread while the worker's thread supervises
    # children starting, reporting and exiting: the pool must take the call
    # into its own thread, or both threads change its books at once.
    @celery_app.task(name="contrib.nap")
    def nap(number: int) -> int:
        time.sleep(0.005)
        return number

    celery_worker.reload()
    for round_ in range(10):
        numbers = range(round_ * 20, round_ * 20 + 20)
        results = [nap.delay(number) for number in numbers]
        while not all(result.ready() for result in results):
            celery_worker.reload()
        assert [result.get(timeout=30) for result in results] == list(numbers)
