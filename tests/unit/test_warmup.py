"""warmup.py: the tracer warm-up runs Celery's real path and nothing of the user's."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from celery import Celery, Task, signals
from celery.app import trace

from celery_forkguard import warmup

pytestmark = pytest.mark.timeout(60)


class AuditedTask(Task):
    """An app's own base class whose hooks are the user's code."""

    calls: list[str] = []

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.calls.append("before_start")

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self.calls.append("on_success")

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("after_return")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("warmup-test", broker="memory://", backend="cache+memory://",
                 task_cls=AuditedTask)

    @app.task(name="user.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    app.finalize()
    AuditedTask.calls = []
    yield app
    trace.reset_worker_optimizations(app)


@pytest.fixture
def fired() -> Iterator[list[str]]:
    seen: list[str] = []

    def recorder(name: str) -> Callable[..., None]:
        return lambda **kw: seen.append(name)

    receivers = {
        signal: recorder(name)
        for signal, name in ((signals.task_prerun, "prerun"), (signals.task_postrun, "postrun"),
                             (signals.task_success, "success"))
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    yield seen
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_trace_task", "trace_task_ret"])
def test_warm_up_runs_the_tracer_and_leaves_nothing_behind(
    app: Celery, fired: list[str], caplog: pytest.LogCaptureFixture, fast: bool,
) -> None:
    if fast:
        trace.setup_worker_optimizations(app, "warm@host")
    receivers = [s.receivers for s in (signals.task_prerun, signals.task_postrun,
                                       signals.task_success)]
    with caplog.at_level(logging.DEBUG):
        assert warmup.warm_up(app, "warm@host", rounds=3) is True
    assert warmup.TASK_NAME not in app.tasks
    assert fired == []  # no task signal reached a receiver
    assert AuditedTask.calls == []  # the app's base class hooks never ran
    assert not [r for r in caplog.records if r.name == trace.logger.name]
    # What was swapped out for the warm-up is back, and real tasks trace as before.
    assert [s.receivers for s in (signals.task_prerun, signals.task_postrun,
                                  signals.task_success)] == receivers
    assert trace.logger.disabled is False
    result = app.tasks["user.add"].apply(args=(2, 3))
    assert result.get() == 5
    assert fired == ["prerun", "success", "postrun"]
    assert AuditedTask.calls == ["before_start", "on_success", "after_return"]


def test_warm_up_stores_no_result(app: Celery) -> None:
    stored: list[Any] = []
    app.backend.store_result = lambda *a, **kw: stored.append(a)
    assert warmup.warm_up(app, "warm@host", rounds=2) is True
    assert stored == []


def test_a_failing_warm_up_is_skipped_and_unregistered(
    app: Celery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no message for you")

    monkeypatch.setattr(app.amqp, "as_task_v2", broken)
    assert warmup.warm_up(app, "warm@host") is False
    assert warmup.TASK_NAME not in app.tasks
    assert trace.logger.disabled is False


def test_resolver_warm_up_needs_no_network() -> None:
    warmup.warm_up_resolver()  # a numeric address: never raises, sends nothing
