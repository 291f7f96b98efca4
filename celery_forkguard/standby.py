"""Standby children: forked and set up ahead of their task (``forkguard_standby_children``).

A fresh child is forked, then set up (signals, fds, inherited connections,
``worker_process_init``) before its task can start: about two milliseconds
on a small VM, on the path from a task's arrival to its start.  With
standby children the fork server keeps that many forked and set up ahead,
each waiting on a socket of its own.  A request is handed to one at once
(the job's bytes, with the write end of its report pipe attached) and a
replacement is forked once the worker has its answer.  Publish-to-start
latency and short I/O-bound tasks gain; the CPU spent per task stays the
same, so CPU-bound tasks gain nothing; each standby is one more process,
holding whatever ``worker_process_init`` opened.

The worker hears of a standby only when it is handed a task (``STARTED``
with its pid, as for any child).  One that never is leaves unannounced when
the fork server closes: its socket reaches EOF and it runs
``worker_process_shutdown`` and exits.  If the fork server is lost, its
standbys die with it, and a request it may have handed over is recorded as
lost, never run twice (servers.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections import deque
from typing import Callable, NamedTuple, Optional

from celery_forkguard.fdpass import recv_with_fds

#: The job's length; the report fd rides on its first byte.
HANDOFF = struct.Struct("!I")
#: Larger jobs are forked for as before: a standby still running its set-up
#: reads nothing yet, and the fork server must not wait for it to make room.
#: Below a UNIX socket's send buffer (about 200 KiB on Linux), the job waits
#: in the socket instead.
HANDOFF_MAX = 64 * 1024
RECV_SIZE = 1 << 16
#: How long a closing fork server lets its standbys leave (their
#: ``worker_process_shutdown`` handlers) before it exits and they die with it.
LEAVE_TIMEOUT = 2.0

#: Forks one standby that serves on the given socket; returns its pid.
ForkStandby = Callable[[socket.socket, socket.socket], int]


class Standby(NamedTuple):
    pid: int
    sock: socket.socket  # the fork server's end


class Standbys:
    """The fork server's standby children, oldest first."""

    def __init__(self, target: int, fork: ForkStandby) -> None:
        self.target = max(0, target)
        self._fork = fork
        self.waiting: deque[Standby] = deque()
        #: Standbys not handed a task yet: their exit concerns nobody.
        self.unannounced: set[int] = set()

    def top_up(self) -> None:
        """Fork standbys until *target* wait; a refused fork waits for the next call."""
        while len(self.waiting) < self.target:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                pid = self._fork(theirs, ours)
            except OSError:
                ours.close()
                return
            finally:
                theirs.close()
            self.waiting.append(Standby(pid, ours))
            self.unannounced.add(pid)

    def hand_over(self, payload: bytes, report_fd: int) -> Optional[int]:
        """Give a job to the oldest standby; its pid, or None if none could take it."""
        message = HANDOFF.pack(len(payload)) + payload
        if len(message) > HANDOFF_MAX:
            return None
        while self.waiting:
            standby = self.waiting.popleft()
            try:
                sent = socket.send_fds(standby.sock, [message], [report_fd])
                if sent < len(message):
                    standby.sock.sendall(message[sent:])
            except OSError:
                continue  # it died meanwhile (reaped later): the next one
            finally:
                standby.sock.close()
            self.unannounced.discard(standby.pid)
            return standby.pid
        return None

    def reaped(self, pid: int) -> bool:
        """Forget *pid* if it was a standby without a task; True if it was."""
        if pid not in self.unannounced:
            return False
        self.unannounced.discard(pid)
        for standby in [s for s in self.waiting if s.pid == pid]:
            self.waiting.remove(standby)
            standby.sock.close()
        return True

    def dismiss(self, wake_fd: int, timeout: float = LEAVE_TIMEOUT) -> None:
        """Close every standby's socket and wait up to *timeout* for them to exit.

        *wake_fd* turns readable on SIGCHLD (the fork server's wake-up pipe).
        """
        for standby in self.waiting:
            standby.sock.close()
        self.waiting.clear()
        deadline = time.monotonic() + timeout
        while self.unannounced:
            for pid in list(self.unannounced):
                if _reaped(pid):
                    self.unannounced.discard(pid)
            left = deadline - time.monotonic()
            if not self.unannounced or left <= 0:
                return
            select.select([wake_fd], [], [], left)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_fd, 512)


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return bool(done)


def receive_job(sock: socket.socket) -> Optional[tuple[bytes, int]]:
    """In a standby: wait for its job and report fd; None when the server closes."""
    data = bytearray()
    fds: list[int] = []
    try:
        while len(data) < HANDOFF.size or len(data) < HANDOFF.size + HANDOFF.unpack_from(data)[0]:
            chunk, received = recv_with_fds(sock, RECV_SIZE)
            fds.extend(received)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    whole = len(data) >= HANDOFF.size and len(data) == HANDOFF.size + HANDOFF.unpack_from(data)[0]
    if not whole or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    return bytes(data[HANDOFF.size:]), fds[0]
