"""Fixtures that run real ``celery worker -P forkguard`` processes on real brokers.

The workers run the app in ``tests/integration/proj.py``; see its docstring
for the environment variables that configure it and for the evidence keys
tasks leave in Redis.

Fixtures
--------
``broker`` (session scope)
    A :class:`Broker`, parametrised over ``"redis"``, ``"rabbitmq"`` and
    ``"filesystem"``.  Redis uses DB 10 as broker; every broker stores results
    (and evidence) in Redis DB 11.  The filesystem broker is kombu's transport
    with atomic message files (``proj.AtomicFilesystemTransport``, registered
    when ``proj`` is imported: a worker of another app must import it too).
    To run a module or a test on fewer brokers, override the parameters
    indirectly::

        pytestmark = pytest.mark.parametrize(
            "broker", broker_params(*HUB_BROKERS), indirect=True)

    A broker that is not reachable skips its tests with the reason, or fails
    them when the environment variable ``CI`` is ``true``.
``start_worker`` (function scope) and ``start_module_worker`` (module scope)
    Factories: ``start_worker(*extra_args, env=None, concurrency=2) -> Worker``
    starts ``python -m celery -A tests.integration.proj worker -P forkguard
    -c N -l info`` (plus a unique ``-n`` hostname, ``-Q`` queue and
    *extra_args*) from the repository root in a new session, logging to a
    file under the test's tmp dir, and returns once the worker answers a
    ``ping``.  At teardown each worker's process group gets SIGTERM, then
    SIGKILL after a deadline, and the fixture fails if any process of the
    worker's session (its forked children included) is left.  The queue is
    deleted from the broker.
``evidence`` (session scope)
    A :class:`proj.Evidence` reading what tasks recorded in Redis.

A :class:`Worker` has ``pid`` (the worker's main process), ``hostname``,
``queue``, ``app`` (a client app configured like the worker), ``broker``,
``log()`` (the log so far), ``send(name, *args, **kwargs)`` and
``apply(name, args, kwargs, **options)`` for proj tasks, ``ping()``,
``stats()``, ``revoke(task_id, terminate, signal)``, ``is_fork_parent(pid)``
(the worker, or its fork server), ``session_pids()``
(the worker and its children still alive), ``wait_exit(timeout)`` and
``stop()`` (what teardown calls: returns leftover pids, deletes the queue).
Workers never share a queue, so tests and concurrent runs cannot steal each
other's messages; tasks sharing one worker must each wait for their own.

Helpers (import them with ``from .conftest import ...``)
----------------------------------------------------------
``wait_for(predicate, timeout, ...)``
    Polls *predicate* until it returns something true, or fails at the deadline.
``outcome(result, timeout)``
    Waits for a task's result and returns its ``(state, value)``.
``pid_alive(pid)``
    False once a process has exited (zombies count as exited).
``started_pid(evidence, task_id)``
    Waits until a proj task recorded its pid (tasks do so as they start) and returns it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

# Re-exported too: the test modules import pid_alive, require_service and wait_for from here.
from tests.harness import pid_alive as pid_alive
from tests.harness import require_service as require_service
from tests.harness import (
    session_pids,
    start_in_session,
    stop_session,
    wait_answering,
    wait_for,
)

from . import proj

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/10"
REDIS_RESULTS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"

ALL_BROKERS = ("redis", "rabbitmq", "filesystem")
#: Brokers the worker drives from its event loop (kombu hub).
HUB_BROKERS = ("redis", "rabbitmq")

WORKER_BOOT_TIMEOUT = 40.0
WORKER_STOP_TIMEOUT = 15.0


# -- helpers --------------------------------------------------------------------------------


def outcome(result: AsyncResult, timeout: float = 20.0) -> tuple[str, Any]:
    """``(state, value)`` of a finished task; the value is the exception on failure."""
    value = result.get(timeout=timeout, propagate=False)
    return result.state, value


def started_pid(evidence: proj.Evidence, task_id: str, timeout: float = 15.0) -> int:
    """The pid of the child running a task, recorded by the task as it started."""
    return int(wait_for(lambda: evidence.fields(task_id).get("pid"), timeout=timeout,
                        message=f"task {task_id} to start"))


def _redis_problem() -> Optional[str]:
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2).ping()
    except redis.RedisError as exc:
        return f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def _tcp_problem(host: str, port: int, what: str) -> Optional[str]:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"{what} is not reachable at {host}:{port}: {exc}"
    return None


# -- brokers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """One broker the workers can use, and the environment that selects it."""

    name: str
    url: str
    backend: str = REDIS_RESULTS_URL
    fs_dir: Optional[str] = None

    def env(self, queue: str) -> dict[str, str]:
        env = {
            "FORKGUARD_IT_BROKER": self.url,
            "FORKGUARD_IT_BACKEND": self.backend,
            "FORKGUARD_IT_EVIDENCE": REDIS_RESULTS_URL,
            "FORKGUARD_IT_QUEUE": queue,
        }
        if self.fs_dir:
            env["FORKGUARD_IT_FS_DIR"] = self.fs_dir
        return env

    def problem(self) -> Optional[str]:
        """Why this broker cannot be used here, or None."""
        missing = _redis_problem()  # results and evidence always live in Redis
        if missing is None and self.name == "rabbitmq":
            missing = _tcp_problem("127.0.0.1", 5672, "RabbitMQ")
        return missing


def make_broker(name: str, scratch: Path) -> Broker:
    if name == "redis":
        return Broker(name, REDIS_BROKER_URL)
    if name == "rabbitmq":
        return Broker(name, RABBITMQ_URL)
    if name == "filesystem":
        folder = scratch / "filesystem-broker"
        (folder / "control").mkdir(parents=True, exist_ok=True)
        return Broker(name, f"{proj.FILESYSTEM_SCHEME}://", fs_dir=str(folder))
    raise ValueError(f"unknown broker {name!r}")


_BROKER_MARKS = {
    "redis": [pytest.mark.redis],
    "rabbitmq": [pytest.mark.rabbitmq, pytest.mark.redis],
    "filesystem": [pytest.mark.redis],
}


def broker_params(*names: str) -> list[Any]:
    """``pytest.param`` objects for *names*, with their service markers."""
    return [pytest.param(name, marks=_BROKER_MARKS[name], id=name) for name in names]


@pytest.fixture(scope="session", params=broker_params(*ALL_BROKERS))
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Broker:
    chosen = make_broker(request.param, tmp_path_factory.mktemp("brokers"))
    problem = chosen.problem()
    if problem:
        require_service(problem)
    return chosen


@pytest.fixture(scope="session")
def evidence() -> proj.Evidence:
    problem = _redis_problem()
    if problem:
        require_service(problem)
    return proj.Evidence(REDIS_RESULTS_URL, "fgit")


# -- workers --------------------------------------------------------------------------------


@dataclass
class Worker:
    """A running ``celery worker -P forkguard`` and a client app that talks to it."""

    proc: subprocess.Popen
    hostname: str
    queue: str
    log_path: Path
    app: Celery
    broker: Broker
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- tasks ---------------------------------------------------------------

    def send(self, name: str, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the proj task *name* to this worker's queue."""
        return self.apply(name, args=args, kwargs=kwargs)

    def apply(self, name: str, args: tuple = (), kwargs: Optional[dict] = None,
              **options: Any) -> AsyncResult:
        return self.app.send_task(proj.task_name(name), args=args, kwargs=kwargs or {},
                                  queue=self.queue, **options)

    # -- remote control ----------------------------------------------------

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the worker answered one ping within *timeout*."""
        replies = self.app.control.ping(destination=[self.hostname], timeout=timeout)
        return any(self.hostname in reply for reply in replies or ())

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The worker's ``inspect stats`` reply; empty if none came."""
        inspect = self.app.control.inspect(destination=[self.hostname], timeout=timeout)
        return (inspect.stats() or {}).get(self.hostname, {})

    def revoke(self, task_id: str, terminate: bool = False, signal: Optional[str] = None) -> None:
        self.app.control.revoke(task_id, terminate=terminate, signal=signal,
                                destination=[self.hostname])

    # -- processes --------------------------------------------------------

    def is_fork_parent(self, pid: int) -> bool:
        """Whether task children may be forked by *pid*.

        That is the worker itself, or with ``forkguard_fork_server`` (the
        default) its fork server: a direct child of the worker.
        """
        if pid == self.pid:
            return True
        try:
            return psutil.Process(pid).ppid() == self.pid
        except psutil.NoSuchProcess:
            return False

    def session_pids(self) -> list[int]:
        """Live processes of the worker's session: the worker and its children."""
        return session_pids(self.pid)

    def wait_exit(self, timeout: float) -> int:
        """The worker's exit code, once it has exited (within *timeout*)."""
        return self.proc.wait(timeout=timeout)

    def stop(self) -> list[int]:
        """TERM the worker's group, KILL it after a deadline; return leftover pids."""
        leftovers = stop_session(self.proc, WORKER_STOP_TIMEOUT)
        self._delete_queue()
        self.app.close()
        return leftovers

    def _delete_queue(self) -> None:
        # RabbitMQ keeps a durable queue forever; Redis keeps its bindings.
        if self.broker.fs_dir:
            return
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            queue = self.app.amqp.queues[self.queue].bind(conn.default_channel)
            # Declaring first tells kombu's Redis channel which bindings to drop.
            queue.declare()
            queue.delete()


