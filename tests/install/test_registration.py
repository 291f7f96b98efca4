"""``forkguard`` is a pool name wherever Celery takes one, from an installed copy.

Every test runs the ``celery`` command of a clean virtualenv into which the
package was ``pip install``-ed (see ``conftest.py``), from a directory outside
the repository, so nothing but the installed distribution can register the pool.

The Django tests run a copy of ``examples/django_project`` (on SQLite, so the
virtualenv needs no PostgreSQL driver) with the probe app ``fgprobe`` added
beside it: the pool comes from the example's ``CELERY_WORKER_POOL`` alone.
"""

from __future__ import annotations

import configparser
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.install.conftest import (
    INSTALL_TEST_TIMEOUT,
    REDIS_BROKER_URL,
    REDIS_RESULTS_URL,
    InstalledVenv,
    StartWorker,
    Worker,
    inspect_stats_cli,
)

pytestmark = [pytest.mark.install, pytest.mark.timeout(INSTALL_TEST_TIMEOUT)]

HERE = Path(__file__).resolve().parent
EXAMPLE_PROJECT = HERE.parents[1] / "examples" / "django_project"
PROBE_APP = HERE / "fgprobe"

#: A plain Celery app; FG_CONFIG_POOL selects the pool through the configuration.
PLAIN_APP = '''\
import os

from celery import Celery

app = Celery("fgplain", broker=os.environ["FG_BROKER_URL"], backend=os.environ["FG_RESULT_URL"])
app.conf.broker_connection_retry_on_startup = False
if os.environ.get("FG_CONFIG_POOL"):
    app.conf.worker_pool = os.environ["FG_CONFIG_POOL"]


@app.task(name="fgplain.whoami")
def whoami():
    import celery_forkguard

    return {"pid": os.getpid(), "ppid": os.getppid(), "package": celery_forkguard.__file__}
'''


@pytest.fixture
def plain_app(tmp_path: Path) -> Path:
    """A directory outside the repository holding ``fgplain.py``."""
    home = tmp_path / "plain"
    home.mkdir()
    (home / "fgplain.py").write_text(PLAIN_APP)
    return home


@dataclass(frozen=True)
class DjangoProject:
    home: Path
    env: dict[str, str]


@pytest.fixture
def django_project(tmp_path: Path) -> DjangoProject:
    """A copy of the example project with the probe app, outside the repository."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3")
    home = Path(shutil.copytree(EXAMPLE_PROJECT, tmp_path / "django_project", ignore=skip))
    shutil.copytree(PROBE_APP, home / "fgprobe", ignore=skip)
    return DjangoProject(home, {
        "DJANGO_SETTINGS_MODULE": "fgprobe.settings",
        "DJANGO_DB": "sqlite",
        "SQLITE_PATH": str(tmp_path / "example.sqlite3"),
        "CELERY_BROKER_URL": REDIS_BROKER_URL,
        "CELERY_RESULT_BACKEND": REDIS_RESULTS_URL,
    })


def assert_fresh_children(
    worker: Worker, client: Celery, task: str, installed: InstalledVenv,
) -> None:
    """Two runs of *task*: each in its own child, from the installed copy.

    The child's parent is the worker's fork server, whose parent is the worker.
    """
    first, second = worker.call(client, task), worker.call(client, task)
    for run in (first, second):
        assert parent_of(run["ppid"]) == worker.pid, (run, worker.pid)
        assert run["pid"] != worker.pid
        assert Path(run["package"]).is_relative_to(installed.root), run["package"]
    assert first["pid"] != second["pid"], "each task gets a fresh fork"


def parent_of(pid: int) -> int:
    """The parent pid of a live process, read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def pool_implementation(client: Celery, worker: Worker) -> str:
    stats: dict[str, Any] = client.control.inspect([worker.hostname], timeout=10).stats() or {}
    assert worker.hostname in stats, f"no stats from {worker.hostname}\n{worker.log()}"
    return str(stats[worker.hostname]["pool"]["implementation"])


