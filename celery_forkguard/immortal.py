"""Make the fork server's heap immortal, so children stop dirtying its pages.

Every object a child touches gets its reference count written, and each
first write to a page the child shares with the fork server copies that
page (a copy-on-write fault, 3-10 µs on a VM): a Celery child pays about a
thousand of them, most for reference counts of objects it only reads.
CPython 3.12 made some objects *immortal* (PEP 683): their count is a marker
value that increments and decrements leave alone.  So once at start the fork
server gives that marker to every object it holds (the garbage collector's
objects and what they refer to), and children fork from an immortal heap.

The marker is read from ``None`` (immortal on these versions), and it also
marks an object already visited: no side table, which would itself cost
memory in every child.  Only where the rule is known: CPython 3.12 and 3.13,
64-bit, with the GIL (3.14 and the free-threaded build count differently).
An immortal object is never freed in the fork server (which frees almost
nothing anyway) and ``sys.getrefcount`` reports the marker for it: code that
checks reference counts on inherited objects (``numpy.ndarray.resize``) sees
them as shared.  Marking writes every page of the fork server's heap, so the
server gets a private copy of it (the worker keeps its own): more memory for
a large app, and a longer start.  Hence opt-in: ``forkguard_immortalize``.
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

    Returns how many objects were marked.  Run it with the collector off, in a
    process that only forks from now on (the fork server).
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
