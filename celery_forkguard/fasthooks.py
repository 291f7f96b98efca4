"""Per-fork primitives, made cheap: they run once for every task.

``signal``'s Python wrappers convert every signal number to an enum, and
Celery's ``set_pdeathsig`` loads libc through ctypes on each call: together
about 2 ms per child on a small VM.  Here the C-level ``_signal`` functions
are called directly and libc is loaded once, in the worker, before any fork.
"""

from __future__ import annotations

import _signal
import ctypes
import ctypes.util
import signal
import sys
from typing import Any, Callable

ALL_SIGNALS: frozenset[int] = frozenset(int(s) for s in signal.valid_signals())
PR_SET_PDEATHSIG = 1

#: Signals operators send a worker: the fork server ignores them (they reach
#: the whole process group), and children put them back to their defaults.
OPERATOR_SIGNALS: tuple[int, ...] = tuple(
    int(getattr(signal, name)) for name in (
        "SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
        "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGWINCH",
    ) if hasattr(signal, name)
)

_prctl: Callable[..., int] | None = None
_mprotect: Callable[..., int] | None = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _mprotect = _libc.mprotect
    _mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if sys.platform.startswith("linux"):
        _prctl = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover
    pass


def block_all_signals() -> Any:
    """Block every signal in this thread; return the mask to restore."""
    return _signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)


def restore_signal_mask(mask: Any) -> None:
    _signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def python_handled_signals() -> list[int]:
    """The signals that currently run a Python handler in this process."""
    handled = []
    for signum in ALL_SIGNALS:
        try:
            if callable(_signal.getsignal(signum)):
                handled.append(signum)
        except (OSError, ValueError):
            continue
    return handled


def set_handler(signum: int, handler: Any) -> None:
    # _signal wants its own SIG_DFL / SIG_IGN objects, not signal's enums.
    if handler == signal.SIG_DFL:
        handler = _signal.SIG_DFL
    elif handler == signal.SIG_IGN:
        handler = _signal.SIG_IGN
    _signal.signal(signum, handler)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send *signum* when our parent dies (Linux only)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def protect_read_only(address: int, length: int) -> bool:
    """Make a page-aligned mapping read-only in this process (mprotect)."""
    if _mprotect is None:
        return False
    return _mprotect(address, length, 1) == 0  # PROT_READ
