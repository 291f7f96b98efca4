"""Child hygiene under ``-P forkguard``, proven by what the children report.

A child must start clean: its own process group, Celery's per-process
initialisation run, none of the worker's sockets, handlers or random state.
While it runs it is visible (process title, ``inspect stats``); at worker
shutdown it either finishes (warm) or is killed and its task ended the way
Celery's prefork ends it (cold), and no process is left either way.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import celery
import pytest

from . import proj
from .conftest import Worker, WorkerFactory, outcome, pid_alive, started_pid, wait_for

#: O_CLOEXEC as /proc/<pid>/fdinfo/<fd> shows it in its octal "flags" field.
O_CLOEXEC_FDINFO = 0o2000000


# Worker boot (module fixtures) counts against the first test of each broker.
pytestmark = pytest.mark.timeout(90)


#: How the worker forks its children (forkguard_fork_server, forkguard_standby_children):
#: every way must be clean.
FORK_MODES = {
    "fork-server": {"FORKGUARD_FORK_SERVER": "1"},
    "in-worker": {"FORKGUARD_FORK_SERVER": "0"},
    # Children forked ahead of their task and handed it when it comes (standby.py).
    "standby": {"FORKGUARD_FORK_SERVER": "1", "FORKGUARD_STANDBY_CHILDREN": "2"},
}


@pytest.fixture(scope="module", params=sorted(FORK_MODES))
def fork_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def worker(start_module_worker: WorkerFactory, fork_mode: str) -> Worker:
    return start_module_worker(env=FORK_MODES[fork_mode], concurrency=2)


def probe(worker: Worker) -> dict[str, Any]:
    """What a fresh child saw of itself, from inside its task body."""
    result = worker.send("probe_child")
    state, report = outcome(result)
    assert state == "SUCCESS", report
    return {**report, "task_id": result.id}


def finish(worker: Worker, task_id: str) -> None:
    """Stop a long task the test no longer needs, and wait until it ended."""
    worker.revoke(task_id, terminate=True)
    wait_for(lambda: worker.app.AsyncResult(task_id).ready(), timeout=15,
             message=f"task {task_id} to end")


# -- what a child starts with ----------------------------------------------------------------


def test_worker_process_init_runs_in_the_child(worker: Worker,
                                               evidence: proj.Evidence) -> None:
    report = probe(worker)
    assert report["pid"] != worker.pid
    assert report["init_pid"] == report["pid"]
    recorded = evidence.fields(report["task_id"])
    assert recorded == {"pid": str(report["pid"]), "init_pid": str(report["pid"])}


def test_child_leads_its_own_process_group(worker: Worker) -> None:
    report = probe(worker)
    assert worker.is_fork_parent(report["ppid"]), report
    assert report["pgrp"] == report["pid"]
    assert os.getpgid(worker.pid) != report["pgrp"]


def assert_holds_only_its_report_pipe(fds: list[dict[str, Any]]) -> None:
    assert [fd for fd in fds if fd["kind"] == "socket"] == []
    # Nor the worker's event loop, nor the report pipes of its siblings:
    # the one pipe left is the child's own report pipe.
    assert [fd for fd in fds if fd["target"].startswith("anon_inode:")] == []
    assert len([fd for fd in fds if fd["kind"] == "pipe"]) == 1, fds


def test_child_holds_no_inherited_sockets(worker: Worker) -> None:
    assert_holds_only_its_report_pipe(probe(worker)["fds"])
    if worker.broker.fs_dir is None:
        # The worker does hold sockets (its broker connection): they were detached.
        assert any(t.startswith("socket:") for t in _fd_targets(worker.pid).values())


def test_children_forked_in_a_burst_hold_no_pipe_of_a_sibling(worker: Worker) -> None:
    # Requests that reach the fork server together: the child forked for one
    # must not keep the report pipe that came with the next.
    results = [worker.send("probe_child") for _ in range(12)]
    for result in results:
        state, report = outcome(result)
        assert state == "SUCCESS", report
        assert_holds_only_its_report_pipe(report["fds"])


def test_children_do_not_share_random_state(worker: Worker) -> None:
    first, second = probe(worker), probe(worker)
    assert first["pid"] != second["pid"]
    assert first["random"] != second["random"]


def test_worker_signal_handlers_are_not_inherited(worker: Worker) -> None:
    # Nor the fork server's SIG_IGN for them, which would even survive exec.
    handlers = probe(worker)["handlers"]
    assert {name: handlers[name] for name in ("SIGUSR2", "SIGHUP", "SIGQUIT")} == {
        "SIGUSR2": "SIG_DFL", "SIGHUP": "SIG_DFL", "SIGQUIT": "SIG_DFL",
    }


def test_task_signal_handlers_are_installed(worker: Worker) -> None:
    handlers = probe(worker)["handlers"]
    # Ctrl-C is for the worker; SIGTERM and SIGUSR1 (soft limit) reach the task.
    assert handlers["SIGINT"] == "SIG_IGN"
    assert handlers["SIGTERM"] == "callable"
    assert handlers["SIGUSR1"] == "callable"


# -- a running child is visible --------------------------------------------------------------


def test_running_child_title_names_its_task(worker: Worker, evidence: proj.Evidence) -> None:
    result = worker.send("sleeper", 60)
    pid = started_pid(evidence, result.id)
    expected = f"processing {proj.task_name('sleeper')}[{result.id}] since"
    try:
        title = wait_for(lambda: expected in _cmdline(pid) and _cmdline(pid),
                         message=f"the title of child {pid}")
        assert title.startswith("celery forkguard: ")
        assert title.endswith(f"({worker.hostname})")
    finally:
        finish(worker, result.id)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_inspect_stats_lists_the_running_child(worker: Worker, evidence: proj.Evidence) -> None:
    result = worker.send("sleeper", 60)
    pid = started_pid(evidence, result.id)
    try:
        pool = wait_for(lambda: _pool_stats_with(worker, pid), message="stats listing the child")
        [child] = [c for c in pool["children"] if c["pid"] == pid]
        assert child["task_id"] == result.id
        assert child["name"] == proj.task_name("sleeper")
        assert isinstance(child["runtime"], (int, float)) and child["runtime"] >= 0
        assert pid in pool["processes"]
        # The child left the worker's process group, not its session: teardown sees it.
        assert pid in worker.session_pids()
    finally:
        finish(worker, result.id)


def _pool_stats_with(worker: Worker, pid: int) -> dict[str, Any] | None:
    pool = worker.stats().get("pool", {})
    return pool if pid in pool.get("processes", ()) else None


def test_worker_fds_are_close_on_exec(worker: Worker, evidence: proj.Evidence) -> None:
    # A running child gives the worker its per-child fds (report pipe, pidfd) too.
    result = worker.send("sleeper", 60)
    started_pid(evidence, result.id)
    try:
        targets = _fd_targets(worker.pid)
        watched = {fd: t for fd, t in targets.items()
                   if fd > 2 and t.startswith(("socket:", "pipe:", "anon_inode:"))}
        assert any(t.startswith("pipe:") for t in watched.values()), targets
        if worker.broker.fs_dir is None:
            assert any(t.startswith("socket:") for t in watched.values()), targets
        inheritable = {fd: t for fd, t in watched.items()
                       if not _fd_flags(worker.pid, fd) & O_CLOEXEC_FDINFO}
        assert inheritable == {}
    finally:
        finish(worker, result.id)


def _fd_targets(pid: int) -> dict[int, str]:
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
    return targets


def _fd_flags(pid: int, fd: int) -> int:
    try:
        text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    except FileNotFoundError:
        return O_CLOEXEC_FDINFO  # closed since it was listed: nothing to inherit
    flags = next(line for line in text.splitlines() if line.startswith("flags:"))
    return int(flags.split()[1], 8)


# -- shutdown --------------------------------------------------------------------------------


def test_warm_shutdown_lets_the_running_task_finish(
    start_worker: WorkerFactory, evidence: proj.Evidence, fork_mode: str,
) -> None:
    worker = start_worker(env=FORK_MODES[fork_mode], concurrency=1)
    result = worker.send("sleeper", 2)
    pid = started_pid(evidence, result.id)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait_exit(timeout=30) == 0, worker.log()
    assert outcome(result) == ("SUCCESS", "slept 2")
    assert "finished" in evidence.fields(result.id)
    assert not pid_alive(pid)
    assert worker.session_pids() == []


#: Celery 5.5 made cold shutdown cancel the running tasks first (state RETRY,
#: "cancelled by Celery"); before, the pool's terminate() lost them (FAILURE).
COLD_SHUTDOWN_CANCELS = celery.VERSION >= (5, 5)


def test_cold_shutdown_ends_the_running_task_as_prefork_does(
    start_worker: WorkerFactory, evidence: proj.Evidence, fork_mode: str,
) -> None:
    worker = start_worker(env=FORK_MODES[fork_mode], concurrency=1)
    result = worker.send("sleeper", 60)
    pid = started_pid(evidence, result.id)
    os.kill(worker.pid, signal.SIGQUIT)
    worker.wait_exit(timeout=30)
    # The worker has exited: whatever it was going to store is stored.
    meta = worker.app.backend.get_task_meta(result.id, cache=False)
    if COLD_SHUTDOWN_CANCELS and worker.broker.fs_dir is None:
        assert meta["status"] == "RETRY", meta
        assert type(meta["result"]).__name__ == "Retry", meta
        assert evidence.events(result.id) == [f"retry:{worker.pid}"]
    elif COLD_SHUTDOWN_CANCELS:
        # Without an event loop the child's death is handled in a thread, racing
        # the shutdown handler that marks the task cancelled: Celery's prefork
        # ends such a task either way too, only less often REVOKED.
        assert meta["status"] in ("RETRY", "REVOKED"), meta
    else:
        assert meta["status"] == "FAILURE", meta
        assert type(meta["result"]).__name__ == "WorkerLostError", meta
        assert "SIGKILL" in str(meta["result"])
    assert "finished" not in evidence.fields(result.id)
    wait_for(lambda: not pid_alive(pid), message=f"child {pid} to be gone")
    assert worker.session_pids() == []


# -- what the pool measures ------------------------------------------------------------------


def _measures(worker: Worker) -> dict[str, Any]:
    return dict(worker.stats()["pool"]["forkguard"])


def test_inspect_stats_measures_children_and_counts_kills_by_reason(
    worker: Worker, evidence: proj.Evidence,
) -> None:
    before = _measures(worker)
    for n in range(3):
        assert outcome(worker.send("add", n, 1)) == ("SUCCESS", n + 1)
    assert outcome(worker.send("hard_limited", 30))[0] == "FAILURE"
    assert outcome(worker.send("segfault"))[0] == "FAILURE"
    running = worker.send("sleeper", 60)
    started_pid(evidence, running.id)
    finish(worker, running.id)

    def grown() -> dict[str, Any] | None:
        after = _measures(worker)
        return after if after["child_cpu_seconds"]["count"] >= (
            before["child_cpu_seconds"]["count"] + 6) else None

    after = wait_for(grown, timeout=15, message="six more children measured")
    latency = after["fork_latency_seconds"]
    assert latency["count"] >= before["fork_latency_seconds"]["count"] + 6
    assert 0 < latency["p50"] <= latency["max"] < 10
    cpu = after["child_cpu_seconds"]
    assert 0 < cpu["p50"] <= cpu["max"]
    # A Celery child's peak resident memory: tens of MiB, never zero.
    rss = after["child_peak_rss_kib"]
    assert 5_000 < rss["p50"] <= rss["max"]
    kills = after["kills"]
    for reason in ("time_limit", "revoke", "lost"):
        assert kills[reason] == before["kills"][reason] + 1, (reason, before, after)
    assert kills["oom"] == before["kills"]["oom"]


def test_children_fork_from_an_immortal_heap_where_python_allows(worker: Worker) -> None:
    from celery_forkguard.immortal import unsupported_reason

    report = probe(worker)
    immortal = report["app_refcount"] == report["none_refcount"]
    # The worker marks its heap before the first fork, whoever forks the children,
    # and only where the rule is known (CPython 3.12 and 3.13).
    assert immortal == (unsupported_reason() is None), report


def _anon_huge_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_the_fork_server_forks_from_huge_pages_where_the_kernel_allows(
    start_worker: WorkerFactory,
) -> None:
    from celery_forkguard.hugepages import unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(reason)
    # An app that loaded 32 MiB of data at import and only reads it.
    worker = start_worker(env={"FORKGUARD_FORK_SERVER": "1", "FORKGUARD_IT_PRELOAD_MB": "32"},
                          concurrency=1)
    assert outcome(worker.send("add", 1, 2))[0] == "SUCCESS"
    # The worker collapsed its dense memory right before it forked the fork server,
    # which still maps as huge pages what nobody wrote since (hugepages.py): each
    # fork copies one page-table entry for 2 MiB of it instead of 512.
    servers = [pid for pid in worker.session_pids()
               if b"fork server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    assert _anon_huge_kib(servers[0]) >= 24 << 10


def test_the_heap_stays_mortal_when_told_to(start_worker: WorkerFactory) -> None:
    worker = start_worker(env={"FORKGUARD_IMMORTALIZE": "0"}, concurrency=1)
    report = probe(worker)
    assert report["app_refcount"] < report["none_refcount"], report
