"""``celery forkguard``: the command installed with the package."""

from __future__ import annotations

import click

# Importing the package registers the pool name with Celery's CLI.
import celery_forkguard  # noqa: F401


@click.group(name="forkguard")
def forkguard() -> None:
    """Steer forkguard workers (the ``-P forkguard`` pool)."""
