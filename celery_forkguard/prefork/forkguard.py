"""The ``forkguard`` pool: Celery's pool contract, one fresh fork per task.

See ``celery_forkguard/prefork/__init__.py`` for why the module is named so.
"""

from __future__ import annotations

import gc
import os
import warnings
from functools import partial
from typing import Any, Callable, Optional

from celery.concurrency.base import BasePool
from celery.utils.log import get_logger

from celery_forkguard import hugepages, immortal, intents, prometheus, stopping, warmup
from celery_forkguard.child import ChildContext, child_main
from celery_forkguard.drivers import HubDriver, ThreadDriver
from celery_forkguard.forking import Forker
from celery_forkguard.forkserver_client import ForkServerClient
from celery_forkguard.jobs import Job
from celery_forkguard.lifecycle import Child
from celery_forkguard.metrics import PoolMetrics
from celery_forkguard.settings import ForkguardSettings, load_settings
from celery_forkguard.spawning import Spawner
from celery_forkguard.starter_link import starter_link
from celery_forkguard.steps import install_consumer_step
from celery_forkguard.supervisor import Supervisor

__all__ = ["TaskPool"]

logger = get_logger(__name__)


class TaskPool(BasePool):
    """Run every task in a child forked from the worker, then let it exit."""

    uses_semaphore = True
    task_join_will_block = True
    body_can_be_buffer = False

    app: Any
    limit: int
    _supervisor: Supervisor | None = None
    _driver: HubDriver | ThreadDriver | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = (self.options.get("initargs") or (self.app,))[0] or self.app
        # Bad settings stop the worker here, before it takes any task.
        self.settings = load_settings(app.conf) if app is not None else ForkguardSettings()
        if self.settings.metrics_port:
            prometheus.check_available()
        if app is not None:
            install_consumer_step(app)
        # Take the starter's link (if any) out of the environment before the
        # fork server and the children copy it.
        starter_link()

    # -- life cycle --------------------------------------------------------------

    def on_start(self) -> None:
        app, hostname = self.options.get("initargs") or (self.app, None)
        self.app = app or self.app
        self.hostname = hostname or "celery@forkguard"
        self.soft_timeout = self.options.get("soft_timeout")
        self.timeout = self.options.get("timeout")
        self._semaphore = self.options.get("semaphore")
        prepare_master(
            self.app, self.hostname, self.settings.warm_up,
            immortalize=_wanted_and_supported(
                self.settings.immortalize, immortal.unsupported_reason,
                "the heap children fork from stays mortal"),
            huge_pages=_wanted_and_supported(
                self.settings.huge_pages, hugepages.unsupported_reason, "no huge pages"),
        )
        ctx = ChildContext(self.hostname, os.getpid(), self.settings.term_child,
                           standby_children=self._standby_children())
        self._supervisor = Supervisor(
            partial(self._make_spawner, ctx), self.limit or 1, on_job_done=self._on_job_done,
            spawn_timeout=self.settings.fork_server_timeout,
        )
        self._supervisor.memory_limit_kb = self.options.get("max_memory_per_child") or None
        self._supervisor.memory_check_interval = self.settings.memory_check_interval
        if self.options.get("threads", True):
            self._driver = ThreadDriver(self._supervisor)

    def _standby_children(self) -> int:
        """How many children the fork server keeps ready (see standby.py)."""
        if self.settings.standby_children and not self.settings.fork_server:
            logger.warning("forkguard: forkguard_standby_children needs the fork server "
                           "(forkguard_fork_server); no child is forked ahead")
            return 0
        return self.settings.standby_children

    def _make_spawner(self, ctx: ChildContext) -> Spawner:
        if self.settings.fork_server:
            server = ForkServerClient(ctx)
            server.start()
            return server
        return Forker(partial(child_main, ctx))

    def register_with_event_loop(self, loop: Any) -> None:
        assert self._supervisor is not None
        self._driver = HubDriver(self._supervisor, loop)

    def did_start_ok(self) -> bool:
        return self._supervisor is not None

    def on_stop(self) -> None:
        """Warm shutdown: every task the pool accepted runs to its end.

        Celery 5.5's cold shutdown calls this from its signal handler, which
        may have interrupted the pool itself: then nothing is done here (no
        logging either, in a signal handler) and the pool ends when Celery
        terminates it, as soon as the handler has returned.
        """
        if self._driver is not None and not self._driver.drain():
            return
        self._close()

    def on_terminate(self) -> None:
        """Cold shutdown: kill the children; record or requeue their tasks."""
        if self._supervisor is not None and self._driver is not None:
            self.stop_running(stopping.cold_shutdown, again=True)
            # Jobs never started were never acked: the broker redelivers them.
            self._driver.call(self._supervisor.withdraw_queued)
            self._driver.call(self._supervisor.kill_lingering)
            if not self._driver.drain():
                return  # from a signal handler inside the pool: see on_stop
        self._close()

    def on_close(self) -> None:
        pass

    def _close(self) -> None:
        if self._driver is not None:
            self._driver.close()
        if self._supervisor is not None:
            self._supervisor.close()
        self._supervisor = None
        self._driver = None

    def restart(self) -> None:
        """``pool_restart``: children fork from the reloaded worker from now on.

        With the fork server, a new server (a copy of the reloaded worker)
        forks every child from now on; the old one lives until its last
        running child ends.  Without it, children fork from the worker
        itself and see the reload at once.
        """
        if self._driver is not None and self._supervisor is not None:
            self._driver.call(self._supervisor.restart_spawner)

    def flush(self) -> None:
        """The broker connection was lost: drop the jobs still waiting for a slot.

        Celery calls this as it clears its semaphore; their messages were
        never acked (they cannot be any more) and the broker delivers them
        again, so running them too would run them twice.
        """
        if self._driver is not None and self._supervisor is not None:
            dropped = self._driver.call_sync(self._supervisor.withdraw_queued)
            for job in dropped:
                # Celery reset the semaphore itself: only our own count goes down.
                self._on_job_done(job, release=False)
            if dropped:
                logger.warning(
                    "forkguard: connection lost: %d queued task(s) left to the broker to "
                    "deliver again", len(dropped),
                )

    def withdraw_queued(self) -> set[str]:
        """Take the jobs still waiting for a slot out of the pool (for a pause).

        Their semaphore slots are released; the caller hands their requests
        back to the broker.  Returns their task ids.
        """
        if self._driver is None or self._supervisor is None:
            return set()
        jobs = self._driver.call_sync(self._supervisor.withdraw_queued)
        for job in jobs:
            self._on_job_done(job)
        return {str(job.task_id) for job in jobs}

    def held_task_ids(self) -> set[str]:
        """Ids of every task the pool holds: being forked, running, or queued."""
        if self._driver is None or self._supervisor is None:
            return set()
        return set(self._driver.call_sync(self._supervisor.task_ids))

    # -- tasks ---------------------------------------------------------------------

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple | list | None = None,
        kwargs: dict | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        waitforslot: bool | None = None,
        **_: Any,
    ) -> Job | None:
        if self._driver is None:
            # Stopped (a cold shutdown) while messages were still arriving: the
            # message is not acked, so the broker delivers it again elsewhere.
            logger.warning("forkguard: the pool is stopped; task %s is left to the broker",
                           correlation_id)
            return None
        job = Job(
            target, args or (), kwargs,
            callback=callback, error_callback=error_callback,
            accept_callback=accept_callback, timeout_callback=timeout_callback,
            soft_timeout=self.soft_timeout if soft_timeout is None else soft_timeout,
            timeout=self.timeout if timeout is None else timeout,
            correlation_id=correlation_id,
        )
        job.propagate = tuple(self.callbacks_propagate or ())
        task = self.app.tasks.get(job.task_name) if self.app else None
        job.acks_late = bool(getattr(task, "acks_late", False))
        self._driver.submit(job, block=bool(waitforslot))
        return job

    def _on_job_done(self, job: Job, release: bool = True) -> None:
        if release and self._semaphore is not None:
            self._semaphore.release()
        if isinstance(self._driver, ThreadDriver):
            self._driver.job_done(job)

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        if self._driver is not None and self._supervisor is not None:
            self._driver.call(self._supervisor.terminate_job, pid, signal)

    def running(self) -> list[Child]:
        """A snapshot of the running children (safe from any thread)."""
        return self._supervisor.running() if self._supervisor else []

    def claimed(self) -> list[Child]:
        """A snapshot of every slot's child, forked or still being forked."""
        return self._supervisor.claimed() if self._supervisor else []

    def stop_running(self, planner: stopping.Planner, *, again: bool = False) -> list[str]:
        """Stop the running tasks *planner* picks; return their task ids.

        Children already being stopped are left to that (their KILL is
        scheduled) unless *again* (a cold shutdown KILLs them now).
        """
        plans = []
        for child in self.claimed():
            if child.kill_error is not None and not again:
                continue
            plan = planner(child.job)
            if plan is not None:
                plans.append((child, plan))
        if plans and self._driver is not None:
            self._driver.call(self._apply_stop_plans, plans, again)
        return [str(child.job.task_id) for child, _ in plans]

    def _apply_stop_plans(self, plans: list[tuple[Child, stopping.StopPlan]], again: bool) -> None:
        assert self._supervisor is not None
        for child, plan in plans:
            self._supervisor.stop_child(
                child, term_timeout=plan.term_timeout, kill_error=plan.kill_error,
                term_error=plan.term_error, intent=plan.intent, again=again,
            )

    # -- sizing (pool_grow / pool_shrink / --autoscale) ----------------------------

    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(self.limit - n)

    def _resize(self, limit: int) -> None:
        limit = max(1, limit)
        delta, self.limit = limit - self.limit, limit
        if self._semaphore is not None and delta:
            (self._semaphore.grow if delta > 0 else self._semaphore.shrink)(abs(delta))
        if self._driver is not None and self._supervisor is not None:
            self._driver.call(self._supervisor.resize, limit)
            if isinstance(self._driver, ThreadDriver):
                self._driver.slots_changed()

    @property
    def num_processes(self) -> int:
        return int(self.limit or 0)

    # -- inspect stats ---------------------------------------------------------------

    def measures(self) -> tuple[PoolMetrics, dict[str, int], int, int] | None:
        """The measures, counts, running children and queued tasks (any thread)."""
        supervisor = self._supervisor
        if supervisor is None:
            return None
        return (supervisor.metrics, dict(supervisor.counts), len(supervisor.running()),
                len(supervisor.pending))

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        supervisor = self._supervisor
        running = supervisor.running() if supervisor else []
        now = supervisor.clock() if supervisor else 0.0
        info.update({
            "max-concurrency": self.limit,
            "processes": [child.pid for child in running],
            "max-tasks-per-child": 1,
            "put-guarded-by-semaphore": self.putlocks,
            "timeouts": (self.soft_timeout or 0, self.timeout or 0),
            "children": [child.describe(now) for child in running],
            "queued": len(supervisor.pending) if supervisor else 0,
            "counts": dict(supervisor.counts) if supervisor else {},
            "forkguard": supervisor.metrics.as_dict() if supervisor else {},
        })
        return info


