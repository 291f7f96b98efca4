"""Everything a child does between ``fork()`` and ``os._exit()``.

The child runs exactly one task.  Its set-up mirrors what Celery's prefork
gives a pool process (``celery.concurrency.prefork.process_initializer``),
made cheap enough to pay once per task: whatever can be computed once is
computed in the master before the first fork (see ``prefork.TaskPool``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import signal
import socket
import stat
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from billiard import process as billiard_process
from billiard import util as billiard_util
from celery import signals
from celery._state import _set_task_join_will_block
from celery.exceptions import SoftTimeLimitExceeded

from celery_forkguard import fasthooks, intents, protocol, standby, titles
from celery_forkguard.exceptions import TermException, TermRequeue
from celery_forkguard.jobs import exception_info
from celery_forkguard.outcomes import (
    EXIT_CRASHED,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_REPORT_LOST,
    EXIT_SETUP_FAILED,
)

if TYPE_CHECKING:
    from celery_forkguard.jobs import Job

#: The signal the master sends for a soft time limit (as billiard does).
SOFT_TIMEOUT_SIGNAL = signal.SIGUSR1


class ChildContext:
    """What every child is handed: fixed once per pool."""

    def __init__(self, hostname: str, parent_pid: int, term_child: bool = False,
                 standby_children: int = 0) -> None:
        self.hostname = hostname
        #: How many children the fork server keeps forked ahead (standby.py).
        self.standby_children = standby_children
        #: With term_child the worker decides when a task gets TERM: a TERM it
        #: did not send (Heroku signals every process of a dyno) is ignored.
        self.term_child = term_child
        #: The process children are forked from (the worker, or its fork server).
        self.parent_pid = parent_pid


def child_main(ctx: ChildContext, job: Job, report_fd: int, saved_mask: Any) -> NoReturn:
    """Run *job* in this freshly forked child and leave through ``os._exit``."""
    _leave_after(ctx, lambda: _run(
        job, report_fd, lambda: prepare_child(ctx, job, report_fd, saved_mask)))


def standby_main(ctx: ChildContext, sock: socket.socket, saved_mask: Any) -> NoReturn:
    """Set up now, wait for a job on *sock* (standby.py), run it, leave via ``os._exit``."""
    _leave_after(ctx, lambda: _serve_as_standby(ctx, sock, saved_mask))


def _serve_as_standby(ctx: ChildContext, sock: socket.socket, saved_mask: Any) -> int:
    prepare_process(ctx, {sock.fileno()}, saved_mask)
    titles.set_title(f"celery forkguard: standby ({ctx.hostname})")
    signals.worker_process_init.send(sender=ctx.hostname)
    handed = standby.receive_job(sock)
    sock.close()
    if handed is None:  # the fork server closed: no task for this one
        return EXIT_OK
    payload, report_fd = handed
    job = pickle.loads(payload)
    return _run(job, report_fd, lambda: prepare_for_job(ctx, job, report_fd))


def _leave_after(ctx: ChildContext, body: Callable[[], int]) -> NoReturn:
    """Run *body* for its exit code, then leave through ``os._exit``, whatever happens."""
    code = EXIT_CRASHED
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASHED
    except BaseException:
        _print_exception()
    finally:
        _leave(ctx, code)


def _run(job: Job, report_fd: int, prepare: Callable[[], None]) -> int:
    try:
        prepare()
    except Exception as exc:
        _report(report_fd, protocol.ERROR, exception_info(exc))
        return EXIT_SETUP_FAILED
    try:
        outcome = job.target(*job.args, **job.kwargs)
    except Exception as exc:
        # The tracer itself failed (unknown task, undecodable body, ...).
        kind, payload = protocol.ERROR, exception_info(exc)
    else:
        kind, payload = protocol.OUTCOME, outcome
    try:
        _report(report_fd, kind, payload)
    except OSError as exc:
        # The task closed or replaced our pipe: say so, the worker explains the code.
        _print_line(f"forkguard: could not send the task's outcome to the worker: {exc}")
        return EXIT_REPORT_LOST
    return EXIT_OK


def prepare_child(ctx: ChildContext, job: Job, report_fd: int, saved_mask: Any) -> None:
    """Make this process a clean, independent home for one task."""
    prepare_process(ctx, {report_fd}, saved_mask)
    prepare_for_job(ctx, job, report_fd)
    signals.worker_process_init.send(sender=ctx.hostname)


def prepare_process(ctx: ChildContext, keep_fds: set[int], saved_mask: Any) -> None:
    """What every child needs before any task: its own group, signals, fds, connections."""
    # Objects inherited from the master are never collected here: freezing
    # them keeps the collector from writing to (and so copying) their pages.
    gc.freeze()
    os.setpgrp()
    global _term_child
    _term_child = ctx.term_child
    install_child_signals()
    fasthooks.restore_signal_mask(saved_mask)
    _die_with_parent(ctx)
    detach_inherited_fds(keep=keep_fds)
    # A task writes no other child's intent (a stray write faults here instead).
    intents.shared().make_read_only()
    # kombu, Celery and the result backends drop inherited connections here.
    billiard_util._run_after_forkers()
    _set_task_join_will_block(True)


def prepare_for_job(ctx: ChildContext, job: Job, report_fd: int) -> None:
    """What depends on the task: its report pipe, its slot's name, its title."""
    os.set_blocking(report_fd, True)  # a report larger than the pipe waits for the worker
    name_process(job.slot)
    titles.set_child_title(ctx.hostname, job)


