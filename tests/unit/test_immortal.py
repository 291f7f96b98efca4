"""immortal.py: marking a heap immortal, in a process of its own (never this one)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celery_forkguard.immortal import unsupported_reason

pytestmark = pytest.mark.timeout(60)

SCRIPT = r"""
import ctypes, gc, json, os, sys
from celery_forkguard.immortal import immortalize_heap

class Thing:
    pass

made_before = {"list": [Thing(), 10**20, "a string made at run time " + str(os.getpid())]}
gc.freeze()
gc.unfreeze()  # as the fork server does: frozen objects are not listed
gc.disable()
marker = sys.getrefcount(None)
marked = immortalize_heap()
again = immortalize_heap()  # the marker says "visited": only what was made since
made_after = {"x": 1}
items = made_before["list"]
pid = os.fork()
if pid == 0:
    # A child uses the objects: their counts stay the marker (no write, no copy).
    for _ in range(1000):
        copy = list(items)
    os._exit(0 if all(sys.getrefcount(o) == marker for o in items) else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({
    "marked": marked, "again": again,
    "dict": sys.getrefcount(made_before) == marker,
    "items": [sys.getrefcount(o) == marker for o in items],
    "after": sys.getrefcount(made_after) == marker,
    "child_ok": os.waitstatus_to_exitcode(status) == 0,
}))
"""


def test_unsupported_reason_names_what_is_missing() -> None:
    reason = unsupported_reason()
    if sys.version_info[:2] in ((3, 12), (3, 13)):
        assert reason is None
    else:
        assert reason is not None and "needs 3.12 or 3.13" in reason


@pytest.mark.skipif(unsupported_reason() is not None, reason=str(unsupported_reason()))
def test_a_heap_made_immortal_stays_so_in_its_children() -> None:
    import json

    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=50, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["marked"] > 1000 and got["again"] < 10, got
    assert got["dict"] and all(got["items"]), got  # its referents too (int, str, instance)
    assert not got["after"], got  # what is made later is mortal
    assert got["child_ok"], got
