"""The worker <-> fork server protocol over a real socket pair, without forking.

The client (worker side) must never block: requests the socket does not take
wait in its outbox; the server must cope with requests and fds arriving in
pieces; events are handed over whole, however the bytes were split.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from celery_forkguard import forkserver
from celery_forkguard.child import ChildContext
from celery_forkguard.exceptions import ForkError
from celery_forkguard.forkserver_client import ForkServerClient
from celery_forkguard.jobs import Job
from celery_forkguard.spawning import EXITED, STARTED, Event

pytestmark = pytest.mark.timeout(30)


class RecordingServer(forkserver._Server):
    """The real request parser, with fork() replaced by a note of what was asked."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(ChildContext("test", os.getpid()), sock, child_main=None)
        self.asked: list[tuple[Job, int, bool]] = []
        self.next_pid = 5000

    def fork_child(self, payload: bytes, report_fd: int) -> int:
        job = pickle.loads(payload)
        # The fd is closed by serve_requests after this: keep a duplicate to inspect.
        self.asked.append((job, os.dup(report_fd), os.get_inheritable(report_fd)))
        self.next_pid += 1
        return self.next_pid


@pytest.fixture
def pair() -> Iterator[tuple[ForkServerClient, RecordingServer]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Small buffers, so a few requests fill the socket and the outbox is used.
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = ForkServerClient(ChildContext("test", os.getpid()))
    ours.setblocking(False)
    client._sock = ours
    client._poll.register(ours.fileno(), select.POLLIN)
    server = RecordingServer(theirs)
    yield client, server
    client.close()
    theirs.close()
    for _, fd, _ in server.asked:
        os.close(fd)


def _job(task_id: str, size: int = 0) -> Job:
    return Job(print, ("tests.fake", task_id, "x" * size), {}, correlation_id=task_id)


def test_requests_larger_than_the_socket_wait_in_the_outbox_and_arrive_whole(
    pair: tuple[ForkServerClient, RecordingServer],
) -> None:
    client, server = pair
    pipes = [os.pipe() for _ in range(20)]
    for token, (_, write_fd) in enumerate(pipes, start=1):
        client.request(token, _job(f"t{token}", size=50_000), write_fd, slot=token % 3 + 1)
    assert client.wants_write()  # the socket took only part: nothing blocked
    rounds = 0
    started: list[Event] = []
    while len(server.asked) < len(pipes):
        rounds += 1
        assert rounds < 10_000, "the requests never arrived"
        if select.select([server.sock], [], [], 0)[0]:
            assert server.serve_requests()
        client.flush()
        started += client.events()  # as the worker's loop does, or the server blocks
    assert not client.wants_write()
    while client.wait(0.5):
        started += client.events()
    assert [e.a for e in started] == list(range(1, 21))
    assert [job.task_id for job, _, _ in server.asked] == [f"t{i}" for i in range(1, 21)]
    assert [job.slot for job, _, _ in server.asked] == [i % 3 + 1 for i in range(1, 21)]
    for (job, fd, inheritable), (read_fd, _) in zip(server.asked, pipes):
        assert not inheritable, "a received report fd must be close-on-exec"
        os.write(fd, job.task_id.encode())  # it is the write end of the right pipe
        assert os.read(read_fd, 100) == job.task_id.encode()
        os.close(read_fd)


def test_started_answers_come_back_as_events(
    pair: tuple[ForkServerClient, RecordingServer],
) -> None:
    client, server = pair
    read_fd, write_fd = os.pipe()
    client.request(7, _job("t7"), write_fd, slot=1)
    assert server.serve_requests()
    assert client.wait(5.0)
    assert client.events() == [Event(STARTED, 7, 5001)]
    os.close(read_fd)


def test_events_split_anywhere_are_handed_over_whole(
    pair: tuple[ForkServerClient, RecordingServer],
) -> None:
    client, server = pair
    data = b"".join([
        forkserver.EVENT.pack(forkserver.STARTED, 1, 101, 0, 0),
        forkserver.EVENT.pack(forkserver.EXITED, 101, -9, 2_500_000, 40_960),
        forkserver.EVENT.pack(forkserver.STARTED, 2, -11, 0, 0),
    ])
    seen: list[Event] = []
    for start in range(0, len(data), 5):
        server.sock.sendall(data[start:start + 5])
        client.wait(5.0)
        seen += client.events()
    # An exit carries the child's CPU time (µs on the wire) and peak RSS (KiB).
    assert seen == [Event(STARTED, 1, 101), Event(EXITED, 101, -9, 2.5, 40_960),
                    Event(STARTED, 2, -11)]


def test_a_server_that_exits_is_reported_gone_after_its_last_events(
    pair: tuple[ForkServerClient, RecordingServer],
) -> None:
    client, server = pair
    server.sock.sendall(forkserver.EVENT.pack(forkserver.EXITED, 101, 0, 0, 0))
    server.sock.shutdown(socket.SHUT_WR)
    client.wait(5.0)
    assert client.events() == [Event(EXITED, 101, 0)]
    # Still readable (end-of-file): the loop looks again, and learns it is gone.
    assert client.wait(0) and client.events() == []
    assert client.gone == "exited"
    assert client.fileno() is None


def test_a_request_without_its_fd_is_a_broken_stream(
    pair: tuple[ForkServerClient, RecordingServer],
) -> None:
    _, server = pair
    peer = socket.socket(fileno=os.dup(pair[0]._sock.fileno()))  # type: ignore[union-attr]
    peer.setblocking(True)
    payload = pickle.dumps(_job("t1"))
    peer.sendall(forkserver.REQUEST.pack(1, len(payload)) + payload)
    peer.close()
    assert server.serve_requests() is False


def test_a_fork_server_that_cannot_start_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> Any:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    client = ForkServerClient(ChildContext("test", os.getpid()))
    with pytest.raises(ForkError, match=r"could not start its fork server.*RLIMIT_NPROC"):
        client.start()
    assert client.fileno() is None
