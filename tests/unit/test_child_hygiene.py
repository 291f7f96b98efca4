"""What a fresh child does to what it inherited: fds and signal handlers.

Each test forks once for real; the child checks its own state and sends the
findings back through a pipe, then leaves with ``os._exit`` so nothing of
pytest runs twice.  The parent blocks on the pipe until EOF (the child's exit
closes it): no sleeping, and pytest-timeout bounds a child that hangs.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from celery_forkguard import child, intents
from celery_forkguard.exceptions import TermException

pytestmark = pytest.mark.timeout(20)


def run_in_fork(body: Callable[[int], Any]) -> tuple[int, Any]:
    """Run ``body(report_fd)`` in a forked child: its exit code and what it returned."""
    # Created before the fork, as prepare_master does, so the table is shared.
    table = intents.shared()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            message: tuple[str, Any] = ("ok", body(write_fd))
            code = 0
        except BaseException:
            message = ("error", traceback.format_exc())
        finally:
            try:
                os.write(write_fd, pickle.dumps(message))
            finally:
                os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    table.clear(pid)  # the pid may come back for a later child
    code = os.waitstatus_to_exitcode(status)
    if not chunks:
        return code, None
    kind, value = pickle.loads(b"".join(chunks))
    assert kind == "ok", f"the child failed:\n{value}"
    return code, value


def describe(fd: int) -> dict[str, Any]:
    st = os.fstat(fd)
    return {
        "socket": stat.S_ISSOCK(st.st_mode),
        "fifo": stat.S_ISFIFO(st.st_mode),
        "regular": stat.S_ISREG(st.st_mode),
        "dir": stat.S_ISDIR(st.st_mode),
        "devnull": stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev,
        "inode": (st.st_dev, st.st_ino),
    }


# -- inherited file descriptors ------------------------------------------------


@pytest.fixture
def inherited(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Descriptors a worker master typically holds when it forks."""
    master_end, peer_end = socket.socketpair()
    pipe_r, pipe_w = os.pipe()
    log = open(tmp_path / "worker.log", "wb", buffering=0)  # noqa: SIM115
    directory = os.open(tmp_path, os.O_RDONLY)
    yield {
        "socket": master_end, "peer": peer_end, "pipe_r": pipe_r, "pipe_w": pipe_w,
        "log": log, "log_path": tmp_path / "worker.log", "dir": directory,
    }
    master_end.close()
    peer_end.close()
    log.close()
    for fd in (pipe_r, pipe_w, directory):
        os.close(fd)


def test_detach_turns_sockets_and_pipes_into_devnull_and_keeps_files(
    inherited: dict[str, Any],
) -> None:
    fds = {
        "socket": inherited["socket"].fileno(), "pipe_r": inherited["pipe_r"],
        "pipe_w": inherited["pipe_w"], "log": inherited["log"].fileno(), "dir": inherited["dir"],
    }
    before = {name: describe(fd) for name, fd in fds.items()}

    def body(report_fd: int) -> dict[str, Any]:
        child.detach_inherited_fds(keep={report_fd})
        # What a stale object of the master's would do with its old fd now:
        os.write(fds["socket"], b"broker frame")
        os.write(fds["log"], b"child log line\n")
        found = {name: describe(fd) for name, fd in fds.items()}
        found["report"] = describe(report_fd)
        return found

    code, after = run_in_fork(body)
    assert code == 0

    for name in ("socket", "pipe_r", "pipe_w"):
        assert after[name]["devnull"], (name, after[name])  # the number stays taken
    assert after["log"]["regular"] and after["log"]["inode"] == before["log"]["inode"]
    assert after["dir"]["dir"] and after["dir"]["inode"] == before["dir"]["inode"]
    assert after["report"]["fifo"], "the report pipe must survive"

    # The master's stream saw nothing of the child's write; the log file got its line.
    peer = inherited["peer"]
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    assert inherited["log_path"].read_bytes() == b"child log line\n"


def test_detach_leaves_the_master_side_alone(inherited: dict[str, Any]) -> None:
    code, _ = run_in_fork(lambda report_fd: child.detach_inherited_fds(keep={report_fd}))
    assert code == 0
    inherited["socket"].sendall(b"ping")
    assert inherited["peer"].recv(4) == b"ping"


# -- signal handlers -----------------------------------------------------------


def _master_handler(signum: int, frame: Any) -> None:  # pragma: no cover - never runs
    raise AssertionError("the master's handler ran in a child")


@pytest.fixture
def master_signals() -> Iterator[None]:
    """Handlers and a wakeup fd as a worker master has them; restored afterwards."""
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    saved = {
        signum: signal.signal(signum, _master_handler)
        for signum in (signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)
    }
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    yield
    signal.set_wakeup_fd(old_wakeup)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    wake_r.close()
    wake_w.close()


def _handler_name(signum: int) -> str:
    handler = signal.getsignal(signum)
    if isinstance(handler, signal.Handlers):
        return handler.name
    return getattr(handler, "__name__", repr(handler))


@pytest.mark.usefixtures("master_signals")
def test_install_child_signals_resets_the_masters_handlers() -> None:
    def body(report_fd: int) -> dict[str, Any]:
        child.install_child_signals()
        return {
            "handlers": {
                signal.Signals(signum).name: _handler_name(signum)
                for signum in (
                    signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT,
                    signal.SIGTERM, signal.SIGUSR1,
                )
            },
            # set_wakeup_fd returns the previous fd: -1 means it was already cleared.
            "wakeup_fd": signal.set_wakeup_fd(-1),
        }

    code, found = run_in_fork(body)
    assert code == 0
    assert found["handlers"] == {
        "SIGUSR2": "SIG_DFL", "SIGHUP": "SIG_DFL", "SIGQUIT": "SIG_DFL",
        "SIGINT": "SIG_IGN",
        "SIGTERM": "_raise_term", "SIGUSR1": "_raise_soft_time_limit",
    }
    assert found["wakeup_fd"] == -1


def _own_intent(intent: int) -> None:
    # The table is shared with the test process: set our own pid's entry only.
    intents.shared().set(os.getpid(), intent)


def test_child_sigusr1_raises_soft_time_limit_and_sigterm_raises_term_exception() -> None:
    def body(report_fd: int) -> list[str]:
        child.install_child_signals()
        _own_intent(intents.NONE)
        seen = []
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.raise_signal(signum)  # runs the Python handler before returning
            except (SoftTimeLimitExceeded, TermException) as exc:
                seen.append(type(exc).__name__)
        # SIGTERM raises once: the task's cleanup is not interrupted again.
        seen.append(_handler_name(signal.SIGTERM))
        return seen

    code, seen = run_in_fork(body)
    assert code == 0
    assert seen == ["SoftTimeLimitExceeded", "TermException", "SIG_DFL"]


def test_child_sigterm_with_revoke_intent_dies_of_the_signal() -> None:
    def body(report_fd: int) -> str:
        child.install_child_signals()
        _own_intent(intents.REVOKE)
        try:
            signal.raise_signal(signal.SIGTERM)
        except TermException:
            return "raised instead of dying"
        return "survived"

    code, result = run_in_fork(body)
    assert (code, result) == (-signal.SIGTERM, None)