def _wanted_and_supported(wanted: bool, unsupported_reason: Callable[[], Optional[str]],
                          if_not: str) -> bool:
    """Whether a setting that is on also applies here (immortal.py, hugepages.py)."""
    if not wanted:
        return False
    reason = unsupported_reason()
    if reason is not None:
        logger.debug("forkguard: %s: %s", if_not, reason)
        return False
    return True


def prepare_master(app: Any, hostname: str, warm_up: bool = True,
                   immortalize: bool = False, huge_pages: bool = False) -> None:
    """Do once, in the master, what prefork does in every child.

    Tracers are built here so each child inherits them instead of building
    them per task, and (*warm_up*) run once with the C library's resolver,
    so children share that code warm (warmup.py); the heap is made immortal
    (*immortalize*, immortal.py) so that neither the children nor the fork
    server nor the master itself write reference counts into the pages they
    share, and frozen so the master's collector leaves them alone, then
    (*huge_pages*) backed by huge pages where it is dense, so forks copy
    fewer page-table entries (hugepages.py); the intents page is mapped
    before any fork.
    """
    from celery.app.trace import build_tracer

    for name, task in app.tasks.items():
        task.__trace__ = build_tracer(name, task, app.loader, hostname, app=app)
    intents.shared()
    if warm_up:
        warmup.warm_up_resolver()
        if not warmup.warm_up(app, hostname):
            logger.debug("forkguard: the tracer warm-up did not run; children trace cold")
    # We fork knowingly from a process that may run threads (Celery's timer,
    # our supervisor); the child runs no other thread's code.
    warnings.filterwarnings(
        "ignore", message=r".*use of fork\(\) may lead to deadlocks.*", category=DeprecationWarning,
    )
    gc.collect()
    if immortalize:
        gc.unfreeze()  # frozen objects are not listed, and would stay mortal
        marked = immortal.immortalize_heap()
        logger.debug("forkguard: %d objects made immortal before the first fork", marked)
    gc.freeze()
    if huge_pages:
        _collapse_into_huge_pages()


def _collapse_into_huge_pages() -> None:
    """hugepages.collapse_heap, which only ever costs the speed-up if it fails."""
    try:
        done = hugepages.collapse_heap()
    except Exception as exc:  # an odd /proc or C library: fork as before
        logger.warning("forkguard: huge pages skipped: %r", exc)
        return
    logger.debug("forkguard: %d MiB collapsed into huge pages (%d stretches sparse, "
                 "%d refused)", done.collapsed >> 20, done.sparse, done.refused)
