"""What the supervisor asks of whatever forks its children, and what it hears back.

Two spawners implement it: :class:`~celery_forkguard.forkserver_client.ForkServerClient`
(the default: a fork server forks the children) and
:class:`~celery_forkguard.forking.Forker` (the worker forks them itself).
Both are asynchronous: :meth:`Spawner.request` never waits for the fork,
and the answers come back as :class:`Event` objects from :meth:`Spawner.events`,
read whenever the spawner's fd is readable (or the supervisor chooses to
wait a moment for them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol

if TYPE_CHECKING:
    from celery_forkguard.jobs import Job

STARTED = "started"  # a = token, b = pid (or minus the errno if fork failed)
EXITED = "exited"  # a = pid, b = exit code (negative: killed by that signal)


class Event(NamedTuple):
    kind: str
    a: int
    b: int
    cpu: float = 0.0  # EXITED: the child's user + system CPU seconds
    maxrss_kib: int = 0  # EXITED: the child's peak resident set size


class Spawner(Protocol):
    """The supervisor's view of a forker."""

    #: The fork server's pid (0 when the worker forks its children itself).
    pid: int
    #: Whether ``pool_restart`` should replace it (a fork server: yes).
    renewable: bool
    #: Why it can serve no more (its fork server exited...), or None.
    gone: Optional[str]

    def fileno(self) -> Optional[int]:
        """An fd that turns readable when events wait (None: poll on a timer)."""

    def request(self, token: int, job: Job, report_fd: int, slot: int) -> None:
        """Ask for a child running *job*; *report_fd* is its write end (ours to close)."""

    def events(self) -> list[Event]:
        """Whatever happened since the last call; sets ``gone`` if it is lost."""

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* for events; True if some may be waiting."""

    def wants_write(self) -> bool:
        """Whether requests wait to be written (watch the fd for writing)."""

    def flush(self) -> None:
        """Write what waits, as far as the fd takes it without blocking."""

    def kill(self, pid: int, signum: int, group: bool = False) -> bool:
        """Send *signum* to one of its children (or that child's process group)."""

    def close(self) -> None:
        """Stop serving; children already forked are left to their fate."""

    def freeze(self) -> Optional[set[int]]:
        """Stop the fork server and list its children (None: cannot be known)."""

    def kill_server(self) -> None:
        """SIGKILL the fork server, if there is one."""

    def reap_server(self, block: bool = False) -> bool:
        """Collect the fork server's exit status; True once done (or none)."""
