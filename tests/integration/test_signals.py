"""Resque's signals on real ``-P forkguard`` workers, on Redis and RabbitMQ.

USR1 kills the running tasks, USR2 pauses (and hands prefetched tasks back),
CONT resumes, TTIN/TTOU resize the pool, TERM with ``term_child`` stops the
children the Resque way; plus the memory guard and bad settings.

The workers run ``tests/integration/signals_proj.py`` (Redis DB 8 as broker,
DB 9 for results and evidence), started by :class:`SignalWorkers`, which
follows the rules of ``conftest.WorkerFactory`` (a new session per worker,
readiness by ``ping``, the whole group stopped at teardown).  The harness
here is shared with ``test_fleet.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from . import signals_proj
from .conftest import (
    HUB_BROKERS,
    RABBITMQ_URL,
    REPO_ROOT,
    WORKER_BOOT_TIMEOUT,
    Broker,
    Worker,
    broker_params,
    outcome,
    pid_alive,
    require_service,
    wait_for,
)

SIG_BROKER_URL = "redis://127.0.0.1:6379/8"
SIG_BACKEND_URL = "redis://127.0.0.1:6379/9"
APP_MODULE = "tests.integration.signals_proj"
EVIDENCE = signals_proj.Evidence(SIG_BACKEND_URL, "fgsig")
#: The test's own client of the Redis broker (it connects when first used).
BROKER_REDIS = redis.Redis.from_url(SIG_BROKER_URL, decode_responses=True)
#: Room for a loaded two-core machine on top of what a test waits for.
MARGIN = 15.0
#: How much of each worker's log a failed test shows.
LOG_TAIL = 20000


# -- brokers and workers ---------------------------------------------------------------------


def make_sig_broker(name: str) -> Broker:
    """Redis DB 8 or RabbitMQ as broker; results in Redis DB 9 either way."""
    url = {"redis": SIG_BROKER_URL, "rabbitmq": RABBITMQ_URL}[name]
    chosen = Broker(name, url, backend=SIG_BACKEND_URL)
    problem = chosen.problem()
    if problem:
        require_service(problem)
    return chosen


@pytest.fixture(scope="module", params=broker_params(*HUB_BROKERS))
def sig_broker(request: pytest.FixtureRequest) -> Broker:
    return make_sig_broker(request.param)


def sig_env(broker: Broker, queue: str) -> dict[str, str]:
    return {
        "FORKGUARD_SIG_BROKER": broker.url,
        "FORKGUARD_SIG_BACKEND": broker.backend,
        "FORKGUARD_SIG_QUEUE": queue,
    }


def client_app(env: dict[str, str]) -> Celery:
    """A client configured like the workers of *env*."""
    app = Celery(f"forkguard-sig-client-{env['FORKGUARD_SIG_QUEUE']}", set_as_current=False)
    app.conf.update(signals_proj.celery_config(env))
    return app


class SignalWorkers:
    """Starts ``signals_proj`` workers on one broker; stops them all at teardown."""

    def __init__(self, broker: Broker, log_dir: Path) -> None:
        self.broker = broker
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self.gates: list[str] = []

    def gate(self) -> str:
        """A new gate for held tasks; opened at teardown if the test did not."""
        name = uuid.uuid4().hex
        self.gates.append(name)
        return name

    def __call__(self, *extra_args: str, env: Optional[dict[str, str]] = None,
                 concurrency: int = 2, queue: Optional[str] = None) -> Worker:
        """Start a worker and return once it answers ``ping``."""
        worker = self.spawn(*extra_args, env=env, concurrency=concurrency, queue=queue)
        self._wait_ready(worker)
        return worker

    def spawn(self, *extra_args: str, env: Optional[dict[str, str]] = None,
              concurrency: int = 2, queue: Optional[str] = None) -> Worker:
        """Start a worker without waiting for it (it may be meant to fail)."""
        token = uuid.uuid4().hex[:12]
        queue = queue or f"fgsig-{token}"
        hostname = f"fgsig-{token}@forkguard-it"
        worker_env = sig_env(self.broker, queue)
        log_path = self.log_dir / f"worker-{token}.log"
        command = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            "-P", "forkguard", "-c", str(concurrency), "-l", "info",
            "-n", hostname, "-Q", queue, "--without-mingle", "--without-gossip",
            *extra_args,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command, cwd=REPO_ROOT, env={**os.environ, **worker_env, **(env or {})},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, hostname, queue, log_path, client_app(worker_env), self.broker,
                        worker_env)
        self.workers.append(worker)
        return worker

    def _wait_ready(self, worker: Worker) -> None:
        def answers() -> bool:
            if worker.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {worker.proc.returncode} while starting:\n{worker.log()}"
                )
            return worker.ping()

        try:
            wait_for(answers, timeout=WORKER_BOOT_TIMEOUT, message=f"{worker.hostname} to answer")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{worker.log()}") from None

    def close(self) -> None:
        # Held tasks end on their own first, so a warm stop does not wait for them.
        for gate in self.gates:
            EVIDENCE.open_gate(gate)
        problems = []
        for worker in self.workers:
            leftovers = worker.stop()
            # pytest shows captured teardown output only when the test failed.
            print(f"--- log of {worker.hostname} ({worker.pid}) ---\n{worker.log()[-LOG_TAIL:]}")
            if leftovers:
                problems.append(f"{worker.hostname} left processes {leftovers}")
        self.workers.clear()
        assert not problems, "; ".join(problems)


@pytest.fixture
def workers(sig_broker: Broker, tmp_path: Path) -> Iterator[SignalWorkers]:
    factory = SignalWorkers(sig_broker, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


# -- helpers -------------------------------------------------------------------------------


def send(worker: Worker, name: str, *args: Any, **options: Any) -> AsyncResult:
    """Send the signals_proj task *name* to *worker*'s queue."""
    return worker.app.send_task(signals_proj.task_name(name), args=args, queue=worker.queue,
                                **options)