def assert_forkguard_implementation(implementation: str, installed: InstalledVenv) -> None:
    assert implementation == installed.pool_implementation
    # Celery's Django fixup looks for "prefork" in the pool's module name.
    assert implementation.startswith("celery_forkguard.prefork"), implementation
    assert implementation.endswith(":TaskPool"), implementation


# -- the distribution ------------------------------------------------------------


def test_the_venv_is_clean_and_the_package_is_not_editable(
    installed: InstalledVenv, tmp_path: Path,
) -> None:
    cfg = configparser.ConfigParser()
    cfg.read_string("[venv]\n" + (installed.root / "pyvenv.cfg").read_text())
    assert cfg["venv"]["include-system-site-packages"].strip() == "false"

    where = installed.run(
        installed.python, "-c",
        "import celery_forkguard, celery_forkguard.prefork as p; "
        "print(celery_forkguard.__file__); print(p.__file__)",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert "site-packages" in Path(path).parts, path
        assert Path(path).is_relative_to(installed.root), path

    site = Path(where.stdout.split()[0]).parent.parent
    assert not list(site.glob("__editable__*celery_forkguard*")), "an editable install"


def test_celery_forkguard_command_is_installed(installed: InstalledVenv, tmp_path: Path) -> None:
    listed = installed.run(installed.celery, "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\s+forkguard\b", listed.stdout, re.MULTILINE), listed.stdout

    helped = installed.run(installed.celery, "forkguard", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "Usage: celery forkguard" in helped.stdout, helped.stdout


def test_worker_help_lists_forkguard_among_the_pools(
    installed: InstalledVenv, tmp_path: Path,
) -> None:
    helped = installed.run(installed.celery, "worker", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    # click renders a Choice as "-P, --pool [prefork|eventlet|...]".
    match = re.search(r"--pool\s+\[([^\]]+)\]", helped.stdout)
    assert match, helped.stdout
    choices = match.group(1).split("|")
    assert "forkguard" in choices and "prefork" in choices, choices


# -- workers ---------------------------------------------------------------------


@pytest.mark.redis
def test_dash_p_forkguard_runs_each_task_in_a_fresh_child(
    start_worker: StartWorker, client: Celery, installed: InstalledVenv, plain_app: Path,
) -> None:
    worker = start_worker("fgplain", plain_app, "-P", "forkguard")
    assert_fresh_children(worker, client, "fgplain.whoami", installed)
    assert_forkguard_implementation(pool_implementation(client, worker), installed)


@pytest.mark.redis
def test_worker_pool_in_the_app_config_selects_forkguard_without_dash_p(
    start_worker: StartWorker, client: Celery, installed: InstalledVenv, plain_app: Path,
) -> None:
    worker = start_worker("fgplain", plain_app, env={"FG_CONFIG_POOL": "forkguard"})
    assert_forkguard_implementation(pool_implementation(client, worker), installed)
    assert_fresh_children(worker, client, "fgplain.whoami", installed)


@pytest.mark.redis
def test_django_celery_worker_pool_setting_selects_forkguard(
    start_worker: StartWorker, client: Celery, installed: InstalledVenv,
    django_project: DjangoProject,
) -> None:
    worker = start_worker("proj", django_project.home, env=django_project.env)
    stats = inspect_stats_cli(installed, worker, "proj")
    assert_forkguard_implementation(stats["pool"]["implementation"], installed)
    assert_fresh_children(worker, client, "fgdjango.whoami", installed)


@pytest.mark.redis
def test_django_fixup_treats_forkguard_as_a_forking_pool(
    start_worker: StartWorker, client: Celery, installed: InstalledVenv,
    django_project: DjangoProject,
) -> None:
    worker = start_worker("proj", django_project.home, env=django_project.env)
    state = worker.call(client, "fgdjango.fixup_state")
    assert state["pid"] != worker.pid
    assert state["django_fixups"] == 1, state
    assert state["worker_fixup"] and state["worker"], f"on_worker_init did not run: {state}"
    assert state["pool_cls"] == installed.pool_implementation, state
    assert state["has_is_prefork"], f"this Celery's DjangoWorkerFixup has no _is_prefork: {state}"
    assert state["is_prefork"] is True, state
