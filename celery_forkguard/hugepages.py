"""Back the worker's populated heap with huge pages before the first fork.

``fork()`` copies the page tables of everything the forking process maps:
for a worker with a large preloaded app that is most of a fork's cost, paid
by the fork server for every task.  Memory backed by a transparent huge page
(2 MiB on x86-64) takes one page-table entry instead of 512, so the fork
server, forked from the worker afterwards, forks faster.  Once, before the
first fork, the worker asks the kernel (``MADV_COLLAPSE``, Linux 6.1+) to
back each aligned 2 MiB stretch of its anonymous memory that is already
almost all resident with one huge page.

Why only "almost all resident": a collapse fills the stretch, so a sparse
one (an idle thread's stack, a half-used arena) would grow the worker's
memory; at least 95% resident bounds that growth to a twentieth.  Why no
``MADV_HUGEPAGE``: it would make later faults in those mappings allocate
whole huge pages, growing the worker as it runs.  A child (or the worker)
that writes to a shared huge page copies only the 4 KiB it writes, as
before.  Where the kernel has no ``MADV_COLLAPSE``, transparent huge pages
are off (``never``) or the process opted out (``PR_SET_THP_DISABLE``), it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MADV_COLLAPSE = 25  # Linux 6.1, <asm-generic/mman-common.h>
MIN_RESIDENT = 0.95
THP = Path("/sys/kernel/mm/transparent_hugepage")


@dataclass
class Collapsed:
    """What a pass did: bytes now in huge pages, stretches skipped or refused."""

    collapsed: int = 0
    sparse: int = 0
    refused: int = 0


def unsupported_reason() -> Optional[str]:
    """Why this system cannot take it, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} has no transparent huge pages"
    release = os.uname().release
    version = re.match(r"(\d+)\.(\d+)", release)
    if version and (int(version[1]), int(version[2])) < (6, 1):
        return f"Linux {release} has no MADV_COLLAPSE (6.1+)"
    try:
        enabled = (THP / "enabled").read_text()
    except OSError:
        return "the kernel has no transparent huge pages"
    if "[never]" in enabled:
        return "transparent huge pages are off ([never])"
    return None


def huge_page_size() -> int:
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def collapse_heap() -> Collapsed:
    """Collapse every aligned, mostly resident stretch of anonymous memory.

    A mapping the kernel will not collapse (``EINVAL``: a kernel before 6.1,
    or a mapping that opted out) is left at its first stretch; other
    refusals (no huge page free) skip that stretch only.
    """
    libc = _libc()
    size = huge_page_size()
    done = Collapsed()
    vec = (ctypes.c_ubyte * (size // mmap.PAGESIZE))()
    for start, end in _anonymous_regions():
        for chunk in range(_align_up(start, size), end - size + 1, size):
            if libc.mincore(chunk, size, vec) != 0 or _resident_share(vec) < MIN_RESIDENT:
                done.sparse += 1
                continue
            if libc.madvise(chunk, size, MADV_COLLAPSE) == 0:
                done.collapsed += size
                continue
            done.refused += 1
            if ctypes.get_errno() == errno.EINVAL:
                break
    return done


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _anonymous_regions() -> Iterator[tuple[int, int]]:
    """(start, end) of the private, writable mappings backed by no file."""
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) > 5 else ""
        if fields[1] != "rw-p" or (path and path != "[heap]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        yield start, end


def _align_up(address: int, size: int) -> int:
    return (address + size - 1) & ~(size - 1)


def _resident_share(vec: ctypes.Array) -> float:
    return sum(byte & 1 for byte in vec) / len(vec)
