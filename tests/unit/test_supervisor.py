"""The supervisor's bookkeeping, driven step by step on a fake clock and a fake forker."""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Callable

import pytest
from billiard.exceptions import Terminated, WorkerLostError

from celery_forkguard import intents, protocol
from celery_forkguard.jobs import exception_info
from celery_forkguard.spawning import EXITED, Event
from celery_forkguard.supervisor import EXIT_GRACE, FORK_RETRY_FIRST, FORK_RETRY_MAX
from tests.unit.fakes import FakeClock, FakeForker, Harness, Kill, Probe

pytestmark = pytest.mark.timeout(10)

MakeHarness = Callable[..., Harness]


@pytest.fixture
def make_harness() -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(limit: int = 2) -> Harness:
        harness = Harness(FakeForker(), FakeClock(), limit)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
        # Celery releases a semaphore slot per on_job_done: twice would over-release.
        twice = [job for job, n in Counter(harness.done).items() if n > 1]
        assert not twice, f"on_job_done called more than once for {twice}"


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    return make_harness(limit=2)


def probes(n: int, **options: float) -> list[Probe]:
    return [Probe(f"task-{i}", **options) for i in range(n)]


OK = (protocol.OUTCOME, (False, "'ok'", 0.01))


# -- slots and the queue ---------------------------------------------------------


def test_never_more_than_limit_children_and_queue_drains_in_fifo_order(harness: Harness) -> None:
    jobs = probes(5)
    harness.submit(*jobs)
    assert harness.running_jobs() == [jobs[0].job, jobs[1].job]
    assert harness.pending_jobs() == [p.job for p in jobs[2:]]

    # Children exit out of order; the queue still drains from its head.
    for finished in (jobs[1], jobs[0], jobs[3], jobs[2], jobs[4]):
        harness.finish(finished, report=OK)
        assert len(harness.supervisor.running()) <= 2

    assert [child.job for child in harness.forker.spawned] == [p.job for p in jobs]
    assert not harness.supervisor.busy()
    assert all(p.successes == [OK[1]] for p in jobs)


