"""The worker's handle on its fork server (the server itself is ``forkserver.py``).

Never blocks the worker: requests are written without waiting (what the
socket does not take yet waits in an outbox until it is writable), and
answers are read whenever the socket is readable.  The supervisor may wait
a moment for an answer it expects (:meth:`ForkServerClient.wait`), but the
events read then are handed over like any others.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from celery_forkguard.exceptions import ForkError
from celery_forkguard.forking import fork_with_signals_blocked, signal_process
from celery_forkguard.forkserver import EVENT, EXITED, REQUEST, STARTED, serve
from celery_forkguard.jobs import Job
from celery_forkguard.spawning import EXITED as EXITED_EVENT
from celery_forkguard.spawning import STARTED as STARTED_EVENT
from celery_forkguard.spawning import Event

if TYPE_CHECKING:
    from celery_forkguard.child import ChildContext

RECV_SIZE = 1 << 16
#: The longest the worker waits for a stuck server to stop before listing its children.
FREEZE_TIMEOUT = 0.2
_KINDS = {STARTED: STARTED_EVENT, EXITED: EXITED_EVENT}


class ForkServerClient:
    """One fork server: start it, send it requests, read what it answers."""

    renewable = True

    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        self.pid = 0
        self._sock: Optional[socket.socket] = None
        self._inbox = bytearray()
        #: [bytes still to send, the report fd to attach (None once sent)]
        self._outbox: deque[list] = deque()
        self._poll = select.poll()
        #: Why the server is gone (None while it serves).
        self.gone: Optional[str] = None

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Fork the server; a clear error if the system will not let us."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def run_server(saved_mask: Any) -> None:
            ours.close()
            serve(self.ctx, theirs, saved_mask)

        try:
            pid = fork_with_signals_blocked(run_server, crash_code=70)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise ForkError(
                f"forkguard could not start its fork server: fork() failed: {exc} "
                "(the process limit, RLIMIT_NPROC / ulimit -u, may be too low)"
            ) from exc
        theirs.close()
        ours.setblocking(False)
        self.pid, self._sock = pid, ours
        self._poll.register(ours.fileno(), select.POLLIN)

    def fileno(self) -> Optional[int]:
        return self._sock.fileno() if self._sock is not None else None

    def close(self) -> None:
        """Close the socket: the server exits on EOF (its children die with it)."""
        if self._sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for _, fd in self._outbox:
            if fd is not None:
                os.close(fd)
        self._outbox.clear()
        self.gone = self.gone or "closed"

    def kill(self, pid: int, signum: int, group: bool = False) -> bool:
        # The server's children are signalled directly, as the worker's own would be.
        return signal_process(pid, signum, group)

    def kill_server(self) -> None:
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def freeze(self) -> Optional[set[int]]:
        """SIGSTOP the server and list its children; None if they cannot be known.

        With the server stopped its list of children cannot grow, so a child
        it forked without telling us shows up here.
        """
        if not self.pid:
            return None
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while (state := process_state(self.pid)) not in (b"T", b"t"):
            if state in (None, b"Z", b"X") or time.monotonic() > deadline:
                # Dead (its children went to init) or stuck in the kernel: unknown.
                return None
            time.sleep(0.001)  # a stop lands within a scheduler tick
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children", "rb") as f:
                return {int(pid) for pid in f.read().split()}
        except (OSError, ValueError):
            return None

    def reap_server(self, block: bool = False) -> bool:
        """Collect the server's exit status; True once it is reaped."""
        if not self.pid:
            return True
        try:
            pid, _ = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid:
            self.pid = 0
        return not self.pid

    # -- requests ---------------------------------------------------------------------

    def request(self, token: int, job: Job, report_fd: int, slot: int) -> None:
        """Queue a request for a child; the report fd is closed once it is sent."""
        try:
            payload = pickle.dumps(job_for_child(job, slot), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            os.close(report_fd)
            raise
        self._outbox.append([REQUEST.pack(token, len(payload)) + payload, report_fd])
        self.flush()

    def wants_write(self) -> bool:
        return bool(self._outbox) and self._sock is not None

    def flush(self) -> None:
        """Send what the socket takes now; one sendmsg per request when all goes well."""
        while self._outbox and self._sock is not None:
            entry = self._outbox[0]
            data, fd = entry
            try:
                if fd is not None:
                    sent = socket.send_fds(self._sock, [data], [fd])
                else:
                    sent = self._sock.send(data)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lose(f"stopped taking requests ({exc})")
                return
            if fd is not None:
                os.close(fd)  # it travelled with the first byte
            if sent < len(data):
                entry[:] = [data[sent:], None]
                return
            self._outbox.popleft()

    # -- answers --------------------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* seconds for the server to say something."""
        if self._sock is None:
            return False
        return bool(self._poll.poll(max(0, int(timeout * 1000))))

    def events(self) -> list[Event]:
        """Every whole event the server has sent so far."""
        while self._sock is not None:
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lose(f"broke the connection ({exc})")
                break
            if not data:
                self._lose("exited")
                break
            self._inbox += data
            if len(data) < RECV_SIZE:
                break
        return self._parse()

    def _parse(self) -> list[Event]:
        events = []
        size = EVENT.size
        view = self._inbox
        whole = len(view) - len(view) % size
        for offset in range(0, whole, size):
            kind, a, b, cpu_us, maxrss_kib = EVENT.unpack_from(view, offset)
            events.append(Event(_KINDS.get(kind, "?"), a, b, cpu_us / 1e6, maxrss_kib))
        del self._inbox[:whole]
        return events

    def _lose(self, why: str) -> None:
        self.gone = why
        if self._sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None


def process_state(pid: int) -> Optional[bytes]:
    """The state letter in /proc/<pid>/stat (R, S, T, Z...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def job_for_child(job: Job, slot: int) -> Job:
    """What the child needs of a job: the callbacks stay with the worker."""
    child_job = Job(job.target, job.args, job.kwargs, correlation_id=job.task_id)
    child_job.task_name = job.task_name
    child_job.slot = slot
    return child_job