def name_process(slot: int) -> None:
    """``ForkPoolWorker-N`` in log records, as prefork's pool processes are named."""
    name = f"ForkPoolWorker-{slot or 1}"
    billiard_process.current_process().name = name
    stdlib_mp = sys.modules.get("multiprocessing")
    if stdlib_mp is not None:  # where logging reads %(processName)s from
        stdlib_mp.current_process().name = name


def install_child_signals() -> None:
    """Drop the inherited handlers; install the ones a running task needs."""
    signal.set_wakeup_fd(-1)
    for signum in fasthooks.python_handled_signals():
        fasthooks.set_handler(signum, signal.SIG_DFL)
    # The fork server ignores these; a task (and what it execs) gets the defaults.
    for signum in fasthooks.OPERATOR_SIGNALS:
        fasthooks.set_handler(signum, signal.SIG_DFL)
    # The worker decides about Ctrl-C; the task never sees it.
    fasthooks.set_handler(signal.SIGINT, signal.SIG_IGN)
    fasthooks.set_handler(signal.SIGTERM, _raise_term)
    fasthooks.set_handler(SOFT_TIMEOUT_SIGNAL, _raise_soft_time_limit)


_term_child = False


def _raise_term(signum: int, frame: FrameType | None) -> None:
    intent = intents.shared().get(os.getpid())
    if intent == intents.NONE and _term_child:
        return  # not from the worker: it will TERM us itself when it is time
    # Raise once: cleanup code in the task's except/finally is not interrupted again.
    fasthooks.set_handler(signal.SIGTERM, signal.SIG_DFL)
    if intent == intents.REVOKE:
        # revoke(terminate=True): die of the signal, as a prefork child does,
        # so Celery records the task as REVOKED rather than as a failure.
        os.kill(os.getpid(), signal.SIGTERM)
    reason = intents.REASONS.get(intent, intents.REASONS[intents.NONE])
    if intent == intents.SHUTDOWN_REQUEUE:
        raise TermRequeue(reason)
    raise TermException(reason)


def _raise_soft_time_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded()


def _die_with_parent(ctx: ChildContext) -> None:
    fasthooks.die_with_parent()
    # The parent may have died before the line above took effect.
    if os.getppid() != ctx.parent_pid:
        raise SystemExit(EXIT_ORPHANED)


def detach_inherited_fds(keep: set[int]) -> None:
    """Point every inherited socket, pipe and event fd at /dev/null.

    The numbers stay taken, so a stale object of the master's (a broker
    socket, the event loop's epoll) can neither talk on the master's stream
    nor close an fd this child opens later.  Regular files, directories and
    character devices (log files, ttys, /dev/urandom) are left alone.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _open_fds():
            if fd < 3 or fd in keep or fd == devnull:
                continue
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISCHR(mode):
                continue
            os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


def _open_fds() -> list[int]:
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(path))
        except OSError:
            continue
    return list(range(3, 256))


def _report(report_fd: int, kind: str, payload: Any) -> None:
    data = memoryview(protocol.encode_report(kind, payload))
    while data:
        written = os.write(report_fd, data)
        data = data[written:]


def _print_line(line: str) -> None:
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr, flush=True)


def _print_exception() -> None:
    try:
        import traceback

        traceback.print_exc()
    except BaseException:
        pass


def _leave(ctx: ChildContext, code: int) -> NoReturn:
    """Run the shutdown hooks, flush, and exit without the master's finalizers."""
    try:
        signals.worker_process_shutdown.send(
            sender=ctx.hostname, pid=os.getpid(), exitcode=code,
        )
    except BaseException:
        _print_exception()
    try:
        _flush_output()
    finally:
        os._exit(code)


def _flush_output() -> None:
    for handler in list(logging._handlerList):  # type: ignore[attr-defined]
        h = handler()
        if h is not None:
            with contextlib.suppress(Exception):
                h.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


