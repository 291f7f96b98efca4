"""``celery forkguard starter``'s state machine, with real processes and real signals.

Each test runs ``Starter.run()`` in a process of its own (``python -c``, in a new
session) whose generations are ``fake_generation.py`` instead of Celery workers:
no Celery, no broker.  What each generation does is chosen per generation number
in ``plan.json``; what they receive and do is appended to ``events``; the
starter logs to ``starter.log``.  Tests signal the starter with ``os.kill`` and
poll those files with deadlines.

A *barrier* (two SIGUSR1, each waited for in the log) proves the starter's loop
went round after everything that happened before it, so a test can then check
that something did *not* happen (a second reload, a signal to the wrong one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import psutil
import pytest

from tests.harness import REPO_ROOT, pid_alive, signal_group, wait_for

pytestmark = pytest.mark.timeout(30)

FAKE = Path(__file__).with_name("fake_generation.py")

#: Runs the starter; argv: workdir, ready_timeout, failed_grace, fake, handover_timeout.
RUNNER = r"""
import logging, sys
from celery_forkguard import starter
workdir, ready_timeout, failed_grace = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
starter.HANDOVER_TIMEOUT = float(sys.argv[5])
handler = logging.FileHandler(workdir + "/starter.log")
handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
log = logging.getLogger("celery_forkguard.starter")
log.addHandler(handler)
log.setLevel(logging.DEBUG)
starter.FAILED_GRACE = failed_grace
sys.exit(starter.Starter([sys.executable, sys.argv[4], workdir], ready_timeout).run())
"""

RunStarter = Callable[..., "StarterRun"]
T = TypeVar("T")

EVENT = re.compile(r"gen=(\d+) (.*) @([\d.]+)$")


@dataclass
class Event:
    gen: int
    what: str
    at: float  # CLOCK_MONOTONIC, comparable across processes


class StarterRun:
    """One starter process and the files its generations write."""

    def __init__(self, workdir: Path, plan: dict[int, str], ready_timeout: float,
                 failed_grace: float, handover_timeout: float) -> None:
        self.workdir = workdir
        (workdir / "plan.json").write_text(json.dumps({str(k): v for k, v in plan.items()}))
        (workdir / "events").touch()
        (workdir / "starter.log").touch()
        with open(workdir / "starter.out", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(workdir), str(ready_timeout),
                 str(failed_grace), str(FAKE), str(handover_timeout)],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    # -- reading -----------------------------------------------------------------------

    def log(self) -> str:
        return (self.workdir / "starter.log").read_text()

    def events(self, gen: Optional[int] = None) -> list[Event]:
        found = []
        for line in (self.workdir / "events").read_text().splitlines():
            match = EVENT.match(line)
            if match and (gen is None or int(match[1]) == gen):
                found.append(Event(int(match[1]), match[2], float(match[3])))
        return found

    def whats(self, gen: int) -> list[str]:
        return [e.what for e in self.events(gen)]

    def signals_of(self, gen: int) -> list[str]:
        return [w[4:] for w in self.whats(gen) if w.startswith("sig=")]

    def signals_but_barrier(self, gen: int) -> list[str]:
        """The signals *gen* got, but the barrier's SIGUSR1s (forwarded to the current one)."""
        return [name for name in self.signals_of(gen) if name != "USR1"]

    def event(self, gen: int, what: str) -> Event:
        return next(e for e in self.events(gen) if e.what == what)

    def gen_pid(self, gen: int) -> int:
        def started() -> Optional[int]:
            for e in self.events(gen):
                if e.what.startswith("start pid="):
                    return int(e.what.split()[1][4:])
            return None
        pid = self.wait(started, f"generation {gen} to start")
        assert pid is not None
        return pid

    def title(self) -> str:
        with open(f"/proc/{self.pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()

    def diagnostics(self) -> str:
        out = (self.workdir / "starter.out").read_text()
        return (f"\n--- starter.log ---\n{self.log()}--- events ---\n"
                f"{(self.workdir / 'events').read_text()}--- starter output ---\n{out}")

    # -- waiting -----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], T], what: str, timeout: float = 10.0) -> T:
        try:
            return wait_for(predicate, timeout=timeout, message=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self.diagnostics()}") from None

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> str:
        self.wait(lambda: self.log().count(text) >= count,
                  f"{count}x {text!r} in the starter's log", timeout)
        return self.log()

    def wait_event(self, gen: int, what: str, count: int = 1, timeout: float = 10.0) -> None:
        self.wait(lambda: self.whats(gen).count(what) >= count,
                  f"{count}x {what!r} from generation {gen}", timeout)

    def wait_signals(self, gen: int, count: int) -> None:
        """Wait until generation *gen* has taken *count* signals in all."""
        self.wait(lambda: len(self.signals_of(gen)) >= count,
                  f"{count} signal(s) at generation {gen}")

    def wait_current(self, gen: int) -> int:
        """Wait until generation *gen* consumes; return its pid."""
        pid = self.gen_pid(gen)
        self.wait_log(f"generation {gen} (pid {pid}) is consuming")
        return pid

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the starter still runs after {timeout}s"
                                 f"{self.diagnostics()}") from None

    def wait_title(self, *parts: str) -> str:
        self.wait(lambda: all(p in self.title() for p in parts), f"title with {parts}")
        return self.title()

    # -- acting ------------------------------------------------------------------------

    def kill(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def signal_and_wait(self, signum: signal.Signals) -> None:
        """Signal the starter and wait until its loop has taken the signal."""
        text = f"received {signum.name}"
        before = self.log().count(text)
        self.kill(signum)
        self.wait_log(text, before + 1)

    def barrier(self) -> None:
        """Return once the starter's loop went round after everything done so far.

        The first SIGUSR1 may be logged in the very step that handles earlier
        events; the second is read by a later ``select``, after that step ended.
        Both are forwarded to the current generation, if any (which may get them
        as one: signals that are pending at once merge).
        """
        self.signal_and_wait(signal.SIGUSR1)
        self.signal_and_wait(signal.SIGUSR1)

    def touch(self, gen: int, what: str) -> None:
        (self.workdir / f"gen{gen}.{what}").touch()

    def started_count(self) -> int:
        return len(re.findall(r": started generation \d+", self.log()))

    # -- cleaning up -------------------------------------------------------------------

    def cleanup(self) -> None:
        """SIGKILL the starter's group and every generation (each has a session of its own).

        The starter goes first, so that nothing below can leave it running.
        """
        pids: set[int] = set()
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in psutil.Process(self.pid).children(recursive=True))
        signal_group(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            for e in self.events():
                match = re.match(r"(?:start|grandchild) pid=(\d+)", e.what)
                if match:
                    pids.add(int(match[1]))
        for pid in pids:
            with contextlib.suppress(psutil.Error, OSError):
                if str(FAKE) in psutil.Process(pid).cmdline():
                    signal_group(os.getpgid(pid), signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5,
                 message="every generation to be gone")


@pytest.fixture
def run_starter(tmp_path: Path) -> Iterator[RunStarter]:
    runs: list[StarterRun] = []

    def start(plan: Optional[dict[int, str]] = None, ready_timeout: float = 10.0,
              failed_grace: float = 10.0, handover_timeout: float = 10.0) -> StarterRun:
        run = StarterRun(tmp_path, plan or {}, ready_timeout, failed_grace, handover_timeout)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


# -- start and reload ------------------------------------------------------------------


def test_first_generation_becomes_current_with_no_ready_deadline(run_starter: RunStarter) -> None:
    starter = run_starter({1: "gated"}, ready_timeout=0.3)
    pid = starter.gen_pid(1)
    starter.wait_title(f"generation 1 starting (pid {pid})")
    # Nothing serves yet: the pause is remembered for the generation to come.
    starter.kill(signal.SIGUSR2)
    starter.wait_log("no current generation to send SIGUSR2 to")
    # Not a synchronisation: the point is that nothing happens once ready_timeout passed.
    time.sleep(0.5)
    starter.barrier()
    assert "deploy failed" not in starter.log()
    assert "sig=TERM" not in starter.whats(1)

    starter.touch(1, "go")
    starter.wait_current(1)
    starter.wait_event(1, "sig=USR2")
    assert starter.signals_of(1)[0] == "USR2"  # the replayed pause comes first
    starter.wait_log(f"generation 1 (pid {pid}): replayed pause")
    title = starter.wait_title(f"generation 1 current (pid {pid})")
    assert title.startswith("celery forkguard starter: ")
    assert starter.proc.poll() is None


def test_hup_starts_a_generation_that_takes_over_once_ready(run_starter: RunStarter) -> None:
    starter = run_starter()
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    log = starter.wait_log(f"generation 2 (pid {pid2}) is consuming (ready in ")
    assert f"reload (SIGHUP): started generation 2 (pid {pid2})" in log
    assert f"; retiring generation 1 (pid {pid1})" in log
    starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0) after ")
    # The new one is exec'd once the old one moved its mailbox aside; WINCH only
    # once the new one is ready.
    assert starter.whats(1)[2:4] == ["got mailbox-release", "wrote mailbox-released"]
    assert starter.event(1, "wrote mailbox-released").at <= starter.events(2)[0].at
    assert starter.event(1, "sig=WINCH").at >= starter.event(2, "wrote ready").at
    assert starter.whats(1)[-2:] == ["wrote retiring 0", "exit code=0"]
    starter.wait_title(f"generation 2 current (pid {pid2})")
    assert "generation 1" not in starter.title()
    assert starter.proc.poll() is None


