"""Fixtures for the tests of ``examples/django_project``: real workers, Redis, PostgreSQL.

The example is copied out of the repository and run as its README says, by
the ``celery`` command of the virtualenv running pytest (``nox -s install``
installs Django, psycopg2-binary and PyYAML there).  Every worker runs in a
session of its own and is stopped with TERM; whatever of it is left after
that is killed and fails the test.

Services: Redis DB 3 (broker) and DB 4 (results); a PostgreSQL database of
its own per run, ``forkguard_example_test_<hex>``, created at the start and
dropped at the end, on ``PGHOST``/``PGPORT`` as ``PGUSER`` (default
127.0.0.1, 5432, postgres).  A missing service or package skips, or fails under ``CI=true``.

Each process gets a queue and a node name of its own through Celery's own
command-line variables, ``CELERY_WORKER_QUEUES`` and ``CELERY_WORKER_HOSTNAME``
(``-Q`` and ``-n``; the ``celery`` command reads ``CELERY_<COMMAND>_<OPTION>``),
so the command lines of the deploy files run unchanged, and a task never
reaches a worker of another run (or of anyone else) on the same Redis
database.  Only the run's own keys are deleted afterwards.

Fixtures
--------
``example_dir`` (session)
    A copy of the example project, outside the repository.
``postgres`` (session)
    The run's PostgreSQL database (:class:`Postgres`).
``pg_env`` / ``sqlite_env`` (session)
    The environment that points the example at that database (or at a SQLite
    file) and at Redis DB 3/4, with the migrations applied.
``client`` (session)
    A Celery app that sends to Redis DB 3 and reads results from DB 4.
``processes`` (function)
    A :class:`Processes`: starts commands in new sessions, each with its own
    queue and node name; stops them at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import pytest
from celery import Celery
from celery.result import AsyncResult

from tests.harness import REPO_ROOT, require_service, session_pids, stop_session, wait_for

EXAMPLE = REPO_ROOT / "examples" / "django_project"

BROKER_URL = "redis://127.0.0.1:6379/3"
RESULTS_URL = "redis://127.0.0.1:6379/4"

#: A worker's or a generation's start, on a loaded two-core machine.
BOOT_TIMEOUT = 60.0
#: TERM to exit (no task is running when the tests stop a worker).
STOP_TIMEOUT = 30.0
TASK_TIMEOUT = 30.0
#: The pytest timeout of one test: a few boots and stops.
TEST_TIMEOUT = 240

#: Variables of the caller's environment that would point the example elsewhere.
_LEAKY = ("PYTHONPATH", "PYTHONHOME", "DATABASE_URL", "SQLITE_PATH", "TERM_CHILD",
          "FORKED_BY_MULTIPROCESSING")
_LEAKY_PREFIXES = ("CELERY_", "DJANGO_", "PG", "FORKGUARD_", "RESQUE_")

_STARTED = re.compile(r"started generation (\d+) \(pid (\d+)\)")
#: The line proj/celery.py logs in the worker process before its pool starts.
WORKER_DB_LINE = re.compile(
    r"proj: worker (\S+) \(pid (\d+)\) uses (\w+) database (\S+); its own connection: (.+)$",
    re.MULTILINE,
)


def python_bin() -> Path:
    """The bin directory of the Python running pytest: its ``celery`` and ``python``."""
    return Path(sys.executable).parent


def example_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that steers the example, plus *extra*."""
    env = {
        key: value for key, value in os.environ.items()
        if key not in _LEAKY and not key.startswith(_LEAKY_PREFIXES)
    }
    env["PATH"] = f"{python_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def copy_example(dest: Path) -> Path:
    """A copy of the example project at *dest* (no caches, no SQLite file)."""
    return Path(shutil.copytree(
        EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3"),
    ))