def started(result: AsyncResult, timeout: float = 30.0) -> dict[str, str]:
    """The evidence of a task once its body runs: pid, hostname, runs."""
    return wait_for(lambda: EVIDENCE.fields(result.id).get("pid") and EVIDENCE.fields(result.id),
                    timeout=timeout, message=f"task {result.id} to start")


def runs(result: AsyncResult) -> int:
    return int(EVIDENCE.fields(result.id).get("runs", 0))


def ran_on(result: AsyncResult, worker: Worker) -> bool:
    return EVIDENCE.fields(result.id).get("hostname") == worker.hostname


def send_signal(worker: Worker, signum: int) -> None:
    os.kill(worker.pid, signum)


def log_count(worker: Worker, text: str) -> int:
    return worker.log().count(text)


def wait_log(worker: Worker, text: str, count: int = 1, timeout: float = 20.0) -> None:
    wait_for(lambda: log_count(worker, text) >= count, timeout=timeout,
             message=f"{count}x {text!r} in the log of {worker.hostname}")


def status(worker: Worker, timeout: float = 3.0) -> dict[str, Any]:
    """The worker's ``forkguard_status`` reply."""
    replies = worker.app.control.broadcast(
        "forkguard_status", destination=[worker.hostname], reply=True, timeout=timeout,
    ) or []
    for reply in replies:
        if worker.hostname in reply:
            return dict(reply[worker.hostname])
    raise AssertionError(f"{worker.hostname} did not answer forkguard_status")


def max_concurrency(worker: Worker) -> int:
    return int(worker.stats()["pool"]["max-concurrency"])


def assert_failed_with(result: AsyncResult, error_type: str, *fragments: str,
                       timeout: float = 30.0) -> str:
    """The task ended FAILURE with *error_type*; its message holds every fragment."""
    state, error = outcome(result, timeout=timeout)
    assert state == "FAILURE", (state, error)
    assert type(error).__name__ == error_type, repr(error)
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    return str(error)


def queue_depth(worker: Worker) -> int:
    """Messages waiting in the worker's queue (ready ones, not those delivered)."""
    if worker.broker.name == "redis":
        return int(BROKER_REDIS.llen(worker.queue))
    with worker.app.connection_for_write() as conn:
        _, count, _ = conn.default_channel.queue_declare(worker.queue, passive=True)
    return int(count)


def unacked_mentions(worker: Worker, task_id: str) -> bool:
    """Whether a delivered-but-unacknowledged Redis message carries *task_id*."""
    if worker.broker.name != "redis":
        return False
    return any(task_id in payload for payload in BROKER_REDIS.hvals("unacked"))


