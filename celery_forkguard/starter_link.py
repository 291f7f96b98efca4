"""A worker's side of ``celery forkguard starter``: one pipe, one line per event.

The starter passes the write end of a pipe to each worker generation it
starts, and names it in ``FORKGUARD_STARTER_FD``.  The worker writes short
lines to it; the starter reads them in its loop:

``ready``
    the worker consumes: the starter may retire the generation before it;
``retiring N``
    the worker stopped consuming for a retire and still runs N tasks;
``reload``
    ``forkguard_reload`` reached this worker: the starter should reload;
``mailbox-released``
    the worker moved its remote-control mailbox aside (see ``mailbox``).

The starter writes back on the same socket:

``mailbox-release``
    a new generation is about to start under this worker's node name: move
    the mailbox to this generation's own name, then say ``mailbox-released``;
``mailbox-reclaim``
    that generation failed: take the node name's mailbox back.

The variable is removed from the environment as soon as it is read, and the
fd is close-on-exec, so a task that runs a program (even another worker)
does not inherit the link.  Writes never block: a starter that stopped
reading must not stall the worker.

The link is a socket: when the starter dies (SIGKILLed by a supervisor that
gave up waiting), the worker reads EOF and stops as if it got TERM, rather
than live on as an orphan beside the next starter's workers.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from typing import Callable, Optional

ENV_FD = "FORKGUARD_STARTER_FD"
ENV_PID = "FORKGUARD_STARTER_PID"
ENV_GENERATION = "FORKGUARD_GENERATION"

#: What the starter may write to a worker (see the module docstring).
MAILBOX_RELEASE = "mailbox-release"
MAILBOX_RELEASED = "mailbox-released"
MAILBOX_RECLAIM = "mailbox-reclaim"


class StarterLink:
    """The write end of the pipe to this worker's starter."""

    def __init__(self, fd: int, starter_pid: int, generation: int) -> None:
        self.fd = fd
        self.starter_pid = starter_pid
        self.generation = generation

    def send(self, line: str) -> bool:
        """Write one line; False when the starter is gone or not reading."""
        try:
            return os.write(self.fd, f"{line}\n".encode()) > 0
        except OSError:  # EAGAIN (full pipe), EPIPE (starter gone)
            return False

    def watch(self, on_line: Callable[[str], None],
              on_lost: Callable[[], None]) -> threading.Thread:
        """From a thread: *on_line* for each line the starter writes, *on_lost* at EOF."""
        thread = threading.Thread(target=self._read_until_eof, args=(on_line, on_lost),
                                  name="forkguard-starter-link", daemon=True)
        thread.start()
        return thread

    def _read_until_eof(self, on_line: Callable[[str], None],
                        on_lost: Callable[[], None]) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        buffer = b""
        while True:
            poller.poll()
            try:
                data = os.read(self.fd, 512)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                if line.strip():
                    on_line(line.decode(errors="replace").strip())
        on_lost()


def stop_as_on_term() -> None:
    """What a worker does when its starter is gone: what TERM would do."""
    os.kill(os.getpid(), signal.SIGTERM)


_link: Optional[StarterLink] = None
_looked = False


def starter_link() -> Optional[StarterLink]:
    """This worker's link to its starter, or None when no starter runs it."""
    global _link, _looked
    if not _looked:
        _looked = True
        _link = _take_from_environment()
    return _link


def _take_from_environment() -> Optional[StarterLink]:
    raw_fd = os.environ.pop(ENV_FD, None)
    raw_pid = os.environ.pop(ENV_PID, None)
    raw_generation = os.environ.pop(ENV_GENERATION, None)
    if raw_fd is None:
        return None
    try:
        fd = int(raw_fd)
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
    except (ValueError, OSError):
        return None
    with contextlib.suppress(ValueError, TypeError):
        return StarterLink(fd, int(raw_pid or 0), int(raw_generation or 0))
    return StarterLink(fd, 0, 0)
