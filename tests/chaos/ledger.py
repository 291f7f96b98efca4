"""What a chaos case sent, what became of it, and the one figure line that says so.

Every task id the test sends is written down with how it acknowledges
(``early``: at most once; ``late``: ``acks_late`` with
``reject_on_worker_lost``, at least once).  At the end each id is looked up:

- its state in the result backend (``SUCCESS``, ``FAILURE``, ``REVOKED`` are
  terminal; ``RETRY`` with "cancelled by Celery" is how Celery 5.5+ records an
  early-ack task its cold shutdown cancelled: it will not run again);
- how many times it ran (the ``runs`` its body counted, ``chaos_app``);
- whether its message is still in the broker (handed back, waiting).

``lost`` is a sent id with none of those; ``ran_twice`` an early-ack id that
ran more than once.  An ``acks_late`` id that ran more than once was
redelivered after a real loss, which is Celery's at-least-once; it is counted
apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Callable, Optional

import redis

from tests.chaos.chaos_app import RunEvidence

EARLY, LATE = "early", "late"
TERMINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
CHUNK = 1000
#: How long settling may go without a single task finishing before it gives up.
STALL = 60.0


@dataclass(frozen=True)
class Outcome:
    """A task's state in the backend, and its error's type and text on failure."""

    state: str = ""
    error_type: str = ""
    error: str = ""

    @classmethod
    def from_meta(cls, raw: Optional[str]) -> Outcome:
        if raw is None:
            return cls()
        meta = json.loads(raw)
        result = meta.get("result")
        if isinstance(result, dict) and "exc_type" in result:
            message = result.get("exc_message")
            text = " ".join(map(str, message)) if isinstance(message, list) else str(message)
            return cls(meta["status"], str(result["exc_type"]), text)
        return cls(meta["status"])

    @property
    def cancelled(self) -> bool:
        # chaos_app's tasks never retry: RETRY is Celery's cold-shutdown cancellation
        # (its "cancelled by Celery" text does not survive the JSON of a Retry).
        return self.state == "RETRY"

    @property
    def cold_killed(self) -> bool:
        """Killed by the pool at a cold shutdown, Celery not having cancelled it first.

        A task whose child was still being forked when Celery 5.5 cancelled the
        active ones is not active yet: the pool then kills it as it ends, and
        records it so (the README's "cold shutdown" row); it never runs again.
        """
        return self.state == "FAILURE" and "cold shutdown killed the task" in (self.error or "")


@dataclass
class Figures:
    """The counts of one case; :meth:`line` is what the suite prints."""

    name: str
    sent: int
    done: int
    failed: int
    requeued: int
    lost: int
    ran_twice: int
    redelivered: int
    cancelled: int
    seconds: float
    lost_ids: list[str] = field(default_factory=list)
    twice_ids: list[str] = field(default_factory=list)
    #: What else the case measured, printed before the time.
    notes: str = ""

    def line(self) -> str:
        extra = f" cancelled={self.cancelled}" if self.cancelled else ""
        extra += f" {self.notes}" if self.notes else ""
        return (f"chaos {self.name}: sent={self.sent} done={self.done} failed={self.failed} "
                f"requeued={self.requeued} lost={self.lost} ran_twice={self.ran_twice} "
                f"(acks_late redelivered={self.redelivered}){extra} in {self.seconds:.1f}s")


class Ledger:
    """The ids a case sent, and how to read what became of them."""

    def __init__(self, backend_url: str, evidence: RunEvidence) -> None:
        self.backend = redis.Redis.from_url(backend_url, decode_responses=True)
        self.evidence = evidence
        self.kinds: dict[str, str] = {}
        #: Ids seen over already: settling re-reads only the others (10,000 ids add up).
        self._over: set[str] = set()

    def add(self, task_id: str, kind: str) -> None:
        self.kinds[task_id] = kind

    def ids(self, kind: Optional[str] = None) -> list[str]:
        # A copy first: a sender thread may be adding ids meanwhile.
        return [i for i, k in dict(self.kinds).items() if kind is None or k == kind]

    # -- reading -----------------------------------------------------------------------------

    def outcomes(self, ids: Optional[Iterable[str]] = None) -> dict[str, Outcome]:
        wanted = self.ids() if ids is None else list(ids)
        found: dict[str, Outcome] = {}
        for chunk in _chunks(wanted):
            raws = self.backend.mget([f"celery-task-meta-{task_id}" for task_id in chunk])
            found.update(zip(chunk, map(Outcome.from_meta, raws)))
        return found

    def outcome(self, task_id: str) -> Outcome:
        return self.outcomes([task_id])[task_id]

    def runs(self, ids: Optional[Iterable[str]] = None) -> dict[str, int]:
        wanted = self.ids() if ids is None else list(ids)
        found: dict[str, int] = {}
        for chunk in _chunks(wanted):
            pipe = self.evidence.client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.hget(self.evidence.key(task_id), "runs")
            found.update(zip(chunk, (int(r or 0) for r in pipe.execute())))
        return found

    def finished(self, task_id: str, outcome: Outcome) -> bool:
        """Whether this id is over: terminal, or (early ack) cancelled for good."""
        if outcome.state in TERMINAL:
            return True
        return outcome.cancelled and self.kinds.get(task_id) == EARLY

    def unfinished(self) -> list[str]:
        pending = [i for i in self.ids() if i not in self._over]
        left = []
        for task_id, outcome in self.outcomes(pending).items():
            if self.finished(task_id, outcome):
                self._over.add(task_id)
            else:
                left.append(task_id)
        return left

    def finished_count(self) -> int:
        return len(self.kinds) - len(self.unfinished())

    # -- waiting -----------------------------------------------------------------------------

    def settle(self, quiet: Callable[[list[str]], bool], timeout: float = 300.0) -> bool:
        """Wait until ``quiet(unfinished ids)`` holds twice in a row.

        Twice, because a requeued message is briefly neither in the broker nor
        over.  Gives up, returning False, at *timeout* or when no id finished
        for ``STALL`` seconds; the figures then show what is left.
        """
        deadline = time.monotonic() + timeout
        last_left, last_change, calm = -1, time.monotonic(), 0
        while True:
            left = self.unfinished()
            calm = calm + 1 if quiet(left) else 0
            if calm >= 2:
                return True
            now = time.monotonic()
            if len(left) != last_left:
                last_left, last_change = len(left), now
            if now >= deadline or now - last_change > STALL:
                return False
            time.sleep(0.25)

    # -- the figures -------------------------------------------------------------------------

    def figures(self, name: str, seconds: float, still_queued: set[str],
                notes: str = "") -> Figures:
        outcomes, runs = self.outcomes(), self.runs()
        states = [o.state for o in outcomes.values()]
        lost = [i for i, o in outcomes.items()
                if not self.finished(i, o) and i not in still_queued]
        twice = [i for i in self.ids(EARLY) if runs.get(i, 0) > 1]
        return Figures(
            name=name,
            sent=len(outcomes),
            done=states.count("SUCCESS"),
            failed=states.count("FAILURE") + states.count("REVOKED"),
            requeued=len([i for i, o in outcomes.items()
                          if not self.finished(i, o) and i in still_queued]),
            lost=len(lost),
            ran_twice=len(twice),
            redelivered=len([i for i in self.ids(LATE) if runs.get(i, 0) > 1]),
            cancelled=len([o for o in outcomes.values() if o.cancelled]),
            seconds=seconds,
            lost_ids=lost,
            twice_ids=twice,
            notes=notes,
        )

    def forget(self) -> None:
        """Delete the results and evidence of every id (they would expire in an hour)."""
        for chunk in _chunks(self.ids()):
            self.backend.unlink(*(f"celery-task-meta-{task_id}" for task_id in chunk))
            self.evidence.client.unlink(*(self.evidence.key(task_id) for task_id in chunk))
        self.backend.close()


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]