def stop_gracefully(worker: Worker, timeout: float = 30.0) -> int:
    """TERM the worker (it gives unacknowledged messages back) and wait for its exit."""
    send_signal(worker, signal.SIGTERM)
    return worker.wait_exit(timeout)


def assert_never_redelivered(worker: Worker, *results: AsyncResult) -> None:
    """Once the worker is gone, no message of *results* waits to run again.

    A message still unacknowledged would be back in the queue (the worker
    restores it when it closes; RabbitMQ requeues it when the connection
    closes), or, on Redis, still in the unacked index.
    """
    for result in results:
        wait_for(lambda r=result: not unacked_mentions(worker, r.id),
                 message=f"{result.id} to be acknowledged")
    assert stop_gracefully(worker) == 0, worker.log()
    assert queue_depth(worker) == 0
    assert not any(unacked_mentions(worker, r.id) for r in results)


def ticks_succeed(worker: Worker, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run *count* short tasks on *worker*; each must succeed."""
    results = [send(worker, "tick") for _ in range(count)]
    values = []
    for result in results:
        state, value = outcome(result, timeout=timeout)
        assert state == "SUCCESS", (state, value)
        values.append(value)
    return values


def title_of(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline())


# -- 1. USR1: kill the running tasks, keep consuming ---------------------------------------------


def test_usr1_kills_running_children_and_worker_keeps_consuming(workers: SignalWorkers) -> None:
    worker = workers(concurrency=2)
    gate = workers.gate()
    early, late = send(worker, "hold", gate), send(worker, "hold_late", gate)
    pids = [int(started(r)["pid"]) for r in (early, late)]

    send_signal(worker, signal.SIGUSR1)

    for result in (early, late):
        assert_failed_with(result, "TaskKilled", "USR1", "SIGKILL")
    for pid in pids:
        wait_for(lambda p=pid: not pid_alive(p), message=f"killed child {pid} to be gone")
    [value] = ticks_succeed(worker)
    assert value["hostname"] == worker.hostname
    assert status(worker)["killed"] == {"USR1": 2}
    assert all(runs(r) == 1 for r in (early, late))
    assert_never_redelivered(worker, late)


def test_usr1_with_term_child_terms_then_kills(workers: SignalWorkers) -> None:
    worker = workers(env={"TERM_CHILD": "1", "RESQUE_TERM_TIMEOUT": "1"}, concurrency=2)
    gate = workers.gate()
    polite, stubborn = send(worker, "catch_term", gate), send(worker, "ignore_term", gate)
    polite_pid = int(started(polite)["pid"])
    started(stubborn)

    signalled = time.monotonic()
    send_signal(worker, signal.SIGUSR1)

    assert_failed_with(polite, "TermException", "USR1", "SIGTERM")
    cleaned = wait_for(lambda: EVIDENCE.fields(polite.id).get("cleaned_up"),
                       message="the task's cleanup evidence")
    assert "USR1" in cleaned
    assert EVIDENCE.fields(polite.id)["cleaned_up_pid"] == str(polite_pid)
    assert_failed_with(stubborn, "TaskKilled", "USR1", "SIGKILL after 1s")
    # The stubborn task outlived its TERM by the term timeout, not much more.
    assert 1.0 <= time.monotonic() - signalled < 1.0 + MARGIN
    assert ticks_succeed(worker)
    assert_never_redelivered(worker, stubborn)


def test_usr1_twice_quickly(workers: SignalWorkers) -> None:
    worker = workers(concurrency=2)
    gate = workers.gate()
    results = [send(worker, "hold", gate) for _ in range(2)]
    for result in results:
        started(result)

    send_signal(worker, signal.SIGUSR1)
    send_signal(worker, signal.SIGUSR1)

    for result in results:
        assert_failed_with(result, "TaskKilled", "USR1", "SIGKILL")
    assert worker.ping(timeout=3.0)
    assert ticks_succeed(worker, 2)
    # Signals coalesce, and the second USR1 may come before the children are
    # reaped: a child already being killed is neither killed nor counted again.
    assert status(worker)["killed"] == {"USR1": 2}


def test_a_second_usr1_leaves_a_terminating_child_alone(workers: SignalWorkers) -> None:
    worker = workers(env={"TERM_CHILD": "1", "RESQUE_TERM_TIMEOUT": "10"}, concurrency=1)
    gate = workers.gate()
    cleaning = send(worker, "slow_cleanup", gate, 2)
    started(cleaning)
    send_signal(worker, signal.SIGUSR1)
    wait_for(lambda: EVIDENCE.fields(cleaning.id).get("cleanup_began"),
             message="the task to begin its cleanup")

    send_signal(worker, signal.SIGUSR1)
    wait_log(worker, "received SIGUSR1", 2)

    # The task's own TermException, after a cleanup that was not cut short.
    assert_failed_with(cleaning, "TermException", "USR1")
    assert "cleanup_done" in EVIDENCE.fields(cleaning.id)
    assert status(worker)["killed"] == {"USR1": 1}


# -- 2. USR2 / CONT: pause, hand prefetched tasks back, resume -----------------------------------


def reserved_count(worker: Worker) -> int:
    inspect = worker.app.control.inspect(destination=[worker.hostname], timeout=2.0)
    return len((inspect.reserved() or {}).get(worker.hostname, []))


def test_usr2_hands_prefetched_tasks_to_another_worker(workers: SignalWorkers) -> None:
    first = workers(env={"FORKGUARD_SIG_PREFETCH": "4"}, concurrency=1)
    gate = workers.gate()
    running = send(first, "hold", gate)
    started(running)
    prefetched = [send(first, "tick") for _ in range(3)]
    wait_for(lambda: reserved_count(first) == 3, timeout=20, message="3 prefetched tasks")

    send_signal(first, signal.SIGUSR2)
    # On RabbitMQ the pause waits for the broker to confirm the cancel, and
    # may answer a status request meanwhile: wait for the whole pause.
    wait_for(lambda: status(first)["handed_back"] == 3, message="3 tasks handed back")
    assert status(first)["paused"]
    wait_for(lambda: "paused" in title_of(first.pid), message="the title to say paused")

    second = workers(concurrency=2, queue=first.queue)
    handed_over = time.monotonic()
    for result in prefetched:
        assert outcome(result, timeout=30)[0] == "SUCCESS"
        assert ran_on(result, second), EVIDENCE.fields(result.id)
    # Handed back at once, not found again after a visibility timeout.
    assert time.monotonic() - handed_over < 30
    assert running.state == "STARTED"

    EVIDENCE.open_gate(gate)
    assert outcome(running) == ("SUCCESS", "released")
    assert ran_on(running, first)

    # Not second.stop(): that deletes the queue both workers consume.
    assert stop_gracefully(second) == 0
    later = send(first, "tick")
    send_signal(first, signal.SIGCONT)
    wait_for(lambda: not status(first)["paused"], message="the worker to resume")
    assert "paused" not in title_of(first.pid), (title_of(first.pid), first.log())
    assert outcome(later, timeout=30)[0] == "SUCCESS"
    assert ran_on(later, first)
    assert [runs(r) for r in (running, *prefetched, later)] == [1] * 5


def test_usr2_twice_then_cont(workers: SignalWorkers) -> None:
    worker = workers(concurrency=1)
    send_signal(worker, signal.SIGUSR2)
    send_signal(worker, signal.SIGUSR2)
    wait_for(lambda: status(worker)["paused"], message="the worker to pause")
    waiting = send(worker, "tick")

    send_signal(worker, signal.SIGCONT)

    assert outcome(waiting, timeout=30)[0] == "SUCCESS"
    assert not status(worker)["paused"]
    assert runs(waiting) == 1


# -- 3. TERM: term_child shutdown, and Celery's warm shutdown without it -----------------------


PRE_SHUTDOWN, TERM_TIMEOUT = 4, 2


def test_term_child_shutdown(workers: SignalWorkers) -> None:
    env = {"TERM_CHILD": "1", "RESQUE_TERM_TIMEOUT": str(TERM_TIMEOUT),
           "RESQUE_PRE_SHUTDOWN_TIMEOUT": str(PRE_SHUTDOWN)}
    first = workers(env=env, concurrency=3)
    short_gate, long_gate = workers.gate(), workers.gate()
    short = send(first, "hold", short_gate)
    long = send(first, "catch_term", long_gate)
    requeued = send(first, "hold_first_delivery", long_gate)
    for result in (short, long, requeued):
        started(result)

    termed, termed_wall = time.monotonic(), time.time()
    send_signal(first, signal.SIGTERM)
    wait_log(first, "received SIGTERM")
    # Within pre_shutdown_timeout the short task ends on its own.
    EVIDENCE.open_gate(short_gate)
    assert outcome(short) == ("SUCCESS", "released")

    assert_failed_with(long, "TermException", "shutting down")
    evidence = EVIDENCE.fields(long.id)
    assert "shutting down" in evidence["cleaned_up"]
    # Children were TERMed only once pre_shutdown_timeout had passed.
    assert float(evidence["cleaned_up_at"]) - termed_wall >= PRE_SHUTDOWN - 0.1
    assert first.wait_exit(timeout=PRE_SHUTDOWN + TERM_TIMEOUT + MARGIN) == 0, first.log()
    assert time.monotonic() - termed < PRE_SHUTDOWN + TERM_TIMEOUT + MARGIN
    assert "TermRequeue" in EVIDENCE.fields(requeued.id)["interrupted"]

    # The acks_late task went back to the queue and runs on the next worker.
    second = workers(concurrency=1, queue=first.queue)
    assert outcome(requeued, timeout=30) == ("SUCCESS", 2)
    assert ran_on(requeued, second)
    for result in (short, long, requeued):
        assert result.backend.get_task_meta(result.id, cache=False)["status"] != "STARTED"


def test_term_without_term_child_is_celery_warm_shutdown(workers: SignalWorkers) -> None:
    worker = workers(concurrency=1)
    gate = workers.gate()
    running = send(worker, "hold", gate)
    started(running)

    send_signal(worker, signal.SIGTERM)
    wait_log(worker, "Warm shutdown")
    EVIDENCE.open_gate(gate)

    assert outcome(running) == ("SUCCESS", "released")
    assert worker.wait_exit(timeout=MARGIN) == 0, worker.log()


# -- 4. TTIN / TTOU ----------------------------------------------------------------------------


def resize_and_wait(worker: Worker, signum: int, expected: int) -> None:
    name = signal.Signals(signum).name
    seen = log_count(worker, f"received {name}")
    send_signal(worker, signum)
    wait_log(worker, f"received {name}", seen + 1)
    wait_for(lambda: max_concurrency(worker) == expected,
             message=f"max-concurrency {expected} after {name}")


def test_ttin_ttou_resize_the_pool_never_below_one(workers: SignalWorkers) -> None:
    worker = workers(concurrency=2)
    assert max_concurrency(worker) == 2
    resize_and_wait(worker, signal.SIGTTIN, 3)
    resize_and_wait(worker, signal.SIGTTOU, 2)
    resize_and_wait(worker, signal.SIGTTOU, 1)
    resize_and_wait(worker, signal.SIGTTOU, 1)
    # Had the last TTOU gone below one, this would not reach two.
    resize_and_wait(worker, signal.SIGTTIN, 2)
    assert ticks_succeed(worker, 3)


def test_ttou_while_tasks_run_kills_nothing(workers: SignalWorkers) -> None:
    worker = workers(concurrency=2)
    gate = workers.gate()
    results = [send(worker, "hold", gate) for _ in range(2)]
    pids = [int(started(r)["pid"]) for r in results]

    resize_and_wait(worker, signal.SIGTTOU, 1)

    assert all(pid_alive(pid) for pid in pids)
    assert len(status(worker)["running"]) == 2
    EVIDENCE.open_gate(gate)
    for result in results:
        assert outcome(result) == ("SUCCESS", "released")
    assert ticks_succeed(worker, 2)


# -- 5. a storm of signals while ~200 tasks fork -----------------------------------------------


STORM = (signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT)
#: Rounds of STORM sent each time a task ends: a burst per task, while the
#: next tasks are being forked.  (An unpaced loop sends ~10,000 signals a
#: second, which measures how fast the worker can log them, not forkguard.)
BURST = 20


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fork_server", ["1", "0"], ids=["fork-server", "direct-fork"])
def test_signal_storm_while_tasks_fork(workers: SignalWorkers, fork_server: str) -> None:
    worker = workers(env={"FORKGUARD_FORK_SERVER": fork_server}, concurrency=2)
    results = [send(worker, "tick") for _ in range(200)]

    values = []
    for result in results:
        for _ in range(BURST):
            for signum in STORM:
                send_signal(worker, signum)
        state, value = outcome(result, timeout=60)
        assert state == "SUCCESS", (state, value)
        values.append(value)

    assert worker.proc.poll() is None and worker.ping(timeout=3.0)
    assert max_concurrency(worker) >= 1
    # Every task ran once, in a child that kept none of the worker's handlers:
    # the only Python handlers it has are the child's own (TERM, soft limit).
    assert all(runs(r) == 1 for r in results)
    for value in values:
        assert value["hostname"] == worker.hostname
        handlers = [h for h in value["handlers"].values() if h not in ("SIG_DFL", "SIG_IGN")]
        assert all(h.startswith("celery_forkguard.child.") for h in handlers), value
    assert "Traceback" not in worker.log()


# -- 6. memory guard -------------------------------------------------------------------------------


def test_memory_guard_kills_a_child_over_the_limit(workers: SignalWorkers) -> None:
    worker = workers("--max-memory-per-child", "100000", concurrency=1)
    gate = workers.gate()
    greedy = send(worker, "hog", 200, gate)

    assert_failed_with(greedy, "MemoryLimitExceeded", "worker_max_memory_per_child=100000")
    pid = int(started(greedy)["pid"])
    wait_for(lambda: not pid_alive(pid), message=f"the greedy child {pid} to be gone")
    assert psutil.Process(worker.pid).memory_info().rss < 150 * 1024 * 1024
    assert ticks_succeed(worker)


# -- 8. a bad setting stops the worker at start ---------------------------------------------------


def test_bad_term_child_value_stops_the_worker(tmp_path: Path) -> None:
    # The pool reads its settings before any broker is used: one broker will do.
    factory = SignalWorkers(make_sig_broker("redis"), tmp_path)
    try:
        worker = factory.spawn(env={"TERM_CHILD": "maybe"}, concurrency=1)
        began = time.monotonic()
        assert worker.wait_exit(timeout=WORKER_BOOT_TIMEOUT) != 0
        assert time.monotonic() - began < MARGIN
        log = worker.log()
        assert "TERM_CHILD" in log and "'maybe'" in log, log
    finally:
        factory.close()


# -- 9. after a broker reconnect ------------------------------------------------------------------


def drop_broker_connections(worker: Worker) -> int:
    """Close the worker's connections to the Redis broker; return how many.

    Only the worker's: a client of this process keeps its sockets (kombu
    pools them process-wide, and a dead one would fail a later test).
    """
    proc = psutil.Process(worker.pid)
    connections = getattr(proc, "net_connections", proc.connections)(kind="tcp")
    ports = {conn.laddr.port for conn in connections if conn.raddr and conn.raddr.port == 6379}
    dropped = 0
    for conn in BROKER_REDIS.client_list():
        if conn["db"] == "8" and int(conn["addr"].rsplit(":", 1)[1]) in ports:
            BROKER_REDIS.client_kill_filter(_id=conn["id"])
            dropped += 1
    return dropped


def reconnected(worker: Worker) -> bool:
    log = worker.log()
    lost = "Connection to broker lost"
    return lost in log and "Connected to redis" in log.rsplit(lost, 1)[1]


def test_signals_still_work_after_a_broker_reconnect(tmp_path: Path) -> None:
    # Redis only: this test can cut a worker's Redis connections, not its AMQP ones.
    factory = SignalWorkers(make_sig_broker("redis"), tmp_path)
    try:
        worker = factory(env={"TERM_CHILD": "1"}, concurrency=1)
        assert drop_broker_connections(worker) > 0
        wait_for(lambda: reconnected(worker), timeout=30, message="the worker to reconnect")
        wait_for(worker.ping, message="a ping reply after the reconnect")
        assert ticks_succeed(worker)

        send_signal(worker, signal.SIGUSR2)
        wait_for(lambda: status(worker)["paused"], message="USR2 to pause the worker")
        send_signal(worker, signal.SIGCONT)
        wait_for(lambda: not status(worker)["paused"], message="CONT to resume the worker")
        assert ticks_succeed(worker)
        # With term_child the worker's own TERM handler must still run, or TERM does nothing.
        assert stop_gracefully(worker, timeout=MARGIN) == 0, worker.log()
    finally:
        factory.close()
