"""A fork server: the process every task's child is forked from.

Forking the worker itself for each task write-protects all of the worker's
memory each time, so every page the worker then writes costs a copy-on-write
fault (about 10 µs on a virtual machine, ~1,000 of them per task for a
Celery worker), and ``fork()`` itself stalls the event loop.  So at pool
start the worker forks once, after the app is loaded, a quiet copy of
itself — the fork server — and asks it for each child (as CPython's
``multiprocessing.forkserver`` does).  Children still share the loaded app
copy-on-write; the worker's loop never forks and never faults.

Protocol over one UNIX stream socket:

- worker -> server: ``REQUEST`` (token, payload length) with the write end of
  the child's report pipe attached (SCM_RIGHTS), then the pickled job;
- server -> worker: ``STARTED`` (token, pid) once forked, ``EXITED`` (pid,
  exit code) once reaped.

The server ignores the signals operators send to the worker's process
group, dies with the worker (PR_SET_PDEATHSIG), and exits when the socket
closes.  Children die with the server in the same way.
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
from typing import TYPE_CHECKING, Any, NoReturn

from celery_forkguard import fasthooks
from celery_forkguard.forking import ChildProcess, Forker, flush_stdio
from celery_forkguard.jobs import Job

if TYPE_CHECKING:
    from celery_forkguard.child import ChildContext

REQUEST = struct.Struct("!II")  # token, payload length
EVENT = struct.Struct("!cii")  # kind, a, b
STARTED, EXITED = b"S", b"X"


#: How long the worker waits for the server to fork one child.
SPAWN_TIMEOUT = 10.0


class ForkServerError(OSError):
    """The fork server is gone, hung, or answered nonsense."""


class ForkServer:
    """The worker's handle on its fork server; a drop-in for ``Forker``."""

    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        self.pid = 0
        self._sock: socket.socket | None = None
        self._inbox = bytearray()
        self._exits: deque[tuple[int, int]] = deque()
        self._token = 0

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        flush_stdio()
        # Blocked across fork: a signal now must not run the worker's handler
        # in the server; serve() unblocks once its own handlers are in place.
        saved_mask = fasthooks.block_all_signals()
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                fasthooks.restore_signal_mask(saved_mask)
        if pid == 0:  # pragma: no cover - the server process
            try:
                ours.close()
                serve(self.ctx, theirs, saved_mask)
            finally:
                os._exit(70)
        theirs.close()
        self.pid, self._sock = pid, ours
        self._inbox.clear()

    def alive(self) -> bool:
        return self._sock is not None

    def events_fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (the server exits on EOF) and reap the server."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0

    # -- the Forker interface ---------------------------------------------------------

    def spawn(self, job: Job) -> ChildProcess:
        """Ask the server for a child running *job*; return once it is forked.

        A server found dead is started again once before giving up.
        """
        try:
            return self._spawn(job)
        except ForkServerError:
            return self._spawn(job)

    def _spawn(self, job: Job) -> ChildProcess:
        if self._sock is None:
            self.start()
        assert self._sock is not None
        payload = pickle.dumps(_job_for_child(job), protocol=pickle.HIGHEST_PROTOCOL)
        read_fd, write_fd = os.pipe()
        self._token = token = (self._token + 1) & 0x7FFFFFFF
        try:
            self._sock.settimeout(SPAWN_TIMEOUT)
            socket.send_fds(self._sock, [REQUEST.pack(token, len(payload))], [write_fd])
            self._sock.sendall(payload)
            pid = self._wait_started(token)
        except OSError as exc:
            os.close(read_fd)
            self._lost()
            if isinstance(exc, TimeoutError):
                raise ForkServerError("the fork server did not answer in time") from exc
            raise ForkServerError(f"the fork server failed: {exc!r}") from exc
        finally:
            os.close(write_fd)
            if self._sock is not None:
                self._sock.setblocking(False)
        if pid < 0:  # the server's fork() failed: EAGAIN, ENOMEM, ...
            os.close(read_fd)
            raise OSError(-pid, os.strerror(-pid))
        os.set_blocking(read_fd, False)
        return ChildProcess(pid, read_fd, None)

    def _wait_started(self, token: int) -> int:
        while True:
            for kind, a, b in self._parse():
                if kind == STARTED and a == token:
                    return b
            self._receive(blocking=True)

    def read_exits(self) -> list[tuple[int, int]]:
        """Exit events the server sent: ``[(pid, exit code), ...]``."""
        try:
            self._receive(blocking=False)
        except ForkServerError:
            self._lost()
        for _ in self._parse():
            pass
        exits = list(self._exits)
        self._exits.clear()
        return exits

    def _receive(self, blocking: bool) -> None:
        assert self._sock is not None
        if blocking:
            self._sock.settimeout(SPAWN_TIMEOUT)
        else:
            self._sock.setblocking(False)
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    raise ForkServerError("the fork server exited")
                self._inbox += data
                if blocking or len(data) < 65536:
                    return
        except BlockingIOError:
            return
        finally:
            if self._sock is not None:
                self._sock.setblocking(False)

    def _parse(self) -> list[tuple[bytes, int, int]]:
        """Events in the inbox; exits are queued, the rest returned."""
        events = []
        size = EVENT.size
        while len(self._inbox) >= size:
            kind, a, b = EVENT.unpack_from(self._inbox)
            del self._inbox[:size]
            if kind == EXITED:
                self._exits.append((a, b))
            else:
                events.append((kind, a, b))
        return events

    def _lost(self) -> None:
        # The server died: its children died with it (pdeathsig). Start anew
        # on the next spawn; the supervisor records the lost children.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            self.pid = 0

    @staticmethod
    def reap(pid: int) -> int | None:
        return None  # the server reaps; exits arrive through read_exits()

    # The server's children are signalled directly, as the worker's own would be.
    kill = staticmethod(Forker.kill)


