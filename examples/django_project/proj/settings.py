"""Settings of the forkguard example project.

Everything that differs between machines comes from the environment:

=========================  ===================================================
``DJANGO_DB``              ``postgres`` (the default) or ``sqlite``.  Nothing
                           is probed: the worker uses the database it is told
                           to, or fails to connect and says so.
``DATABASE_URL``           ``postgres://USER:PASSWORD@HOST:PORT/NAME``; a
                           socket directory as ``?host=/var/run/postgresql``
``PGHOST`` ``PGPORT``      used when ``DATABASE_URL`` is not set; defaults
``PGDATABASE`` ``PGUSER``  ``127.0.0.1``, ``5432``, ``forkguard_example``,
``PGPASSWORD``             ``postgres``, no password.  An empty ``PGHOST``
                           means libpq's default Unix socket
``SQLITE_PATH``            with ``DJANGO_DB=sqlite``: the database file
                           (default ``db.sqlite3`` beside ``manage.py``)
``CELERY_BROKER_URL``      default ``redis://127.0.0.1:6379/0``
``CELERY_RESULT_BACKEND``  default ``redis://127.0.0.1:6379/1``
``DJANGO_SECRET_KEY``      default: a placeholder fit for the example only
``DJANGO_DEBUG``           ``1`` turns ``DEBUG`` on
=========================  ===================================================

forkguard itself also reads ``TERM_CHILD``, ``RESQUE_PRE_SHUTDOWN_TIMEOUT``
and ``RESQUE_TERM_TIMEOUT`` (and ``FORKGUARD_*``) from the environment; the
docker-compose file and the systemd unit set them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "forkguard-example-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["counters"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "proj.urls"
WSGI_APPLICATION = "proj.wsgi.application"

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# -- the database -----------------------------------------------------------------------

POSTGRES_DEFAULTS = {
    "HOST": "127.0.0.1",
    "PORT": "5432",
    "NAME": "forkguard_example",
    "USER": "postgres",
    "PASSWORD": "",
}


def postgres_from_url(url: str) -> dict[str, str]:
    """``HOST``, ``PORT``, ``NAME``, ``USER`` and ``PASSWORD`` from a ``postgres://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must start with postgres:// or postgresql://, not {parts.scheme}://"
            " (for SQLite set DJANGO_DB=sqlite and SQLITE_PATH)",
        )
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    return {
        "HOST": unquote(parts.hostname or "") or socket_dir,
        "PORT": str(parts.port or ""),
        "NAME": unquote(parts.path.lstrip("/")) or POSTGRES_DEFAULTS["NAME"],
        "USER": unquote(parts.username or "") or POSTGRES_DEFAULTS["USER"],
        "PASSWORD": unquote(parts.password or ""),
    }


def postgres_from_pg_vars() -> dict[str, str]:
    """The same from libpq's variables, with the defaults above."""
    names = {"HOST": "PGHOST", "PORT": "PGPORT", "NAME": "PGDATABASE",
             "USER": "PGUSER", "PASSWORD": "PGPASSWORD"}
    return {key: os.environ.get(var, POSTGRES_DEFAULTS[key]) for key, var in names.items()}


def database() -> dict[str, Any]:
    kind = os.environ.get("DJANGO_DB", "postgres").strip().lower()
    if kind in ("postgres", "postgresql"):
        url = os.environ.get("DATABASE_URL", "")
        return {
            "ENGINE": "django.db.backends.postgresql",
            **(postgres_from_url(url) if url else postgres_from_pg_vars()),
            # Under forkguard a connection lives at most as long as the task's
            # child: keeping it (CONN_MAX_AGE > 0) would save nothing.  A
            # worker that runs many short tasks a second can put PgBouncer in
            # front of PostgreSQL to make the per-task connect cheap.
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"connect_timeout": 10},
        }
    if kind == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            # Concurrent forks write the same file: wait for the lock a while.
            "OPTIONS": {"timeout": 20},
        }
    raise ImproperlyConfigured(f"DJANGO_DB must be 'postgres' or 'sqlite', not {kind!r}")


DATABASES = {"default": database()}


# -- Celery (read by proj/celery.py: config_from_object(..., namespace="CELERY")) ------------

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1")
CELERY_RESULT_EXPIRES = 3600
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# The one forkguard line: every task runs in a fresh fork of the worker.  There
# is no -P on any command line and no import of celery_forkguard in the
# project: the `celery` command registers the pool name when it starts.
CELERY_WORKER_POOL = "forkguard"

# forkguard's own settings have Django names too (docs/settings.md), e.g.
#   CELERY_FORKGUARD_TERM_CHILD = True
#   CELERY_FORKGUARD_RETIRE_TIMEOUT = 300
# and Celery's own limits apply per task child, e.g.
#   CELERY_WORKER_MAX_MEMORY_PER_CHILD = 800_000  # kB
