"""Nox sessions for celery-forkguard.

    nox                  # lint, the default test pairings, install
    nox -s lint
    nox -s tests         # every pairing below; one: nox -s "tests(3.11-celery5.7.0)"
    nox -s install
    nox -s chaos         # the bounded fault suite (tests/chaos), as CI runs it
    nox -s bench -- --tasks 2000 --rounds 3
    nox -s build         # sdist and wheel, twine check, contents and metadata
    nox -s docs          # the Sphinx site into docs/_build/html, warnings as errors

Each test session pairs one Python with one Celery release instead of
running the full cross product: every supported Python and every supported
Celery minor is covered once.  Pythons are found as ``pythonX.Y`` on PATH; a
``pythonX.Y`` that does not run (an inactive pyenv shim) is replaced by
``$FORKGUARD_PYTHON_X_Y`` when set, else by the newest
``$(pyenv root)/versions/X.Y.*`` (see ``_expose_interpreters``).  Under
``CI=true`` a Python that cannot be found fails its session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import nox

ROOT = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

#: (Python, Celery) pairs the ``tests`` session runs.
PAIRINGS = [
    ("3.9", "5.3.6"),
    ("3.10", "5.4.0"),
    ("3.11", "5.7.0"),
    ("3.12", "5.5.3"),
    ("3.13", "5.6.3"),
]
PYTHONS = sorted({python for python, _ in PAIRINGS}, key=lambda v: tuple(map(int, v.split("."))))
LINT_TOOLS = ("ruff==0.17.6", "mypy==2.4.1")
#: What ``nox -s docs`` builds with (Sphinx 9 needs Python 3.11 or newer).
DOCS_PYTHON = "3.11"
DOCS_TOOLS = ("sphinx==9.0.4", "myst-parser==5.2.0", "furo==2025.12.19")

nox.options.sessions = ["lint", "tests", "install"]
# A missing interpreter is an error in CI (nox's own default under CI, made explicit).
nox.options.error_on_missing_interpreters = IN_CI
if hasattr(nox.options, "download_python"):
    # Only PyPI is reachable: never try to download a Python build.
    nox.options.download_python = "never"


# -- finding interpreters ----------------------------------------------------------


def _runs_as(executable: str, version: str) -> bool:
    """Whether *executable* starts and is Python *version* (a pyenv shim may not)."""
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def _pyenv_root() -> Optional[Path]:
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        out = subprocess.run(
            ["pyenv", "root"], capture_output=True, text=True, timeout=30, check=False,
        )
        root = out.stdout.strip() if out.returncode == 0 else None
    return Path(root) if root else None


def _from_pyenv(version: str) -> Optional[str]:
    root = _pyenv_root()
    if root is None:
        return None
    pattern = re.compile(rf"^{re.escape(version)}\.(\d+)$")  # 3.9.18, not 3.9.18t or 3.9-dev
    found = []
    for entry in (root / "versions").glob(f"{version}.*"):
        match = pattern.match(entry.name)
        candidate = entry / "bin" / f"python{version}"
        if match and candidate.is_file():
            found.append((int(match.group(1)), str(candidate)))
    for _, exe in sorted(found, reverse=True):
        if _runs_as(exe, version):
            return exe
    return None


def _find_interpreter(version: str) -> Optional[str]:
    explicit = os.environ.get(f"FORKGUARD_PYTHON_{version.replace('.', '_')}")
    if explicit:
        return explicit  # trusted as given: a wrong one fails its session loudly
    on_path = shutil.which(f"python{version}")
    if on_path and _runs_as(on_path, version):
        return None  # nox finds it itself
    return _from_pyenv(version)


def _expose_interpreters() -> None:
    """Put a working ``pythonX.Y`` first on PATH for each version nox would miss.

    The links live in .nox/, so PATH gains no other program (pip, python3...).
    """
    links = ROOT / ".nox" / ".interpreters"
    found = {v: exe for v in PYTHONS if (exe := _find_interpreter(v)) is not None}
    if not found:
        return
    links.mkdir(parents=True, exist_ok=True)
    for version, exe in found.items():
        link = links / f"python{version}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(exe)
    os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_expose_interpreters()


# -- sessions -------------------------------------------------------------------------


@nox.session
@nox.parametrize(
    "python,celery",
    [nox.param(python, celery, id=f"{python}-celery{celery}") for python, celery in PAIRINGS],
)
def tests(session: nox.Session, celery: str) -> None:
    """Unit and integration tests against one Celery release."""
    session.install(".[test]", f"celery=={celery}")
    session.run("python", "-c", "import celery, sys; print('celery', celery.__version__, "
                "'on python', sys.version.split()[0])")
    session.run("python", "-m", "pytest", "tests/unit", "tests/integration",
                "-m", "not sustained", *session.posargs)


@nox.session
def install(session: nox.Session) -> None:
    """Tests of installing the package the way users do (tests/install), and of
    examples/django_project run as its README says (tests/examples: real workers
    on Redis and PostgreSQL; its Procfile, systemd unit and docker-compose.yml)."""
    # What the example project needs besides the package (its requirements.txt
    # names celery-forkguard too, which here is the checkout), and PyYAML to
    # read its docker-compose.yml.
    session.install(".[test]", "django", "psycopg2-binary", "pyyaml")
    session.run("python", "-m", "pytest", "tests/install", "tests/examples", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The bounded fault suite: real workers, injected faults, one figure line per case."""
    session.install(".[test]")
    # With the sustained-load integration tests, which are too long to run per pairing.
    session.run("python", "-m", "pytest", "tests/chaos", "tests/integration",
                "-m", "sustained or chaos or deploy", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the repository, mypy over the package."""
    session.install(".", *LINT_TOOLS)
    session.run("ruff", "check", ".")
    session.run("mypy", "celery_forkguard")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite: forkguard against prefork, solo, threads, RQ and the fork
    floor, in one run (needs Redis on 127.0.0.1:6379 and flushes its databases 6 and 7;
    see benchmarks/README.md).  Another Python: ``nox -s bench --force-python 3.12``."""
    # What it compares with (RQ 3's CLI: worker, worker-pool; RQ 3 needs Python 3.10+,
    # without it the suite leaves the RQ contenders out), measures with and draws with.
    session.install(".[redis]", "rq>=3.0,<4; python_version >= '3.10'", "psutil>=5.9",
                    "matplotlib>=3.5")
    session.run("python", "-m", "benchmarks.suite", *session.posargs)


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and the wheel, ``twine check --strict`` them, check what they hold."""
    session.install("build", "twine")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # Without --sdist/--wheel, build makes the sdist and then the wheel from it,
    # so this also proves the sdist builds.
    session.run("python", "-m", "build", "--outdir", str(dist))
    artifacts = sorted(str(p) for p in dist.iterdir())
    session.run("twine", "check", "--strict", *artifacts)
    session.run("python", str(ROOT / ".ci" / "check_dist.py"), str(dist))


@nox.session(python=DOCS_PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx, MyST, furo) into docs/_build/html; warnings are errors.

    First checks that docs/settings.md lists every setting of
    celery_forkguard/settings.py.  The build starts from nothing each time,
    so a warning in a page that did not change still fails it.
    """
    session.install(".", *DOCS_TOOLS)
    session.run("python", "docs/check_settings.py")
    shutil.rmtree(ROOT / "docs" / "_build", ignore_errors=True)
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
