"""A stand-in for ``celery worker -P forkguard``, run by ``Starter`` in ``test_starter.py``.

Usage (as the starter's argv): ``python fake_generation.py WORKDIR``.

It takes its link from the environment exactly as a worker does
(``FORKGUARD_STARTER_FD``, ``FORKGUARD_STARTER_PID``, ``FORKGUARD_GENERATION``,
read directly: importing ``celery_forkguard`` would import Celery) and looks up
what to do in ``WORKDIR/plan.json``, which maps a generation number (a string)
to a behaviour; a generation the plan does not name is ``ok``.  A behaviour is
``MODE[:ARG]`` followed by comma-separated options:

``ok``                   ready at once; WINCH -> ``retiring 0``, exit 0.
``gated``                ready once the file ``WORKDIR/genN.go`` exists.
``never-ready``          never ready (TERM still stops it).
``exit-before-ready:C``  exit C without ever being ready.
``exit-after-ready:C``   ready, then exit C on its own (``exit0`` = ``exit-after-ready:0``).
``die-after-ready:S``    ready, then kill itself with signal S (a number).
``busy:N``               like ``ok``, but on WINCH writes ``retiring N``, holds until
                         ``WORKDIR/genN.release`` exists, then counts down to 0
                         (one line each) and exits 0.
``orphan``               ready, then forks a grandchild that outlives it: the grandchild
                         exits once ``WORKDIR/genN.orphan-exit`` exists.
options: ``term=C``, ``int=C``, ``quit=C`` (exit code on that signal; ``kill`` = SIGKILL
itself, ``sig`` = die by that very signal), ``ignore-term`` (TERM is only recorded),
``keep-mailbox`` (a ``mailbox-release`` from the starter is recorded, never answered).

Lines from the starter are recorded as ``got LINE``; ``mailbox-release`` is answered
with ``mailbox-released``, as a worker does once its mailbox moved aside.
Defaults: TERM exits 0, INT exits 2, QUIT exits 3.

While it runs, the file ``WORKDIR/genN.reload`` makes it write ``reload`` to its link
(the file is then removed).

Everything it does goes to ``WORKDIR/events`` (appended, one line per event, e.g.
``gen=2 start pid=123``, ``gen=2 ready``, ``gen=2 sig=WINCH``, ``gen=2 exit code=0``),
with the monotonic time after a ``@`` (``gen=2 ready @12.345``): CLOCK_MONOTONIC is
shared by every process, so the test can compare times across processes.

Signals are blocked and taken with ``sigtimedwait`` in one loop: each one is recorded
when it is taken, nothing runs in a handler.  As a safety net it exits on its own
when its starter is gone or after ``MAX_LIFE`` seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

SIGNALS = (
    signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH,
)
DEFAULT_EXIT = {signal.SIGTERM: "0", signal.SIGINT: "2", signal.SIGQUIT: "3"}
OPTION_OF = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit"}
POLL = 0.02
MAX_LIFE = 60.0
COUNTDOWN_STEP = 0.05


class Fake:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.link = int(os.environ.pop("FORKGUARD_STARTER_FD"))
        self.starter_pid = int(os.environ.pop("FORKGUARD_STARTER_PID"))
        self.number = int(os.environ.pop("FORKGUARD_GENERATION"))
        os.set_inheritable(self.link, False)
        os.set_blocking(self.link, False)
        self.from_starter = b""
        with open(os.path.join(workdir, "plan.json")) as plan:
            behaviour = json.load(plan).get(str(self.number), "ok")
        first, *rest = behaviour.split(",")
        self.mode, _, self.arg = first.partition(":")
        if self.mode == "exit0":
            self.mode, self.arg = "exit-after-ready", "0"
        self.options = dict(opt.partition("=")[::2] for opt in rest)
        self.ready = False
        self.retiring: int | None = None
        self.started = time.monotonic()

    # -- records -----------------------------------------------------------------------

    def event(self, what: str, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        line = f"gen={self.number} {what} @{at:.3f}\n".encode()
        fd = os.open(os.path.join(self.workdir, "events"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def send(self, line: str) -> None:
        at = time.monotonic()  # before the write: the starter may act on it at once
        os.write(self.link, f"{line}\n".encode())
        self.event(f"wrote {line}", at)

    def file(self, suffix: str) -> str:
        return os.path.join(self.workdir, f"gen{self.number}.{suffix}")

    def exit(self, code: int) -> None:
        self.event(f"exit code={code}")
        os._exit(code)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.event(f"start pid={os.getpid()} mode={self.mode}")
        if self.mode == "exit-before-ready":
            self.exit(int(self.arg))
        if self.mode not in ("gated", "never-ready"):
            self.become_ready()
        while True:
            info = signal.sigtimedwait(SIGNALS, POLL)
            if info is not None:
                self.on_signal(signal.Signals(info.si_signo))
            self.poll()

    def become_ready(self) -> None:
        self.ready = True
        self.send("ready")
        if self.mode == "exit-after-ready":
            self.exit(int(self.arg))
        elif self.mode == "die-after-ready":
            self.event(f"kill self with {signal.Signals(int(self.arg)).name}")
            os.kill(os.getpid(), int(self.arg))
        elif self.mode == "orphan":
            self.fork_grandchild()

    def poll(self) -> None:
        if os.getppid() != self.starter_pid or time.monotonic() - self.started > MAX_LIFE:
            self.exit(99)  # the starter is gone: nothing must be left behind
        self.read_starter_lines()
        if not self.ready and self.mode == "gated" and os.path.exists(self.file("go")):
            self.become_ready()
        if os.path.exists(self.file("reload")):
            os.unlink(self.file("reload"))
            self.send("reload")
        if self.retiring is not None and os.path.exists(self.file("release")):
            while self.retiring > 0:
                time.sleep(COUNTDOWN_STEP)
                self.retiring -= 1
                self.send(f"retiring {self.retiring}")
            self.exit(0)

    def read_starter_lines(self) -> None:
        try:
            self.from_starter += os.read(self.link, 512)
        except (BlockingIOError, OSError):
            return
        *lines, self.from_starter = self.from_starter.split(b"\n")
        for raw in lines:
            line = raw.decode().strip()
            self.event(f"got {line}")
            if line == "mailbox-release" and "keep-mailbox" not in self.options:
                self.send("mailbox-released")

    def on_signal(self, signum: signal.Signals) -> None:
        self.event(f"sig={signum.name[3:]}")
        if signum is signal.SIGWINCH:
            if self.retiring is None:
                self.retiring = int(self.arg) if self.mode == "busy" else 0
                self.send(f"retiring {self.retiring}")
                if self.mode != "busy":
                    self.exit(0)
        elif signum in DEFAULT_EXIT:
            if signum is signal.SIGTERM and "ignore-term" in self.options:
                return
            how = self.options.get(OPTION_OF[signum], DEFAULT_EXIT[signum])
            if how == "kill":
                self.event("kill self with SIGKILL")
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "sig":
                self.event(f"die by {signum.name}")
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
            self.exit(int(how))

    def fork_grandchild(self) -> None:
        pid = os.fork()
        if pid:
            self.event(f"grandchild pid={pid}")
            return
        # The grandchild: outlives the generation until told to exit.
        os.close(self.link)
        while time.monotonic() - self.started < MAX_LIFE:
            if os.path.exists(self.file("orphan-exit")):
                os._exit(0)
            time.sleep(POLL)
        os._exit(0)


def main() -> None:
    # Blocked before anything else: they are taken, in order, by sigtimedwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    Fake(sys.argv[1]).run()


if __name__ == "__main__":
    main()
