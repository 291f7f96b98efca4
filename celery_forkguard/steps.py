"""The consumer bootstep that puts a forkguard worker under operator control.

The pool adds it to ``app.steps['consumer']`` when it is created, which is
before Celery builds the consumer's blueprint: so it runs whenever, and only
when, the forkguard pool does, with nothing for the user to configure.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from celery_forkguard.controller import Controller
from celery_forkguard.prometheus import start_exporter

logger = get_logger(__name__)


class ForkguardControl(bootsteps.StartStopStep):
    """Installs Resque's signals and the ``forkguard_*`` remote commands."""

    label = "forkguard"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        c.forkguard = None

    def start(self, c: Any) -> None:
        from celery_forkguard import control  # noqa: F401  (registers the commands)

        controller = c.forkguard
        if controller is None:
            controller = c.forkguard = Controller(c, c.pool, c.pool.settings)
            controller.watch_starter()
            settings = c.pool.settings
            if settings.metrics_port:
                # Once, after the pool (and its fork server) started.
                start_exporter(c.pool, settings.metrics_port, settings.metrics_address)
        controller.relay.attach(c.hub, c.call_soon)
        controller.start_liveness(c.hub or c.timer)
        # Installed after Celery's own handlers (worker start), so ours win.
        controller.relay.install(controller.signals())
        if controller.paused:
            # The consumer was restarted (connection lost) while paused: the
            # loop starts consuming again; stop it once it has.
            c.call_soon(controller.stop_consuming)
        else:
            # The task consumer started before this step (``requires``).
            controller.announce_ready()


def install_consumer_step(app: Any) -> None:
    steps = app.steps["consumer"]
    if ForkguardControl not in steps:
        steps.add(ForkguardControl)