def client_app(env: dict[str, str]) -> Celery:
    """A client app configured like the worker's, without the tasks."""
    app = Celery(f"forkguard-it-client-{env['FORKGUARD_IT_QUEUE']}", set_as_current=False)
    app.conf.update(proj.celery_config(env))
    return app


#: Workers started by the factories and not yet stopped: their logs go into failure reports.
_RUNNING: list[Worker] = []
LOG_TAIL_LINES = 80


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    made = yield
    report = made.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for worker in list(_RUNNING):
            tail = "\n".join(worker.log().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"worker {worker.hostname} (log tail)", tail))


class WorkerFactory:
    """Starts workers on one broker and stops them all at teardown."""

    def __init__(self, broker: Broker, log_dir: Path) -> None:
        self.broker = broker
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    def __call__(self, *extra_args: str, env: Optional[dict[str, str]] = None,
                 concurrency: int = 2, wrapper: tuple[str, ...] = ()) -> Worker:
        """Start a worker; *wrapper* is a command that execs the worker's (its argv after)."""
        worker = self._spawn(extra_args, env or {}, concurrency, wrapper)
        self.workers.append(worker)
        _RUNNING.append(worker)
        self._wait_ready(worker)
        return worker

    def _spawn(self, extra_args: tuple[str, ...], extra_env: dict[str, str],
               concurrency: int, wrapper: tuple[str, ...] = ()) -> Worker:
        token = uuid.uuid4().hex[:12]
        queue = f"fgit-{token}"
        hostname = f"fgit-{token}@forkguard-it"
        env = self.broker.env(queue)
        log_path = self.log_dir / f"worker-{token}.log"
        command = [
            *wrapper,
            sys.executable, "-m", "celery", "-A", "tests.integration.proj", "worker",
            "-P", "forkguard", "-c", str(concurrency), "-l", "info",
            "-n", hostname, "-Q", queue,
            # No chatter with the other workers on the same broker.
            "--without-mingle", "--without-gossip",
            *extra_args,
        ]
        proc = start_in_session(command, {**env, **extra_env}, log_path)
        return Worker(proc, hostname, queue, log_path, client_app(env), self.broker, env)

    def _wait_ready(self, worker: Worker) -> None:
        wait_answering(worker.proc, worker.ping, worker.log, WORKER_BOOT_TIMEOUT,
                       f"{worker.hostname} to answer ping")

    def close(self) -> None:
        problems = []
        for worker in self.workers:
            try:
                leftovers = worker.stop()
            except Exception as exc:  # stop the others all the same
                problems.append(f"{worker.hostname} did not stop: {exc!r}")
                continue
            finally:
                _RUNNING.remove(worker)
            if leftovers:
                problems.append(f"{worker.hostname} left processes {leftovers}")
        self.workers.clear()
        assert not problems, "; ".join(problems)


@contextlib.contextmanager
def _factory(broker: Broker, log_dir: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(broker, log_dir)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def start_worker(broker: Broker, tmp_path: Path) -> Iterator[WorkerFactory]:
    with _factory(broker, tmp_path) as factory:
        yield factory


@pytest.fixture(scope="module")
def start_module_worker(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerFactory]:
    with _factory(broker, tmp_path_factory.mktemp(f"workers-{broker.name}")) as factory:
        yield factory
