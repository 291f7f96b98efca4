"""The fork server process: every task's child is forked from it.

Forking the worker itself for each task write-protects all of the worker's
memory each time, so every page the worker then writes costs a copy-on-write
fault (about 10 µs on a virtual machine, ~1,000 of them per task for a
Celery worker), and ``fork()`` itself stalls the event loop.  So at pool
start the worker forks once, after the app is loaded, a quiet copy of
itself (this server) and asks it for each child, as CPython's
``multiprocessing.forkserver`` does.  Children still share the loaded app
copy-on-write; the worker's loop never forks and never faults.  The
worker's side is ``forkserver_client.py``.

Protocol over one UNIX stream socket, both ways asynchronous:

- worker -> server: ``REQUEST`` (token, payload length) and the
  pickled job, with the write end of the child's report pipe attached
  (SCM_RIGHTS) to the message's first byte;
- server -> worker: ``STARTED`` (token, pid or minus the errno) once
  forked, ``EXITED`` (pid, exit code, CPU microseconds, peak RSS in KiB)
  once reaped: in that order for any one child, since both go down the
  same socket.

The server ignores the signals operators send to the worker's process
group, dies with the worker (PR_SET_PDEATHSIG), and exits when the socket
closes.  Children die with the server in the same way.  With standby
children (standby.py) a request goes to a child forked ahead when one
waits, and is forked as above when none does.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import selectors
import signal
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from celery_forkguard import fasthooks
from celery_forkguard.fdpass import recv_with_fds
from celery_forkguard.forking import fork_with_signals_blocked, reaped_children
from celery_forkguard.standby import Standbys

if TYPE_CHECKING:
    from celery_forkguard.child import ChildContext

REQUEST = struct.Struct("!II")  # token, payload length
EVENT = struct.Struct("!ciiQQ")  # kind, a, b, CPU µs, peak RSS KiB (EXITED)
STARTED, EXITED = b"S", b"X"
RECV_SIZE = 1 << 16


def serve(ctx: ChildContext, sock: socket.socket, saved_mask: Any) -> NoReturn:
    """The fork server's loop: fork on request, reap, report; never returns."""
    from celery_forkguard.child import child_main, detach_inherited_fds, standby_main
    from celery_forkguard.titles import set_title

    # Nothing here creates garbage worth collecting; a collection would copy pages.
    # The heap came immortal (where Python allows) and frozen from the master.
    gc.disable()
    gc.freeze()
    wake_r, wake_w = _quiet_signals()
    fasthooks.restore_signal_mask(saved_mask)
    fasthooks.die_with_parent()
    if os.getppid() != ctx.parent_pid:
        os._exit(0)
    detach_inherited_fds(keep={sock.fileno(), wake_r, wake_w})
    ctx.parent_pid = os.getpid()
    set_title(f"celery forkguard: fork server ({ctx.hostname})")
    server = _Server(ctx, sock, child_main, standby_main)
    server.standbys.top_up()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fd == wake_r:
                _drain(wake_r)
                server.reap_children()
            elif not server.serve_requests():
                server.reap_children()
                server.standbys.dismiss(wake_r)
                os._exit(0)
        server.standbys.top_up()


class _Server:
    """Reads requests as they come (whole or in pieces) and forks one child each."""

    def __init__(self, ctx: ChildContext, sock: socket.socket, child_main: Callable,
                 standby_main: Callable | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self.child_main = child_main
        self.standby_main = standby_main
        self.inbox = bytearray()
        self.fds: deque[int] = deque()
        target = ctx.standby_children if standby_main is not None else 0
        self.standbys = Standbys(target, self.fork_standby)

    def serve_requests(self) -> bool:
        """Fork for every whole request read so far; False once the worker is gone."""
        try:
            data, fds = recv_with_fds(self.sock, RECV_SIZE)
        except OSError:
            return False
        if not data:
            return False
        self.inbox += data
        self.fds.extend(fds)
        while len(self.inbox) >= REQUEST.size:
            token, length = REQUEST.unpack_from(self.inbox)
            end = REQUEST.size + length
            if len(self.inbox) < end:
                break
            if not self.fds:
                return False  # a request without its pipe: the stream is broken
            payload = bytes(self.inbox[REQUEST.size:end])
            del self.inbox[:end]
            report_fd = self.fds.popleft()
            pid = self.standbys.hand_over(payload, report_fd)
            if pid is None:
                pid = self.fork_child(payload, report_fd)
            os.close(report_fd)
            self.send(STARTED, token, pid)
        return True

    def fork_child(self, payload: bytes, report_fd: int) -> int:
        """Fork one child; return its pid, or minus the errno if fork failed."""
        try:
            return fork_with_signals_blocked(lambda mask: self._run_child(payload, report_fd, mask))
        except OSError as exc:
            return -(exc.errno or 1)

    def _run_child(self, payload: bytes, report_fd: int, saved_mask: Any) -> None:
        self.sock.close()
        gc.enable()
        self.child_main(self.ctx, pickle.loads(payload), report_fd, saved_mask)

    def fork_standby(self, theirs: socket.socket, ours: socket.socket) -> int:
        """Fork a standby child that waits on *theirs* (raises OSError if refused)."""
        assert self.standby_main is not None
        standby_main = self.standby_main

        def run_standby(saved_mask: Any) -> None:
            self.sock.close()
            ours.close()
            gc.enable()
            standby_main(self.ctx, theirs, saved_mask)

        return fork_with_signals_blocked(run_standby)

    def reap_children(self) -> None:
        for reaped in reaped_children():
            if self.standbys.reaped(reaped.pid):
                continue  # never handed a task: the worker never heard of it
            self.send(EXITED, reaped.pid, os.waitstatus_to_exitcode(reaped.status),
                      round(reaped.cpu * 1e6), reaped.maxrss_kib)

    def send(self, kind: bytes, a: int, b: int, cpu_us: int = 0, maxrss_kib: int = 0) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(EVENT.pack(kind, a, b, cpu_us, maxrss_kib))


def _quiet_signals() -> tuple[int, int]:
    signal.set_wakeup_fd(-1)
    for signum in fasthooks.python_handled_signals():
        fasthooks.set_handler(signum, signal.SIG_DFL)
    # Meant for the worker, they reach the whole process group.
    for signum in fasthooks.OPERATOR_SIGNALS:
        fasthooks.set_handler(signum, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    return wake_r, wake_w


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
