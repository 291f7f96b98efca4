"""Evidence tasks leave in Redis, from their children, for the tests to read."""

from __future__ import annotations

import os
from typing import Any

import redis

#: How long evidence (and results) outlive a test run.
EVIDENCE_TTL = 3600


class Evidence:
    """One hash per task under ``PREFIX:<task id>``, plus an event list."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._client: redis.Redis | None = None
        self._pid = 0

    @property
    def client(self) -> redis.Redis:
        # One connection per process: a child must not use its parent's socket.
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(self.url, decode_responses=True)
            self._pid = os.getpid()
        return self._client

    def key(self, task_id: str) -> str:
        return f"{self.prefix}:{task_id}"

    def record(self, task_id: str, **fields: Any) -> None:
        pipe = self.client.pipeline()
        pipe.hset(self.key(task_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(self.key(task_id), EVIDENCE_TTL)
        pipe.execute()

    def incr(self, task_id: str, field: str) -> int:
        value = int(self.client.hincrby(self.key(task_id), field, 1))
        self.client.expire(self.key(task_id), EVIDENCE_TTL)
        return value

    def fields(self, task_id: str) -> dict[str, str]:
        return dict(self.client.hgetall(self.key(task_id)))

    def push(self, task_id: str, event: str) -> None:
        key = f"{self.key(task_id)}:events"
        self.client.rpush(key, event)
        self.client.expire(key, EVIDENCE_TTL)

    def events(self, task_id: str) -> list[str]:
        return list(self.client.lrange(f"{self.key(task_id)}:events", 0, -1))
