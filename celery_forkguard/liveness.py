"""A liveness file for exec probes (Kubernetes), touched by the worker's loop.

With ``forkguard_liveness_file`` set, the worker touches that file every
``forkguard_liveness_interval`` seconds from its event loop: a loop that is
stuck (a blocking call in a signal handler, a deadlock) stops touching it.
A probe checks its age::

    python -m celery_forkguard.liveness /tmp/forkguard.alive 60

exits 0 when the file was touched within the last 60 seconds, 1 otherwise
(saying how old it is), so a Kubernetes ``livenessProbe.exec`` restarts a
worker whose loop froze, without a broker round trip (Celery #4079).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

#: A probe's default: the file may be this many seconds old.
DEFAULT_MAX_AGE = 60.0


class LivenessFile:
    """Touches *path* every *interval* seconds from a Celery timer or kombu hub."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._tref: Any = None

    def start(self, timer: Any) -> None:
        """Touch now, then every interval (again after a reconnect reset the loop)."""
        self.stop()
        self.touch()
        self._tref = timer.call_repeatedly(self.interval, self.touch)

    def stop(self) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def touch(self) -> None:
        try:
            with open(self.path, "a"):
                pass
            os.utime(self.path)
        except OSError as exc:  # a full or read-only disk: say so, keep working
            sys.stderr.write(f"forkguard: cannot touch liveness file {self.path}: {exc}\n")


def age(path: str, now: Optional[float] = None) -> Optional[float]:
    """Seconds since *path* was last touched, or None if it does not exist."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    return (time.time() if now is None else now) - mtime


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        sys.stderr.write("usage: python -m celery_forkguard.liveness FILE [MAX_AGE_SECONDS]\n")
        return 2
    path = argv[0]
    max_age = float(argv[1]) if len(argv) == 2 else DEFAULT_MAX_AGE
    seconds = age(path)
    if seconds is None:
        sys.stderr.write(f"{path}: missing: the worker has not started its loop\n")
        return 1
    if seconds > max_age:
        sys.stderr.write(f"{path}: last touched {seconds:.0f}s ago (> {max_age:g}s): "
                         "the worker's loop is stuck\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
