"""``celery forkguard starter``: deploy new code with no lost, killed or doubled task.

A small long-lived process (what systemd, supervisord, Docker or a Procfile
runs) that keeps one worker generation serving, as resque_starter does:

- **HUP** (or ``forkguard_reload``) starts a new generation from a fresh
  exec (once the serving one has moved its remote-control mailbox aside, see
  ``mailbox``, so the new one can take the node name); once it consumes, the
  old one is told to retire (SIGWINCH): it stops consuming, hands its
  prefetched tasks back, lets its running tasks finish
  (``forkguard_retire_timeout``, then TERM / ``term_timeout`` / KILL with
  ``acks_late`` tasks requeued) and exits.  Capacity never drops to zero.
  One reload at a time: a HUP while a generation starts or retires is
  queued, and several queued HUPs make one reload.
- **A bad deploy** (a generation that exits, or is not consuming within
  ``forkguard_ready_timeout``) is stopped and logged; the old one serves on.
- USR1, USR2, CONT, TTIN, TTOU go to the current generation; the pause and
  the net TTIN/TTOU are replayed to each new one.  TERM, INT and QUIT go to
  every generation, and the starter exits once they all have, with the
  current generation's exit code.
- A generation that dies unexpectedly is restarted with back-off.  One that
  exits 0 on its own (``celery control shutdown``) stops the starter.

Signal handlers only note the signal (``signal.set_wakeup_fd``); everything
happens in one loop, which also reaps orphans (PID 1, child subreaper).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from celery_forkguard import titles
from celery_forkguard.forking import reaped_children
from celery_forkguard.generations import (
    STARTER_SIGNALS,
    Generation,
    State,
    describe_status,
    exit_code_of,
    spawn_generation,
)
from celery_forkguard.starter_link import MAILBOX_RECLAIM, MAILBOX_RELEASE, MAILBOX_RELEASED

logger = logging.getLogger("celery_forkguard.starter")

FORWARDED = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTTIN, signal.SIGTTOU}
STOPPING = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}

#: Back-off before restarting a generation that died: doubles up to the cap.
RESTART_BACKOFF = (1.0, 60.0)
#: A generation that served this long resets the back-off.
STABLE_AFTER = 60.0
#: A failed generation gets this long after TERM before SIGKILL.
FAILED_GRACE = 10.0
#: Replayed TTINs (TTOUs) are sent this far apart: two pending at once would merge into one.
REPLAY_GAP = 0.1

PR_SET_CHILD_SUBREAPER = 36

#: How long the serving generation has to move its mailbox aside before a reload.
HANDOVER_TIMEOUT = 10.0


@dataclass
class Handover:
    """A reload waiting for the serving generation to free the node's mailbox."""

    gen: Generation
    why: str
    deadline: float


