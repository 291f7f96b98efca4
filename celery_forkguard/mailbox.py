"""Hand a worker's remote-control mailbox over to the next generation.

During a reload two generations of one worker overlap, and both were started
with the same node name.  Celery's mailbox (the ``<name>.celery.pidbox``
queue) cannot be shared: Celery 5.7 declares it exclusive on RabbitMQ, so the
second worker fails to start ("RESOURCE_LOCKED"), and on earlier releases the
two would split each broadcast between them, round robin.  So before the
starter execs a new generation, the serving one moves its mailbox to a name of
its own (``name.g3@host`` for generation 3) and keeps answering remote control
there while it serves and retires; if the new generation fails, it moves back.

Only the mailbox moves (on RabbitMQ, a queue of the new name; on Redis, the
name the node answers to): events, logs and results still carry the node name
the worker was started with.
"""

from __future__ import annotations

from typing import Any, Optional

CONTROL_STEP = "celery.worker.consumer.control.Control"


def generation_node_name(hostname: str, generation: int) -> str:
    """``name@host`` of generation N as ``name.gN@host``."""
    name, at, host = hostname.partition("@")
    return f"{name}.g{generation}{at}{host}"


def mailbox_name(consumer: Any) -> Optional[str]:
    """The name this worker answers remote control under (None: remote control is off)."""
    box = _pidbox(consumer)
    return None if box is None else str(box.node.hostname)


def move_mailbox(consumer: Any, hostname: str) -> bool:
    """Listen for remote control as *hostname*; False when it already did, or is off.

    Cancelling the consumer deletes the queue on RabbitMQ (it is auto-delete),
    so the old name is free for the next generation once this returns.
    """
    box = _pidbox(consumer)
    if box is None:
        return False
    if box.node.hostname == hostname:
        return False
    if not _queue_per_node(consumer):
        box.node.hostname = hostname
        return True
    box.stop(consumer)
    box.node.hostname = hostname
    if consumer.connection is not None:
        box.start(consumer)  # a reconnect restarts it under the new name otherwise
    return True


def _queue_per_node(consumer: Any) -> bool:
    """Whether broadcasts reach a node through a queue named after it.

    Not on Redis: kombu publishes broadcasts there (PUBLISH on the exchange)
    and each node picks those for its name, so only the name has to change;
    re-subscribing a new channel there can miss broadcasts (kombu 5.6).
    """
    connection = consumer.connection
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_type", "amqp") != "redis"


def _pidbox(consumer: Any) -> Any:
    blueprint = getattr(consumer, "blueprint", None)
    step = blueprint.steps.get(CONTROL_STEP) if blueprint is not None else None
    return getattr(step, "box", None)
