"""A task's child killed by the kernel's out-of-memory killer is recorded as such.

The worker runs in a memory cgroup of its own (created here under the test
process's own memory cgroup, v1 or v2) with a limit its children cannot
stay under; the task then allocates past it and the kernel kills the child.
Where this machine does not let the test make a cgroup (no permission, no
memory controller), the test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_forkguard.oom import CGROUP_ROOT

from . import proj
from .conftest import WorkerFactory, outcome, started_pid, wait_for

pytestmark = pytest.mark.timeout(120)

LIMIT_MIB = 400
ALLOCATE_MIB = 1024


def _own_memory_cgroup() -> tuple[Path, str]:
    """This process's memory cgroup directory and its version ("v1" or "v2")."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = Path(CGROUP_ROOT, path.lstrip("/"))
            if (v2 / "memory.max").exists() or (v2 / "cgroup.subtree_control").exists():
                return v2, "v2"
        elif "memory" in controllers.split(","):
            return Path(CGROUP_ROOT, "memory", path.lstrip("/")), "v1"
    raise FileNotFoundError("no memory cgroup in /proc/self/cgroup")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    try:
        parent, version = _own_memory_cgroup()
        cgroup = parent / f"forkguard-oom-{uuid.uuid4().hex[:8]}"
        cgroup.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    limit = str(LIMIT_MIB << 20)
    try:
        if version == "v1":
            (cgroup / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (cgroup / "memory.memsw.limit_in_bytes").write_text(limit)
        else:
            (cgroup / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):
                (cgroup / "memory.swap.max").write_text("0")
    except OSError as exc:
        cgroup.rmdir()
        pytest.skip(f"cannot limit a memory cgroup here: {exc}")
    yield cgroup
    # The worker has stopped (its factory's teardown ran first): the cgroup is empty.
    with contextlib.suppress(OSError):
        wait_for(lambda: not (cgroup / "cgroup.procs").read_text().strip(), timeout=10,
                 message="the cgroup to empty")
        cgroup.rmdir()


def test_oom_killed_child_is_recorded_as_an_oom_kill(
    memory_cgroup: Path, start_worker: WorkerFactory, evidence: proj.Evidence,
) -> None:
    enter = ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(memory_cgroup))
    worker = start_worker(concurrency=1, wrapper=enter)
    assert str(worker.proc.pid) in (memory_cgroup / "cgroup.procs").read_text().split()
    before = worker.stats()["pool"]["forkguard"]["kills"]["oom"]

    result = worker.send("allocate", ALLOCATE_MIB)
    started_pid(evidence, result.id)
    state, error = outcome(result, timeout=60)
    assert state == "FAILURE"
    assert type(error).__name__ == "WorkerLostError", repr(error)
    assert "signal 9 (SIGKILL); killed by the kernel's out-of-memory killer" in str(error)
    assert "oom_kill went up in" in str(error)
    assert "the kernel's out-of-memory killer killed" in worker.log()
    kills = worker.stats()["pool"]["forkguard"]["kills"]
    assert kills["oom"] == before + 1 and kills["lost"] == 0, kills

    # The worker serves on.
    assert outcome(worker.send("add", 2, 3)) == ("SUCCESS", 5)
    assert os.path.isdir(memory_cgroup)
