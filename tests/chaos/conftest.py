"""Fixtures of the chaos suite: ``nox -s chaos`` (``python -m pytest tests/chaos``).

Each case runs real ``celery worker -P forkguard`` processes
(``tests/chaos/chaos_app.py``), streams tasks at them, injects one kind of
fault, and prints one figure line (see ``ledger.py``); the terminal summary
repeats every line, so CI output shows them even when all pass.

Fixtures
--------
``open_case(name, broker_url=...)`` (function scope)
    A factory of :class:`~tests.chaos.case.Case`: a queue, an evidence prefix,
    workers and a ledger of its own; all closed at teardown (workers stopped
    by process group, leftovers fail the test, queue and keys deleted).
    Needs the shared Redis (results and evidence always live there).
``private_redis`` (function scope)
    A started :class:`~tests.chaos.brokers.PrivateRedis`, stopped at teardown.
``rabbitmq_url`` (session scope)
    RabbitMQ's URL, once it answers.

A missing service skips its cases with the reason, or fails them when the
environment variable ``CI`` is ``true``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.chaos.brokers import (
    BACKEND_URL,
    RABBITMQ_URL,
    PrivateRedis,
    rabbitmq_problem,
    redis_problem,
)
from tests.chaos.case import FIGURES, Case
from tests.harness import require_service

LOG_TAIL_LINES = 60
#: The cases in the order the docs number them (docs/reliability.md).
CASE_ORDER = (
    "test_kill_storm", "test_worker_restarts", "test_broker_restart", "test_fork_server_stall",
    "test_operator_storms", "test_bad_inputs", "test_soak",
)
_OPEN_CASES: list[Case] = []
_SESSION_BEGAN = time.monotonic()


@pytest.fixture
def open_case(tmp_path: Path) -> Iterator[Callable[..., Case]]:
    problem = redis_problem(BACKEND_URL)
    if problem:
        require_service(problem)
    cases: list[Case] = []

    def make(name: str, **kwargs: str) -> Case:
        case = Case(name, tmp_path, **kwargs)
        cases.append(case)
        _OPEN_CASES.append(case)
        return case

    yield make
    problems = []
    for case in cases:
        try:
            case.close()
        except AssertionError as exc:
            problems.append(str(exc))
        finally:
            _OPEN_CASES.remove(case)
    assert not problems, "; ".join(problems)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        require_service("redis-server is not on PATH (needed for a private Redis)")
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    problem = rabbitmq_problem()
    if problem:
        require_service(problem)
    return RABBITMQ_URL


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the cases in their documented order; other suites' tests keep their places."""
    def case_name(item: pytest.Item) -> str:
        module = getattr(item, "module", None)
        return module.__name__.rsplit(".", 1)[-1] if module is not None else ""

    places = [i for i, item in enumerate(items) if case_name(item) in CASE_ORDER]
    ordered = sorted((items[i] for i in places), key=lambda it: CASE_ORDER.index(case_name(it)))
    for place, item in zip(places, ordered):
        items[place] = item


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed case shows the end of each of its workers' logs."""
    made = yield
    report = made.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for case in list(_OPEN_CASES):
            for worker in case.workers:
                tail = "\n".join(worker.log().splitlines()[-LOG_TAIL_LINES:])
                report.sections.append((f"worker {worker.hostname} (log tail)", tail))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chaos figures")
    for line in FIGURES:
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        f"chaos suite: {len(FIGURES)} figure lines in {time.monotonic() - _SESSION_BEGAN:.1f}s"
    )
