"""The child-to-master report format, and the Job's guarded Celery callbacks."""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from kombu.exceptions import EncodeError

from celery_forkguard import protocol
from celery_forkguard.jobs import Job, exception_info
from tests.unit.fakes import unwrap

pytestmark = pytest.mark.timeout(10)

OUTCOME = (False, "'result'", 0.25)


# -- protocol ------------------------------------------------------------------


def test_outcome_report_round_trips() -> None:
    data = protocol.encode_report(protocol.OUTCOME, OUTCOME)
    assert protocol.decode_report(data) == (protocol.OUTCOME, OUTCOME)


def test_error_report_round_trips_with_exception_and_traceback() -> None:
    data = protocol.encode_report(protocol.ERROR, exception_info(KeyError("tasks.nope")))
    kind, einfo = protocol.decode_report(data) or (None, None)
    assert kind == protocol.ERROR
    assert isinstance(einfo, ExceptionInfo)
    exc = unwrap(einfo)
    assert isinstance(exc, KeyError) and exc.args == ("tasks.nope",)
    assert "KeyError" in einfo.traceback


@pytest.mark.parametrize("payload", [lambda: None, threading.Lock()], ids=["lambda", "lock"])
def test_unpicklable_payload_becomes_an_error_report_with_encode_error(payload: Any) -> None:
    data = protocol.encode_report(protocol.OUTCOME, (False, payload, 0.1))
    report = protocol.decode_report(data)
    assert report is not None
    kind, einfo = report
    assert kind == protocol.ERROR
    exc = unwrap(einfo)
    assert isinstance(exc, EncodeError)
    assert "could not send the task's outcome" in str(exc)


def test_every_truncation_of_a_report_decodes_to_nothing() -> None:
    data = protocol.encode_report(protocol.OUTCOME, OUTCOME)
    for end in range(len(data)):
        assert protocol.decode_report(data[:end]) is None, end


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00garbage\xff",
        pickle.dumps("not a tuple"),
        pickle.dumps(("outcome",)),
        pickle.dumps(("outcome", 1, 2)),
        pickle.dumps(("surprise", 1)),
    ],
    ids=["empty", "garbage", "not-a-tuple", "one-item", "three-items", "unknown-kind"],
)
def test_anything_but_a_whole_report_decodes_to_nothing(data: bytes) -> None:
    assert protocol.decode_report(data) is None


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)


def test_report_that_cannot_be_unpickled_in_the_master_decodes_to_nothing() -> None:
    # Pickles fine, fails in loads (Exception.__reduce__ only keeps args).
    data = protocol.encode_report(protocol.OUTCOME, (True, NeedsTwoArgs("a", "b"), 0.1))
    assert protocol.decode_report(data) is None


# -- jobs ----------------------------------------------------------------------


def make_job(**callbacks: Any) -> Job:
    return Job(print, ("tasks.add", "id-1"), {}, correlation_id="id-1", **callbacks)


def raiser(exc: BaseException) -> Any:
    def callback(*args: Any, **kwargs: Any) -> None:
        raise exc

    return callback


@pytest.mark.parametrize(
    ("callback_name", "end"),
    [
        ("callback", lambda job: job.succeed(OUTCOME)),
        ("error_callback", lambda job: job.fail(RuntimeError("lost"))),
        ("accept_callback", lambda job: job.accepted(123, 1.0)),
        ("timeout_callback", lambda job: job.time_out(soft=False)),
    ],
)
def test_callback_that_raises_is_logged_not_propagated(
    callback_name: str, end: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    job = make_job(**{callback_name: raiser(ValueError("broken callback"))})
    with caplog.at_level(logging.ERROR):
        end(job)
    assert "Pool callback raised exception" in caplog.text
    assert "broken callback" in caplog.text


def test_memory_error_in_a_callback_propagates() -> None:
    job = make_job(callback=raiser(MemoryError()))
    with pytest.raises(MemoryError):
        job.succeed(OUTCOME)


def test_exceptions_listed_in_propagate_propagate() -> None:
    class PoolShouldStop(Exception):
        pass

    job = make_job(error_callback=raiser(PoolShouldStop()))
    job.propagate = (PoolShouldStop,)
    with pytest.raises(PoolShouldStop):
        job.fail(RuntimeError("x"))


def test_a_job_ends_once_whatever_is_reported_after() -> None:
    successes: list[Any] = []
    errors: list[ExceptionInfo] = []
    job = make_job(callback=successes.append, error_callback=errors.append)
    job.succeed(OUTCOME)
    job.succeed(OUTCOME)
    job.fail(RuntimeError("late"))
    job.fail_with(exception_info(RuntimeError("later")))
    assert successes == [OUTCOME] and errors == []
    assert job.ready()


def test_fail_wraps_the_error_in_exception_info_with_a_traceback() -> None:
    errors: list[ExceptionInfo] = []
    job = make_job(error_callback=errors.append)
    job.fail(RuntimeError("boom"))
    (einfo,) = errors
    assert isinstance(unwrap(einfo), RuntimeError)
    assert "RuntimeError: boom" in einfo.traceback


def test_soft_time_out_leaves_the_job_running_and_hard_ends_it() -> None:
    timeouts: list[tuple[bool, float | None]] = []
    errors: list[ExceptionInfo] = []
    job = Job(
        print, ("tasks.slow",), {}, soft_timeout=1.5, timeout=3.0,
        timeout_callback=lambda soft, timeout: timeouts.append((soft, timeout)),
        error_callback=errors.append,
    )
    job.time_out(soft=True)
    assert not job.ready()
    job.time_out(soft=False)
    assert job.ready()
    job.fail(RuntimeError("killed"))  # the SIGKILLed child's exit adds nothing
    assert timeouts == [(True, 1.5), (False, 3.0)]
    assert errors == []


def test_zero_limits_mean_no_limit() -> None:
    job = Job(print, ("tasks.x",), {}, soft_timeout=0, timeout=0)
    assert job.soft_timeout is None and job.timeout is None


def test_terminate_records_the_signal_and_asks_the_owner() -> None:
    asked: list[tuple[Job, int]] = []
    job = make_job()
    job.on_terminate = lambda j, signum: asked.append((j, signum))
    job.terminate(15)
    assert job.cancel_signal == 15
    assert asked == [(job, 15)]


def test_accepted_records_pid_and_times() -> None:
    accepted: list[tuple[int, float]] = []
    job = make_job(accept_callback=lambda pid, now: accepted.append((pid, now)))
    job.accepted(4321, 77.0)
    assert (job.pid, job.started) == (4321, 77.0)
    assert job.started_wall is not None
    assert accepted == [(4321, 77.0)]


def test_task_name_and_id_come_from_celerys_tracer_arguments() -> None:
    job = make_job()
    assert job.task_name == "tasks.add"
    assert job.task_id == "id-1"
    assert "tasks.add[id-1]" in repr(job)