def run_checked(argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {result.returncode}\n--- stdout ---\n"
                    f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")
    return result


def parent_of(pid: int) -> int:
    """The parent pid of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


# -- packages and services ---------------------------------------------------------------


@pytest.fixture(scope="session")
def example_packages() -> None:
    """Django and psycopg2 in the Python running pytest (and so its workers)."""
    for module in ("django", "psycopg2"):
        try:
            __import__(module)
        except ImportError as exc:
            require_service(
                f"{module} is not installed ({exc}): pip install django psycopg2-binary "
                "pyyaml (nox -s install does)")


@pytest.fixture(scope="session")
def redis_dbs() -> None:
    """Redis DB 3 and 4 (this suite's; the other suites use DB 5-15) answer."""
    import redis

    for url in (BROKER_URL, RESULTS_URL):
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            require_service(f"Redis is not reachable at {url}: {exc}")
        finally:
            client.close()


@dataclass(frozen=True)
class Postgres:
    host: str
    port: str
    user: str
    name: str

    @property
    def url(self) -> str:
        """``DATABASE_URL`` for the example (a socket directory goes in ``?host=``)."""
        if self.host.startswith("/"):
            return f"postgres://{self.user}@:{self.port}/{self.name}?host={quote(self.host)}"
        return f"postgres://{self.user}@{self.host}:{self.port}/{self.name}"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run *sql* on the run's database on a connection of the test's own."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                dbname=self.name, connect_timeout=5)
        try:
            with conn, conn.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def backend_pids(self) -> set[int]:
        """The server processes connected to the run's database now, but this query's."""
        return {pid for (pid,) in self.query(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            self.name)}


@pytest.fixture(scope="session")
def postgres(example_packages: None) -> Iterator[Postgres]:
    """A database of this run's own, dropped (with its connections) at the end."""
    import psycopg2

    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    try:
        admin = psycopg2.connect(host=host, port=port, user=user, dbname="postgres",
                                 connect_timeout=3)
    except psycopg2.OperationalError as exc:
        require_service(f"PostgreSQL is not reachable at {host}:{port} as {user}: {exc}")
    admin.autocommit = True
    db = Postgres(host, port, user, f"forkguard_example_test_{uuid.uuid4().hex[:10]}")
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{db.name}"')
        yield db
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def example_dir(example_packages: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_example(tmp_path_factory.mktemp("example") / "django_project")


@pytest.fixture(scope="session")
def pg_env(postgres: Postgres, redis_dbs: None, example_dir: Path) -> dict[str, str]:
    """The example on the run's PostgreSQL database and Redis DB 3/4, migrated."""
    env = example_env(DJANGO_DB="postgres", DATABASE_URL=postgres.url,
                      CELERY_BROKER_URL=BROKER_URL, CELERY_RESULT_BACKEND=RESULTS_URL)
    run_checked([sys.executable, "manage.py", "migrate", "--noinput"], example_dir, env)
    return env


@pytest.fixture(scope="session")
def sqlite_env(redis_dbs: None, example_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The example on a SQLite file and Redis DB 3/4, migrated."""
    path = tmp_path_factory.mktemp("sqlite") / "example.sqlite3"
    env = example_env(DJANGO_DB="sqlite", SQLITE_PATH=str(path),
                      CELERY_BROKER_URL=BROKER_URL, CELERY_RESULT_BACKEND=RESULTS_URL)
    run_checked([sys.executable, "manage.py", "migrate", "--noinput"], example_dir, env)
    return env


@pytest.fixture(scope="session")
def client(redis_dbs: None) -> Iterator[Celery]:
    app = Celery("forkguard-example-tests", broker=BROKER_URL, backend=RESULTS_URL,
                 set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    yield app
    app.close()


# -- processes ---------------------------------------------------------------------------


class Process:
    """A command running in a session of its own, its output in a log file.

    *queue* and *hostname* are the worker's (``CELERY_WORKER_QUEUES`` and
    ``CELERY_WORKER_HOSTNAME`` in *env*): :func:`send` sends there.
    """

    def __init__(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                 log_path: Path, queue: str, hostname: str) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.queue = queue
        self.hostname = hostname
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._generations: dict[int, int] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 8000) -> str:
        return self.log()[-chars:]

    def wait_log(self, pattern: str, timeout: float = BOOT_TIMEOUT, count: int = 1,
                 exited_ok: bool = False) -> list[re.Match[str]]:
        """The matches of *pattern* once there are *count*.

        Fails early if the process exits first, unless *exited_ok* (a shell
        that died while the program it started still writes to the log).
        """
        regex = re.compile(pattern, re.MULTILINE)

        def found() -> Optional[list[re.Match[str]]]:
            exited = self.proc.poll() is not None and not exited_ok
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches
            if exited:
                raise AssertionError(f"{self.argv} exited ({self.proc.returncode}) before "
                                     f"logging {pattern!r}\n--- log ---\n{self.tail()}")
            return None

        try:
            return wait_for(found, timeout=timeout, message=f"{pattern!r} in the log")
        except AssertionError as exc:
            if "--- log ---" in str(exc):
                raise
            raise AssertionError(f"{exc}\n--- log ---\n{self.tail()}") from None

    def generations(self) -> dict[int, int]:
        """Generation number -> pid, from the starter's "started generation N (pid P)" lines."""
        for match in _STARTED.finditer(self.log()):
            self._generations[int(match.group(1))] = int(match.group(2))
        return dict(self._generations)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.argv} still runs {timeout}s later\n--- log ---\n"
                                 f"{self.tail()}") from None

    def terminate(self, group: bool = True, timeout: float = STOP_TIMEOUT) -> int:
        """TERM the process (or its whole group) and return its exit status."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                os.kill(self.pid, signal.SIGTERM)
        return self.wait_exit(timeout)

    def clean_up(self) -> list[int]:
        """Stop the session (TERM, then KILL), then kill each generation's; return leftovers.

        A starter's generations run in sessions of their own: they are found
        by the pids the starter logged.
        """
        leftovers = stop_session(self.proc, STOP_TIMEOUT)
        sessions = set(self.generations().values())
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(session_pids(sid) for sid in sessions), timeout=5.0)
        for sid in sessions:
            for pid in session_pids(sid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                leftovers.append(pid)
        return leftovers


class Processes:
    """Starts :class:`Process` es; :meth:`close` stops them and reports what was left."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Process] = []
        self.token = f"fgexample-{uuid.uuid4().hex[:10]}"

    def start(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
              name: str = "worker") -> Process:
        label = f"{self.token}-{len(self.started) + 1}"
        queue, hostname = label, f"{label}@localhost"
        env = {**env, "CELERY_WORKER_QUEUES": queue, "CELERY_WORKER_HOSTNAME": hostname}
        process = Process(argv, cwd, env, self.logs / f"{name}-{label}.log", queue, hostname)
        self.started.append(process)
        return process

    def close(self) -> None:
        left = {tuple(p.argv): p.clean_up() for p in self.started}
        left = {argv: pids for argv, pids in left.items() if pids}
        forget_keys(self.token)
        for process in self.started:  # pytest shows them when a test failed
            print(f"--- log of {' '.join(process.argv)} ---\n{process.tail()}")
        assert not left, f"processes outlived their worker (killed now): {left}"


def forget_keys(token: str) -> None:
    """Delete what kombu left in the broker for this run's queues (bindings, leftovers)."""
    import redis

    broker = redis.Redis.from_url(BROKER_URL)
    try:
        keys = list(broker.scan_iter(match=f"*{token}*"))
        if keys:
            broker.delete(*keys)
    finally:
        broker.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.close()


def wait_ping(client: Celery, process: Process, timeout: float = BOOT_TIMEOUT) -> None:
    """Wait until the worker answers a ping; fail with the log if *process* exits first."""
    hostname = process.hostname

    def answers() -> bool:
        if process.proc.poll() is not None:
            raise AssertionError(f"worker exited with {process.proc.returncode}\n--- log ---\n"
                                 f"{process.tail()}")
        return bool(client.control.ping(destination=[hostname], timeout=0.5))

    try:
        wait_for(answers, timeout=timeout, message=f"{hostname} to answer a ping")
    except AssertionError as exc:
        if "--- log ---" in str(exc):
            raise
        raise AssertionError(f"{exc}\n--- log ---\n{process.tail()}") from None


def call(client: Celery, process: Process, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run task ``counters.tasks.<name>`` on *process*'s queue and return its result."""
    return gather(process, [send(client, process, name, *args, **kwargs)])[0]


def send(client: Celery, process: Process, name: str, *args: Any, **kwargs: Any) -> AsyncResult:
    return client.send_task(f"counters.tasks.{name}", args=args, kwargs=kwargs,
                            queue=process.queue)


def gather(process: Process, results: Sequence[AsyncResult]) -> list[Any]:
    """The results of *results*, in order; a failure shows the worker's log."""
    values = []
    for result in results:
        try:
            values.append(result.get(timeout=TASK_TIMEOUT))
        except Exception as exc:
            raise AssertionError(f"task {result.id} failed: {exc!r}\n--- worker log ---\n"
                                 f"{process.tail()}") from exc
        finally:
            result.forget()
    return values
