"""The example's deploy files, each tested to start: Procfile, systemd unit, docker-compose.

- ``Procfile``: its ``release:`` and ``worker:`` lines run as a Procfile
  runner runs them (``sh -c LINE``, the environment substituted by the
  shell) against Redis and PostgreSQL; a task round-trips; TERM to the
  process group stops the starter with exit 0 and nothing left over.
- ``forkguard-worker.service``: parsed as systemd reads it; ``ExecStart`` runs
  with its paths substituted (the virtualenv: the one running pytest; the
  release symlink and the environment file: temporary ones), in
  ``WorkingDirectory``, with ``Environment=`` and ``EnvironmentFile=``;
  ``ExecReload`` (``HUP``) after the symlink moved to a new release starts
  generation 2 there, which takes over; ``KillSignal`` to the main process
  (``KillMode=mixed``) stops it within ``TimeoutStopSec``.  ``User=`` and
  ``Restart=`` are not simulated.
- ``docker-compose.yml`` (no Docker here): parsed; the worker's command is the
  Procfile's ``worker:`` line and the image's ``CMD``, the migrate service's
  the ``release:`` line; every variable it sets is read by
  ``proj/settings.py`` or by forkguard, and Django's settings evaluated with
  that environment point at the compose services.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_forkguard.settings import SETTINGS, load_settings
from tests.harness import require_service, session_pids, wait_for

from .conftest import (
    BROKER_URL,
    EXAMPLE,
    RESULTS_URL,
    STOP_TIMEOUT,
    TEST_TIMEOUT,
    Postgres,
    Processes,
    call,
    copy_example,
    example_env,
    parent_of,
    python_bin,
    run_checked,
)

pytestmark = [pytest.mark.timeout(TEST_TIMEOUT)]

PROCFILE = EXAMPLE / "Procfile"
UNIT = EXAMPLE / "forkguard-worker.service"
COMPOSE = EXAMPLE / "docker-compose.yml"
DOCKERFILE = EXAMPLE / "Dockerfile"

#: The unit's paths and what the test puts in their place.
UNIT_VENV_BIN = "/srv/forkguard-example/venv/bin"
UNIT_CURRENT = "/srv/forkguard-example/current"
UNIT_ETC = "/etc/forkguard-example"

CONSUMING = r"generation {n} \(pid (\d+)\) is consuming"


# -- parsing ------------------------------------------------------------------------------


def procfile_entries(path: Path) -> dict[str, str]:
    """``name: command`` lines, as foreman, honcho and Heroku read them."""
    entries = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip())
        assert match, f"not a Procfile line: {line!r}"
        entries[match.group(1)] = match.group(2)
    return entries


@dataclass
class Unit:
    """A systemd unit file: each section's ``key=value`` lines, in order, repeats kept."""

    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def all(self, section: str, key: str) -> list[str]:
        return [value for k, value in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str:
        values = self.all(section, key)
        assert values, f"[{section}] has no {key}="
        return values[-1]  # the last assignment wins, as in systemd


def parse_unit(text: str) -> Unit:
    """systemd's syntax as far as the example uses it: sections, comments, continuations."""
    unit = Unit()
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        key, sep, value = line.partition("=")
        assert section is not None and sep, f"not a unit line: {raw!r}"
        unit.sections[section].append((key.strip(), value.strip()))
    return unit


def unit_environment(unit: Unit, substitute: dict[str, str]) -> dict[str, str]:
    """``Environment=`` lines, then ``EnvironmentFile=`` files over them, as systemd does."""
    env: dict[str, str] = {}
    for value in unit.all("Service", "Environment"):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = substituted(val, substitute)
    for value in unit.all("Service", "EnvironmentFile"):
        optional = value.startswith("-")
        path = Path(substituted(value.lstrip("-"), substitute))
        if not path.exists():
            assert optional, f"EnvironmentFile={value} does not exist"
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith(("#", ";")):
                key, _, val = line.partition("=")
                env[key.strip()] = val.strip().strip('"')
    return env


def substituted(text: str, substitute: dict[str, str]) -> str:
    for unit_path, local in substitute.items():
        text = text.replace(unit_path, local)
    return text


def command_line(value: str, env: dict[str, str]) -> list[str]:
    """An ``Exec*=`` value as systemd runs it: no shell, ``$VAR``/``${VAR}`` expanded."""
    argv = shlex.split(value.lstrip("@-:+!"))

    def expand(word: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                      lambda m: env.get(m.group(1) or m.group(2), ""), word)

    return [expand(word) for word in argv]


def read_compose() -> dict[str, Any]:
    try:
        import yaml
    except ImportError as exc:
        require_service(f"PyYAML is not installed ({exc}): pip install pyyaml")
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def seconds(duration: str) -> float:
    """``40s``, ``1m30s``, ``90`` (systemd and compose durations) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|)", duration.strip())
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def variables_read_by(path: Path) -> set[str]:
    """Names read with ``os.environ.get("X")``, ``os.environ["X"]`` or ``os.getenv("X")``.

    And the values of string dicts handed to ``os.environ.get(var, ...)`` in
    a loop (the ``PG*`` names of ``postgres_from_pg_vars``).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args:
            target = ast.unparse(node.func)
            if target in ("os.environ.get", "os.getenv", "os.environ.setdefault"):
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(node.slice.value)
        elif isinstance(node, ast.Dict):
            values = node.values
            if values and all(isinstance(v, ast.Constant) and isinstance(v.value, str)
                              and v.value.startswith("PG") for v in values):
                names.update(v.value for v in values)  # type: ignore[union-attr]
    return names


#: Variables forkguard reads, from its own table of settings.
FORKGUARD_VARIABLES = {var for setting in SETTINGS for var in setting.env}
#: What Python itself reads.
PYTHON_VARIABLES = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


# -- the Procfile --------------------------------------------------------------------------


def test_procfile_release_and_worker_lines_run(
    pg_env: dict[str, str], postgres: Postgres, client: Celery, processes: Processes,
    tmp_path: Path,
) -> None:
    entries = procfile_entries(PROCFILE)
    assert set(entries) == {"release", "worker"}, entries
    assert re.match(r"celery -A proj (forkguard starter|worker -P forkguard)\b",
                    entries["worker"]), entries["worker"]
    home = copy_example(tmp_path / "app")

    # A Procfile runner hands each line to a shell (honcho: sh -c), which substitutes
    # the environment.
    run_checked(["sh", "-c", entries["release"]], home, pg_env)
    worker = processes.start(["sh", "-c", entries["worker"]], home, pg_env, name="procfile")
    generation = int(worker.wait_log(CONSUMING.format(n=1))[0].group(1))

    name = "procfile-counter"
    assert call(client, worker, "create_counter", name)["value"] == 0
    assert call(client, worker, "increment", name, 3) == 3
    info = call(client, worker, "connection_info")
    assert parent_of(info["ppid"]) == generation, (info, generation)
    assert postgres.query("SELECT value FROM counters_counter WHERE name = %s", name) == [(3,)]

    # Procfile runners stop a process with TERM to its group (Heroku: to every process).
    # The shell exits with the starter when it exec'd it (bash does), or dies of the
    # TERM itself (dash) while the starter, TERMed too, stops its generation.
    assert worker.terminate(group=True) in (0, -signal.SIGTERM), worker.tail()
    worker.wait_log(r"starter: every generation has exited; exit 0$", timeout=STOP_TIMEOUT,
                    exited_ok=True)
    wait_for(lambda: not session_pids(worker.pid) and not session_pids(generation),
             timeout=STOP_TIMEOUT, message="the starter and its generation to exit")


# -- the systemd unit ----------------------------------------------------------------------


def test_systemd_unit_starts_reloads_and_stops(
    pg_env: dict[str, str], postgres: Postgres, client: Celery, processes: Processes,
    tmp_path: Path,
) -> None:
    unit = parse_unit(UNIT.read_text())
    service = dict(unit.sections["Service"])
    assert unit.get("Service", "Type") == "simple"
    assert unit.get("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit.get("Service", "KillSignal") == "SIGTERM"
    assert unit.get("Service", "KillMode") == "mixed", "TERM must go to the starter alone"
    exec_start = unit.get("Service", "ExecStart")
    assert re.search(r" -A proj forkguard starter\b", exec_start), exec_start
    assert "Install" in unit.sections and "Unit" in unit.sections, unit.sections

    # The deploy layout: releases/rN, `current` -> the live one, an environment file.
    releases = tmp_path / "releases"
    first = copy_example(releases / "r1")
    current = tmp_path / "current"
    current.symlink_to(first)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "worker.env").write_text(
        "# what the test changes: its own database and Redis DBs\n"
        f"DATABASE_URL={postgres.url}\n"
        f"CELERY_BROKER_URL={BROKER_URL}\nCELERY_RESULT_BACKEND={RESULTS_URL}\n")
    substitute = {UNIT_VENV_BIN: str(python_bin()), UNIT_CURRENT: str(current),
                  UNIT_ETC: str(etc)}
    for value in (exec_start, service["WorkingDirectory"], service["EnvironmentFile"]):
        for word in shlex.split(value.lstrip("-")):
            if word.startswith("/"):
                assert any(word.startswith(p) for p in substitute), f"{word}: unknown path"

    env = unit_environment(unit, substitute)
    assert env["PWD"] == str(current), "PWD must name the symlink, for reloads to follow it"
    settings = load_settings({}, env)
    assert settings.term_child
    stop_timeout = seconds(service["TimeoutStopSec"])
    assert stop_timeout > settings.pre_shutdown_timeout + settings.term_timeout + 10, service

    argv = command_line(substituted(exec_start, substitute), env)
    assert argv[0] == str(python_bin() / "celery")
    starter = processes.start(argv, Path(substituted(service["WorkingDirectory"], substitute)),
                              example_env(**env), name="systemd")
    first_pid = int(starter.wait_log(CONSUMING.format(n=1))[0].group(1))
    starter.wait_log(rf"started generation 1 \(pid {first_pid}\) in {re.escape(str(current))} "
                     rf"\({re.escape(str(first.resolve()))}\)", timeout=1)
    assert call(client, starter, "create_counter", "systemd")["value"] == 0
    assert call(client, starter, "increment", "systemd", 1) == 1
    info = call(client, starter, "connection_info")
    assert parent_of(info["ppid"]) == first_pid, (info, first_pid)

    # Deploy: a new release behind the symlink, then `systemctl reload` (ExecReload).
    second = copy_example(releases / "r2")
    (tmp_path / "current.new").symlink_to(second)
    os.replace(tmp_path / "current.new", current)
    reload = command_line(unit.get("Service", "ExecReload"), {"MAINPID": str(starter.pid)})
    assert reload == ["/bin/kill", "-HUP", str(starter.pid)]
    run_checked(reload, tmp_path, example_env())
    second_pid = int(starter.wait_log(CONSUMING.format(n=2))[0].group(1))
    assert second_pid != first_pid
    starter.wait_log(rf"started generation 2 \(pid {second_pid}\) in {re.escape(str(current))} "
                     rf"\({re.escape(str(second.resolve()))}\)", timeout=1)
    starter.wait_log(rf"generation 1 \(pid {first_pid}\) retired \(exit 0\)")
    assert Path(f"/proc/{second_pid}/cwd").resolve() == second.resolve()
    info = call(client, starter, "connection_info")
    assert parent_of(info["ppid"]) == second_pid, (info, second_pid)
    assert call(client, starter, "increment", "systemd", 1) == 2

    # `systemctl stop`: KillSignal to the main process only (KillMode=mixed).
    os.kill(starter.pid, signal.Signals[unit.get("Service", "KillSignal")])
    assert starter.wait_exit(timeout=min(stop_timeout, 60.0)) == 0, starter.tail()
    starter.wait_log(r"every generation has exited; exit 0", timeout=1)


# -- docker compose ---------------------------------------------------------------------


def test_compose_worker_runs_the_procfile_command_in_the_image() -> None:
    compose = read_compose()
    services = compose["services"]
    assert {"worker", "redis", "postgres"} <= set(services), services
    entries = procfile_entries(PROCFILE)
    worker = services["worker"]
    assert compose_command(worker) == shlex.split(entries["worker"])
    assert compose_command(services["migrate"]) == shlex.split(entries["release"])

    # The image: built from the Dockerfile beside it, which installs the requirements
    # (celery-forkguard among them) and runs the same command by default.
    assert worker["build"] == "." and services["migrate"]["build"] == "."
    dockerfile = DOCKERFILE.read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd and json.loads(cmd.group(1)) == shlex.split(entries["worker"]), dockerfile
    assert re.search(r"^RUN pip install .*-r requirements\.txt$", dockerfile, re.MULTILINE)
    requirements = (EXAMPLE / "requirements.txt").read_text().lower()
    for needed in ("celery-forkguard", "django", "psycopg2"):
        assert re.search(rf"^{needed}", requirements, re.MULTILINE), needed

    depends = worker["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    settings = load_settings({}, {k: str(v) for k, v in worker["environment"].items()})
    assert worker["stop_signal"] == "SIGTERM"
    grace = seconds(worker["stop_grace_period"])
    assert grace > settings.pre_shutdown_timeout + settings.term_timeout + 10, grace


def test_compose_environment_is_what_the_settings_read(example_dir: Path) -> None:
    compose = read_compose()
    services = compose["services"]
    env = {key: str(value) for key, value in services["worker"]["environment"].items()}
    assert env == {k: str(v) for k, v in services["migrate"]["environment"].items()}

    read = variables_read_by(EXAMPLE / "proj" / "settings.py")
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "PGHOST", "DJANGO_DB"} <= read, read
    unknown = set(env) - read - FORKGUARD_VARIABLES - PYTHON_VARIABLES
    assert not unknown, f"compose sets variables nothing reads: {sorted(unknown)}"

    # Django's settings as the worker in the container would see them.
    script = (
        "import json\n"
        "from django.conf import settings\n"
        "db = settings.DATABASES['default']\n"
        "print(json.dumps({'db': {k: db[k] for k in ('ENGINE', 'HOST', 'PORT', 'NAME', "
        "'USER', 'PASSWORD')}, 'broker': settings.CELERY_BROKER_URL, "
        "'backend': settings.CELERY_RESULT_BACKEND, 'pool': settings.CELERY_WORKER_POOL}))\n"
    )
    ran = run_checked([sys.executable, "-c", script], example_dir,
                      example_env(DJANGO_SETTINGS_MODULE="proj.settings", **env))
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    postgres = services["postgres"]["environment"]
    assert seen["db"] == {
        "ENGINE": "django.db.backends.postgresql", "HOST": "postgres", "PORT": "5432",
        "NAME": postgres["POSTGRES_DB"], "USER": postgres["POSTGRES_USER"],
        "PASSWORD": postgres["POSTGRES_PASSWORD"],
    }, seen
    for url in (seen["broker"], seen["backend"]):
        assert re.fullmatch(r"redis://redis:6379/\d+", url), url
    assert seen["pool"] == "forkguard"
