"""forkguard's settings: ``app.conf`` first, then environment overrides.

Every setting lives in Celery's configuration under a ``forkguard_`` name, so
Django projects set ``CELERY_FORKGUARD_TERM_CHILD`` and so on through
``config_from_object("django.conf:settings", namespace="CELERY")``.  The
environment wins, so a platform (Heroku, Kubernetes) can set Resque's own
variables without touching code.  A bad value stops the worker at start with
a message that names the setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from celery.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    name: str  # the app.conf key
    default: Any
    parse: Callable[[str, Any], Any]
    env: tuple[str, ...]  # environment variables, strongest first
    doc: str


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false, yes/no), not {value!r}")


def parse_seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name} must be a number of seconds, not {value!r}") from None
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ImproperlyConfigured(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return seconds


def parse_interval(name: str, value: Any) -> float:
    seconds = parse_seconds(name, value)
    if seconds <= 0:
        raise ImproperlyConfigured(f"{name} must be a number of seconds > 0, not {value!r}")
    return seconds


def parse_text(name: str, value: Any) -> str:
    """A path or an address: a string (or path-like)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ImproperlyConfigured(f"{name} must be a string, not {value!r}")
    return os.fspath(value)


def parse_port(name: str, value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name} must be a TCP port number, not {value!r}") from None
    if not 0 <= port <= 65535 or (isinstance(value, float) and value != port):
        raise ImproperlyConfigured(f"{name} must be a TCP port (0-65535), not {value!r}")
    return port


def parse_count(name: str, value: Any) -> int:
    """A whole number >= 0 (booleans are not numbers here)."""
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be a whole number >= 0, not {value!r}")
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name} must be a whole number >= 0, not {value!r}") from None
    if count < 0 or (isinstance(value, float) and value != count):
        raise ImproperlyConfigured(f"{name} must be a whole number >= 0, not {value!r}")
    return count