def test_accept_callback_gets_the_child_pid_and_the_fake_time(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.clock.now = 1234.5
    harness.submit(probe)
    assert probe.accepted == [(harness.child(probe).pid, 1234.5)]
    assert probe.job.pid == harness.child(probe).pid


def test_a_whole_report_settles_the_task_and_frees_the_slot_before_the_exit(
    make_harness: MakeHarness,
) -> None:
    harness = make_harness(limit=1)
    first, second = probes(2)
    harness.submit(first, second)
    harness.child(first).report(*OK)
    harness.poll()
    # Settled on its report: Celery has the outcome, the next task has the slot.
    assert first.successes == [OK[1]] and harness.done == [first.job]
    assert harness.running_jobs() == [second.job]
    assert harness.supervisor.busy()
    assert harness.supervisor.metrics.child_cpu.count == 0  # its exit is not known yet

    child = harness.child(first)
    child.close_report()
    harness.forker.send(Event(EXITED, child.pid, 0, 0.004, 2048))
    harness.poll()
    assert not harness.supervisor.lingering
    assert harness.supervisor.metrics.child_cpu.count == 1
    assert first.successes == [OK[1]] and harness.done == [first.job]  # nothing twice
    harness.finish(second, report=OK)
    assert not harness.supervisor.busy()


def test_a_report_still_arriving_holds_the_slot(make_harness: MakeHarness) -> None:
    harness = make_harness(limit=1)
    first, second = probes(2)
    harness.submit(first, second)
    data = protocol.encode_report(*OK)
    harness.child(first).write(data[:-1])
    harness.poll()
    assert first.outcomes == 0 and harness.running_jobs() == [first.job]
    harness.child(first).write(data[-1:])
    harness.poll()
    assert first.successes == [OK[1]] and harness.running_jobs() == [second.job]


def test_a_report_read_before_the_start_waits_for_it(make_harness: MakeHarness) -> None:
    harness = make_harness(limit=1)
    harness.forker.auto_start = False
    (probe,) = probes(1)
    harness.submit(probe)
    harness.child(probe).report(*OK)
    harness.poll()
    assert probe.accepted == [] and probe.outcomes == 0  # started before ended, always
    harness.child(probe).start()
    harness.poll()
    assert probe.accepted == [(harness.child(probe).pid, harness.clock())]
    assert probe.successes == [OK[1]]


def test_a_crash_after_the_report_keeps_the_outcome_and_says_so(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.child(probe).report(*OK)
    harness.poll()
    harness.child(probe).exit(-signal.SIGSEGV)
    harness.poll()
    assert probe.successes == [OK[1]] and probe.errors == []
    assert "exited with SIGSEGV after it reported" in caplog.text
    assert not harness.supervisor.busy()


def test_a_child_that_does_not_exit_after_its_report_is_killed_then_forgotten(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    child = harness.child(probe)
    child.report(*OK)
    harness.poll()
    harness.advance(EXIT_GRACE - 0.1)
    assert harness.forker.kills == []
    harness.advance(0.1)
    assert harness.forker.kills == [Kill(child.pid, signal.SIGKILL, True)]
    assert "has not exited" in caplog.text
    assert harness.supervisor.busy()  # a warm shutdown still waits for it
    harness.advance(EXIT_GRACE)
    assert not harness.supervisor.busy()
    assert probe.successes == [OK[1]] and harness.done == [probe.job]


def test_cold_shutdown_kills_children_still_exiting(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    child = harness.child(probe)
    child.report(*OK)
    harness.poll()
    harness.supervisor.kill_lingering()
    assert harness.forker.kills == [Kill(child.pid, signal.SIGKILL, True)]
    child.exit(-signal.SIGKILL)
    harness.poll()
    assert probe.successes == [OK[1]] and not harness.supervisor.busy()


def test_no_signal_reaches_a_child_once_its_task_has_ended(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    child = harness.child(probe)
    child.report(*OK)
    harness.poll()
    harness.supervisor.terminate_job(child.pid, signal.SIGTERM)
    assert harness.supervisor.running() == []
    assert harness.forker.kills == []
    assert probe.successes == [OK[1]]


# -- reports -------------------------------------------------------------------


def test_outcome_report_calls_the_callback_with_it(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.finish(probe, 0, report=(protocol.OUTCOME, (False, "42", 0.5)))
    assert probe.successes == [(False, "42", 0.5)]
    assert probe.errors == []
    assert harness.supervisor.counts["reported"] == 1


def test_report_split_across_several_reads_is_reassembled(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    data = protocol.encode_report(protocol.OUTCOME, (False, "x" * 1000, 0.1))
    child = harness.child(probe)
    for start in range(0, len(data), 100):
        child.write(data[start:start + 100])
        harness.poll()
    harness.finish(probe, 0)
    assert probe.successes == [(False, "x" * 1000, 0.1)]


def test_report_larger_than_a_pipe_buffer_is_drained_while_the_child_writes(
    harness: Harness,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    big = "y" * (1 << 20)  # far beyond the 64 KiB a pipe holds
    data = memoryview(protocol.encode_report(protocol.OUTCOME, (False, big, 0.1)))
    child = harness.child(probe)
    assert child.report_w is not None
    os.set_blocking(child.report_w, False)
    while data:
        try:
            data = data[os.write(child.report_w, data):]
        except BlockingIOError:
            harness.poll()  # the master must read for the child to go on
    harness.finish(probe, 0)
    assert probe.successes == [(False, big, 0.1)]


def test_error_report_calls_the_error_callback_with_the_childs_exception(
    harness: Harness,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.finish(probe, 0, report=(protocol.ERROR, exception_info(KeyError("no such task"))))
    error = probe.error()
    assert isinstance(error, KeyError)
    assert error.args == ("no such task",)


@pytest.mark.parametrize(
    ("code", "status"),
    [(-signal.SIGKILL, "signal 9 (SIGKILL)"), (3, "exitcode 3"), (-signal.SIGSEGV, "signal 11")],
)
def test_child_that_dies_without_a_report_is_a_worker_lost_error(
    harness: Harness, code: int, status: str,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.finish(probe, code)
    error = probe.error()
    assert type(error) is WorkerLostError
    assert status in str(error)
    assert str(error).startswith("Worker exited prematurely: ")
    assert str(error).endswith("Job: task-0.")
    assert harness.supervisor.counts["lost"] == 1


def test_sigkill_message_is_exactly_the_one_prefork_gives(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.finish(probe, -signal.SIGKILL)
    assert str(probe.error()) == "Worker exited prematurely: signal 9 (SIGKILL) Job: task-0."


def test_truncated_report_counts_as_no_report(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    data = protocol.encode_report(*OK)
    harness.child(probe).write(data[: len(data) // 2])
    harness.finish(probe, 0)
    assert str(probe.error()) == (
        "Worker exited prematurely: exitcode 0; the task's process exited without "
        "reporting an outcome: did the task call os.exec*() or os._exit()? Job: task-0."
    )


# -- time limits ---------------------------------------------------------------


def test_soft_limit_fires_at_its_time_and_sends_sigusr1(harness: Harness) -> None:
    (probe,) = probes(1, soft_timeout=5.0, timeout=10.0)
    harness.submit(probe)
    pid = harness.child(probe).pid

    harness.advance(4.99)
    assert probe.timeouts == [] and harness.forker.kills == []

    harness.advance(0.01)
    assert probe.timeouts == [(True, 5.0)]
    assert harness.forker.kills == [Kill(pid, signal.SIGUSR1, False)]

    # The task handled SoftTimeLimitExceeded and reported: that is its outcome.
    harness.finish(probe, 0, report=OK)
    assert probe.successes == [OK[1]]
    harness.advance(100)
    assert probe.timeouts == [(True, 5.0)]
    assert harness.supervisor.next_timeout() is None


def test_hard_limit_kills_the_group_and_the_exit_adds_no_second_outcome(
    harness: Harness,
) -> None:
    first, queued = probes(2, soft_timeout=5.0, timeout=10.0)
    harness.supervisor.resize(1)
    harness.submit(first, queued)
    pid = harness.child(first).pid

    harness.advance(5.0)
    harness.advance(4.9)
    assert first.timeouts == [(True, 5.0)]

    harness.advance(0.1)
    assert first.timeouts == [(True, 5.0), (False, 10.0)]
    assert harness.forker.kills == [
        Kill(pid, signal.SIGUSR1, False), Kill(pid, signal.SIGKILL, True),
    ]
    assert harness.supervisor.counts["timed_out"] == 1
    # SIGKILL is sent, not yet delivered: the slot is freed by the exit only.
    assert harness.running_jobs() == [first.job]
    assert harness.done == []

    harness.finish(first, -signal.SIGKILL)
    assert first.outcomes == 0  # Celery records TimeLimitExceeded from timeout_callback
    assert harness.done == [first.job]
    assert harness.running_jobs() == [queued.job]


def test_limits_of_a_job_that_ends_in_time_never_fire(harness: Harness) -> None:
    (probe,) = probes(1, soft_timeout=5.0, timeout=10.0)
    harness.submit(probe)
    harness.advance(1.0)
    harness.finish(probe, 0, report=OK)
    harness.advance(60.0)
    assert probe.timeouts == []
    assert harness.forker.kills == []


def test_each_child_has_its_own_deadlines(harness: Harness) -> None:
    early, late = probes(2, timeout=10.0)
    harness.submit(early)
    harness.advance(4.0)
    harness.submit(late)
    harness.advance(6.0)
    assert early.timeouts == [(False, 10.0)] and late.timeouts == []
    harness.advance(4.0)
    assert late.timeouts == [(False, 10.0)]


# -- revoke, terminate, cancel -------------------------------------------------


def test_terminate_job_sends_sigterm_and_records_terminated(harness: Harness) -> None:
    target, bystander = probes(2)
    harness.submit(target, bystander)
    pid = harness.child(target).pid

    harness.supervisor.terminate_job(pid, signal.SIGTERM)
    assert harness.forker.kills == [Kill(pid, signal.SIGTERM, False)]
    # The child's SIGTERM handler reads this to die like a revoked prefork child.
    assert intents.shared().get(pid) == intents.REVOKE

    harness.finish(target, -signal.SIGTERM)
    error = target.error()
    assert isinstance(error, Terminated)
    assert error.args == (-signal.SIGTERM,)
    assert intents.shared().get(pid) == intents.NONE
    assert bystander.outcomes == 0 and harness.running_jobs() == [bystander.job]


def test_terminate_job_with_sigkill_kills_the_group(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    pid = harness.child(probe).pid
    harness.supervisor.terminate_job(pid, signal.SIGKILL)
    assert harness.forker.kills == [Kill(pid, signal.SIGKILL, True)]
    harness.finish(probe, -signal.SIGKILL)
    assert isinstance(probe.error(), Terminated)


def test_revoke_signals_once_though_celery_asks_twice(harness: Harness) -> None:
    # Request.terminate calls pool.terminate_job(pid) and then job.terminate(sig).
    (probe,) = probes(1)
    harness.submit(probe)
    pid = harness.child(probe).pid
    harness.supervisor.terminate_job(pid, signal.SIGTERM)
    probe.job.terminate(signal.SIGTERM)
    assert harness.forker.kills == [Kill(pid, signal.SIGTERM, False)]


def test_terminated_child_that_still_reports_keeps_its_report(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.supervisor.terminate_job(harness.child(probe).pid, signal.SIGTERM)
    harness.finish(probe, 0, report=OK)
    assert probe.successes == [OK[1]]


def test_terminate_job_of_an_unknown_pid_does_nothing(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    harness.supervisor.terminate_job(12345, signal.SIGTERM)
    assert harness.forker.kills == []


def test_cancel_of_a_pending_job_terminates_it_without_forking(
    make_harness: MakeHarness,
) -> None:
    harness = make_harness(limit=1)
    running, waiting, after = probes(3)
    harness.submit(running, waiting, after)
    assert harness.forker.spawn_attempts == 1

    waiting.job.terminate(signal.SIGTERM)  # what Celery's revoke does
    error = waiting.error()
    assert isinstance(error, Terminated) and error.args == (-signal.SIGTERM,)
    assert harness.done == [waiting.job]
    assert harness.forker.spawn_attempts == 1
    assert harness.forker.kills == []

    harness.finish(running, 0, report=OK)
    assert [c.job for c in harness.forker.spawned] == [running.job, after.job]


def test_job_terminate_of_a_running_job_signals_its_child(harness: Harness) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    probe.job.terminate(signal.SIGTERM)
    assert harness.forker.kills == [Kill(harness.child(probe).pid, signal.SIGTERM, False)]


def test_signal_child_records_the_given_error_when_the_child_dies_silently(
    harness: Harness,
) -> None:
    (probe,) = probes(1)
    harness.submit(probe)
    (child,) = harness.supervisor.running()
    reason = WorkerLostError("cold shutdown")
    assert harness.supervisor.signal_child(child, signal.SIGKILL, reason)
    assert harness.forker.kills == [Kill(child.pid, signal.SIGKILL, True)]
    harness.finish(probe, -signal.SIGKILL)
    assert probe.error() is reason
    assert harness.supervisor.counts["killed"] == 1


# -- resizing ------------------------------------------------------------------


def test_resize_up_forks_queued_jobs_at_once(make_harness: MakeHarness) -> None:
    harness = make_harness(limit=1)
    jobs = probes(4)
    harness.submit(*jobs)
    assert len(harness.supervisor.running()) == 1
    harness.supervisor.resize(3)
    assert harness.running_jobs() == [p.job for p in jobs[:3]]
    assert harness.pending_jobs() == [jobs[3].job]


def test_resize_down_never_kills_and_waits_for_children_to_leave(
    make_harness: MakeHarness,
) -> None:
    harness = make_harness(limit=3)
    jobs = probes(4)
    harness.submit(*jobs)
    harness.supervisor.resize(1)
    assert harness.forker.kills == []
    assert len(harness.supervisor.running()) == 3

    harness.finish(jobs[0], 0, report=OK)
    harness.finish(jobs[1], 0, report=OK)
    assert harness.pending_jobs() == [jobs[3].job]  # 1 running is the new limit
    harness.finish(jobs[2], 0, report=OK)
    assert harness.running_jobs() == [jobs[3].job]


def test_resize_below_one_keeps_one_slot(make_harness: MakeHarness) -> None:
    harness = make_harness(limit=2)
    harness.supervisor.resize(0)
    assert harness.supervisor.limit == 1


# -- fork failures -------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOMEM, errno.EPERM])
def test_fork_failure_is_retried_with_growing_back_off_and_never_fails_the_task(
    harness: Harness, code: int,
) -> None:
    harness.forker.fork_errors = [code, code]
    (probe,) = probes(1)
    harness.submit(probe)
    assert harness.forker.spawn_attempts == 1
    assert harness.pending_jobs() == [probe.job]
    assert harness.supervisor.counts["fork_failed"] == 1

    harness.advance(FORK_RETRY_FIRST - 0.01)
    assert harness.forker.spawn_attempts == 1  # still backing off
    harness.advance(0.01)
    assert harness.forker.spawn_attempts == 2
    harness.advance(FORK_RETRY_FIRST * 2 - 0.01)
    assert harness.forker.spawn_attempts == 2  # the second wait is twice as long
    harness.advance(0.01)
    assert harness.forker.spawn_attempts == 3

    assert harness.running_jobs() == [probe.job]
    assert probe.errors == [] and len(probe.accepted) == 1
    harness.finish(probe, 0, report=OK)
    assert probe.successes == [OK[1]]


def test_submissions_during_back_off_wait_their_turn(harness: Harness) -> None:
    harness.forker.fork_errors = [errno.EAGAIN]
    first, second = probes(2)
    harness.submit(first)
    harness.submit(second)
    assert harness.forker.spawn_attempts == 1
    harness.advance(FORK_RETRY_FIRST)
    assert harness.running_jobs() == [first.job, second.job]


def test_a_long_fork_shortage_is_logged_once_then_seldom_and_loses_nothing(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    harness.forker.fork_errors = [errno.EAGAIN] * 40
    jobs = probes(2)
    with caplog.at_level(logging.WARNING):
        harness.submit(*jobs)
        for _ in range(60):  # well over a minute of shortage
            harness.advance(FORK_RETRY_MAX)
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if m.startswith("forkguard: cannot fork")]) == 1
    assert 1 <= len([m for m in lines if "still cannot fork" in m]) <= 10
    assert any("forking works again" in m for m in lines)
    assert [p.errors for p in jobs] == [[], []]
    assert harness.running_jobs() == [p.job for p in jobs]


def test_running_out_of_fds_waits_like_a_fork_shortage(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_pipe2 = os.pipe2
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def pipe2(flags: int) -> tuple[int, int]:
        if failures:
            raise failures.pop()
        return real_pipe2(flags)

    monkeypatch.setattr(os, "pipe2", pipe2)
    (probe,) = probes(1)
    harness.submit(probe)
    assert harness.pending_jobs() == [probe.job] and probe.errors == []
    harness.advance(FORK_RETRY_FIRST)
    assert harness.running_jobs() == [probe.job]


def test_a_job_that_cannot_be_handed_over_is_acked_and_failed_with_a_clear_error(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(token: int, job: object, report_fd: int, slot: int) -> None:
        os.close(report_fd)  # as the real client does when pickling fails
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(harness.forker, "request", refuse)
    bad, good = probes(2)
    harness.submit(bad)
    monkeypatch.undo()
    harness.submit(good)
    assert len(bad.accepted) == 1  # so Celery acks it: it would fail the same way again
    error = bad.error()
    assert type(error).__name__ == "EncodeError"
    assert "could not hand the task to its fork server" in str(error)
    assert harness.done == [bad.job]
    assert harness.running_jobs() == [good.job]


# -- on_job_done ---------------------------------------------------------------


def test_on_job_done_is_called_exactly_once_for_every_kind_of_end(
    make_harness: MakeHarness,
) -> None:
    harness = make_harness(limit=4)
    harness.forker.fork_errors = [errno.EPERM]
    fork_failed, ok, error, lost, timed_out, revoked, cancelled = probes(7, timeout=30.0)
    harness.submit(fork_failed, ok, error, lost, timed_out, revoked, cancelled)
    cancelled.job.terminate(signal.SIGTERM)
    harness.advance(FORK_RETRY_FIRST)  # the failed fork is retried first
    harness.finish(ok, 0, report=OK)
    harness.finish(error, 0, report=(protocol.ERROR, exception_info(ValueError("x"))))
    harness.finish(lost, -signal.SIGKILL)
    harness.advance(30.0)  # only timed_out and revoked are still running
    harness.finish(timed_out, -signal.SIGKILL)
    harness.supervisor.terminate_job(harness.child(revoked).pid, signal.SIGTERM)
    harness.finish(revoked, -signal.SIGTERM)
    harness.advance(60.0)
    harness.finish(fork_failed, 0, report=OK)  # retried, then ran

    everyone = [fork_failed, ok, error, lost, timed_out, revoked, cancelled]
    assert Counter(harness.done) == Counter(p.job for p in everyone)
    assert not harness.supervisor.busy()


# -- callbacks that raise ------------------------------------------------------


def test_raising_callback_is_logged_and_the_supervisor_goes_on(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object) -> None:
        raise ValueError("callback bug")

    harness = make_harness(limit=1)
    bad = Probe("bad", callback=broken)
    good = Probe("good")
    harness.submit(bad, good)
    with caplog.at_level(logging.ERROR):
        harness.finish(bad, 0, report=OK)
    assert "callback bug" in caplog.text
    assert harness.done == [bad.job]
    assert harness.running_jobs() == [good.job]


def test_memory_error_in_a_callback_propagates(make_harness: MakeHarness) -> None:
    def oom(*args: object) -> None:
        raise MemoryError

    harness = make_harness(limit=1)
    probe = Probe("oom", callback=oom)
    harness.submit(probe)
    harness.child(probe).report(*OK)
    harness.child(probe).exit(0)
    with pytest.raises(MemoryError):
        harness.poll()
