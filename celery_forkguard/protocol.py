"""What a child tells the master: one pickled report on its report pipe.

A report is ``(kind, payload)``: ``("outcome", (failed, retval, runtime))``
from Celery's tracer, or ``("error", ExceptionInfo)`` when the task could not
be run at all, preceded by its length: the worker knows it has the whole
report as soon as the last byte arrives, while the child is still exiting.
A child that dies before writing a whole report told nothing; the master
then records the task as lost, with the exit status it reaped.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from kombu.exceptions import EncodeError

from celery_forkguard.jobs import exception_info

OUTCOME = "outcome"
ERROR = "error"

Report = tuple[str, Any]
#: The pickle's length, before it.
HEADER = struct.Struct("!Q")


def encode_report(kind: str, payload: Any) -> bytes:
    """Pickle a report; a payload that can't be pickled becomes a clear error."""
    try:
        body = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        error = EncodeError(f"forkguard could not send the task's outcome to the worker: {exc!r}")
        body = pickle.dumps((ERROR, exception_info(error)), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def is_whole(data: bytes | bytearray) -> bool:
    """Whether *data* holds a report's every byte (it may still not decode)."""
    return len(data) >= HEADER.size and len(data) >= HEADER.size + HEADER.unpack_from(data)[0]


def decode_report(data: bytes) -> Report | None:
    """The report a child wrote, or ``None`` if it wrote nothing whole."""
    if not is_whole(data):
        return None
    try:
        report = pickle.loads(data[HEADER.size:HEADER.size + HEADER.unpack_from(data)[0]])
    except Exception:
        return None
    if isinstance(report, tuple) and len(report) == 2 and report[0] in (OUTCOME, ERROR):
        return report
    return None
