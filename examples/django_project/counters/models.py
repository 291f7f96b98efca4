"""One model: named counters that tasks create, increment and read."""

from __future__ import annotations

from typing import Any

from django.db import models


class Counter(models.Model):
    name = models.CharField(max_length=200, unique=True)
    value = models.BigIntegerField(default=0)
    #: The process (a task's fork) that changed the row last.
    last_pid = models.IntegerField(null=True, blank=True)
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name}={self.value}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "last_pid": self.last_pid,
            "updated_at": self.updated_at.isoformat(),
        }