def test_reload_goes_on_when_the_serving_one_keeps_its_mailbox(run_starter: RunStarter) -> None:
    starter = run_starter({1: "ok,keep-mailbox"}, handover_timeout=0.5)
    pid1 = starter.wait_current(1)
    hup_at = time.monotonic()
    starter.kill(signal.SIGHUP)
    starter.kill(signal.SIGHUP)  # while it waits: the same reload, not a queued one
    pid2 = starter.wait_current(2)
    log = starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    assert (f"generation 1 (pid {pid1}) did not free its mailbox within 0.5s; starting the "
            "next generation anyway") in log, starter.diagnostics()
    assert starter.events(2)[0].at - hup_at >= 0.5
    starter.barrier()
    assert starter.started_count() == 2, starter.diagnostics()
    assert "reload queued" not in starter.log()
    assert pid2 != pid1


def test_hups_while_a_generation_starts_make_one_queued_reload(run_starter: RunStarter) -> None:
    starter = run_starter({2: "gated"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    queued = f"SIGHUP: reload queued until generation 2 (pid {pid2}) has started"
    for n in (1, 2, 3):
        starter.kill(signal.SIGHUP)
        starter.wait_log(queued, n)
    starter.barrier()
    assert starter.started_count() == 2
    assert "sig=WINCH" not in starter.whats(1)

    starter.touch(2, "go")
    starter.wait_log(f"generation 2 (pid {pid2}) is consuming")
    starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    pid3 = starter.wait_current(3)
    log = starter.wait_log(f"generation 2 (pid {pid2}) retired (exit 0)")
    assert f"reload (queued reload): started generation 3 (pid {pid3})" in log
    starter.barrier()
    assert starter.started_count() == 3, starter.diagnostics()
    assert not starter.events(4)


def test_hup_while_a_generation_retires_waits_for_it(run_starter: RunStarter) -> None:
    starter = run_starter({1: "busy:2"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.wait_current(2)
    starter.wait_log(f"generation 1 (pid {pid1}) stopped consuming; 2 task(s) still running")
    starter.wait_title(f"generation 1 retiring (pid {pid1}, 2 task(s) running)",
                       f"generation 2 current (pid {pid2})")

    starter.kill(signal.SIGHUP)
    starter.wait_log(f"reload queued until generation 1 (pid {pid1}) has retired")
    starter.barrier()
    assert starter.started_count() == 2

    starter.touch(1, "release")
    starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    assert starter.whats(1)[-3:] == ["wrote retiring 1", "wrote retiring 0", "exit code=0"]
    pid3 = starter.wait_current(3)
    log = starter.wait_log(f"generation 2 (pid {pid2}) retired (exit 0)")
    assert f"reload (queued reload): started generation 3 (pid {pid3})" in log
    starter.wait_title(f"generation 3 current (pid {pid3})")


# -- bad deploys -----------------------------------------------------------------------


def test_generation_that_exits_before_ready_is_a_failed_deploy(run_starter: RunStarter) -> None:
    starter = run_starter({2: "exit-before-ready:2"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    starter.wait_log(f"deploy failed: generation 2 (pid {pid2}) exited (exit 2) before "
                     f"consuming; generation 1 (pid {pid1}) keeps serving")
    # The node's mailbox goes back to the one that serves on.
    starter.wait_event(1, "got mailbox-reclaim")
    assert starter.event(1, "got mailbox-reclaim").at >= starter.event(2, "exit code=2").at
    starter.barrier()  # its USR1s reach generation 1: it still serves
    starter.wait_event(1, "sig=USR1")
    assert starter.signals_of(1) == ["USR1"] * len(starter.signals_of(1))
    assert starter.proc.poll() is None
    assert starter.title() == f"celery forkguard starter: generation 1 current (pid {pid1})"

    starter.kill(signal.SIGHUP)
    pid3 = starter.wait_current(3)
    starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    starter.wait_title(f"generation 3 current (pid {pid3})")


def test_generation_not_ready_in_time_is_stopped_old_one_serves(run_starter: RunStarter) -> None:
    starter = run_starter({2: "never-ready"}, ready_timeout=0.5)
    pid1 = starter.wait_current(1)
    hup_at = time.monotonic()
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    starter.wait_log(f"deploy failed: generation 2 (pid {pid2}) not consuming after 0.5s; "
                     f"generation 1 (pid {pid1}) keeps serving")
    starter.wait_event(2, "exit code=0")
    assert starter.whats(2)[-2:] == ["sig=TERM", "exit code=0"]
    assert starter.event(2, "sig=TERM").at - hup_at >= 0.5
    starter.barrier()
    starter.wait_event(1, "sig=USR1")
    assert starter.signals_but_barrier(1) == []
    assert "SIGKILL" not in starter.log()
    assert starter.title() == f"celery forkguard starter: generation 1 current (pid {pid1})"


def test_failed_one_ignoring_term_is_killed_then_a_queued_hup_runs(run_starter: RunStarter) -> None:
    starter = run_starter({2: "never-ready,ignore-term"}, ready_timeout=0.3, failed_grace=0.5)
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    starter.wait_log(f"deploy failed: generation 2 (pid {pid2}) not consuming after 0.3s")
    starter.wait_event(2, "sig=TERM")
    # While the failed one is being stopped, a HUP waits for it.
    starter.kill(signal.SIGHUP)
    starter.wait_log("SIGHUP: reload queued until generation 2")
    starter.wait_log(f"generation 2 (pid {pid2}) still running 0.5s after TERM: SIGKILL")
    pid3 = starter.wait_current(3)
    assert not pid_alive(pid2)
    assert "exit code=" not in " ".join(starter.whats(2))  # it was SIGKILLed
    log = starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    assert f"reload (queued reload): started generation 3 (pid {pid3})" in log


# -- forwarded signals -----------------------------------------------------------------

FORWARDED = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTTIN, signal.SIGTTOU]


def send_and_wait(starter: StarterRun, gen: int, signums: list[signal.Signals]) -> None:
    """Signal the starter one at a time, each once generation *gen* got the one before.

    Each wait is for that very signal: a count of all signals could be met by a
    barrier's USR1 still on its way, and a TTIN/TTOU sent while a CONT is
    pending makes the kernel discard the CONT (stop signals cancel it).
    """
    for signum in signums:
        name = signum.name[3:]
        seen = starter.signals_of(gen).count(name)
        starter.kill(signum)
        starter.wait(lambda name=name, seen=seen: starter.signals_of(gen).count(name) > seen,
                     f"{signum.name} at generation {gen}")


def test_operator_signals_go_to_the_current_generation_only(run_starter: RunStarter) -> None:
    starter = run_starter({1: "busy:1"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    starter.wait_current(2)
    starter.wait_log(f"generation 1 (pid {pid1}) stopped consuming")
    send_and_wait(starter, 2, FORWARDED)
    starter.barrier()
    assert starter.signals_of(1) == ["WINCH"]
    assert starter.signals_but_barrier(2) == ["USR2", "CONT", "TTIN", "TTOU"]


def test_pause_and_net_resize_are_replayed_to_each_new_generation(run_starter: RunStarter) -> None:
    starter = run_starter()
    starter.wait_current(1)
    send_and_wait(starter, 1, [signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTIN,
                               signal.SIGTTIN, signal.SIGTTOU])
    assert starter.signals_of(1) == ["USR2", "TTIN", "TTIN", "TTIN", "TTOU"]

    starter.kill(signal.SIGHUP)
    pid2 = starter.wait_current(2)
    starter.wait_log(f"generation 2 (pid {pid2}): replayed pause, resize +2")
    starter.wait_event(2, "sig=TTIN", 2)
    starter.barrier()
    assert starter.signals_but_barrier(2) == ["USR2", "TTIN", "TTIN"]

    # CONT ends the pause; TTOU x3 brings the net resize to -1.
    send_and_wait(starter, 2, [signal.SIGCONT, signal.SIGTTOU, signal.SIGTTOU, signal.SIGTTOU])
    starter.kill(signal.SIGHUP)
    pid3 = starter.wait_current(3)
    log = starter.wait_log(f"generation 3 (pid {pid3}): replayed resize -1")
    assert "replayed pause" not in log.split(f"generation 3 (pid {pid3}) is consuming")[1]
    starter.wait_event(3, "sig=TTOU")
    starter.barrier()
    assert starter.signals_but_barrier(3) == ["TTOU"]


def test_a_replayed_resize_arrives_whole(run_starter: RunStarter) -> None:
    starter = run_starter()
    starter.wait_current(1)
    send_and_wait(starter, 1, [signal.SIGTTIN] * 4)
    starter.kill(signal.SIGHUP)
    pid2 = starter.wait_current(2)
    starter.wait_log(f"generation 2 (pid {pid2}): replayed resize +4")
    # Merged ones never come: 1 s is ample for four TTINs, however they are paced.
    with contextlib.suppress(AssertionError):
        starter.wait_event(2, "sig=TTIN", 4, timeout=1.0)
    starter.barrier()
    assert starter.signals_but_barrier(2) == ["TTIN"] * 4


# -- stopping --------------------------------------------------------------------------


def test_term_stops_every_generation_exit_code_is_the_current_ones(run_starter: RunStarter) -> None:
    starter = run_starter({1: "busy:1,ignore-term", 2: "ok,term=7"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.wait_current(2)
    starter.wait_log(f"generation 1 (pid {pid1}) stopped consuming")

    starter.kill(signal.SIGTERM)
    starter.wait_event(2, "exit code=7")
    starter.wait_event(1, "sig=TERM")
    starter.wait_log(f"generation 2 (pid {pid2}) stopped (exit 7)")
    # The retiring one still runs: so does the starter, saying it stops.
    starter.wait_title(f"generation 1 retiring (pid {pid1}, 1 task(s) running)", "[stopping]")
    starter.kill(signal.SIGHUP)
    starter.wait_log("SIGHUP ignored: stopping")
    assert starter.proc.poll() is None

    starter.touch(1, "release")
    assert starter.wait_exit() == 7
    log = starter.log()
    assert f"generation 1 (pid {pid1}) retired (exit 0)" in log
    assert "every generation has exited; exit 7" in log
    assert starter.started_count() == 2


def test_int_reaches_the_current_one_and_a_starting_one_gets_term(run_starter: RunStarter) -> None:
    starter = run_starter({2: "never-ready"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    starter.wait_title(f"generation 2 starting (pid {pid2})")
    starter.kill(signal.SIGINT)
    assert starter.wait_exit() == 2  # the current one's INT exit code
    assert starter.whats(1)[-2:] == ["sig=INT", "exit code=2"]
    assert starter.whats(2)[-2:] == ["sig=TERM", "exit code=0"]
    log = starter.log()
    assert f"generation 1 (pid {pid1}) stopped (exit 2)" in log
    assert f"generation 2 (pid {pid2}) stopped before consuming (exit 0)" in log


@pytest.mark.parametrize(("signum", "behaviour", "code"), [
    (signal.SIGQUIT, "ok,quit=3", 3),
    (signal.SIGQUIT, "ok,quit=kill", 128 + signal.SIGKILL),
    (signal.SIGTERM, "ok,term=sig", 128 + signal.SIGTERM),
], ids=["quit-exit-3", "quit-killed", "term-killed-by-term"])
def test_stop_signal_exit_code_propagates(run_starter: RunStarter, signum: signal.Signals,
                                          behaviour: str, code: int) -> None:
    starter = run_starter({1: behaviour})
    starter.wait_current(1)
    starter.kill(signum)
    assert starter.wait_exit() == code
    assert f"sig={signum.name[3:]}" in starter.whats(1)
    assert f"every generation has exited; exit {code}" in starter.log()


# -- unexpected exits ------------------------------------------------------------------


def test_current_that_dies_is_restarted_with_doubling_back_off(run_starter: RunStarter) -> None:
    starter = run_starter({1: "die-after-ready:9", 2: "die-after-ready:9"})
    pid3 = starter.wait_current(3)
    log = starter.log()
    pid1, pid2 = starter.gen_pid(1), starter.gen_pid(2)
    assert re.search(rf"generation 1 \(pid {pid1}\) died unexpectedly \(killed by SIGKILL\) "
                     r"after \d+\.\ds\nERROR restarting in 1s\n", log.replace("starter: ", "")), log
    assert "restarting in 2s" in log
    assert f"restart: started generation 2 (pid {pid2})" in log
    assert f"restart: started generation 3 (pid {pid3})" in log, log
    died1 = starter.event(1, "kill self with SIGKILL").at
    died2 = starter.event(2, "kill self with SIGKILL").at
    assert starter.events(2)[0].at - died1 >= 0.9
    assert starter.events(3)[0].at - died2 >= 1.9
    assert starter.proc.poll() is None


def test_current_that_exits_zero_on_its_own_stops_the_starter(run_starter: RunStarter) -> None:
    # Generation 2 consumes, then exits 0 on its own (as after `celery control shutdown`).
    starter = run_starter({1: "busy:1,term=5", 2: "exit0"})
    pid1 = starter.wait_current(1)
    starter.kill(signal.SIGHUP)
    pid2 = starter.gen_pid(2)
    assert starter.wait_exit() == 0  # the current one's code, not the retiring one's 5
    assert starter.whats(1)[-2:] == ["sig=TERM", "exit code=5"]
    log = starter.log()
    assert (f"generation 2 (pid {pid2}) exited on its own (exit 0: a shutdown command?); "
            "the starter stops") in log
    assert f"generation 1 (pid {pid1}) retired (exit 5)" in log
    assert "restarting" not in log


def test_reload_line_from_current_reloads_from_retiring_is_ignored(run_starter: RunStarter) -> None:
    starter = run_starter({1: "busy:1"})
    pid1 = starter.wait_current(1)
    starter.touch(1, "reload")
    starter.wait_log(f"reload (forkguard_reload via generation 1 (pid {pid1})): "
                     "started generation 2")
    starter.wait_current(2)
    starter.wait_log(f"generation 1 (pid {pid1}) stopped consuming")

    starter.touch(1, "reload")  # now it retires: its reload is not for it to ask
    starter.wait_event(1, "wrote reload", 2)
    starter.touch(1, "release")
    starter.wait_log(f"generation 1 (pid {pid1}) retired (exit 0)")
    starter.barrier()
    log = starter.log()
    assert log.count("forkguard_reload via") == 1
    assert starter.started_count() == 2
    assert not starter.events(3)


# -- orphans ---------------------------------------------------------------------------


def test_orphans_of_a_dead_generation_are_reaped_by_the_starter(run_starter: RunStarter) -> None:
    starter = run_starter({1: "orphan"})
    pid1 = starter.wait_current(1)

    def grandchild() -> Optional[int]:
        for what in starter.whats(1):
            if what.startswith("grandchild pid="):
                return int(what.split("=")[1])
        return None

    orphan = starter.wait(grandchild, "the grandchild")
    assert orphan is not None
    assert psutil.Process(orphan).ppid() == pid1
    os.kill(pid1, signal.SIGKILL)
    starter.wait(lambda: psutil.Process(orphan).ppid() == starter.pid,
                 "the orphan to be reparented to the starter (subreaper)")
    starter.wait_log(f"generation 1 (pid {pid1}) died unexpectedly (killed by SIGKILL)")
    starter.wait_current(2)

    starter.touch(1, "orphan-exit")

    def gone() -> bool:
        try:
            psutil.Process(orphan)
        except psutil.NoSuchProcess:
            return True
        return False

    starter.wait(gone, "the orphan to exit and be reaped (no zombie left)")
    starter.wait_log(f"reaped orphan {orphan} (exit 0)")
    assert [p.pid for p in psutil.Process(starter.pid).children()] == [starter.gen_pid(2)]
