"""Fixtures for the tests of an *installed* celery-forkguard.

The package registers itself with Celery through an entry point and an
import-time side effect; an editable install or the repository on
``sys.path`` can hide a packaging mistake (a sub-package left out of the
wheel, a missing entry point).  So these tests build a clean virtualenv (no
system site-packages), ``pip install`` a copy of the repository into it (not
editable) with Django and ``celery[redis]``, and drive the real ``celery`` command of
that virtualenv in subprocesses, from a directory outside the repository.

The virtualenv is cached in pytest's cache directory, keyed by a hash of
``pyproject.toml``, the package files and the interpreter version, so reruns
reuse it; any change to the package builds a fresh one.  Building it needs
PyPI (or the index pip is configured for).

Fixtures
--------
``installed`` (session)
    An :class:`InstalledVenv`: paths of the virtualenv and the pool class
    path the ``forkguard`` alias resolves to in it.
``redis_db`` (session)
    Checks Redis is reachable: skips (or fails when ``CI`` is ``true``).
``client`` (function)
    A Celery app in the test process that sends tasks and remote-control
    commands to the workers (broker Redis DB 14, results DB 15).
``start_worker`` (function)
    A factory that starts ``celery ... worker`` from the virtualenv in a new
    session and returns once it answers a ping; teardown stops the session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
import pytest
from celery import Celery
from celery.result import AsyncResult

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "celery_forkguard"
DISTRIBUTION = "celery-forkguard"
#: What pip installs next to the package: Django for the example Django project
#: (examples/django_project, run on SQLite) and
#: Celery's Redis extra (redis-py, and packaging, which kombu's Redis transport
#: imports); Celery itself comes as the package's dependency.
EXTRA_REQUIREMENTS = ("django", "celery[redis]")

REDIS_BROKER_URL = "redis://127.0.0.1:6379/14"
REDIS_RESULTS_URL = "redis://127.0.0.1:6379/15"

PIP_TIMEOUT = 540.0
WORKER_BOOT_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 20.0
TASK_TIMEOUT = 30.0
#: Build the venv inside the timeout of whichever test comes first.
INSTALL_TEST_TIMEOUT = int(PIP_TIMEOUT + 120)

#: Variables that would make the venv's Python or Celery see something else
#: than the installed copy and the settings the tests give.
_LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
_LEAKY_PREFIXES = ("CELERY_", "DJANGO_", "FORKED_BY_MULTIPROCESSING")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "install: runs the celery command of a clean venv with the package installed",
    )


# -- waiting ---------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.1,
) -> T:
    """Poll *predicate* until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)  # a polling interval, not a synchronisation


def need_service(reason: str) -> None:
    """A service the test needs is missing: fail loudly on CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


# -- the virtualenv ----------------------------------------------------------------


@dataclass(frozen=True)
class InstalledVenv:
    root: Path
    #: ``module:Class`` that the ``forkguard`` alias resolves to in this venv.
    pool_implementation: str

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def celery(self) -> Path:
        return self.bin / "celery"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a shell that activated only this venv."""
        env = {
            key: value for key, value in os.environ.items()
            if key not in _LEAKY_ENV and not key.startswith(_LEAKY_PREFIXES)
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        env["PYTHONNOUSERSITE"] = "1"  # no ~/.local packages either
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(extra)
        return env

    def run(
        self, *args: str | Path, cwd: Path, timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in args], cwd=cwd, env=env or self.env(), timeout=timeout,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )


