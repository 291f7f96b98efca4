"""Settings module for the benchmark's RQ workers (``rq worker -c benchmarks.rq_settings``).

RQ reads its UPPERCASE names.  Importing it also imports ``benchmarks.jobs``
into the worker (and, with ``FORKGUARD_BENCH_PRELOAD_MB``, builds the
preloaded objects) before any job is forked, as ``celery -A`` loads the app
before its pool starts: every work horse then inherits the loaded code.
"""

from __future__ import annotations

import os

from benchmarks import jobs  # noqa: F401  (preloaded for the work horses)

REDIS_URL = os.environ.get("FORKGUARD_BENCH_BROKER", "redis://127.0.0.1:6379/6")
