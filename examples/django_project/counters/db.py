"""Which database connection this process is using, in words a test can compare."""

from __future__ import annotations

import os
from typing import Any

from django.db import connection


def connection_identity() -> dict[str, Any]:
    """Open (or reuse) this process's default connection and say which one it is.

    On PostgreSQL a connection is a server process: ``pg_backend_pid()`` names
    it, and with its ``backend_start`` it stays unique even if the server
    reuses the pid later.  SQLite has no server: the connection object's
    address, qualified by this process's pid, names it.
    """
    connection.ensure_connection()
    info: dict[str, Any] = {
        "vendor": connection.vendor,
        "database": str(connection.settings_dict["NAME"]),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "backend_pid": None,
    }
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            )
            backend_pid, backend_start = cursor.fetchone()
        info["backend_pid"] = backend_pid
        info["connection"] = f"postgresql backend {backend_pid} started {backend_start.isoformat()}"
    else:
        info["connection"] = (
            f"{connection.vendor} connection {id(connection.connection):#x} in pid {os.getpid()}"
        )
    return info
