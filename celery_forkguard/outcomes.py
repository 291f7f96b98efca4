"""The errors recorded for a task whose child ended without a whole report.

A child's exit code is the protocol when there is no report: the named codes
below say what went wrong in forkguard's own code; anything else is the
task's doing (or the program it exec'd), and the message says so.
"""

from __future__ import annotations

from billiard.common import human_status
from billiard.exceptions import WorkerLostError

from celery_forkguard.jobs import Job

#: Named exit codes of a child.
EXIT_OK = 0
EXIT_SETUP_FAILED = 70  # could not prepare the child (the report says why)
EXIT_CRASHED = 71  # forkguard's own code in the child failed
EXIT_ORPHANED = 72  # the worker was already gone when the child started
EXIT_REPORT_LOST = 73  # the task ran, but its outcome could not be sent

HINTS = {
    EXIT_OK: "the task's process exited without reporting an outcome: did the task "
             "call os.exec*() or os._exit()?",
    EXIT_CRASHED: "forkguard's code in the task's process failed (see the worker's log)",
    EXIT_ORPHANED: "the worker was gone before the task's process started",
    EXIT_REPORT_LOST: "the task ran, but its process could not send the outcome to the "
                      "worker: did the task close file descriptors it did not open?",
}


def worker_lost(code: int, job: Job) -> WorkerLostError:
    """The error Celery records for a child that died without reporting.

    The text starts as prefork's does (``Worker exited prematurely: signal 9
    (SIGKILL) Job: ...``) so that what users grep for still matches.
    """
    hint = HINTS.get(code)
    status = human_status(code) + (f"; {hint}" if hint else "")
    return WorkerLostError(f"Worker exited prematurely: {status} Job: {job.task_id}.")


def oom_killed(job: Job, where: str) -> WorkerLostError:
    """The error for a child the kernel's out-of-memory killer took (see ``oom``)."""
    return WorkerLostError(
        f"Worker exited prematurely: signal 9 (SIGKILL); killed by the kernel's "
        f"out-of-memory killer (oom_kill went up in {where}) Job: {job.task_id}."
    )


def server_lost(why: str, job: Job) -> WorkerLostError:
    """The error for a task whose child was killed because its fork server was lost."""
    return WorkerLostError(
        f"Worker exited prematurely: the fork server {why} and was killed, and the "
        f"task's process with it (SIGKILL) Job: {job.task_id}."
    )
