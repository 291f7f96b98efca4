"""What a child tells the master: one pickled report on its report pipe.

A report is ``(kind, payload)``: ``("outcome", (failed, retval, runtime))``
from Celery's tracer, or ``("error", ExceptionInfo)`` when the task could not
be run at all.  A child that dies before writing a whole report told nothing;
the master then records the task as lost, with the exit status it reaped.
"""

from __future__ import annotations

import pickle
from typing import Any

from kombu.exceptions import EncodeError

from celery_forkguard.jobs import exception_info

OUTCOME = "outcome"
ERROR = "error"

Report = tuple[str, Any]


def encode_report(kind: str, payload: Any) -> bytes:
    """Pickle a report; a payload that can't be pickled becomes a clear error."""
    try:
        return pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        error = EncodeError(f"forkguard could not send the task's outcome to the worker: {exc!r}")
        return pickle.dumps((ERROR, exception_info(error)), protocol=pickle.HIGHEST_PROTOCOL)


def decode_report(data: bytes) -> Report | None:
    """The report a child wrote, or ``None`` if it wrote nothing whole."""
    if not data:
        return None
    try:
        report = pickle.loads(data)
    except Exception:
        return None
    if isinstance(report, tuple) and len(report) == 2 and report[0] in (OUTCOME, ERROR):
        return report
    return None
