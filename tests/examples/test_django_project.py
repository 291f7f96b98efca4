"""The example Django project on a real worker: the pool from settings, ORM tasks, connections.

One worker per database (PostgreSQL, then SQLite) serves every test of the
module: ``celery -A proj worker -c 3`` from a copy of the example, with no
``-P`` and no ``CELERY_WORKER_POOL`` in its environment, so the pool can
only come from ``CELERY_WORKER_POOL`` in ``proj/settings.py``.  Tasks go
through Redis DB 3 (results in DB 4), on a queue of the worker's own.
"""

from __future__ import annotations

import ast
import json
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from celery import Celery

from tests.harness import wait_for

from .conftest import (
    EXAMPLE,
    TASK_TIMEOUT,
    TEST_TIMEOUT,
    WORKER_DB_LINE,
    Postgres,
    Process,
    Processes,
    call,
    gather,
    parent_of,
    python_bin,
    send,
    wait_ping,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(TEST_TIMEOUT)]

#: How many tasks the connection test sends at once (the worker runs 3 at a time).
FORKS = 8


@dataclass
class ExampleWorker:
    process: Process
    cwd: Path
    env: dict[str, str]
    postgres: Optional[Postgres]
    #: What the worker process itself connected to, from the line proj/celery.py logs.
    vendor: str
    own_connection: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def counter_in_db(self, name: str) -> Optional[int]:
        """The counter's value read straight from the database, not through the worker."""
        sql = "SELECT value FROM counters_counter WHERE name = {}"
        if self.postgres is not None:
            rows: list[Any] = self.postgres.query(sql.format("%s"), name)
        else:
            with sqlite3.connect(self.env["SQLITE_PATH"]) as db:
                rows = db.execute(sql.format("?"), (name,)).fetchall()
        return rows[0][0] if rows else None


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def worker(request: pytest.FixtureRequest, client: Celery, example_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleWorker]:
    database = request.param
    env = request.getfixturevalue(f"{'pg' if database == 'postgres' else 'sqlite'}_env")
    postgres = request.getfixturevalue("postgres") if database == "postgres" else None
    argv = [str(python_bin() / "celery"), "-A", "proj", "worker", "-l", "info", "-c", "3",
            "--without-gossip", "--without-mingle"]
    # Nothing but the settings can choose the pool.
    assert not {"-P", "--pool"} & set(argv) and "CELERY_WORKER_POOL" not in env
    processes = Processes(tmp_path_factory.mktemp(f"worker-{database}"))
    try:
        process = processes.start(argv, example_dir, env, name=f"worker-{database}")
        wait_ping(client, process)
        line = WORKER_DB_LINE.search(process.log())
        assert line, f"the worker did not log its database\n{process.tail()}"
        assert int(line.group(2)) == process.pid, line.group(0)
        yield ExampleWorker(process, example_dir, env, postgres,
                            vendor=line.group(3), own_connection=line.group(5).strip())
        assert process.terminate() == 0, process.tail()
    finally:
        processes.close()


# -- the project -------------------------------------------------------------------------


def test_the_project_never_imports_celery_forkguard() -> None:
    """The pool is named in the settings; nothing in the project imports the package."""
    imported: dict[str, set[str]] = {}
    for path in EXAMPLE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            else:
                continue
            imported.setdefault(str(path.relative_to(EXAMPLE)), set()).update(names)
    assert "proj/settings.py" in imported and "counters/tasks.py" in imported, imported
    offending = {
        path: sorted(n for n in names if n.split(".")[0] in ("celery_forkguard", "forkguard"))
        for path, names in imported.items()
    }
    assert not {path: names for path, names in offending.items() if names}
    settings = (EXAMPLE / "proj" / "settings.py").read_text()
    assert re.search(r'^CELERY_WORKER_POOL = "forkguard"$', settings, re.MULTILINE)
    celery_module = (EXAMPLE / "proj" / "celery.py").read_text()
    assert 'app.config_from_object("django.conf:settings", namespace="CELERY")' in celery_module


def test_the_pool_comes_from_the_settings_alone(worker: ExampleWorker, client: Celery) -> None:
    hostname = worker.process.hostname
    stats = client.control.inspect([hostname], timeout=10).stats() or {}
    assert hostname in stats, f"no stats from {hostname}\n{worker.process.tail()}"
    implementation = stats[hostname]["pool"]["implementation"]
    assert implementation == "celery_forkguard.prefork.forkguard:TaskPool", implementation
    assert re.search(r"concurrency: 3 \(forkguard\)", worker.process.log())


# -- ORM tasks ----------------------------------------------------------------------------