def _job_for_child(job: Job) -> Job:
    """What the child needs of a job: the callbacks stay with the worker."""
    child_job = Job(job.target, job.args, job.kwargs, correlation_id=job.task_id)
    child_job.task_name = job.task_name
    return child_job


# -- the server process ---------------------------------------------------------------


def serve(ctx: ChildContext, sock: socket.socket, saved_mask: Any) -> NoReturn:
    """The fork server's loop: fork on request, reap, report; never returns."""
    from celery_forkguard.child import child_main, detach_inherited_fds

    # Nothing here creates garbage worth collecting; a collection would copy pages.
    gc.disable()
    gc.freeze()
    wake_r, wake_w = _quiet_signals()
    fasthooks.restore_signal_mask(saved_mask)
    fasthooks.die_with_parent()
    if os.getppid() != ctx.parent_pid:
        os._exit(0)
    detach_inherited_fds(keep={sock.fileno(), wake_r, wake_w})
    ctx.parent_pid = os.getpid()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    from celery_forkguard.titles import set_title

    set_title(f"celery forkguard: fork server ({ctx.hostname})")
    while True:
        for key, _ in sel.select():
            if key.fd == wake_r:
                _drain(wake_r)
                _reap_children(sock)
            elif not _serve_request(ctx, sock, child_main):
                _reap_children(sock)
                os._exit(0)


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


def _serve_request(ctx: ChildContext, sock: socket.socket, child_main: Any) -> bool:
    try:
        header, fds, _, _ = socket.recv_fds(sock, REQUEST.size, 1)
    except OSError:
        return False
    if len(header) < REQUEST.size or not fds:
        return False
    token, length = REQUEST.unpack(header)
    report_fd = fds[0]
    payload = _recv_exactly(sock, length)
    if payload is None:
        return False
    pid = _fork_child(ctx, payload, report_fd, sock, child_main)
    os.close(report_fd)
    sock.sendall(EVENT.pack(STARTED, token, pid))
    return True


def _fork_child(
    ctx: ChildContext, payload: bytes, report_fd: int, sock: socket.socket, child_main: Any,
) -> int:
    """Fork one child; return its pid, or minus the errno if fork failed."""
    flush_stdio()
    saved_mask = fasthooks.block_all_signals()
    try:
        pid = os.fork()
    except OSError as exc:
        fasthooks.restore_signal_mask(saved_mask)
        return -(exc.errno or 1)
    if pid == 0:  # pragma: no cover - the child
        try:
            sock.close()
            gc.enable()
            job = pickle.loads(payload)
            child_main(ctx, job, report_fd, saved_mask)
        finally:
            os._exit(71)
    fasthooks.restore_signal_mask(saved_mask)
    return pid


def _reap_children(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            sock.sendall(EVENT.pack(EXITED, pid, os.waitstatus_to_exitcode(status)))


def _recv_exactly(sock: socket.socket, length: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < length:
        data = sock.recv(min(length - len(chunks), 1 << 20))
        if not data:
            return None
        chunks += data
    return bytes(chunks)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


