"""Brokers for the chaos cases: what is still queued, and a Redis of our own to restart.

The shared Redis (127.0.0.1:6379) carries the broker in DB 12 and results and
evidence in DB 13; ``tests/integration`` uses DBs 8 to 11, ``tests/install``
14 and 15.  Cases that restart the broker or cut its connections use a
:class:`PrivateRedis` instead, a ``redis-server`` of their own on a free
port in 6391..6399, with an append-only file so queued messages survive a
restart.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import psutil
import redis
from celery import Celery

from tests.harness import stop_session, wait_for

REDIS_HOST = "127.0.0.1"
SHARED_REDIS_PORT = 6379
BROKER_URL = f"redis://{REDIS_HOST}:{SHARED_REDIS_PORT}/12"
BACKEND_URL = f"redis://{REDIS_HOST}:{SHARED_REDIS_PORT}/13"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
PRIVATE_PORTS = range(6391, 6400)


def redis_problem(url: str) -> Optional[str]:
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        return f"Redis is not reachable at {url}: {exc}"
    return None


def rabbitmq_problem() -> Optional[str]:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:
        return f"RabbitMQ is not reachable at 127.0.0.1:5672: {exc}"
    return None


# -- what is still in the broker ---------------------------------------------------------------


class RedisQueue:
    """Task ids whose message is in a kombu Redis queue: waiting, or delivered and unacked."""

    def __init__(self, url: str, queue: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.queue = queue

    def ready_ids(self) -> set[str]:
        return {_task_id(json.loads(raw)) for raw in self.client.lrange(self.queue, 0, -1)}

    def unacked(self) -> dict[str, str]:
        """Delivery tag -> task id of what was delivered from this queue and never acked.

        kombu keeps these in one hash per database; a consumer that goes away
        without acking (or without managing to give them back) leaves them
        there until the visibility timeout, when a worker restores them.
        """
        found = {}
        for tag, raw in self.client.hgetall("unacked").items():
            message, _exchange, routing_key = json.loads(raw)
            if routing_key == self.queue:
                found[tag] = _task_id(message)
        return found

    def task_ids(self) -> set[str]:
        return (self.ready_ids() | set(self.unacked().values())) - {""}

    def depth(self) -> int:
        return len(self.task_ids())

    def restore(self, app: Celery, tags: Iterable[str]) -> None:
        """Put unacked messages back in the queue, as kombu does after the visibility timeout."""
        with app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            for tag in tags:
                qos.restore_by_tag(tag)

    def delete(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.queue, f"_kombu.binding.{self.queue}")
            for tag in self.unacked():
                self.client.hdel("unacked", tag)
                self.client.zrem("unacked_index", tag)
        self.client.close()


class AmqpQueue:
    """A RabbitMQ queue: ids are not listable; the broker requeues what a dead consumer held."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def task_ids(self) -> set[str]:
        return set()

    def depth(self) -> int:
        with self.app.connection_for_write() as conn:
            try:
                _, count, _ = conn.default_channel.queue_declare(self.queue, passive=True)
            except Exception:  # not declared yet, or deleted
                return 0
        return int(count)

    def delete(self) -> None:
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(self.queue)


def _task_id(message: dict[str, Any]) -> str:
    return str((message.get("headers") or {}).get("id") or "")


# -- a Redis of our own ------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((REDIS_HOST, port))
        except OSError:
            return False
    return True


class PrivateRedis:
    """A ``redis-server`` this test owns: started, restarted, cut and stopped at will."""

    def __init__(self) -> None:
        self.port = next((p for p in PRIVATE_PORTS if _port_free(p)), 0)
        assert self.port, f"no free port in {PRIVATE_PORTS} for a private Redis"
        self.dir = Path(tempfile.mkdtemp(prefix="fgchaos-redis-"))
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=self.port, decode_responses=True)

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", REDIS_HOST,
            "--dir", str(self.dir), "--appendonly", "yes", "--save", "",
        ]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._answers, timeout=20, message=f"the private Redis on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"redis-server exited: {(self.dir / 'redis.log').read_text(errors='replace')}")
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def restart(self) -> None:
        """Stop it cleanly (TERM: the append-only file is synced), start it again."""
        self.stop()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc, 20.0)
            self.proc = None

    def drop_clients_of(self, pid: int) -> int:
        """Close every connection process *pid* holds to this Redis; return how many.

        Only that process's: the test's own connections (its producer's) are
        left alone, so a message it is sending never goes out twice.
        """
        ports = {conn.laddr.port for conn in _tcp_connections(pid)
                 if conn.raddr and conn.raddr.port == self.port}
        client = self.client()
        dropped = 0
        try:
            for entry in client.client_list():
                if int(entry["addr"].rsplit(":", 1)[1]) in ports:
                    dropped += client.client_kill_filter(_id=entry["id"])
        finally:
            client.close()
        return dropped

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _tcp_connections(pid: int) -> list[Any]:
    proc = psutil.Process(pid)
    return list(getattr(proc, "net_connections", proc.connections)(kind="tcp"))