def test_orm_tasks_round_trip(worker: ExampleWorker, client: Celery) -> None:
    """Create, increment from concurrent forks, read; the rows are really in the database."""
    name = f"orm-{uuid.uuid4().hex[:8]}"
    created = call(client, worker.process, "create_counter", name)
    assert created["name"] == name and created["value"] == 0, created

    sent = [send(client, worker.process, "increment", name, 2) for _ in range(10)]
    increments = gather(worker.process, sent)
    # Every UPDATE added 2 to what the last one left: none was lost.
    assert sorted(increments)[-1] == 20 and all(value % 2 == 0 for value in increments)

    rows = call(client, worker.process, "read_counters", name)
    assert [(row["name"], row["value"]) for row in rows] == [(name, 20)], rows
    assert rows[0]["last_pid"] != worker.pid
    assert worker.counter_in_db(name) == 20

    missing = send(client, worker.process, "increment", f"missing-{name}")
    with pytest.raises(Exception) as raised:
        missing.get(timeout=TASK_TIMEOUT)
    missing.forget()
    assert type(raised.value).__name__.endswith("DoesNotExist"), raised.value
    assert f"missing-{name}" in str(raised.value)


def test_the_web_side_enqueues_with_the_same_settings(
    worker: ExampleWorker, client: Celery,
) -> None:
    """The view sends the task with the broker of Django's settings; the worker runs it.

    (The script routes it to the test worker's queue, as the test sends its own.)
    """
    name = f"web-{uuid.uuid4().hex[:8]}"
    call(client, worker.process, "create_counter", name)
    script = (
        "import json, django\n"
        "django.setup()\n"
        "from django.test import Client\n"
        "from django.test.utils import setup_test_environment\n"
        "setup_test_environment()\n"
        "from proj.celery import app\n"
        f"app.conf.task_default_queue = {worker.process.queue!r}\n"
        "web = Client()\n"
        "listed = web.get('/counters/').json()\n"
        f"posted = web.post('/counters/{name}/increment/?by=5')\n"
        "print(json.dumps({'listed': listed, 'status': posted.status_code, "
        "'body': posted.json()}))\n"
    )
    env = {**worker.env, "DJANGO_SETTINGS_MODULE": "proj.settings"}
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=worker.cwd, env=env, capture_output=True,
        text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    assert {"name": name, "value": 0} in [
        {"name": c["name"], "value": c["value"]} for c in answer["listed"]["counters"]
    ], answer
    assert answer["status"] == 202, answer
    result = client.AsyncResult(answer["body"]["task_id"])
    assert gather(worker.process, [result]) == [5]
    assert worker.counter_in_db(name) == 5


# -- connections --------------------------------------------------------------------------


def test_each_task_runs_in_a_fresh_fork_with_a_connection_of_its_own(
    worker: ExampleWorker, client: Celery,
) -> None:
    """N tasks at once: N processes, N database connections, none of them the worker's.

    The worker process connected before its pool started (proj/celery.py), so
    the fork server and every task's child inherited that connection: each
    task still starts without a connection, opens its own, and the worker's
    connection is still open afterwards, untouched by its children.
    """
    sent = [send(client, worker.process, "connection_info") for _ in range(FORKS)]
    infos = gather(worker.process, sent)

    pids = [info["pid"] for info in infos]
    assert len(set(pids)) == FORKS, f"a process ran two tasks: {pids}"
    assert worker.pid not in pids
    for info in infos:
        # Forked from the worker's fork server (or from the worker itself).
        assert worker.pid in (info["ppid"], parent_of(info["ppid"])), (info, worker.pid)
        assert info["connected_at_start"] is False, f"a task found a connection open: {info}"
        assert info["vendor"] == worker.vendor

    connections = [info["connection"] for info in infos]
    assert len(set(connections)) == FORKS, f"two forks shared a connection: {connections}"
    assert worker.own_connection not in connections, "a task used the worker's connection"

    if worker.postgres is None:
        return
    backends = {info["backend_pid"] for info in infos}
    assert len(backends) == FORKS, f"two forks shared a PostgreSQL backend: {infos}"
    own = re.match(r"postgresql backend (\d+) ", worker.own_connection)
    assert own, worker.own_connection
    own_backend = int(own.group(1))
    assert own_backend not in backends

    def only_the_workers_connection_left() -> bool:
        connected = worker.postgres.backend_pids()  # type: ignore[union-attr]
        return own_backend in connected and not connected & backends

    wait_for(only_the_workers_connection_left, timeout=TASK_TIMEOUT,
             message="the tasks' connections to close and the worker's to stay open")
