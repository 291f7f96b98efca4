"""standby.py: the fork server's standby children, over real socket pairs."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from celery_forkguard import standby
from celery_forkguard.standby import Standbys, receive_job

pytestmark = pytest.mark.timeout(30)


class FakeForks:
    """Stands in for fork(): keeps each standby's end of its socket for the test."""

    def __init__(self) -> None:
        self.ends: dict[int, socket.socket] = {}
        self.next_pid = 7000
        self.refuse = False

    def __call__(self, theirs: socket.socket, ours: socket.socket) -> int:
        if self.refuse:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.next_pid += 1
        self.ends[self.next_pid] = socket.socket(fileno=os.dup(theirs.fileno()))
        return self.next_pid

    def close(self) -> None:
        for end in self.ends.values():
            end.close()


@pytest.fixture
def forks() -> Iterator[FakeForks]:
    made = FakeForks()
    yield made
    made.close()


def test_top_up_forks_until_the_target_waits(forks: FakeForks) -> None:
    standbys = Standbys(2, forks)
    standbys.top_up()
    assert [s.pid for s in standbys.waiting] == [7001, 7002]
    standbys.top_up()
    assert len(forks.ends) == 2  # nothing more while two wait


def test_a_refused_fork_is_tried_again_at_the_next_top_up(forks: FakeForks) -> None:
    standbys = Standbys(1, forks)
    forks.refuse = True
    standbys.top_up()
    assert not standbys.waiting
    forks.refuse = False
    standbys.top_up()
    assert [s.pid for s in standbys.waiting] == [7001]


def test_a_job_goes_to_the_oldest_standby_with_its_report_fd(forks: FakeForks) -> None:
    standbys = Standbys(2, forks)
    standbys.top_up()
    read_fd, write_fd = os.pipe()
    payload = b"j" * (standby.HANDOFF_MAX - standby.HANDOFF.size)  # the largest handed over
    try:
        assert standbys.hand_over(payload, write_fd) == 7001
        assert 7001 not in standbys.unannounced  # its exit is the worker's business now
        received = receive_job(forks.ends[7001])
        assert received is not None
        data, fd = received
        assert data == payload
        assert not os.get_inheritable(fd)  # close-on-exec, as the fork server's are
        os.write(fd, b"report")
        assert os.read(read_fd, 10) == b"report"
        os.close(fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert [s.pid for s in standbys.waiting] == [7002]


def test_a_job_too_large_to_wait_in_the_socket_is_forked_for(forks: FakeForks) -> None:
    standbys = Standbys(1, forks)
    standbys.top_up()
    read_fd, write_fd = os.pipe()
    try:
        assert standbys.hand_over(b"j" * standby.HANDOFF_MAX, write_fd) is None
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert [s.pid for s in standbys.waiting] == [7001]  # still waiting for a smaller one


def test_a_standby_that_died_is_skipped_and_none_left_means_fork(forks: FakeForks) -> None:
    standbys = Standbys(2, forks)
    standbys.top_up()
    forks.ends.pop(7001).close()
    forks.ends.pop(7002).close()
    read_fd, write_fd = os.pipe()
    try:
        assert standbys.hand_over(b"job", write_fd) is None
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert not standbys.waiting


def test_only_the_exit_of_a_standby_without_a_task_is_kept_quiet(forks: FakeForks) -> None:
    standbys = Standbys(2, forks)
    standbys.top_up()
    read_fd, write_fd = os.pipe()
    try:
        handed = standbys.hand_over(b"job", write_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert standbys.reaped(7002) is True  # died waiting: forgotten, replaced later
    assert not standbys.waiting
    assert standbys.reaped(handed or 0) is False  # ran a task: the worker hears of it
    assert standbys.reaped(4242) is False


@pytest.mark.parametrize("sent", [b"", standby.HANDOFF.pack(10) + b"short"],
                         ids=["closed", "truncated"])
def test_a_standby_whose_server_closes_gets_no_job(sent: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(sent)
        ours.close()
        assert receive_job(theirs) is None


def test_a_job_without_its_report_fd_is_no_job() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(standby.HANDOFF.pack(3) + b"job")
        assert receive_job(theirs) is None


def test_dismiss_lets_real_standbys_leave_and_reaps_them() -> None:
    # As in the fork server: SIGCHLD wakes the loop through a wake-up pipe.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    old_handler = signal.signal(signal.SIGCHLD, lambda *_: None)
    old_wakeup = signal.set_wakeup_fd(wake_w)

    def fork(theirs: socket.socket, ours: socket.socket) -> int:
        pid = os.fork()
        if pid == 0:  # a standby: wait for a job or the end, then leave
            ours.close()
            os._exit(0 if receive_job(theirs) is None else 1)
        return pid

    standbys = Standbys(3, fork)
    standbys.top_up()
    pids = [s.pid for s in standbys.waiting]
    try:
        started = time.monotonic()
        standbys.dismiss(wake_r, timeout=10.0)
        assert not standbys.unannounced and not standbys.waiting
        assert time.monotonic() - started < 5.0  # woken by their exits, not the timeout
        for pid in pids:  # reaped by dismiss: no zombie is left behind
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGCHLD, old_handler)
        os.close(wake_r)
        os.close(wake_w)