SETTINGS = (
    Setting(
        "forkguard_term_child", False, parse_bool, ("FORKGUARD_TERM_CHILD", "TERM_CHILD"),
        "On TERM, send TERM to running children (the task sees TermException), "
        "wait forkguard_term_timeout, KILL what is left, exit.",
    ),
    Setting(
        "forkguard_term_timeout", 4.0, parse_seconds,
        ("FORKGUARD_TERM_TIMEOUT", "RESQUE_TERM_TIMEOUT"),
        "Seconds between TERM and KILL for a child (term_child shutdown and USR1).",
    ),
    Setting(
        "forkguard_pre_shutdown_timeout", 0.0, parse_seconds,
        ("FORKGUARD_PRE_SHUTDOWN_TIMEOUT", "RESQUE_PRE_SHUTDOWN_TIMEOUT"),
        "Seconds a term_child shutdown lets children finish on their own before TERM.",
    ),
    Setting(
        "forkguard_fork_server", True, parse_bool, ("FORKGUARD_FORK_SERVER",),
        "Fork each task's child from a fork server (a copy of the worker made at "
        "start) instead of from the worker itself, which keeps fork() and its "
        "copy-on-write faults off the worker's event loop.",
    ),
    Setting(
        "forkguard_immortalize", True, parse_bool, ("FORKGUARD_IMMORTALIZE",),
        "On CPython 3.12 and 3.13 (64-bit, with the GIL), make every object the "
        "worker holds at pool start immortal (PEP 683) before the first fork, so "
        "that children (and the fork server, and the worker itself) stop copying "
        "shared pages just to write reference counts; elsewhere it does nothing.",
    ),
    Setting(
        "forkguard_huge_pages", True, parse_bool, ("FORKGUARD_HUGE_PAGES",),
        "On Linux 6.1+ with transparent huge pages not off, back each aligned "
        "2 MiB of the worker's anonymous memory that is almost all resident with "
        "one huge page before the first fork (MADV_COLLAPSE), so that every "
        "fork copies fewer page-table entries; elsewhere it does nothing.",
    ),
    Setting(
        "forkguard_standby_children", 0, parse_count, ("FORKGUARD_STANDBY_CHILDREN",),
        "How many children the fork server keeps forked and set up ahead of their "
        "task (worker_process_init run), so that a task starts without waiting "
        "for a fork: lower publish-to-start latency for the same CPU per task; "
        "one more process each. 0: none. Needs forkguard_fork_server.",
    ),
    Setting(
        "forkguard_warm_up", True, parse_bool, ("FORKGUARD_WARM_UP",),
        "Before the first fork, run Celery's tracer on an internal no-op task and "
        "resolve a numeric address, so every child shares that code and the C "
        "library's resolver set-up already warm instead of copying pages to warm "
        "them itself.",
    ),
    Setting(
        "forkguard_fork_server_timeout", 10.0, parse_interval,
        ("FORKGUARD_FORK_SERVER_TIMEOUT",),
        "Seconds the fork server may leave a request for a child unanswered (or a "
        "child's exit unreported) before the worker kills it with its children, "
        "records their tasks as lost, and starts a new one.",
    ),
    Setting(
        "forkguard_retire_timeout", 300.0, parse_seconds, ("FORKGUARD_RETIRE_TIMEOUT",),
        "Seconds a generation retired by `celery forkguard starter` (after a reload) "
        "lets its running tasks finish before the term_child sequence: TERM, "
        "forkguard_term_timeout, KILL, acks_late tasks requeued.",
    ),
    Setting(
        "forkguard_ready_timeout", 120.0, parse_interval, ("FORKGUARD_READY_TIMEOUT",),
        "Seconds `celery forkguard starter` gives a new generation to start consuming "
        "before it calls the deploy failed, stops it and keeps the old one serving.",
    ),
    Setting(
        "forkguard_liveness_file", "", parse_text, ("FORKGUARD_LIVENESS_FILE",),
        "A file the worker's event loop touches every forkguard_liveness_interval "
        "seconds, for exec liveness probes (`python -m celery_forkguard.liveness "
        "FILE MAX_AGE`); empty: none.",
    ),
    Setting(
        "forkguard_liveness_interval", 10.0, parse_interval,
        ("FORKGUARD_LIVENESS_INTERVAL",),
        "How often the worker's loop touches forkguard_liveness_file.",
    ),
    Setting(
        "forkguard_metrics_port", 0, parse_port, ("FORKGUARD_METRICS_PORT",),
        "Serve Prometheus metrics on this port (needs celery-forkguard[metrics]); "
        "0: no endpoint.",
    ),
    Setting(
        "forkguard_metrics_address", "0.0.0.0", parse_text, ("FORKGUARD_METRICS_ADDRESS",),
        "The address the Prometheus endpoint listens on.",
    ),
    Setting(
        "forkguard_memory_check_interval", 0.5, parse_interval,
        ("FORKGUARD_MEMORY_CHECK_INTERVAL",),
        "How often each child's resident memory is compared with "
        "worker_max_memory_per_child.",
    ),
)


@dataclass(frozen=True)
class ForkguardSettings:
    term_child: bool = False
    term_timeout: float = 4.0
    pre_shutdown_timeout: float = 0.0
    memory_check_interval: float = 0.5
    fork_server: bool = True
    fork_server_timeout: float = 10.0
    immortalize: bool = True
    huge_pages: bool = True
    warm_up: bool = True
    standby_children: int = 0
    retire_timeout: float = 300.0
    ready_timeout: float = 120.0
    liveness_file: str = ""
    liveness_interval: float = 10.0
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"


def load_settings(
    conf: Mapping[str, Any], environ: Mapping[str, str] | None = None,
) -> ForkguardSettings:
    """Read and validate every setting; raise ImproperlyConfigured on a bad one."""
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        values[setting.name[len("forkguard_"):]] = _value_of(setting, conf, environ)
    return ForkguardSettings(**values)


def _value_of(setting: Setting, conf: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    for var in setting.env:
        if var in environ:
            return setting.parse(var, environ[var])
    value = conf.get(setting.name)
    if value is None:
        return setting.default
    return setting.parse(setting.name, value)
