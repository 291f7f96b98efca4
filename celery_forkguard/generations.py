"""One worker generation of ``celery forkguard starter``: a process and its link.

A generation is one ``celery worker -P forkguard`` process, started from a
fresh exec (so it loads the code and settings on disk now) in a session of
its own (so a terminal's Ctrl-C reaches the starter only, which forwards it).
It reports to the starter over a pipe (see ``starter_link``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from celery_forkguard.starter_link import ENV_FD, ENV_GENERATION, ENV_PID

#: Signals the starter handles; a generation starts with their default action.
STARTER_SIGNALS = (
    signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
)


class State(enum.Enum):
    STARTING = "starting"  # exec'd, not consuming yet
    CURRENT = "current"  # consuming; signals are forwarded to it
    RETIRING = "retiring"  # told to stop consuming, finishing its tasks
    FAILED = "failed"  # never became ready: being stopped
    STOPPING = "stopping"  # the starter stops: it was sent the stop signal


@dataclass
class Generation:
    number: int
    pid: int
    link: socket.socket  # the starter's end of the generation's link
    started_at: float
    state: State = State.STARTING
    ready_at: Optional[float] = None
    running: Optional[int] = None  # tasks still running, once retiring
    kill_at: Optional[float] = None  # when a FAILED generation gets SIGKILL
    exit_status: Optional[int] = None
    _buffer: bytes = field(default=b"", repr=False)

    @property
    def link_fd(self) -> int:
        return self.link.fileno()

    def label(self) -> str:
        return f"generation {self.number} (pid {self.pid})"

    def title_part(self) -> str:
        part = f"generation {self.number} {self.state.value} (pid {self.pid}"
        if self.state is State.RETIRING and self.running is not None:
            part += f", {self.running} task(s) running"
        return part + ")"

    eof: bool = False

    def read_lines(self) -> list[str]:
        """Whole lines the generation has written ([] when none is whole); sets ``eof``."""
        try:
            data = os.read(self.link_fd, 4096)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        self.eof = not data
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode(errors="replace").strip() for line in lines if line.strip()]

    def tell(self, line: str) -> bool:
        """Write one line to the generation's worker; False if it cannot take it now."""
        try:
            return self.link.send(f"{line}\n".encode()) > 0
        except OSError:  # BlockingIOError (full), BrokenPipeError (exiting)
            return False

    def signal(self, signum: int) -> bool:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        """SIGKILL the generation's session leader and its process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        self.link.close()


def spawn_generation(number: int, argv: Sequence[str], environ: Mapping[str, str],
                     cwd: str) -> Generation:
    """Start *argv* as generation *number* in a new session, with its link.

    The link is a socket pair: the worker writes its lines to it, and sees
    EOF on it when the starter is gone (then it stops as on TERM).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    env = dict(environ)
    env[ENV_FD] = str(theirs.fileno())
    env[ENV_PID] = str(os.getpid())
    env[ENV_GENERATION] = str(number)
    try:
        # Resolves cwd afresh: a deploy that moves a `current` symlink is seen.
        os.chdir(cwd)
        theirs.set_inheritable(True)
        pid = os.posix_spawn(
            sys.executable, list(argv), env, setsid=True,
            setsigmask=(), setsigdef=STARTER_SIGNALS,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Generation(number, pid, ours, time.monotonic())


def describe_status(status: int) -> str:
    """``exit 3`` or ``killed by SIGKILL`` for a waitpid status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def exit_code_of(status: int) -> int:
    """The shell's exit code for a waitpid status (128 + signal when killed)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
