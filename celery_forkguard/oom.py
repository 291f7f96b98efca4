"""Telling the kernel's out-of-memory killer from any other SIGKILL.

A child killed by the OOM killer dies of SIGKILL like one killed by hand.
The kernel counts its OOM kills per memory cgroup (``oom_kill`` in
``memory.events`` on cgroup v2, in ``memory.oom_control`` on v1, Linux
4.13+), and a forked child stays in its worker's cgroup: when a child dies
of SIGKILL that nobody here sent and that count went up since it was last
read, the OOM killer took it.  (Another process of the same cgroup killed
at the same moment would be counted too; the error says what was read.)
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

CGROUP_ROOT = "/sys/fs/cgroup"


def memory_events_path(proc_cgroup: str = "/proc/self/cgroup",
                       root: str = CGROUP_ROOT) -> Optional[str]:
    """The file with this process's cgroup ``oom_kill`` count, or None."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (unified)
            candidate = os.path.join(root, path.lstrip("/"), "memory.events")
        elif "memory" in controllers.split(","):  # v1
            candidate = os.path.join(root, "memory", path.lstrip("/"), "memory.oom_control")
        else:
            continue
        if os.path.exists(candidate):
            return candidate
    return None


def read_oom_kills(path: str) -> Optional[int]:
    """The ``oom_kill`` count in *path*, or None when it cannot be read."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return None


class OomWatch:
    """How many OOM kills the worker's cgroup saw since the last look."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path if path is not None else memory_events_path()
        self._seen = read_oom_kills(self.path) if self.path else None

    def new_kills(self) -> int:
        if self.path is None:
            return 0
        now = read_oom_kills(self.path)
        if now is None:
            return 0
        new = now - (self._seen if self._seen is not None else now)
        self._seen = now
        return max(0, new)
