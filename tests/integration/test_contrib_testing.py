"""Celery's own test worker runs the pool: ``celery.contrib.testing`` and its pytest fixtures.

``contrib/celery_fixtures_suite.py`` is a user's test module: the
``celery_worker`` fixture with ``celery_worker_pool`` returning
``"forkguard"`` and nothing importing ``celery_forkguard``.  It runs here as
its own pytest session (Celery's plugin on, a worker thread in that
process, a real Redis), so a hang fails this test at its timeout instead of
hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, require_service

from .conftest import REDIS_BROKER_URL, REDIS_RESULTS_URL, _redis_problem

SUITE = Path(__file__).parent / "contrib" / "celery_fixtures_suite.py"

pytestmark = pytest.mark.redis


@pytest.mark.timeout(180)
def test_celery_worker_fixture_runs_the_pool() -> None:
    problem = _redis_problem()
    if problem:
        require_service(problem)
    env = {
        **os.environ,
        "FORKGUARD_CONTRIB_BROKER": REDIS_BROKER_URL,
        "FORKGUARD_CONTRIB_BACKEND": REDIS_RESULTS_URL,
        "FORKGUARD_CONTRIB_QUEUE": f"fgcontrib-{uuid.uuid4().hex[:10]}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "celery.contrib.pytest", str(SUITE),
         "-p", "no:cacheprovider", "-o", "addopts=", "-q", "--timeout", "60", "-rA",
         "--log-level", "WARNING"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=150,
        start_new_session=True, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "3 passed" in output, output
    assert "Unrecoverable error" not in output, output
