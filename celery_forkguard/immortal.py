"""Make the worker's heap immortal before the first fork, so nobody dirties it.

Every object a child touches gets its reference count written, and each
first write to a page the child shares with the process it was forked from
copies that page (a copy-on-write fault, 3-10 µs on a VM): a Celery child
pays hundreds of them just for counts of objects it only reads.  CPython
3.12 made some objects *immortal* (PEP 683): their count is a marker value
that increments and decrements leave alone.  So once, before the first fork,
the worker gives that marker to every object it holds (the garbage
collector's objects and what they refer to).  The fork server and every
child then share those pages with the worker, and none of the three copies
one just to count a reference: fewer faults per child, and less of the
worker's memory duplicated in the fork server as the worker runs.

The marker is read from ``None`` (immortal on these versions), and it also
marks an object already visited: no side table, which would itself cost
memory.  Only where the rule is known: CPython 3.12 and 3.13, 64-bit, with
the GIL (3.14 and the free-threaded build count differently).

What it costs: an object that exists at pool start is never freed, in the
worker or below it.  A worker frees few of them (a run of 630 tasks freed
124 of the 29,314 that can be weakly referenced: bound methods and
functions, no socket or file), and what it holds then is held once.
``sys.getrefcount`` reports the marker for such objects, so code that
decides by reference counts (``numpy.ndarray.resize`` on an array made at
import) sees them as shared.  Marking walks the whole heap once: about a
second of start-up per 150 MB of objects.  Opt out with
``forkguard_immortalize = False``.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import sysconfig
from typing import Optional


def unsupported_reason() -> Optional[str]:
    """Why this interpreter cannot take it, or None when it can."""
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if sys.version_info[:2] not in ((3, 12), (3, 13)):
        return f"Python {sys.version_info[0]}.{sys.version_info[1]} (needs 3.12 or 3.13)"
    if sys.maxsize <= 2**32:
        return "a 32-bit build"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "a free-threaded build"
    return None


def immortalize_heap() -> int:
    """Give every object the collector knows of, and their referents, the marker.

    Returns how many objects were marked.  The worker runs it once, after a
    collection and right before the first fork, then freezes the heap
    (``gc.freeze``) so that its collector leaves those pages alone too.
    """
    marker = ctypes.c_ssize_t.from_address(id(None)).value
    marked = 0
    for obj in gc.get_objects():
        marked += _mark(obj, marker)
        for referent in gc.get_referents(obj):
            marked += _mark(referent, marker)
    return marked


def _mark(obj: object, marker: int) -> int:
    count = ctypes.c_ssize_t.from_address(id(obj))
    if count.value == marker:
        return 0
    count.value = marker
    return 1