class Starter:
    """Runs worker generations; see the module docstring."""

    def __init__(self, argv: Sequence[str], ready_timeout: float,
                 environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.ready_timeout = ready_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.cwd = cwd or working_directory()
        self.generations: list[Generation] = []
        self.count = 0
        self.reload_pending = False
        self.stopping = False
        self.exit_code = 0
        self.restart_at: Optional[float] = None
        self.backoff = RESTART_BACKOFF[0]
        self.paused = False
        self.resized = 0
        self._replay: list[signal.Signals] = []  # TTIN/TTOU still to replay to _replay_to
        self._replay_to: Optional[Generation] = None
        self._replay_at = 0.0
        self._handover: Optional[Handover] = None
        self._selector = selectors.DefaultSelector()
        self._wake_r = self._wake_w = -1

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        become_subreaper()
        self._start_generation("start")
        self._set_title()
        while not (self.stopping and not self.generations):
            self._step()
        logger.info("starter: every generation has exited; exit %d", self.exit_code)
        return self.exit_code

    def _step(self) -> None:
        for key, _ in self._selector.select(self._next_timeout()):
            if key.fd == self._wake_r:
                self._on_signals()
            else:
                self._on_link(key.data)
        self._reap()
        self._check_deadlines()
        self._set_title()

    def _next_timeout(self) -> Optional[float]:
        deadlines = [self.restart_at] if self.restart_at is not None else []
        if self._replay:
            deadlines.append(self._replay_at)
        if self._handover is not None:
            deadlines.append(self._handover.deadline)
        for gen in self.generations:
            if gen.state is State.STARTING and self._has_other_serving(gen):
                deadlines.append(gen.started_at + self.ready_timeout)
            if gen.kill_at is not None:
                deadlines.append(gen.kill_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # -- signals -----------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for signum in STARTER_SIGNALS:
            # A Python handler must exist for the wakeup fd to get the byte.
            signal.signal(signum, _noted)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            self._dispatch(signal.Signals(signum))

    def _dispatch(self, signum: signal.Signals) -> None:
        if signum is signal.SIGCHLD:
            return  # _reap runs after every wake-up
        logger.info("starter: received %s", signum.name)
        if signum is signal.SIGHUP:
            self.request_reload("SIGHUP")
        elif signum in STOPPING:
            self.stop(signum)
        elif signum in FORWARDED:
            self._forward(signum)

    def _forward(self, signum: signal.Signals) -> None:
        if signum is signal.SIGUSR2:
            self.paused = True
        elif signum is signal.SIGCONT:
            self.paused = False
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self.resized += 1 if signum is signal.SIGTTIN else -1
        current = self.current()
        if current is None:
            logger.warning("starter: no current generation to send %s to; "
                           "the next one gets it", signum.name)
            return
        current.signal(signum)

    # -- reloads -----------------------------------------------------------------------

    def request_reload(self, why: str) -> None:
        if self.stopping:
            logger.warning("starter: %s ignored: stopping", why)
            return
        if self._handover is not None:
            # The new generation is not exec'd yet: it will load what is on disk now.
            logger.warning("starter: %s: a reload is already under way", why)
            return
        busy = [g for g in self.generations if g.state in (State.STARTING, State.RETIRING,
                                                           State.FAILED)]
        if busy:
            self.reload_pending = True
            logger.warning("starter: %s: reload queued until %s", why,
                           " and ".join(f"{g.label()} has {_finished_verb(g)}" for g in busy))
            return
        self._begin_reload(f"reload ({why})")

    def _begin_reload(self, why: str) -> None:
        """Have the serving generation free its node's mailbox, then start the next one."""
        serving = self.current()
        if serving is None or not serving.tell(MAILBOX_RELEASE):
            self._start_generation(why)
            return
        self._handover = Handover(serving, why, time.monotonic() + HANDOVER_TIMEOUT)

    def _end_handover(self, outcome: str) -> None:
        handover, self._handover = self._handover, None
        if handover is None:
            return
        if outcome != "released":
            logger.warning("starter: %s %s; starting the next generation anyway (the two "
                           "share one remote-control mailbox until it retires)",
                           handover.gen.label(), outcome)
        self._start_generation(handover.why)

    def _start_generation(self, why: str) -> None:
        self.reload_pending = False
        self.restart_at = None
        self.count += 1
        try:
            gen = spawn_generation(self.count, self.argv, self.environ, self.cwd)
        except OSError as exc:
            logger.error("starter: could not start generation %d: %s", self.count, exc)
            self._schedule_restart()
            return
        self.generations.append(gen)
        self._selector.register(gen.link_fd, selectors.EVENT_READ, gen)
        logger.warning("starter: %s: started %s in %s (%s): %s", why, gen.label(), self.cwd,
                       os.path.realpath(self.cwd), " ".join(self.argv))

    def _on_link(self, gen: Generation) -> None:
        for line in gen.read_lines():
            word, _, rest = line.partition(" ")
            if word == "ready":
                self._on_ready(gen)
            elif word == "retiring":
                self._on_retiring(gen, rest)
            elif word == "reload" and gen.state is State.CURRENT:
                self.request_reload(f"forkguard_reload via {gen.label()}")
            elif word == MAILBOX_RELEASED and self._handover and self._handover.gen is gen:
                self._end_handover("released")
        if gen.eof:
            # Its worker is exiting: its exit, not the link, tells what happened.
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(gen.link_fd)

    def _on_ready(self, gen: Generation) -> None:
        if gen.state is not State.STARTING:
            return
        gen.state, gen.ready_at = State.CURRENT, time.monotonic()
        took = gen.ready_at - gen.started_at
        old = [g for g in self.generations if g is not gen and g.state is State.CURRENT]
        logger.warning("starter: %s is consuming (ready in %.1fs)%s", gen.label(), took,
                       f"; retiring {', '.join(g.label() for g in old)}" if old else "")
        self._replay_operator_state(gen)
        for previous in old:
            previous.state = State.RETIRING
            previous.signal(signal.SIGWINCH)

    def _replay_operator_state(self, gen: Generation) -> None:
        if self.paused:
            gen.signal(signal.SIGUSR2)
        step = signal.SIGTTIN if self.resized > 0 else signal.SIGTTOU
        self._replay = [step] * abs(self.resized)
        self._replay_to, self._replay_at = gen, time.monotonic()
        self._send_replay()
        if self.paused or self.resized:
            logger.warning("starter: %s: replayed %s", gen.label(),
                           ", ".join(filter(None, ["pause" if self.paused else "",
                                                   f"resize {self.resized:+d}" if self.resized
                                                   else ""])))

    def _send_replay(self) -> None:
        """The next replayed TTIN/TTOU, once REPLAY_GAP passed since the one before."""
        now = time.monotonic()
        if not self._replay or now < self._replay_at:
            return
        gen = self._replay_to
        if gen is None or gen.state is not State.CURRENT:
            self._replay.clear()  # a newer generation gets its own replay
            return
        gen.signal(self._replay.pop(0))
        self._replay_at = now + REPLAY_GAP

    def _on_retiring(self, gen: Generation, rest: str) -> None:
        with contextlib.suppress(ValueError):
            running = int(rest)
            if gen.running is None:
                logger.warning("starter: %s stopped consuming; %d task(s) still running",
                               gen.label(), running)
            gen.running = running

    # -- deadlines ---------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for gen in list(self.generations):
            if (gen.state is State.STARTING and self._has_other_serving(gen)
                    and now >= gen.started_at + self.ready_timeout):
                self._fail(gen, f"not consuming after {self.ready_timeout:g}s")
            if gen.kill_at is not None and now >= gen.kill_at:
                gen.kill_at = None
                logger.error("starter: %s still running %gs after TERM: SIGKILL",
                             gen.label(), FAILED_GRACE)
                gen.kill_group()
        if self._handover is not None and now >= self._handover.deadline:
            self._end_handover(f"did not free its mailbox within {HANDOVER_TIMEOUT:g}s")
        if self.restart_at is not None and now >= self.restart_at and not self.stopping:
            self._start_generation("restart")
        self._send_replay()

    def _has_other_serving(self, gen: Generation) -> bool:
        return any(g is not gen and g.state is State.CURRENT for g in self.generations)

    def _fail(self, gen: Generation, why: str) -> None:
        serving = self.current()
        logger.error("starter: deploy failed: %s %s; %s", gen.label(), why,
                     f"{serving.label()} keeps serving" if serving else "nothing is serving")
        gen.state = State.FAILED
        gen.kill_at = time.monotonic() + FAILED_GRACE
        gen.signal(signal.SIGTERM)

    def _schedule_restart(self) -> None:
        if self.stopping or self.restart_at is not None:
            return
        self.restart_at = time.monotonic() + self.backoff
        logger.error("starter: restarting in %gs", self.backoff)
        self.backoff = min(self.backoff * 2, RESTART_BACKOFF[1])

    # -- exits -------------------------------------------------------------------------

    def _reap(self) -> None:
        for pid, status, *_ in reaped_children():
            gen = next((g for g in self.generations if g.pid == pid), None)
            if gen is None:
                logger.debug("starter: reaped orphan %d (%s)", pid, describe_status(status))
                continue
            gen.exit_status = status
            self._on_exit(gen, status)

    def _on_exit(self, gen: Generation, status: int) -> None:
        self._drain_link(gen)
        if self._handover is not None and self._handover.gen is gen:
            self._handover = None  # what its exit means is decided below
        self.generations.remove(gen)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(gen.link_fd)
        gen.close()
        how = describe_status(status)
        lived = time.monotonic() - gen.started_at
        if gen.state is State.RETIRING:
            logger.warning("starter: %s retired (%s) after %.1fs", gen.label(), how, lived)
        elif gen.state is State.STOPPING:
            logger.warning("starter: %s stopped (%s)", gen.label(), how)
            if not any(g.state is State.STOPPING for g in self.generations):
                self.exit_code = exit_code_of(status)
        elif self.stopping:
            logger.warning("starter: %s stopped before consuming (%s)", gen.label(), how)
        elif gen.state in (State.STARTING, State.FAILED):
            self._on_start_failed(gen, how)
        else:
            self._on_current_exit(gen, status, lived)
        if self.reload_pending and not self.stopping:
            self.request_reload("queued reload")

    def _drain_link(self, gen: Generation) -> None:
        # Lines written just before the exit (a last "retiring 0").
        with contextlib.suppress(OSError):
            self._on_link(gen)

    def _on_start_failed(self, gen: Generation, how: str) -> None:
        serving = self.current()
        if serving is not None:
            serving.tell(MAILBOX_RECLAIM)
            if gen.state is State.STARTING:
                logger.error("starter: deploy failed: %s exited (%s) before consuming; "
                             "%s keeps serving", gen.label(), how, serving.label())
            return
        logger.error("starter: %s exited (%s) before consuming, and nothing is serving",
                     gen.label(), how)
        self._schedule_restart()

    def _on_current_exit(self, gen: Generation, status: int, lived: float) -> None:
        if status == 0:
            logger.warning("starter: %s exited on its own (exit 0: a shutdown command?); "
                           "the starter stops", gen.label())
            self.stop(signal.SIGTERM)
            return
        logger.error("starter: %s died unexpectedly (%s) after %.1fs",
                     gen.label(), describe_status(status), lived)
        if lived >= STABLE_AFTER:
            self.backoff = RESTART_BACKOFF[0]
        if not any(g.state is State.STARTING for g in self.generations):
            self._schedule_restart()

    # -- stopping ----------------------------------------------------------------------

    def stop(self, signum: signal.Signals) -> None:
        """TERM / INT / QUIT: every generation gets it; exit once they all have."""
        self.stopping = True
        self.restart_at = None
        self.reload_pending = False
        self._handover = None
        for gen in self.generations:
            if gen.state is State.CURRENT:
                gen.state = State.STOPPING
            if gen.state is not State.STARTING:
                gen.signal(signum)
        # A starting generation gets it once it is ready (its handlers exist then);
        # before that, a TERM would kill it mid-import, which is fine too.
        for gen in self.generations:
            if gen.state is State.STARTING:
                gen.state = State.FAILED
                gen.kill_at = time.monotonic() + FAILED_GRACE
                gen.signal(signal.SIGTERM)

    # -- reporting ---------------------------------------------------------------------

    def current(self) -> Optional[Generation]:
        return next((g for g in self.generations if g.state is State.CURRENT), None)

    def _set_title(self) -> None:
        parts = ", ".join(g.title_part() for g in self.generations) or "no generation"
        state = " [stopping]" if self.stopping else ""
        titles.set_title(f"celery forkguard starter: {parts}{state}")


def _noted(signum: int, frame: object) -> None:
    """Nothing: the wakeup fd carries the signal to the loop."""


def _finished_verb(gen: Generation) -> str:
    if gen.state is State.FAILED:
        return "stopped"
    return "retired" if gen.state is State.RETIRING else "started"


def working_directory() -> str:
    """The directory as the operator named it (``$PWD``), so a moved symlink is followed."""
    pwd = os.environ.get("PWD")
    with contextlib.suppress(OSError):
        if pwd and os.path.samefile(pwd, os.getcwd()):
            return pwd
    return os.getcwd()


def become_subreaper() -> None:
    """Orphans of the generations (a dead worker's children) come to us to be reaped."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