def package_files() -> list[Path]:
    """What pip builds the distribution from: metadata, package, top-level docs."""
    files = [REPO_ROOT / "pyproject.toml"]
    files += sorted(
        path for path in REPO_ROOT.iterdir()
        if path.is_file() and path.name.upper().startswith(("README", "LICENSE", "MANIFEST"))
    )
    files += sorted(
        path for path in (REPO_ROOT / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    return files


def copy_sources(dest: Path) -> Path:
    # pip builds a local directory in place, leaving build/ and *.egg-info
    # behind: build from a copy so the working tree stays untouched.
    for path in package_files():
        target = dest / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def source_digest(sources: Path) -> str:
    """Hash of the copied sources (not the live tree, which may change meanwhile)."""
    digest = hashlib.sha256()
    digest.update(f"{sys.version}\0{sys.platform}\0{EXTRA_REQUIREMENTS}\0".encode())
    for path in sorted(p for p in sources.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(sources)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        pytest.fail(
            f"{what} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}",
        )


def build_venv(root: Path, sources: Path) -> None:
    """A clean venv with the package installed from *sources* (not editable)."""
    # sys.executable may itself be a venv's python: venv then bases the new
    # one on the interpreter underneath, without this venv's packages.
    _check(
        subprocess.run(
            [sys.executable, "-m", "venv", str(root)],
            capture_output=True, text=True, timeout=120, check=False,
        ),
        "python -m venv",
    )
    pip = [
        str(root / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
        "--no-input", str(sources), *EXTRA_REQUIREMENTS,
    ]
    env = {key: value for key, value in os.environ.items() if key not in _LEAKY_ENV}
    env["PYTHONNOUSERSITE"] = "1"
    installing = subprocess.run(
        pip, capture_output=True, text=True, timeout=PIP_TIMEOUT, env=env, check=False,
    )
    _check(installing, " ".join(pip))


RESOLVE_ALIAS = (
    "import celery_forkguard\n"
    "from celery.concurrency import get_implementation\n"
    "cls = get_implementation('forkguard')\n"
    "print(f'{cls.__module__}:{cls.__name__}')\n"
)


@pytest.fixture(scope="session")
def installed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> InstalledVenv:
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    base = Path(cache.mkdir("forkguard-install")) if cache else tmp_path_factory.mktemp("venvs")
    sources = copy_sources(tmp_path_factory.mktemp("forkguard-sources"))
    key = source_digest(sources)
    root = base / f"venv-{key}"
    complete = root / ".forkguard-complete"
    # Two pytest runs of one checkout may race for the cache: one builds.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            for stale in base.glob("venv-*"):  # half-built, or built from older sources
                shutil.rmtree(stale)
            build_venv(root, sources)
            complete.write_text(key)
    scratch = tmp_path_factory.mktemp("outside-repo")
    bare = InstalledVenv(root, pool_implementation="")
    resolved = bare.run(bare.python, "-c", RESOLVE_ALIAS, cwd=scratch)
    _check(resolved, "resolving the forkguard alias in the venv")
    return InstalledVenv(root, resolved.stdout.strip())


# -- Redis and workers -----------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_db() -> None:
    import redis

    for url in (REDIS_BROKER_URL, REDIS_RESULTS_URL):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            need_service(f"Redis is not reachable at {url}: {exc}")


@pytest.fixture
def client(redis_db: None) -> Iterator[Celery]:
    app = Celery("forkguard-install-client", broker=REDIS_BROKER_URL, backend=REDIS_RESULTS_URL)
    app.conf.broker_connection_retry_on_startup = False
    yield app
    app.close()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    token: str  # in the hostname and the queue name: unique to this worker
    hostname: str
    queue: str
    log_path: Path
    cwd: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, client: Celery, name: str) -> Any:
        """Run task *name* on this worker and return its result."""
        result: AsyncResult = client.send_task(name, queue=self.queue)
        try:
            return result.get(timeout=TASK_TIMEOUT)
        except Exception as exc:
            raise AssertionError(
                f"task {name} failed: {exc!r}\n--- worker log ---\n{self.log()}",
            ) from exc
        finally:
            result.forget()


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of session *sid* (forkguard's children keep the session)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if proc.status() != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
    return found


def stop_worker(worker: Worker) -> list[str]:
    """SIGTERM the worker's group, SIGKILL after a deadline; kill what is left.

    Returns the processes that outlived the worker, so the test can fail on them.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.proc.wait(timeout=WORKER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.proc.wait(timeout=WORKER_STOP_TIMEOUT)
    leftovers = session_processes(worker.pid)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=WORKER_STOP_TIMEOUT)
    return [f"{proc.pid}" for proc in leftovers]


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(
    installed: InstalledVenv, client: Celery, tmp_path: Path,
) -> Iterator[StartWorker]:
    workers: list[Worker] = []

    def start(
        app: str, cwd: Path, *worker_args: str, env: dict[str, str] | None = None,
    ) -> Worker:
        token = uuid.uuid4().hex[:12]
        hostname = f"fg-install-{token}@localhost"
        queue = f"fg-install-{token}"
        log_path = tmp_path / f"worker-{token}.log"
        full_env = installed.env(
            FG_BROKER_URL=REDIS_BROKER_URL, FG_RESULT_URL=REDIS_RESULTS_URL, **(env or {}),
        )
        command = [
            str(installed.celery), "-A", app, "worker", "-n", hostname, "-Q", queue,
            "-c", "2", "-l", "info", "--without-gossip", "--without-mingle",
            "--without-heartbeat", *worker_args,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        worker = Worker(proc, token, hostname, queue, log_path, cwd, full_env)
        workers.append(worker)
        wait_until_ready(worker, client)
        return worker

    yield start
    left = {worker.hostname: stop_worker(worker) for worker in workers}
    forget_queues(workers)
    left = {host: pids for host, pids in left.items() if pids}
    assert not left, f"processes outlived their worker (killed now): {left}"


def forget_queues(workers: list[Worker]) -> None:
    """Drop what kombu keeps in Redis for each worker's queue (bindings, leftovers)."""
    import redis

    broker = redis.Redis.from_url(REDIS_BROKER_URL)
    try:
        for worker in workers:
            keys = list(broker.scan_iter(match=f"*{worker.token}*"))
            if keys:
                broker.delete(*keys)
    finally:
        broker.close()


def wait_until_ready(worker: Worker, client: Celery) -> None:
    def answers() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(
                f"worker exited with {worker.proc.returncode} before answering a ping\n"
                f"--- worker log ---\n{worker.log()}",
            )
        return bool(client.control.ping(destination=[worker.hostname], timeout=0.5))

    try:
        wait_for(answers, WORKER_BOOT_TIMEOUT, f"{worker.hostname} to answer a ping")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{worker.log()}") from None


def inspect_stats_cli(installed: InstalledVenv, worker: Worker, app: str) -> dict[str, Any]:
    """``celery -A APP inspect stats --json`` for this worker, run from the venv."""
    import json

    result = installed.run(
        installed.celery, "-A", app, "inspect", "stats", "-d", worker.hostname, "-t", "10",
        "--json", cwd=worker.cwd, env=worker.env,
    )
    _check(result, "celery inspect stats")
    replies: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return replies[worker.hostname]
